"""Building one run and closing it: the `Run` a loop trains.

`build_run` = `prepare_run_dir` (splits, step plan, run directory with its resolved
config) + the model + `assemble_run` (optimizer groups, AdamW, schedule, loss scaler,
guard choice) + `restore_state` (the newest readable checkpoint, when resuming). A trial
group (`trainer.group`) builds each member from the same pieces around its own view of
the shared model. `open_sinks` / `close_run` are a run's first and last words to its
metrics sinks.
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
from trainer.checkpoint import latest_readable, load_trainable, set_rng_state, trainable_state
from trainer.compile_guards import GuardSkip
from trainer.compile_scope import compile_forward
from trainer.config import TrainConfig
from trainer.data import Split, epoch_order, place_features
from trainer.errors import ConfigError, Problem
from trainer.fsutil import atomic_write_text
from trainer.inputs import Inputs, load_splits
from trainer.llm import prepare_llm
from trainer.metrics import ConsoleSink, JsonlSink, MetricsSink, MultiSink, RunSummary
from trainer.model import Phase2Model, build_model, low_precision_dtype
from trainer.optim import build_optimizer, build_scheduler, param_groups
from trainer.plan import Plan, plan_steps
from trainer.step import State, StepParts
from trainer.yaml_io import dump_yaml

AfterBackward = Callable[[int, Phase2Model], None]  # fault-injection hook for tests


@dataclass
class Run:
    """Everything a run holds while training."""

    cfg: TrainConfig
    plan: Plan
    model: Phase2Model
    parts: StepParts  # what its optimizer step acts on (trainer.step)
    train: Split
    eval: Split | None
    bundle: Phase1Bundle | None  # only when the encoders run every step (no feature cache)
    device: torch.device
    run_dir: Path
    prefix_tokens: int
    sync_every: int = 1  # optimizer steps per read-back of the step metrics
    device_guard: bool = False  # NaN guard on the device (trainer.step), else host
    after_backward: AfterBackward | None = None
    guard_skip: GuardSkip | None = None  # compiled forward: its guard check, once warm
    _orders: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.parts.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        return self.parts.scheduler

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return self.parts.scaler

    @property
    def groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return self.parts.groups

    def micro_batch(self, step_index: int, j: int) -> torch.Tensor:
        """Row indices of micro-batch j of 0-based optimizer step `step_index`."""
        epoch, rows = self.plan.micro_batch_rows(step_index, j)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.train), self.cfg.phase2.seed, epoch)}
        return self._orders[epoch][rows]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's autocast (its precision; fp32 runs get a disabled one)."""
        dtype = low_precision_dtype(self.cfg.phase2.precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32,
                              enabled=dtype is not None)


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


def make_run_dir(cfg: TrainConfig, resume: bool, source: str) -> Path:
    """The run's directory under output.root; an existing run's only with `resume`."""
    name = cfg.output.run_name or datetime.now().strftime("run-%Y%m%d-%H%M%S-%f")
    run_dir = cfg.output.root / name
    previous = [run_dir / "metrics.jsonl", run_dir / "checkpoints"]
    if not resume and any(p.exists() for p in previous):
        raise ConfigError([Problem(source, "output.run_name",
                                   f"run directory {run_dir} already exists",
                                   "pass --resume to continue it, or choose another run_name")])
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def prepare_run_dir(cfg: TrainConfig, inputs: Inputs, tokenizer, *, resume: bool, source: str,
                    splits: tuple[Split, Split | None] | None = None
                    ) -> tuple[Split, Split | None, Plan, Path]:
    """Splits, step plan and run directory (with config.resolved.yaml) of one run.
    `splits`: the train and eval splits already loaded for `cfg` (a trial group's, which
    every member shares); None loads them."""
    train_split, eval_split = splits or load_splits(cfg, inputs, tokenizer)
    plan = plan_steps(cfg.phase2, len(train_split), source)
    run_dir = make_run_dir(cfg, resume, source)
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
    parts = StepParts(groups, optimizer, scheduler, dev, scaler, p2.clip)
    return Run(cfg, plan, model, parts, train_split, eval_split, bundle, dev, run_dir, prefix,
               sync_every if device_guard else 1, device_guard)


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
        cfg, inputs, prepare_llm(inputs.llm_dir, cfg.model.lora, source, log),
        resume=resume, source=source)
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
        # Compile the bound forward (or its decoder blocks in place), not the module:
        # parameter names (and so the optimizer groups and checkpoints) stay as they are.
        model.forward = compile_forward(model.forward, model.llm, m.compile, m.compile_scope)
        model.static_loss = True  # one graph: full-length rows, a fixed target capacity
        if m.skip_compile_guards:
            run.guard_skip = GuardSkip()
    state = restore_state(run, log) if resume else State()
    return run, state, resolved_params(cfg, plan)


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


def save_weights(run: Run) -> None:
    """trainable.safetensors (projector + LoRA), written whole or not at all."""
    from safetensors.torch import save_file

    tmp = run.run_dir / ".trainable.safetensors.tmp"
    save_file(trainable_state(run.model), str(tmp))
    tmp.replace(run.run_dir / "trainable.safetensors")


def close_run(run: Run, state: State, sink: MetricsSink, end_reason: str,
              wall_s: float) -> RunSummary:
    """Final weights (if configured), then the summary to every sink."""
    if run.cfg.output.save_weights:
        save_weights(run)
    summary = RunSummary(
        status=run_status(end_reason), end_reason=end_reason, steps_done=state.step,
        total_steps=run.plan.total_steps, first_loss=state.first_loss,
        final_loss=state.last_loss, eval_loss=state.eval_loss, nan_events=state.nan_events,
        run_dir=str(run.run_dir), wall_s=wall_s,
    )
    sink.close(summary)
    return summary
