"""Pruning Ray checkpoints never deletes the one the experiment snapshot on disk names
(Ray's own num_to_keep did, and a driver SIGKILL then left a trial unrestorable)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from tuning.raytune.checkpoint_pruner import prune_trial_checkpoints, snapshot_checkpoints


def _snapshot(ray_dir: Path, trial_id: str, names: list[str]) -> None:
    """An experiment_state file shaped like Ray 2.60's: the checkpoint manager pickled, hex
    encoded, inside a JSON string inside the JSON document."""
    manager = pickle.dumps({"paths": [str(ray_dir / "t" / n) for n in names]})
    metadata = {"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK",
                                       "value": manager.hex()}}
    entry = [json.dumps({"trial_id": trial_id}), json.dumps(metadata)]
    (ray_dir / "experiment_state-2026-01-01_00-00-00.json").write_text(
        json.dumps({"trial_data": [entry]}))


def test_prune_keeps_the_newest_and_what_the_snapshot_names(tmp_path: Path) -> None:
    trial_dir = tmp_path / "t"
    for i in range(1, 8):
        (trial_dir / f"checkpoint_{i:06d}").mkdir(parents=True)
    _snapshot(tmp_path, "abc_00000", ["checkpoint_000003"])
    protected = snapshot_checkpoints(tmp_path, "abc_00000")
    assert protected == {"checkpoint_000003"}
    deleted = prune_trial_checkpoints(trial_dir, 2, protected)
    assert sorted(p.name for p in deleted) == [f"checkpoint_{i:06d}" for i in (1, 2, 4, 5)]
    assert sorted(p.name for p in trial_dir.iterdir()) == [
        "checkpoint_000003", "checkpoint_000006", "checkpoint_000007"]


def test_unreadable_snapshot_prunes_nothing_and_unknown_trial_is_unprotected(tmp_path):
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text("{torn")
    assert snapshot_checkpoints(tmp_path, "abc_00000") is None
    _snapshot(tmp_path, "other", ["checkpoint_000001"])
    assert snapshot_checkpoints(tmp_path, "abc_00000") == set()


def test_a_snapshot_naming_every_checkpoint_protects_only_the_newest(tmp_path: Path) -> None:
    """Ray's manager (num_to_keep=None) lists every checkpoint; only the one a restore would
    load (the newest it names) is protected, so Ray's copies come down to `keep` (+1)."""
    from tuning.raytune.checkpoint_pruner import prune_experiment

    trial_dir = tmp_path / "run_trial_abc12_00000_0_lr=0.001_2026"
    for i in range(8):
        (trial_dir / f"checkpoint_{i:06d}").mkdir(parents=True)
    names = [f"checkpoint_{i:06d}" for i in range(6)]  # the snapshot predates 6 and 7
    _snapshot(tmp_path, "abc12_00000", names)
    assert snapshot_checkpoints(tmp_path, "abc12_00000") == {"checkpoint_000005"}
    prune_trial_checkpoints(trial_dir, 2, snapshot_checkpoints(tmp_path, "abc12_00000"))
    assert sorted(p.name for p in trial_dir.iterdir()) == [
        "checkpoint_000005", "checkpoint_000006", "checkpoint_000007"]
    _snapshot(tmp_path, "abc12_00000", [*names, "checkpoint_000006", "checkpoint_000007"])
    prune_experiment(tmp_path, 2)  # after fit: the final snapshot names the newest
    assert sorted(p.name for p in trial_dir.iterdir()) == [
        "checkpoint_000006", "checkpoint_000007"]
