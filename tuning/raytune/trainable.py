"""The Ray Tune trial: a thin adapter around `trainer.train`.

Sampled config in (merged into the base Phase 2 config), a result through
`tune.report` every `report_every` steps, checkpoints through Ray's checkpoint API.
A result carries what the scheduler and the live table read, not the step records:
those are in the run's metrics.jsonl (written before the report), which the MLflow
callback follows. A non-finite loss never reaches a scheduler or searcher: it is
replaced by `worst_loss`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.checkpoint_files import META
from trainer.metrics import RunSummary, finite_or_none
from tuning.analysis.trial_record import STALL_FILE

if TYPE_CHECKING:  # annotations only: a trial client imports no torch
    from trainer.inputs import Inputs


@dataclass(frozen=True)
class TrialOptions:
    trials_dir: Path
    report_every: int
    checkpoint_every: int
    keep_checkpoints: int
    nan_policy: str
    divergence_factor: float | None
    stall_timeout_s: float
    worst_loss: float
    cpus_per_trial: float


def trial_config(base: dict[str, Any], sampled: dict[str, Any], trial_id: str,
                 opts: TrialOptions) -> dict[str, Any]:
    """Base config data + the sampled values + the trial's output/stopping settings."""
    from trainer.config import set_dotted
    from tuning.search_config import space_key_path

    data = copy.deepcopy(base)
    for key, value in sampled.items():
        set_dotted(data, space_key_path(key), value)
    out = data.setdefault("output", {})
    out.update(root=str(opts.trials_dir), run_name=trial_id,
               checkpoint_every=opts.checkpoint_every, keep_checkpoints=opts.keep_checkpoints)
    p2 = data.setdefault("phase2", {})
    p2["nan_policy"] = opts.nan_policy
    p2.setdefault("divergence_factor", opts.divergence_factor)
    return data


class RayReportSink:
    """Buffers step records and reports them to Tune in batches (plus on checkpoints)."""

    def __init__(self, opts: TrialOptions, run_dir: Path, watchdog: StallWatchdog) -> None:
        self.opts, self.run_dir, self.watchdog = opts, run_dir, watchdog
        self.params: dict[str, Any] = {}
        self.pending: list[dict[str, Any]] = []
        self.events_seen = 0
        self.last_eval: float | None = None
        self.last_loss: float | None = None  # for reports that carry no new records
        self.stashed: Path | None = None  # checkpoint waiting for the next report

    def log_params(self, params: dict[str, Any]) -> None:
        self.params = dict(params)

    def log_metrics(self, metrics: dict[str, Any], step: int,
                    checkpoint: Path | None = None) -> None:
        self.watchdog.beat()
        # A checkpoint is reported one call late: the report may be where the scheduler
        # ends the trial, and the last one must come after the trainer wrote its summary
        # and weights (close()). keep_checkpoints >= 2 keeps the stashed one on disk.
        if self.stashed is not None:
            self._report(self.stashed)
            self.stashed = None
        self.pending.append(dict(metrics))
        if checkpoint is not None:
            self.stashed = checkpoint
        elif len(self.pending) >= self.opts.report_every:
            self._report(None)

    def _scheduler_loss(self) -> float:
        """Mean loss of the pending steps; worst_loss if any was non-finite."""
        vals = [r.get("loss") for r in self.pending]
        if any(v is None or not math.isfinite(v) for v in vals):
            self.last_loss = self.opts.worst_loss  # NaN never reaches ASHA / the searcher
        elif vals:
            self.last_loss = sum(vals) / len(vals)
        return self.last_loss if self.last_loss is not None else self.opts.worst_loss

    def _report(self, checkpoint: Path | None, summary: RunSummary | None = None) -> None:
        from ray import tune

        last = self.pending[-1] if self.pending else {}
        # the trainer's cumulative NaN-event counter (each record carries it)
        self.events_seen = max([self.events_seen,
                                *(r.get("nan_events", 0) for r in self.pending)])
        if "eval_loss" in last:
            ev = last["eval_loss"]
            self.last_eval = ev if ev is not None and math.isfinite(ev) else self.opts.worst_loss
        result = {
            "step": last.get("step", summary.steps_done if summary else 0),
            "steps_total": summary.total_steps if summary else None,
            "loss": (loss := self._scheduler_loss()),
            "eval_loss": self.last_eval if self.last_eval is not None else loss,
            "grad_norm": finite_or_none(last.get("grad_norm")) or 0.0,
            "nan_events": last.get("nan_events", self.events_seen),
            "unstable": int(self.events_seen > 0 or (summary is not None and
                                                     summary.status != "completed")),
            # The trainer's own last numbers for MLflow's final/* metrics (``loss`` above is
            # a mean, worst_loss after a NaN).
            "last_loss": self._last_finite("loss"),
            "last_eval_loss": self._last_finite("eval_loss"),
            "resolved_params": self.params,
            "end_reason": summary.end_reason if summary else None,
            "run_dir": str(self.run_dir),
        }
        self.pending = []
        ckpt = None
        if checkpoint is not None:
            from ray.tune import Checkpoint

            ckpt = Checkpoint.from_directory(str(checkpoint))
        tune.report(result, checkpoint=ckpt)

    def _last_finite(self, key: str) -> float | None:
        """The latest finite ``key`` of the pending records (None: none had one)."""
        for r in reversed(self.pending):
            value = finite_or_none(r.get(key))
            if value is not None:
                return value
        return None

    def close(self, summary: RunSummary) -> None:
        self.watchdog.stop()
        self._report(self.stashed, summary)
        self.stashed = None


class StallWatchdog:
    """Ends the worker if no optimizer step completes for `timeout_s` (a hung trial).

    A hung step cannot be interrupted from Python, so the watchdog records why in
    the run dir and exits the process; Ray then retries the trial from its last
    checkpoint (FailureConfig), or marks it failed.
    """

    SETUP_GRACE_S = 900.0  # imports + loading an LLM before step 1 are not a stall

    def __init__(self, timeout_s: float, run_dir: Path) -> None:
        self.timeout_s, self.run_dir = timeout_s, run_dir
        self._last = time.monotonic()
        self._stepped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="stall-watchdog")

    def start(self) -> StallWatchdog:
        self._thread.start()
        return self

    def beat(self) -> None:
        self._last = time.monotonic()
        self._stepped = True

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            limit = self.timeout_s if self._stepped else max(self.timeout_s, self.SETUP_GRACE_S)
            if idle > limit:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / STALL_FILE).write_text(json.dumps(
                    {"end_reason": "stalled", "idle_s": round(idle, 1), "time": time.time()}))
                os._exit(3)


def _ray_checkpoint_step() -> int:
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        return int(json.loads((Path(d) / META).read_text())["step"])


def _replay_finished(cfg, run_dir: Path, opts: TrialOptions, watchdog: StallWatchdog) -> bool:
    """Re-report a run that finished on disk but whose end Ray never recorded.

    A driver killed between the trainer's last write and Ray's next experiment snapshot
    leaves a complete run dir; training it again from an older checkpoint would only
    recompute the same numbers. Replays the records after Ray's checkpoint, the final
    checkpoint and the summary instead. True if it did.
    """
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file() or not (run_dir / "trainable.safetensors").is_file():
        return False
    data = json.loads(summary_path.read_text())
    final = run_dir / "checkpoints" / f"step_{data['steps_done']:06d}"
    if not (final / META).is_file():
        return False
    # Only here, for a replay: trainer.inputs and trainer.run import torch, which a shared
    # group's trial process (a thin client) otherwise never loads; every trial calls this.
    from trainer.inputs import train_size
    from trainer.metrics import NanEvent
    from trainer.plan import plan_steps
    from trainer.run import resolved_params
    after = _ray_checkpoint_step()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["step"] > after]
    sink = RayReportSink(opts, run_dir, watchdog)
    sink.log_params(resolved_params(cfg, plan_steps(cfg.phase2, train_size(cfg))))
    for i, record in enumerate(records):
        sink.log_metrics(record, record["step"], final if i == len(records) - 1 else None)
    fields = {k: v for k, v in data.items() if k not in ("first_nan_step", "first_nan_group")}
    fields["nan_events"] = [NanEvent(**e) for e in fields["nan_events"]]
    sink.close(RunSummary(**fields))
    return True


def _restore_checkpoint(run_dir: Path) -> bool:
    """Make the run dir agree with Ray's checkpoint; True if training should resume."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a retry with no checkpoint starts clean
        return False
    ckpt_root = run_dir / "checkpoints"
    with ckpt.as_directory() as d:
        step = json.loads((Path(d) / META).read_text())["step"]
        for p in ckpt_root.glob("step_*") if ckpt_root.is_dir() else []:
            if int(p.name.split("_")[1]) > step:  # newer than what Ray recorded
                shutil.rmtree(p)
        target = ckpt_root / f"step_{step:06d}"
        if not (target / META).is_file():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(d, target)
    return True


def _record_placement(run_dir: Path) -> None:
    """Which Ray node and process ran (each attempt of) this trial, for debugging."""
    import socket

    import ray

    with open(run_dir / "placement.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"node_id": ray.get_runtime_context().get_node_id(),
                            "host": socket.gethostname(), "pid": os.getpid(),
                            "time": time.time()}) + "\n")


def run_listed_trial(config: dict[str, Any], *, configs: list[dict[str, Any]],
                     **kwargs: Any) -> None:
    """Trainable over an explicit list of configs (`config["i"]` picks one): the re-check."""
    run_trial(configs[config["i"]], **kwargs)


@dataclass
class TrialStart:
    """A trial ready to train: its config (data and typed), run dir and watchdog."""

    trial_id: str
    data: dict[str, Any]
    cfg: Any  # trainer.config.TrainConfig
    run_dir: Path
    watchdog: StallWatchdog
    resume: bool


def start_trial(config: dict[str, Any], base: dict[str, Any],
                opts: TrialOptions) -> TrialStart | None:
    """What every trial does before training, solo or in a shared group: build its config,
    replay a run that finished on disk (None: nothing left to train), make the run dir
    agree with Ray's checkpoint, note where it runs."""
    from ray import tune

    from trainer.config import config_from_data

    trial_id = tune.get_context().get_trial_id()
    data = trial_config(base, config, trial_id, opts)
    cfg = config_from_data(data, f"trial {trial_id}")
    run_dir = opts.trials_dir / trial_id
    watchdog = StallWatchdog(opts.stall_timeout_s, run_dir)
    if _replay_finished(cfg, run_dir, opts, watchdog):
        return None
    resume = _restore_checkpoint(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STALL_FILE).unlink(missing_ok=True)
    _record_placement(run_dir)
    return TrialStart(trial_id, data, cfg, run_dir, watchdog, resume)


def run_trial(config: dict[str, Any], *, base: dict[str, Any], inputs: Inputs,
              opts: TrialOptions) -> None:
    """Ray Tune function trainable: one Phase 2 run with the sampled config."""
    import torch

    from trainer.loop import train

    torch.set_num_threads(max(1, int(opts.cpus_per_trial)))
    start = start_trial(config, base, opts)
    if start is None:
        return
    cfg, run_dir, watchdog = start.cfg, start.run_dir, start.watchdog
    watchdog.start()
    log_file = run_dir / "train.log"

    def log(msg: str) -> None:
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(msg + "\n")

    sink = RayReportSink(opts, run_dir, watchdog)
    train(cfg, sink, inputs=inputs, resume=start.resume, console=False, log=log)
