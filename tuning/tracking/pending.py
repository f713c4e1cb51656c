"""What the sweep's MLflow store does not show yet: one small keyed document.

``mlflow_pending.jsonl`` in the tracker's state directory holds the tracker operations that
were asked for and not written: a run to start, params, tags, a trial's ``metrics.jsonl`` to
ship up to a step, final metrics, artifacts, a run to finish. It replaces the driver's inbox
and the outage journal with one thing that both needed:

* **Keyed, not a queue.** An operation has a key (its kind and its run); asking again for
  the same thing changes the waiting entry instead of adding one (a ship request raises its
  step, tags merge, a restart drops a waiting finish). So what is pending stays as small as
  the sweep's lifecycle, however long an outage lasts, and holds no step record: those stay
  in the trials' ``metrics.jsonl``, read again above the watermark when a ship is written.
* **Durable before it is acknowledged.** A change is one line appended to the file before
  the call returns (the file is a log of changes to the entries, compacted to one line per
  entry as it grows), so a SIGKILL of the driver loses nothing it was told; ``sync`` fsyncs
  it (the callback does before Ray commits a trial checkpoint).
* **Shared by processes.** Every change reads what other processes appended, under an
  exclusive ``flock``, so a ``python -m tuning.sync`` beside a live driver adds to and
  removes from the same entries. An entry is removed only if nobody changed it since it was
  read (``seq``, which only grows), so a request raised while its older version was being
  written stays.
* Entries are written to the store in the order they were first asked for: a parent before
  its trials, a trial's start before its records and its finish.
* An operation the store refuses for good goes to ``mlflow_rejected.jsonl`` for a human to
  read, never retried.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.fsutil import fsync_dir
from tuning.tracking.errors import short_reason

log = logging.getLogger(__name__)

PENDING_FILE = "mlflow_pending.jsonl"
PENDING_LOCK_FILE = ".mlflow_pending.lock"
REJECTED_FILE = "mlflow_rejected.jsonl"
# Compact the file once it holds more lines than this many per entry, plus the slack.
_COMPACT_FACTOR = 4
_COMPACT_SLACK = 64


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
        # The document as of this object's last look at the file: (inode, size) it had
        # then, and how many lines it holds.
        self._doc: dict[str, Any] = {"seq": 0, "ops": {}}
        self._seen: tuple[int, int] | None = None
        self._lines = 0
        # Kept open between changes: a hook's change is then a flock, a stat and a write
        # (each system call lets the writer thread take the GIL, for up to 5 ms).
        self._lock_fd: int | None = None
        self._append: Any = None  # the file's append handle, for the inode in _seen
        self._dir_dirty = False  # the file was created or replaced since the last sync

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

        def change(doc: dict[str, Any]) -> list[dict[str, Any]]:
            lines: list[dict[str, Any]] = []
            for cancelled in _CANCELLED_BY.get(op["op"], ()):
                gone = key_of({"op": cancelled, "trial_id": op.get("trial_id")})
                if doc["ops"].pop(gone, None) is not None:
                    lines.append({"del": gone})
            doc["seq"] += 1
            old = doc["ops"].get(key)
            entry = _merge(old, op) if old is not None else dict(op)
            # Its place in the order is where it was first asked for; its seq is new, so a
            # writer holding the old version does not remove it.
            entry["order"] = old["order"] if old is not None else doc["seq"]
            entry["seq"] = doc["seq"]
            doc["ops"][key] = entry
            return [*lines, {"set": key, "e": entry}]

        self._change(change)

    def done(self, key: str, seq: int) -> None:
        """The entry ``key`` as read at ``seq`` is written: remove it, unless it was asked
        for again since (then the newer version still waits)."""

        def change(doc: dict[str, Any]) -> list[dict[str, Any]]:
            if doc["ops"].get(key, {}).get("seq") != seq:
                return []
            del doc["ops"][key]
            return [{"del": key}]

        self._change(change)

    def note_server_error(self, key: str, seq: int) -> int:
        """Count an error answer against the entry; return its count so far."""
        counted = [0]

        def change(doc: dict[str, Any]) -> list[dict[str, Any]]:
            entry = doc["ops"].get(key)
            if entry is None or entry.get("seq") != seq:
                return []
            entry["server_errors"] = counted[0] = int(entry.get("server_errors", 0)) + 1
            return [{"set": key, "e": entry}]

        self._change(change)
        return counted[0]

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
            if self._append is not None:
                os.fsync(self._append.fileno())
            elif self.path.exists():
                with open(self.path, "rb") as fh:
                    os.fsync(fh.fileno())
            if self._dir_dirty:  # its name, once new
                fsync_dir(self.state_dir)
                self._dir_dirty = False

    def close(self) -> None:
        """Release the file handles (the object can be used again)."""
        with self._thread_lock:
            self._close_append()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # ------------------------------------------------------------------ the file
    #
    # Stored as JSON lines of changes: {"seq": N} (a compacted file's first line), {"set":
    # key, "e": entry} and {"del": key}; read by applying them in order. A change is one
    # appended line (a write of microseconds, where rewriting the file would cost a
    # rename per result), and the file is compacted (rewritten atomically to one line per
    # entry) once it holds many more lines than entries.

    @contextlib.contextmanager
    def _owned(self) -> Iterator[dict[str, Any]]:
        """The document, current under the thread lock and the file lock."""
        with self._thread_lock:
            if self._lock_fd is None:
                self._lock_fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield self._current()
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _change(self, change: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> None:
        with self._owned() as doc:
            lines = change(doc)
            if not lines:
                return
            if self._lines + len(lines) > _COMPACT_FACTOR * len(doc["ops"]) + _COMPACT_SLACK:
                self._compact(doc)
                return
            data = "".join(json.dumps(line, sort_keys=True, default=str) + "\n"
                           for line in lines).encode()
            if self._append is None:
                self._dir_dirty |= not self.path.exists()
                self._append = open(self.path, "ab", buffering=0)  # noqa: SIM115 (kept)
                st = os.fstat(self._append.fileno())
                self._seen = (st.st_ino, st.st_size)
            self._append.write(data)  # unbuffered: in the OS before this returns
            assert self._seen is not None
            self._seen = (self._seen[0], self._seen[1] + len(data))
            self._lines += len(lines)

    def _current(self) -> dict[str, Any]:
        """The document: the cached one while only this object changed the file, else
        read again (only the lines appended since, when the file is the same one)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._close_append()
            self._doc, self._seen, self._lines = {"seq": 0, "ops": {}}, None, 0
            return self._doc
        if self._seen == (st.st_ino, st.st_size):
            return self._doc
        if self._seen is None or self._seen[0] != st.st_ino:
            self._close_append()  # replaced (compacted) by another process
        offset = 0
        if self._seen is not None and self._seen[0] == st.st_ino and st.st_size > self._seen[1]:
            offset = self._seen[1]  # another process appended: read its lines only
        else:
            self._doc, self._lines = {"seq": 0, "ops": {}}, 0
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        bad = 0
        for raw in data.splitlines():
            try:
                line = json.loads(raw)
                self._apply_line(line)
            except (ValueError, KeyError, TypeError, AttributeError):
                bad += 1
                continue
            self._lines += 1
        self._seen = (st.st_ino, offset + len(data))
        if bad or (data and not data.endswith(b"\n")):
            # Only a crash mid-append or outside damage gets here. Keep the file as it was
            # for a human, and go on with what was readable, compacted (which also ends a
            # torn last line, so the next append starts a line of its own).
            aside = self.path.with_name(f"{PENDING_FILE}.damaged-{time.time_ns()}")
            shutil.copyfile(self.path, aside)
            log.warning("%s: %d unreadable line(s) skipped (the file is kept as %s); what "
                        "was readable stays pending", self.path, bad, aside)
            self._compact(self._doc)
        return self._doc

    def _apply_line(self, line: dict[str, Any]) -> None:
        if "set" in line:
            entry = line["e"]
            if not (isinstance(entry, dict) and "op" in entry and isinstance(entry["seq"], int)):
                raise ValueError("an entry without op/seq")
            self._doc["ops"][str(line["set"])] = entry
            self._doc["seq"] = max(self._doc["seq"], entry["seq"])
        elif "del" in line:
            self._doc["ops"].pop(str(line["del"]), None)
        else:
            self._doc["seq"] = max(self._doc["seq"], int(line["seq"]))

    def _compact(self, doc: dict[str, Any]) -> None:
        # Kept when empty (the header line): its seq must never run again from 0, or a
        # writer still holding an old entry's seq could remove a new entry that happens
        # to get the same one.
        lines = [{"seq": doc["seq"]}] + [{"set": k, "e": e} for k, e in doc["ops"].items()]
        tmp = self.path.with_name(f".{PENDING_FILE}.tmp")
        tmp.write_text("".join(json.dumps(line, sort_keys=True, default=str) + "\n"
                               for line in lines))
        os.replace(tmp, self.path)  # atomic: a reader sees the old or the new, never half
        self._close_append()
        self._dir_dirty = True
        st = os.stat(self.path)
        self._doc, self._seen, self._lines = doc, (st.st_ino, st.st_size), len(lines)

    def _close_append(self) -> None:
        if self._append is not None:
            self._append.close()
            self._append = None
