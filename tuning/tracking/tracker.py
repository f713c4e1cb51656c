"""MLflow bookkeeping for a Phase 2 sweep: one parent run, one child run per Ray trial.

Why it looks like this:

* One writer. Only the Ray driver (through ``tuning.tracking.callback``) talks to MLflow, so an
  embedded SQLite store never sees concurrent writers (SQLite's "database is locked" trap).
* ``MlflowClient`` only, never the fluent ``mlflow.*`` API: the fluent API keeps a process-global
  active-run stack that is wrong as soon as several trials are tracked from one process.
* Exactly-once metrics. A restored sweep or a retried trial re-reports steps it already reported;
  each child keeps a watermark (highest step logged), persisted in ``mlflow_state.json`` after every
  successful write and mirrored in the run's ``phase2tune.logged_through_step`` tag, so a record
  with ``step <= watermark`` is dropped even if the local state file was lost.
* One durable copy of a step record. A sweep's records are in each trial's ``metrics.jsonl``
  (the trainer's file); ``ship_metrics`` reads the file above the watermark, so nothing here
  keeps records of its own. ``log_records`` takes records from the caller instead (tests, a
  script logging without a run directory).
* Asked for, then written. Every operation first goes to the state directory's pending
  document (``tuning.tracking.pending``: one keyed entry per kind and run, so a ship request
  for a trial is one entry however many reports ask; durable before the call returns), then
  is written and removed from it. A write that fails with a connection error/timeout leaves
  it there; later calls retry with backoff, in the order things were asked for, and
  ``python -m tuning.sync SWEEP_DIR`` writes what is left after the fact. Every operation is
  idempotent (watermarks, tag lookups, identical params), so writing one twice is safe.
  A tracker built with ``apply_now=False`` only records (the driver's hooks must not wait
  for MLflow) and leaves the writing to ``catch_up`` on another thread.
* Every HTTP wait is bounded through MLflow's own environment variables (checked in
  ``mlflow/environment_variables.py`` of mlflow 3.x: ``MLFLOW_HTTP_REQUEST_TIMEOUT``,
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``,
  ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER``; they are read per request, so setting them late works).

The module's neighbours do the rest: ``runs`` applies each operation to the store,
``records`` reads step records from a trial's ``metrics.jsonl``, ``pending`` keeps what is
not written yet, ``state`` the state file, ``store`` opens the store, ``values`` cleans values and
keys, ``names`` holds the tag names, ``errors`` classifies failures, ``provenance`` says what
produced a run. What is left here (over 500 lines) is one class: its public operations and
the lock, state and pending flow they all share; split further, one class would be spread
over files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from tuning.tracking.errors import (
    TrackingError,
    bound_http_waits,
    classify_error,
    short_reason,
)
from tuning.tracking.pending import PendingOps, ReplayReport
from tuning.tracking.provenance import runtime_tags
from tuning.tracking.records import metric_rows, nan_event_rows
from tuning.tracking.runs import RunWriter
from tuning.tracking.state import (
    LOCK_FILE,
    RECOVER_KEY,
    STATE_FILE,
    read_state,
    save_state,
    state_problem,
    store_section,
    trial_section,
)
from tuning.tracking.store import artifact_location, check_reachable, create_embedded_store
from tuning.tracking.values import clean_key, finite_number, flatten_params, tag_value

log = logging.getLogger(__name__)

# Retry backoff (seconds) after a failed write; doubles up to the cap.
_BACKOFF_START_S = 2.0
_BACKOFF_MAX_S = 60.0
# A pending operation that got an error *answer* (HTTP 5xx) this many times is rejected:
# the server is up, so it is this operation that is wrong. Connection errors never count.
_MAX_SERVER_ERROR_ATTEMPTS = 5

RunEndStatus = Literal["FINISHED", "FAILED", "KILLED"]
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")


def _now_ms() -> int:
    return int(time.time() * 1000)


class SweepTracker:
    """Typed, outage-tolerant wrapper over ``mlflow.tracking.MlflowClient`` for one sweep.

    All public methods are safe to call while the store is down: the operation stays pending
    and the call returns. They raise only ``TrackingError`` for misuse (e.g. trial operations
    before ``start_parent``). Thread-safe within a process, and serialised across processes
    through file locks in ``state_dir`` (the driver and ``python -m tuning.sync`` may overlap).
    With ``apply_now=False`` the operations are only recorded (in microseconds to a
    millisecond, never waiting on the store or on a write in progress); ``catch_up`` writes.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        experiment_name: str,
        state_dir: Path,
        *,
        timeout_s: float = 10.0,
        apply_now: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.embedded = tracking_uri is None
        self.tracking_uri = (
            f"sqlite:///{self.state_dir / 'mlflow.db'}" if tracking_uri is None else tracking_uri
        )
        self.experiment_name = experiment_name
        self.timeout_s = float(timeout_s)
        self.apply_now = apply_now
        bound_http_waits(self.timeout_s)
        self._client: Any = None
        self._rlock = threading.RLock()
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._state: dict[str, Any] = {}
        # Trials whose run tags were read back in this process (watermark reconciliation).
        self._reconciled: set[str] = set()
        self._next_retry_at = 0.0
        self._backoff_s = _BACKOFF_START_S
        self._last_outage: str | None = None
        self._pending = PendingOps(self.state_dir)
        with self._locked():
            if not self._state.get("experiment_name"):
                self._state["experiment_name"] = experiment_name
                self._state["tracking_uri"] = self.tracking_uri
                self._state["embedded"] = self.embedded
                self._save_state()

    # ------------------------------------------------------------------ paths & client

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def pending_path(self) -> Path:
        return self._pending.path

    @property
    def rejected_path(self) -> Path:
        return self._pending.rejected_path

    @property
    def artifact_location(self) -> str | None:
        """Where runs of this store keep artifacts (None: the server decides)."""
        return artifact_location(self.tracking_uri, self.state_dir)

    @property
    def client(self) -> Any:
        """The ``MlflowClient``, created on first use (SQLite creation runs migrations: ~3 s)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.embedded:
                create_embedded_store(self.state_dir / "mlflow.db", self.artifact_location)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def last_outage(self) -> str | None:
        """Reason of the latest failed write, None once everything pending was written."""
        return self._last_outage

    def check_reachable(self) -> None:
        """Fail in well under 10 s with ``TrackingUnavailable`` when the store cannot be used."""
        check_reachable(self.tracking_uri, self.timeout_s, lambda: self.client)

    # ------------------------------------------------------------------ public API

    def start_parent(
        self,
        sweep_name: str,
        params: Mapping[str, Any],
        artifacts: Sequence[Path] = (),
        tags: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Create (or, for a restored sweep, reuse) the sweep's parent run; return its id.

        Returns None when the store is unreachable (the creation stays pending), or before
        ``catch_up`` with ``apply_now=False``. One state_dir holds exactly one sweep: a
        different ``sweep_name`` there is an error.
        """
        known = self._sweep_name()
        if known is not None and known != sweep_name:
            raise TrackingError(
                f"{self.state_dir} already tracks sweep {known!r}, "
                f"not {sweep_name!r}; use a fresh state directory per sweep"
            )
        self._submit({
            "op": "start_parent",
            "sweep_name": sweep_name,
            # The uid (not the name) identifies the parent: sweep names get reused. Used only
            # by the first start that is written; a state rebuilt after damage takes the uid
            # of the parent found by name (_ensure_parent), so the sweep keeps its one parent.
            "uid": uuid.uuid4().hex,
            "params": flatten_params(params),
            "artifacts": [str(Path(p).resolve()) for p in artifacts],
            "tags": {clean_key(k): tag_value(v) for k, v in (tags or {}).items()},
            "runtime_tags": runtime_tags(),
        })
        # Recording only: the state lock may be held by a write in progress.
        return self.parent_run_id if self.apply_now else None

    @property
    def sweep_uid(self) -> str | None:
        """The sweep's own id (its parent run's ``phase2tune.sweep_uid`` tag)."""
        with self._locked():
            return (self._state.get("sweep") or {}).get("uid")

    @property
    def experiment_id(self) -> str | None:
        """The experiment's id in this store once created (None before the first write)."""
        with self._locked():
            return self._store().get("experiment_id")

    @property
    def parent_run_id(self) -> str | None:
        with self._locked():
            return self._store().get("parent_run_id")

    def start_trial(
        self, trial_id: str, run_name: str | None = None, tags: Mapping[str, Any] | None = None
    ) -> str | None:
        """Create or reuse the child run of ``trial_id``; return its id (None while pending)."""
        self._require_sweep()
        self._submit({"op": "start_trial", "trial_id": trial_id, "run_name": run_name,
                      "tags": {clean_key(k): tag_value(v) for k, v in (tags or {}).items()}})
        return self.run_id_of(trial_id) if self.apply_now else None

    def run_id_of(self, trial_id: str) -> str | None:
        with self._locked():
            return self._trial_state(trial_id).get("run_id")

    def log_params(self, trial_id: str, params: Mapping[str, Any]) -> None:
        """Log the trial's resolved knobs once (stringified; None -> "none")."""
        self._require_trial(trial_id)
        self._submit({"op": "params", "trial_id": trial_id, "params": flatten_params(params)})

    def log_records(
        self,
        trial_id: str,
        records: Sequence[Mapping[str, Any]],
        nan_events: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Log per-step records (step = optimizer step) exactly once.

        Records at or below the trial's watermark are dropped. Non-finite values are never
        logged as metrics: they set the ``first_nonfinite_step``/``first_nan_group`` tags and
        count into the ``nan_events`` tag. None means "not measured" and is simply skipped.
        """
        rows = metric_rows(trial_id, records, _now_ms())
        events = nan_event_rows(trial_id, nan_events)
        if not rows and not events:
            return
        self._require_trial(trial_id)
        self._submit({"op": "metrics", "trial_id": trial_id, "rows": rows, "events": events})

    def ship_metrics(self, trial_id: str, path: Path, through: int) -> None:
        """Log the step records in ``path`` (the trial's ``metrics.jsonl``) above the trial's
        watermark up to step ``through``, exactly once, like ``log_records`` (which takes
        them from the caller).

        ``through`` is the last step the trial reported: a trainer may have recorded a step
        or two more before its scheduler stopped it, and those were never results.
        What waits during an outage is the request, not the records: writing it reads the
        file again. A request already waiting for the trial is extended, not repeated.
        """
        self._require_trial(trial_id)
        self._submit({"op": "ship", "trial_id": trial_id,
                      "path": str(Path(path).resolve()), "through": int(through)})

    def log_final_metrics(self, trial_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Per-trial results known only at the end (final loss, verdict as a number, ...).

        Logged at ``step`` (the trial's last step) so they line up with the step metrics; they
        are what MLflow's parallel-coordinates and scatter charts plot against the params.
        Non-finite and None values are skipped, as for step records.
        """
        clean = {clean_key(k): n for k, v in metrics.items()
                 if (n := finite_number(v)) is not None}
        if not clean:
            return
        self._require_trial(trial_id)
        self._submit({"op": "final_metrics", "trial_id": trial_id, "metrics": clean,
                      "step": int(step)})

    def watermark(self, trial_id: str) -> int:
        """Highest optimizer step stored for the trial in this tracking store (0 if none)."""
        with self._locked():
            return int(self._trial_state(trial_id).get("watermark", 0))

    def set_trial_tags(self, trial_id: str, tags: Mapping[str, Any]) -> None:
        if not tags:
            return
        self._require_trial(trial_id)
        self._submit({"op": "tags", "trial_id": trial_id, "tags": self._clean_tags(tags)})

    def set_parent_tags(self, tags: Mapping[str, Any]) -> None:
        if not tags:
            return
        self._require_sweep()
        self._submit({"op": "tags", "trial_id": None, "tags": self._clean_tags(tags)})

    def finish_trial(
        self, trial_id: str, status: RunEndStatus, tags: Mapping[str, Any] | None = None
    ) -> None:
        """Terminate the trial's child run with FINISHED, FAILED or KILLED."""
        if status not in _END_STATUSES:
            raise TrackingError(f"status must be one of {_END_STATUSES}, not {status!r}")
        self._require_trial(trial_id)
        self._submit({"op": "finish_trial", "trial_id": trial_id, "status": status,
                      "tags": self._clean_tags(tags or {}), "end_ms": _now_ms()})

    def finish_parent(self, status: RunEndStatus, tags: Mapping[str, Any] | None = None) -> None:
        if status not in _END_STATUSES:
            raise TrackingError(f"status must be one of {_END_STATUSES}, not {status!r}")
        self._require_sweep()
        self._submit({"op": "finish_parent", "status": status,
                      "tags": self._clean_tags(tags or {}), "end_ms": _now_ms()})

    def kill_running(self) -> None:
        """Mark every RUNNING child of this sweep, and the parent, KILLED (on interrupt)."""
        if self._sweep_name() is None and not self._state.get(RECOVER_KEY):
            return
        self._submit({"op": "kill_running", "end_ms": _now_ms()})

    def log_artifact(
        self, trial_id: str | None, path: Path, artifact_path: str | None = None
    ) -> None:
        """Upload a file (or directory) to the trial's run, or to the parent when None."""
        if trial_id is None:
            self._require_sweep()
        else:
            self._require_trial(trial_id)
        self._submit({"op": "artifact", "trial_id": trial_id, "path": str(Path(path).resolve()),
                      "artifact_path": artifact_path})

    def pending_operations(self) -> int:
        """Operations asked for and not written yet."""
        return self._pending.count()

    def sync_to_disk(self) -> None:
        """fsync what is pending: it survives a machine crash too, not only a process's."""
        self._pending.sync()

    def catch_up(self, force: bool = False) -> ReplayReport:
        """Write what is pending, in the order it was asked for, unless a failed write's
        backoff has not elapsed (``force`` ignores it); cheap when nothing is pending."""
        with self._locked():
            if not self._pending.count():
                self._note_success()
                return ReplayReport()
            if not force and time.monotonic() < self._next_retry_at:
                return ReplayReport(remaining=self._pending.count(), error=self._last_outage)
            return self._write_pending()

    def close(self) -> None:
        """Drop the client (its SQLAlchemy engine/HTTP session). The tracker can be reused."""
        with self._rlock:
            self._client = None
        self._pending.close()

    # ------------------------------------------------------------------ state & locking

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Process lock + file lock; (re)loads the state file on the outermost entry so a
        concurrent ``tuning.sync`` (or a second tracker on the same directory) is seen."""
        with self._rlock:
            if self._lock_depth == 0:
                fd = os.open(self.state_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
                try:
                    self._state = self._read_state()
                except BaseException:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
                    self._lock_fd = None
                    raise
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                    os.close(self._lock_fd)
                    self._lock_fd = None

    def _read_state(self) -> dict[str, Any]:
        return read_state(self.state_path, self._has_history())

    def _has_history(self) -> bool:
        """Something in state_dir says this sweep wrote to its store before (the state file
        is lost): a new sweep's tracker saves its state before anything is asked for."""
        return self._pending.exists() or (self.state_dir / "mlflow.db").exists()

    def _save_state(self) -> None:
        save_state(self.state_path, self._state)

    def _store(self) -> dict[str, Any]:
        return store_section(self._state, self.tracking_uri)

    def _trial_state(self, trial_id: str) -> dict[str, Any]:
        return trial_section(self._state, self.tracking_uri, trial_id)

    def _sweep_name(self) -> str | None:
        """The sweep this state directory tracks: written, or asked for (None: neither).
        Read without the state lock, which a write in progress may hold for seconds."""
        if self._state.get("sweep"):
            return str(self._state["sweep"]["name"])
        for op in self._pending.entries():
            if op["op"] == "start_parent":
                return str(op["sweep_name"])
        sweep = self._state_on_disk().get("sweep")
        return str(sweep["name"]) if sweep else None

    def _state_on_disk(self) -> dict[str, Any]:
        """The state file as another process may have saved it since this one last read it
        (saved atomically, so readable without the lock; never assigned to ``_state``, which
        a write in progress may be changing); empty when unreadable."""
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) and state_problem(state) is None else {}

    def _require_sweep(self) -> None:
        # A state rebuilt after damage finds its parent when the next operation is written.
        if self._sweep_name() is None and not self._state.get(RECOVER_KEY):
            raise TrackingError("start_parent() must be called before anything else")

    def _require_trial(self, trial_id: str) -> None:
        self._require_sweep()
        if self._state.get(RECOVER_KEY):
            return  # its start_trial may have been recorded in the lost state
        if trial_id in self._state.get("trials", {}):
            return
        if any(op["op"] == "start_trial" and op.get("trial_id") == trial_id
               for op in self._pending.entries()):
            return
        if trial_id not in self._state_on_disk().get("trials", {}):
            raise TrackingError(f"start_trial({trial_id!r}) was not called")

    @staticmethod
    def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
        return {clean_key(k): tag_value(v) for k, v in tags.items() if v is not None}

    # ------------------------------------------------------------------ pending operations

    def _note_failure(self, exc: BaseException) -> None:
        self._last_outage = short_reason(exc)
        self._next_retry_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, _BACKOFF_MAX_S)

    def _note_success(self) -> None:
        self._last_outage = None
        self._next_retry_at = 0.0
        self._backoff_s = _BACKOFF_START_S

    def _submit(self, op: dict[str, Any]) -> None:
        """Record ``op`` as pending (durable on return), then write it unless recording only."""
        op.setdefault("ts_ms", _now_ms())
        self._pending.add(op)
        if self.apply_now:
            self.catch_up()

    def _write_pending(self) -> ReplayReport:
        """Write the pending entries in order (lock held); stop at the first that fails for
        an outage or a retryable server error: what follows it waits behind it."""
        report = ReplayReport()
        for op in self._pending.entries():
            try:
                self._apply(op, report)
            except Exception as exc:
                kind = classify_error(exc)
                errors = (self._pending.note_server_error(op["key"], op["seq"])
                          if kind == "server" else 0)
                if kind == "permanent" or (
                        kind == "server" and errors >= _MAX_SERVER_ERROR_ATTEMPTS):
                    self._pending.reject(op, exc)
                    report.rejected += 1
                    continue
                if self._last_outage is None:
                    log.warning("MLflow write failed (%s); kept in %s and retried with backoff",
                                short_reason(exc), self.pending_path)
                self._note_failure(exc)
                report.remaining = self._pending.count()
                report.error = self._last_outage
                return report
            self._pending.done(op["key"], op["seq"])
            report.applied += 1
            report.ops[op["op"]] += 1
        self._note_success()
        report.remaining = self._pending.count()
        return report

    def _apply(self, op: dict[str, Any], report: ReplayReport) -> None:
        """Write one operation: what its start fixes in the state first, then the store."""
        kind = op["op"]
        if kind == "start_parent":
            sweep = self._state.get("sweep")
            if sweep and sweep["name"] != op["sweep_name"]:
                raise TrackingError(f"{self.state_dir} already tracks sweep {sweep['name']!r}, "
                                    f"not {op['sweep_name']!r}")
            if not sweep:
                uid = None if self._state.get(RECOVER_KEY) else op["uid"]
                self._state["sweep"] = {"name": op["sweep_name"], "uid": uid}
                self._save_state()
        elif not self._state.get("sweep"):
            if self._state.get(RECOVER_KEY):
                self._writer().adopt_newest_parent()
            if not self._state.get("sweep"):
                raise TrackingError(f"{kind} before the sweep's start_parent was written")
        trials = self._state.setdefault("trials", {})
        trial_id = op.get("trial_id")
        if kind == "start_trial":
            spec = trials.setdefault(trial_id, {})
            spec["run_name"] = op.get("run_name") or spec.get("run_name") or trial_id
            spec["tags"] = {**spec.get("tags", {}), **op.get("tags", {})}
            self._save_state()
        elif trial_id is not None and trial_id not in trials:
            if not self._state.get(RECOVER_KEY):
                raise TrackingError(f"{kind} for trial {trial_id!r}, which was never started")
            trials[trial_id] = {"run_name": trial_id, "tags": {}}
            self._save_state()
        self._writer().apply(op, report)

    # ------------------------------------------------------------------ applying operations

    def _writer(self) -> RunWriter:
        """How operations reach the store, over this tracker's current state (held lock)."""
        return RunWriter(self.client, self._state, self.tracking_uri, self.experiment_name,
                         self.artifact_location, self._save_state, self._reconciled)

