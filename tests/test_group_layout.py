"""One shared group per GPU, without Ray: the resources keys, how groups, slots and the
sweep's concurrency follow from them and the cluster, and the shared-storage rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_sweep import _write

from trainer.errors import ConfigError
from tuning.raytune.driver import plan_groups, storage_problem
from tuning.search_config import load_search


def _loaded(tmp_path: Path, **edit):
    return load_search(_write(tmp_path, {"resources.shared_group": True, **edit}))


def _problem(tmp_path: Path, **edit) -> str:
    with pytest.raises(ConfigError) as err:
        load_search(_write(tmp_path, edit))
    return "\n".join(err.value.lines())


def test_one_group_by_default_with_max_concurrent_trials_slots(tmp_path):
    cfg = _loaded(tmp_path, max_concurrent_trials=3).cfg
    plan = plan_groups(cfg, {"CPU": 2.0, "GPU": 8.0}, "s.yaml")
    assert (plan.groups, plan.slots, plan.concurrency) == (1, 3, 3)
    assert plan.bundle == {"CPU": 1.0}


def test_groups_times_trials_per_group_is_the_concurrency(tmp_path):
    cfg = _loaded(tmp_path, **{"resources.groups": 2, "resources.trials_per_group": 3,
                               "resources.group_resources": {"fake_gpu": 1}}).cfg
    # smoke.yaml's max_concurrent_trials is explicit (2): it caps the concurrency
    plan = plan_groups(cfg, {"CPU": 4.0, "fake_gpu": 2.0}, "s.yaml")
    assert (plan.groups, plan.slots, plan.concurrency) == (2, 3, 2)
    assert plan.bundle == {"CPU": 1.0, "fake_gpu": 1.0}
    path = _write(tmp_path, {"resources.shared_group": True, "resources.groups": 2,
                             "resources.trials_per_group": 3}, drop=("max_concurrent_trials",))
    plan = plan_groups(load_search(path).cfg, {"CPU": 4.0}, "s.yaml")
    assert (plan.groups, plan.slots, plan.concurrency) == (2, 3, 6)


def test_max_concurrent_trials_is_spread_over_the_groups(tmp_path):
    cfg = _loaded(tmp_path, max_concurrent_trials=5,
                  **{"resources.groups": 2, "resources.gpus_per_trial": 1}).cfg
    plan = plan_groups(cfg, {"CPU": 8.0, "GPU": 2.0}, "s.yaml")
    assert (plan.groups, plan.slots, plan.concurrency) == (2, 3, 5)


@pytest.mark.parametrize(("resources", "cluster", "groups"), [
    ({"gpus_per_trial": 1}, {"CPU": 16.0, "GPU": 8.0}, 8),  # one per GPU
    # CPUs bound: 4 groups of 4 would leave none for the members' trials
    ({"gpus_per_trial": 1, "cpus_per_trial": 4}, {"CPU": 16.0, "GPU": 8.0}, 3),
    ({"gpus_per_trial": 1, "cpus_per_trial": 4}, {"CPU": 17.0, "GPU": 8.0}, 4),
    ({"group_resources": {"fake_gpu": 1}}, {"CPU": 4.0, "fake_gpu": 2.0}, 2),
    ({}, {"CPU": 16.0, "GPU": 8.0}, 1),  # no accelerator asked for: one group
])
def test_auto_groups_are_as_many_as_the_cluster_holds(tmp_path, resources, cluster, groups):
    edit = {f"resources.{k}": v for k, v in resources.items()}
    cfg = _loaded(tmp_path, **{"resources.groups": "auto", **edit}).cfg
    assert plan_groups(cfg, cluster, "s.yaml").groups == groups


@pytest.mark.parametrize(("edit", "cluster", "needle"), [
    ({"resources.groups": 3, "resources.gpus_per_trial": 1}, {"CPU": 8.0, "GPU": 2.0},
     "resources.groups: 3 groups need 3 GPU (1 each), the Ray cluster has 2"),
    ({"resources.groups": "auto", "resources.group_resources": {"fake_gpu": 1}},
     {"CPU": 8.0}, "resources.groups: auto: the Ray cluster has no room for one group"),
])
def test_groups_the_cluster_cannot_hold_are_refused(tmp_path, edit, cluster, needle):
    cfg = _loaded(tmp_path, **edit).cfg
    with pytest.raises(ConfigError) as err:
        plan_groups(cfg, cluster, "s.yaml")
    assert needle in err.value.lines()[0], err.value.lines()


@pytest.mark.parametrize(("edit", "needle"), [
    ({"resources.groups": 2}, "resources.groups: applies only to a shared group"),
    ({"resources.trials_per_group": 2}, "resources.trials_per_group: applies only to a"),
    ({"resources.shared_group": True, "resources.groups": 0}, "resources.groups"),
    ({"resources.shared_group": True, "resources.groups": "many"}, "resources.groups"),
    ({"resources.shared_group": True, "resources.group_resources": {"GPU": 1}},
     "set cpus_per_trial / gpus_per_trial instead"),
    ({"resources.shared_group": True, "resources.group_resources": {"fake_gpu": 0}},
     "fake_gpu: 0"),
    ({"resources.shared_group": True, "resources.groups": 2, "resources.trials_per_group": 1,
      "max_concurrent_trials": 3},
     "max_concurrent_trials: 3 > groups 2 x trials_per_group 1"),
])
def test_bad_group_keys_are_refused_with_the_key_and_the_fix(tmp_path, edit, needle):
    assert needle in _problem(tmp_path, **edit)


def test_storage_every_node_reads_passes_and_one_that_differs_is_named(tmp_path):
    assert storage_problem(tmp_path, "t0k", [("10.0.0.1", "t0k"), ("10.0.0.2", "t0k")],
                           "s.yaml") is None
    problem = storage_problem(tmp_path, "t0k", [("10.0.0.1", "t0k"), ("10.0.0.2", None),
                                                ("10.0.0.3", "other")], "s.yaml")
    line = problem.line()
    assert line.startswith(f"s.yaml: sweep.storage_path: {tmp_path} is not the driver's")
    assert "node(s) 10.0.0.2, 10.0.0.3:" in line and "every node mounts" in line


def test_the_dry_run_says_how_many_groups_run_at_a_time(tmp_path, capsys):
    from tuning.sweep import main as sweep_main

    path = _write(tmp_path, {"resources.shared_group": True, "resources.groups": 2,
                             "resources.trials_per_group": 3},
                  drop=("max_concurrent_trials",))
    assert sweep_main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 at a time" in out and "in one of 2 shared group(s) of 3 slots" in out, out


def test_groups_leave_cpu_for_their_members_trials(tmp_path):
    # A group that takes every CPU would leave its members' trials (MEMBER_CPU each)
    # pending forever: refused, naming the key and a cpus_per_trial that fits.
    cfg = _loaded(tmp_path, max_concurrent_trials=8,
                  **{"resources.cpus_per_trial": 2}).cfg
    with pytest.raises(ConfigError) as err:
        plan_groups(cfg, {"CPU": 2.0}, "s.yaml")
    line = err.value.lines()[0]
    assert "resources.cpus_per_trial: 1 group(s) x 2 CPU and their 8 trials" in line, line
    assert "lower cpus_per_trial to 1.92 or less" in line, line
    assert plan_groups(cfg, {"CPU": 3.0}, "s.yaml").groups == 1
    # auto: one group fewer than the CPUs alone would allow, so the trials have room
    cfg = _loaded(tmp_path, **{"resources.groups": "auto", "resources.gpus_per_trial": 1,
                               "resources.cpus_per_trial": 4,
                               "resources.trials_per_group": 2}).cfg
    plan = plan_groups(cfg, {"CPU": 16.0, "GPU": 8.0}, "s.yaml")
    assert (plan.groups, plan.concurrency) == (3, 2), plan
