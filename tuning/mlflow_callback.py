"""Ray Tune callback that is the sweep's single MLflow writer.

Trials never talk to MLflow: they ``tune.report`` a result every N optimizer steps holding all
per-step records since their last report. This callback runs in the Ray driver, buffers those
records and hands them to a ``SweepTracker`` in batches.

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
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ray.tune import Callback

from tuning.tracking import SweepTracker

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
        state_dir: where ``mlflow_state.json`` / the outage journal live; keep it with the
            Ray experiment so ``Tuner.restore`` finds the same parent run and watermarks.
        sweep_name: the parent run's name and ``phase2tune.sweep`` tag.
        parent_params / parent_artifacts / parent_tags: logged on the parent run.
        flush_every: flush after this many results (over all trials) ...
        flush_seconds: ... or when this long has passed since the last flush.
        timeout_s: bound on one MLflow write's HTTP wait (see ``SweepTracker``).
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
        flush_every: int = 10,
        flush_seconds: float = 30.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.state_dir = str(state_dir)
        self.sweep_name = sweep_name
        self.parent_params = dict(parent_params or {})
        self.parent_artifacts = [str(p) for p in parent_artifacts]
        self.parent_tags = dict(parent_tags or {})
        self.flush_every = max(1, int(flush_every))
        self.flush_seconds = float(flush_seconds)
        self.timeout_s = float(timeout_s)
        self._reset_runtime()

    # ------------------------------------------------------------------ pickling

    def _reset_runtime(self) -> None:
        self._tracker: SweepTracker | None = None
        self._parent_started = False
        self._started: set[str] = set()
        self._params_done: set[str] = set()
        self._run_dirs: dict[str, str] = {}
        self._end_reasons: dict[str, str] = {}
        # trial_id -> {step: record}; a dict so a re-reported step inside one buffer is kept once
        self._pending: dict[str, dict[int, Mapping[str, Any]]] = {}
        self._pending_events: dict[str, list[Mapping[str, Any]]] = {}
        self._results_since_flush = 0
        self._last_flush = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        config_keys = (
            "tracking_uri",
            "experiment_name",
            "state_dir",
            "sweep_name",
            "parent_params",
            "parent_artifacts",
            "parent_tags",
            "flush_every",
            "flush_seconds",
            "timeout_s",
        )
        return {key: self.__dict__[key] for key in config_keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    # ------------------------------------------------------------------ tracker access

    @property
    def tracker(self) -> SweepTracker:
        """The tracker, created on first use in the driver process."""
        if self._tracker is None:
            self._tracker = SweepTracker(
                self.tracking_uri,
                self.experiment_name,
                Path(self.state_dir),
                timeout_s=self.timeout_s,
            )
        return self._tracker

    def _ensure_parent(self) -> None:
        if self._parent_started:
            return
        self.tracker.start_parent(
            self.sweep_name,
            self.parent_params,
            [Path(p) for p in self.parent_artifacts],
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
        self.tracker.start_trial(trial_id, run_name=str(trial), tags=tags)
        self._started.add(trial_id)
        return trial_id

    # ------------------------------------------------------------------ buffering

    def flush(self) -> None:
        """Send every buffered record to the tracker (which batches, dedups and journals)."""
        pending, events = self._pending, self._pending_events
        self._pending, self._pending_events = {}, {}
        for trial_id in sorted(set(pending) | set(events)):
            records = pending.get(trial_id, {})
            self.tracker.log_records(
                trial_id,
                [records[step] for step in sorted(records)],
                events.get(trial_id, []),
            )
        self._results_since_flush = 0
        self._last_flush = time.monotonic()
        if self._tracker is not None:
            self._tracker.retry_journal()  # drains an outage backlog even when nothing is new

    def _flush_if_due(self) -> None:
        due_by_count = self._results_since_flush >= self.flush_every
        due_by_time = time.monotonic() - self._last_flush >= self.flush_seconds
        if due_by_count or (due_by_time and (self._pending or self._pending_events)):
            self.flush()
        elif due_by_time and self._tracker is not None:
            self._last_flush = time.monotonic()
            self._tracker.retry_journal()

    # ------------------------------------------------------------------ Ray Tune hooks

    @_never_raise
    def setup(self, **info: Any) -> None:
        self._ensure_parent()

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
            self.tracker.log_params(trial_id, params)
            self._params_done.add(trial_id)
        run_dir = result.get("run_dir")
        if run_dir and self._run_dirs.get(trial_id) != str(run_dir):
            self._run_dirs[trial_id] = str(run_dir)
            self.tracker.set_trial_tags(trial_id, {TAG_RUN_DIR: str(run_dir)})
        if result.get("end_reason"):
            self._end_reasons[trial_id] = str(result["end_reason"])
        buffer = self._pending.setdefault(trial_id, {})
        for record in result.get("records") or ():
            try:
                step = int(record["step"])
            except (KeyError, TypeError, ValueError):
                log.warning("trial %s: record without an integer step dropped", trial_id)
                continue
            buffer.setdefault(step, dict(record))
        if not buffer:
            del self._pending[trial_id]
        new_events = result.get("new_nan_events") or ()
        if new_events:
            self._pending_events.setdefault(trial_id, []).extend(dict(e) for e in new_events)
        self._results_since_flush += 1
        self._flush_if_due()

    @_never_raise
    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        # Runs every Tune loop iteration: lets time-based flushes happen between results.
        self._flush_if_due()

    @_never_raise
    def on_checkpoint(
        self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Any, **info: Any
    ) -> None:
        # Once Ray commits a trial checkpoint, a restore will not re-report the steps before it,
        # so those steps must be stored (or journaled, fsync'd) before the next experiment
        # snapshot; flushing here guarantees that.
        self.flush()

    @_never_raise
    def on_trial_recover(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        trial_id = self._ensure_trial(trial)
        self.flush()
        failures = getattr(trial, "num_failures", None)
        if failures is not None:
            self.tracker.set_trial_tags(trial_id, {TAG_RECOVERIES: failures})

    @_never_raise
    def on_trial_complete(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        trial_id = str(trial.trial_id)
        if trial_id not in self._started and trial_id not in self._pending:
            # Ray also "completes" trials that never started (pending ones removed by the
            # search algorithm); they have no child run.
            return
        self._ensure_trial(trial)
        self.flush()
        self._log_run_dir_artifacts(trial)
        # end_reason None at completion: a scheduler/stopper ended it before the trainer did.
        end_reason = self._end_reasons.get(trial_id) or "stopped_by_tune"
        self.tracker.finish_trial(trial_id, "FINISHED", {TAG_END_REASON: end_reason})

    @_never_raise
    def on_trial_error(
        self, iteration: int, trials: list[Trial], trial: Trial, **info: Any
    ) -> None:
        trial_id = self._ensure_trial(trial)
        self.flush()
        self._log_run_dir_artifacts(trial)
        tags: dict[str, Any] = {TAG_END_REASON: self._end_reasons.get(trial_id) or "error"}
        error = _error_text(trial)
        if error:
            tags[TAG_ERROR] = error
        self.tracker.finish_trial(trial_id, "FAILED", tags)

    @_never_raise
    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.flush()
        # On Ctrl+C Ray cleans up and calls this with trials still RUNNING/PENDING/PAUSED:
        # those (and so the sweep) are KILLED, and a later Tuner.restore reopens them.
        unfinished = [
            t for t in trials if str(getattr(t, "status", "")) not in ("TERMINATED", "ERROR")
        ]
        for trial in unfinished:
            if str(trial.trial_id) in self._started:
                self.tracker.finish_trial(str(trial.trial_id), "KILLED")
        failed = sum(1 for t in trials if str(getattr(t, "status", "")) == "ERROR")
        self._ensure_parent()
        self.tracker.finish_parent(
            "KILLED" if unfinished else "FINISHED",
            {
                "phase2tune.trials": len(trials),
                "phase2tune.failed_trials": failed,
                "phase2tune.unfinished_trials": len(unfinished),
            },
        )
        pending = self.tracker.pending_operations()
        if pending:
            log.warning(
                "MLflow unreachable at sweep end (%s): %d operation(s) wait in %s; "
                "replay with: python -m tuning.sync %s",
                self.tracker.last_outage,
                pending,
                self.tracker.journal_path,
                self.state_dir,
            )

    # ------------------------------------------------------------------ helpers

    def _log_run_dir_artifacts(self, trial: Trial) -> None:
        trial_id = str(trial.trial_id)
        run_dir = self._run_dirs.get(trial_id)
        if run_dir is None:
            last = getattr(trial, "last_result", None) or {}
            run_dir = last.get("run_dir") if isinstance(last, Mapping) else None
        if not run_dir:
            return
        base = Path(run_dir)
        if not base.is_absolute():
            # Ray workers chdir into the trial directory, so a relative run_dir is relative to
            # it; fall back to the driver's cwd.
            trial_path = getattr(trial, "local_path", None)
            candidate = Path(trial_path) / base if trial_path else None
            base = candidate if candidate is not None and candidate.exists() else base.resolve()
        for name in RUN_DIR_ARTIFACTS:
            path = base / name
            if path.is_file():
                self.tracker.log_artifact(trial_id, path)


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
