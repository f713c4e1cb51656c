"""One shared group per GPU on a real two-node Ray cluster on this machine: each node has
one `fake_gpu` (a Ray custom resource standing in for a GPU on CPU), `resources.groups:
auto` starts a group on each, pinned to it by its placement group bundle, and the trials
fill both groups' slots. The sweep dir is on this machine's disk, which both nodes read:
the shared-storage rule holds (tuning.raytune.driver.check_shared_storage)."""

from __future__ import annotations

import json

import pytest
from test_group_sweep import STEPS, assert_trains_as_alone
from test_sweep import _mlflow_rows, _sweep, _write

from trainer.yaml_io import dump_yaml, load_yaml_file

pytestmark = pytest.mark.slow

LRS = [0.001, 0.002, 0.003, 0.005]


def test_two_groups_on_two_fake_gpus_each_train_their_own_members(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "resources": {"fake_gpu": 1}})
    try:
        cluster.add_node(num_cpus=2, resources={"fake_gpu": 1})
        cluster.wait_for_nodes()
        path = _write(tmp_path, {
            "sweep.name": "pergpu", "ray.num_cpus": None, "ray.address": cluster.address,
            "resources.shared_group": True, "resources.groups": "auto",
            "resources.trials_per_group": 2, "resources.group_resources": {"fake_gpu": 1},
        }, drop=("max_concurrent_trials",), space={"learning_rate": {"grid": LRS}})
        data = load_yaml_file(path)
        data["base"]["overrides"]["model.lora.dropout"] = 0.0  # bit-comparable with solo
        path.write_text(dump_yaml(data))
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
    assert [len(m) for m in members] == [2, 2] and not members[0] & members[1], members
    assert members[0] | members[1] == set(index)
    # each trained its own two members' steps (whether side by side or one after the
    # other is the trials' start times': a tiny eager group steps without waiting)
    assert [g["member_steps"] for g in groups] == [2 * STEPS, 2 * STEPS], groups
    for trial in index:
        summary = json.loads((sweep_dir / "trials" / trial / "summary.json").read_text())
        assert summary["end_reason"] == "completed", (trial, summary)
    # a member of each group trains as it would alone
    for m in members:
        assert assert_trains_as_alone(sweep_dir / "trials" / min(m), tmp_path / "solo")
