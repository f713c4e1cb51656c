"""Optimizer groups and the LR schedule.

Exactly two AdamW groups, `projector` and `lora`, each with its own LR; every
trainable parameter is in exactly one group and no frozen one in any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

GROUPS = ("projector", "lora")


@dataclass(frozen=True)
class GroupCounts:
    projector: int
    lora: int
    frozen: int

    @property
    def trainable(self) -> int:
        return self.projector + self.lora

    def describe(self, projector_lr: float, lora_lr: float) -> str:
        total = self.trainable + self.frozen
        return (f"[optim] projector: {self.projector:,} params @ lr {projector_lr:.3g} | "
                f"lora: {self.lora:,} params @ lr {lora_lr:.3g} | frozen: {self.frozen:,} | "
                f"trainable {100 * self.trainable / max(total, 1):.2f}% of {total:,}")


def group_of(name: str) -> str | None:
    """The optimizer group a parameter belongs to, by name."""
    if name.startswith("projector."):
        return "projector"
    if "lora_" in name:
        return "lora"
    return None


def param_groups(model: nn.Module) -> tuple[dict[str, list[nn.Parameter]], GroupCounts]:
    """Split parameters into the named groups and assert the partition is exact."""
    groups: dict[str, list[nn.Parameter]] = {g: [] for g in GROUPS}
    frozen = 0
    stray = []
    for name, p in model.named_parameters():
        g = group_of(name)
        if g is None:
            if p.requires_grad:
                stray.append(name)
            frozen += p.numel()
        elif not p.requires_grad:
            raise AssertionError(f"{name} is in group {g} but frozen")
        else:
            groups[g].append(p)
    if stray:
        raise AssertionError(f"trainable parameters outside every group: {stray[:5]}")
    for g, ps in groups.items():
        if not ps:
            raise AssertionError(f"optimizer group {g!r} is empty")
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    counts = GroupCounts(*(sum(p.numel() for p in groups[g]) for g in GROUPS), frozen)
    return groups, counts


def build_optimizer(groups: dict[str, list[nn.Parameter]], projector_lr: float, lora_lr: float,
                    weight_decay: float, betas: tuple[float, float], eps: float,
                    fused: bool = False) -> torch.optim.AdamW:
    lrs = {"projector": projector_lr, "lora": lora_lr}
    # weight_decay as the optimizer default, so both groups get it, like the seed's
    # torch.optim.AdamW(param_groups) with torch's 0.01.
    return torch.optim.AdamW(
        [{"params": groups[g], "lr": lrs[g], "name": g} for g in GROUPS],
        weight_decay=weight_decay, betas=betas, eps=eps, fused=fused or None,
    )


def guarded_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """`optimizer.step()` of a fused AdamW, skipped on the device where `found_inf` is 1.0:
    weights, moments and step counts stay as they were (no host sync)."""
    # The attribute GradScaler sets for fused optimizers: 1.0 makes the kernel a no-op.
    optimizer.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak LR after `step` optimizer steps: linear warmup, cosine to 0.

    Same formula as transformers' get_cosine_schedule_with_warmup (num_cycles=0.5),
    written out so it is testable without a model.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
