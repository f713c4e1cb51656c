"""Background MLflow writes for the sweep driver, so that no trial ever waits on MLflow.

Why a thread: a Ray Tune function trainable blocks inside ``tune.report`` until the driver has
taken its result (``continue_lock`` in ray/train/_internal/session.py), and the driver runs
callbacks inline in its event loop. An MLflow write inside ``on_trial_result`` (one SQLite
transaction or HTTP round trip per batch: 2-10 ms per step's record) therefore stalls the
trial that reported and every other trial waiting on the driver. Here the Tune hooks only
append the operation to a file and a queue; one writer thread applies them.

Nothing lost, nothing twice:

* Every operation is appended to ``mlflow_inbox.jsonl`` (write + flush, so it survives a SIGKILL
  of the driver; ``sync_to_disk`` fsyncs it, which the callback does before Ray commits a trial
  checkpoint) before it is queued. A trial's step records are not among them: the callback
  submits ``ship_metrics`` (the trial and its ``metrics.jsonl``), and the records stay in that
  file, which the trainer wrote before it reported.
* The writer applies operations in submission order through ``SweepTracker`` (watermarks,
  outage journal, bounded waits: all unchanged), merging consecutive record operations into
  one batch per trial and consecutive shipments into one read per trial.
* Once everything submitted has been applied, the inbox is emptied. A driver that died with a
  non-empty inbox leaves it to the next one (or to ``python -m tuning.sync``), which replays it
  before anything else. Replay is safe: the tracker's operations are idempotent in sequence
  (watermarks drop stored steps, params and tags are identical, starts and finishes reapplied
  in their order end in the same state).
* One process owns a sweep's inbox at a time (an exclusive ``flock``), so a ``tuning.sync``
  run beside a live driver leaves the driver's inbox alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tuning.tracking.tracker import SweepTracker

log = logging.getLogger(__name__)

INBOX_FILE = "mlflow_inbox.jsonl"
INBOX_LOCK_FILE = ".mlflow_inbox.lock"

# The tracker methods an inbox line may name (anything else in the file is outside damage).
OPERATIONS = frozenset({
    "start_parent", "start_trial", "log_params", "set_trial_tags", "set_parent_tags",
    "log_records", "ship_metrics", "log_final_metrics", "log_artifact", "finish_trial",
    "finish_parent",
})
# Records of several results are merged into one tracker call up to this many steps per trial:
# fewer, larger MLflow transactions (the per-call cost dominates small batches).
MAX_MERGED_RECORDS = 500
# While nothing arrives, the writer still retries the outage journal this often.
RETRY_IDLE_S = 30.0


class InboxBusy(RuntimeError):
    """Another live process owns this sweep's inbox."""


def _apply(tracker: SweepTracker, method: str, args: list[Any]) -> None:
    if method not in OPERATIONS:
        raise ValueError(f"unknown inbox operation {method!r}")
    getattr(tracker, method)(*args)


def _read_lines(path: Path) -> list[tuple[str, list[Any]]]:
    ops = []
    if not path.exists():
        return ops
    # errors=replace: a garbled line fails json.loads below (skipped), not the whole read
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            ops.append((str(item["m"]), list(item["a"])))
        except (ValueError, KeyError, TypeError):
            # A torn last line (killed mid-write) is expected; it was never acknowledged.
            log.warning("%s:%d: unreadable inbox line skipped", path, number)
    return ops


def _lock_inbox(state_dir: Path) -> int:
    fd = os.open(state_dir / INBOX_LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InboxBusy(f"{state_dir / INBOX_FILE} is owned by a live sweep driver") from None
    return fd


def replay_inbox(tracker: SweepTracker) -> int:
    """Apply what a dead driver left in the inbox, then empty it; return the operations applied.

    Raises ``InboxBusy`` when a live driver owns the inbox (it replays its own).
    """
    fd = _lock_inbox(tracker.state_dir)
    try:
        return _replay_owned(tracker)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _replay_owned(tracker: SweepTracker) -> int:
    path = tracker.state_dir / INBOX_FILE
    ops = _read_lines(path)
    for method, args in ops:
        try:
            _apply(tracker, method, args)
        except Exception:  # a misuse error must not block the rest (nothing here raises for I/O)
            log.exception("inbox operation %s could not be applied; skipped", method)
    if path.exists():
        with open(path, "r+") as fh:
            fh.truncate(0)
    if ops:
        log.info("MLflow inbox: %d operation(s) from an earlier driver applied", len(ops))
    return len(ops)


class BackgroundWriter:
    """One thread applying tracker operations in order; ``submit`` returns in microseconds.

    Args:
        tracker_factory: builds the ``SweepTracker`` (called once, on first use).
        state_dir: the tracker's state directory (holds the inbox).
        retry_idle_s: while idle, retry the tracker's outage journal this often.
    """

    def __init__(self, tracker_factory: Callable[[], SweepTracker], state_dir: Path,
                 retry_idle_s: float = RETRY_IDLE_S) -> None:
        self._factory = tracker_factory
        self._tracker: SweepTracker | None = None
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_inbox(self.state_dir)
        self._retry_idle_s = retry_idle_s
        self._queue: queue.Queue[tuple[int, str, list[Any]] | None] = queue.Queue()
        self._file_lock = threading.Lock()  # appends vs. the writer emptying the file
        self._submitted = 0
        self._applied = 0
        # What a dead driver left goes first; it is already in the file, so only queued here.
        for method, args in _read_lines(self.state_dir / INBOX_FILE):
            self._submitted += 1
            self._queue.put((self._submitted, method, args))
        if self._submitted:
            log.info("MLflow inbox: %d operation(s) from an earlier driver queued first",
                     self._submitted)
        self._inbox = open(self.state_dir / INBOX_FILE, "a")  # noqa: SIM115 (lives with us)
        self._idle = threading.Condition()
        self._busy_s = 0.0  # time spent applying operations, for the bench
        self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self._thread.start()

    @property
    def tracker(self) -> SweepTracker:
        """The tracker, built on first use. Use it from outside only after ``drain()``."""
        if self._tracker is None:
            self._tracker = self._factory()
        return self._tracker

    @property
    def busy_seconds(self) -> float:
        """Wall time the writer thread spent inside tracker calls."""
        return self._busy_s

    def submit(self, method: str, *args: Any) -> None:
        """Record the operation in the inbox, then queue it for the writer thread."""
        if method not in OPERATIONS:
            raise ValueError(f"unknown tracker operation {method!r}")
        line = json.dumps({"m": method, "a": list(args)}, default=str)
        with self._file_lock:
            self._inbox.write(line + "\n")
            self._inbox.flush()  # in the OS page cache: a driver SIGKILL cannot lose it
            self._submitted += 1
            seq = self._submitted
        self._queue.put((seq, method, list(args)))

    def sync_to_disk(self) -> None:
        """fsync the inbox: what was submitted survives a machine crash too."""
        with self._file_lock:
            self._inbox.flush()
            os.fsync(self._inbox.fileno())

    def pending(self) -> int:
        """Operations submitted but not applied yet."""
        return self._submitted - self._applied

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted operation is applied; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._applied < self._submitted:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left if left is None else min(left, 1.0))
        return True

    def close(self, timeout: float | None = 120.0) -> bool:
        """Drain, stop the thread and release the inbox; False when operations were left.

        Left-over operations stay in the inbox for the next driver or ``tuning.sync``.
        """
        drained = self.drain(timeout)
        self._queue.put(None)
        self._thread.join(timeout=5.0)
        with self._file_lock:
            self._inbox.close()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
        if self._tracker is not None:
            self._tracker.close()
        return drained

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                item = self._queue.get(timeout=self._retry_idle_s)
            except queue.Empty:
                self._retry_journal()
                continue
            if item is None:
                break
            batch = [item]
            while True:  # take whatever else is waiting: one merged pass over it
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._apply_batch(batch)

    def _apply_batch(self, batch: list[tuple[int, str, list[Any]]]) -> None:
        for method, args in _merge_records(batch):
            try:
                self._call(lambda m=method, a=args: _apply(self.tracker, m, a))
            except Exception:  # the tracker journals outages itself; this is a bug or misuse
                log.exception("MLflow %s failed; the sweep continues", method)
        with self._idle:
            self._applied = batch[-1][0]
            if self._applied == self._submitted:
                self._empty_inbox_if_idle()
            self._idle.notify_all()

    def _retry_journal(self) -> None:
        if self._tracker is None:
            return
        try:
            self._call(self._tracker.retry_journal)  # drains an outage backlog while idle
        except Exception:
            log.exception("MLflow journal retry failed; the sweep continues")

    def _call(self, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self._busy_s += time.perf_counter() - t0

    def _empty_inbox_if_idle(self) -> None:
        with self._file_lock:
            if self._applied == self._submitted:  # nothing appended since: all of it is applied
                self._inbox.flush()
                self._inbox.truncate(0)
                self._inbox.seek(0)


def _merge_records(batch: list[tuple[int, str, list[Any]]]) -> list[tuple[str, list[Any]]]:
    """Consecutive ``log_records`` operations become one per trial, consecutive
    ``ship_metrics`` one per trial and file (order kept otherwise)."""
    out: list[tuple[str, list[Any]]] = []
    run: dict[str, tuple[dict[int, Mapping[str, Any]], list[Any]]] = {}
    ships: dict[tuple[str, str], int] = {}  # (trial, file) -> the highest step asked for

    def close_run() -> None:
        for trial_id, (records, events) in run.items():
            ordered = [records[s] for s in sorted(records)]
            for i in range(0, max(len(ordered), 1), MAX_MERGED_RECORDS):
                out.append(("log_records", [trial_id, ordered[i:i + MAX_MERGED_RECORDS],
                                            events if i == 0 else []]))
        run.clear()
        out.extend(("ship_metrics", [trial_id, path, through])
                   for (trial_id, path), through in ships.items())
        ships.clear()

    for _, method, args in batch:
        if method == "ship_metrics":
            key = (str(args[0]), str(args[1]))
            ships[key] = max(ships.get(key, 0), int(args[2]))
            continue
        if method != "log_records":
            close_run()
            out.append((method, args))
            continue
        trial_id, records, *rest = args
        events = rest[0] if rest else []
        held_records, held_events = run.setdefault(str(trial_id), ({}, []))
        for record in records:
            try:
                held_records.setdefault(int(record["step"]), record)
            except (KeyError, TypeError, ValueError):
                log.warning("trial %s: record without an integer step dropped", trial_id)
        held_events.extend(events)
    close_run()
    return out
