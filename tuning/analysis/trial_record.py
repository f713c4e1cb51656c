"""One sweep trial as plain data: resolved knobs, per-step metric history, outcome.

Deliberately free of Ray / MLflow imports so the analysis modules (stability, leaderboard,
advice, plots) can run on a laptop against copied run directories.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainer.errors import ConfigError
from trainer.yaml_io import load_yaml_file

# Ray Tune's trial states; the trainer's summary.json may use its own words (see _STATUS_ALIASES).
TRIAL_STATUSES = ("TERMINATED", "ERROR", "RUNNING", "PENDING")
# Written into a trial's run dir by the trainable when its watchdog saw no step for too long.
STALL_FILE = "stalled.json"

_STATUS_ALIASES = {
    "completed": "TERMINATED",
    # The trainer's summary says "unstable" when it stopped a run itself (nan_stop, nan_abort,
    # diverged): the process ended normally, and end_reason carries the why.
    "unstable": "TERMINATED",
    "complete": "TERMINATED",
    "done": "TERMINATED",
    "finished": "TERMINATED",
    "ok": "TERMINATED",
    "success": "TERMINATED",
    "terminated": "TERMINATED",
    "stopped": "TERMINATED",
    "early_stopped": "TERMINATED",
    "error": "ERROR",
    "failed": "ERROR",
    "crashed": "ERROR",
    "running": "RUNNING",
    "pending": "PENDING",
}

RESOLVED_CONFIG = "config.resolved.yaml"  # the trainer's record of a run's whole config

# The seed's defaults: projector at 5x base LR, LoRA at 0.5x.
DEFAULT_PROJECTOR_LR_MULT = 5.0
DEFAULT_LORA_LR_MULT = 0.5


@dataclass
class TrialRecord:
    """A trial's knobs, its per-optimizer-step metrics and how it ended."""

    trial_id: str
    params: dict[str, Any]
    history: list[dict[str, Any]]
    status: str
    end_reason: str | None
    nan_events: list[dict[str, Any]]
    # Planned optimizer steps, when known (summary.json total_steps); lets "incomplete" and the
    # "last 20% of training" windows refer to the plan rather than to what happened to be logged.
    total_steps: int | None = None
    # The trainer run directory it was read from (None when built in memory): its
    # config.resolved.yaml is the whole config the trial ran (best_stable.yaml copies it).
    run_dir: Path | None = None

    @classmethod
    def from_run_dir(cls, path: str | Path, trial_id: str | None = None) -> TrialRecord:
        """Read a trainer run directory (metrics.jsonl, summary.json, config.resolved.yaml).

        Missing files are tolerated: a run that has not written summary.json yet is RUNNING
        (or PENDING if it has no metrics either), because the trainer writes it last.
        """
        run_dir = Path(path)
        history = read_metrics_jsonl(run_dir / "metrics.jsonl")
        summary = _read_json(run_dir / "summary.json")
        params = read_phase2_params(run_dir / RESOLVED_CONFIG)
        if summary is None:
            status = "RUNNING" if history else "PENDING"
            return cls(
                trial_id=trial_id or run_dir.name,
                params=params,
                history=history,
                status=status,
                end_reason=None,
                nan_events=[],
                run_dir=run_dir,
            )
        return cls(
            trial_id=trial_id or str(summary.get("trial_id") or run_dir.name),
            params=params,
            history=history,
            status=normalize_status(summary.get("status"), summary.get("end_reason")),
            end_reason=summary.get("end_reason"),
            nan_events=_event_list(summary.get("nan_events")),
            total_steps=_int_or_none(summary.get("total_steps")),
            run_dir=run_dir,
        )

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of one metric, skipping steps where it is missing or None."""
        steps: list[int] = []
        values: list[float] = []
        for step, value in self.iter_metric(key):
            steps.append(step)
            values.append(value)
        return steps, values

    def iter_metric(self, key: str) -> Iterator[tuple[int, float]]:
        """Yield (step, value) for finite values of ``key`` in step order."""
        for index, row in enumerate(self.history, start=1):
            value = finite_or_none(row.get(key))
            if value is not None:
                yield int(row.get("step", index)), value

    @property
    def steps_done(self) -> int:
        """Last logged optimizer step (0 with no history)."""
        if not self.history:
            return 0
        return int(self.history[-1].get("step", len(self.history)))

    @property
    def base_lr(self) -> float | None:
        """Base learning rate (``learning_rate``), the sweep's main axis."""
        return finite_or_none(self.params.get("learning_rate"))

    @property
    def projector_lr_mult(self) -> float | None:
        """Projector LR multiplier: explicit knob, else projector_lr / learning_rate, else 5x."""
        return self._group_mult("projector", DEFAULT_PROJECTOR_LR_MULT)

    @property
    def lora_lr_mult(self) -> float | None:
        """LoRA LR multiplier: explicit knob, else lora_lr / learning_rate, else 0.5x."""
        return self._group_mult("lora", DEFAULT_LORA_LR_MULT)

    def _group_mult(self, group: str, default: float) -> float | None:
        explicit = finite_or_none(self.params.get(f"{group}_lr_mult"))
        if explicit is not None:
            return explicit
        group_lr = finite_or_none(self.params.get(f"{group}_lr"))
        base = self.base_lr
        if group_lr is not None and base:
            return group_lr / base
        # The trainer derives the group LR from the seed's default multiplier when unset.
        return default if base is not None else None


def normalize_status(raw: Any, end_reason: str | None = None) -> str:
    """Map the trainer's / Ray's status words onto TRIAL_STATUSES (unknown -> ERROR)."""
    if raw is None:
        # summary.json is written when the run ends, so a missing status means it ended;
        # only the end reason can tell a crash from a normal finish.
        return "ERROR" if end_reason == "error" else "TERMINATED"
    text = str(raw).strip()
    if text.upper() in TRIAL_STATUSES:
        return text.upper()
    # Unknown words are treated as failures so they never sneak into the "stable" list.
    return _STATUS_ALIASES.get(text.lower(), "ERROR")


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def read_metrics_jsonl(path: Path) -> list[dict[str, Any]]:
    """Per-step metric rows, sorted by step, one per step; non-finite numbers become None.

    A half-written last line (the trainer may be mid-write while we read) is skipped rather
    than failing the whole sweep report.
    """
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(_scrub_non_finite(row))
    return _dedupe_steps(rows)


def _dedupe_steps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # A resumed trainer re-runs the steps after its checkpoint and truncates the file first;
    # if it crashed in between, a step can appear twice.  The later line is the one that
    # led to the checkpoint the run continued from, so it wins.
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        step = _int_or_none(row.get("step"))
        if step is not None:
            by_step[step] = row
    return [by_step[step] for step in sorted(by_step)]


def read_phase2_params(path: Path) -> dict[str, Any]:
    """The ``phase2:`` mapping of a resolved trainer config ({} if the file is missing)."""
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    phase2 = data.get("phase2") or {}
    if not isinstance(phase2, dict):
        raise ValueError(f"{path}: 'phase2' must be a mapping, got {type(phase2).__name__}")
    return dict(phase2)


def swept_values(record: TrialRecord, keys: Sequence[str]) -> dict[str, Any]:
    """The record's value of each swept key: phase2 knobs from its params, dotted keys
    (``model.lora.r``) from its run directory's config.resolved.yaml; absent keys left out.

    Keys keep the spelling they were given (``phase2.learning_rate`` stays so). The file is
    read at most once per call: callers that need many keys pass them together.
    """
    values: dict[str, Any] = {}
    resolved: Any = None
    for key in keys:
        name = key.removeprefix("phase2.")
        if "." not in name:
            if name in record.params:
                values[key] = record.params[name]
            continue
        if resolved is None:
            path = record.run_dir / RESOLVED_CONFIG if record.run_dir else None
            try:
                resolved = load_yaml_file(path) if path is not None and path.is_file() else {}
            except ConfigError:  # a damaged config: the trial simply lacks these knobs
                resolved = {}
        node: Any = resolved
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            values[key] = node
    return values


_MISSING = object()


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file; None (with a warning line) when it is missing or damaged: the
    trial's steps live in metrics.jsonl, so a lost summary loses no step."""
    if not path.is_file():
        return None
    data = read_json_object(path)
    if data is None:
        print(f"warning: {path} is damaged; the trial's status is taken from its "
              "metrics.jsonl (rerun the trial's sweep to rewrite it)", file=sys.stderr)
    return data


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when it is unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _scrub_non_finite(row: dict[str, Any]) -> dict[str, Any]:
    # Python's json module accepts NaN/Infinity literals; the contract says they are stored as
    # None, so normalise here and every consumer can rely on "None means non-finite".
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in row.items()
    }


def _event_list(value: Any) -> list[dict[str, Any]]:
    # Only a list of event dicts is usable here; a bare count (some trainer versions) is
    # ignored because the per-step cumulative "nan_events" metric carries the same number.
    if not isinstance(value, list):
        return []
    return [event for event in value if isinstance(event, dict)]


def _int_or_none(value: Any) -> int | None:
    number = finite_or_none(value)
    return int(number) if number is not None else None


__all__ = [
    "DEFAULT_LORA_LR_MULT",
    "DEFAULT_PROJECTOR_LR_MULT",
    "RESOLVED_CONFIG",
    "TRIAL_STATUSES",
    "TrialRecord",
    "finite_or_none",
    "normalize_status",
    "read_json_object",
    "read_metrics_jsonl",
    "read_phase2_params",
    "swept_values",
]
