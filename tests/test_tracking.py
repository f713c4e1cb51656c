"""SweepTracker / MlflowSweepCallback against real MLflow stores (embedded SQLite, no server).

What must hold: one parent and one child per trial, the same param names on every child,
metric steps exactly as reported (no gaps, no duplicates) even across a restore, non-finite
values as tags and never as metrics, no RUNNING run left after an interrupt, and an outage
pending document that ``python -m tuning.sync`` writes into a live store.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no phoning home from tests
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from mlflow.tracking import MlflowClient

from tuning.tracking.callback import MlflowSweepCallback
from tuning.tracking.errors import TrackingError, TrackingUnavailable, classify_error
from tuning.tracking.pending import PendingOps
from tuning.tracking.state import STATE_FILE
from tuning.tracking.tracker import SweepTracker
from tuning.tracking.values import flatten_params, stringify_param

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

RECORD_KEYS = (
    "epoch",
    "loss",
    "grad_norm",
    "grad_norm/projector",
    "grad_norm/lora",
    "lr/projector",
    "lr/lora",
    "clipped",
    "skipped",
    "nan_events",
    "samples_per_s",
    "tokens_per_s",
)


def record(step: int, *, nan: bool = False, nan_count: int = 0) -> dict[str, Any]:
    """One per-step record in the trainer's format (deterministic in the step)."""
    rec: dict[str, Any] = {
        "step": step,
        "epoch": step // 50,
        "loss": float("nan") if nan else 3.0 / (1 + 0.01 * step),
        "grad_norm": 1.0 + (step % 7) * 0.1,
        "grad_norm/projector": float("inf") if nan else 0.6 + (step % 5) * 0.01,
        "grad_norm/lora": 0.4,
        "lr/projector": 5e-4,
        "lr/lora": 5e-5,
        "clipped": int(step % 9 == 0),
        "skipped": int(nan),
        "nan_events": nan_count,
        "samples_per_s": None if step == 1 else 12.5,  # None: not measured yet
        "tokens_per_s": 800.0,
    }
    if step % 25 == 0:
        rec["eval_loss"] = 2.5
    return rec


def resolved_params(lr: float, clip: float | None = 1.0) -> dict[str, Any]:
    return {
        "learning_rate": lr,
        "projector_lr": lr * 5,
        "lora_lr": lr * 0.5,
        "projector_lr_mult": 5.0,
        "lora_lr_mult": 0.5,
        "warmup_steps": 10,
        "gradient_clip_val": clip,
        "seed": 7,
        "epochs": 1,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "precision": "fp32",
        "nan_policy": "skip",
        "total_steps": 60,
    }


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """Every stored step of a metric, duplicates kept (so a duplicate shows up)."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def children(client: MlflowClient, experiment_id: str, parent_id: str) -> list[Any]:
    return list(client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating one runs migrations: ~3 s); one experiment
    per test keeps tests apart."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments(max_results=1)
    return uri


@pytest.fixture
def experiment(request: pytest.FixtureRequest) -> str:
    return f"exp-{request.node.name}"


def new_tracker(store_uri: str, experiment: str, state_dir: Path) -> SweepTracker:
    return SweepTracker(store_uri, experiment, state_dir, timeout_s=4.0)


# --------------------------------------------------------------------------- unit-level


def test_stringify_params_is_consistent() -> None:
    assert stringify_param(None) == "none"
    assert stringify_param(True) == "true"
    assert stringify_param(3) == "3"
    assert stringify_param(1e-4) == "0.0001"
    assert stringify_param(float("nan")) == "nan"
    assert stringify_param([1, 2]) == "[1, 2]"
    flat = flatten_params({"a": {"b": None, "c": 2.0}, "bad key!": "x"})
    assert flat == {"a.b": "none", "a.c": "2.0", "bad key_": "x"}


def test_error_classification() -> None:
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    try:
        try:
            raise requests.exceptions.ConnectionError("Connection refused")
        except requests.exceptions.ConnectionError as inner:
            raise MlflowException("API request failed") from inner
    except MlflowException as exc:
        assert classify_error(exc) == "outage"
    assert classify_error(MlflowException("x", error_code=TEMPORARILY_UNAVAILABLE)) == "server"
    assert classify_error(MlflowException("x", error_code=INVALID_PARAMETER_VALUE)) == "permanent"


# --------------------------------------------------------------------------- tracker


def test_embedded_default_store_and_artifacts(tmp_path: Path) -> None:
    state = tmp_path / "sweep"
    tracker = SweepTracker(None, "embedded", state)
    assert tracker.tracking_uri == f"sqlite:///{state.resolve() / 'mlflow.db'}"
    config = tmp_path / "search.yaml"
    config.write_text("learning_rate: [1e-4, 3e-4]\n")
    parent = tracker.start_parent("sw", {"num_samples": 2}, [config], {"owner": "test"})
    assert parent and (state / "mlflow.db").is_file()
    run = tracker.client.get_run(parent)
    assert run.info.artifact_uri.startswith((state / "mlartifacts").resolve().as_uri())
    assert [a.path for a in tracker.client.list_artifacts(parent)] == ["search.yaml"]
    assert (state / STATE_FILE).is_file()
    tags = run.data.tags
    assert tags["phase2tune.sweep"] == "sw" and tags["phase2tune.status"] == "running"
    for key in (
        "phase2tune.code_version",
        "phase2tune.ray_version",
        "phase2tune.torch_version",
        "phase2tune.mlflow_version",
    ):
        assert tags[key], key
    assert run.data.params == {"num_samples": "2"}


def test_parent_children_and_params(store_uri: str, experiment: str, tmp_path: Path) -> None:
    tracker = new_tracker(store_uri, experiment, tmp_path / "state")
    with pytest.raises(TrackingError):
        tracker.start_trial("t0")  # no parent yet: misuse, not an outage
    parent = tracker.start_parent("sweep-a", {"search.space": {"lr": [1e-4, 3e-4]}})
    for index, (lr, clip) in enumerate([(1e-4, 1.0), (3e-4, None), (1e-3, 0.5)]):
        run_id = tracker.start_trial(f"t{index}", run_name=f"trial_{index}")
        assert run_id
        tracker.log_params(f"t{index}", resolved_params(lr, clip))
    client = tracker.client
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = children(client, experiment_id, parent)
    assert sorted(r.info.run_name for r in runs) == ["trial_0", "trial_1", "trial_2"]
    names = {frozenset(r.data.params) for r in runs}
    assert len(names) == 1 and names.pop() == frozenset(resolved_params(1.0))
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["trial_1"].data.params["gradient_clip_val"] == "none"
    assert by_name["trial_0"].data.params["learning_rate"] == "0.0001"
    assert all(r.data.tags["phase2tune.trial_id"] for r in runs)
    # a second start_parent / start_trial (restore) reuses, never duplicates
    assert (
        new_tracker(store_uri, experiment, tmp_path / "state").start_parent(
            "sweep-a", {"search.space": {"lr": [1e-4, 3e-4]}}
        )
        == parent
    )
    with pytest.raises(TrackingError):
        tracker.start_parent("another-sweep", {})
    parents = client.search_runs([experiment_id], "tags.`phase2tune.role` = 'parent'")
    assert len(parents) == 1


def test_metric_steps_exact_across_restore(store_uri: str, experiment: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    tracker = new_tracker(store_uri, experiment, state)
    parent = tracker.start_parent("sweep-b", {})
    run_id = tracker.start_trial("t0", "trial_0")
    # 100 records x 13 metrics per call: more than MLflow's 1000-metrics-per-batch limit
    for low in range(1, 201, 100):
        tracker.log_records("t0", [record(s) for s in range(low, low + 100)])
    assert tracker.watermark("t0") == 200
    # re-reported inside the same tracker: dropped
    tracker.log_records("t0", [record(s) for s in range(150, 210)])

    # "crash" and restore: a new tracker on the same state_dir, the trial re-reports from its
    # checkpoint at step 180 up to 300
    restored = new_tracker(store_uri, experiment, state)
    assert restored.start_parent("sweep-b", {}) == parent
    assert restored.start_trial("t0", "trial_0") == run_id
    for low in range(181, 301, 30):
        restored.log_records("t0", [record(s) for s in range(low, low + 30)])
    restored.finish_trial("t0", "FINISHED")

    client = restored.client
    for key in ("epoch", "loss", "grad_norm/projector", "lr/lora", "tokens_per_s"):
        assert steps_of(client, run_id, key) == list(range(1, 301)), key
    assert steps_of(client, run_id, "samples_per_s") == list(range(2, 301))  # None skipped
    assert steps_of(client, run_id, "eval_loss") == list(range(25, 301, 25))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["phase2tune.logged_through_step"] == "300"
    assert (
        json.loads((state / STATE_FILE).read_text())["stores"][store_uri]["trials"]["t0"][
            "watermark"
        ]
        == 300
    )


def test_lost_trial_map_does_not_duplicate(store_uri: str, experiment: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    tracker = new_tracker(store_uri, experiment, state)
    tracker.start_parent("sweep-c", {})
    run_id = tracker.start_trial("t0", "trial_0")
    tracker.log_records("t0", [record(s) for s in range(1, 41)])

    # lose the trial map and watermarks (e.g. a crash between create_run and the state save)
    data = json.loads((state / STATE_FILE).read_text())
    data["stores"][store_uri]["trials"] = {}
    (state / STATE_FILE).write_text(json.dumps(data))

    restored = new_tracker(store_uri, experiment, state)
    assert restored.start_trial("t0", "trial_0") == run_id  # found by phase2tune.trial_id tag
    restored.log_records("t0", [record(s) for s in range(21, 61)])
    assert steps_of(restored.client, run_id, "loss") == list(range(1, 61))


def test_nonfinite_values_become_tags(store_uri: str, experiment: str, tmp_path: Path) -> None:
    tracker = new_tracker(store_uri, experiment, tmp_path / "state")
    tracker.start_parent("sweep-d", {})
    run_id = tracker.start_trial("t0")
    records = [record(s, nan=s in (7, 12), nan_count=(s >= 7) + (s >= 12)) for s in range(1, 21)]
    events = [
        {"step": 7, "where": "grad", "groups": ["projector"]},
        {"step": 12, "where": "loss", "groups": []},
    ]
    tracker.log_records("t0", records[:10], events[:1])
    tracker.log_records("t0", records[10:], events[1:])
    tracker.log_records("t0", records[5:15], events)  # re-report: counted once
    client = tracker.client
    for key in ("loss", "grad_norm/projector"):
        history = client.get_metric_history(run_id, key)
        assert all(math.isfinite(m.value) for m in history)
        assert sorted(m.step for m in history) == [s for s in range(1, 21) if s not in (7, 12)]
    assert steps_of(client, run_id, "grad_norm/lora") == list(range(1, 21))
    assert steps_of(client, run_id, "nan_events") == list(range(1, 21))  # the trainer's counter
    tags = client.get_run(run_id).data.tags
    assert tags["first_nonfinite_step"] == "7"
    assert tags["first_nan_group"] == "projector"
    assert tags["nan_events"] == "2"


def test_kill_running_leaves_no_running_run(
    store_uri: str, experiment: str, tmp_path: Path
) -> None:
    tracker = new_tracker(store_uri, experiment, tmp_path / "state")
    parent = tracker.start_parent("sweep-e", {})
    for index in range(3):
        tracker.start_trial(f"t{index}")
    tracker.finish_trial("t0", "FINISHED")
    tracker.kill_running()
    client = tracker.client
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment_id])}
    assert "RUNNING" not in statuses.values()
    assert statuses[parent] == "KILLED"
    assert statuses[tracker.run_id_of("t0")] == "FINISHED"
    assert statuses[tracker.run_id_of("t1")] == "KILLED"


def test_sync_kill_running_after_driver_death(
    store_uri: str, experiment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The driver was SIGKILLed: nothing ran on_experiment_end, runs stay RUNNING until
    ``tuning.sync --kill-running`` marks them."""
    from tuning.sync import main

    state = tmp_path / "state"
    tracker = new_tracker(store_uri, experiment, state)
    parent = tracker.start_parent("sweep-k", {})
    tracker.start_trial("t0")
    assert main([str(state), "--kill-running"]) == 0
    out = capsys.readouterr().out
    assert "wrote 0 pending operation(s)" in out and "KILLED" in out
    client = tracker.client
    assert client.get_run(parent).info.status == "KILLED"
    assert client.get_run(tracker.run_id_of("t0")).info.status == "KILLED"


def test_outage_keeps_operations_pending_then_sync_writes_them(
        store_uri: str, experiment: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    dead = f"http://127.0.0.1:{closed_port()}"
    tracker = SweepTracker(dead, experiment, state, timeout_s=4.0)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable) as info:
        tracker.check_reachable()
    assert str(info.value) == (
        f"MLflow tracking server {dead} unreachable: connection refused; "
        "start it or set mlflow.on_unreachable: continue"
    )
    artifact = tmp_path / "config.resolved.yaml"
    artifact.write_text("learning_rate: 0.0001\n")
    assert tracker.start_parent("sweep-f", {"n": 2}) is None  # pending, training goes on
    for trial in ("t0", "t1"):
        assert tracker.start_trial(trial, f"trial_{trial}") is None
        tracker.log_params(trial, resolved_params(1e-4))
        tracker.log_records(trial, [record(s) for s in range(1, 31)])
        tracker.log_records(trial, [record(s) for s in range(21, 51)])  # overlap
        tracker.log_artifact(trial, artifact)
        tracker.finish_trial(trial, "FINISHED", {"end_reason": "completed"})
    tracker.finish_parent("FINISHED")
    assert time.monotonic() - started < 20  # refused connections fail fast
    pending = PendingOps(state).entries()
    # One entry per kind and run: the parent's start and finish, per trial its start,
    # params, records (the two overlapping calls in one entry), artifact and finish.
    assert len(pending) == tracker.pending_operations() == 1 + 2 * 5 + 1
    (rows,) = [op["rows"] for op in pending if op["op"] == "metrics"
               and op["trial_id"] == "t0"]
    assert [row["step"] for row in rows] == list(range(1, 51))

    def sync(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tuning.sync", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    bad = sync(str(tmp_path / "nope"))
    assert bad.returncode == 2
    assert len(bad.stdout.strip().splitlines()) == 1 and "not a sweep state directory" in bad.stdout

    still_dead = sync(str(state), "--timeout", "2")
    assert still_dead.returncode == 1, still_dead.stdout + still_dead.stderr
    assert "unreachable" in still_dead.stdout and tracker.pending_operations() == 12

    done = sync(str(state), "--tracking-uri", store_uri)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wrote 12 pending operation(s)" in done.stdout
    assert tracker.pending_operations() == 0
    again = sync(str(state), "--tracking-uri", store_uri)  # idempotent: nothing left to do
    assert again.returncode == 0 and "wrote 0 pending operation(s)" in again.stdout

    client = MlflowClient(store_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`phase2tune.role` = 'parent'")
    assert parent.info.status == "FINISHED" and parent.data.params == {"n": "2"}
    runs = children(client, experiment_id, parent.info.run_id)
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        assert steps_of(client, run.info.run_id, "loss") == list(range(1, 51))
        assert run.data.params["learning_rate"] == "0.0001"
        assert run.data.tags["end_reason"] == "completed"
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.resolved.yaml"]


def test_outage_then_recovery_in_process(
    store_uri: str, experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store drops out mid-sweep and comes back: the tracker keeps what fails pending,
    keeps order, and writes it on a later call once the backoff has passed."""
    import requests

    tracker = new_tracker(store_uri, experiment, tmp_path / "state")
    tracker.start_parent("sweep-g", {})
    run_id = tracker.start_trial("t0")
    tracker.log_records("t0", [record(s) for s in range(1, 11)])

    client = tracker.client
    real_log_batch = client.log_batch
    calls = {"n": 0}

    def down(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        raise requests.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(client, "log_batch", down)
    tracker.log_records("t0", [record(s) for s in range(11, 21)])
    tracker.finish_trial("t0", "FINISHED")  # queued behind the metrics, not applied first
    assert tracker.pending_operations() == 2
    assert calls["n"] == 1  # backoff: the second operation did not hit the dead store
    assert tracker.last_outage == "connection refused"
    assert client.get_run(run_id).info.status == "RUNNING"

    monkeypatch.setattr(client, "log_batch", real_log_batch)  # the store is back
    assert tracker.catch_up().applied == 0  # still inside the backoff window
    report = tracker.catch_up(force=True)
    assert (report.applied, report.remaining, report.steps_logged) == (2, 0, 10)
    assert tracker.pending_operations() == 0 and tracker.last_outage is None
    assert steps_of(client, run_id, "loss") == list(range(1, 21))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_metrics_file_is_shipped_exactly_once_across_an_outage(
    store_uri: str, experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep's path for step records: the trial's metrics.jsonl, read above the watermark.
    Records the trainer appends while the store is down arrive once it is back, each step
    once, and nothing pending nor anything else in the state directory holds a copy."""
    import requests

    state = tmp_path / "state"
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    tracker = new_tracker(store_uri, experiment, state)
    tracker.start_parent("sweep-m", {})
    run_id = tracker.start_trial("t0")
    write_metrics(run_dir, range(1, 11))
    tracker.ship_metrics("t0", metrics, 10)
    client = tracker.client
    assert steps_of(client, run_id, "loss") == list(range(1, 11))

    real_log_batch = client.log_batch

    def down(*args: Any, **kwargs: Any) -> None:
        raise requests.exceptions.ConnectionError("Connection refused")

    monkeypatch.setattr(client, "log_batch", down)
    for high in (20, 30, 40):  # the trainer goes on; each report asks for a shipment
        # ... through the step it reported; the trainer recorded one more before stopping
        write_metrics(run_dir, range(high - 9, high + 2), nan_steps=(35,))
        tracker.ship_metrics("t0", metrics, high)
    with open(metrics, "a") as fh:  # a record the trainer is still writing: not read yet
        fh.write('{"step": 42, "loss": 1.')
    assert tracker.pending_operations() == 1  # one request stands for every later one
    held = "".join(p.read_text() for p in state.iterdir() if p.is_file())
    assert '"loss"' not in held  # no record copied out of the file

    monkeypatch.setattr(client, "log_batch", real_log_batch)  # the store is back
    report = tracker.catch_up(force=True)
    assert (report.applied, report.remaining, report.steps_logged) == (1, 0, 30)
    tracker.ship_metrics("t0", metrics, 40)  # again: nothing new, nothing twice
    assert steps_of(client, run_id, "epoch") == list(range(1, 41))
    assert steps_of(client, run_id, "loss") == [s for s in range(1, 41) if s != 35]
    tags = client.get_run(run_id).data.tags
    assert (tags["first_nonfinite_step"], tags["first_nan_group"]) == ("35", "projector,lora")
    assert tags["phase2tune.logged_through_step"] == "40"


def test_nan_events_are_read_from_the_trainers_counter() -> None:
    from tuning.tracking.records import nan_events_of

    rows = [{"step": 1, "loss": 2.0, "grad_norm/projector": 1.0, "grad_norm/lora": 1.0,
             "nan_events": 1},
            {"step": 2, "loss": 2.0, "grad_norm/projector": None, "grad_norm/lora": 0.5,
             "nan_events": 2},
            {"step": 3, "loss": None, "grad_norm/projector": None, "grad_norm/lora": None,
             "nan_events": 3},
            {"step": 4, "loss": 1.5, "grad_norm/projector": 1.0, "grad_norm/lora": 1.0,
             "nan_events": 3}]
    # counted from the record before the first one read (step 1's event is stored already)
    assert nan_events_of(rows[1:], count_before=1) == [
        {"step": 2, "where": "grad", "groups": ["projector"]},
        {"step": 3, "where": "loss", "groups": ["projector", "lora"]},
    ]


def test_nan_events_are_the_records_own_events() -> None:
    """A record that carries its event (``nan_event``, issue 24) is read as it is: exact
    groups and action, no event on a clean step whatever the counter before it said, and
    an older record without the key in the same file still gets its rebuilt event."""
    from tuning.tracking.records import metric_rows, nan_events_of

    def rec(step: int, count: int, event: dict[str, Any] | None, **values: Any) -> dict[str, Any]:
        base = {"step": step, "loss": 2.0, "grad_norm/projector": 1.0, "grad_norm/lora": 1.0,
                "nan_events": count, "nan_event": event}
        return base | values

    stopped = {"step": 3, "where": "loss", "groups": ["lora"], "action": "stopped",
               "fp16_overflow": False}
    old_format = {"step": 1, "loss": 2.0, "grad_norm/projector": None, "grad_norm/lora": 1.0,
                  "nan_events": 1}
    rows = [old_format,
            # the counter is 2 while count_before said 1 (e.g. an earlier record lost): the
            # record says the step was clean, so no event is made up from the counter
            rec(2, 2, None),
            # the event names only lora though both norms are missing: the trainer's groups
            rec(3, 3, stopped, loss=None, **{"grad_norm/projector": None,
                                             "grad_norm/lora": None})]
    assert nan_events_of(rows, count_before=0) == [
        {"step": 1, "where": "grad", "groups": ["projector"]},  # rebuilt: no nan_event key
        stopped,
    ]
    # a garbled event is skipped (warned), not a crash; the counter is not consulted for it
    assert nan_events_of([rec(4, 4, {"where": "grad"})], count_before=3) == []
    # the event is no metric: neither a value nor a non-finite tag
    for row in metric_rows("t0", rows, 0):
        assert "nan_event" not in row["m"] and "nan_event" not in row["bad"]


def test_a_trainers_nan_event_names_the_first_nan_group(
    store_uri: str, experiment: str, tmp_path: Path, tiny: Any
) -> None:
    """A real run's metrics.jsonl with a NaN step: the MLflow tags come from the event the
    record carries (edited below so that its null values alone would name another group)."""
    from trainer.loop import train
    from trainer.metrics import MemorySink

    cfg = tiny(epochs=1, nan_policy="skip")
    cfg.debug.inject_nan_at_step = 3
    cfg.debug.inject_nan_group = "lora"
    train(cfg, MemorySink(), console=False, log=lambda *_: None)
    metrics = cfg.output.root / "run" / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert records[2]["nan_event"] == {"step": 3, "where": "grad", "groups": ["lora"],
                                       "action": "skipped", "fp16_overflow": False}
    assert records[2]["grad_norm/lora"] is None
    # The tags must follow the event, not the nulls: give the projector's norm a null too.
    records[2]["grad_norm/projector"] = None
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))

    tracker = new_tracker(store_uri, experiment, tmp_path / "state")
    tracker.start_parent("sweep-nanev", {})
    run_id = tracker.start_trial("t0")
    tracker.ship_metrics("t0", metrics, records[-1]["step"])
    tags = tracker.client.get_run(run_id).data.tags
    assert (tags["first_nonfinite_step"], tags["first_nan_group"]) == ("3", "lora")
    assert tags["nan_events"] == "1"
    assert "nan_event" not in tracker.client.get_run(run_id).data.metrics
    assert steps_of(tracker.client, run_id, "loss") == [r["step"] for r in records]


def test_rejected_operation_does_not_block(store_uri: str, experiment: str, tmp_path: Path) -> None:
    """A value the store refuses for good goes to the rejected file, not into a retry loop."""
    tracker = new_tracker(store_uri, experiment, tmp_path / "state")
    tracker.start_parent("sweep-h", {})
    run_id = tracker.start_trial("t0")
    tracker.log_artifact("t0", tmp_path / "missing.bin")
    tracker.log_records("t0", [record(1)])
    assert tracker.pending_operations() == 0
    rejected = (tmp_path / "state" / "mlflow_rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["op"] for line in rejected] == ["artifact"]
    assert steps_of(tracker.client, run_id, "loss") == [1]


# --------------------------------------------------------------------------- callback


@dataclass
class FakeTrial:
    """The parts of ray.tune.experiment.Trial the callback reads."""

    trial_id: str
    status: str = "PENDING"
    experiment_tag: str = ""
    path: str | None = None
    local_path: str | None = None
    last_result: dict[str, Any] = field(default_factory=dict)
    num_failures: int = 0
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the sampled (swept) values

    def get_error(self) -> str | None:
        return self.error

    def __str__(self) -> str:
        return f"phase2_trainable_{self.trial_id}"


def result_for(
    trial: FakeTrial,
    steps: Iterable[int],
    run_dir: Path,
    lr: float,
    *,
    nan_steps: tuple[int, ...] = (),
    end_reason: str | None = None,
) -> dict[str, Any]:
    steps = list(steps)
    records = [record(s, nan=s in nan_steps) for s in steps]
    write_metrics(run_dir, steps, nan_steps)  # the trainer records a step before reporting it
    finite = [r for r in records if math.isfinite(r["loss"])]
    result = {
        "step": steps[-1],
        "last_loss": finite[-1]["loss"] if finite else None,
        "resolved_params": resolved_params(lr),
        "end_reason": end_reason,
        "run_dir": str(run_dir),
        "trial_id": trial.trial_id,
        "training_iteration": steps[-1] // 10,
    }
    trial.last_result = result
    return result


def write_metrics(run_dir: Path, steps: Iterable[int], nan_steps: tuple[int, ...] = ()) -> None:
    """What the trainer's JsonlSink leaves in ``run_dir/metrics.jsonl`` once it has recorded
    ``steps``: the records before the first of them kept (a resumed run truncates to its
    checkpoint), NaN/inf as null, the NaN-event counter cumulative. A NaN step is a loss
    event in both groups. The file is replaced whole, so a reader never sees half of it."""
    steps = list(steps)
    path = Path(run_dir) / "metrics.jsonl"
    kept = []
    if path.exists():
        kept = [line for line in path.read_text().splitlines()
                if json.loads(line)["step"] < steps[0]]
    lines = []
    for step in steps:
        rec = record(step, nan=step in nan_steps,
                     nan_count=sum(1 for s in nan_steps if s <= step))
        if step in nan_steps:
            rec["grad_norm/lora"] = None
        lines.append(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v)
                                 else v for k, v in rec.items()}, allow_nan=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept + lines))
    os.replace(tmp, path)


def make_callback(store_uri: str, experiment: str, tmp_path: Path, **kw: Any) -> Any:
    search = tmp_path / "search.yaml"
    search.write_text("learning_rate: [1e-4, 3e-4, 1e-3, 3e-3]\n")
    callback = MlflowSweepCallback(
        tracking_uri=store_uri,
        experiment_name=experiment,
        state_dir=tmp_path / "state",
        sweep_name="fake-sweep",
        parent_params={"num_samples": 4},
        parent_artifacts=[search],
        timeout_s=4.0,
    )
    # Tuner pickles RunConfig (callbacks included) into tuner.pkl; do the same.
    return pickle.loads(pickle.dumps(callback))


def test_callback_with_fake_trials(store_uri: str, experiment: str, tmp_path: Path) -> None:
    callback = make_callback(store_uri, experiment, tmp_path)
    callback.setup(stop=None, num_samples=4, total_num_samples=4)
    trials = [FakeTrial(f"abc12_0000{i}", experiment_tag=f"{i}_lr={i}",
                        config={"learning_rate": 10.0 ** -(i + 2), "model.lora.r": 8})
              for i in range(4)]
    lrs = [1e-4, 3e-4, 1e-3, 3e-3]
    run_dirs = []
    for trial in trials:
        run_dir = tmp_path / "runs" / trial.trial_id
        run_dir.mkdir(parents=True)
        (run_dir / "config.resolved.yaml").write_text(f"trial: {trial.trial_id}\n")
        run_dirs.append(run_dir)
        trial.status = "RUNNING"
        callback.on_trial_start(iteration=0, trials=trials, trial=trial)
    reported: dict[str, set[int]] = {t.trial_id: set() for t in trials}

    def report(index: int, low: int, high: int, **kw: Any) -> None:
        trial = trials[index]
        result = result_for(trial, range(low, high + 1), run_dirs[index], lrs[index], **kw)
        reported[trial.trial_id].update(range(low, high + 1))
        callback.on_trial_result(iteration=1, trials=trials, trial=trial, result=result)

    for round_ in range(3):  # steps 1..30, interleaved
        for index in range(4):
            report(index, round_ * 10 + 1, round_ * 10 + 10, nan_steps=(25,) if index == 2 else ())
    # trial 3 crashes after step 30 and is retried from its checkpoint at step 20
    callback.on_checkpoint(iteration=2, trials=trials, trial=trials[3], checkpoint=None)
    trials[3].num_failures = 1
    callback.on_trial_recover(iteration=2, trials=trials, trial=trials[3])
    callback.on_trial_start(iteration=2, trials=trials, trial=trials[3])
    report(3, 21, 30)
    for round_ in range(3, 6):  # steps 31..60
        for index in range(4):
            end = "completed" if round_ == 5 else None
            report(index, round_ * 10 + 1, round_ * 10 + 10, end_reason=end)
    (run_dirs[0] / "trainable.safetensors").write_bytes(b"\0" * 64)
    for index in (0, 2, 3):
        trials[index].status = "TERMINATED"
        callback.on_trial_complete(iteration=3, trials=trials, trial=trials[index])
    trials[1].status = "ERROR"
    trials[1].error = "Traceback ...\nRuntimeError: boom"
    callback.on_trial_error(iteration=3, trials=trials, trial=trials[1])
    callback.on_experiment_end(trials=trials)

    tracker = callback.tracker
    client = tracker.client
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["phase2tune.failed_trials"] == "1"
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["search.yaml"]
    runs = {
        r.data.tags["phase2tune.trial_id"]: r
        for r in children(client, experiment_id, parent.info.run_id)
    }
    assert sorted(runs) == sorted(reported)
    assert len({frozenset(r.data.params) for r in runs.values()}) == 1
    for trial in trials:
        run = runs[trial.trial_id]
        # named by the swept values; Ray's name kept as a tag; swept keys as flat params
        lr = ["0.01", "1e-3", "1e-4", "1e-5"][trials.index(trial)]
        assert run.info.run_name == f"lr={lr} lora.r=8 [{trial.trial_id[-5:]}]"
        assert run.data.tags["phase2tune.ray_trial_name"] == str(trial)
        assert run.data.params["model.lora.r"] == "8"
        expected = sorted(reported[trial.trial_id])
        assert steps_of(client, run.info.run_id, "epoch") == expected  # as reported, once
        artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
        want = ["config.resolved.yaml"] + (["trainable.safetensors"] if trial is trials[0] else [])
        assert artifacts == want
    assert steps_of(client, runs[trials[2].trial_id].info.run_id, "loss") == [
        s for s in range(1, 61) if s != 25
    ]
    assert runs[trials[2].trial_id].data.tags["first_nan_group"] == "projector,lora"
    assert runs[trials[3].trial_id].data.tags["phase2tune.recoveries"] == "1"
    statuses = {tid: r.info.status for tid, r in runs.items()}
    assert statuses == {
        trials[0].trial_id: "FINISHED",
        trials[1].trial_id: "FAILED",
        trials[2].trial_id: "FINISHED",
        trials[3].trial_id: "FINISHED",
    }
    assert runs[trials[1].trial_id].data.tags["phase2tune.error"].endswith("RuntimeError: boom")
    assert runs[trials[0].trial_id].data.tags["end_reason"] == "completed"
    # still picklable after use, without its client
    clone = pickle.loads(pickle.dumps(callback))
    assert clone._writer is None and clone._reader is None and clone.sweep_name == "fake-sweep"


def test_callback_interrupt_then_restore(store_uri: str, experiment: str, tmp_path: Path) -> None:
    pickled = pickle.dumps(make_callback(store_uri, experiment, tmp_path))
    callback = pickle.loads(pickled)
    callback.setup()
    trials = [FakeTrial(f"xyz98_0000{i}", status="RUNNING") for i in range(2)]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for trial in trials:
        callback.on_trial_start(iteration=0, trials=trials, trial=trial)
        callback.on_trial_result(
            iteration=1,
            trials=trials,
            trial=trial,
            result=result_for(trial, range(1, 21), run_dir, 1e-4),
        )
    callback.on_experiment_end(trials=trials)  # Ctrl+C: trials still RUNNING
    client = callback.tracker.client
    parent_id = callback.tracker.parent_run_id
    assert client.get_run(parent_id).info.status == "KILLED"
    for trial in trials:
        run = client.get_run(callback.tracker.run_id_of(trial.trial_id))
        assert run.info.status == "KILLED"
        assert steps_of(client, run.info.run_id, "loss") == list(range(1, 21))  # flushed

    restored = pickle.loads(pickled)  # Tuner.restore runs the copy from tuner.pkl
    restored.setup()
    for trial in trials:
        restored.on_trial_start(iteration=0, trials=trials, trial=trial)
    assert restored.flush(timeout=60)  # hooks return at once; the writer thread applies
    assert client.get_run(parent_id).info.status == "RUNNING"
    for trial in trials:
        assert client.get_run(restored.tracker.run_id_of(trial.trial_id)).info.status == "RUNNING"
        restored.on_trial_result(
            iteration=1,
            trials=trials,
            trial=trial,
            result=result_for(trial, range(11, 41), run_dir, 1e-4, end_reason="completed"),
        )
        trial.status = "TERMINATED"
        restored.on_trial_complete(iteration=2, trials=trials, trial=trial)
    restored.on_experiment_end(trials=trials)
    assert restored.tracker.parent_run_id == parent_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = children(client, experiment_id, parent_id)
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        assert steps_of(client, run.info.run_id, "loss") == list(range(1, 41))


# --------------------------------------------------------------------------- real Ray Tune


def _phase2_like_trainable(config: dict[str, Any]) -> None:
    """A trivial function trainable speaking the trainer's result format.

    Reports every 5 steps, checkpoints every 10, and -- when asked -- fails once after step 25,
    so its retry re-reports steps 21..25 that the driver already logged.
    """
    import json as _json
    import tempfile
    from pathlib import Path as _Path

    from ray import tune

    total, every = 40, 5
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = _json.loads((_Path(directory) / "state.json").read_text())["step"]
    run_dir = _Path(config["runs"]) / f"lr{config['learning_rate']}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.resolved.yaml").write_text(f"learning_rate: {config['learning_rate']}\n")
    params = resolved_params(config["learning_rate"])
    for last in range(start + every, total + 1, every):
        steps = range(last - every + 1, last + 1)
        end_reason = "completed" if last == total else None
        if end_reason:
            (run_dir / "trainable.safetensors").write_bytes(b"\0" * 32)
        write_metrics(run_dir, steps)  # the trainer records a step before reporting it
        result = {
            "step": last,
            "last_loss": record(last)["loss"],
            "resolved_params": params,
            "end_reason": end_reason,
            "run_dir": str(run_dir),
        }
        if last % 10 == 0:
            with tempfile.TemporaryDirectory() as directory:
                (_Path(directory) / "state.json").write_text(_json.dumps({"step": last}))
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(directory))
        else:
            tune.report(result)
        marker = _Path(config["runs"]) / "failed_once"
        if config["learning_rate"] == 1e-3 and last == 25 and not marker.exists():
            marker.write_text("x")
            raise RuntimeError("simulated worker crash")


@pytest.mark.slow
def test_real_ray_tune_sweep_and_restore(store_uri: str, experiment: str, tmp_path: Path) -> None:
    """4 concurrent trials through a real Tuner; one crashes, the sweep is restored from
    tuner.pkl (so the callback is the unpickled copy) and its re-reported steps are deduped."""
    ray = pytest.importorskip("ray")
    from ray import tune

    # Workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        callback = MlflowSweepCallback(
            tracking_uri=store_uri,
            experiment_name=experiment,
            state_dir=tmp_path / "state",
            sweep_name="ray-sweep",
        )
        trainable = tune.with_resources(_phase2_like_trainable, {"cpu": 0.5})
        lrs = [1e-4, 3e-4, 1e-3, 3e-3]
        tuner = tune.Tuner(
            trainable,
            param_space={
                "learning_rate": tune.grid_search(lrs),
                "runs": str(tmp_path / "runs"),
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=4),
            run_config=tune.RunConfig(
                name="sweep",
                storage_path=str(tmp_path / "ray"),
                callbacks=[callback],
                verbose=0,
            ),
        )
        first = tuner.fit()
        assert sum(1 for r in first if r.error) == 1
        restored = tune.Tuner.restore(
            str(tmp_path / "ray" / "sweep"), trainable=trainable, resume_errored=True
        )
        second = restored.fit()
        assert not second.errors
    finally:
        ray.shutdown()

    tracker = SweepTracker(store_uri, experiment, tmp_path / "state")
    client = tracker.client
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parents = client.search_runs([experiment_id], "tags.`phase2tune.role` = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    runs = children(client, experiment_id, parents[0].info.run_id)
    assert len(runs) == 4
    assert len({frozenset(r.data.params) for r in runs}) == 1
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags
        assert steps_of(client, run.info.run_id, "loss") == list(range(1, 41))
        assert run.data.tags["end_reason"] == "completed"
        artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
        assert artifacts == ["config.resolved.yaml", "trainable.safetensors"]
