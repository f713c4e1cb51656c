"""Background MLflow writes for the sweep driver, so that no trial ever waits on MLflow.

Why a thread: a Ray Tune function trainable blocks inside ``tune.report`` until the driver has
taken its result (``continue_lock`` in ray/train/_internal/session.py), and the driver runs
callbacks inline in its event loop. An MLflow write inside ``on_trial_result`` (one SQLite
transaction or HTTP round trip per batch: 2-10 ms per step's record) therefore stalls the
trial that reported and every other trial waiting on the driver. Here the Tune hooks only
record the operation; one writer thread writes it.

Nothing lost, nothing twice:

* ``submit`` records the operation in the tracker's pending document
  (``tuning.tracking.pending``: keyed, so a trial's ship requests are one entry) before it
  returns: a SIGKILL of the driver cannot lose it, and ``sync_to_disk`` fsyncs it, which the
  callback does before Ray commits a trial checkpoint. A trial's step records are not in it:
  the callback asks to ship the trial's ``metrics.jsonl`` up to the reported step, and the
  records stay in that file, which the trainer wrote before it reported.
* The writer thread writes what is pending through ``SweepTracker.catch_up`` (watermarks,
  backoff after a failed write, bounded waits: all the tracker's), in the order it was asked
  for, and removes each entry once written.
* What a dead driver left pending is written by the next one's first pass (or by
  ``python -m tuning.sync``) before anything newer. Writing twice is safe: the tracker's
  operations are idempotent (watermarks drop stored steps, params and tags are identical,
  a start after a finish reopens the run).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuning.tracking.tracker import SweepTracker

log = logging.getLogger(__name__)

# The tracker methods a hook may submit.
OPERATIONS = frozenset({
    "start_parent", "start_trial", "log_params", "set_trial_tags", "set_parent_tags",
    "log_records", "ship_metrics", "log_final_metrics", "log_artifact", "finish_trial",
    "finish_parent",
})
# While nothing arrives, the writer still retries what a failed write left pending this often.
RETRY_IDLE_S = 30.0


class BackgroundWriter:
    """One thread writing what the hooks record; ``submit`` never waits on MLflow.

    Args:
        tracker_factory: builds the ``SweepTracker`` (called once) with ``apply_now=False``:
            its methods then only record.
        state_dir: the tracker's state directory (holds the pending document).
        retry_idle_s: while idle, retry what a failed write left pending this often.
    """

    def __init__(self, tracker_factory: Callable[[], SweepTracker], state_dir: Path,
                 retry_idle_s: float = RETRY_IDLE_S) -> None:
        self.tracker = tracker_factory()  # read from it after ``drain()``
        if self.tracker.apply_now:
            raise ValueError("BackgroundWriter needs a tracker built with apply_now=False")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._retry_idle_s = retry_idle_s
        self._wake = threading.Event()
        self._stop = False
        self._idle = threading.Condition()
        self._submitted = 0  # operations recorded
        self._passed = 0  # recorded operations a writing pass has gone over
        self._busy_s = 0.0  # time spent writing, for the bench
        left = self.tracker.pending_operations()
        if left:
            log.info("MLflow: %d operation(s) an earlier driver left pending are written first",
                     left)
            self._wake.set()
        self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self._thread.start()

    @property
    def busy_seconds(self) -> float:
        """Wall time the writer thread spent inside tracker writes."""
        return self._busy_s

    def submit(self, method: str, *args: Any) -> None:
        """Record the operation as pending (durable on return); the thread writes it."""
        if method not in OPERATIONS:
            raise ValueError(f"unknown tracker operation {method!r}")
        getattr(self.tracker, method)(*args)
        with self._idle:
            self._submitted += 1
        self._wake.set()

    def sync_to_disk(self) -> None:
        """fsync what is pending: it survives a machine crash too."""
        self.tracker.sync_to_disk()

    def pending(self) -> int:
        """Operations recorded and not written yet."""
        return self.tracker.pending_operations()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until a writing pass has gone over everything submitted so far (written, or
        left pending by a failed write); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._passed < self._submitted:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.set()
                self._idle.wait(1.0 if left is None else min(left, 1.0))
        return True

    def close(self, timeout: float | None = 120.0) -> bool:
        """Drain and stop the thread; False when operations were left pending (they wait
        for the next driver or ``python -m tuning.sync``)."""
        drained = self.drain(timeout)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5.0)
        left = self.pending()
        self.tracker.sync_to_disk()
        self.tracker.close()
        return drained and not left

    # ------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self._retry_idle_s)
            self._wake.clear()
            if self._stop:
                break
            with self._idle:
                target = self._submitted
            t0 = time.perf_counter()
            try:
                # Unless a failed write's backoff still runs: then new work waits behind the
                # older, and an idle wake-up retries once it has run out.
                self.tracker.catch_up()
            except Exception:  # the tracker keeps outages pending itself: this is a bug
                log.exception("MLflow writer pass failed; the sweep continues")
            finally:
                self._busy_s += time.perf_counter() - t0
            with self._idle:
                self._passed = max(self._passed, target)
                self._idle.notify_all()
