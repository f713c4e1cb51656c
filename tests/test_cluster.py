"""Scale-out: a real two-node Ray cluster on this machine, trials on both nodes, MLflow over
HTTP from every node (issue: Docker and scale-out on an existing Ray cluster). It is also the
suite's smoke sweep against a real MLflow server: parent and children, every step, params
and verdict tags read back over HTTP."""

from __future__ import annotations

import json

import pytest
from test_mlflow_server import MlflowServer, free_port
from test_sweep import _sweep, _write

pytestmark = pytest.mark.slow


def test_sweep_on_a_two_node_cluster_logs_every_trial(tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    server = MlflowServer(free_port(), f"sqlite:///{tmp_path / 'server.db'}",
                          tmp_path / "artifacts", tmp_path / "server.log")
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        server.start()
        path = _write(tmp_path, {"mlflow.tracking_uri": server.url, "ray.num_cpus": None,
                                 "ray.address": cluster.address})
        res = _sweep(path, cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert f"MLflow: {server.url}" in res.stdout
        trials = sorted((tmp_path / "sweeps" / "smoke" / "trials").iterdir())
        nodes = {json.loads(line)["node_id"] for t in trials
                 for line in (t / "placement.jsonl").read_text().splitlines()}
        assert len(trials) == 2 and len(nodes) == 2  # 1 CPU per node, 1 CPU per trial
        client = MlflowClient(server.url)
        runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(runs) == 3 and len(children) == 2
        for child in children:
            steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "loss"))
            assert steps == list(range(1, 13))
            assert child.data.params["projector_lr"] in {"0.005", "0.025"}
            assert child.data.tags["phase2tune.verdict"]
    finally:
        server.stop()
        cluster.shutdown()
