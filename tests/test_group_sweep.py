"""A sweep in shared-group mode (`resources.shared_group: true`) through the real CLI.

Trials train as members of one process over one copy of the frozen model, yet each stays a
Ray Tune trial and an MLflow child run of its own, and its losses are those of the same
config trained alone (`python -m trainer` on the trial's config.resolved.yaml).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_sweep import SMOKE, _mlflow_rows, _sweep, _write

from trainer.yaml_io import dump_yaml, load_yaml_file

pytestmark = pytest.mark.integration

STEPS = 12
REPORT_EVERY = load_yaml_file(SMOKE)["trials"]["report_every"]


@pytest.fixture(scope="module")
def group_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("group")
    path = _write(tmp, {
        "sweep.name": "group",
        "resources.shared_group": True,
        "max_concurrent_trials": 3,
        "scheduler.type": "asha", "scheduler.grace_period": 4,
    }, space={"learning_rate": {"grid": [0.001, 0.003, 0.005]},
              "debug.inject_nan_at_step": {"grid": [None, 3]}})
    data = load_yaml_file(path)
    data["base"]["overrides"]["model.lora.dropout"] = 0.0  # bit-comparable with solo runs
    # The device guard's read-back windows, as on a GPU (10 there): records and reports
    # arrive 3 steps at a time, the NaN stop at step 3 ends a window, ASHA stops trials
    # at reports inside them.
    data["base"]["overrides"]["output.sync_every"] = 3
    path.write_text(dump_yaml(data))
    # and a profile of 3 of the group's steps, after 2 (tuning.raytune.driver.group_profile)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHASE2_GROUP_PROFILE", "3:2")
        res = _sweep(path, cwd=tmp)
    return tmp, res


def test_group_sweep_runs_every_trial_as_its_own_trial(group_sweep):
    tmp, res = group_sweep
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "shared group: up to 3 trials in one process" in res.stdout
    sweep_dir = tmp / "sweeps" / "group"
    index = json.loads((sweep_dir / "trials.json").read_text())
    assert len(index) == 6
    rows = _mlflow_rows(sweep_dir / "mlflow" / "mlflow.db")
    children = {r for r in rows["runs"] if r in rows["parent_of"]}
    assert len(children) == 6 and all(s == "FINISHED" for s in rows["runs"].values())
    assert rows["nan_values"] == 0
    for run_id in children:
        trial = rows["trial_of"][run_id]
        recs = (sweep_dir / "trials" / trial / "metrics.jsonl").read_text().splitlines()
        trained = [json.loads(x)["step"] for x in recs if json.loads(x)["loss"] is not None]
        summary = json.loads((sweep_dir / "trials" / trial / "summary.json").read_text())
        logged = sorted(rows["steps"].get(run_id, []))
        # Every reported step, once. A member trains up to one report ahead of its client
        # (tuning.raytune.group_actor.REPORTS_AHEAD), so a trial ASHA stopped may have recorded a
        # few steps past the report it was stopped at: never more than one report's worth.
        assert logged == trained[:len(logged)], (trial, logged, trained)
        if summary["end_reason"] == "nan_stop":
            assert logged == trained
        assert len(trained) - len(logged) <= REPORT_EVERY, (trial, logged, trained)
    ended = 0
    for run_dir in (sweep_dir / "trials").iterdir():
        cfg = load_yaml_file(run_dir / "config.resolved.yaml")
        summary = json.loads((run_dir / "summary.json").read_text())
        if cfg["debug"]["inject_nan_at_step"] is not None:  # only that member saw the NaN
            assert (summary["end_reason"], summary["first_nan_step"]) == ("nan_stop", 3)
            assert summary["first_nan_group"] == "projector"
        else:  # trained to the end, or stopped by ASHA (the member left the group)
            assert summary["end_reason"] in ("completed", "stopped"), summary
            assert summary["nan_events"] == []
            ended += summary["end_reason"] == "completed"
    assert ended >= 1
    # Where the group's step thread spent its time: every step a member trained (all in
    # metrics.jsonl, reported or not) went through it, and the console says so. A member
    # stopped by a NaN may have launched up to sync_every - 1 more steps in its read-back
    # window, which the device guard made no-ops (trainer.loop.flush_window): no record.
    stats = json.loads((sweep_dir / "group_stats.json").read_text())
    recorded = sum(len((d / "metrics.jsonl").read_text().splitlines())
                   for d in (sweep_dir / "trials").iterdir())
    nan_stopped = sum(json.loads((d / "summary.json").read_text())["end_reason"] == "nan_stop"
                      for d in (sweep_dir / "trials").iterdir())
    assert recorded <= stats["member_steps"] <= recorded + nan_stopped * (3 - 1), stats
    assert 1 <= stats["members_per_step"] <= 3 and stats["step_s"] > 0, stats
    # windows of 3 (the device guard): their read-backs are part of the step time
    # (a CPU's read-backs are ~1e-5 of a step: the fraction keeps significant digits, not places)
    assert 0 < stats["sync_s"] < stats["step_s"] and 0 < stats["sync_fraction"] < 1, stats
    warm_s = stats["step_s"] - stats["long_step_s"]
    assert stats["sync_fraction"] == pytest.approx(stats["sync_s"] / warm_s, rel=0.01, abs=2e-6)
    assert f"shared group: {stats['group_steps']} group steps of" in res.stdout
    profile = (sweep_dir / "group_profile.txt").read_text()
    assert profile.startswith("3 steps profiled: wall ") and "aten::" in profile, profile[:300]
    assert stats["profile_report_s"] > 0, stats  # counted apart from the steps


def assert_trains_as_alone(run_dir: Path, solo_root: Path, steps: int = STEPS) -> bool:
    """Train a member's config.resolved.yaml alone (`python -m trainer`) and assert its
    records equal the member's; False (nothing run) for a member that stopped early (a
    NaN, or ASHA: the solo twin would run on)."""
    cfg = load_yaml_file(run_dir / "config.resolved.yaml")
    group_recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if cfg["debug"]["inject_nan_at_step"] is not None or len(group_recs) < steps:
        return False
    cfg["output"].update(root=str(solo_root), run_name=run_dir.name)
    solo_root.mkdir(parents=True, exist_ok=True)
    solo_yaml = solo_root / f"{run_dir.name}.yaml"
    solo_yaml.write_text(dump_yaml(cfg))
    done = subprocess.run([sys.executable, "-m", "trainer", str(solo_yaml)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    solo = solo_root / run_dir.name / "metrics.jsonl"
    solo_recs = [json.loads(x) for x in solo.read_text().splitlines()]
    assert [r["step"] for r in group_recs] == [r["step"] for r in solo_recs]
    for g, s in zip(group_recs, solo_recs, strict=True):
        for key in ("loss", "grad_norm", "lr/projector", "lr/lora"):
            assert g[key] == pytest.approx(s[key], rel=1e-4, abs=1e-6), (run_dir, key, g)
    return True


def test_group_members_train_exactly_as_alone(group_sweep, tmp_path):
    tmp, res = group_sweep
    assert res.returncode == 0
    compared = sum(assert_trains_as_alone(run_dir, tmp_path / "solo")
                   for run_dir in sorted((tmp / "sweeps" / "group" / "trials").iterdir()))
    assert compared >= 1  # ASHA keeps at least the best clean trial to the end


@pytest.mark.parametrize("value", ["ten", "0", "10:x", "-1"])
def test_a_bad_group_profile_variable_is_refused_before_anything_is_written(
        tmp_path, capsys, monkeypatch, value):
    from tuning.sweep import main as sweep_main

    monkeypatch.setenv("PHASE2_GROUP_PROFILE", value)
    path = _write(tmp_path, {"resources.shared_group": True})
    assert sweep_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert f"PHASE2_GROUP_PROFILE={value!r}: expected N or N:WARM" in err, err
    assert "Traceback" not in err and not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize(("edit", "space", "needle"), [
    ({"base.overrides.data.feature_cache": False}, {}, "base: data.feature_cache"),
    ({}, {"model.compile": {"grid": ["off", "default"]}}, "space.model.compile: varies"),
    ({}, {"phase2.precision": {"grid": ["fp32", "bf16"]}}, "space.phase2.precision: varies"),
])
def test_group_sweep_refuses_what_a_group_cannot_share(tmp_path, capsys, edit, space, needle):
    from tuning.sweep import main as sweep_main

    path = _write(tmp_path, {"resources.shared_group": True}, space=space)
    data = load_yaml_file(path)
    for dotted, value in edit.items():  # overrides keys are themselves dotted
        data["base"]["overrides"][dotted.removeprefix("base.overrides.")] = value
    path.write_text(dump_yaml(data))
    assert sweep_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "sweeps").exists()



@pytest.mark.slow
def test_a_compiled_group_sweep_trains_while_a_helper_compiles(tmp_path):
    """model.compile_ahead through the real CLI: the group actor starts the helper, its
    members train eagerly meanwhile, and the helper's artifacts land in the storage's
    compile cache, where the group loads them. 1,600 steps of a one-layer LLM outlast the
    helper's cold compile: on an idle 2-core machine the two-layer LLM's was done after
    266 eager group steps, but beside another test file's Ray cluster the helper fell
    behind the eager steps by more than 4.5x (all 1,200 steps of a run were eager)."""
    path = _write(tmp_path, {"sweep.name": "ahead", "resources.shared_group": True,
                             "trials.report_every": 100, "trials.checkpoint_every": 1000})
    data = load_yaml_file(path)
    data["base"]["overrides"].update({
        "model.compile": "default", "model.compile_ahead": True,
        "demo.llm.num_hidden_layers": 1, "phase2.total_training_steps": 1600})
    path.write_text(dump_yaml(data))
    res = _sweep(path, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stats = json.loads((tmp_path / "sweeps" / "ahead" / "group_stats.json").read_text())
    assert 1 <= stats["ahead_steps"] < stats["group_steps"] == 1600, stats
    assert f"{stats['ahead_steps']} ran eagerly while a helper process compiled" in res.stdout
    # the group's own lines reach the sweep's console, from its stats' events
    assert "s [compile ahead] compiling the group's" in res.stdout, res.stdout[-3000:]
    assert "s [compile cache] loaded compiled artifacts" in res.stdout, res.stdout[-3000:]
    cache = tmp_path / "sweeps" / "compile_cache"
    assert len(list(cache.glob("*.bin"))) == 1  # the helper's, loaded: none saved besides
    assert not list(cache.glob(".compile-ahead-*"))  # its scratch directory removed
    for run_dir in (tmp_path / "sweeps" / "ahead" / "trials").iterdir():
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["end_reason"] == "completed" and summary["nan_events"] == []
