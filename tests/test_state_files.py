"""Every state file a sweep reads back, damaged: it recovers (rebuilt from what is durable,
with a warning line) or stops with one line naming the file and the fix. Never a traceback,
never a finished trial's steps lost.

mlflow_state.json, the MLflow pending document, trials.json, a trial's summary.json,
search.snapshot.yaml and Ray's checkpoints are covered here; the trainer's own checkpoints in
tests/test_nan_and_resume.py::test_truncated_newest_checkpoint_falls_back_to_the_previous.
The same damage in a real SIGKILLed sweep: tests/test_faults.py::
test_damaged_mlflow_state_after_a_sigkill_keeps_one_parent_and_every_step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient

from trainer.errors import ConfigError
from trainer.yaml_io import dump_yaml, load_yaml_file
from tuning.search_config import load_search
from tuning.tracking.pending import PENDING_FILE
from tuning.tracking.state import STATE_FILE
from tuning.tracking.tracker import SweepTracker

SMOKE = ROOT / "configs" / "smoke.yaml"
GARBAGE = bytes(range(256)) * 4  # not UTF-8, NUL bytes included
DAMAGE = {
    "empty": b"",
    "random-bytes": GARBAGE,
    "truncated": b'{"experiment_name": "x", "sto',
    "a-list": b"[]",
    "a-string": b'"x"',
    "wrong-sweep": b'{"sweep": 5, "stores": {}, "trials": {}}',
}


def record(step: int) -> dict[str, Any]:
    return {"step": step, "loss": 3.0 / step, "grad_norm": 1.0}


def steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments(max_results=1)  # migrations once per module
    return uri


# ------------------------------------------------------------------ mlflow_state.json


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_mlflow_state_keeps_one_parent_and_every_step(store_uri, tmp_path, capfd,
                                                               damage):
    experiment = f"state-{damage}"
    state = tmp_path / "mlflow"
    tracker = SweepTracker(store_uri, experiment, state, timeout_s=4.0)
    parent = tracker.start_parent("sweep-a", {"x": 1})
    run0 = tracker.start_trial("t0", "trial_0")
    run1 = tracker.start_trial("t1", "trial_1")
    tracker.log_records("t0", [record(s) for s in range(1, 41)])
    tracker.log_records("t1", [record(s) for s in range(1, 11)])
    (state / STATE_FILE).write_bytes(DAMAGE[damage])  # e.g. emptied after a mid-run kill

    again = SweepTracker(store_uri, experiment, state, timeout_s=4.0)  # the rerun's driver
    assert again.start_parent("sweep-a", {"x": 1}) == parent
    assert again.start_trial("t0", "trial_0") == run0
    again.log_records("t0", [record(s) for s in range(21, 61)])  # re-reported from step 21
    # t1's start_trial was only in the lost state (a killed driver's pending records are
    # written like this)
    again.log_records("t1", [record(s) for s in range(5, 21)])
    again.finish_trial("t1", "FINISHED")

    client = MlflowClient(store_uri)
    exp = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([exp])
    assert len(runs) == 3  # one parent, one child per trial: nothing started twice
    assert steps(client, run0) == list(range(1, 61))
    assert steps(client, run1) == list(range(1, 21))
    assert client.get_run(run1).info.status == "FINISHED"
    err = capfd.readouterr().err
    assert f"{state / STATE_FILE} is" in err and "rebuilding it" in err
    assert "Traceback" not in err
    assert json.loads((state / STATE_FILE).read_text())["sweep"]["name"] == "sweep-a"


def test_lost_state_of_an_embedded_store_is_rebuilt_too(tmp_path, capfd):
    state = tmp_path / "mlflow"
    tracker = SweepTracker(None, "embedded", state, timeout_s=4.0)
    parent = tracker.start_parent("sweep-e", {})
    run0 = tracker.start_trial("t0", "trial_0")
    tracker.log_records("t0", [record(s) for s in range(1, 11)])
    (state / STATE_FILE).unlink()  # mlflow.db beside it says the sweep ran before

    again = SweepTracker(None, "embedded", state, timeout_s=4.0)
    assert again.start_parent("sweep-e", {}) == parent
    assert again.start_trial("t0", "trial_0") == run0
    assert "missing; rebuilding it" in capfd.readouterr().err


@pytest.mark.parametrize("damage", ["random-bytes", "a-list"])
def test_sync_replays_a_sweep_whose_state_is_damaged(tmp_path, capsys, damage):
    from tuning.sync import main as sync_main

    state = tmp_path / "mlflow"
    tracker = SweepTracker(None, "synced", state, timeout_s=4.0)
    tracker.start_parent("sweep-s", {})
    run0 = tracker.start_trial("t0", "trial_0")
    tracker.close()
    # what a killed driver left unwritten: steps 1-5 of t0
    SweepTracker(None, "synced", state, apply_now=False).log_records(
        "t0", [record(s) for s in range(1, 6)])
    (state / STATE_FILE).write_bytes(DAMAGE[damage])
    assert sync_main([str(state)]) == 0
    out = capsys.readouterr().out
    assert "unreadable or incomplete" in out and "experiment 'synced'" in out
    assert steps(MlflowClient(f"sqlite:///{state / 'mlflow.db'}"), run0) == [1, 2, 3, 4, 5]


def test_sync_without_a_state_or_store_says_what_to_pass(tmp_path, capsys):
    from tuning.sync import main as sync_main

    (tmp_path / STATE_FILE).write_bytes(GARBAGE)
    assert sync_main([str(tmp_path)]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "--tracking-uri URI --experiment NAME" in out[0]


# ------------------------------------------------------------------ pending operations


def test_a_damaged_pending_document_is_kept_aside_not_fatal(store_uri, tmp_path, caplog):
    state = tmp_path / "mlflow"
    tracker = SweepTracker(store_uri, "pending", state, timeout_s=4.0)
    tracker.start_parent("sweep-j", {})
    run0 = tracker.start_trial("t0", "trial_0")
    (state / PENDING_FILE).write_bytes(GARBAGE)
    assert tracker.pending_operations() == 0  # nothing readable was pending
    (aside,) = state.glob(f"{PENDING_FILE}.damaged-*")
    assert aside.read_bytes() == GARBAGE  # kept for a human, byte for byte
    assert "unreadable line(s) skipped" in caplog.text
    tracker.log_records("t0", [record(s) for s in (1, 2)])  # the tracker goes on
    assert steps(MlflowClient(store_uri), run0) == [1, 2]
    assert tracker.pending_operations() == 0


# ------------------------------------------------------------------ trials.json, summary.json


def _sweep_with_one_trial(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    run = sweep / "trials" / "abc_00000"
    run.mkdir(parents=True)
    rows = [{"step": s, "loss": 3.0 / s, "grad_norm": 1.0, "lr/projector": 5e-4,
             "lr/lora": 5e-5} for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sweep


@pytest.mark.parametrize("damage", ["random-bytes", "truncated", "a-list"])
def test_report_over_a_garbled_trials_json_warns_and_keeps_every_step(tmp_path, capsys,
                                                                      damage):
    from tuning.analysis.report import collect_records
    from tuning.report import main as report_main

    sweep = _sweep_with_one_trial(tmp_path)
    (sweep / "trials.json").write_bytes(DAMAGE[damage])
    (sweep / "trials" / "abc_00000" / "summary.json").write_bytes(DAMAGE[damage])
    (record_,) = collect_records(sweep)
    assert [r["step"] for r in record_.history] == list(range(1, 21))
    assert report_main([str(sweep)]) == 0
    captured = capsys.readouterr()
    assert "trials.json is damaged" in captured.err
    assert "summary.json is damaged" in captured.err
    assert "abc_00000" in captured.out and "Traceback" not in captured.err


def test_report_with_a_garbled_snapshot_stops_in_one_line(tmp_path, capsys):
    from tuning.report import main as report_main

    sweep = _sweep_with_one_trial(tmp_path)
    (sweep / "search.snapshot.yaml").write_bytes(GARBAGE)
    assert report_main([str(sweep)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.snapshot.yaml" in err[0] and "--config" in err[0]


# ------------------------------------------------------------------ search.snapshot.yaml


def _loaded(tmp_path: Path):
    data = load_yaml_file(SMOKE)
    data["sweep"]["storage_path"] = str(tmp_path / "sweeps")
    path = tmp_path / "search.yaml"
    path.write_text(dump_yaml(data))
    return load_search(path)


def _started_sweep(tmp_path: Path) -> tuple[Any, Path]:
    from tuning.sweep_dir import SNAPSHOT, resolve_sweep_dir, snapshot_text

    loaded = _loaded(tmp_path)
    sweep_dir = resolve_sweep_dir(loaded)
    (sweep_dir / "ray").mkdir(parents=True)
    (sweep_dir / "ray" / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    (sweep_dir / SNAPSHOT).write_text(snapshot_text(loaded))
    return loaded, sweep_dir


@pytest.mark.parametrize("damage", ["empty", "random-bytes", "truncated", "missing"])
def test_damaged_snapshot_is_restored_from_mlflows_copy(tmp_path, capsys, damage):
    from tuning.sweep_dir import SNAPSHOT, check_resume

    loaded, sweep_dir = _started_sweep(tmp_path)
    good = (sweep_dir / SNAPSHOT).read_text()
    copy = sweep_dir / "mlflow" / "mlartifacts" / "1" / "run" / "artifacts" / SNAPSHOT
    copy.parent.mkdir(parents=True)
    copy.write_text(good)
    snap = sweep_dir / SNAPSHOT
    if damage == "missing":
        snap.unlink()
    else:
        snap.write_bytes(good.encode()[:40] if damage == "truncated" else DAMAGE[damage])
    assert check_resume(sweep_dir, loaded, False, "search.yaml") is True
    assert snap.read_text() == good
    assert "restored it from MLflow's copy" in capsys.readouterr().err


def test_damaged_snapshot_without_a_copy_resumes_with_a_warning(tmp_path, capsys):
    from tuning.sweep_dir import SNAPSHOT, check_resume

    loaded, sweep_dir = _started_sweep(tmp_path)
    (sweep_dir / SNAPSHOT).write_bytes(GARBAGE)
    assert check_resume(sweep_dir, loaded, False, "search.yaml") is True  # progress kept
    err = capsys.readouterr().err
    assert "has no intact copy; resuming from Ray's saved state" in err
    assert "different config" not in err


def test_an_intact_snapshot_still_refuses_an_edited_config(tmp_path):
    from tuning.sweep_dir import SNAPSHOT, check_resume

    loaded, sweep_dir = _started_sweep(tmp_path)
    snap = sweep_dir / SNAPSHOT
    text = snap.read_text()
    assert "num_samples: 1" in text
    snap.write_text(text.replace("num_samples: 1", "num_samples: 3"))
    with pytest.raises(ConfigError, match="different config"):
        check_resume(sweep_dir, loaded, False, "search.yaml")


# ------------------------------------------------------------------ disk full


def test_a_trial_failing_on_a_full_disk_stops_the_sweep_once(tmp_path, monkeypatch):
    import signal

    from tuning.raytune import disk_full

    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig))
    error = tmp_path / "error.txt"
    trial = type("T", (), {"trial_id": "abc_00000", "error_file": str(error)})()
    error.write_text("Failure # 1\nRuntimeError: shape mismatch\n")
    disk_full.reset()
    cb = disk_full.DiskFullStop()
    cb.on_trial_recover(0, [], trial)
    assert disk_full.tripped() is None and sent == []  # an ordinary failure: retried
    error.write_text("OSError: [Errno 28] No space left on device: '/x/checkpoint'\n")
    cb.on_trial_recover(0, [], trial)
    cb.on_trial_error(0, [], trial)
    assert sent == [signal.SIGUSR1]
    assert disk_full.tripped() == "trial abc_00000: Errno 28"
    disk_full.reset()
