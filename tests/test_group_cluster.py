"""One shared group per GPU on a real two-node Ray cluster on this machine: each node has
one `fake_gpu` (a Ray custom resource standing in for a GPU on CPU), `resources.groups:
auto` starts a group on each, pinned to it by its placement group bundle, and the trials
fill both groups' slots. The sweep dir is on this machine's disk, which both nodes read:
the shared-storage rule holds (tuning.raytune.driver.check_shared_storage)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_group_sweep import STEPS, assert_trains_as_alone
from test_sweep import _mlflow_rows, _sweep, _write

from trainer.yaml_io import dump_yaml, load_yaml_file

pytestmark = pytest.mark.slow

LRS = [0.001, 0.002, 0.003, 0.005]


def _cluster():
    """A head and a second node, 2 CPUs and one fake GPU each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "resources": {"fake_gpu": 1}})
    cluster.add_node(num_cpus=2, resources={"fake_gpu": 1})
    cluster.wait_for_nodes()
    return cluster


def _search(tmp_path: Path, address: str, steps: int = STEPS, **edit) -> Path:
    """Two groups (auto: one per fake GPU) of two slots, four trials."""
    path = _write(tmp_path, {
        "sweep.name": "pergpu", "ray.num_cpus": None, "ray.address": address,
        "resources.shared_group": True, "resources.groups": "auto",
        "resources.trials_per_group": 2, "resources.group_resources": {"fake_gpu": 1},
        **edit}, drop=("max_concurrent_trials",), space={"learning_rate": {"grid": LRS}})
    data = load_yaml_file(path)
    data["base"]["overrides"]["model.lora.dropout"] = 0.0  # bit-comparable with solo
    data["base"]["overrides"]["phase2.total_training_steps"] = steps
    path.write_text(dump_yaml(data))
    return path


def test_two_groups_on_two_fake_gpus_each_train_their_own_members(tmp_path):
    cluster = _cluster()
    try:
        path = _search(tmp_path, cluster.address)
        res = _sweep(path, cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "shared groups: 2 processes, each up to 2 trials" in res.stdout, res.stdout
        assert "4 trials at a time" in res.stdout
    finally:
        cluster.shutdown()
    sweep_dir = tmp_path / "sweeps" / "pergpu"
    index = json.loads((sweep_dir / "trials.json").read_text())
    assert len(index) == 4 and all(v["status"] == "TERMINATED" for v in index.values()), index
    # every trial finished and reported: its MLflow child run has every step
    rows = _mlflow_rows(sweep_dir / "mlflow" / "mlflow.db")
    children = [r for r in rows["runs"] if r in rows["parent_of"]]
    assert len(children) == 4 and all(s == "FINISHED" for s in rows["runs"].values())
    assert all(sorted(rows["steps"][r]) == list(range(1, STEPS + 1)) for r in children)
    # two groups, one per node (its fake GPU), each with two members of its own
    groups = json.loads((sweep_dir / "group_stats.json").read_text())["groups"]
    assert len(groups) == 2 and groups[0]["node_id"] != groups[1]["node_id"], groups
    members = [set(g["members"]) for g in groups]
    # Each group took members of its own, at most its 2 slots at a time. How the 4 split is
    # the trials' timing: a trial joins the least loaded group, and a tiny eager member
    # may finish and free its slot before a group still loading its LLM takes another
    # (2 + 2 alone, 3 + 1 on a loaded machine).
    assert all(members) and not members[0] & members[1], members
    assert members[0] | members[1] == set(index)
    # each trained exactly its own members' steps
    assert [g["member_steps"] for g in groups] == [len(m) * STEPS for m in members], groups
    for trial in index:
        summary = json.loads((sweep_dir / "trials" / trial / "summary.json").read_text())
        assert summary["end_reason"] == "completed", (trial, summary)
    # a member of each group trains as it would alone
    for m in members:
        assert assert_trains_as_alone(sweep_dir / "trials" / min(m), tmp_path / "solo")


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.is_file() else []


def _holder(path: Path) -> psutil.Process | None:
    """The process that holds `path` open (a member's metrics.jsonl: its group's actor)."""
    for p in psutil.process_iter():
        try:
            if any(f.path == str(path) for f in p.open_files()):
                return p
        except psutil.Error:
            continue
    return None


def test_a_killed_group_restarts_and_its_trials_rejoin_from_their_checkpoints(tmp_path):
    """A group's process dies mid-sweep: Ray restarts its actor in its bundle (empty), its
    members' trials error and Tune retries them; each retried trial leaves every group,
    rejoins one with a free slot, resumes from its checkpoint and trains as alone."""
    steps, proc, log = 60, None, tmp_path / "sweep.log"
    cluster = _cluster()
    try:
        path = _search(tmp_path, cluster.address, steps=steps,
                       **{"trials.checkpoint_every": 6, "trials.max_failures": 2})
        with log.open("w") as out:  # a file, not a pipe nobody reads while the test polls
            proc = subprocess.Popen([sys.executable, "-m", "tuning.sweep", str(path)],
                                    cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        trials = tmp_path / "sweeps" / "pergpu" / "trials"
        victim, deadline = None, time.monotonic() + 300
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            for run_dir in sorted(trials.iterdir()) if trials.is_dir() else []:
                if 8 <= len(_steps(run_dir)) <= steps - 20:
                    victim = run_dir
                    break
            time.sleep(0.05)
        assert victim is not None, "no trial past its first checkpoint in time"
        actor = _holder(victim / "metrics.jsonl")
        assert actor is not None and "GroupActor" in " ".join(actor.cmdline()), actor
        actor.kill()
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()
    sweep_dir = tmp_path / "sweeps" / "pergpu"
    index = json.loads((sweep_dir / "trials.json").read_text())
    assert len(index) == 4 and all(v["status"] == "TERMINATED" for v in index.values()), index
    attempts = {t: len((sweep_dir / "trials" / t / "placement.jsonl").read_text().splitlines())
                for t in index}
    assert attempts[victim.name] >= 2, attempts  # retried
    rows = _mlflow_rows(sweep_dir / "mlflow" / "mlflow.db")
    children = [r for r in rows["runs"] if r in rows["parent_of"]]
    assert len(children) == 4 and all(s == "FINISHED" for s in rows["runs"].values())
    assert all(sorted(rows["steps"][r]) == list(range(1, steps + 1)) for r in children)
    for trial in index:
        run_dir = sweep_dir / "trials" / trial
        assert _steps(run_dir) == list(range(1, steps + 1)), trial
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["end_reason"] == "completed", (trial, summary)
    assert assert_trains_as_alone(victim, tmp_path / "solo", steps)
