"""One Phase 2 training run: build, train, close.

`train()` builds the run (`trainer.run`), steps it (`train_loop`) and closes it. Each
optimizer step is `backward_step` (forward and backward of its micro-batches, `loss_step`
per micro-batch) and then the one optimizer step of `trainer.step`, its NaN guard on the
host or on the device. The loop reads the steps back a window at a time
(`output.sync_every`; a host-guarded step is read back already) and `finish_step` does
what follows a step: policy, eval, checkpoint, the metrics record. A trial group
(`trainer.group`) steps its members with the same `StepTally`, `flush_window` and
`finish_step`. The frozen encoders never run here when the feature cache is on.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from trainer.checkpoint import save_checkpoint
from trainer.config import TrainConfig
from trainer.data import to_device
from trainer.inputs import Inputs, prepare_inputs
from trainer.metrics import MetricsSink, NanEvent, RunSummary
from trainer.plan import needs_host
from trainer.run import AfterBackward, Run, build_run, close_run, debug_hook, open_sinks
from trainer.step import (
    DeviceGuard,
    Measured,
    PendingStep,
    State,
    apply_policy,
    optimizer_step,
    read_back,
    resolve_steps,
    rewind_schedule,
)

# A read-back window never spans much more than this much host time, so progress lines,
# trial reports and the stall watchdog (it beats on every record) still see slow steps.
WINDOW_MAX_S = 2.0


def train(cfg: TrainConfig, sink: MetricsSink | None = None, *, inputs: Inputs | None = None,
          resume: bool = False, device: str | None = None, source: str = "config",
          after_backward: AfterBackward | None = None, console: bool = True,
          log=print) -> RunSummary:
    """One Phase 2 run. `sink` receives params, per-step metrics and the summary."""
    t0 = time.perf_counter()
    inputs = inputs or prepare_inputs(cfg, log)
    run, state, params = build_run(cfg, inputs, resume=resume, device=device, source=source,
                                   log=log)
    run.after_backward = debug_hook(cfg, after_backward)
    out = open_sinks(run, state, sink, resume=resume, console=console)
    out.log_params(params)
    end_reason = train_loop(run, state, out)
    return close_run(run, state, out, end_reason, time.perf_counter() - t0)


def train_loop(run: Run, state: State, sink: MetricsSink) -> str:
    """Optimizer steps from state.step + 1 to the plan's end; returns the end reason.

    The host reads the steps back every `run.sync_every` steps (1 with the host guard),
    after WINDOW_MAX_S, and at every step it must see (`needs_host`)."""
    guard = DeviceGuard.start(run.cfg.phase2, state, run.device) if run.device_guard else None
    pending: list[PendingStep] = []
    t_last = time.perf_counter()
    for step in range(state.step + 1, run.plan.total_steps + 1):
        pending.append(backward_step(run, step).step(run, guard, step))
        if (len(pending) < run.sync_every and not needs_host(run.plan, run.cfg.output, step)
                and time.perf_counter() - t_last < WINDOW_MAX_S):
            continue
        rows = read_back(pending)  # the window's one sync
        now = time.perf_counter()
        dt, t_last = max(now - t_last, 1e-9) / len(pending), now  # per step, window mean
        end_reason = flush_window(run, state, pending, rows, sink, dt)
        pending = []
        if end_reason is not None:
            return end_reason
    return "completed"


def loss_step(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """Forward one micro-batch to its mean target-token loss."""
    dev = run.device
    if "features" in batch:
        features = to_device(batch["features"], dev)
    else:
        m = batch["media"]
        with torch.no_grad():  # frozen: never part of the graph
            features = run.bundle(to_device(m.images, dev), to_device(m.audio, dev),
                                  to_device(m.text, dev))
    # Labels stay on the CPU: the target positions are found there, without a device sync.
    # A compiled forward takes them on the device (static shapes; and a CPU tensor among
    # its inputs would keep CUDA graphs from capturing it).
    labels = batch["labels"]
    if run.model.static_loss:
        labels = to_device(labels, dev)
    args = (features, to_device(batch["input_ids"], dev), labels)
    skip = (run.guard_skip.around(run.model, *args) if run.guard_skip is not None
            else contextlib.nullcontext())
    with run.autocast(), skip:
        return run.model(*args)


def scale_for_backward(run: Run, loss: torch.Tensor) -> torch.Tensor:
    """One micro-batch's share of the step's loss, fp16-scaled when the run has a scaler."""
    scaled = loss / run.plan.accum  # mean over micro-batches, not their sum
    return run.scaler.scale(scaled) if run.scaler is not None else scaled


@dataclass
class StepTally:
    """Loss and throughput counts over one optimizer step's micro-batches."""

    loss_sum: torch.Tensor
    accum: int  # micro-batches per optimizer step
    samples: int = 0
    tokens: int = 0

    @property
    def loss(self) -> torch.Tensor:
        """The step's loss: the mean over its micro-batches."""
        return self.loss_sum / self.accum

    def add(self, run: Run, batch: dict[str, Any], loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float()
        self.samples += batch["input_ids"].shape[0]
        self.tokens += int(batch["attention_mask"].sum()) + self.samples * run.prefix_tokens

    def step(self, run: Run, guard: DeviceGuard | None, step: int,
             measured: Measured | None = None) -> PendingStep:
        """The fault hook, then the optimizer step (`trainer.step.optimizer_step`, host
        guard when `guard` is None) on the mean micro-batch loss; the step carries counts.
        `measured`: passed on (a stacked trial group ran the hooks and clipped already)."""
        if run.after_backward is not None and measured is None:
            run.after_backward(step, run.model)
        pending = optimizer_step(run.parts, step, self.loss, guard, measured)
        pending.samples, pending.tokens = self.samples, self.tokens
        return pending


def backward_step(run: Run, step: int) -> StepTally:
    """Forward and backward of every micro-batch of optimizer step `step`."""
    run.optimizer.zero_grad(set_to_none=True)
    tally = StepTally(torch.zeros((), device=run.device), run.plan.accum)
    for j in range(run.plan.accum):
        batch = run.train.batch(run.micro_batch(step - 1, j), trim=not run.model.static_loss)
        loss = loss_step(run, batch)
        scale_for_backward(run, loss).backward()
        tally.add(run, batch, loss)
    return tally


def flush_window(run: Run, state: State, pending: list[PendingStep],
                 rows: list[list[float]], sink: MetricsSink, dt: float) -> str | None:
    """Finish a read-back window of steps in order; the end reason if one of them ends the
    run (the window's later steps never updated anything: rewound)."""
    resolved = resolve_steps(run.plan.steps_per_epoch, pending, rows)
    for p, (record, event, device_stop) in zip(pending, resolved, strict=True):
        if device_stop is not None and p is not pending[-1]:
            rewind_schedule(run.parts, p.step)  # before finish_step checkpoints the stop step
        end_reason = finish_step(run, state, p.step, record, event, sink, dt, device_stop)
        if end_reason is not None:
            return end_reason
        if device_stop is not None:  # the device halted, the host's policy did not agree
            raise AssertionError(f"device guard stopped at step {p.step} ({device_stop}), "
                                 "the host policy did not")
    return None


def finish_step(run: Run, state: State, step: int, record: dict[str, Any],
                event: NanEvent | None, sink: MetricsSink, dt: float,
                device_stop: str | None = None) -> str | None:
    """Everything after an optimizer step: policy, throughput, eval, checkpoint, the record.

    Returns the end reason when this step ends the run ("completed" on the plan's last
    step), else None. `device_stop`: the device guard's stop reason for this step, for
    runs that have one.
    """
    out = run.cfg.output
    diverged = (device_stop == "diverged") if run.device_guard else None
    stop = apply_policy(run.cfg.phase2, state, event, record["loss"], diverged)
    state.step = step
    record["nan_events"] = len(state.nan_events)
    # The event itself, after apply_policy set its action (skipped/stopped/aborted): sinks
    # and the MLflow shipper read it as it is instead of rebuilding it from the counter and
    # the null gradient norms. A copy: the record must not change with the State's event.
    record["nan_event"] = asdict(event) if event is not None else None
    record["samples_per_s"] = record.pop("_samples") / dt
    record["tokens_per_s"] = record.pop("_tokens") / dt
    last = stop is not None or step == run.plan.total_steps
    if (out.eval_every and step % out.eval_every == 0) or last:
        state.eval_loss = evaluate(run)
        if state.eval_loss is not None:
            record["eval_loss"] = state.eval_loss
    ckpt = None
    if (out.checkpoint_every and step % out.checkpoint_every == 0) or last:
        ckpt = save_checkpoint(run.run_dir / "checkpoints", step, run.model, run.optimizer,
                               run.scheduler, run.scaler, state.meta(), out.keep_checkpoints)
    sink.log_metrics(record, step, ckpt)
    if stop is not None:
        return stop
    return "completed" if step == run.plan.total_steps else None


@torch.no_grad()
def evaluate(run: Run) -> float | None:
    """Mean loss over the eval split, dropout off; restores train mode."""
    if run.eval is None:
        return None
    run.model.eval()
    total, count = 0.0, 0
    bs = run.plan.batch_size * 4
    for i in range(0, len(run.eval), bs):
        idx = torch.arange(i, min(i + bs, len(run.eval)))
        loss = loss_step(run, run.eval.batch(idx, trim=not run.model.static_loss))
        total += float(loss) * len(idx)  # eval is off the hot path: a sync is fine
        count += len(idx)
    run.model.train()
    return total / count
