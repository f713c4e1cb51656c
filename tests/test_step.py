"""trainer.step without a model: the host and the device guard take the same decisions, and
the one optimizer step updates (or skips) exactly as each guard promises."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import Phase2
from trainer.metrics import NanEvent
from trainer.optim import build_optimizer, build_scheduler
from trainer.plan import Plan, plan_steps
from trainer.step import (
    STOP_REASONS,
    DeviceGuard,
    State,
    StepParts,
    apply_policy,
    optimizer_step,
    read_back,
    resolve_steps,
    rewind_schedule,
)

NAN = float("nan")


def test_divergence_rule_on_a_synthetic_loss_history():
    p2 = Phase2(divergence_factor=2.0)
    state = State()
    reasons = [apply_policy(p2, state, None, loss) for loss in [4.0, 3.0, 2.5, 9.0, 30.0, 60.0]]
    # EMA(0.9) of the loss crosses 2 x the first loss (8.0) only at the sustained blow-up
    assert reasons == [None, None, None, None, None, "diverged"]
    assert apply_policy(Phase2(), State(), None, 1e9) is None  # off by default


@pytest.mark.parametrize(("policy", "losses"), [
    (dict(nan_policy="stop"), [3.0, 2.0, NAN, 1.0]),
    (dict(max_consecutive_nan=2), [3.0, NAN, 2.0, NAN, NAN, 1.0]),
    (dict(divergence_factor=2.0), [4.0, NAN, 3.0, 9.0, 30.0, 60.0, 80.0]),
    (dict(max_consecutive_nan=3, divergence_factor=1.5), [2.0, 2.1, NAN, 4.0, 6.0, 8.0, 9.0]),
])
def test_the_device_guard_stops_where_the_host_policy_does(policy, losses):
    """The device guard's stop codes, step by step, are the host policy's end reasons; after
    its stop every later step reads 'halted before' (4)."""
    p2 = Phase2(**policy)
    state = State()
    guard = DeviceGuard.start(p2, state, torch.device("cpu"))
    host, device = [], []
    stopped = False
    for loss in losses:
        finite = math.isfinite(loss)
        event = None
        if not finite:
            event = NanEvent(len(host) + 1, "loss", [], "skipped")
        code = int(guard.update(torch.tensor(finite), torch.tensor(loss)))
        device.append(code)
        if not stopped:
            reason = apply_policy(p2, state, event, loss)
            host.append(reason)
            stopped = reason is not None
        else:
            host.append("halted")
    expected = [4 if r == "halted" else {v: k for k, v in STOP_REASONS.items()}.get(r, 0)
                for r in host]
    assert device == expected, (device, host)
    assert any(r not in (None, "halted") for r in host)  # every case stops somewhere


def _parts(clip: float | None) -> StepParts:
    torch.manual_seed(0)
    groups = {"projector": [torch.nn.Parameter(torch.randn(4, 3))],
              "lora": [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 2))]}
    opt = build_optimizer(groups, 1e-2, 5e-3, 0.01, (0.9, 0.999), 1e-8, fused=True)
    return StepParts(groups, opt, build_scheduler(opt, 1, 10), torch.device("cpu"), clip=clip)


def _grads(parts: StepParts, scale: float, bad: str | None = None) -> None:
    g = torch.Generator().manual_seed(1)
    for name, params in parts.groups.items():
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * scale
            if name == bad:
                p.grad.view(-1)[0] = NAN


@pytest.mark.parametrize("clip", [None, 1.0])
def test_host_and_device_guard_take_the_same_steps(clip):
    """Clean, clipped and non-finite steps: the same records, weights, moments and LRs with
    the decision on the host or on the device (the device guard's AdamW skips the NaN
    step's update on the device; the schedule advances either way)."""
    runs = {}
    p2 = Phase2()
    for on_device in (False, True):
        parts = _parts(clip)
        guard = DeviceGuard.start(p2, State(), parts.device) if on_device else None
        pending = []
        for step, (scale, bad) in enumerate([(1.0, None), (0.1, None), (1.0, "lora"),
                                             (3.0, None)], start=1):
            _grads(parts, scale, bad)
            pending.append(optimizer_step(parts, step, torch.tensor(2.0 / step), guard))
        rows = read_back(pending)
        records = resolve_steps(2, pending, rows)
        weights = [p.detach().clone() for ps in parts.groups.values() for p in ps]
        runs[on_device] = records, weights, parts.scheduler.get_last_lr()
    (host, w_host, lr_host), (dev, w_dev, lr_dev) = runs[False], runs[True]
    for (rh, eh, _), (rd, ed, stop) in zip(host, dev, strict=True):
        assert stop is None
        assert rh.keys() == rd.keys()
        for key in rh:
            a, b = rh[key], rd[key]
            assert (a == pytest.approx(b, rel=1e-6)) or (math.isnan(a) and math.isnan(b)), key
        assert (eh is None) == (ed is None)
    assert [r["skipped"] for r, _, _ in host] == [0, 0, 1, 0]
    assert host[2][1].groups == ["lora"]
    assert [r["clipped"] for r, _, _ in host] == ([1, 0, 0, 1] if clip else [0, 0, 0, 0])
    assert [r["epoch"] for r, _, _ in host] == [0, 0, 1, 1]
    for a, b in zip(w_host, w_dev, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert lr_host == lr_dev


def test_a_skipped_step_leaves_weights_alone_and_a_rewind_restores_the_lr():
    parts = _parts(None)
    before = [p.detach().clone() for ps in parts.groups.values() for p in ps]
    guard = DeviceGuard.start(Phase2(nan_policy="stop"), State(), parts.device)
    _grads(parts, 1.0, bad="projector")
    lr0 = [g["lr"] for g in parts.optimizer.param_groups]
    pending = optimizer_step(parts, 1, torch.tensor(1.0), guard)
    (record, event, stop), = resolve_steps(10, [pending], read_back([pending]))
    assert (record["skipped"], event.groups, stop) == (1, ["projector"], "nan_stop")
    after = [p.detach() for ps in parts.groups.values() for p in ps]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert [g["lr"] for g in parts.optimizer.param_groups] != lr0  # the schedule advanced
    rewind_schedule(parts, 0)
    assert [g["lr"] for g in parts.optimizer.param_groups] == lr0


def test_read_back_keeps_host_rows_and_device_values_in_order():
    parts = _parts(None)
    guard = DeviceGuard.start(Phase2(), State(), parts.device)
    steps = []
    for i, g in enumerate([None, guard, None, guard], start=1):
        _grads(parts, 1.0)
        steps.append(optimizer_step(parts, i, torch.tensor(float(i)), g))
    assert [s.row is not None for s in steps] == [True, False, True, False]
    assert [row[0] for row in read_back(steps)] == [1.0, 2.0, 3.0, 4.0]


def test_plan_arithmetic():
    plan = plan_steps(Phase2(batch_size=2, gradient_accumulation_steps=3, epochs=2,
                             warmup_steps=1), n_train=13)
    assert plan == Plan(2, 3, 2, 4, 1)  # 13 // 6 = 2 steps an epoch, the last row dropped
    assert [plan.epoch_of(s) for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert plan.micro_batch_rows(3, 2) == (1, slice(10, 12))
