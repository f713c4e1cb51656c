"""One Phase 2 training run: build, train, close.

`train()` reads top to bottom; the pieces it calls are named for what they do:
`_loss_step` (forward on one micro-batch), the optimizer step (norms, NaN guard,
clipping, AdamW, schedule) and the sinks (metrics). The optimizer step has two
guards: `_optimizer_step` reads the step's values back and decides on the host
(the CPU default, and fp16), `trainer.step_guard` decides on the device and the
loop reads a window of steps back at once (`_device_guarded_loop`, the CUDA
default). The frozen encoders never run here when the feature cache is on.

A trial group (`trainer.group`) trains several runs over one shared forward and
reuses everything here per member: `prepare_run_dir` / `assemble_run` /
`restore_state` to build one, `StepTally` (`optimizer_step` or `launch`) for its
step, `finish_step` (policy, eval, checkpoint, record) and `open_sinks` / `close_run`.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.bundle import Phase1Bundle, load_bundle
from trainer.checkpoint import latest_readable, load_trainable, save_checkpoint, set_rng_state
from trainer.compile_guards import GuardSkip
from trainer.config import Phase2, TrainConfig
from trainer.data import Split, epoch_order, place_features, to_device
from trainer.errors import ConfigError, Problem
from trainer.fsutil import atomic_write_text
from trainer.fused_adamw import ListedAdamW
from trainer.inputs import Inputs, load_splits, prepare_inputs
from trainer.metrics import ConsoleSink, JsonlSink, MetricsSink, MultiSink, NanEvent, RunSummary
from trainer.model import Phase2Model, build_model, low_precision_dtype
from trainer.optim import GROUPS, build_optimizer, build_scheduler, param_groups
from trainer.step_guard import (
    DeviceGuard,
    PendingStep,
    advance_schedule,
    group_norms,
    launch_optimizer_step,
    nan_event,
    read_back,
    resolve_steps,
    rewind_schedule,
    step_record,
)
from trainer.yaml_io import dump_yaml

AfterBackward = Callable[[int, Phase2Model], None]  # fault-injection hook for tests


@dataclass(frozen=True)
class Plan:
    batch_size: int
    accum: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan_steps(p2: Phase2, n_train: int, source: str = "config") -> Plan:
    """Optimizer-step plan; a run that cannot make sense is a ConfigError."""
    per_step = p2.batch_size * p2.gradient_accumulation_steps
    spe = n_train // per_step  # incomplete trailing micro-batches are dropped
    if spe < 1:
        raise ConfigError([Problem(source, "phase2.batch_size",
                                   f"{n_train} training examples < batch_size x "
                                   f"gradient_accumulation_steps = {per_step}",
                                   "lower batch_size or add data")])
    total = p2.total_training_steps or p2.epochs * spe
    if p2.warmup_steps >= total:  # equal would leave no cosine decay at all
        raise ConfigError([Problem(source, "phase2.warmup_steps",
                                   f"warmup of {p2.warmup_steps} steps is not shorter than the "
                                   f"run ({total} optimizer steps)",
                                   "lower warmup_steps or raise epochs / total_training_steps")])
    return Plan(p2.batch_size, p2.gradient_accumulation_steps, spe, total, p2.warmup_steps)


def resolved_params(cfg: TrainConfig, plan: Plan) -> dict[str, Any]:
    """The knobs that define a run, same names for every run (MLflow params, leaderboard)."""
    p2, lora = cfg.phase2, cfg.model.lora
    return {
        "learning_rate": p2.learning_rate, "projector_lr": p2.resolved_projector_lr,
        "lora_lr": p2.resolved_lora_lr, "projector_lr_mult": p2.projector_lr_mult,
        "lora_lr_mult": p2.lora_lr_mult, "warmup_steps": p2.warmup_steps,
        "gradient_clip_val": p2.clip, "epochs": p2.epochs, "batch_size": p2.batch_size,
        "gradient_accumulation_steps": p2.gradient_accumulation_steps,
        "total_steps": plan.total_steps, "weight_decay": p2.weight_decay, "seed": p2.seed,
        "precision": p2.precision, "nan_policy": p2.nan_policy,
        "max_consecutive_nan": p2.max_consecutive_nan, "lora_r": lora.r,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
    }


def resolved_config(cfg: TrainConfig, inputs: Inputs, plan: Plan) -> dict[str, Any]:
    """The config with every default made explicit (projector_lr, lora_lr, paths, steps)."""
    data = cfg.to_plain()
    data["phase2"].update(projector_lr=cfg.phase2.resolved_projector_lr,
                          lora_lr=cfg.phase2.resolved_lora_lr,
                          total_training_steps=plan.total_steps)
    if inputs.bundle_dir is not None:  # other Phase 1 sources have no bundle directory
        data["phase1"]["bundle_path"] = str(inputs.bundle_dir)
    data["model"]["llm_path"] = str(inputs.llm_dir)
    data["data"]["manifest"] = str(inputs.manifest)
    return data


@dataclass
class State:
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


@dataclass
class Run:
    """Everything a run holds while training."""

    cfg: TrainConfig
    plan: Plan
    model: Phase2Model
    groups: dict[str, list[torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    train: Split
    eval: Split | None
    bundle: Phase1Bundle | None  # only when the encoders run every step (no feature cache)
    device: torch.device
    run_dir: Path
    prefix_tokens: int
    sync_every: int = 1  # optimizer steps per read-back of the step metrics
    device_guard: bool = False  # NaN guard on the device (trainer.step_guard), else host
    after_backward: AfterBackward | None = None
    guard_skip: GuardSkip | None = None  # compiled forward: its guard check, once warm
    listed_adamw: ListedAdamW | None = None  # device guard: trainer.step_guard.listed_step
    _orders: dict[int, torch.Tensor] = field(default_factory=dict)

    def micro_batch(self, step_index: int, j: int) -> torch.Tensor:
        """Row indices of micro-batch j of 0-based optimizer step `step_index`."""
        p = self.plan
        epoch, within = divmod(step_index, p.steps_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.train), self.cfg.phase2.seed, epoch)}
        k = within * p.accum + j
        return self._orders[epoch][k * p.batch_size : (k + 1) * p.batch_size]


def autocast_for(run: Run):
    dtype = low_precision_dtype(run.cfg.phase2.precision)
    return torch.autocast(run.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _loss_step(run: Run, batch: dict[str, Any]) -> torch.Tensor:
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
    with autocast_for(run), skip:
        return run.model(*args)


def _optimizer_step(run: Run, state: State, step: int, loss: torch.Tensor
                    ) -> tuple[dict[str, Any], NanEvent | None]:
    """The host guard: norms, NaN check, clipping, AdamW and the schedule for one step.

    Reads the loss and norms back before deciding (one device sync per step); runs with a
    fused AdamW and no fp16 scaler use the device guard of `trainer.step_guard` instead.
    """
    p2 = run.cfg.phase2
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    norms = group_norms(run)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    loss_v, total_v, *group_v = torch.stack([loss.float(), total, *norms]).tolist()
    lrs = {pg["name"]: pg["lr"] for pg in run.optimizer.param_groups}
    event = nan_event(step, loss_v, group_v, fp16=run.scaler is not None)
    clipped = False
    if event is not None:
        if run.scaler is not None:
            run.scaler.update()  # lowers the loss scale after an overflow
    else:
        clip = p2.clip
        if clip is not None and total_v > clip:
            clipped = True
            params = [p for g in GROUPS for p in run.groups[g] if p.grad is not None]
            torch._foreach_mul_([p.grad for p in params], clip / (total_v + 1e-6))
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
    advance_schedule(run)
    return step_record(run, step, loss_v, total_v, group_v, lrs, clipped, event), event


def _apply_policy(p2: Phase2, state: State, event: NanEvent | None, loss: float,
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
        loss = _loss_step(run, run.eval.batch(idx, trim=not run.model.static_loss))
        total += float(loss) * len(idx)  # eval is off the hot path: a sync is fine
        count += len(idx)
    run.model.train()
    return total / count


def scale_for_backward(run: Run, loss: torch.Tensor) -> torch.Tensor:
    """One micro-batch's share of the step's loss, fp16-scaled when the run has a scaler."""
    scaled = loss / run.plan.accum  # mean over micro-batches, not their sum
    return run.scaler.scale(scaled) if run.scaler is not None else scaled


@dataclass
class StepTally:
    """Loss and throughput counts over one optimizer step's micro-batches."""

    loss_sum: torch.Tensor
    samples: int = 0
    tokens: int = 0

    def add(self, run: Run, batch: dict[str, Any], loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float()
        self.samples += batch["input_ids"].shape[0]
        self.tokens += int(batch["attention_mask"].sum()) + self.samples * run.prefix_tokens

    def optimizer_step(self, run: Run, state: State, step: int
                       ) -> tuple[dict[str, Any], NanEvent | None]:
        """Hook, then `_optimizer_step` on the mean micro-batch loss; the record carries counts."""
        if run.after_backward is not None:
            run.after_backward(step, run.model)
        record, event = _optimizer_step(run, state, step, self.loss_sum / run.plan.accum)
        record["_samples"], record["_tokens"] = self.samples, self.tokens
        return record, event

    def launch(self, run: Run, guard: DeviceGuard, step: int) -> PendingStep:
        """Hook, then the device-guarded step (`trainer.step_guard`): nothing is read back."""
        if run.after_backward is not None:
            run.after_backward(step, run.model)
        return launch_optimizer_step(run, guard, step, self.loss_sum / run.plan.accum,
                                     self.samples, self.tokens)


def _backward_step(run: Run, step: int) -> StepTally:
    """Forward and backward of every micro-batch of optimizer step `step`."""
    run.optimizer.zero_grad(set_to_none=True)
    tally = StepTally(torch.zeros((), device=run.device))
    for j in range(run.plan.accum):
        batch = run.train.batch(run.micro_batch(step - 1, j), trim=not run.model.static_loss)
        loss = _loss_step(run, batch)
        scale_for_backward(run, loss).backward()
        tally.add(run, batch, loss)
    return tally


def _train_one_step(run: Run, state: State, step: int) -> tuple[dict[str, Any], NanEvent | None]:
    """One optimizer step with the host guard (its record at once)."""
    return _backward_step(run, step).optimizer_step(run, state, step)


def needs_host(run: Run, step: int) -> bool:
    """Whether the host must see step `step` before the next one starts: it evaluates,
    checkpoints or ends the run there, each of which needs the weights of that step."""
    out = run.cfg.output
    return (step == run.plan.total_steps
            or bool(out.eval_every and step % out.eval_every == 0)
            or bool(out.checkpoint_every and step % out.checkpoint_every == 0))


def _make_run_dir(cfg: TrainConfig, resume: bool, source: str) -> Path:
    name = cfg.output.run_name or datetime.now().strftime("run-%Y%m%d-%H%M%S-%f")
    run_dir = cfg.output.root / name
    previous = [run_dir / "metrics.jsonl", run_dir / "checkpoints"]
    if not resume and any(p.exists() for p in previous):
        raise ConfigError([Problem(source, "output.run_name",
                                   f"run directory {run_dir} already exists",
                                   "pass --resume to continue it, or choose another run_name")])
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def frozen_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The dtype the frozen untargeted linears are stored in (None: fp32, as loaded)."""
    return low_precision_dtype(cfg.phase2.precision) if cfg.model.cast_frozen_linears else None


def resolve_device(device: str | None) -> torch.device:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        # TF32 for the fp32 matmuls left outside autocast (and for fp32 runs): ~same loss,
        # several times the throughput on Ampere and newer.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def load_tokenizer(inputs: Inputs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(inputs.llm_dir), local_files_only=True)


def prepare_run_dir(cfg: TrainConfig, inputs: Inputs, tokenizer, *, resume: bool, source: str
                    ) -> tuple[Split, Split | None, Plan, Path]:
    """Splits, step plan and run directory (with config.resolved.yaml) of one run."""
    train_split, eval_split = load_splits(cfg, inputs, tokenizer)
    plan = plan_steps(cfg.phase2, len(train_split), source)
    run_dir = _make_run_dir(cfg, resume, source)
    atomic_write_text(run_dir / "config.resolved.yaml",
                      dump_yaml(resolved_config(cfg, inputs, plan)))
    return train_split, eval_split, plan, run_dir


def assemble_run(cfg: TrainConfig, plan: Plan, model: Phase2Model, train_split: Split,
                 eval_split: Split | None, bundle: Phase1Bundle | None, dev: torch.device,
                 run_dir: Path, prefix: int, log=print) -> Run:
    """Optimizer groups, AdamW, schedule and loss scaler around a freshly built model."""
    p2 = cfg.phase2
    groups, counts = param_groups(model)
    log(counts.describe(p2.resolved_projector_lr, p2.resolved_lora_lr))
    # On the CPU a sync costs nothing, so the host guard stays the default there; asking
    # for sync_every > 1 selects the device guard (and so the CPU's fused AdamW) anywhere.
    sync_every = cfg.output.sync_every or (10 if dev.type == "cuda" else 1)
    scaler = torch.amp.GradScaler(dev.type) if p2.precision == "fp16" else None
    device_guard = scaler is None and (dev.type == "cuda" or sync_every > 1)
    optimizer = build_optimizer(groups, p2.resolved_projector_lr, p2.resolved_lora_lr,
                                p2.weight_decay, p2.adam_betas, p2.adam_eps,
                                fused=dev.type == "cuda" or device_guard)
    scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps)
    return Run(cfg, plan, model, groups, optimizer, scheduler, scaler, train_split, eval_split,
               bundle, dev, run_dir, prefix, sync_every if device_guard else 1, device_guard)


def restore_state(run: Run, log=print, *, restore_rng: bool = True) -> State:
    """Load the newest readable checkpoint of `run` into it; a fresh State if there is none.

    `restore_rng=False` leaves the process RNG alone (a trial group shares one RNG stream
    among its members, so one member's saved stream must not rewind the others').
    """
    found = latest_readable(run.run_dir / "checkpoints", log)
    if found is None:
        log(f"[resume] no checkpoint in {run.run_dir}; starting from step 0")
        return State()
    path, (weights, st, meta) = found
    load_trainable(run.model, weights)
    run.optimizer.load_state_dict(st["optimizer"])
    run.scheduler.load_state_dict(st["scheduler"])
    if run.scaler is not None and st["scaler"]:
        run.scaler.load_state_dict(st["scaler"])
    if restore_rng:
        set_rng_state(st["rng"])
    state = State.from_meta(meta)
    log(f"[resume] from {path.name} (step {state.step}/{run.plan.total_steps})")
    return state


def build_run(cfg: TrainConfig, inputs: Inputs, *, resume: bool = False, device: str | None = None,
              source: str = "config", log=print) -> tuple[Run, State, dict[str, Any]]:
    """Everything needed to train, restored from the newest checkpoint if resuming."""
    dev = resolve_device(device)
    train_split, eval_split, plan, run_dir = prepare_run_dir(
        cfg, inputs, load_tokenizer(inputs), resume=resume, source=source)
    train_split = place_features(train_split, dev, cfg.data.features_on_device)

    seed_everything(cfg.phase2.seed)
    p2, m = cfg.phase2, cfg.model
    bundle = None if train_split.features is not None else load_bundle(inputs.bundle_dir, dev)
    align_dim = (train_split.features.shape[-1] if train_split.features is not None
                 else bundle.align_dim)
    prefix = (train_split.features.shape[1] if train_split.features is not None
              else bundle.num_tokens)
    model = build_model(inputs.llm_dir, align_dim, lora_r=m.lora.r, lora_alpha=m.lora.alpha,
                        lora_dropout=m.lora.dropout, target_modules=m.lora.target_modules,
                        projector_hidden=m.projector.hidden_dim,
                        projector_dropout=m.projector.dropout,
                        attn_implementation=m.attn_implementation, device=str(dev),
                        seed=p2.seed, frozen_dtype=frozen_dtype(cfg))
    model.train()
    run = assemble_run(cfg, plan, model, train_split, eval_split, bundle, dev, run_dir, prefix,
                       log)
    if m.compile != "off":
        # Compile the bound forward, not the module: parameter names (and so the optimizer
        # groups and checkpoints) stay as they are.
        model.forward = torch.compile(model.forward, mode=m.compile, dynamic=False)
        model.static_loss = True  # one graph: full-length rows, a fixed target capacity
        if m.skip_compile_guards:
            run.guard_skip = GuardSkip()
    state = restore_state(run, log) if resume else State()
    return run, state, resolved_params(cfg, plan)


def _save_weights(run: Run) -> None:
    from safetensors.torch import save_file

    from trainer.checkpoint import trainable_state

    tmp = run.run_dir / ".trainable.safetensors.tmp"
    save_file(trainable_state(run.model), str(tmp))
    tmp.replace(run.run_dir / "trainable.safetensors")


def finish_step(run: Run, state: State, step: int, record: dict[str, Any],
                event: NanEvent | None, sink: MetricsSink, dt: float,
                device_stop: str | None = None) -> str | None:
    """Everything after an optimizer step: policy, throughput, eval, checkpoint, the record.

    Shared by solo runs and trial-group members. Returns the end reason when this step
    ends the run ("completed" on the plan's last step), else None. `device_stop`: the
    device guard's stop reason for this step, for runs that have one.
    """
    out = run.cfg.output
    diverged = (device_stop == "diverged") if run.device_guard else None
    stop = _apply_policy(run.cfg.phase2, state, event, record["loss"], diverged)
    state.step = step
    record["nan_events"] = len(state.nan_events)
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


def train_loop(run: Run, state: State, sink: MetricsSink) -> str:
    """Optimizer steps from state.step + 1 to the plan's end; returns the end reason."""
    if run.device_guard:
        return _device_guarded_loop(run, state, sink)
    t_last = time.perf_counter()
    for step in range(state.step + 1, run.plan.total_steps + 1):
        record, event = _train_one_step(run, state, step)
        now = time.perf_counter()
        dt, t_last = max(now - t_last, 1e-9), now
        end_reason = finish_step(run, state, step, record, event, sink, dt)
        if end_reason is not None:
            return end_reason
    return "completed"


def flush_window(run: Run, state: State, pending: list[PendingStep],
                 rows: list[list[float]], sink: MetricsSink, dt: float) -> str | None:
    """Finish a read-back window of device-guarded steps in order; the end reason if one
    of them ends the run (the window's later steps never updated anything: rewound)."""
    for p, (record, event, device_stop) in zip(pending, resolve_steps(run, pending, rows),
                                                strict=True):
        if device_stop is not None and p is not pending[-1]:
            rewind_schedule(run, p.step)  # before finish_step checkpoints the stop step
        end_reason = finish_step(run, state, p.step, record, event, sink, dt, device_stop)
        if end_reason is not None:
            return end_reason
        if device_stop is not None:  # the device halted, the host's policy did not agree
            raise AssertionError(f"device guard stopped at step {p.step} ({device_stop}), "
                                 "the host policy did not")
    return None


# A read-back window never spans much more than this much host time, so progress lines,
# trial reports and the stall watchdog (it beats on every record) still see slow steps.
WINDOW_MAX_S = 2.0


def _device_guarded_loop(run: Run, state: State, sink: MetricsSink) -> str:
    """`train_loop` with the device guard: the host reads the steps back every
    `run.sync_every` steps (or WINDOW_MAX_S), and at every step it must see
    (`needs_host`)."""
    guard = DeviceGuard.start(state, run.device)
    pending: list[PendingStep] = []
    t_last = time.perf_counter()
    for step in range(state.step + 1, run.plan.total_steps + 1):
        pending.append(_backward_step(run, step).launch(run, guard, step))
        if (len(pending) < run.sync_every and not needs_host(run, step)
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


def debug_hook(cfg: TrainConfig, user: AfterBackward | None) -> AfterBackward | None:
    """Compose the config's fault injection with a caller's hook."""
    d = cfg.debug
    if d.inject_nan_at_step is None and d.hang_at_step is None:
        return user

    def hook(step: int, model: Phase2Model) -> None:
        if step == d.hang_at_step:
            while True:  # a hung step: only the stall watchdog ends this
                time.sleep(1.0)
        if step == d.inject_nan_at_step:
            for name, p in model.named_parameters():
                in_projector = name.startswith("projector.")
                if p.grad is not None and in_projector == (d.inject_nan_group == "projector"):
                    p.grad.fill_(float("nan"))
        if user is not None:
            user(step, model)

    return hook


def open_sinks(run: Run, state: State, sink: MetricsSink | None, *, resume: bool,
               console: bool, console_prefix: str = "") -> MultiSink:
    """metrics.jsonl (truncated to the resumed step), optional console, the caller's sink."""
    sinks: list[MetricsSink] = [JsonlSink(run.run_dir, state.step if resume else None)]
    if console:
        sinks.append(ConsoleSink(run.cfg.output.log_every, run.plan.total_steps,
                                 console_prefix))
    if sink is not None:
        sinks.append(sink)
    return MultiSink(*sinks)


def run_status(end_reason: str) -> str:
    """RunSummary.status of an end reason: a run stopped from outside is not unstable."""
    if end_reason in ("completed", "stopped"):
        return end_reason
    return "unstable"


def close_run(run: Run, state: State, sink: MetricsSink, end_reason: str,
              wall_s: float) -> RunSummary:
    """Final weights (if configured), then the summary to every sink."""
    if run.cfg.output.save_weights:
        _save_weights(run)
    summary = RunSummary(
        status=run_status(end_reason), end_reason=end_reason, steps_done=state.step,
        total_steps=run.plan.total_steps, first_loss=state.first_loss,
        final_loss=state.last_loss, eval_loss=state.eval_loss, nan_events=state.nan_events,
        run_dir=str(run.run_dir), wall_s=wall_s,
    )
    sink.close(summary)
    return summary


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
