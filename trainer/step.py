"""The optimizer step: norms, NaN guard, clipping, AdamW and the LR schedule.

One implementation, called by solo runs and trial-group members alike
(`optimizer_step`), with the NaN guard on the host or on the device:

  * host guard (`guard=None`; the CPU default, and fp16): the loss and the gradient
    norms are read back before deciding (one device sync per step); a non-finite step
    is skipped, clipping scales by `clip / (norm + 1e-6)` where the global norm is over
    the limit, and the step is read back at once.
  * device guard (a `DeviceGuard`): every decision is taken on the device. A non-finite
    loss or gradient norm makes the fused AdamW kernel skip the update (`found_inf`, the
    flag torch's GradScaler hands a fused optimizer): weights, moments and step counts
    stay as they were; clipping multiplies the gradients by `clip / (norm + 1e-6)` where
    the global norm is over the limit and by exactly 1.0 elsewhere (so unclipped steps
    are untouched); the stop policy (`nan_policy: stop`, `max_consecutive_nan`,
    `divergence_factor`) sets a sticky halt flag, after which every update is skipped.
    Each step's values (loss, norms, clip flag, stop reason) stay on the device until the
    loop reads a window of steps back in one transfer (`read_back`, `output.sync_every`).
    The loop then replays the window through the same bookkeeping as the host guard
    (`apply_policy`): the run ends at the step whose record carries a stop reason, the
    window's later records are dropped (their updates were skipped on the device) and
    the LR schedule is rewound to that step (`rewind_schedule`), so a stopped run ends in
    the same state as with the host guard. It needs a fused AdamW (CUDA, or the CPU's
    fused kernel) and no fp16 loss scaler (GradScaler keeps its own host-side
    bookkeeping).

Both return a `PendingStep`; `resolve_steps` turns read-back steps into the metrics
records (the same keys for both guards) and NaN events. A trial group whose members'
LoRA gradients are one stacked tensor measures and clips all members at once
(`measure` with the norms it took, `clip_grads`) and hands each member's `Measured` to
`optimizer_step`, which then goes straight to the update.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.config import Phase2
from trainer.fused_adamw import ListedAdamW
from trainer.metrics import NanEvent
from trainer.optim import GROUPS, guarded_step

# Device stop codes -> the end reasons of the host guard (4: halted at an earlier step).
STOP_REASONS = {1: "nan_stop", 2: "nan_abort", 3: "diverged"}


@dataclass
class StepParts:
    """What one run's optimizer step acts on: its parameters by optimizer group, its AdamW,
    LR schedule, fp16 loss scaler and gradient clip."""

    groups: dict[str, list[torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    scaler: torch.amp.GradScaler | None = None  # fp16 only (then always the host guard)
    clip: float | None = None  # max global gradient norm (None: no clipping)
    listed: ListedAdamW | None = None  # the AdamW step over lists (`listed_step`'s cache)

    def grads(self, groups: tuple[str, ...] = GROUPS) -> list[torch.Tensor]:
        return [p.grad for g in groups for p in self.groups[g] if p.grad is not None]


@dataclass
class State:
    """A run's progress, saved in every checkpoint: the last step done and the host guard's
    NaN / divergence bookkeeping (`apply_policy`)."""

    step: int = 0
    nan_events: list[NanEvent] = field(default_factory=list)
    consecutive_bad: int = 0
    first_loss: float | None = None
    loss_ema: float | None = None
    last_loss: float | None = None
    eval_loss: float | None = None

    def meta(self) -> dict[str, Any]:
        return {"nan_events": [vars(e) for e in self.nan_events],
                "consecutive_bad": self.consecutive_bad, "first_loss": self.first_loss,
                "loss_ema": self.loss_ema, "last_loss": self.last_loss,
                "eval_loss": self.eval_loss}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> State:
        return cls(step=meta["step"], nan_events=[NanEvent(**e) for e in meta["nan_events"]],
                   consecutive_bad=meta["consecutive_bad"], first_loss=meta["first_loss"],
                   loss_ema=meta["loss_ema"], last_loss=meta["last_loss"],
                   eval_loss=meta["eval_loss"])


def apply_policy(p2: Phase2, state: State, event: NanEvent | None, loss: float,
                 diverged: bool | None = None) -> str | None:
    """Update NaN/divergence bookkeeping; return an end reason if the run must stop.

    `diverged`: the device guard's verdict (it smooths the loss in fp32; the host's
    float64 EMA could fall on the other side of the threshold); None decides here.
    """
    if event is not None:
        state.nan_events.append(event)
        state.consecutive_bad += 1
        if p2.nan_policy == "stop" and not event.fp16_overflow:
            event.action = "stopped"
            return "nan_stop"
        if state.consecutive_bad >= p2.max_consecutive_nan:
            event.action = "aborted"
            return "nan_abort"
        return None
    state.consecutive_bad = 0
    state.last_loss = loss
    if state.first_loss is None:
        state.first_loss = loss
    state.loss_ema = loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * loss
    if diverged is None:
        diverged = bool(p2.divergence_factor) and (
            state.loss_ema > p2.divergence_factor * state.first_loss)
    if diverged:
        return "diverged"
    return None


def group_norm(parts: StepParts, group: str) -> torch.Tensor:
    """L2 norm of one optimizer group's gradients, as a device scalar (no sync)."""
    grads = parts.grads((group,))
    if not grads:
        return torch.zeros((), device=parts.device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)


def nan_event(step: int, loss_v: float, group_v: list[float], fp16: bool) -> NanEvent | None:
    """The event of a step with a non-finite loss or group gradient norm (None if clean)."""
    bad_groups = [g for g, v in zip(GROUPS, group_v, strict=True) if not math.isfinite(v)]
    if math.isfinite(loss_v) and not bad_groups:
        return None
    overflow = fp16 and math.isfinite(loss_v)
    return NanEvent(step, "grad" if math.isfinite(loss_v) else "loss", bad_groups, "skipped",
                    fp16_overflow=overflow)


def advance_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    # Skipped steps still advance the schedule: the LR stays a pure function of the step.
    with warnings.catch_warnings():  # torch warns when a skipped first step precedes this
        warnings.filterwarnings("ignore",
                                message=re.escape("Detected call of `lr_scheduler.step()`"))
        scheduler.step()


def rewind_schedule(parts: StepParts, step: int) -> None:
    """Put the LambdaLR schedule back at `step` scheduler steps (after a device halt)."""
    sched = parts.scheduler
    sched.last_epoch = step
    lrs = [base * lam(step) for base, lam in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
    for group, lr in zip(parts.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs


@dataclass
class DeviceGuard:
    """The host guard's stop bookkeeping (`apply_policy`) as device scalars."""

    policy: Phase2  # nan_policy, max_consecutive_nan, divergence_factor
    halt: torch.Tensor  # bool: a stop reason was hit; every later update is skipped
    consecutive: torch.Tensor  # non-finite steps in a row
    first: torch.Tensor  # first finite loss (divergence reference)
    has_first: torch.Tensor  # bool
    ema: torch.Tensor  # smoothed finite loss

    @classmethod
    def start(cls, policy: Phase2, state: State, device: torch.device) -> DeviceGuard:
        """From a (possibly resumed) host State."""
        def t(v: Any) -> torch.Tensor:
            return torch.tensor(v, device=device)

        return cls(policy, halt=t(False), consecutive=t(float(state.consecutive_bad)),
                   first=t(float(state.first_loss or 0.0)),
                   has_first=t(state.first_loss is not None),
                   ema=t(float(state.loss_ema or 0.0)))

    def update(self, finite: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Account one step; its stop code (0: go on, see STOP_REASONS, 4: halted before).

        Written in as few operators as it takes: on a GPU each is a launch from the host,
        once per step and trial-group member (bench/guard_ops.py counts them).
        """
        p2 = self.policy
        bad = ~finite
        self.consecutive = (self.consecutive + 1) * bad  # 0 after a finite step
        if p2.nan_policy == "stop":
            code = bad.float()  # 1: nan_stop
        else:  # only a bad step can reach the limit (a finite one resets the count)
            code = (self.consecutive >= p2.max_consecutive_nan) * 2.0  # 2: nan_abort
        if p2.divergence_factor:  # the first finite loss and an EMA of the finite ones
            self.first = torch.where(self.has_first | bad, self.first, loss)
            # The unselected branch may hold NaN (a bad step's loss); where() never mixes
            # it in.
            ema = torch.where(self.has_first, torch.lerp(self.ema, loss, 0.1), loss)
            self.ema = torch.where(finite, ema, self.ema)
            self.has_first = self.has_first | finite
            code = torch.where(finite & (self.ema > p2.divergence_factor * self.first), 3.0,
                               code)
        code = torch.where(self.halt, 4.0, code)
        self.halt = self.halt | (code > 0)
        return code


@dataclass
class PendingStep:
    """One optimizer step whose values may still be on the device (device guard) or are
    read back already (host guard: `row` is set)."""

    step: int
    values: torch.Tensor | None  # [loss, global norm, projector norm, lora norm, clipped, stop]
    lrs: dict[str, float]  # the LRs the step was taken with
    row: list[float] | None = None  # `values` on the host
    fp16: bool = False  # a NaN gradient is an fp16 overflow when the loss is finite
    samples: int = 0  # rows and tokens the step trained on (the caller's counts)
    tokens: int = 0


@dataclass
class Measured:
    """What the device guard decides one step on: its values, and the clip they imply."""

    vals: torch.Tensor  # [loss, projector norm, lora norm]
    finite: torch.Tensor  # bool: loss and every norm finite
    total: torch.Tensor  # global gradient norm
    factor: torch.Tensor | None  # the gradients' clip factor (None: no clipping configured)
    clipped: torch.Tensor  # bool: clipped, on a finite step


def measure(clip: float | None, loss: torch.Tensor, norms: list[torch.Tensor]) -> Measured:
    """The loss and the group norms (in GROUPS order), the global norm and the clip factor,
    all on the device."""
    vals = torch.stack([loss.detach().float(), *norms])
    finite = torch.isfinite(vals).all()
    total = torch.linalg.vector_norm(vals[1:], 2.0)
    if clip is None:
        return Measured(vals, finite, total, None, torch.zeros_like(finite))
    over = total > clip
    return Measured(vals, finite, total, torch.where(over, clip / (total + 1e-6), 1.0),
                    over & finite)


def clip_grads(grads: list[torch.Tensor], factor: torch.Tensor | float | None) -> None:
    """Multiply `grads` by the clip factor in place (no-op without one)."""
    if factor is not None and grads:
        torch._foreach_mul_(grads, factor)


def optimizer_step(parts: StepParts, step: int, loss: torch.Tensor,
                   guard: DeviceGuard | None = None, measured: Measured | None = None
                   ) -> PendingStep:
    """One optimizer step of a run whose gradients are in place: the host guard when
    `guard` is None, else the device guard (nothing read back). `measured`: the step's
    norms and clip factor, taken by a caller that clipped already (a stacked trial
    group, for all its members at once; device guard only). `loss`: the step's mean
    micro-batch loss."""
    if guard is None:
        assert measured is None, "a measured step takes the device guard"
        return _host_step(parts, step, loss)
    if measured is None:
        measured = measure(parts.clip, loss, [group_norm(parts, g) for g in GROUPS])
        clip_grads(parts.grads(), measured.factor)  # exactly 1.0 where the norm is in bounds
    found_inf = (measured.finite <= guard.halt).float()
    listed = listed_step(parts)
    if listed is None or not listed.step(found_inf):
        guarded_step(parts.optimizer, found_inf)
    lrs = _lrs(parts)
    advance_schedule(parts.scheduler)
    code = guard.update(measured.finite, measured.vals[0])
    values = torch.cat([measured.vals[:1], measured.total.view(1), measured.vals[1:],
                        measured.clipped.view(1), code.view(1)])
    return PendingStep(step, values, lrs)


def _host_step(parts: StepParts, step: int, loss: torch.Tensor) -> PendingStep:
    """The host guard: reads the loss and norms back before deciding (one sync)."""
    if parts.scaler is not None:
        parts.scaler.unscale_(parts.optimizer)
    norms = [group_norm(parts, g) for g in GROUPS]
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    loss_v, total_v, *group_v = torch.stack([loss.float(), total, *norms]).tolist()
    lrs = _lrs(parts)
    fp16 = parts.scaler is not None
    clipped = False
    if nan_event(step, loss_v, group_v, fp16) is not None:
        if parts.scaler is not None:
            parts.scaler.update()  # lowers the loss scale after an overflow
    else:
        if parts.clip is not None and total_v > parts.clip:
            clipped = True
            clip_grads(parts.grads(), parts.clip / (total_v + 1e-6))
        if parts.scaler is not None:
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
        else:
            parts.optimizer.step()
    advance_schedule(parts.scheduler)
    return PendingStep(step, None, lrs, row=[loss_v, total_v, *group_v, float(clipped), 0.0],
                       fp16=fp16)


def _lrs(parts: StepParts) -> dict[str, float]:
    return {pg["name"]: pg["lr"] for pg in parts.optimizer.param_groups}


def listed_step(parts: StepParts) -> ListedAdamW | None:
    """The run's AdamW step over lists gathered once (`trainer.fused_adamw`): made once the
    optimizer has state, remade after a resume replaced it; None while it has none yet or
    takes another kind of step. A solo run's and each trial-group member's (a member's
    parameters stay the same objects while its LoRA weights are stacked: only their
    storage moves). At the seed's batch a CUDA-graph step is bound by the host, and
    `optimizer.step()`'s per-parameter Python is a large part of it (bench/adamw_step.py)."""
    listed = parts.listed
    if listed is None or not listed.fresh():
        listed = parts.listed = (ListedAdamW(parts.optimizer)
                                 if ListedAdamW.supports(parts.optimizer) else None)
    return listed


def read_back(pending: list[PendingStep]) -> list[list[float]]:
    """Every pending step's values on the host, the device-guarded ones in one
    device-to-host transfer (the window's sync)."""
    on_device = [p.values for p in pending if p.row is None]
    fetched = iter(torch.stack(on_device).tolist() if on_device else [])
    return [p.row if p.row is not None else next(fetched) for p in pending]


def step_record(epoch: int, step: int, loss_v: float, total_v: float,
                group_v: list[float], lrs: dict[str, float], clipped: bool,
                event: NanEvent | None) -> dict[str, Any]:
    """The metrics record of one optimizer step (both guards write the same keys)."""
    return {
        "step": step, "epoch": epoch, "loss": loss_v,
        "grad_norm": total_v, "grad_norm/projector": group_v[0], "grad_norm/lora": group_v[1],
        "lr/projector": lrs["projector"], "lr/lora": lrs["lora"], "clipped": int(clipped),
        "skipped": int(event is not None),
    }


def resolve_steps(steps_per_epoch: int, pending: list[PendingStep], rows: list[list[float]]
                  ) -> list[tuple[dict[str, Any], NanEvent | None, str | None]]:
    """Host records of read-back steps: (record, NaN event, device stop reason). The
    record carries the step's counts as `_samples` / `_tokens` for the caller's rates."""
    out = []
    for p, (loss_v, total_v, g0, g1, clipped, code) in zip(pending, rows, strict=True):
        event = nan_event(p.step, loss_v, [g0, g1], fp16=p.fp16)
        record = step_record((p.step - 1) // steps_per_epoch, p.step, loss_v, total_v,
                             [g0, g1], p.lrs, bool(clipped), event)
        record["_samples"], record["_tokens"] = p.samples, p.tokens
        out.append((record, event, STOP_REASONS.get(int(code))))
    return out
