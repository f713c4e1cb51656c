"""Frozen-feature cache: run the frozen Phase 1 once per dataset.

The Phase 1 is frozen and deterministic (eval mode, no dropout), so its output per
example never changes. Trials read these cached aligned features and never load the
encoders. The cache file is named by a hash of the *content* of everything it depends
on (the Phase 1's digest, trainer.phase1.source; the manifest's ids and prompts; every
image and audio file), so editing any input makes a new cache, and two processes
building the same cache at once each write a temp file and rename it into place
(atomic; both copies are identical).

The file is an aligned-features file (trainer.phase1.features_file) with a digest of its
contents recorded at write time and checked at every load: a truncated or altered cache
is rebuilt with a warning line, never trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from trainer.data import Example
from trainer.phase1.contract import encode_examples
from trainer.phase1.features_file import (
    AlignedFeatures,
    FeaturesFileError,
    read_features_file,
    write_features,
)
from trainer.phase1.source import Phase1Source, file_digest

CACHE_VERSION = "2"  # 2: the aligned-features format (features + mask + digest)


def cache_key(source: Phase1Source, examples: list[Example]) -> str:
    """Content hash of the Phase 1 and of every example's inputs."""
    h = hashlib.sha256(f"{CACHE_VERSION}-{source.digest()}".encode())
    for e in examples:
        h.update(json.dumps([e.id, e.prompt, e.image is not None, e.audio is not None]).encode())
        for p in (e.image, e.audio):
            if p is not None:
                file_digest(h, p)
    return h.hexdigest()[:24]


def build_features(source: Phase1Source, examples: list[Example], device: str = "cpu"
                   ) -> AlignedFeatures:
    """Run the frozen Phase 1 over `examples` (in order)."""
    module = source.build(device)
    features, mask = encode_examples(module, examples, f"phase1 ({source.name})")
    return AlignedFeatures([e.id for e in examples], features, mask)


def cached_features(cache_dir: Path, source: Phase1Source, examples: list[Example],
                    device: str = "cpu", log: Callable[[str], None] = print) -> Path:
    """Path of the verified cache file for `examples`, building (or rebuilding) it."""
    path = Path(cache_dir) / f"features-{cache_key(source, examples)}.safetensors"
    if path.is_file():
        try:
            read_features(path, examples)
            return path
        except FeaturesFileError as e:
            log(f"[feature-cache] warning: {e}; rebuilding it")
    log(f"[feature-cache] encoding {len(examples)} examples with the frozen Phase 1 "
        f"({source.name}) -> {path}")
    write_features(path, build_features(source, examples, device))
    return path


def read_features(path: Path, examples: list[Example]) -> AlignedFeatures:
    """Load a cache file, verified, and check it belongs to `examples`, in order."""
    data = read_features_file(path)
    if data.ids != [e.id for e in examples]:
        raise FeaturesFileError(f"{path}: cached example ids do not match the manifest")
    return data
