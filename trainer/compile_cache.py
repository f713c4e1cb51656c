"""A compiled forward's artifacts kept on disk, so that a graph is compiled once per machine
(or shared storage), not once per process.

`torch.compiler.save_cache_artifacts()` serializes what this process's compiles put in
PyTorch's caches (Inductor's FX-graph cache, the AOTAutograd cache, autotuning results);
`torch.compiler.load_cache_artifacts()` puts them back into another process's caches, whose
next compile of the same graph then loads its kernels instead of building them. Both
caches are keyed by the graph itself, so loading artifacts of another graph is harmless
(nothing hits them); the file key here only keeps one file per set of shapes
(`artifact_key`), so a sweep does not overwrite another's.

What it does not keep: Dynamo's trace (it runs again, in seconds) and CUDA graph
recordings (made again at the first calls). The files are written atomically
(`trainer.fsutil`), so a reader never sees a half-written one, and a file that fails to
load is reported and ignored (the graph compiles as if cold).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainer.fsutil import atomic_write_bytes

SUFFIX = ".bin"


def artifact_key(parts: dict[str, Any]) -> str:
    """A file key for the artifacts of a graph fixed by `parts` (shapes, dtypes, the
    compile mode and the model's config), with the torch version and the device kind that
    change the generated code."""
    device = (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    text = json.dumps({**parts, "torch": torch.__version__, "device": device},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class CompileCache:
    """One graph's artifacts in `directory`, named by `key` (`artifact_key`)."""

    def __init__(self, directory: Path, key: str, log: Callable[[str], None] = print) -> None:
        self.path = Path(directory) / f"{key}{SUFFIX}"
        self.log = log
        self.loaded = False  # whether `load` put artifacts into this process's caches
        self.saved = False

    def load(self) -> bool:
        """Put the stored artifacts into this process's compile caches (before the first
        compile); whether there were any."""
        if not self.path.is_file():
            return False
        try:
            info = torch.compiler.load_cache_artifacts(self.path.read_bytes())
        except Exception as e:  # a file from another torch, a truncated copy: compile cold
            self.log(f"[compile cache] ignoring {self.path}: {type(e).__name__}: {e}")
            return False
        self.loaded = info is not None
        if self.loaded:
            self.log(f"[compile cache] loaded compiled artifacts from {self.path}")
        else:  # torch found the bytes corrupt (it warns why): compile cold
            self.log(f"[compile cache] ignoring {self.path}: not loadable artifacts")
        return self.loaded

    def save(self) -> bool:
        """Store every artifact this process's compiles made so far (after the graph's
        first forward and backward have compiled); whether there were any (a backend that
        makes none, e.g. aot_eager, stores nothing)."""
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None or not artifacts[0]:
            return False
        atomic_write_bytes(self.path, artifacts[0])
        self.saved = True
        self.log(f"[compile cache] saved compiled artifacts to {self.path}")
        return True
