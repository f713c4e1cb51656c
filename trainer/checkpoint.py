"""Checkpoints of the trainable state only: projector + LoRA, optimizer, scheduler, RNG.

Layout: `<run_dir>/checkpoints/step_000123/` holding
  trainable.safetensors   projector + LoRA weights
  state.pt                optimizer/scheduler/scaler state and RNG states; tensors and
                          plain containers only, loaded with weights_only=True
  trainer_state.json      step and NaN bookkeeping
Each checkpoint is written into a temp directory and renamed into place, so a
crash or write error never leaves a half-written checkpoint under the final
name; loading falls back to the previous checkpoint if the newest is unreadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.checkpoint_files import META, STATE, WEIGHTS
from trainer.optim import group_of


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if group_of(n) is not None}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load projector + LoRA weights; every trainable tensor must be present."""
    expected = {n for n, _ in model.named_parameters() if group_of(n) is not None}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"trainable weights do not match the model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    # numpy arrays would need unpickling allow-lists: store them as tensors / plain values.
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer, scheduler,
                    scaler, meta: dict[str, Any], keep: int) -> Path:
    """Write `step_XXXXXX/` atomically and prune to the newest `keep`."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step:06d}-", dir=ckpt_root))
    try:
        save_file(trainable_state(model), str(tmp / WEIGHTS))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "rng": rng_state()}, tmp / STATE)
        (tmp / META).write_text(json.dumps({"step": step, **meta}))
        if final.exists():  # re-written after a resume: replace the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and (p / META).is_file())


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, state, meta) of one checkpoint; raises if any file is unreadable."""
    weights = load_file(str(path / WEIGHTS))
    # weights_only: tensors and plain containers only, never arbitrary pickled objects.
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    meta = json.loads((path / META).read_text())
    return weights, state, meta


def latest_readable(ckpt_root: Path, log=print) -> tuple[Path, tuple] | None:
    """The newest checkpoint that loads, falling back past corrupt ones."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return path, read_checkpoint(path)
        except Exception as e:
            log(f"[checkpoint] {path} unreadable ({type(e).__name__}: {e}); trying an older one")
    return None
