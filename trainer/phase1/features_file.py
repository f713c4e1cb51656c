"""The aligned-features file: precomputed Phase 1 outputs, format v1.

One safetensors file:
  tensors   features  [N, T, D]  float32, float16 or bfloat16: aligned feature tokens
            mask      [N, T]     bool: which of the T tokens of a row are real
  metadata  format    "phase2-tune/aligned-features"
            version   "1"
            ids       JSON list of the N example ids (manifest `id`s), unique
            digest    optional "sha256:<hex>" of the ids, features and mask (`content_digest`);
                      when present it is checked at every load

Row i belongs to example ids[i]; its real tokens are `features[i][mask[i]]`, in order
(they need not come first). A row may have no real token of a modality it lacks, but
every row needs at least one real token, and real tokens must be finite. The trainer's
own frozen-feature cache is a file of this format (always with a digest), and
`python -m trainer.phase1 export` writes one from any Phase 1 source.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "phase2-tune/aligned-features"
VERSION = "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FeaturesFileError(ValueError):
    """A features file that cannot be used; the message names the file and the fix."""


@dataclass
class AlignedFeatures:
    ids: list[str]
    features: torch.Tensor  # [N, T, D]
    mask: torch.Tensor  # [N, T] bool

    def rows(self, ids: list[str], source: Path) -> AlignedFeatures:
        """The rows of `ids`, in that order; an id the file lacks is an error."""
        pos = {x: i for i, x in enumerate(self.ids)}
        missing = [x for x in ids if x not in pos]
        if missing:
            raise FeaturesFileError(
                f"{source}: no features for {len(missing)} manifest id(s), e.g. "
                f"{missing[0]!r}; write the file from the same manifest (python -m "
                f"trainer.phase1 export CONFIG OUT)")
        idx = torch.tensor([pos[x] for x in ids], dtype=torch.long)
        return AlignedFeatures(list(ids), self.features[idx], self.mask[idx])


def content_digest(ids: list[str], features: torch.Tensor, mask: torch.Tensor) -> str:
    """sha256 over the ids, the features' and the mask's dtypes, shapes and bytes."""
    h = hashlib.sha256(json.dumps(ids).encode())
    for t in (features, mask):
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        # Raw bytes without a copy to numpy (bfloat16 has no numpy dtype).
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return f"sha256:{h.hexdigest()}"


def write_features(path: Path, data: AlignedFeatures) -> None:
    """Write `data` atomically (temp file + rename), with its digest."""
    check(data, path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    features, mask = data.features.contiguous(), data.mask.to(torch.bool).contiguous()
    meta = {"format": FORMAT, "version": VERSION, "ids": json.dumps(data.ids),
            "digest": content_digest(data.ids, features, mask)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"features": features, "mask": mask}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_features_file(path: Path) -> AlignedFeatures:
    """Load and verify a features file; any defect is a FeaturesFileError naming it."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise FeaturesFileError(
                    f"{path}: not a {FORMAT} v{VERSION} file (metadata format/version); "
                    "write it as docs/own-model.md describes")
            if names != {"features", "mask"}:
                raise FeaturesFileError(f"{path}: tensors {sorted(names)}, expected "
                                        "features and mask")
            # Copies, not views of the memory map: a file cut short under a mapping
            # would kill the process with SIGBUS at the next read.
            features, mask = f.get_tensor("features").clone(), f.get_tensor("mask").clone()
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        if isinstance(e, FeaturesFileError):
            raise
        raise FeaturesFileError(f"{path}: unreadable ({' '.join(str(e).split())[:120]}); "
                                "it is truncated or damaged: write it again") from None
    try:
        ids = json.loads(meta.get("ids", ""))
    except json.JSONDecodeError:
        ids = None
    if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
        raise FeaturesFileError(f"{path}: metadata ids is not a JSON list of strings")
    want = meta.get("digest")
    if want is not None and content_digest(ids, features, mask) != want:
        raise FeaturesFileError(f"{path}: contents do not match the digest recorded when it "
                                "was written (damaged); write it again")
    data = AlignedFeatures(ids, features, mask.to(torch.bool))
    check(data, path)
    return data


def check(data: AlignedFeatures, path: Path) -> None:
    """The format's rules on shapes, dtypes, ids and values."""
    f, m = data.features, data.mask
    if f.dim() != 3 or f.dtype not in FLOAT_DTYPES:
        raise FeaturesFileError(f"{path}: features must be [N, T, D] float32/16, got "
                                f"{tuple(f.shape)} {f.dtype}")
    if tuple(m.shape) != tuple(f.shape[:2]):
        raise FeaturesFileError(f"{path}: mask {tuple(m.shape)} must be [N, T] = "
                                f"{tuple(f.shape[:2])}")
    if len(data.ids) != f.shape[0]:
        raise FeaturesFileError(f"{path}: {len(data.ids)} ids for {f.shape[0]} rows")
    if len(set(data.ids)) != len(data.ids):
        raise FeaturesFileError(f"{path}: duplicate ids; each row needs its own id")
    m = m.to(torch.bool)
    empty = (~m.any(1)).nonzero()
    if len(empty):
        raise FeaturesFileError(f"{path}: row of id {data.ids[int(empty[0])]!r} has no real "
                                "token (mask all false)")
    if not torch.isfinite(f[m]).all():
        raise FeaturesFileError(f"{path}: non-finite values in real tokens; fix the Phase 1 "
                                "that wrote them")
