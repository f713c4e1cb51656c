"""Step records on their way to MLflow: cleaned into metric rows, and read back from the
trial's own ``metrics.jsonl``.

A sweep keeps one durable copy of each step record: the ``metrics.jsonl`` the trainer writes
in the trial's run directory (``trainer.metrics.JsonlSink``; a resumed run truncates it to its
checkpoint, so every step is in it once). The tracker follows that file from the trial's
watermark instead of copying the records into files of its own, so an MLflow outage or a
killed driver needs nothing but the file and the watermark to catch up.

Reading a file the trainer is still appending to: only complete lines count (a record is
one ``write`` ending in a newline, so a line without one is still being written), and a
garbled line ends the read there (the next read starts again from the watermark).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainer.metrics import nan_event_of
from tuning.tracking.values import (
    WALL_TIME_KEY,
    clean_key,
    finite_number,
    is_nonfinite,
    step_time_ms,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # trainer.metrics.JsonlSink's file in a run directory
# The optimizer groups whose gradient norms a record carries (trainer.metrics.STEP_KEYS).
GRAD_GROUPS = ("projector", "lora")


def metric_rows(trial_id: str, records: Sequence[Mapping[str, Any]],
                received_ms: int) -> list[dict[str, Any]]:
    """Records as the tracker stores them, sorted by step: ``{"step", "ts", "m": finite
    metrics, "bad": keys whose value was NaN/inf}``. A record without an integer step is
    dropped (warned); of a step given twice the first is kept. None ("not measured") and
    the record's own ``wall_time`` are not metrics."""
    rows: dict[int, dict[str, Any]] = {}
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
            number = finite_number(value)
            if number is not None:
                metrics[clean_key(key)] = number
            elif is_nonfinite(value):
                bad.append(clean_key(key))
        rows[step] = {"step": step, "ts": step_time_ms(record, received_ms), "m": metrics,
                      "bad": bad}
    return [rows[s] for s in sorted(rows)]


def nan_event_rows(trial_id: str, events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """NaN events as the tracker stores them (``step``, ``where``, ``groups``), by step."""
    out = []
    for event in events:
        try:
            out.append({"step": int(event["step"]), "where": str(event.get("where", "")),
                        "groups": [str(g) for g in event.get("groups") or []]})
        except (KeyError, TypeError, ValueError):
            log.warning("trial %s: malformed nan event dropped: %r", trial_id, event)
    return sorted(out, key=lambda e: e["step"])


def read_after(path: Path, watermark: int) -> tuple[list[dict[str, Any]], int]:
    """The complete records of ``path`` with a step above ``watermark``, in file order, and
    the trial's NaN-event count at the last record at or below it (0 when none)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records: list[dict[str, Any]] = []
    count_before = 0
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is unfinished
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s: unreadable record; the rest is read on a later pass", path)
            break
        if step <= watermark:
            count_before = _count(record, count_before)
        else:
            records.append(record)
    return records, count_before


def nan_events_of(records: Sequence[Mapping[str, Any]], count_before: int
                  ) -> list[dict[str, Any]]:
    """The NaN events of trainer records, as dicts with ``step``, ``where`` and ``groups``
    (and ``action``, ``fp16_overflow`` when the record carried its event).

    A record with a ``nan_event`` key carries its step's event itself (None: a clean step):
    taken as it is, so the groups, ``where`` and the policy's action are the trainer's own.
    A record without the key was written before the trainer put the event in its record (a
    resumed sweep may read such a ``metrics.jsonl``): its event is rebuilt as before, from a
    step whose cumulative ``nan_events`` rose. That record holds NaN/inf as null (strict
    JSON), so the rebuilt event's groups are those whose gradient norm is missing, and it is
    a loss event when the loss is missing too.
    """
    events = []
    seen = count_before
    for record in records:
        count = _count(record, seen)
        if "nan_event" in record:
            event = _carried_event(record)
            if event is not None:
                events.append(event)
        elif count > seen:
            loss = record.get("loss")
            finite_loss = isinstance(loss, numbers.Real) and math.isfinite(loss)
            groups = [g for g in GRAD_GROUPS if not _finite(record.get(f"grad_norm/{g}"))]
            events.append({"step": int(record["step"]), "where": "grad" if finite_loss else "loss",
                           "groups": groups})
        seen = max(seen, count)
    return events


def _carried_event(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The event a record carries (``trainer.metrics.nan_event_of``) as a dict; None for a
    clean step or a garbled event (warned: the step's null values still become tags)."""
    try:
        event = nan_event_of(record)
    except (TypeError, ValueError):
        log.warning("step %s: unreadable nan_event %r skipped", record.get("step"),
                    record.get("nan_event"))
        return None
    if event is None:
        return None
    return {**asdict(event), "step": int(record["step"])}


def _count(record: Mapping[str, Any], default: int) -> int:
    value = record.get("nan_events")
    return int(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) \
        else default


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)
