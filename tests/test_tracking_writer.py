"""The sweep callback's background MLflow writer (tuning.tracking.writer).

Hooks must not wait for MLflow (a trial blocked in tune.report waits for them), and moving the
writes to a thread must not lose or duplicate anything: operations are applied in order,
and what a killed driver had received but not written is replayed from the inbox.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from test_tracking import FakeTrial, children, result_for, steps_of

from tuning.tracking.callback import MlflowSweepCallback
from tuning.tracking.tracker import SweepTracker
from tuning.tracking.writer import (
    INBOX_FILE,
    BackgroundWriter,
    InboxBusy,
    _merge_records,
    replay_inbox,
)

pytestmark = pytest.mark.integration


def make_callback(state_dir: Path, uri: str) -> MlflowSweepCallback:
    callback = MlflowSweepCallback(tracking_uri=uri, experiment_name="exp", state_dir=state_dir,
                                   sweep_name="sweep", timeout_s=4.0)
    return pickle.loads(pickle.dumps(callback))  # as Tuner.restore hands it back


def test_merge_keeps_order_and_batches_consecutive_records() -> None:
    batch = [
        (1, "start_trial", ["a", "a", {}]),
        (2, "log_records", ["a", [{"step": 1}, {"step": 2}], []]),
        (3, "log_records", ["b", [{"step": 1}], [{"step": 1, "where": "loss"}]]),
        (4, "log_records", ["a", [{"step": 2}, {"step": 3}], []]),  # step 2 re-reported
        (5, "finish_trial", ["a", "FINISHED", {}]),
        (6, "log_records", ["b", [{"step": 2}], []]),
    ]
    merged = _merge_records(batch)
    assert [m for m, _ in merged] == ["start_trial", "log_records", "log_records",
                                      "finish_trial", "log_records"]
    assert merged[1][1][0] == "a" and [r["step"] for r in merged[1][1][1]] == [1, 2, 3]
    assert merged[2][1][0] == "b" and merged[2][1][2] == [{"step": 1, "where": "loss"}]
    assert [r["step"] for r in merged[4][1][1]] == [2]  # after the barrier, not merged back


def test_merge_reads_each_trials_file_once_between_barriers() -> None:
    batch = [
        (1, "ship_metrics", ["a", "/a/metrics.jsonl", 10]),
        (2, "ship_metrics", ["b", "/b/metrics.jsonl", 10]),
        (3, "ship_metrics", ["a", "/a/metrics.jsonl", 20]),
        (4, "finish_trial", ["a", "FINISHED", {}]),
        (5, "ship_metrics", ["b", "/b/metrics.jsonl", 20]),
    ]
    assert _merge_records(batch) == [
        ("ship_metrics", ["a", "/a/metrics.jsonl", 20]),  # one read, through the last report
        ("ship_metrics", ["b", "/b/metrics.jsonl", 10]),
        ("finish_trial", ["a", "FINISHED", {}]),
        ("ship_metrics", ["b", "/b/metrics.jsonl", 20]),
    ]


def test_hooks_return_while_mlflow_is_blocked(tmp_path: Path, monkeypatch) -> None:
    """on_trial_result must return while the store is stuck; the writes land afterwards."""
    gate = threading.Event()
    entered = threading.Event()
    original = SweepTracker.ship_metrics

    def stuck(self, *args: Any, **kwargs: Any) -> None:
        entered.set()
        assert gate.wait(60), "the test never released the store"
        original(self, *args, **kwargs)

    monkeypatch.setattr(SweepTracker, "ship_metrics", stuck)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    callback = make_callback(tmp_path / "state", uri)
    callback.setup()
    trial = FakeTrial("t0001", status="RUNNING")
    callback.on_trial_start(iteration=0, trials=[trial], trial=trial)
    for low in range(1, 60, 10):  # 6 results while the first write hangs
        result = result_for(trial, range(low, low + 10), tmp_path, 1e-3)
        callback.on_trial_result(iteration=1, trials=[trial], trial=trial, result=result)
    assert entered.wait(60)
    assert not gate.is_set()  # every hook above returned although MLflow had not answered
    assert callback.writer.pending() > 0
    inbox = (tmp_path / "state" / INBOX_FILE).read_text().splitlines()
    assert sum('"ship_metrics"' in line for line in inbox) == 6  # all of it durable already
    # ... as a request to read the trial's metrics.jsonl: the records are in the file only
    assert not any('"loss"' in line for line in inbox)
    gate.set()
    trial.status = "TERMINATED"
    callback.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    callback.on_experiment_end(trials=[trial])
    client = callback.tracker.client
    run_id = callback.tracker.run_id_of("t0001")
    assert steps_of(client, run_id, "loss") == list(range(1, 61))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert (tmp_path / "state" / INBOX_FILE).read_text() == ""  # emptied once all applied


def test_one_owner_per_inbox(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    writer = BackgroundWriter(lambda: SweepTracker(uri, "exp", tmp_path), tmp_path)
    try:
        with pytest.raises(InboxBusy):
            replay_inbox(SweepTracker(uri, "exp", tmp_path))
    finally:
        assert writer.close(10)
    assert replay_inbox(SweepTracker(uri, "exp", tmp_path)) == 0  # free again, nothing left


CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    from test_tracking import FakeTrial, result_for
    from tuning.tracking.callback import MlflowSweepCallback
    from tuning.tracking.tracker import SweepTracker

    # The store takes the runs but never the metrics: their requests are still in the inbox
    # at the kill (the records themselves in the trial's metrics.jsonl).
    SweepTracker.ship_metrics = lambda *a, **k: time.sleep(3600)
    callback = MlflowSweepCallback(tracking_uri={uri!r}, experiment_name="exp",
                                   state_dir={state!r}, sweep_name="sweep")
    callback.setup()
    trial = FakeTrial("t0001", status="RUNNING")
    callback.on_trial_start(iteration=0, trials=[trial], trial=trial)
    assert callback.flush(timeout=120)  # parent and child runs exist
    for low in (1, 11):
        result = result_for(trial, range(low, low + 10), {runs!r}, 1e-3)
        callback.on_trial_result(iteration=1, trials=[trial], trial=trial, result=result)
    callback.on_checkpoint(iteration=1, trials=[trial], trial=trial, checkpoint=None)
    callback.flush(timeout=2)  # the writer is stuck inside ship_metrics: times out
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _killed_driver(tmp_path: Path) -> tuple[Path, str]:
    state = tmp_path / "state"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = CHILD.format(tests=str(ROOT / "tests"), uri=uri, state=str(state),
                        runs=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert '"ship_metrics"' in (state / INBOX_FILE).read_text()
    return state, uri


def test_inbox_of_a_killed_driver_is_replayed_by_the_next_driver(tmp_path: Path) -> None:
    state, uri = _killed_driver(tmp_path)
    restored = make_callback(state, uri)  # the rerun of the same command
    restored.setup()
    trial = FakeTrial("t0001", status="RUNNING")
    restored.on_trial_start(iteration=0, trials=[trial], trial=trial)
    # Ray re-reports from the trial's last checkpoint (step 10): 11..30
    result = result_for(trial, range(11, 31), tmp_path, 1e-3, end_reason="completed")
    restored.on_trial_result(iteration=1, trials=[trial], trial=trial, result=result)
    trial.status = "TERMINATED"
    restored.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    restored.on_experiment_end(trials=[trial])
    tracker = restored.tracker
    client = tracker.client
    experiment_id = client.get_experiment_by_name("exp").experiment_id
    runs = children(client, experiment_id, tracker.parent_run_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert steps_of(client, runs[0].info.run_id, "loss") == list(range(1, 31))  # each once
    assert (state / INBOX_FILE).read_text() == ""


def test_inbox_of_a_killed_driver_is_replayed_by_tuning_sync(tmp_path: Path) -> None:
    state, uri = _killed_driver(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tuning.sync", str(state), "--kill-running"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not written, applied" in proc.stdout
    tracker = SweepTracker(uri, "exp", state)
    client = tracker.client
    run_id = tracker.run_id_of("t0001")
    assert steps_of(client, run_id, "loss") == list(range(1, 21))
    assert client.get_run(run_id).info.status == "KILLED"  # nothing left RUNNING
    assert (state / INBOX_FILE).read_text() == ""


class _Killed(BaseException):
    """Stands for a SIGKILL: no `except Exception` sees it."""


def test_a_kill_while_the_sqlite_schema_is_created_leaves_no_broken_store(
        tmp_path: Path, monkeypatch) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    original = SqlAlchemyStore.__init__

    def killed_midway(self, db_uri: str, *args: Any, **kwargs: Any) -> None:
        Path(db_uri.removeprefix("sqlite:///")).write_bytes(b"SQLite format 3\0half-migrated")
        raise _Killed

    monkeypatch.setattr(SqlAlchemyStore, "__init__", killed_midway)
    with pytest.raises(_Killed):
        SweepTracker(None, "exp", tmp_path).client  # noqa: B018 (the property creates it)
    assert not (tmp_path / "mlflow.db").exists()  # the half-made file never took its name
    monkeypatch.setattr(SqlAlchemyStore, "__init__", original)
    tracker = SweepTracker(None, "exp", tmp_path)
    tracker.start_parent("sweep", {"a": 1})
    assert tracker.parent_run_id is not None
