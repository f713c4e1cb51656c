"""Optimizer groups and the LR schedule, without a training loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.optim import build_optimizer, build_scheduler, lr_factor, param_groups


class _Toy(nn.Module):
    """Names like the real model: projector.*, *.lora_A/B.*, frozen base weights."""

    def __init__(self) -> None:
        super().__init__()
        self.projector = nn.Linear(4, 8)
        self.base = nn.Linear(8, 8)
        self.base.lora_A = nn.Linear(8, 2, bias=False)
        self.base.lora_B = nn.Linear(2, 8, bias=False)
        self.base.weight.requires_grad_(False)
        self.base.bias.requires_grad_(False)


def test_groups_partition_trainable_params_exactly():
    groups, counts = param_groups(_Toy())
    assert counts.projector == 4 * 8 + 8
    assert counts.lora == 8 * 2 + 2 * 8
    assert counts.frozen == 8 * 8 + 8
    assert [p.shape for p in groups["lora"]] == [torch.Size([2, 8]), torch.Size([8, 2])]
    assert "projector: 40 params @ lr 0.0005" in counts.describe(5e-4, 5e-5)


def test_trainable_param_outside_groups_is_an_error():
    m = _Toy()
    m.base.weight.requires_grad_(True)
    with pytest.raises(AssertionError, match="outside every group"):
        param_groups(m)


def test_frozen_param_inside_a_group_is_an_error():
    m = _Toy()
    m.projector.bias.requires_grad_(False)
    with pytest.raises(AssertionError, match=r"projector\.bias is in group projector but frozen"):
        param_groups(m)


def test_optimizer_has_two_named_groups_with_their_lrs():
    groups, _ = param_groups(_Toy())
    opt = build_optimizer(groups, 5e-4, 5e-5, 0.0, (0.9, 0.999), 1e-8)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("projector", 5e-4),
                                                                ("lora", 5e-5)]


def test_lr_factor_formula():
    assert lr_factor(0, 10, 100) == 0.0
    assert lr_factor(5, 10, 100) == 0.5
    assert lr_factor(10, 10, 100) == 1.0
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("warmup", "total"), [(10, 50), (0, 7), (6, 7), (3, 4)])
def test_scheduler_matches_formula_at_every_step(warmup, total):
    groups, _ = param_groups(_Toy())
    opt = build_optimizer(groups, 5e-4, 5e-5, 0.0, (0.9, 0.999), 1e-8)
    sched = build_scheduler(opt, warmup, total)
    for step in range(total):
        f = lr_factor(step, warmup, total)
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[0] == pytest.approx(5e-4 * f, rel=1e-9, abs=1e-15)
        assert lrs[1] == pytest.approx(5e-5 * f, rel=1e-9, abs=1e-15)
        assert math.isclose(lrs[0] / 10, lrs[1], rel_tol=1e-9, abs_tol=1e-15)  # ratio kept
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0, 0.0], abs=1e-15)
