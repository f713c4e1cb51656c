"""The sweep callback's background MLflow writer (tuning.tracking.writer).

Hooks must not wait for MLflow (a trial blocked in tune.report waits for them), and moving the
writes to a thread must not lose or duplicate anything: operations are written in order, and
what a killed driver had been told but not written is written from the pending document.
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
from tuning.tracking.pending import PENDING_FILE, PendingOps
from tuning.tracking.runs import RunWriter
from tuning.tracking.tracker import SweepTracker
from tuning.tracking.writer import BackgroundWriter

pytestmark = pytest.mark.integration


def make_callback(state_dir: Path, uri: str) -> MlflowSweepCallback:
    callback = MlflowSweepCallback(tracking_uri=uri, experiment_name="exp", state_dir=state_dir,
                                   sweep_name="sweep", timeout_s=4.0)
    return pickle.loads(pickle.dumps(callback))  # as Tuner.restore hands it back


def test_hooks_return_while_mlflow_is_blocked(tmp_path: Path, monkeypatch) -> None:
    """on_trial_result must return while the store is stuck; the writes land afterwards."""
    gate = threading.Event()
    entered = threading.Event()
    original = RunWriter.apply

    def stuck(self, op: dict[str, Any], report: Any) -> None:
        if op["op"] == "ship":  # the store takes the runs, then hangs on the first records
            entered.set()
            assert gate.wait(60), "the test never released the store"
        original(self, op, report)

    monkeypatch.setattr(RunWriter, "apply", stuck)
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
    text = (tmp_path / "state" / PENDING_FILE).read_text()
    ships = [op for op in PendingOps(tmp_path / "state").entries() if op["op"] == "ship"]
    # All six reports durable already, as one request to read the trial's metrics.jsonl
    # through the last reported step: the records are in that file only.
    assert len(ships) == 1 and ships[0]["through"] == 60
    assert '"loss"' not in text
    gate.set()
    trial.status = "TERMINATED"
    callback.on_trial_complete(iteration=2, trials=[trial], trial=trial)
    callback.on_experiment_end(trials=[trial])
    client = callback.tracker.client
    run_id = callback.tracker.run_id_of("t0001")
    assert steps_of(client, run_id, "loss") == list(range(1, 61))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert callback.tracker.pending_operations() == 0  # every entry removed once written


def test_a_second_tracker_beside_a_live_writer_writes_what_is_pending_once(
        tmp_path: Path) -> None:
    """A ``tuning.sync`` beside a live driver: both work from the one pending document."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    writer = BackgroundWriter(lambda: SweepTracker(uri, "exp", tmp_path, apply_now=False),
                              tmp_path, retry_idle_s=3600)
    with pytest.raises(ValueError, match="apply_now=False"):
        BackgroundWriter(lambda: SweepTracker(uri, "exp", tmp_path), tmp_path)
    other = SweepTracker(uri, "exp", tmp_path)
    other.start_parent("sweep", {"n": 1})  # written by this tracker at once
    writer.submit("start_trial", "t0", "trial zero", {})
    writer.submit("set_trial_tags", "t0", {"a": "1"})
    assert writer.close(60)
    other.set_trial_tags("t0", {"b": "2"})
    run = other.client.get_run(other.run_id_of("t0"))
    assert run.info.run_name == "trial zero"
    assert run.data.tags["a"] == "1" and run.data.tags["b"] == "2"
    assert other.pending_operations() == 0
    experiment_id = other.client.get_experiment_by_name("exp").experiment_id
    assert len(children(other.client, experiment_id, other.parent_run_id)) == 1


CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    from test_tracking import FakeTrial, result_for
    from tuning.tracking.callback import MlflowSweepCallback
    from tuning.tracking.runs import RunWriter

    # The store takes the runs but never the metrics: their request is still pending at the
    # kill (the records themselves in the trial's metrics.jsonl).
    RunWriter._apply_ship = lambda *a, **k: time.sleep(3600)
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
    assert '"ship"' in (state / PENDING_FILE).read_text()
    return state, uri


def test_what_a_killed_driver_left_pending_is_written_by_the_next_driver(tmp_path: Path) -> None:
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
    assert tracker.pending_operations() == 0


def test_what_a_killed_driver_left_pending_is_written_by_tuning_sync(tmp_path: Path) -> None:
    state, uri = _killed_driver(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tuning.sync", str(state), "--kill-running"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "with 1 operation(s)" in proc.stdout  # the one ship request
    assert "wrote 1 pending operation(s) [ship x1]" in proc.stdout
    tracker = SweepTracker(uri, "exp", state)
    client = tracker.client
    run_id = tracker.run_id_of("t0001")
    assert steps_of(client, run_id, "loss") == list(range(1, 21))
    assert client.get_run(run_id).info.status == "KILLED"  # nothing left RUNNING
    assert tracker.pending_operations() == 0


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
