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
* Outages never stop training. A write that fails with a connection error/timeout goes to an
  append-only, fsync'd journal (``mlflow_journal.jsonl``); later flushes retry it with backoff and
  replay it in order. ``python -m tuning.sync SWEEP_DIR`` replays it after the fact. Every
  operation is idempotent (watermarks, tag lookups, identical params), so replaying twice is safe.
* Every HTTP wait is bounded through MLflow's own environment variables (checked in
  ``mlflow/environment_variables.py`` of mlflow 3.x: ``MLFLOW_HTTP_REQUEST_TIMEOUT``,
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``,
  ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER``; they are read per request, so setting them late works).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import numbers
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

STATE_FILE = "mlflow_state.json"
JOURNAL_FILE = "mlflow_journal.jsonl"
# Operations the store refused for good (bad value, deleted run, ...): kept for a human to read,
# never retried, so one poisoned operation cannot block the journal forever.
REJECTED_FILE = "mlflow_journal.rejected.jsonl"
LOCK_FILE = ".mlflow_state.lock"
STATE_VERSION = 1
# Set in a state rebuilt after mlflow_state.json was lost or damaged: runs are then found
# by their tags, and trials whose start the lost state recorded are taken as started.
RECOVER_KEY = "recovered"
_WARNED: set[Path] = set()  # state files already reported damaged by this process

TAG_SWEEP = "phase2tune.sweep"
TAG_SWEEP_UID = "phase2tune.sweep_uid"
TAG_ROLE = "phase2tune.role"
TAG_TRIAL_ID = "phase2tune.trial_id"
TAG_STATUS = "phase2tune.status"
TAG_LOGGED_THROUGH = "phase2tune.logged_through_step"
TAG_CODE_VERSION = "phase2tune.code_version"
TAG_FIRST_NONFINITE_STEP = "first_nonfinite_step"
TAG_FIRST_NAN_GROUP = "first_nan_group"
TAG_NAN_EVENTS = "nan_events"
TAG_PARENT_RUN_ID = "mlflow.parentRunId"  # mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
FINAL_LOSS_METRIC = "final/loss"  # logged once per trial when it ends (runs_link sorts by it)

# mlflow/utils/validation.py: MAX_METRICS_PER_BATCH = 1000, MAX_PARAMS_TAGS_PER_BATCH = 100,
# MAX_ENTITIES_PER_BATCH = 1000 (metrics + params + tags together). A few tags ride along with
# each metric chunk, hence the headroom.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
_METRICS_PER_CHUNK = MAX_METRICS_PER_BATCH - 10
_MAX_PARAM_VALUE_LEN = 6000  # MAX_PARAM_VAL_LENGTH
_MAX_TAG_VALUE_LEN = 8000  # MAX_TAG_VAL_LENGTH

# Journal retry backoff (seconds) after a failed write; doubles up to the cap.
_BACKOFF_START_S = 2.0
_BACKOFF_MAX_S = 60.0
# A journaled operation that got an error *answer* (HTTP 5xx) this many times is rejected:
# the server is up, so it is this operation that is wrong. Connection errors never count.
_MAX_SERVER_ERROR_ATTEMPTS = 5

RunEndStatus = Literal["FINISHED", "FAILED", "KILLED"]
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")
_RETRYABLE_MLFLOW_CODES = frozenset(
    {
        "INTERNAL_ERROR",
        "TEMPORARILY_UNAVAILABLE",
        "REQUEST_LIMIT_EXCEEDED",
        "DEADLINE_EXCEEDED",
        "ABORTED",
    }
)
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


class TrackingError(RuntimeError):
    """The tracker was used wrongly, or the store refused something for good."""


class TrackingUnavailable(TrackingError):
    """The tracking server/store cannot be reached."""


def bound_http_waits(timeout_s: float) -> None:
    """Bound every MLflow HTTP call of this process to roughly ``timeout_s`` seconds in total.

    One attempt waits at most ``timeout_s / 2`` for connect and for each read, with one quick
    retry (urllib3 sleeps 0 s before a first retry), so a dead or silent server costs one write
    about ``timeout_s``; the journal then takes over. MLflow's defaults (120 s, 7 retries with
    exponential backoff) would freeze the Ray driver loop for minutes.
    """
    per_attempt = max(1, int(timeout_s // 2))  # the variable is parsed as int
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(per_attempt)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"  # int-typed in mlflow
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = "0.5"


def stringify_param(value: Any) -> str:
    """The one spelling of a parameter value, so every child compares equal in the MLflow UI."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, str):
        text = value
    elif isinstance(value, Path):
        text = str(value)
    elif isinstance(value, list | tuple | set | dict):
        text = json.dumps(
            sorted(value, key=str) if isinstance(value, set) else value,
            sort_keys=True,
            default=str,
        )
    else:
        text = str(value)
    return text[:_MAX_PARAM_VALUE_LEN]


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts become dotted keys; every value becomes a string via ``stringify_param``."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = _clean_key(f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            out[name] = stringify_param(value)
    return out


# Short names for run names and table headers; other keys use their last dotted part(s).
SHORT_KEYS = {
    "learning_rate": "lr",
    "gradient_clip_val": "clip",
    "projector_lr_mult": "proj_mult",
    "lora_lr_mult": "lora_mult",
    "projector_lr": "proj_lr",
    "warmup_steps": "warmup",
    "weight_decay": "wd",
    "gradient_accumulation_steps": "accum",
}


def short_key(key: str) -> str:
    """``learning_rate`` -> ``lr``; ``model.lora.r`` -> ``lora.r`` (two last parts)."""
    parts = str(key).split(".")
    if parts[0] == "phase2":
        parts = parts[1:]
    name = ".".join(parts[-2:]) if len(parts) > 1 else parts[0]
    return SHORT_KEYS.get(name, name)


def short_value(value: Any) -> str:
    """A compact value: 0.001 -> ``1e-3``, 0.00031 -> ``3.1e-4``, 5.0 -> ``5``, None -> ``none``,
    a list (``target_modules``) -> ``q_proj,v_proj``."""
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(short_value(item) for item in value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    number = float(value)
    if not math.isfinite(number) or number == 0:
        return repr(number) if number else "0"
    if abs(number) < 1e-2 or abs(number) >= 1e5:
        mantissa, exponent = f"{number:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{number:.3g}"


def trial_run_name(swept: Mapping[str, Any], trial_id: str) -> str:
    """``lr=1e-3 clip=1 [00003]``: a trial's swept values and its number, for run names/legends.

    ``trial_id`` is Ray's ``<experiment>_<number>``; the number keeps names unique when two
    trials drew the same values.
    """
    values = " ".join(f"{short_key(k)}={short_value(v)}" for k, v in swept.items())
    number = str(trial_id).rsplit("_", 1)[-1]
    return f"{values} [{number}]" if values else str(trial_id)


def runs_link(base_url: str, experiment_id: str, sweep_uid: str | None = None) -> str:
    """A link into the MLflow UI that opens on the sweep's training runs, charts first.

    What MLflow 3.17's UI reads (checked in its bundled mlflow/server/js build):
    ``workflowType=machine_learning`` picks the "Model training" pages; without it the UI
    falls back to the browser's last choice, GenAI by default, and ignores the experiment's
    ``mlflow.experimentKind`` tag. ``searchFilter`` keeps the trial runs only, and an
    ``orderByKey`` other than the start time stops the UI from fetching the parents of the
    runs it found (its ``shouldFetchParents``), so the parent run is neither a table row
    nor an empty legend entry in every chart. Sorted by final loss, best first.
    """
    from urllib.parse import quote, urlencode

    search = f"tags.`{TAG_ROLE}` = 'trial'"
    if sweep_uid:
        search += f" AND tags.`{TAG_SWEEP_UID}` = '{_quote(sweep_uid)}'"
    query = urlencode(
        {
            "workflowType": "machine_learning",
            "searchFilter": search,
            "orderByKey": f"metrics.`{FINAL_LOSS_METRIC}`",
            "orderByAsc": "true",
            "compareRunsMode": "CHART",
        },
        quote_via=quote,
    )
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def _clean_key(key: str) -> str:
    # MLflow accepts alphanumerics, '_', '-', '.', ' ', '/' in metric/param/tag keys.
    return _KEY_BAD_CHARS.sub("_", str(key))[:250]


def _tag_value(value: Any) -> str:
    return (value if isinstance(value, str) else stringify_param(value))[:_MAX_TAG_VALUE_LEN]


def _finite_number(value: Any) -> float | None:
    """float(value) when it is a real finite number, else None (None/str/NaN/inf)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _is_nonfinite(value: Any) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and not math.isfinite(float(value))
    )


def _group_of(metric_key: str) -> str:
    # "grad_norm/projector" -> "projector", "lr/lora" -> "lora", "loss" -> "loss".
    return metric_key.rsplit("/", 1)[-1]


# Keys the trainer writes on every optimizer step (loss only while finite).
WATERMARK_METRICS = ("skipped", "lr/projector", "loss")


def _now_ms() -> int:
    return int(time.time() * 1000)


# The trainer stamps each step record with its own time (trainer.metrics.MultiSink). MLflow's
# relative-time axis plots the metric timestamp, so a record stamped when its report batch
# arrived would draw every batch as one vertical stair.
WALL_TIME_KEY = "wall_time"


def _step_time_ms(record: Mapping[str, Any], fallback_ms: int) -> int:
    """The record's own wall time in ms; ``fallback_ms`` for records that carry none."""
    seconds = _finite_number(record.get(WALL_TIME_KEY))
    return int(seconds * 1000) if seconds is not None and seconds > 0 else fallback_ms


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _error_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def classify_error(exc: BaseException) -> Literal["outage", "server", "permanent"]:
    """How a failed MLflow call should be treated.

    outage: no answer (refused, reset, timeout, DNS, SQLite locked/unopenable) -> journal, retry.
    server: the server answered with a retryable error (5xx, rate limit) -> journal, retry a few
        times, then reject.
    permanent: the store refused the request itself (bad value, deleted run) -> reject, log.
    """
    import requests
    import urllib3

    outage_types: tuple[type[BaseException], ...] = (
        requests.exceptions.RequestException,
        urllib3.exceptions.HTTPError,
        ConnectionError,
        TimeoutError,
        socket.gaierror,
    )
    try:  # SQLite "database is locked" / "unable to open database file"
        from sqlalchemy.exc import OperationalError

        outage_types += (OperationalError,)
    except ImportError:  # pragma: no cover - mlflow-skinny has no SQLAlchemy
        pass

    chain = _error_chain(exc)
    if any(isinstance(e, outage_types) for e in chain):
        return "outage"
    from mlflow.exceptions import MlflowException

    for e in chain:
        if isinstance(e, MlflowException) and e.error_code in _RETRYABLE_MLFLOW_CODES:
            return "server"
    return "permanent"


def short_reason(exc: BaseException) -> str:
    """One human line for an MLflow/requests failure (the raw text is a screenful)."""
    chain = _error_chain(exc)
    text = " | ".join(str(e) for e in chain)
    if "Connection refused" in text or any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    import requests

    if any(isinstance(e, requests.exceptions.Timeout | TimeoutError) for e in chain) or (
        "timed out" in text.lower() or "timeout" in text.lower()
    ):
        return "no answer before the timeout"
    if any(isinstance(e, socket.gaierror) for e in chain) or "Name or service not known" in text:
        return "host name does not resolve"
    first = str(exc).strip().splitlines()
    line = first[0] if first else type(exc).__name__
    return f"{type(exc).__name__}: {line}"[:300]


def git_describe(repo_dir: Path | None = None) -> str:
    """``git describe --always --dirty`` of this checkout, or "unknown" (no git, no repo)."""
    cwd = repo_dir or Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def _dist_version(name: str) -> str:
    # importlib.metadata instead of importing torch/ray: importing torch costs seconds.
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def runtime_tags() -> dict[str, str]:
    """Code and library versions, so a run says what produced it."""
    return {
        TAG_CODE_VERSION: git_describe(),
        "phase2tune.ray_version": _dist_version("ray"),
        "phase2tune.torch_version": _dist_version("torch"),
        "phase2tune.mlflow_version": _dist_version("mlflow"),
    }


@dataclass
class ReplayReport:
    """What one journal replay did."""

    applied: int = 0
    remaining: int = 0
    rejected: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    steps_logged: int = 0
    steps_dropped: int = 0
    error: str | None = None

    def summary(self) -> str:
        ops = ", ".join(f"{name} x{count}" for name, count in sorted(self.ops.items())) or "none"
        text = (
            f"replayed {self.applied} operation(s) [{ops}]; metric steps logged "
            f"{self.steps_logged}, dropped as already logged {self.steps_dropped}; "
            f"rejected {self.rejected}; {self.remaining} left in the journal"
        )
        if self.error:
            text += f"; stopped: {self.error}"
        return text


class SweepTracker:
    """Typed, outage-tolerant wrapper over ``mlflow.tracking.MlflowClient`` for one sweep.

    All public methods are safe to call while the store is down: the operation is journaled and
    the call returns. They raise only ``TrackingError`` for misuse (e.g. trial operations before
    ``start_parent``). Thread-safe within a process, and serialised across processes through a
    file lock in ``state_dir`` (the driver and ``python -m tuning.sync`` may overlap).
    """

    def __init__(
        self,
        tracking_uri: str | None,
        experiment_name: str,
        state_dir: Path,
        *,
        timeout_s: float = 10.0,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.embedded = tracking_uri is None
        self.tracking_uri = (
            f"sqlite:///{self.state_dir / 'mlflow.db'}" if tracking_uri is None else tracking_uri
        )
        self.experiment_name = experiment_name
        self.timeout_s = float(timeout_s)
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
    def journal_path(self) -> Path:
        return self.state_dir / JOURNAL_FILE

    @property
    def rejected_path(self) -> Path:
        return self.state_dir / REJECTED_FILE

    @property
    def artifact_location(self) -> str | None:
        """Local stores keep artifacts beside the state; a server picks its own location."""
        if self.tracking_uri.startswith(("http://", "https://", "databricks")):
            return None
        return (self.state_dir / "mlartifacts").as_uri()

    @property
    def client(self) -> Any:
        """The ``MlflowClient``, created on first use (SQLite creation runs migrations: ~3 s)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.embedded:
                self._create_store_atomically()
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _create_store_atomically(self) -> None:
        """Create the embedded SQLite schema in a side file, then link it into place.

        MLflow migrates a new SQLite file in many steps; a driver killed in between leaves a
        half-migrated ``mlflow.db`` that every later open refuses ("table _alembic_tmp_...
        already exists"). ``os.link`` publishes the finished file only if none exists yet, so
        two processes racing here both end up on one complete store.
        """
        db = self.state_dir / "mlflow.db"
        if db.exists():
            return
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        side = self.state_dir / f".mlflow.db.init-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            store = SqlAlchemyStore(f"sqlite:///{side}", self.artifact_location)
            store.engine.dispose()
            with contextlib.suppress(FileExistsError):  # another process was first: use its
                os.link(side, db)
        finally:
            side.unlink(missing_ok=True)

    @property
    def last_outage(self) -> str | None:
        """Reason of the latest failed write, None once the journal drained."""
        return self._last_outage

    # ------------------------------------------------------------------ reachability

    def check_reachable(self) -> None:
        """Fail in well under 10 s with ``TrackingUnavailable`` when the store cannot be used."""
        if self.tracking_uri.startswith(("http://", "https://")):
            from mlflow.utils.credentials import get_default_host_creds
            from mlflow.utils.rest_utils import http_request

            probe_timeout = max(1.0, min(self.timeout_s / 2, 5.0))
            try:
                response = http_request(
                    get_default_host_creds(self.tracking_uri),
                    "/api/2.0/mlflow/experiments/search",
                    "POST",
                    max_retries=0,
                    backoff_factor=0,
                    backoff_jitter=0,
                    timeout=probe_timeout,
                    raise_on_status=False,
                    json={"max_results": 1},
                )
            except Exception as exc:
                raise TrackingUnavailable(self._unreachable_text(short_reason(exc))) from exc
            if response.status_code != 200:
                reason = f"HTTP {response.status_code} {response.text.strip()[:200]}"
                raise TrackingUnavailable(self._unreachable_text(reason))
            return
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:
            raise TrackingUnavailable(
                f"MLflow tracking store {self.tracking_uri} unusable: {short_reason(exc)}"
            ) from exc

    def _unreachable_text(self, reason: str) -> str:
        return (
            f"MLflow tracking server {self.tracking_uri} unreachable: {reason}; "
            "start it or set mlflow.on_unreachable: continue"
        )

    # ------------------------------------------------------------------ public API

    def start_parent(
        self,
        sweep_name: str,
        params: Mapping[str, Any],
        artifacts: Sequence[Path] = (),
        tags: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Create (or, for a restored sweep, reuse) the sweep's parent run; return its id.

        Returns None when the store is unreachable (the creation waits in the journal). One
        state_dir holds exactly one sweep: a different ``sweep_name`` there is an error.
        """
        with self._locked():
            sweep = self._state.get("sweep")
            if sweep and sweep["name"] != sweep_name:
                raise TrackingError(
                    f"{self.state_dir} already tracks sweep {sweep['name']!r}, "
                    f"not {sweep_name!r}; use a fresh state directory per sweep"
                )
            if not sweep:
                # The uid (not the name) identifies the parent: sweep names get reused. A
                # state rebuilt after damage takes the uid of the parent found by name
                # (_ensure_parent), so the sweep keeps its one parent.
                uid = None if self._state.get(RECOVER_KEY) else uuid.uuid4().hex
                self._state["sweep"] = {"name": sweep_name, "uid": uid}
                self._save_state()
            op = {
                "op": "start_parent",
                "params": flatten_params(params),
                "artifacts": [str(Path(p).resolve()) for p in artifacts],
                "tags": {_clean_key(k): _tag_value(v) for k, v in (tags or {}).items()},
                "runtime_tags": runtime_tags(),
            }
            self._submit(op)
            return self._store().get("parent_run_id")

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
        """Create or reuse the child run of ``trial_id``; return its id (None while journaled)."""
        with self._locked():
            self._require_sweep()
            spec = self._state.setdefault("trials", {}).setdefault(trial_id, {})
            spec["run_name"] = run_name or spec.get("run_name") or trial_id
            spec["tags"] = {
                **spec.get("tags", {}),
                **{_clean_key(k): _tag_value(v) for k, v in (tags or {}).items()},
            }
            self._save_state()
            self._submit({"op": "start_trial", "trial_id": trial_id})
            return self._trial_state(trial_id).get("run_id")

    def run_id_of(self, trial_id: str) -> str | None:
        with self._locked():
            return self._trial_state(trial_id).get("run_id")

    def log_params(self, trial_id: str, params: Mapping[str, Any]) -> None:
        """Log the trial's resolved knobs once (stringified; None -> "none")."""
        with self._locked():
            self._require_trial(trial_id)
            if self._trial_state(trial_id).get("params_logged"):
                return
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
        rows: dict[int, dict[str, Any]] = {}
        received = _now_ms()
        for record in records:
            try:
                step = int(record["step"])
            except (KeyError, TypeError, ValueError):
                log.warning("trial %s: record without an integer step dropped", trial_id)
                continue
            if step in rows:  # a re-report inside one batch: identical values, keep the first
                continue
            metrics: dict[str, float] = {}
            bad: list[str] = []
            for key, value in record.items():
                if key in ("step", WALL_TIME_KEY):
                    continue
                number = _finite_number(value)
                if number is not None:
                    metrics[_clean_key(key)] = number
                elif _is_nonfinite(value):
                    bad.append(_clean_key(key))
            rows[step] = {"step": step, "ts": _step_time_ms(record, received), "m": metrics,
                          "bad": bad}
        events = []
        for event in nan_events:
            try:
                events.append(
                    {
                        "step": int(event["step"]),
                        "where": str(event.get("where", "")),
                        "groups": [str(g) for g in event.get("groups") or []],
                    }
                )
            except (KeyError, TypeError, ValueError):
                log.warning("trial %s: malformed nan event dropped: %r", trial_id, event)
        if not rows and not events:
            return
        with self._locked():
            self._require_trial(trial_id)
            self._submit(
                {
                    "op": "metrics",
                    "trial_id": trial_id,
                    "rows": [rows[s] for s in sorted(rows)],
                    "events": sorted(events, key=lambda e: e["step"]),
                }
            )

    def log_final_metrics(self, trial_id: str, metrics: Mapping[str, Any], step: int) -> None:
        """Per-trial results known only at the end (final loss, verdict as a number, ...).

        Logged at ``step`` (the trial's last step) so they line up with the step metrics; they
        are what MLflow's parallel-coordinates and scatter charts plot against the params.
        Non-finite and None values are skipped, as for step records.
        """
        clean = {_clean_key(k): n for k, v in metrics.items()
                 if (n := _finite_number(v)) is not None}
        if not clean:
            return
        with self._locked():
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
        with self._locked():
            self._require_trial(trial_id)
            self._submit({"op": "tags", "trial_id": trial_id, "tags": self._clean_tags(tags)})

    def set_parent_tags(self, tags: Mapping[str, Any]) -> None:
        if not tags:
            return
        with self._locked():
            self._require_sweep()
            self._submit({"op": "tags", "trial_id": None, "tags": self._clean_tags(tags)})

    def finish_trial(
        self, trial_id: str, status: RunEndStatus, tags: Mapping[str, Any] | None = None
    ) -> None:
        """Terminate the trial's child run with FINISHED, FAILED or KILLED."""
        if status not in _END_STATUSES:
            raise TrackingError(f"status must be one of {_END_STATUSES}, not {status!r}")
        with self._locked():
            self._require_trial(trial_id)
            self._submit(
                {
                    "op": "finish_trial",
                    "trial_id": trial_id,
                    "status": status,
                    "tags": self._clean_tags(tags or {}),
                    "end_ms": _now_ms(),
                }
            )

    def finish_parent(self, status: RunEndStatus, tags: Mapping[str, Any] | None = None) -> None:
        if status not in _END_STATUSES:
            raise TrackingError(f"status must be one of {_END_STATUSES}, not {status!r}")
        with self._locked():
            self._require_sweep()
            self._submit(
                {
                    "op": "finish_parent",
                    "status": status,
                    "tags": self._clean_tags(tags or {}),
                    "end_ms": _now_ms(),
                }
            )

    def kill_running(self) -> None:
        """Mark every RUNNING child of this sweep, and the parent, KILLED (on interrupt)."""
        with self._locked():
            if not self._state.get("sweep"):
                return
            self._submit({"op": "kill_running", "end_ms": _now_ms()})

    def log_artifact(
        self, trial_id: str | None, path: Path, artifact_path: str | None = None
    ) -> None:
        """Upload a file (or directory) to the trial's run, or to the parent when None."""
        with self._locked():
            if trial_id is None:
                self._require_sweep()
            else:
                self._require_trial(trial_id)
            self._submit(
                {
                    "op": "artifact",
                    "trial_id": trial_id,
                    "path": str(Path(path).resolve()),
                    "artifact_path": artifact_path,
                }
            )

    def pending_operations(self) -> int:
        """Operations waiting in the journal."""
        with self._locked():
            return len(self._read_journal())

    def retry_journal(self, force: bool = False) -> ReplayReport:
        """Replay the journal if its backoff elapsed (or ``force``); cheap when it is empty."""
        with self._locked():
            if not self.journal_path.exists():
                return ReplayReport()
            if not force and time.monotonic() < self._next_retry_at:
                return ReplayReport(remaining=len(self._read_journal()), error=self._last_outage)
            return self._replay_locked()

    def close(self) -> None:
        """Drop the client (its SQLAlchemy engine/HTTP session). The tracker can be reused."""
        with self._rlock:
            self._client = None

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
        fresh = {"version": STATE_VERSION, "stores": {}, "trials": {}}
        if not self.state_path.exists():
            if not self._has_history():
                return fresh
            why = "missing"
        else:
            try:
                state = json.loads(self.state_path.read_text(encoding="utf-8"))
                why = state_problem(state)
            except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
                why = f"unreadable ({short_reason(exc)})"
            if why is None:
                state.setdefault("stores", {})
                state.setdefault("trials", {})
                return state
        # Written atomically, so this is outside damage. What is durable rebuilds it: the
        # parent run is found again by the sweep's name and role tags (its uid tag with it),
        # each child by its trial id and parent, each watermark from the run's own metrics.
        # A new uid here would start a second parent and a second child per trial.
        if self.state_path not in _WARNED:
            _WARNED.add(self.state_path)
            print(f"[mlflow] warning: {self.state_path} is {why}; rebuilding it from the "
                  "runs in the tracking store (the sweep's parent and child runs are found "
                  "by their tags; nothing is logged twice)", file=sys.stderr, flush=True)
        return {**fresh, RECOVER_KEY: True}

    def _has_history(self) -> bool:
        """Something in state_dir says this sweep wrote to its store before (the state file
        is lost). Not the inbox: a new sweep's driver fills it before its first tracker."""
        return self.journal_path.exists() or (self.state_dir / "mlflow.db").exists()

    def _save_state(self) -> None:
        tmp = self.state_path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(self._state, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)
        _fsync_dir(self.state_dir)

    def _store(self) -> dict[str, Any]:
        # Run ids and watermarks belong to one tracking store; replaying into another store
        # (tuning.sync --tracking-uri) must not reuse them.
        store = self._state["stores"].setdefault(self.tracking_uri, {})
        store.setdefault("trials", {})
        return store

    def _trial_state(self, trial_id: str) -> dict[str, Any]:
        return self._store()["trials"].setdefault(trial_id, {})

    def _require_sweep(self) -> None:
        if not self._state.get("sweep") and self._state.get(RECOVER_KEY):
            self._adopt_newest_parent()
        if not self._state.get("sweep"):
            raise TrackingError("start_parent() must be called before anything else")

    def _require_trial(self, trial_id: str) -> None:
        self._require_sweep()
        if trial_id not in self._state["trials"]:
            if self._state.get(RECOVER_KEY):  # its start_trial was recorded in the lost state
                self._state["trials"][trial_id] = {"run_name": trial_id, "tags": {}}
                self._save_state()
                return
            raise TrackingError(f"start_trial({trial_id!r}) was not called")

    @staticmethod
    def _clean_tags(tags: Mapping[str, Any]) -> dict[str, str]:
        return {_clean_key(k): _tag_value(v) for k, v in tags.items() if v is not None}

    # ------------------------------------------------------------------ journal

    def _read_journal(self) -> list[dict[str, Any]]:
        if not self.journal_path.exists():
            return []
        ops = []
        lines = self.journal_path.read_bytes().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                op = json.loads(line)  # bytes: a garbled line is a ValueError, never a crash
            except ValueError:
                op = None
            if isinstance(op, dict):
                ops.append(op)
            else:
                # Only a crash mid-append can leave a torn line, and only as the last one.
                log.warning("%s:%d: torn journal line skipped", self.journal_path, number)
        return ops

    def _append_journal(self, op: dict[str, Any]) -> None:
        created = not self.journal_path.exists()
        with open(self.journal_path, "a") as fh:
            fh.write(json.dumps(op, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if created:
            _fsync_dir(self.state_dir)

    def _rewrite_journal(self, ops: list[dict[str, Any]]) -> None:
        if not ops:
            self.journal_path.unlink(missing_ok=True)
            _fsync_dir(self.state_dir)
            return
        tmp = self.journal_path.with_name(f".{JOURNAL_FILE}.tmp")
        with open(tmp, "w") as fh:
            for op in ops:
                fh.write(json.dumps(op, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.journal_path)
        _fsync_dir(self.state_dir)

    def _reject(self, op: dict[str, Any], exc: BaseException) -> None:
        log.error(
            "MLflow refused %s for %s: %s (kept in %s)",
            op.get("op"),
            op.get("trial_id") or "the parent run",
            short_reason(exc),
            self.rejected_path,
        )
        entry = {**op, "error": str(exc)[:2000], "rejected_ms": _now_ms()}
        with open(self.rejected_path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _note_failure(self, exc: BaseException) -> None:
        self._last_outage = short_reason(exc)
        self._next_retry_at = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, _BACKOFF_MAX_S)

    def _note_success(self) -> None:
        self._last_outage = None
        self._next_retry_at = 0.0
        self._backoff_s = _BACKOFF_START_S

    def _submit(self, op: dict[str, Any]) -> None:
        """Apply now, or journal when the store is down / older operations still wait."""
        op.setdefault("ts_ms", _now_ms())
        if self.journal_path.exists():
            self.retry_journal()
            if self.journal_path.exists():  # order matters: queue behind what is waiting
                self._append_journal(op)
                return
        try:
            self._apply(op, ReplayReport())
        except Exception as exc:
            kind = classify_error(exc)
            if kind == "permanent":
                self._reject(op, exc)
                return
            if self._last_outage is None:
                log.warning(
                    "MLflow write failed (%s); journaling to %s and retrying with backoff",
                    short_reason(exc),
                    self.journal_path,
                )
            if kind == "server":
                op["server_errors"] = 1
            self._note_failure(exc)
            self._append_journal(op)
        else:
            self._note_success()

    def _replay_locked(self) -> ReplayReport:
        report = ReplayReport()
        ops = self._read_journal()
        for index, op in enumerate(ops):
            try:
                self._apply(op, report)
            except Exception as exc:
                kind = classify_error(exc)
                if kind == "permanent" or (
                    kind == "server"
                    and op.get("server_errors", 0) + 1 >= _MAX_SERVER_ERROR_ATTEMPTS
                ):
                    self._reject(op, exc)
                    report.rejected += 1
                    continue
                if kind == "server":
                    op["server_errors"] = op.get("server_errors", 0) + 1
                self._note_failure(exc)
                rest = ops[index:]
                self._rewrite_journal(rest)
                report.remaining = len(rest)
                report.error = self._last_outage
                return report
            report.applied += 1
            report.ops[op.get("op", "?")] += 1
        self._rewrite_journal([])
        self._note_success()
        if ops:
            log.info("MLflow journal replayed: %s", report.summary())
        return report

    # ------------------------------------------------------------------ applying operations

    def _apply(self, op: dict[str, Any], report: ReplayReport) -> None:
        kind = op.get("op")
        handler = {
            "start_parent": self._apply_start_parent,
            "start_trial": self._apply_start_trial,
            "params": self._apply_params,
            "metrics": self._apply_metrics,
            "final_metrics": self._apply_final_metrics,
            "tags": self._apply_tags,
            "finish_trial": self._apply_finish_trial,
            "finish_parent": self._apply_finish_parent,
            "artifact": self._apply_artifact,
            "kill_running": self._apply_kill_running,
        }.get(kind)
        if handler is None:
            raise TrackingError(f"unknown journal operation {kind!r}")
        handler(op, report)

    def _ensure_experiment(self) -> str:
        store = self._store()
        if store.get("experiment_id"):
            return store["experiment_id"]
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(
                    self.experiment_name,
                    artifact_location=self.artifact_location,
                    # MLflow 3's UI opens GenAI trace pages unless told this is model training.
                    tags={EXPERIMENT_KIND_TAG: "custom_model_development"},
                )
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # lost a creation race
                    raise
                experiment_id = self.client.get_experiment_by_name(
                    self.experiment_name
                ).experiment_id
        elif experiment.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow experiment {self.experiment_name!r} is deleted; restore it "
                "(mlflow experiments restore) or choose another name"
            )
        else:
            experiment_id = experiment.experiment_id
        store["experiment_id"] = experiment_id
        self._save_state()
        return experiment_id

    def _ensure_parent(self) -> str:
        store = self._store()
        if store.get("parent_run_id"):
            return store["parent_run_id"]
        sweep = self._state["sweep"]
        experiment_id = self._ensure_experiment()
        if sweep.get("uid") is None:
            self._recover_sweep_uid(experiment_id)
        # A crash between create_run and the state save leaves a parent we can find again.
        found = self.client.search_runs(
            [experiment_id],
            f"tags.`{TAG_SWEEP_UID}` = '{_quote(sweep['uid'])}' AND tags.`{TAG_ROLE}` = 'parent'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run = self.client.create_run(
                experiment_id,
                run_name=sweep["name"],
                tags={
                    TAG_SWEEP: sweep["name"],
                    TAG_SWEEP_UID: sweep["uid"],
                    TAG_ROLE: "parent",
                    TAG_STATUS: "running",
                },
            )
            run_id = run.info.run_id
        store["parent_run_id"] = run_id
        self._save_state()
        return run_id

    def _recover_sweep_uid(self, experiment_id: str) -> None:
        """After the state was lost: this sweep's uid is the one on the newest parent run of
        its name in the experiment (a new uid when there is none: nothing was stored yet)."""
        sweep = self._state["sweep"]
        found = self.client.search_runs(
            [experiment_id],
            f"tags.`{TAG_SWEEP}` = '{_quote(sweep['name'])}' AND tags.`{TAG_ROLE}` = 'parent'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        uid = found[0].data.tags.get(TAG_SWEEP_UID) if found else None
        sweep["uid"] = uid or uuid.uuid4().hex
        if uid:
            print(f"[mlflow] recovered sweep {sweep['name']!r}: parent run "
                  f"{found[0].info.run_id} (uid {uid}) from its tags", file=sys.stderr,
                  flush=True)
        self._save_state()

    def _adopt_newest_parent(self) -> None:
        """A rebuilt state used before any start_parent (tuning.sync, an inbox replay): the
        sweep is the newest parent run of the experiment. Left unset when the store cannot
        say (the caller's TrackingError follows)."""
        try:
            found = self.client.search_runs(
                [self._ensure_experiment()], f"tags.`{TAG_ROLE}` = 'parent'", max_results=1,
                order_by=["attributes.start_time DESC"])
        except Exception as exc:  # unreachable: nothing to adopt now
            log.warning("cannot look up the sweep's parent run: %s", short_reason(exc))
            return
        if found and found[0].data.tags.get(TAG_SWEEP) and found[0].data.tags.get(TAG_SWEEP_UID):
            tags = found[0].data.tags
            self._state["sweep"] = {"name": tags[TAG_SWEEP], "uid": tags[TAG_SWEEP_UID]}
            self._store()["parent_run_id"] = found[0].info.run_id
            self._save_state()

    def _reopen_if_terminated(self, run_id: str) -> None:
        run = self.client.get_run(run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def _apply_start_parent(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        run_id = self._ensure_parent()
        self._reopen_if_terminated(run_id)  # a restored sweep runs again
        sweep = self._state["sweep"]
        tags = {
            **op.get("runtime_tags", {}),
            **op.get("tags", {}),
            TAG_SWEEP: sweep["name"],
            TAG_STATUS: "running",
        }
        for chunk in _chunks(list(tags.items()), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk], synchronous=True)
        for chunk in _chunks(list(op.get("params", {}).items()), MAX_PARAMS_TAGS_PER_BATCH):
            try:
                self.client.log_batch(
                    run_id, params=[Param(k, v) for k, v in chunk], synchronous=True
                )
            except MlflowException as exc:
                # A restored sweep with an edited config: MLflow params are immutable. Keep the
                # originals, say so, and carry on with the sweep.
                if classify_error(exc) != "permanent":
                    raise
                log.warning("parent params not updated: %s", short_reason(exc))
        for path in op.get("artifacts", []):
            if Path(path).exists():
                self.client.log_artifact(run_id, path)
            else:
                log.warning("parent artifact %s does not exist; skipped", path)

    def _ensure_child(self, trial_id: str, create: bool) -> str | None:
        trial = self._trial_state(trial_id)
        if trial.get("run_id"):
            if trial_id not in self._reconciled:
                self._reconcile(trial_id, self.client.get_run(trial["run_id"]).data.tags,
                                trial["run_id"])
            return trial["run_id"]
        parent_id = self._ensure_parent()
        experiment_id = self._ensure_experiment()
        found = self.client.search_runs(
            [experiment_id],
            f"tags.`{TAG_TRIAL_ID}` = '{_quote(trial_id)}' "
            f"AND tags.`{TAG_PARENT_RUN_ID}` = '{_quote(parent_id)}'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if found:
            run_id = found[0].info.run_id
            self._reconcile(trial_id, found[0].data.tags, run_id)
        elif create:
            spec = self._state["trials"].get(trial_id, {})
            run = self.client.create_run(
                experiment_id,
                run_name=spec.get("run_name", trial_id),
                tags={
                    **spec.get("tags", {}),
                    TAG_TRIAL_ID: trial_id,
                    TAG_PARENT_RUN_ID: parent_id,
                    TAG_SWEEP: self._state["sweep"]["name"],
                    TAG_SWEEP_UID: self._state["sweep"]["uid"],
                    TAG_ROLE: "trial",
                    TAG_STATUS: "running",
                },
            )
            run_id = run.info.run_id
            self._reconciled.add(trial_id)
        else:
            return None
        trial["run_id"] = run_id
        self._save_state()
        return run_id

    def _reconcile(self, trial_id: str, tags: Mapping[str, str], run_id: str) -> None:
        """Take the max of local state, the run's own tags and the steps the store holds
        (the state may be stale or lost)."""
        trial = self._trial_state(trial_id)
        with contextlib.suppress(ValueError):
            trial["watermark"] = max(
                int(trial.get("watermark", 0)), int(tags.get(TAG_LOGGED_THROUGH, 0))
            )
        # The SQL store commits a batch's metrics and its watermark tag in separate
        # transactions: a driver killed between them leaves steps stored but not marked.
        # These keys are in (nearly) every step record: their histories say what is stored.
        for key in WATERMARK_METRICS:
            history = self.client.get_metric_history(run_id, key)
            if history:
                trial["watermark"] = max(int(trial.get("watermark", 0)),
                                         max(m.step for m in history))
        with contextlib.suppress(ValueError):
            trial["nan_events"] = max(
                int(trial.get("nan_events", 0)), int(tags.get(TAG_NAN_EVENTS, 0))
            )
        if trial.get("first_nonfinite_step") is None and TAG_FIRST_NONFINITE_STEP in tags:
            with contextlib.suppress(ValueError):
                trial["first_nonfinite_step"] = int(tags[TAG_FIRST_NONFINITE_STEP])
        # Persist now: the next ``_locked()`` re-reads the file, and a reconciled watermark
        # that lived only in memory was lost there (the resumed sweep re-logged those steps).
        self._save_state()
        self._reconciled.add(trial_id)

    def _apply_start_trial(self, op: dict[str, Any], report: ReplayReport) -> None:
        run_id = self._ensure_child(op["trial_id"], create=True)
        assert run_id is not None
        self._reopen_if_terminated(run_id)  # a retried/restored trial runs again
        self.client.set_tag(run_id, TAG_STATUS, "running")

    def _apply_params(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import Param

        trial = self._trial_state(op["trial_id"])
        if trial.get("params_logged"):
            return
        run_id = self._ensure_child(op["trial_id"], create=True)
        for chunk in _chunks(sorted(op["params"].items()), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)
        trial["params_logged"] = True
        self._save_state()

    def _apply_metrics(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import Metric, RunTag

        trial_id = op["trial_id"]
        run_id = self._ensure_child(trial_id, create=True)
        trial = self._trial_state(trial_id)
        watermark = int(trial.get("watermark", 0))
        rows = [r for r in op["rows"] if r["step"] > watermark]
        events = [e for e in op.get("events", []) if e["step"] > watermark]
        report.steps_dropped += len(op["rows"]) - len(rows)
        if not rows:
            return  # events without their records: already counted with those records
        chunks: list[list[dict[str, Any]]] = [[]]
        size = 0
        for row in rows:
            if chunks[-1] and size + len(row["m"]) > _METRICS_PER_CHUNK:
                chunks.append([])
                size = 0
            chunks[-1].append(row)
            size += len(row["m"])
        low = watermark
        for number, chunk in enumerate(chunks):
            high = chunk[-1]["step"]
            last = number == len(chunks) - 1
            chunk_events = [e for e in events if low < e["step"] and (e["step"] <= high or last)]
            tags = {TAG_LOGGED_THROUGH: str(high)}
            bad_steps = {r["step"]: r["bad"] for r in chunk if r["bad"]}
            event_steps = {e["step"]: e for e in chunk_events}
            nonfinite_steps = sorted(set(bad_steps) | set(event_steps))
            nan_events = int(trial.get("nan_events", 0)) + len(nonfinite_steps)
            first_step = trial.get("first_nonfinite_step")
            first_group = None
            if nonfinite_steps:
                tags[TAG_NAN_EVENTS] = str(nan_events)
                if first_step is None:
                    first_step = nonfinite_steps[0]
                    event = event_steps.get(first_step)
                    if event is not None and event["groups"]:
                        first_group = ",".join(event["groups"])
                    elif event is not None and event["where"]:
                        first_group = event["where"]
                    else:
                        first_group = ",".join(
                            sorted({_group_of(k) for k in bad_steps[first_step]})
                        )
                    tags[TAG_FIRST_NONFINITE_STEP] = str(first_step)
                    tags[TAG_FIRST_NAN_GROUP] = first_group
            metrics = [
                Metric(key, value, row["ts"], row["step"])
                for row in chunk
                for key, value in row["m"].items()
            ]
            self.client.log_batch(
                run_id,
                metrics=metrics,
                tags=[RunTag(k, v) for k, v in tags.items()],
                synchronous=True,
            )
            trial["watermark"] = high
            trial["nan_events"] = nan_events
            trial["first_nonfinite_step"] = first_step
            self._save_state()  # persisted per successful batch: the exactly-once guarantee
            report.steps_logged += len(chunk)
            low = high

    def _apply_final_metrics(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import Metric

        run_id = self._ensure_child(op["trial_id"], create=True)
        # A replayed operation logs the same values again at the same step: the latest value,
        # which every chart shows, does not change.
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, op["ts_ms"], op["step"])
                     for k, v in sorted(op["metrics"].items())],
            synchronous=True,
        )

    def _apply_tags(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import RunTag

        if op.get("trial_id") is None:
            run_id = self._ensure_parent()
        else:
            run_id = self._ensure_child(op["trial_id"], create=True)
        for chunk in _chunks(sorted(op["tags"].items()), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in chunk], synchronous=True)

    def _apply_finish_trial(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import RunTag

        run_id = self._ensure_child(op["trial_id"], create=False)
        if run_id is None:
            return  # never started in this store: nothing to finish
        tags = {**op.get("tags", {}), TAG_STATUS: op["status"].lower()}
        self.client.log_batch(
            run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())], synchronous=True
        )
        self.client.set_terminated(run_id, op["status"], end_time=op.get("end_ms"))
        self._trial_state(op["trial_id"])["status"] = op["status"]
        self._save_state()

    def _apply_finish_parent(self, op: dict[str, Any], report: ReplayReport) -> None:
        from mlflow.entities import RunTag

        run_id = self._ensure_parent()
        tags = {**op.get("tags", {}), TAG_STATUS: op["status"].lower()}
        self.client.log_batch(
            run_id, tags=[RunTag(k, v) for k, v in sorted(tags.items())], synchronous=True
        )
        self.client.set_terminated(run_id, op["status"], end_time=op.get("end_ms"))

    def _apply_artifact(self, op: dict[str, Any], report: ReplayReport) -> None:
        path = Path(op["path"])
        if not path.exists():
            raise TrackingError(f"artifact {path} no longer exists")
        if op.get("trial_id") is None:
            run_id = self._ensure_parent()
        else:
            run_id = self._ensure_child(op["trial_id"], create=True)
        self.client.log_artifact(run_id, str(path), op.get("artifact_path"))

    def _apply_kill_running(self, op: dict[str, Any], report: ReplayReport) -> None:
        parent_id = self._ensure_parent()
        experiment_id = self._ensure_experiment()
        page_token = None
        while True:
            runs = self.client.search_runs(
                [experiment_id],
                f"tags.`{TAG_PARENT_RUN_ID}` = '{_quote(parent_id)}' "
                "AND attributes.status = 'RUNNING'",
                max_results=500,
                page_token=page_token,
            )
            for run in runs:
                self.client.set_tag(run.info.run_id, TAG_STATUS, "killed")
                self.client.set_terminated(run.info.run_id, "KILLED", end_time=op.get("end_ms"))
            page_token = runs.token
            if not page_token:
                break
        if self.client.get_run(parent_id).info.status == "RUNNING":
            self.client.set_tag(parent_id, TAG_STATUS, "killed")
            self.client.set_terminated(parent_id, "KILLED", end_time=op.get("end_ms"))


def state_problem(state: Any) -> str | None:
    """Why parsed mlflow_state.json content is not a state this module wrote (None: it is)."""
    if not isinstance(state, dict):
        return f"not a JSON object (a {type(state).__name__})"
    stores, trials, sweep = state.get("stores", {}), state.get("trials", {}), state.get("sweep")
    if not isinstance(stores, dict) or not isinstance(trials, dict):
        return "of the wrong shape (stores/trials are not objects)"
    if sweep is not None and not (isinstance(sweep, dict) and isinstance(sweep.get("name"), str)
                                  and isinstance(sweep.get("uid"), str | None)):
        return "of the wrong shape (sweep)"
    for store in stores.values():
        if not isinstance(store, dict) or not isinstance(store.get("trials", {}), dict) or not all(
                isinstance(t, dict) for t in store.get("trials", {}).values()):
            return "of the wrong shape (a store)"
    if not all(isinstance(t, dict) for t in trials.values()):
        return "of the wrong shape (a trial)"
    return None


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _fsync_dir(path: Path) -> None:
    # Makes a create/rename durable; harmless where directories cannot be opened.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
