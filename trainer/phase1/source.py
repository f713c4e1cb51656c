"""A configured Phase 1: what its cache key is made of, and how to build it.

`Phase1Source` is resolved from the config's `phase1:` section (and, for the demo
bundle, the directory the demo assets put it in). Its `digest` covers the content of
everything the features depend on, so the frozen-feature cache is keyed by content:
  bundle   the bundle's config and weights files
  hf       every file of every encoder dir, the token rules, the aligner file
  factory  the dotted path, its kwargs and the built module's weights and buffers
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.config import Phase1 as Phase1Config
from trainer.errors import ConfigError, Problem
from trainer.phase1.contract import checked

CODE_VERSION = "3"  # bump when the Phase 1 code changes the features it writes (3: AST's rule)


def file_digest(h: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _dir_digest(h: hashlib._Hash, directory: Path) -> None:
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(str(p.relative_to(directory)).encode())
            file_digest(h, p)


def _module_digest(h: hashlib._Hash, module: nn.Module) -> None:
    for name, t in sorted({**dict(module.named_parameters()),
                           **dict(module.named_buffers())}.items()):
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def import_factory(dotted: str):
    """The callable `pkg.module:function`, or one line saying what is missing."""
    mod_name, _, fn_name = dotted.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError([Problem("phase1.factory", dotted, f"cannot import {mod_name} ({e})",
                                   "make the package importable (pip install -e, or "
                                   "PYTHONPATH)")]) from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError([Problem("phase1.factory", dotted, f"{mod_name} has no callable "
                                   f"{fn_name}", "name a function that returns the module")])
    return fn


@dataclass
class Phase1Source:
    """The `phase1:` section with the demo bundle's directory resolved."""

    cfg: Phase1Config
    bundle_dir: Path | None  # source bundle: the directory (the demo's when bundle_path null)
    _factory_module: nn.Module | None = None

    @property
    def name(self) -> str:
        return self.cfg.source

    def digest(self) -> str:
        c = self.cfg
        h = hashlib.sha256(f"phase1-{CODE_VERSION}-{c.source}".encode())
        if c.source == "bundle":
            from trainer.bundle import CONFIG_FILE, WEIGHTS_FILE

            file_digest(h, self.bundle_dir / CONFIG_FILE)
            file_digest(h, self.bundle_dir / WEIGHTS_FILE)
        elif c.source == "hf":
            for name in ("image", "audio", "text"):
                enc = getattr(c, name)
                if enc is not None:
                    h.update(json.dumps([name, enc.model_dump(mode="json", exclude={"path"})])
                             .encode())
                    _dir_digest(h, enc.path)
            file_digest(h, c.aligner_path)
        elif c.source == "factory":
            h.update(json.dumps([c.factory, c.kwargs], sort_keys=True, default=str).encode())
            _module_digest(h, self.build())
        else:
            raise ValueError("a features file is its own cache")
        return h.hexdigest()

    def build(self, device: str | torch.device = "cpu") -> nn.Module:
        """The frozen Phase 1 module (contract: trainer.phase1.contract)."""
        c = self.cfg
        if c.source == "bundle":
            from trainer.phase1.demo import BundlePhase1

            module, where = BundlePhase1(self.bundle_dir), str(self.bundle_dir)
        elif c.source == "hf":
            from trainer.phase1.hf import HFPhase1

            module, where = HFPhase1(c), "phase1 (hf)"
        elif c.source == "factory":
            if self._factory_module is None:
                fn = import_factory(c.factory)
                try:
                    built = fn(**c.kwargs)
                except TypeError as e:
                    raise ConfigError([Problem("phase1.kwargs", c.factory, str(e),
                                               "pass the arguments the factory takes")]) from None
                self._factory_module = checked(built, f"phase1.factory {c.factory}")
            module, where = self._factory_module, f"phase1.factory {c.factory}"
        else:
            raise ValueError("a features file has no module to build")
        return checked(module, where).to(device)
