"""``mlflow_state.json``: what the tracker remembers about a sweep between processes.

Per tracking store: the experiment id, the parent run id and, per trial, its child run id
and watermark (highest step stored). Written atomically after every change that matters
(create, batch stored), so a SIGKILL leaves the old or the new state, never half of one.
A state that is lost or damaged anyway (outside damage) is not fatal: the tracker rebuilds
it from the runs' own tags, and ``read_state`` marks such a state with ``RECOVER_KEY``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from trainer.fsutil import fsync_dir
from tuning.tracking.errors import short_reason

STATE_FILE = "mlflow_state.json"
LOCK_FILE = ".mlflow_state.lock"
STATE_VERSION = 1
# Set in a state rebuilt after mlflow_state.json was lost or damaged: runs are then found
# by their tags, and trials whose start the lost state recorded are taken as started.
RECOVER_KEY = "recovered"
_WARNED: set[Path] = set()  # state files already reported damaged by this process


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


def read_state(path: Path, has_history: bool) -> dict[str, Any]:
    """The state in ``path``; a fresh one when there is none and ``has_history`` is False
    (a new sweep), else a fresh one marked ``RECOVER_KEY`` (warned once per process)."""
    fresh = {"version": STATE_VERSION, "stores": {}, "trials": {}}
    if not path.exists():
        if not has_history:
            return fresh
        why = "missing"
    else:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
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
    if path not in _WARNED:
        _WARNED.add(path)
        print(f"[mlflow] warning: {path} is {why}; rebuilding it from the "
              "runs in the tracking store (the sweep's parent and child runs are found "
              "by their tags; nothing is logged twice)", file=sys.stderr, flush=True)
    return {**fresh, RECOVER_KEY: True}


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and durably (temp file, fsync, rename)."""
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(state, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def store_section(state: dict[str, Any], store_key: str) -> dict[str, Any]:
    """The part of ``state`` that belongs to the tracking store ``store_key`` (its URI),
    created empty on first use."""
    # Run ids and watermarks belong to one tracking store; replaying into another store
    # (tuning.sync --tracking-uri) must not reuse them.
    store = state["stores"].setdefault(store_key, {})
    store.setdefault("trials", {})
    return store


def trial_section(state: dict[str, Any], store_key: str, trial_id: str) -> dict[str, Any]:
    """What ``state`` keeps about ``trial_id`` in the store ``store_key`` (its run id,
    watermark, ...), created empty on first use."""
    return store_section(state, store_key)["trials"].setdefault(trial_id, {})
