"""Frozen-feature cache: run the frozen encoders + aligner once per dataset.

The encoders and aligner are frozen, deterministic (eval mode, no dropout), so
their output per example never changes. Trials read these cached aligned
features and never load the encoders. The cache file is named by a hash of the
*content* of everything it depends on (bundle config and weights, manifest,
every image and audio file), so editing any input makes a new cache, and two
processes building the same cache at once each write a temp file and rename it
into place (atomic; both copies are identical).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.bundle import CONFIG_FILE, WEIGHTS_FILE, load_bundle
from trainer.data import Example, load_media
from trainer.progress_bar import progress

CACHE_VERSION = "1"
_ENCODE_BATCH = 32


def _file_digest(h: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def cache_key(bundle_dir: Path, examples: list[Example]) -> str:
    """Content hash of the bundle and of every example's inputs."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    _file_digest(h, bundle_dir / CONFIG_FILE)
    _file_digest(h, bundle_dir / WEIGHTS_FILE)
    for e in examples:
        h.update(json.dumps([e.id, e.prompt]).encode())
        _file_digest(h, e.image)
        _file_digest(h, e.audio)
    return h.hexdigest()[:24]


@torch.no_grad()
def encode(bundle_dir: Path, examples: list[Example], device: str = "cpu") -> torch.Tensor:
    """Aligned features [N, T, align_dim] for `examples` (fp32)."""
    bundle = load_bundle(bundle_dir, device)
    out = []
    starts = range(0, len(examples), _ENCODE_BATCH)
    for i in progress(starts, total=len(starts), desc="[feature-cache] encoding", unit="batch"):
        m = load_media(examples[i : i + _ENCODE_BATCH], bundle.spec)
        out.append(bundle(m.images.to(device), m.audio.to(device), m.text.to(device)).float().cpu())
    return torch.cat(out)


def cached_features(cache_dir: Path, bundle_dir: Path, examples: list[Example],
                    device: str = "cpu", log=print) -> Path:
    """Path of the cache file for `examples`, building it if missing."""
    path = Path(cache_dir) / f"features-{cache_key(bundle_dir, examples)}.safetensors"
    if path.is_file():
        return path
    log(f"[feature-cache] encoding {len(examples)} examples with the frozen encoders -> {path}")
    feats = encode(bundle_dir, examples, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".features-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"features": feats.contiguous()}, tmp,
                  metadata={"ids": json.dumps([e.id for e in examples])})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_features(path: Path, examples: list[Example]) -> torch.Tensor:
    """Load cached features and check they belong to `examples`, in order."""
    with safe_open(str(path), framework="pt") as f:
        ids = json.loads(f.metadata()["ids"])
        feats = f.get_tensor("features")
    if ids != [e.id for e in examples]:
        raise ValueError(f"{path}: cached example ids do not match the manifest")
    return feats
