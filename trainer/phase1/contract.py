"""The Phase 1 contract every source implements (docs/own-model.md, "Routes").

A Phase 1 is a frozen `torch.nn.Module` with
  align_dim: int        width of the aligned feature tokens it returns
  sample_rate: int      the audio rate it wants (optional; 16000 when absent)
  forward(batch: RawBatch) -> (features [B, T, align_dim] float, mask [B, T] bool)
where `mask[i, t]` says token t of example i is real. Every example gets at least one
real token. The trainer freezes the module (no grads, eval mode), asserts it, runs it
once per dataset into the frozen-feature cache, and never during training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from trainer.bundle import freeze
from trainer.data import Example, media_problem
from trainer.errors import ConfigError, Problem
from trainer.media import MediaError, read_audio, read_image
from trainer.progress_bar import progress as progress_bar

DEFAULT_SAMPLE_RATE = 16000
ENCODE_BATCH = 32  # examples per Phase 1 forward while building the cache


@dataclass
class RawBatch:
    """Raw media of a batch, as read by trainer.media (None: the example lacks it)."""

    ids: list[str]
    images: list[Image.Image | None]  # RGB, any size
    audio: list[np.ndarray | None]  # mono float32 in [-1, 1] at the module's sample_rate
    texts: list[str]  # the prompts


def module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def sample_rate_of(module: nn.Module) -> int:
    return int(getattr(module, "sample_rate", DEFAULT_SAMPLE_RATE))


def checked(module: object, where: str) -> nn.Module:
    """Freeze a Phase 1 and check its declared contract; a violation is one line."""
    if not isinstance(module, nn.Module):
        raise ConfigError([Problem(where, "", f"returned {type(module).__name__}, not a "
                                   "torch.nn.Module", "return the Phase 1 module")])
    align = getattr(module, "align_dim", None)
    if not isinstance(align, int) or align < 1:
        raise ConfigError([Problem(where, "align_dim", f"is {align!r}",
                                   "give the module an int attribute align_dim")])
    return freeze(module)


def read_batch(examples: list[Example], sample_rate: int) -> RawBatch:
    """Read a batch's media; every unreadable file is one problem naming its line."""
    problems, images, audio = [], [], []
    for e in examples:
        try:
            images.append(None if e.image is None else read_image(e.image))
        except MediaError as err:
            problems.append(media_problem(e, "image", err))
        try:
            audio.append(None if e.audio is None else read_audio(e.audio, sample_rate))
        except MediaError as err:
            problems.append(media_problem(e, "audio", err))
    if problems:
        raise ConfigError(problems)
    return RawBatch([e.id for e in examples], images, audio, [e.prompt for e in examples])


@torch.no_grad()
def encode_examples(module: nn.Module, examples: list[Example], where: str,
                    progress: Callable[[int], None] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, T, D] (fp32, rows right-padded to the longest) and mask [N, T]."""
    rate = sample_rate_of(module)
    feats, masks = [], []
    starts = range(0, len(examples), ENCODE_BATCH)
    for i in progress_bar(starts, total=len(starts), desc="[phase1] encoding features",
                          unit="batch"):
        chunk = examples[i : i + ENCODE_BATCH]
        out = module(read_batch(chunk, rate))
        f, m = _check_output(out, len(chunk), module.align_dim, where)
        feats.append(f.float().cpu())
        masks.append(m.cpu())
        if progress is not None:
            progress(len(chunk))
    length = max(f.shape[1] for f in feats)
    features = torch.cat([nn.functional.pad(f, (0, 0, 0, length - f.shape[1])) for f in feats])
    mask = torch.cat([nn.functional.pad(m, (0, length - m.shape[1])) for m in masks])
    empty = (~mask.any(1)).nonzero()
    if len(empty):
        e = examples[int(empty[0])]
        raise ConfigError([Problem(e.where or e.id, "", "the Phase 1 gave this example no "
                                   "real token", "give it an image or audio the Phase 1 reads")])
    return features, mask


def _check_output(out: object, n: int, align_dim: int,
                  where: str) -> tuple[torch.Tensor, torch.Tensor]:
    fix = "forward must return (features [B, T, align_dim], mask [B, T] bool)"
    if not (isinstance(out, tuple | list) and len(out) == 2
            and all(isinstance(t, torch.Tensor) for t in out)):
        raise ConfigError([Problem(where, "forward", f"returned {type(out).__name__}", fix)])
    f, m = out
    if f.dim() != 3 or f.shape[0] != n or f.shape[2] != align_dim or not f.is_floating_point():
        raise ConfigError([Problem(where, "forward", f"features {tuple(f.shape)} {f.dtype} "
                                   f"for {n} examples, align_dim {align_dim}", fix)])
    if tuple(m.shape) != tuple(f.shape[:2]):
        raise ConfigError([Problem(where, "forward", f"mask {tuple(m.shape)} for features "
                                   f"{tuple(f.shape)}", fix)])
    m = m.to(torch.bool)
    if not torch.isfinite(f[m]).all():
        raise ConfigError([Problem(where, "forward", "non-finite features at real tokens",
                                   "check the Phase 1's weights and inputs")])
    return f, m
