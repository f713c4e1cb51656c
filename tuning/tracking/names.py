"""What the sweep's MLflow runs are called: their tag names, the short names and values that
make a trial's run name (``lr=1e-3 clip=1 [00003]``, also the live table's headers), and
the link into the MLflow UI that finds the sweep's runs."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from tuning.tracking.values import search_quote

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
        search += f" AND tags.`{TAG_SWEEP_UID}` = '{search_quote(sweep_uid)}'"
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

