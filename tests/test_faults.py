"""Fault injection against the real sweep CLI: a SIGKILLed or interrupted driver, a killed
trial worker, a hung trial, a NaN under ASHA, a 64-trial load and the loss of a Ray node.

Each sweep runs in its own session (process group) with a private RAY_TMPDIR, so that it never
attaches to another Ray instance on this machine (with no address, ``ray.init()`` joins the
cluster named in ``$RAY_TMPDIR/ray/ray_current_cluster``, which any ``ray start`` or
``ray.cluster_utils.Cluster`` writes), and so that the Ray processes of one run can be found
exactly (their environment carries that RAY_TMPDIR) and ended by pid.

Bugs these tests found stay as regression tests (the MLflow watermark lost between two
transactions of one batch was one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT

from trainer.yaml_io import dump_yaml, load_yaml_file

pytestmark = pytest.mark.integration

SMOKE = ROOT / "configs" / "smoke.yaml"
PY = sys.executable


# ----------------------------------------------------------------------------- helpers


def _search_yaml(tmp: Path, assets: Path, *, name: str, steps: int, space: dict,
                 edit: dict | None = None, overrides: dict | None = None) -> Path:
    """A search.yaml from configs/smoke.yaml on the session's demo assets (tests/conftest.py
    tiny_data's demo settings, so the LLM, bundle and feature cache are built once)."""
    data = load_yaml_file(SMOKE)
    data["sweep"] = {"name": name, "storage_path": str(tmp / "sweeps")}
    data["base"]["overrides"] = {
        "phase2.epochs": 1, "phase2.batch_size": 4, "phase2.warmup_steps": 3,
        "phase2.total_training_steps": steps, "demo.num_examples": 48,
        "demo.llm.pretrain_steps": 100, "data.eval_fraction": 0.25,
        "output.root": str(tmp / "runs"), "output.assets_dir": str(assets),
        **(overrides or {}),
    }
    data["space"] = space
    for dotted, value in (edit or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp / f"{name}.yaml"
    path.write_text(dump_yaml(data))
    return path


class Driver:
    """`python -m tuning.sweep` in its own session (process group) with a private RAY_TMPDIR."""

    def __init__(self, path: Path, cwd: Path, ray_tmp: str, *args: str, label: str = "run"):
        self.log_path = cwd / f"driver-{label}.log"
        self.ray_tmp = ray_tmp
        env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([PY, "-m", "tuning.sweep", str(path), *args], cwd=cwd,
                                         stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.started = time.time()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 4000) -> str:
        return f"--- {self.log_path} ---\n" + self.output()[-n:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"sweep did not finish within {timeout}s\n{self.tail()}") \
                from None

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> list[str]:
        """SIGKILL the driver's process group; return (and then end) the Ray processes of this
        run that outlived it by 10 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while (left := ray_processes(self.ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.2)
        names = []
        for p in left:
            with contextlib.suppress(psutil.Error):
                names.append(f"{p.pid} {p.name()}")
        reap_ray(self.ray_tmp)
        return names


def ray_processes(ray_tmp: str) -> list[psutil.Process]:
    """Processes of the Ray instance started with this RAY_TMPDIR (driver, GCS, raylet,
    workers all inherit it)."""
    found = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get("RAY_TMPDIR") == ray_tmp:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def reap_ray(ray_tmp: str, timeout: float = 30.0) -> None:
    procs = ray_processes(ray_tmp)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=timeout)


@pytest.fixture
def ray_tmp():
    """A short private RAY_TMPDIR (Unix socket paths must stay under 108 bytes)."""
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield path
    reap_ray(path)
    shutil.rmtree(path, ignore_errors=True)


def wait_for(pred, timeout: float, what: str, driver: Driver | None = None, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if driver is not None and driver.proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({driver.proc.returncode}) while waiting "
                                 f"for {what}\n{driver.tail()}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f"\n{driver.tail()}" if driver else ""))


def steps_of(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def mlflow_state(db: Path) -> dict:
    """Runs, statuses, tags and per-step metric rows straight from the embedded store."""
    # read-write: after a SIGKILL, SQLite must roll back the writer's hot journal to read
    con = sqlite3.connect(db, timeout=30)
    try:
        status = dict(con.execute("select run_uuid, status from runs"))
        tags: dict[str, dict[str, str]] = {r: {} for r in status}
        for run_id, key, value in con.execute("select run_uuid, key, value from tags"):
            tags.setdefault(run_id, {})[key] = value
        loss_steps: dict[str, list[int]] = {r: [] for r in status}
        loss_at: dict[str, set[tuple[int, float]]] = {r: set() for r in status}
        for run_id, step, value in con.execute(
                "select run_uuid, step, value from metrics where key='loss'"):
            loss_steps[run_id].append(step)
            loss_at[run_id].add((step, value))
        nan_values = con.execute(
            "select count(*) from metrics where is_nan or value != value").fetchone()[0]
    finally:
        con.close()
    children = {r for r in status if "mlflow.parentRunId" in tags[r]}
    return {"status": status, "tags": tags, "children": children,
            "parents": set(status) - children, "loss_steps": loss_steps, "loss_at": loss_at,
            "nan_values": nan_values,
            "child_of_trial": {tags[r].get("phase2tune.trial_id"): r for r in children}}


def trial_dirs(sweep_dir: Path) -> dict[str, Path]:
    trials = sweep_dir / "trials"
    return {p.name: p for p in sorted(trials.iterdir()) if p.is_dir()} if trials.is_dir() else {}


def finished_mtimes(sweep_dir: Path) -> dict[str, tuple[int, int]]:
    """Trials whose trainer finished: mtimes of their summary.json and metrics.jsonl."""
    out = {}
    for trial, d in trial_dirs(sweep_dir).items():
        with contextlib.suppress(OSError):  # a retry may be clearing the directory
            out[trial] = ((d / "summary.json").stat().st_mtime_ns,
                          (d / "metrics.jsonl").stat().st_mtime_ns)
    return out


def progress_since(sweep_dir: Path, t0: float) -> bool:
    """Some trial wrote a step after t0 (this run is training, not starting up)."""
    return any((d / "metrics.jsonl").is_file() and (d / "metrics.jsonl").stat().st_mtime > t0
               and (d / "metrics.jsonl").stat().st_size > 0
               for d in trial_dirs(sweep_dir).values())


# ----------------------------------------------------------------------------- 1. SIGKILL driver


KILL9_STEPS, KILL9_TRIALS = 40, 4


@pytest.fixture(scope="module")
def kill9(tmp_path_factory, assets_dir):
    """A 4-trial sweep SIGKILLed three times (process group: driver, GCS, raylet, workers),
    rerun with the same command each time, then run to the end. Records what each kill left."""
    tmp = tmp_path_factory.mktemp("kill9")
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    path = _search_yaml(
        tmp, assets_dir, name="kill9", steps=KILL9_STEPS,
        space={"learning_rate": {"grid": [0.001, 0.002, 0.003, 0.004]}},
        edit={"trials.checkpoint_every": 5, "trials.report_every": 2,
              "max_concurrent_trials": 2, "scheduler.type": "fifo"})
    sweep_dir = tmp / "sweeps" / "kill9"
    db = sweep_dir / "mlflow" / "mlflow.db"
    kills = []
    try:
        for n, when in enumerate(("training+0.5s", "a trial's trainer finished",
                                  "training+2s")):
            driver = Driver(path, tmp, ray_tmp, label=f"kill{n}")
            if n == 1:  # right after a trainer wrote summary.json: Ray may not know it yet
                seen = set(finished_mtimes(sweep_dir))
                wait_for(lambda seen=seen: set(finished_mtimes(sweep_dir)) - seen, 180,
                         "a trial to finish", driver, every=0.02)
            else:
                wait_for(lambda d=driver: progress_since(sweep_dir, d.started), 180,
                         f"training in run {n}", driver)
                time.sleep(0.5 if n == 0 else 2.0)
            assert driver.proc.poll() is None, driver.tail()
            leftover = driver.kill()
            kill = {"when": when, "leftover": leftover,
                    "finished": finished_mtimes(sweep_dir), "by_ray": ray_finished(sweep_dir),
                    "mlflow": mlflow_state(db)}
            kill["records"] = {t: losses(trial_dirs(sweep_dir)[t]) for t in kill["finished"]}
            if n == 0:  # `tuning.sync --kill-running` closes what a SIGKILL left RUNNING
                kill["sync"] = subprocess.run(
                    [PY, "-m", "tuning.sync", str(sweep_dir / "mlflow"), "--kill-running"],
                    cwd=tmp, capture_output=True, text=True, timeout=120)
                kill["mlflow_after_sync"] = mlflow_state(db)
            kills.append(kill)
        driver = Driver(path, tmp, ray_tmp, label="final")
        rc = driver.wait(300)
    finally:
        reap_ray(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"sweep_dir": sweep_dir, "kills": kills, "rc": rc, "driver": driver,
            "mlflow": mlflow_state(db)}


def ray_finished(sweep_dir: Path) -> set[str]:
    """Trials that Ray's newest experiment snapshot (what Tuner.restore reads) has ended."""
    states = sorted((sweep_dir / "ray").glob("experiment_state-*.json"))
    if not states:
        return set()
    done = set()
    for trial_json, _ in json.loads(states[-1].read_text())["trial_data"]:
        trial = json.loads(trial_json)
        if trial["status"] in ("TERMINATED", "ERROR"):
            done.add(trial["trial_id"])
    return done


def losses(run_dir: Path) -> list:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records_of(run_dir)]


@pytest.mark.slow
def test_driver_sigkilled_three_times_then_resumes_exactly_once(kill9):
    sweep_dir, kills, driver = kill9["sweep_dir"], kill9["kills"], kill9["driver"]
    assert kill9["rc"] == 0, driver.tail()
    assert "resuming kill9" in driver.output()
    assert all(k["leftover"] == [] for k in kills)  # killpg took every Ray process with it
    # SIGKILL: no cleanup ran, so the runs that were running stay RUNNING ...
    first = kills[0]
    assert "RUNNING" in first["mlflow"]["status"].values()
    # ... until `tuning.sync --kill-running` (or the next run) closes them
    assert first["sync"].returncode == 0, first["sync"].stdout + first["sync"].stderr
    assert set(first["mlflow_after_sync"]["status"].values()) <= {"KILLED", "FINISHED"}

    index = json.loads((sweep_dir / "trials.json").read_text())
    assert len(index) == KILL9_TRIALS
    assert {v["status"] for v in index.values()} == {"TERMINATED"}
    dirs = trial_dirs(sweep_dir)
    assert set(dirs) == set(index)
    for trial, run_dir in dirs.items():
        assert steps_of(run_dir) == list(range(1, KILL9_STEPS + 1)), trial
        assert summary_of(run_dir)["end_reason"] == "completed"
    final = finished_mtimes(sweep_dir)
    for n, kill in enumerate(kills):
        for trial in kill["by_ray"]:  # Ray had recorded its end: never started again
            assert final[trial] == kill["finished"].get(trial), f"{trial} re-ran after kill {n}"
        for trial, records in kill["records"].items():  # whatever ran again: same numbers
            assert losses(dirs[trial]) == records, trial
    ml = kill9["mlflow"]
    assert len(ml["parents"]) == 1 and len(ml["children"]) == KILL9_TRIALS
    assert set(ml["child_of_trial"]) == set(index)  # one child run per trial, no strays
    assert set(ml["status"].values()) == {"FINISHED"}, ml["status"]
    duplicated = 0
    for trial, run_id in ml["child_of_trial"].items():  # every step, each with one value
        steps = ml["loss_steps"][run_id]
        assert set(steps) == set(range(1, KILL9_STEPS + 1)), trial
        assert len(ml["loss_at"][run_id]) == KILL9_STEPS, trial
        duplicated += len(steps) - KILL9_STEPS
    # Exactly once, also when a kill lands between a batch's metrics and its watermark tag
    # (test_driver_killed_inside_a_metrics_batch_logs_each_step_once makes that deterministic).
    assert duplicated == 0, duplicated


@pytest.mark.slow
def test_trial_finished_before_a_driver_sigkill_is_not_rerun(kill9):
    assert kill9["rc"] == 0, kill9["driver"].tail()
    final = finished_mtimes(kill9["sweep_dir"])
    logs = {t: (d / "train.log").read_text() for t, d in trial_dirs(kill9["sweep_dir"]).items()}
    for n, kill in enumerate(kill9["kills"]):
        for trial, mtimes in kill["finished"].items():
            assert final[trial] == mtimes, f"{trial} (finished before kill {n}) re-ran:\n" \
                f"{logs[trial]}"


class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs, no `except Exception` sees it."""


def test_driver_killed_inside_a_metrics_batch_logs_each_step_once(tmp_path, monkeypatch):
    """What scenario 1 hit once in three runs (4 duplicated steps), made deterministic."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from tuning.tracking.names import TAG_LOGGED_THROUGH
    from tuning.tracking.tracker import SweepTracker

    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 9)]
    tracker = SweepTracker(None, "exp", tmp_path)
    tracker.start_parent("sweep", {})
    tracker.start_trial("t1")
    tracker.log_records("t1", records[:4])
    set_tags = SqlAlchemyStore._set_tags

    def killed_after_the_metrics_commit(self, run_id, tags):
        if any(t.key == TAG_LOGGED_THROUGH for t in tags):
            raise _Killed
        return set_tags(self, run_id, tags)

    monkeypatch.setattr(SqlAlchemyStore, "_set_tags", killed_after_the_metrics_commit)
    with pytest.raises(_Killed):
        tracker.log_records("t1", records[4:])
    monkeypatch.setattr(SqlAlchemyStore, "_set_tags", set_tags)

    resumed = SweepTracker(None, "exp", tmp_path)  # the rerun: same state dir, new process
    resumed.start_parent("sweep", {})
    resumed.start_trial("t1")
    resumed.log_records("t1", records[2:])  # Ray re-reports from the trial's last checkpoint
    steps = mlflow_state(tmp_path / "mlflow.db")["loss_steps"][resumed.run_id_of("t1")]
    assert sorted(steps) == list(range(1, 9))


# ----------------------------------------------------------------------------- 2. SIGTERM/SIGINT


def leaderboard(sweep_dir: Path) -> dict[str, dict]:
    import csv

    with open(sweep_dir / "report" / "leaderboard.csv", newline="") as f:
        return {row["trial_id"]: row for row in csv.DictReader(f)}


INTR_STEPS = 40


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, assets_dir):
    """Two 2-trial sweeps started together; each gets its signal once it is training."""
    tmp = tmp_path_factory.mktemp("interrupted")
    runs: dict[int, dict] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            name = f"intr-{sig.name.lower()}"
            ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
            path = _search_yaml(tmp, assets_dir, name=name, steps=INTR_STEPS,
                                space={"learning_rate": {"grid": [0.001, 0.004]}},
                                edit={"trials.checkpoint_every": 5, "trials.report_every": 2})
            runs[sig] = {"name": name, "path": path, "tmp": tmp, "ray_tmp": ray_tmp,
                         "sweep_dir": tmp / "sweeps" / name,
                         "driver": Driver(path, tmp, ray_tmp, label=name)}
        waiting = dict(runs)
        deadline = time.monotonic() + 180
        while waiting:
            for sig, run in list(waiting.items()):
                driver, sweep_dir = run["driver"], run["sweep_dir"]
                if driver.proc.poll() is not None:
                    raise AssertionError(f"{run['name']} exited early\n{driver.tail()}")
                if progress_since(sweep_dir, driver.started) and \
                        mlflow_state(sweep_dir / "mlflow" / "mlflow.db")["children"]:
                    driver.signal(sig)
                    del waiting[sig]
            assert time.monotonic() < deadline, "no sweep started training within 180 s"
            time.sleep(0.1)
        for run in runs.values():
            run["rc"] = run["driver"].wait(120)
            reap_ray(run["ray_tmp"])
            run["mlflow"] = mlflow_state(run["sweep_dir"] / "mlflow" / "mlflow.db")
            run["unfinished"] = [t for t, d in trial_dirs(run["sweep_dir"]).items()
                                 if not (d / "summary.json").exists()]
        yield runs
    finally:
        for run in runs.values():
            reap_ray(run["ray_tmp"])
            shutil.rmtree(run["ray_tmp"], ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, id="SIGTERM"),
                                 pytest.param(signal.SIGINT, id="SIGINT")])
def test_driver_interrupted_marks_runs_killed_and_rerun_finishes(interrupted, sig):
    run = interrupted[sig]
    driver, sweep_dir, ml = run["driver"], run["sweep_dir"], run["mlflow"]
    assert run["rc"] != 0, f"an interrupted sweep exited {run['rc']}\n{driver.tail()}"
    assert "rerun the same command to resume" in driver.output(), driver.tail()
    assert run["unfinished"], "the signal came too late to test anything"
    assert "RUNNING" not in ml["status"].values(), f"{ml['status']}\n{driver.tail()}"
    (parent,) = ml["parents"]
    assert ml["status"][parent] == "KILLED"
    for trial in run["unfinished"]:  # what was running when the signal came
        assert ml["status"][ml["child_of_trial"][trial]] == "KILLED", trial
    if (sweep_dir / "trials.json").exists():  # if written at all, it must not claim they ended
        index = json.loads((sweep_dir / "trials.json").read_text())
        assert all(index[t]["status"] != "TERMINATED" for t in run["unfinished"]), index

    driver = Driver(run["path"], run["tmp"], run["ray_tmp"], label=f"{run['name']}-rerun")
    assert driver.wait(300) == 0, driver.tail()
    assert f"resuming {run['name']}" in driver.output()
    index = json.loads((sweep_dir / "trials.json").read_text())
    assert len(index) == 2 and {v["status"] for v in index.values()} == {"TERMINATED"}
    for run_dir in trial_dirs(sweep_dir).values():
        assert steps_of(run_dir) == list(range(1, INTR_STEPS + 1))
    ml = mlflow_state(sweep_dir / "mlflow" / "mlflow.db")
    assert len(ml["children"]) == 2 and set(ml["status"].values()) == {"FINISHED"}
    for run_id in ml["children"]:
        assert sorted(ml["loss_steps"][run_id]) == list(range(1, INTR_STEPS + 1))


# ----------------------------------------------------------------------------- 3. worker SIGKILL


def worker_of(run_dir: Path, ray_tmp: str) -> psutil.Process | None:
    """The Ray worker training in run_dir: it holds run_dir/metrics.jsonl open."""
    target = str(run_dir / "metrics.jsonl")
    for p in ray_processes(ray_tmp):
        try:
            if any(f.path == target for f in p.open_files()):
                return p
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_killed_trial_worker_retries_from_its_checkpoint(tmp_path, assets_dir, ray_tmp):
    steps = 40
    # Twin trials (the same config twice): the untouched twin is the uninterrupted reference.
    path = _search_yaml(tmp_path, assets_dir, name="wkill", steps=steps,
                        space={"learning_rate": {"grid": [0.002, 0.002]}},
                        edit={"trials.checkpoint_every": 5, "trials.report_every": 2,
                              "trials.max_failures": 1})
    sweep_dir = tmp_path / "sweeps" / "wkill"
    driver = Driver(path, tmp_path, ray_tmp, label="wkill")

    def victim():
        for run_dir in trial_dirs(sweep_dir).values():
            if 12 <= len(steps_of(run_dir)) < steps - 8:
                return run_dir
        return None

    run_dir = wait_for(victim, 180, "a trial past step 12", driver, every=0.05)
    worker = wait_for(lambda: worker_of(run_dir, ray_tmp), 30, "the trial's worker", driver)
    killed_at = len(steps_of(run_dir))
    worker.kill()
    assert driver.wait(300) == 0, driver.tail()

    log = (run_dir / "train.log").read_text()
    resumes = [line for line in log.splitlines() if line.startswith("[resume]")]
    assert len(resumes) == 1, log  # retried once, from a checkpoint, not from scratch
    resumed_from = int(resumes[0].split("step_")[1].split()[0])
    assert resumed_from % 5 == 0 and 5 <= resumed_from <= killed_at, (resumed_from, killed_at)
    index = json.loads((sweep_dir / "trials.json").read_text())
    assert {v["status"] for v in index.values()} == {"TERMINATED"}
    (twin,) = [d for d in trial_dirs(sweep_dir).values() if d != run_dir]
    assert "[resume]" not in (twin / "train.log").read_text()  # the other trial never noticed
    for d in (run_dir, twin):
        assert steps_of(d) == list(range(1, steps + 1))
    # bit for bit the losses of the uninterrupted twin
    assert [r["loss"] for r in records_of(run_dir)] == [r["loss"] for r in records_of(twin)]
    assert summary_of(run_dir)["final_loss"] == summary_of(twin)["final_loss"]
    ml = mlflow_state(sweep_dir / "mlflow" / "mlflow.db")
    run_id = ml["child_of_trial"][run_dir.name]
    assert len(ml["children"]) == 2 and ml["status"][run_id] == "FINISHED"
    assert ml["tags"][run_id].get("phase2tune.recoveries") == "1"
    assert sorted(ml["loss_steps"][run_id]) == list(range(1, steps + 1))


# ----------------------------------------------------------------------------- 4, 5: stall, NaN

HANG, STALL_TIMEOUT = 4, 20
NAN_K, NAN_GRACE, NAN_STEPS = 4, 6, 12
# Sweeps that only need to finish before they are inspected. They start together: their time
# is mostly process start-up (imports, Ray, MLflow's schema), which overlaps even on 2 cores.
FINISHING = {
    # 20 s, not 5: the watchdog's clock also runs through a fresh worker's setup (imports,
    # model load: 4-6 s alone here, more with these sweeps side by side), see stall2's test.
    "stall": dict(steps=12, space={"debug.hang_at_step": {"grid": [None, HANG]}},
                  edit={"stopping.stall_timeout_s": STALL_TIMEOUT, "trials.max_failures": 0}),
    "stall2": dict(steps=12, space={"learning_rate": 0.002},
                   edit={"stopping.stall_timeout_s": 2, "trials.max_failures": 0}),
    "nanasha": dict(steps=NAN_STEPS, space={"learning_rate": {"grid": [0.001, 0.005]},
                                            "debug.inject_nan_at_step": {"grid": [None, NAN_K]}},
                    edit={"scheduler.type": "asha", "scheduler.grace_period": NAN_GRACE,
                          "trials.report_every": 2, "trials.checkpoint_every": 6}),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, assets_dir):
    tmp = tmp_path_factory.mktemp("finishing")
    runs: dict[str, dict] = {}
    try:
        for name, spec in FINISHING.items():
            ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
            path = _search_yaml(tmp, assets_dir, name=name, **spec)
            runs[name] = {"driver": Driver(path, tmp, ray_tmp, label=name), "ray_tmp": ray_tmp,
                          "sweep_dir": tmp / "sweeps" / name}
        for run in runs.values():
            run["rc"] = run["driver"].wait(400)
    finally:
        for run in runs.values():
            reap_ray(run["ray_tmp"])
            shutil.rmtree(run["ray_tmp"], ignore_errors=True)
    return runs


@pytest.mark.slow
def test_hung_trial_is_ended_by_the_stall_watchdog(finished):
    run = finished["stall"]
    sweep_dir = run["sweep_dir"]
    assert run["rc"] == 0, run["driver"].tail()  # the other trial completed
    index = json.loads((sweep_dir / "trials.json").read_text())
    dirs = trial_dirs(sweep_dir)
    hung = [t for t, d in dirs.items()
            if load_yaml_file(d / "config.resolved.yaml")["debug"]["hang_at_step"] == HANG]
    assert len(hung) == 1 and len(dirs) == 2
    (hung,) = hung
    (ok,) = set(dirs) - {hung}
    assert index[hung]["status"] == "ERROR" and index[ok]["status"] == "TERMINATED"
    stalled = json.loads((dirs[hung] / "stalled.json").read_text())
    assert stalled["end_reason"] == "stalled" and stalled["idle_s"] >= STALL_TIMEOUT
    assert steps_of(dirs[hung]) == list(range(1, HANG))  # it hung inside step HANG
    assert not (dirs[hung] / "summary.json").exists()
    assert summary_of(dirs[ok])["end_reason"] == "completed"
    assert steps_of(dirs[ok]) == list(range(1, 13))
    assert not (dirs[ok] / "stalled.json").exists()
    board = leaderboard(sweep_dir)
    assert board[hung]["verdict"] == "failed" and board[hung]["end_reason"] == "stalled"
    assert board[ok]["verdict"] != "failed"
    assert "stalled" in (sweep_dir / "report" / "leaderboard.md").read_text()
    ml = mlflow_state(sweep_dir / "mlflow" / "mlflow.db")
    assert ml["status"][ml["child_of_trial"][hung]] == "FAILED"
    assert ml["status"][ml["child_of_trial"][ok]] == "FINISHED"


@pytest.mark.slow
def test_stall_timeout_does_not_count_trial_setup(finished):
    run = finished["stall2"]  # stall_timeout_s: 2, one healthy trial; steps are ~0.1 s apart
    (run_dir,) = trial_dirs(run["sweep_dir"]).values()
    assert not (run_dir / "stalled.json").exists()
    assert run["rc"] == 0 and steps_of(run_dir) == list(range(1, 13)), run["driver"].tail()


@pytest.mark.slow
def test_nan_in_the_projector_under_asha(finished):
    run = finished["nanasha"]
    sweep_dir, k = run["sweep_dir"], NAN_K
    assert run["rc"] == 0, run["driver"].tail()
    index = json.loads((sweep_dir / "trials.json").read_text())
    ml = mlflow_state(sweep_dir / "mlflow" / "mlflow.db")
    assert ml["nan_values"] == 0  # a NaN is an event and a tag, never a metric value
    assert len(ml["children"]) == 4 and set(ml["child_of_trial"]) == set(index)
    nan_trials = 0
    for trial, run_dir in trial_dirs(sweep_dir).items():
        assert index[trial]["status"] == "TERMINATED"
        run_id = ml["child_of_trial"][trial]
        tags, logged = ml["tags"][run_id], sorted(ml["loss_steps"][run_id])
        records = records_of(run_dir)
        assert [r["step"] for r in records] == list(range(1, len(records) + 1))
        assert logged == list(range(1, len(logged) + 1))  # each step once in MLflow too
        assert ml["status"][run_id] == "FINISHED"
        if load_yaml_file(run_dir / "config.resolved.yaml")["debug"]["inject_nan_at_step"]:
            nan_trials += 1
            summary = summary_of(run_dir)
            assert len(summary["nan_events"]) == 1, summary
            (event,) = summary["nan_events"]
            assert event["step"] == k and event["groups"] == ["projector"], event
            assert (summary["end_reason"], summary["first_nan_group"]) == ("nan_stop", "projector")
            assert records[-1]["step"] == k and logged[-1] == k  # never reached a rung
            assert tags["first_nonfinite_step"] == str(k)
            assert tags["first_nan_group"] == "projector"
            assert tags["end_reason"] == "nan_stop"
        else:  # unaffected: no NaN anywhere; ran to the end, or ASHA cut it at its rung
            assert all(r["nan_events"] == 0 and r["loss"] is not None for r in records)
            assert "first_nonfinite_step" not in tags and "nan_events" not in tags
            if tags["end_reason"] == "completed":
                assert logged[-1] == NAN_STEPS and summary_of(run_dir)["nan_events"] == []
            else:
                assert (tags["end_reason"], logged[-1]) == ("stopped_by_tune", NAN_GRACE)
    assert nan_trials == 2


# ----------------------------------------------------------------------------- 6. load


# Driver peak RSS measured here at 558-561 MiB (64 trials, 2 cores); the bound leaves ~1.6x.
LOAD_PEAK_RSS_MIB = 900


@pytest.mark.slow
def test_64_trial_asha_sweep_load(tmp_path, assets_dir, ray_tmp):
    n = 64
    path = _search_yaml(
        tmp_path, assets_dir, name="load", steps=20,
        space={"learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}},
        edit={"num_samples": n, "search.algorithm": "random", "search.seed": 0,
              "scheduler.type": "asha", "scheduler.grace_period": 5,
              "trials.report_every": 5, "trials.checkpoint_every": 10,
              "max_concurrent_trials": 2})
    sweep_dir = tmp_path / "sweeps" / "load"
    driver = Driver(path, tmp_path, ray_tmp, label="load")
    proc = psutil.Process(driver.pid)
    samples: list[tuple[int, float]] = []  # (rss, cpu seconds)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                cpu = proc.cpu_times()
                samples.append((proc.memory_info().rss, cpu.user + cpu.system))
            except psutil.Error:
                return
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        rc = driver.wait(600)
    finally:
        stop.set()
        sampler.join(5)
    wall = time.time() - driver.started
    assert rc == 0, driver.tail()
    peak_mib = max(s[0] for s in samples) / 2**20
    cpu_s = max(s[1] for s in samples)
    print(f"\nload: {n} trials in {wall:.0f}s wall; driver peak RSS {peak_mib:.0f} MiB, "
          f"CPU {cpu_s:.0f}s ({100 * cpu_s / wall:.0f}% of one core)")
    index = json.loads((sweep_dir / "trials.json").read_text())
    assert len(index) == n and {v["status"] for v in index.values()} == {"TERMINATED"}
    ml = mlflow_state(sweep_dir / "mlflow" / "mlflow.db")
    assert len(ml["parents"]) == 1 and len(ml["children"]) == n
    assert set(ml["child_of_trial"]) == set(index)
    assert set(ml["status"].values()) == {"FINISHED"}
    cut = 0
    for trial, run_id in ml["child_of_trial"].items():
        logged = sorted(ml["loss_steps"][run_id])
        assert logged == list(range(1, len(logged) + 1)) and logged[-1] in (5, 15, 20), trial
        cut += logged[-1] < 20
    assert cut > n // 2  # ASHA did cut most trials early
    assert peak_mib < LOAD_PEAK_RSS_MIB, f"driver peak RSS {peak_mib:.0f} MiB"


# ----------------------------------------------------------------------------- 7. node loss


@pytest.mark.slow
def test_node_loss_requeues_the_trial_from_its_checkpoint(tmp_path, assets_dir, ray_tmp,
                                                         monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # the cluster's address file stays private
    steps = 40
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        path = _search_yaml(tmp_path, assets_dir, name="nodeloss", steps=steps,
                            space={"learning_rate": {"grid": [0.002]}},
                            edit={"trials.checkpoint_every": 5, "trials.report_every": 2,
                                  "trials.max_failures": 2, "max_concurrent_trials": 1,
                                  "ray.address": cluster.address, "ray.num_cpus": None})
        sweep_dir = tmp_path / "sweeps" / "nodeloss"
        driver = Driver(path, tmp_path, ray_tmp, label="nodeloss")

        def mid_trial():
            dirs = list(trial_dirs(sweep_dir).values())
            return dirs[0] if dirs and 12 <= len(steps_of(dirs[0])) < steps - 8 else None

        run_dir = wait_for(mid_trial, 240, "the trial past step 12", driver, every=0.05)
        lost_at = len(steps_of(run_dir))
        cluster.remove_node(node)
        cluster.add_node(num_cpus=1)
        assert driver.wait(300) == 0, driver.tail()
    finally:
        cluster.shutdown()
    log = (run_dir / "train.log").read_text()
    resumes = [line for line in log.splitlines() if line.startswith("[resume]")]
    assert len(resumes) == 1, log
    resumed_from = int(resumes[0].split("step_")[1].split()[0])
    assert 5 <= resumed_from <= lost_at, (resumed_from, lost_at)
    assert steps_of(run_dir) == list(range(1, steps + 1))
    index = json.loads((sweep_dir / "trials.json").read_text())
    assert [v["status"] for v in index.values()] == ["TERMINATED"]
    ml = mlflow_state(sweep_dir / "mlflow" / "mlflow.db")
    (run_id,) = ml["children"]
    assert ml["status"][run_id] == "FINISHED"
    assert sorted(ml["loss_steps"][run_id]) == list(range(1, steps + 1))
