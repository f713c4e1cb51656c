"""Prune a trial's Ray checkpoints without deleting the one a restore would need.

Ray's own ``CheckpointConfig(num_to_keep=K)`` deletes a trial's older checkpoints as soon as
a newer one registers (ray/train/_internal/checkpoint_manager.py, ``register_checkpoint``),
while the experiment snapshot that ``Tuner.restore`` reads is written only every few
seconds. A driver killed in between leaves a snapshot that names a checkpoint already
deleted, and the restored trial fails with "Could not recover from checkpoint as it does
not exist on storage anymore" (the SIGKILL fault test hit exactly this).

So the sweep tells Ray to keep every checkpoint, and this callback prunes instead, in the
driver, after each new checkpoint: it keeps the newest ``keep`` and the checkpoint a restore
from the newest experiment snapshot on disk would load (the newest one that snapshot names:
its checkpoint manager, told to keep everything, names every older one too, which is why
only the newest is protected). The callback runs on the driver's event loop, the same thread
that writes the snapshots, so none is half-written while it looks. When ``fit`` returns
the final snapshot is on disk and ``prune_experiment`` brings every trial down to ``keep``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^checkpoint_(\d+)$")
_CKPT_NAME_RE = re.compile(r"checkpoint_\d{6}")


def _names_in(value: Any) -> set[str]:
    """checkpoint_N names anywhere in a snapshot entry, pickled parts included (Ray stores
    its checkpoint manager as hex-encoded cloudpickle: paths sit in it as plain bytes)."""
    names: set[str] = set()
    if isinstance(value, dict):
        if value.get("_type") == "CLOUDPICKLE_FALLBACK" and isinstance(value.get("value"), str):
            with contextlib.suppress(ValueError):
                names |= set(_CKPT_NAME_RE.findall(bytes.fromhex(value["value"]).decode(
                    "latin-1")))
        for v in value.values():
            names |= _names_in(v)
    elif isinstance(value, list):
        for v in value:
            names |= _names_in(v)
    elif isinstance(value, str):
        names |= set(_CKPT_NAME_RE.findall(value))
        if value.startswith(("{", "[")):  # Ray nests JSON documents as strings
            with contextlib.suppress(ValueError):
                names |= _names_in(json.loads(value))
    return names


def snapshot_checkpoints(experiment_dir: Path, trial_id: str) -> set[str] | None:
    """The checkpoint dir a restore from the newest experiment snapshot would load for
    `trial_id` (the newest it names), as a set: empty when it has no such trial (or no
    snapshot exists yet); None when it cannot be read (then nothing may be pruned)."""
    states = sorted(experiment_dir.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        data = json.loads(states[-1].read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("trial_data", []), list):
        return None
    for entry in data.get("trial_data", []):
        try:
            trial = json.loads(entry[0])
        except (ValueError, TypeError, IndexError):
            return None
        if isinstance(trial, dict) and trial.get("trial_id") == trial_id:
            names = _names_in(entry)  # checkpoint_NNNNNN: the newest sorts last
            return {max(names)} if names else set()
    return set()


def prune_trial_checkpoints(trial_dir: Path, keep: int, protected: set[str]) -> list[Path]:
    """Delete checkpoint_N dirs older than the newest `keep`, except the `protected` names;
    returns what was deleted."""
    found = sorted((int(m.group(1)), p) for p in trial_dir.iterdir()
                   if p.is_dir() and (m := _CKPT_RE.match(p.name)))
    deleted = []
    for _, path in found[:-keep] if keep > 0 else []:
        if path.name in protected:
            continue  # what a restore from the snapshot on disk would load
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def prune_experiment(experiment_dir: Path, keep: int) -> list[Path]:
    """Prune every trial dir of a finished (or stopped) fit to its newest `keep` plus the
    one the final snapshot names; returns what was deleted."""
    deleted: list[Path] = []
    for trial_dir in sorted(p for p in Path(experiment_dir).iterdir() if p.is_dir()):
        trial_id = _trial_id_of(trial_dir)
        protected = snapshot_checkpoints(experiment_dir, trial_id) if trial_id else None
        if protected is not None:
            deleted += prune_trial_checkpoints(trial_dir, max(1, keep), protected)
    return deleted


def _trial_id_of(trial_dir: Path) -> str | None:
    # Ray names trial dirs <trainable>_<trial_id>_<n>_<params>_<date>; ids are xxxxx_NNNNN
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", trial_dir.name)
    return match.group(1) if match else None


class CheckpointPruner(Callback):
    """Keeps the newest `keep` Ray checkpoints per trial, plus the snapshot's."""

    def __init__(self, keep: int) -> None:
        self.keep = max(1, int(keep))

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial,
                      checkpoint: Any, **info: Any) -> None:
        try:
            trial_dir = Path(trial.local_path)
            protected = snapshot_checkpoints(trial_dir.parent, str(trial.trial_id))
            if protected is not None:
                prune_trial_checkpoints(trial_dir, self.keep, protected)
        except Exception:  # pruning is housekeeping: never end a sweep over it
            log.exception("pruning checkpoints of trial %s failed", trial)
