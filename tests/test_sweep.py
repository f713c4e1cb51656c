"""The sweep driver: validation before anything starts, the real CLI end to end,
NaN handling under a scheduler, resume and the sweep lock."""

from __future__ import annotations

import fcntl
import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, smoke_assets

from trainer.config import config_from_data
from trainer.errors import ConfigError, Problem
from trainer.yaml_io import dump_yaml, load_yaml_file
from tuning.search_config import load_search, trial_count
from tuning.sweep import main as sweep_main

pytestmark = pytest.mark.integration

SMOKE = ROOT / "configs" / "smoke.yaml"


def _write(tmp_path: Path, edit: dict | None = None, drop: tuple = (),
           space: dict | None = None, shared_assets: bool = True) -> Path:
    """A search.yaml from configs/smoke.yaml under `tmp_path`, with dotted `edit`s; its demo
    assets are the session's (`conftest.smoke_assets`) unless `shared_assets` is false."""
    data = load_yaml_file(SMOKE)
    data["sweep"]["storage_path"] = str(tmp_path / "sweeps")
    data["base"]["overrides"]["output.root"] = str(tmp_path / "runs")
    if shared_assets:
        data["base"]["overrides"]["output.assets_dir"] = str(smoke_assets())
    for key in drop:
        data.pop(key)
    for dotted, value in (edit or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    data["space"].update(space or {})  # space keys may themselves be dotted config keys
    path = tmp_path / "search.yaml"
    path.write_text(dump_yaml(data))
    return path


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"space.learning_rate": {"uniform": [0.01, 0.001]}}, "space.learning_rate.uniform: min"),
        ({"space.learning_rate": {"loguniform": [0.0, 0.1]}}, "log-uniform bounds must be > 0"),
        ({"space.gradient_clip_val": {"choice": []}}, "space.gradient_clip_val.choice: empty"),
        ({"num_samples": 0}, "num_samples"),
        ({"scheduler.type": "asha", "scheduler.grace_period": 50}, "scheduler.grace_period"),
        ({"space.warmup_steps": {"grid": [3, 40]}}, "space.warmup_steps: at 40: warmup"),
        ({"space.learning_rat": {"grid": [0.1]}}, "did you mean 'learning_rate'?"),
        ({"schedular": {}}, "schedular: unknown key (did you mean 'scheduler'?)"),
        ({"base.config": "missing.yaml"}, "base.config: file"),
        ({"space.learning_rate": {"grid": [-0.1, 0.1]}}, "space.learning_rate: Input should be"),
        ({"sweep.name": "../escape"}, "sweep.name"),
        ({"search.algorithm": "optuna"}, "grid is not supported by optuna"),
    ],
)
def test_bad_search_yaml_exits_2_before_anything_starts(tmp_path, capsys, edit, needle):
    import ray

    path = _write(tmp_path, edit)
    assert sweep_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert all(line.startswith("error: ") for line in err.strip().splitlines())
    assert "Traceback" not in err
    assert not (tmp_path / "sweeps").exists()  # no sweep dir, no MLflow store
    assert not ray.is_initialized()


def test_space_forms_become_ray_domains(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    from tuning.raytune.space import param_space

    space = param_space({
        "a": {"loguniform": [1e-4, 1e-2]}, "b": {"choice": [None, 0.5]},
        "c": {"qrandint": [10, 40, 10]}, "d": {"grid": [1, 2, 3]}, "e": 7,
        "f": {"quniform": [0.1, 0.9, 0.1]},
    })
    assert isinstance(space["a"], Float) and isinstance(space["b"], Categorical)
    assert isinstance(space["c"], Integer) and space["d"] == {"grid_search": [1, 2, 3]}
    assert space["e"] == 7 and isinstance(space["f"], Float)
    loaded = load_search(_write(tmp_path, {"space.warmup_steps": {"grid": [1, 2, 3]},
                                           "num_samples": 2}))
    assert trial_count(loaded.cfg) == 2 * 2 * 3  # samples x learning_rate grid x warmup grid


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    assert sweep_main([str(_write(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trials: 2" in out and "12 optimizer steps" in out
    assert "phase2.learning_rate: {'grid': [0.001, 0.005]}" in out
    assert not (tmp_path / "sweeps").exists()


def _sweep(path: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuning.sweep", str(path), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _mlflow_rows(db: Path) -> dict:
    con = sqlite3.connect(db)
    try:
        runs = con.execute("select run_uuid, status from runs").fetchall()
        tags = dict(con.execute(
            "select run_uuid, value from tags where key='phase2tune.trial_id'").fetchall())
        parents = dict(con.execute(
            "select run_uuid, value from tags where key='mlflow.parentRunId'").fetchall())
        steps = {}
        for run_id, step in con.execute(
                "select run_uuid, step from metrics where key='loss'").fetchall():
            steps.setdefault(run_id, []).append(step)
        bad = con.execute("select count(*) from metrics where value != value").fetchone()[0]
    finally:
        con.close()
    return {"runs": dict(runs), "trial_of": tags, "parent_of": parents, "steps": steps,
            "nan_values": bad}


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    path = _write(tmp, {"scheduler.type": "asha", "scheduler.grace_period": 4},
                  space={"debug.inject_nan_at_step": {"grid": [None, 3]}})
    res = _sweep(path, cwd=tmp)
    return tmp, path, res


def test_smoke_sweep_end_to_end(smoke_sweep):
    tmp, _, res = smoke_sweep
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sweep_dir = tmp / "sweeps" / "smoke"
    index = json.loads((sweep_dir / "trials.json").read_text())
    assert len(index) == 4  # 2 learning rates x (clean, NaN-injected)
    trials = sorted((sweep_dir / "trials").iterdir())
    clean = []
    for run_dir in trials:
        cfg = load_yaml_file(run_dir / "config.resolved.yaml")
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if cfg["debug"]["inject_nan_at_step"] is None:
            clean.append(run_dir.name)
            assert [r["step"] for r in recs][-1] in (4, 12)  # ASHA may cut after the grace
        else:  # stopped at the injected NaN, marked unstable, the event names the group
            summary = json.loads((run_dir / "summary.json").read_text())
            assert (summary["end_reason"], summary["first_nan_step"]) == ("nan_stop", 3)
            assert summary["first_nan_group"] == "projector"
    assert len(clean) == 2
    # the report: leaderboard, best config, plots
    report = sweep_dir / "report"
    board = (report / "leaderboard.csv").read_text()
    assert board.count("\n") >= 5 and "nan" in board
    best = load_yaml_file(report / "best_stable.yaml")
    assert config_from_data(best, "best_stable.yaml").phase2.learning_rate in (0.001, 0.005)
    assert {p.name for p in (report / "plots").iterdir()} >= {"loss.png", "stability_map.png"}
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:///" in res.stdout
    assert "Leaderboard" in res.stdout


def test_smoke_sweep_mlflow_has_one_parent_and_every_step_once(smoke_sweep):
    tmp, _, _ = smoke_sweep
    rows = _mlflow_rows(tmp / "sweeps" / "smoke" / "mlflow" / "mlflow.db")
    children = {r for r in rows["runs"] if r in rows["parent_of"]}
    parents = set(rows["runs"]) - children
    assert len(parents) == 1 and len(children) == 4
    assert set(rows["parent_of"].values()) == parents
    assert all(status == "FINISHED" for status in rows["runs"].values())
    assert rows["nan_values"] == 0  # a NaN is an event and a tag, never a metric value
    for run_id in children:
        trial = rows["trial_of"][run_id]
        recs = (tmp / "sweeps" / "smoke" / "trials" / trial / "metrics.jsonl").read_text()
        reported = [json.loads(x)["step"] for x in recs.splitlines()
                    if json.loads(x)["loss"] is not None]
        assert sorted(rows["steps"].get(run_id, [])) == reported


def test_rerun_resumes_without_redoing_trials_and_refuses_edits(smoke_sweep):
    tmp, path, _ = smoke_sweep
    sweep_dir = tmp / "sweeps" / "smoke"
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trials/*/metrics.jsonl")}
    res = _sweep(path, cwd=tmp)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming smoke" in res.stdout
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("trials/*/metrics.jsonl")} == before
    rows = _mlflow_rows(sweep_dir / "mlflow" / "mlflow.db")
    assert len(rows["runs"]) == 5  # no duplicate runs

    data = load_yaml_file(path)
    data["num_samples"] = 3
    edited = tmp / "edited.yaml"
    edited.write_text(dump_yaml(data))
    res = _sweep(edited, cwd=tmp)
    assert res.returncode == 2
    assert "was started with a different config" in res.stderr
    assert "num_samples: 3" in res.stderr and "--restart" in res.stderr


def test_second_sweep_with_the_same_name_refuses(tmp_path, capsys):
    path = _write(tmp_path)
    sweep_dir = tmp_path / "sweeps" / "smoke"
    sweep_dir.mkdir(parents=True)
    with open(sweep_dir / ".sweep.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sweep_main([str(path)]) == 2
    assert "already running" in capsys.readouterr().err
    assert sorted(p.name for p in sweep_dir.iterdir()) == [".sweep.lock"]  # untouched


def test_unreachable_tracking_server_fails_fast(tmp_path, capsys):
    import time

    from test_mlflow_server import free_port

    path = _write(tmp_path, {"mlflow.tracking_uri": f"http://127.0.0.1:{free_port()}"})
    t0 = time.monotonic()
    assert sweep_main([str(path)]) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreachable" in err[0] and "mlflow.tracking_uri" in err[0]
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.slow
def test_recheck_stage_reruns_the_best_config_and_writes_its_table(tmp_path):
    path = _write(tmp_path, {"recheck.seeds": [1, 2], "recheck.lr_factors": [1.0, 1.5]})
    res = _sweep(path, "--recheck", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    sweep_dir = tmp_path / "sweeps" / "smoke"
    runs = sorted((sweep_dir / "recheck" / "trials").iterdir())
    assert len(runs) == 4  # top 1 x 2 seeds x 2 LR factors
    seeds_lrs = sorted((load_yaml_file(r / "config.resolved.yaml")["phase2"]["seed"],
                        load_yaml_file(r / "config.resolved.yaml")["phase2"]["learning_rate"])
                       for r in runs)
    best = load_yaml_file(sweep_dir / "report" / "best_stable.yaml")["phase2"]["learning_rate"]
    want = sorted((s, best * f) for s in (1, 2) for f in (1.0, 1.5))
    assert [s for s, _ in seeds_lrs] == [s for s, _ in want]
    assert all(g == pytest.approx(w) for (_, g), (_, w) in zip(seeds_lrs, want, strict=True))
    table = (sweep_dir / "report" / "recheck.md").read_text()
    assert "Robustness re-check" in table and "2/2" in table
    rows = _mlflow_rows(sweep_dir / "mlflow" / "mlflow.db")
    assert len(rows["runs"]) == 2 + 1 + 4 + 1  # sweep parent + children, recheck parent + children


def test_best_stable_yaml_trains_with_the_trainer_cli(smoke_sweep):
    tmp, _, _ = smoke_sweep
    best = tmp / "sweeps" / "smoke" / "report" / "best_stable.yaml"
    res = subprocess.run(
        [sys.executable, "-m", "trainer", str(best), "--set", "demo.num_examples=64",
         "--set", "demo.llm.pretrain_steps=50", "--set", f"output.root={tmp / 'runs'}",
         "--set", "output.run_name=from-best"],
        cwd=tmp, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "done: completed (completed)" in res.stdout


def test_report_cli_rebuilds_the_report(smoke_sweep, tmp_path):
    tmp, _, _ = smoke_sweep
    sweep_dir = tmp / "sweeps" / "smoke"
    (sweep_dir / "report" / "leaderboard.csv").unlink()
    res = subprocess.run([sys.executable, "-m", "tuning.report", str(sweep_dir)], cwd=tmp,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Leaderboard" in res.stdout and (sweep_dir / "report" / "leaderboard.csv").is_file()
    bad = subprocess.run([sys.executable, "-m", "tuning.report", str(tmp_path)], cwd=tmp,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a sweep directory" in bad.stderr


@pytest.mark.slow
def test_optuna_search_runs_trials(tmp_path):
    path = _write(tmp_path, {"search.algorithm": "optuna", "num_samples": 2,
                             "space.learning_rate": {"loguniform": [0.0005, 0.01]}})
    res = _sweep(path, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    index = json.loads((tmp_path / "sweeps" / "smoke" / "trials.json").read_text())
    assert len(index) == 2 and all(v["status"] == "TERMINATED" for v in index.values())
    lrs = {load_yaml_file(p / "config.resolved.yaml")["phase2"]["learning_rate"]
           for p in (tmp_path / "sweeps" / "smoke" / "trials").iterdir()}
    assert len(lrs) == 2 and all(0.0005 <= lr <= 0.01 for lr in lrs)


def test_all_trials_failing_exits_non_zero(tmp_path):
    path = _write(tmp_path, {"trials.max_failures": 0, "num_samples": 1},
                  space={"debug.hang_at_step": 2, "learning_rate": {"grid": [0.001]}})
    data = load_yaml_file(path)
    data["stopping"] = {"stall_timeout_s": 3}
    path.write_text(dump_yaml(data))
    res = _sweep(path, cwd=tmp_path)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "1 failed" in res.stdout
    assert "stalled" in (tmp_path / "sweeps" / "smoke" / "report" / "leaderboard.csv").read_text()


def test_environment_points_storage_and_tracking_at_shared_services(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("PHASE2_TUNE_STORAGE_PATH", str(tmp_path / "shared"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    loaded = load_search(_write(tmp_path, shared_assets=False))
    assert loaded.sweep_dir == tmp_path / "shared" / "smoke"
    assert loaded.base.output.assets_dir == tmp_path / "shared" / "_assets"
    assert loaded.cfg.mlflow.tracking_uri == "http://127.0.0.1:5999"


def test_in_background_gives_the_result_and_raises_what_the_work_raised():
    from tuning.sweep import in_background

    wait = in_background(lambda a, b=0: (threading.current_thread().name, a + b), 2, b=3)
    (thread, total), seconds = wait()
    assert total == 5 and thread != threading.main_thread().name and seconds >= 0
    problem = Problem("data.yaml", "data.train", "broken", "fix it")

    def fail():
        raise ConfigError([problem])

    failing = in_background(fail)
    with pytest.raises(ConfigError) as e:
        failing()
    assert e.value.lines() == [problem.line()]


def test_inputs_are_prepared_while_ray_starts(tmp_path, monkeypatch, capsys):
    """The shared inputs are prepared side by side with Ray's start, not before it: the
    preparation waits to see Ray starting (sequential, it would wait in vain)."""
    import tuning.sweep as sweep_mod
    from tuning.raytune import driver

    path = _write(tmp_path)
    starting, prepared = threading.Event(), threading.Event()
    real_prepare = sweep_mod.prepare_inputs

    def prepare(cfg, log=print):
        assert starting.wait(30), "the inputs were prepared before Ray started"
        out = real_prepare(cfg, log=log)
        prepared.set()
        return out

    def init_ray(loaded, level):  # stops the sweep once both ran
        starting.set()
        assert prepared.wait(120), "Ray's start did not overlap the preparation"
        raise ConfigError([Problem(str(path), "ray.address", "stopped here by the test",
                                   "none")])

    monkeypatch.setattr(sweep_mod, "prepare_inputs", prepare)
    monkeypatch.setattr(driver, "init_ray", init_ray)
    assert sweep_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "stopped here by the test" in err and "Traceback" not in err, err


def test_the_sweeps_mlflow_store_is_opened_while_ray_starts(tmp_path, monkeypatch, capsys):
    """The embedded store's tables are made beside Ray's start (Tune's callback would make
    them while every trial waits), and an exit during the start waits for them to be whole;
    the callback's tracker then finds the store and its state without a recovery warning."""
    from tuning.raytune import driver
    from tuning.tracking.tracker import SweepTracker

    path = _write(tmp_path)
    mlflow_dir = tmp_path / "sweeps" / "smoke" / "mlflow"

    def init_ray(loaded, level):  # stops the sweep once the store's tables exist
        deadline = time.monotonic() + 60
        while not (mlflow_dir / "mlflow.db").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise ConfigError([Problem(str(path), "ray.address", "stopped here by the test",
                                   "none")])

    monkeypatch.setattr(driver, "init_ray", init_ray)
    assert sweep_main([str(path)]) == 2
    assert "stopped here by the test" in capsys.readouterr().err
    con = sqlite3.connect(mlflow_dir / "mlflow.db")
    try:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        version = con.execute("select version_num from alembic_version").fetchall()
    finally:
        con.close()
    assert {"experiments", "runs", "metrics", "params", "tags"} <= tables and version, tables
    tracker = SweepTracker(None, "smoke", mlflow_dir)
    try:
        assert tracker.start_parent("smoke", {"a": 1})
    finally:
        tracker.close()
    assert "[mlflow] warning" not in capsys.readouterr().err


def test_the_store_is_opened_after_the_preparation_not_beside_it(tmp_path, monkeypatch):
    """Both are import-heavy Python on the driver's one GIL: the store's opening begins only
    once the inputs are prepared (side by side the reference preparation took 2.7x as long)."""
    import tuning.sweep as sweep_mod
    from tuning.raytune import driver
    from tuning.tracking import publish

    path = _write(tmp_path, shared_assets=True)
    marks: dict[str, float] = {}
    real_prepare, real_open = sweep_mod.prepare_inputs, publish.open_store

    def prepare(cfg, log=print):
        time.sleep(1.0)
        inputs = real_prepare(cfg, log)
        marks["prepared"] = time.monotonic()
        return inputs

    def open_store(*args):
        marks["store begun"] = time.monotonic()
        real_open(*args)

    def init_ray(loaded, level):  # stops the sweep once the store was begun
        deadline = time.monotonic() + 60
        while "store begun" not in marks and time.monotonic() < deadline:
            time.sleep(0.05)
        raise ConfigError([Problem(str(path), "ray.address", "stopped here by the test", "")])

    monkeypatch.setattr(sweep_mod, "prepare_inputs", prepare)
    monkeypatch.setattr(publish, "open_store", open_store)
    monkeypatch.setattr(driver, "init_ray", init_ray)
    assert sweep_main([str(path)]) == 2
    assert marks["store begun"] >= marks["prepared"], marks


def test_a_sweep_that_stops_before_its_preparation_ends_opens_no_store(tmp_path, monkeypatch):
    """Stopped while the preparation runs on (here: Ray failed to start), the sweep exits
    without waiting for it, and the preparation, ending later, begins no store that the
    exiting process could cut short."""
    import tuning.sweep as sweep_mod
    from tuning.raytune import driver

    path = _write(tmp_path, shared_assets=True)
    release, finished = threading.Event(), threading.Event()
    real_prepare = sweep_mod.prepare_inputs

    def prepare(cfg, log=print):
        release.wait(30)
        try:
            return real_prepare(cfg, log)
        finally:
            finished.set()

    def init_ray(loaded, level):
        raise ConfigError([Problem(str(path), "ray.address", "stopped here by the test", "")])

    monkeypatch.setattr(sweep_mod, "prepare_inputs", prepare)
    monkeypatch.setattr(driver, "init_ray", init_ray)
    assert sweep_main([str(path)]) == 2
    release.set()
    assert finished.wait(60)
    time.sleep(1.0)  # a store begun now would have made its database by then
    assert not (tmp_path / "sweeps" / "smoke" / "mlflow" / "mlflow.db").exists()


def test_a_problem_found_while_preparing_exits_2_and_stops_ray(tmp_path, monkeypatch, capsys):
    """A bad input found by the preparation (on its thread, Ray started meanwhile) is one
    error line and exit 2, and the sweep's Ray is shut down."""
    import ray

    import tuning.sweep as sweep_mod

    path = _write(tmp_path)
    problem = Problem(str(path), "base.config", "the features file is truncated", "rebuild it")

    def prepare(cfg, log=print):
        raise ConfigError([problem])

    monkeypatch.setattr(sweep_mod, "prepare_inputs", prepare)
    assert sweep_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {problem.line()}"], err
    assert not ray.is_initialized()
