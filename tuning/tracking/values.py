"""Values and keys cleaned into what MLflow accepts: one spelling per parameter value, keys
with only the characters MLflow allows, numbers that are finite or skipped, and the limits
of one ``log_batch`` call."""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# mlflow/utils/validation.py: MAX_METRICS_PER_BATCH = 1000, MAX_PARAMS_TAGS_PER_BATCH = 100,
# MAX_ENTITIES_PER_BATCH = 1000 (metrics + params + tags together). A few tags ride along with
# each metric chunk, hence the headroom.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
# Metrics per log_batch call of step records (the rest of the batch is their tags).
METRICS_PER_CHUNK = MAX_METRICS_PER_BATCH - 10
_MAX_PARAM_VALUE_LEN = 6000  # MAX_PARAM_VAL_LENGTH
_MAX_TAG_VALUE_LEN = 8000  # MAX_TAG_VAL_LENGTH

_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


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
        name = clean_key(f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            out[name] = stringify_param(value)
    return out


def clean_key(key: str) -> str:
    """``key`` as MLflow takes it: alphanumerics, '_', '-', '.', ' ', '/', at most 250 chars."""
    return _KEY_BAD_CHARS.sub("_", str(key))[:250]


def tag_value(value: Any) -> str:
    """A tag's value: strings as they are, others spelled as a param; cut to the limit."""
    return (value if isinstance(value, str) else stringify_param(value))[:_MAX_TAG_VALUE_LEN]


def finite_number(value: Any) -> float | None:
    """float(value) when it is a real finite number, else None (None/str/NaN/inf)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def is_nonfinite(value: Any) -> bool:
    """NaN or +/-inf (a real number that MLflow must never store as a metric)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and not math.isfinite(float(value))
    )


def group_of(metric_key: str) -> str:
    """The optimizer group a key names: "grad_norm/projector" -> "projector", "loss" -> "loss"."""
    return metric_key.rsplit("/", 1)[-1]


# The trainer stamps each step record with its own time (trainer.metrics.MultiSink). MLflow's
# relative-time axis plots the metric timestamp, so a record stamped when its report batch
# arrived would draw every batch as one vertical stair.
WALL_TIME_KEY = "wall_time"


def step_time_ms(record: Mapping[str, Any], fallback_ms: int) -> int:
    """The record's own wall time in ms; ``fallback_ms`` for records that carry none."""
    seconds = finite_number(record.get(WALL_TIME_KEY))
    return int(seconds * 1000) if seconds is not None and seconds > 0 else fallback_ms


def search_quote(value: str) -> str:
    """``value`` inside a single-quoted MLflow search filter."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of at most ``size`` (MLflow's per-batch limits)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]

