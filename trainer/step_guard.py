"""The optimizer step's NaN guard without a host sync: decide on the device, read back later.

A host-side guard reads the loss and the gradient norms before `optimizer.step()`: one
device sync per step, during which the GPU idles while Python prepares the next step
(with a CUDA-graph forward that idle time is a large part of the step). Here every
decision of the guard is taken on the device:

  * a non-finite loss or gradient norm makes the fused AdamW kernel skip the update
    (`found_inf`, the flag torch's GradScaler hands a fused optimizer): weights, moments
    and step counts stay as they were;
  * clipping multiplies the gradients by `clip / (norm + 1e-6)` where the global norm is
    over the limit and by exactly 1.0 elsewhere (so unclipped steps are untouched);
  * the stop policy (`nan_policy: stop`, `max_consecutive_nan`, `divergence_factor`) sets
    a sticky halt flag, after which every update is skipped;

and each step's values (loss, norms, clip flag, stop reason) stay on the device until the
loop reads a window of steps back in one transfer (`output.sync_every`). The loop then
replays the window through the same bookkeeping as the host guard (`trainer.loop`): the
run ends at the step whose record carries a stop reason, the window's later records are
dropped (their updates were skipped on the device) and the LR schedule is rewound to that
step, so a stopped run ends in the same state as with the host guard.

Needs a fused AdamW (CUDA, or the CPU's fused kernel) and no fp16 loss scaler (GradScaler
keeps its own host-side bookkeeping); `trainer.loop` falls back to the host guard then.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from trainer.fused_adamw import ListedAdamW
from trainer.metrics import NanEvent
from trainer.optim import GROUPS, guarded_step

if TYPE_CHECKING:
    from trainer.config import Phase2
    from trainer.loop import Run, State

# Device stop codes -> the end reasons of the host guard (4: halted at an earlier step).
STOP_REASONS = {1: "nan_stop", 2: "nan_abort", 3: "diverged"}


def group_norm(run: Run, group: str) -> torch.Tensor:
    """L2 norm of one optimizer group's gradients, as a device scalar (no sync)."""
    grads = [p.grad for p in run.groups[group] if p.grad is not None]
    if not grads:
        return torch.zeros((), device=run.device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)


def group_norms(run: Run) -> list[torch.Tensor]:
    """L2 norm of each optimizer group's gradients, as device scalars (no sync)."""
    return [group_norm(run, g) for g in GROUPS]


def step_record(run: Run, step: int, loss_v: float, total_v: float, group_v: list[float],
                lrs: dict[str, float], clipped: bool, event: NanEvent | None) -> dict[str, Any]:
    """The metrics record of one optimizer step (both guards write the same keys)."""
    return {
        "step": step, "epoch": (step - 1) // run.plan.steps_per_epoch, "loss": loss_v,
        "grad_norm": total_v, "grad_norm/projector": group_v[0], "grad_norm/lora": group_v[1],
        "lr/projector": lrs["projector"], "lr/lora": lrs["lora"], "clipped": int(clipped),
        "skipped": int(event is not None),
    }


def nan_event(step: int, loss_v: float, group_v: list[float], fp16: bool) -> NanEvent | None:
    """The event of a step with a non-finite loss or group gradient norm (None if clean)."""
    bad_groups = [g for g, v in zip(GROUPS, group_v, strict=True) if not math.isfinite(v)]
    if math.isfinite(loss_v) and not bad_groups:
        return None
    overflow = fp16 and math.isfinite(loss_v)
    return NanEvent(step, "grad" if math.isfinite(loss_v) else "loss", bad_groups, "skipped",
                    fp16_overflow=overflow)


def advance_schedule(run: Run) -> None:
    # Skipped steps still advance the schedule: the LR stays a pure function of the step.
    with warnings.catch_warnings():  # torch warns when a skipped first step precedes this
        warnings.filterwarnings("ignore",
                                message=re.escape("Detected call of `lr_scheduler.step()`"))
        run.scheduler.step()


def rewind_schedule(run: Run, step: int) -> None:
    """Put the LambdaLR schedule back at `step` scheduler steps (after a device halt)."""
    sched = run.scheduler
    sched.last_epoch = step
    lrs = [base * lam(step) for base, lam in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
    for group, lr in zip(run.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs


@dataclass
class DeviceGuard:
    """The host guard's stop bookkeeping (`trainer.loop._apply_policy`) as device scalars."""

    halt: torch.Tensor  # bool: a stop reason was hit; every later update is skipped
    consecutive: torch.Tensor  # non-finite steps in a row
    first: torch.Tensor  # first finite loss (divergence reference)
    has_first: torch.Tensor  # bool
    ema: torch.Tensor  # smoothed finite loss

    @classmethod
    def start(cls, state: State, device: torch.device) -> DeviceGuard:
        """From a (possibly resumed) host State."""
        def t(v: Any) -> torch.Tensor:
            return torch.tensor(v, device=device)

        return cls(halt=t(False), consecutive=t(float(state.consecutive_bad)),
                   first=t(float(state.first_loss or 0.0)),
                   has_first=t(state.first_loss is not None),
                   ema=t(float(state.loss_ema or 0.0)))

    def update(self, p2: Phase2, finite: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Account one step; its stop code (0: go on, see STOP_REASONS, 4: halted before).

        Written in as few operators as it takes: on a GPU each is a launch from the host,
        once per step and trial-group member (bench/guard_ops.py counts them).
        """
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
    """One launched optimizer step whose values are still on the device."""

    step: int
    values: torch.Tensor  # [loss, global norm, projector norm, lora norm, clipped, stop code]
    lrs: dict[str, float]
    samples: int
    tokens: int


@dataclass
class GuardInputs:
    """What the device guard decides one step on: its values, and the clip they imply."""

    vals: torch.Tensor  # [loss, projector norm, lora norm]
    finite: torch.Tensor  # bool: loss and every norm finite
    total: torch.Tensor  # global gradient norm
    factor: torch.Tensor | None  # the gradients' clip factor (None: no clipping configured)
    clipped: torch.Tensor  # bool: clipped, on a finite step


def guard_inputs(run: Run, loss: torch.Tensor,
                 norms: list[torch.Tensor] | None = None) -> GuardInputs:
    """The loss and the group norms (`norms`, when the caller took them already, as a
    trial group does for all its members at once), the global norm and the clip factor."""
    p2 = run.cfg.phase2
    vals = torch.stack([loss.detach().float(), *(norms or group_norms(run))])
    finite = torch.isfinite(vals).all()
    total = torch.linalg.vector_norm(vals[1:], 2.0)
    if p2.clip is None:
        return GuardInputs(vals, finite, total, None, torch.zeros_like(finite))
    over = total > p2.clip
    return GuardInputs(vals, finite, total, torch.where(over, p2.clip / (total + 1e-6), 1.0),
                       over & finite)


def launch_update(run: Run, guard: DeviceGuard, step: int, gi: GuardInputs, samples: int,
                  tokens: int) -> PendingStep:
    """AdamW (skipped on the device where the step is not finite, or the run halted), the
    schedule and the guard's bookkeeping of one step whose gradients are clipped already.
    AdamW goes over the run's lists gathered once where it can (`listed_step`)."""
    found_inf = (gi.finite <= guard.halt).float()
    listed = listed_step(run)
    if listed is None or not listed.step(found_inf):
        guarded_step(run.optimizer, found_inf)
    lrs = {pg["name"]: pg["lr"] for pg in run.optimizer.param_groups}
    advance_schedule(run)
    code = guard.update(run.cfg.phase2, gi.finite, gi.vals[0])
    values = torch.cat([gi.vals[:1], gi.total.view(1), gi.vals[1:], gi.clipped.view(1),
                        code.view(1)])
    return PendingStep(step, values, lrs, samples, tokens)


def listed_step(run: Run) -> ListedAdamW | None:
    """The run's AdamW step over lists gathered once (`trainer.fused_adamw`): made once the
    optimizer has state, remade after a resume replaced it; None while it has none yet or
    takes another kind of step. A solo run's and each trial-group member's (a member's
    parameters stay the same objects while its LoRA weights are stacked: only their
    storage moves). At the seed's batch a CUDA-graph step is bound by the host, and
    `optimizer.step()`'s per-parameter Python was 1.42 ms of it on an H200 (run 22)."""
    listed = run.listed_adamw
    if listed is None or not listed.fresh():
        listed = run.listed_adamw = (ListedAdamW(run.optimizer)
                                     if ListedAdamW.supports(run.optimizer) else None)
    return listed


def launch_optimizer_step(run: Run, guard: DeviceGuard, step: int, loss: torch.Tensor,
                          samples: int, tokens: int) -> PendingStep:
    """Norms, guard, clipping, AdamW and the schedule of one step, with no host sync."""
    gi = guard_inputs(run, loss)
    if gi.factor is not None:
        grads = [p.grad for g in GROUPS for p in run.groups[g] if p.grad is not None]
        torch._foreach_mul_(grads, gi.factor)  # exactly 1.0 where the norm is in bounds
    return launch_update(run, guard, step, gi, samples, tokens)


def resolve_steps(run: Run, pending: list[PendingStep], rows: list[list[float]]
                  ) -> list[tuple[dict[str, Any], NanEvent | None, str | None]]:
    """Host records of read-back steps: (record, NaN event, device stop reason)."""
    out = []
    for p, (loss_v, total_v, g0, g1, clipped, code) in zip(pending, rows, strict=True):
        event = nan_event(p.step, loss_v, [g0, g1], fp16=False)
        record = step_record(run, p.step, loss_v, total_v, [g0, g1], p.lrs, bool(clipped),
                             event)
        record["_samples"], record["_tokens"] = p.samples, p.tokens
        out.append((record, event, STOP_REASONS.get(int(code))))
    return out


def read_back(pending: list[PendingStep]) -> list[list[float]]:
    """Every pending step's values in one device-to-host transfer (the window's sync)."""
    if not pending:
        return []
    return torch.stack([p.values for p in pending]).tolist()
