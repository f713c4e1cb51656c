"""What the sweep's MLflow store does not show yet: one small document, not a log.

``mlflow_pending.json`` in the tracker's state directory holds the tracker operations that
were asked for and not written: a run to start, params, tags, a trial's ``metrics.jsonl`` to
ship up to a step, final metrics, artifacts, a run to finish. It replaces the driver's inbox
and the outage journal with one thing that both needed:

* **Keyed, not appended.** An operation has a key (its kind and its run); asking again for
  the same thing changes the waiting entry instead of adding one (a ship request raises its
  step, tags merge, a restart drops a waiting finish). So the document stays as small as the
  sweep's lifecycle, however long an outage lasts, and holds no step record: those stay in
  the trials' ``metrics.jsonl``, read again above the watermark when a ship is written.
* **Durable before it is acknowledged.** ``add`` rewrites the file atomically (temp file +
  rename) before it returns, so a SIGKILL of the driver loses nothing it was told; ``sync``
  fsyncs it (the callback does before Ray commits a trial checkpoint).
* **Shared by processes.** Every change re-reads the file under an exclusive ``flock``, so a
  ``python -m tuning.sync`` beside a live driver adds to and removes from the same document.
  An entry is removed only if nobody changed it since it was read (``seq``, which only
  grows), so a request raised while its older version was being written stays.
* Entries are written in the order they were first asked for (``seq``): a parent before its
  trials, a trial's start before its records and its finish.
* An operation the store refuses for good goes to ``mlflow_rejected.jsonl`` for a human to
  read, never retried.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.fsutil import fsync_dir
from tuning.tracking.errors import short_reason

log = logging.getLogger(__name__)

PENDING_FILE = "mlflow_pending.json"
PENDING_LOCK_FILE = ".mlflow_pending.lock"
REJECTED_FILE = "mlflow_rejected.jsonl"


@dataclass
class ReplayReport:
    """What one pass over the pending operations did."""

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
            f"wrote {self.applied} pending operation(s) [{ops}]; metric steps logged "
            f"{self.steps_logged}, dropped as already logged {self.steps_dropped}; "
            f"rejected {self.rejected}; {self.remaining} still pending"
        )
        if self.error:
            text += f"; stopped: {self.error}"
        return text


def key_of(op: dict[str, Any]) -> str:
    """The entry an operation goes to: one per kind and run (an artifact: per file)."""
    kind = op["op"]
    target = op.get("trial_id") or ""
    if kind == "artifact":
        return f"artifact|{target}|{op['path']}|{op.get('artifact_path') or ''}"
    return f"{kind}|{target}"


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The waiting entry ``old`` asked for again as ``new``."""
    kind = new["op"]
    if kind == "ship":  # one request stands for every later report: the file is read again
        return {**new, "through": max(int(old.get("through", 0)), int(new["through"]))}
    if kind == "tags":
        return {**old, "tags": {**old.get("tags", {}), **new.get("tags", {})}}
    if kind == "metrics":  # a caller's own records (log_records): they have no other copy
        # By step, the first kept (a re-reported step has the same values), in step order.
        return {**old, "rows": _by_step(old.get("rows", []), new.get("rows", [])),
                "events": _by_step(old.get("events", []), new.get("events", []))}
    if kind == "params":  # logged once: the first ask stands
        return old
    return new


def _by_step(first: list[dict[str, Any]], then: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = {int(r["step"]): r for r in reversed(then)}
    rows.update({int(r["step"]): r for r in reversed(first)})
    return [rows[step] for step in sorted(rows)]


# A start makes the run live again: a finish (or a kill) asked for before it is moot.
_CANCELLED_BY = {
    "start_trial": ("finish_trial",),
    "start_parent": ("finish_parent", "kill_running"),
}


class PendingOps:
    """The pending document of one state directory. Thread- and process-safe."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / PENDING_FILE
        self.rejected_path = self.state_dir / REJECTED_FILE
        self._lock_path = self.state_dir / PENDING_LOCK_FILE
        self._thread_lock = threading.Lock()

    def exists(self) -> bool:
        """Whether anything was ever asked for in this state directory."""
        return self.path.exists()

    # ------------------------------------------------------------------ reading

    def entries(self) -> list[dict[str, Any]]:
        """The waiting operations in the order they were first asked for; each carries its
        ``key`` and ``seq`` (pass both back to ``done``)."""
        with self._owned() as doc:
            ops = [{**op, "key": key} for key, op in doc["ops"].items()]
        return sorted(ops, key=lambda op: op["order"])

    def count(self) -> int:
        with self._owned() as doc:
            return len(doc["ops"])

    # ------------------------------------------------------------------ changing

    def add(self, op: dict[str, Any]) -> None:
        """Ask for ``op``: a new entry, or the waiting one of its key changed (durable on
        return, against a process crash)."""
        key = key_of(op)
        with self._owned(write=True) as doc:
            for cancelled in _CANCELLED_BY.get(op["op"], ()):
                doc["ops"].pop(key_of({"op": cancelled, "trial_id": op.get("trial_id")}), None)
            doc["seq"] += 1
            old = doc["ops"].get(key)
            entry = _merge(old, op) if old is not None else dict(op)
            # Its place in the order is where it was first asked for; its seq is new, so a
            # writer holding the old version does not remove it.
            entry["order"] = old["order"] if old is not None else doc["seq"]
            entry["seq"] = doc["seq"]
            doc["ops"][key] = entry

    def done(self, key: str, seq: int) -> None:
        """The entry ``key`` as read at ``seq`` is written: remove it, unless it was asked
        for again since (then the newer version still waits)."""
        with self._owned(write=True) as doc:
            if doc["ops"].get(key, {}).get("seq") == seq:
                del doc["ops"][key]

    def note_server_error(self, key: str, seq: int) -> int:
        """Count an error answer against the entry; return its count so far."""
        with self._owned(write=True) as doc:
            entry = doc["ops"].get(key)
            if entry is None or entry.get("seq") != seq:
                return 0
            entry["server_errors"] = int(entry.get("server_errors", 0)) + 1
            return entry["server_errors"]

    def reject(self, op: dict[str, Any], exc: BaseException) -> None:
        """Keep an operation the store refused for good where a human finds it, and stop
        asking for it."""
        log.error("MLflow refused %s for %s: %s (kept in %s)", op.get("op"),
                  op.get("trial_id") or "the parent run", short_reason(exc), self.rejected_path)
        entry = {k: v for k, v in op.items() if k not in ("key", "seq", "order")}
        entry.update(error=str(exc)[:2000], rejected_ms=int(time.time() * 1000))
        with open(self.rejected_path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done(op["key"], op["seq"])

    def sync(self) -> None:
        """fsync the document: what was asked for survives a machine crash too."""
        with self._owned():
            if self.path.exists():
                with open(self.path, "rb") as fh:
                    os.fsync(fh.fileno())
                fsync_dir(self.state_dir)

    # ------------------------------------------------------------------ the file

    @contextlib.contextmanager
    def _owned(self, write: bool = False) -> Iterator[dict[str, Any]]:
        """The document, read under the thread lock and the file lock; written back
        atomically when ``write``."""
        with self._thread_lock:
            fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                doc = self._read()
                yield doc
                if write:
                    self._write(doc)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _read(self) -> dict[str, Any]:
        empty: dict[str, Any] = {"seq": 0, "ops": {}}
        if not self.path.exists():
            return empty
        try:
            doc = json.loads(self.path.read_bytes())
            if not (isinstance(doc, dict) and isinstance(doc.get("ops"), dict)
                    and isinstance(doc.get("seq"), int)):
                raise ValueError("not a pending-operations document")
            for op in doc["ops"].values():
                if not (isinstance(op, dict) and "op" in op and "seq" in op):
                    raise ValueError("an entry without op/seq")
        except (OSError, ValueError) as exc:
            # Written atomically, so only outside damage gets here. Keep it for a human and
            # go on: step records are not in it (they stay in the trials' metrics.jsonl and
            # are shipped by the next report or tuning.sync).
            aside = self.path.with_name(f"{PENDING_FILE}.damaged-{int(time.time())}")
            os.replace(self.path, aside)
            log.warning("%s is unreadable (%s); moved to %s, pending operations dropped",
                        self.path, exc, aside)
            return empty
        return doc

    def _write(self, doc: dict[str, Any]) -> None:
        # Kept when empty: its seq must never run again from 0, or a writer still holding
        # an old entry's seq could remove a new entry that happens to get the same one.
        tmp = self.path.with_name(f".{PENDING_FILE}.tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True, default=str))
        os.replace(tmp, self.path)  # atomic: a reader sees the old or the new, never half
