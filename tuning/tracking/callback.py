"""Ray Tune callback that is the sweep's single MLflow writer.

Trials never talk to MLflow: they write each step's record to their run's ``metrics.jsonl``
and ``tune.report`` a result every N optimizer steps. This callback runs in the Ray driver and
hands every operation to a ``BackgroundWriter`` (``tuning.tracking.writer``): the hook records
it in the sweep's pending document and returns, one writer thread writes it through a
``SweepTracker``. For step records the operation is "ship what the trial's ``metrics.jsonl``
holds above the watermark": the file is their one durable copy. A trial blocked in
``tune.report`` waits for the hook, so the hook must not wait for MLflow
(bench/mlflow_logging_cost.py measures both sides).

Pickling: ``Tuner`` pickles its ``RunConfig`` -- callbacks included -- into ``tuner.pkl`` when it
is constructed (ray/tune/impl/tuner_internal.py, ``TunerInternal.__init__`` ->
``pickle.dumps(self.__getstate__())``), and ``Tuner.restore`` takes no new RunConfig: the restored
sweep runs the unpickled copy. So this object holds only plain configuration; the tracker (MLflow
client, SQLAlchemy engine, HTTP session, file descriptors) is created lazily and excluded from
the pickled state.

Hooks never raise: MLflow is bookkeeping, and a tracking bug must not kill a multi-hour sweep
(an exception in a callback aborts the whole Tune loop). Failures are logged instead.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ray.tune import Callback

from tuning.tracking.names import FINAL_LOSS_METRIC, trial_run_name
from tuning.tracking.records import METRICS_FILE
from tuning.tracking.tracker import SweepTracker
from tuning.tracking.writer import BackgroundWriter

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

log = logging.getLogger(__name__)

# Files of a trainer run directory worth keeping with the MLflow run.
RUN_DIR_ARTIFACTS = ("config.resolved.yaml", "trainable.safetensors")
TAG_RUN_DIR = "phase2tune.run_dir"
TAG_END_REASON = "end_reason"
TAG_RECOVERIES = "phase2tune.recoveries"
TAG_ERROR = "phase2tune.error"

_F = TypeVar("_F", bound=Callable[..., Any])


def _never_raise(method: _F) -> _F:
    @functools.wraps(method)
    def wrapper(self: MlflowSweepCallback, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:
            log.exception("MLflow callback %s failed; the sweep continues", method.__name__)
            return None

    return wrapper  # type: ignore[return-value]


class MlflowSweepCallback(Callback):
    """Logs a Ray Tune sweep to MLflow: a parent run for the sweep, a child run per trial.

    Args:
        tracking_uri: MLflow tracking URI; None = embedded SQLite store in ``state_dir``.
        experiment_name: MLflow experiment (created if missing).
        state_dir: where ``mlflow_state.json`` / the pending operations live; keep it with the
            Ray experiment so ``Tuner.restore`` finds the same parent run and watermarks.
        sweep_name: the parent run's name and ``phase2tune.sweep`` tag.
        parent_params / parent_artifacts / parent_tags: logged on the parent run.
        timeout_s: bound on one MLflow write's HTTP wait (see ``SweepTracker``).
        drain_timeout_s: at the sweep's end, wait this long for the writer to catch up; what
            is left stays pending for the next run or ``python -m tuning.sync``.
    """

    def __init__(
        self,
        *,
        tracking_uri: str | None,
        experiment_name: str,
        state_dir: str | Path,
        sweep_name: str,
        parent_params: Mapping[str, Any] | None = None,
        parent_artifacts: Sequence[str | Path] = (),
        parent_tags: Mapping[str, Any] | None = None,
        timeout_s: float = 10.0,
        drain_timeout_s: float = 300.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.state_dir = str(state_dir)
        self.sweep_name = sweep_name
        self.parent_params = dict(parent_params or {})
        self.parent_artifacts = [str(p) for p in parent_artifacts]
        self.parent_tags = dict(parent_tags or {})
        self.timeout_s = float(timeout_s)
        self.drain_timeout_s = float(drain_timeout_s)
        self._reset_runtime()

    # ------------------------------------------------------------------ pickling

    def _reset_runtime(self) -> None:
        self._writer: BackgroundWriter | None = None
        self._reader: SweepTracker | None = None
        self._parent_started = False
        self._started: set[str] = set()
        self._params_done: set[str] = set()
        self._run_dirs: dict[str, str] = {}
        self._last_results: dict[str, dict[str, Any]] = {}
        self._end_reasons: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        config_keys = (
            "tracking_uri",
            "experiment_name",
            "state_dir",
            "sweep_name",
            "parent_params",
            "parent_artifacts",
            "parent_tags",
            "timeout_s",
            "drain_timeout_s",
        )
        return {key: self.__dict__[key] for key in config_keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("drain_timeout_s", 300.0)  # pickled by an older version
        self.__dict__.update(state)
        self._reset_runtime()

    # ------------------------------------------------------------------ tracker access

    @property
    def writer(self) -> BackgroundWriter:
        """The writer thread (and its tracker), created on first use in the driver process."""
        if self._writer is None:
            self._writer = BackgroundWriter(
                lambda: SweepTracker(
                    self.tracking_uri,
                    self.experiment_name,
                    Path(self.state_dir),
                    timeout_s=self.timeout_s,
                    apply_now=False,
                ),
                Path(self.state_dir),
            )
        return self._writer

    @property
    def tracker(self) -> SweepTracker:
        """A tracker to read from: the writer's once it applied everything submitted so far,
        or (no writer running) a fresh one on the same state directory."""
        if self._writer is not None:
            self.flush()
            return self._writer.tracker
        if self._reader is None:
            self._reader = SweepTracker(self.tracking_uri, self.experiment_name,
                                        Path(self.state_dir), timeout_s=self.timeout_s)
        return self._reader

    def _submit(self, method: str, *args: Any) -> None:
        self.writer.submit(method, *args)

    def _ensure_parent(self) -> None:
        if self._parent_started:
            return
        self._submit(
            "start_parent",
            self.sweep_name,
            self.parent_params,
            list(self.parent_artifacts),
            self.parent_tags,
        )
        self._parent_started = True

    def _ensure_trial(self, trial: Trial) -> str:
        trial_id = str(trial.trial_id)
        if trial_id in self._started:
            return trial_id
        self._ensure_parent()
        tags: dict[str, Any] = {}
        experiment_tag = getattr(trial, "experiment_tag", None)
        if experiment_tag:
            tags["phase2tune.experiment_tag"] = experiment_tag
        trial_path = getattr(trial, "path", None)
        if trial_path:
            tags["phase2tune.ray_trial_path"] = trial_path
        tags["phase2tune.ray_trial_name"] = str(trial)
        # Named by what differs between trials: Ray's "run_trial_5601d_00003" made every
        # legend entry of MLflow's charts look the same.
        self._submit("start_trial", trial_id, trial_run_name(swept_values(trial), trial_id),
                     tags)
        self._started.add(trial_id)
        return trial_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the writer applied everything submitted so far (False on timeout)."""
        if self._writer is None:
            return True
        return self._writer.drain(timeout)

    # ------------------------------------------------------------------ Ray Tune hooks

    @_never_raise
    def setup(self, **info: Any) -> None:
        # Before any trial runs, so waiting here costs no trial anything: the parent run
        # (and with SQLite the store) exists from the start, and a store that cannot be
        # written shows up now rather than after the first results.
        self._ensure_parent()
        self.flush(timeout=self.drain_timeout_s)

    @_never_raise
    def on_trial_start(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        # Also called when a retried or restored trial's actor starts: start_trial reuses the
        # child run (state map, then tag lookup) and flips it back to RUNNING.
        trial_id = str(trial.trial_id)
        self._started.discard(trial_id)
        self._ensure_trial(trial)

    @_never_raise
    def on_trial_result(
        self,
        iteration: int,
        trials: list[Trial],
        trial: Trial,
        result: dict[str, Any],
        **info: Any,
    ) -> None:
        trial_id = self._ensure_trial(trial)
        params = result.get("resolved_params")
        if trial_id not in self._params_done and isinstance(params, Mapping):
            # The swept keys under their search.yaml names (``model.lora.r``), flat, so the
            # compare view's parallel-coordinates chart offers exactly the knobs of the sweep.
            self._submit("log_params", trial_id, {**params, **swept_values(trial)})
            self._params_done.add(trial_id)
        last = self._last_results.setdefault(trial_id, {})
        last.update(step=result.get("step"), nan_events=result.get("nan_events"))
        for key in ("loss", "eval_loss"):
            # The trainer's own numbers, not the report's (a mean, worst_loss after a NaN).
            if result.get(f"last_{key}") is not None:
                last[key] = result[f"last_{key}"]
        run_dir = result.get("run_dir")
        if run_dir and self._run_dirs.get(trial_id) != str(run_dir):
            self._run_dirs[trial_id] = str(run_dir)
            self._submit("set_trial_tags", trial_id, {TAG_RUN_DIR: str(run_dir)})
        if result.get("end_reason"):
            self._end_reasons[trial_id] = str(result["end_reason"])
        # The records themselves are in the trial's metrics.jsonl already (written before
        # the report): the writer reads them from there above the watermark, so nothing
        # pending holds a copy. Only up to the reported step: a trial
        # its scheduler stops may have recorded a step past its last result.
        base = self._run_dir(trial)
        if base is not None and isinstance(result.get("step"), int):
            self._submit("ship_metrics", trial_id, str(base / METRICS_FILE), result["step"])

    @_never_raise
    def on_checkpoint(
        self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Any, **info: Any
    ) -> None:
        # Once Ray commits a trial checkpoint, a restore will not re-report the steps before it,
        # so the request to ship them must be durable before the next experiment snapshot: it
        # is pending already; fsync that (one fsync per checkpoint, not per result).
        self.writer.sync_to_disk()

    @_never_raise
    def on_trial_recover(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        trial_id = self._ensure_trial(trial)
        failures = getattr(trial, "num_failures", None)
        if failures is not None:
            self._submit("set_trial_tags", trial_id, {TAG_RECOVERIES: failures})

    @_never_raise
    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        trial_id = str(trial.trial_id)
        if trial_id not in self._started:
            # Ray also "completes" trials that never started (pending ones removed by the
            # search algorithm); they have no child run.
            return
        self._ensure_trial(trial)
        self._log_run_dir_artifacts(trial)
        self._log_final(trial_id)
        # end_reason None at completion: a scheduler/stopper ended it before the trainer did.
        end_reason = self._end_reasons.get(trial_id) or "stopped_by_tune"
        self._submit("finish_trial", trial_id, "FINISHED", {TAG_END_REASON: end_reason})

    @_never_raise
    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        trial_id = self._ensure_trial(trial)
        self._log_run_dir_artifacts(trial)
        self._log_final(trial_id)
        tags: dict[str, Any] = {TAG_END_REASON: self._end_reasons.get(trial_id) or "error"}
        error = _error_text(trial)
        if error:
            tags[TAG_ERROR] = error
        self._submit("finish_trial", trial_id, "FAILED", tags)

    @_never_raise
    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # On Ctrl+C Ray cleans up and calls this with trials still RUNNING/PENDING/PAUSED:
        # those (and so the sweep) are KILLED, and a later Tuner.restore reopens them.
        unfinished = [
            t for t in trials if str(getattr(t, "status", "")) not in ("TERMINATED", "ERROR")
        ]
        for trial in unfinished:
            if str(trial.trial_id) in self._started:
                self._submit("finish_trial", str(trial.trial_id), "KILLED", {})
        failed = sum(1 for t in trials if str(getattr(t, "status", "")) == "ERROR")
        self._ensure_parent()
        self._submit(
            "finish_parent",
            "KILLED" if unfinished else "FINISHED",
            {
                "phase2tune.trials": len(trials),
                "phase2tune.failed_trials": failed,
                "phase2tune.unfinished_trials": len(unfinished),
            },
        )
        self.close()

    def close(self) -> None:
        """Wait (bounded) for the writer, stop it and say what is left for ``tuning.sync``."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        left = writer.pending()
        if left:
            log.info("waiting for %d MLflow operation(s) to be written", left)
        writer.close(self.drain_timeout_s)
        tracker = writer.tracker
        pending = tracker.pending_operations()
        if pending:
            log.warning(
                "MLflow writes left at sweep end (%s): %d operation(s) pending; write them "
                "with: python -m tuning.sync %s",
                tracker.last_outage or "writer still busy",
                pending,
                self.state_dir,
            )
        # A later hook (tests, a restored sweep in this process) starts a fresh writer.
        self._parent_started = False
        self._started.clear()
        self._params_done.clear()

    # ------------------------------------------------------------------ helpers

    def _log_final(self, trial_id: str) -> None:
        """The last report's numbers as ``final/*`` metrics (one point per run, for the
        compare view; the sweep's report adds the verdict once it is known)."""
        last = self._last_results.get(trial_id)
        if not last or last.get("step") is None:
            return
        # A trial that hit a NaN gets no final loss: its last finite loss would rank it among
        # the best in the runs table, which the link sorts by final loss.
        clean = not last.get("nan_events")
        self._submit("log_final_metrics", trial_id, {
            FINAL_LOSS_METRIC: last.get("loss") if clean else None,
            "final/eval_loss": last.get("eval_loss") if clean else None,
            "final/nan_events": last.get("nan_events"),
            "final/steps": last.get("step"),
        }, int(last["step"]))

    def _run_dir(self, trial: Trial) -> Path | None:
        """The trial's trainer run directory as the driver sees it (None before a report)."""
        run_dir = self._run_dirs.get(str(trial.trial_id))
        if run_dir is None:
            last = getattr(trial, "last_result", None) or {}
            run_dir = last.get("run_dir") if isinstance(last, Mapping) else None
        if not run_dir:
            return None
        base = Path(run_dir)
        if not base.is_absolute():
            # Ray workers chdir into the trial directory, so a relative run_dir is relative to
            # it; fall back to the driver's cwd.
            trial_path = getattr(trial, "local_path", None)
            candidate = Path(trial_path) / base if trial_path else None
            base = candidate if candidate is not None and candidate.exists() else base.resolve()
        return base

    def _log_run_dir_artifacts(self, trial: Trial) -> None:
        trial_id = str(trial.trial_id)
        base = self._run_dir(trial)
        if base is None:
            return
        for name in RUN_DIR_ARTIFACTS:
            path = base / name
            if path.is_file():
                self._submit("log_artifact", trial_id, str(path))


def swept_values(trial: Trial) -> dict[str, Any]:
    """The trial's sampled values under their search.yaml keys (scalars only)."""
    config = getattr(trial, "config", None) or {}
    return {str(k): v for k, v in config.items()
            if v is None or isinstance(v, bool | int | float | str)}


def _error_text(trial: Trial) -> str | None:
    getter = getattr(trial, "get_error", None)
    if getter is None:
        return None
    try:
        error = getter()
    except Exception:  # reading the error file is best effort
        return None
    if not error:
        return None
    text = str(error).strip()
    return text[-2000:]  # the end of a traceback says what went wrong
