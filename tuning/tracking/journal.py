"""The outage journal: MLflow operations that could not be written yet, in their order.

An append-only, fsync'd file (``mlflow_journal.jsonl``) in the tracker's state directory;
``SweepTracker`` appends an operation when the store is down (or older ones still wait) and
replays the file in order once it answers again, rewriting what is left atomically. An
operation the store refused for good goes to ``mlflow_journal.rejected.jsonl`` for a human
to read, never retried, so one poisoned operation cannot block the journal forever.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.fsutil import fsync_dir
from tuning.tracking.errors import short_reason

log = logging.getLogger(__name__)

JOURNAL_FILE = "mlflow_journal.jsonl"
REJECTED_FILE = "mlflow_journal.rejected.jsonl"


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


class Journal:
    """The journal and rejected files of one state directory (callers hold its lock)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / JOURNAL_FILE
        self.rejected_path = self.state_dir / REJECTED_FILE

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> list[dict[str, Any]]:
        """The journaled operations in order; a torn or garbled line is skipped (warned)."""
        if not self.path.exists():
            return []
        ops = []
        lines = self.path.read_bytes().splitlines()
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
                log.warning("%s:%d: torn journal line skipped", self.path, number)
        return ops

    def append(self, op: dict[str, Any]) -> None:
        """Add ``op`` at the end, durably (fsync'd before this returns)."""
        created = not self.path.exists()
        with open(self.path, "a") as fh:
            fh.write(json.dumps(op, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if created:
            fsync_dir(self.state_dir)

    def rewrite(self, ops: list[dict[str, Any]]) -> None:
        """Replace the journal with ``ops`` atomically; none left removes the file."""
        if not ops:
            self.path.unlink(missing_ok=True)
            fsync_dir(self.state_dir)
            return
        tmp = self.path.with_name(f".{JOURNAL_FILE}.tmp")
        with open(tmp, "w") as fh:
            for op in ops:
                fh.write(json.dumps(op, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.state_dir)

    def reject(self, op: dict[str, Any], exc: BaseException) -> None:
        """Keep an operation the store refused for good where a human finds it."""
        log.error(
            "MLflow refused %s for %s: %s (kept in %s)",
            op.get("op"),
            op.get("trial_id") or "the parent run",
            short_reason(exc),
            self.rejected_path,
        )
        entry = {**op, "error": str(exc)[:2000], "rejected_ms": int(time.time() * 1000)}
        with open(self.rejected_path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

