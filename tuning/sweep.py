"""`python -m tuning.sweep configs/search.yaml`: a Ray Tune sweep of Phase 2 runs.

Order of work, so that bad input costs nothing: validate search.yaml and the
base config (exit 2, nothing written) -> check every sampled extreme makes a
valid run -> take the sweep lock -> prepare shared inputs once (demo assets and
the frozen-feature cache) -> start Ray -> fit or restore -> report.

Sweep directory (<storage_path>/<name>/):
  search.snapshot.yaml  what this sweep was started with (resume refuses edits)
  ray/                  Ray Tune's experiment state, checkpoints and results
  trials/<trial_id>/    each trial's trainer run dir (metrics.jsonl, summary.json, ...)
  mlflow/               embedded MLflow store (unless mlflow.tracking_uri), journal
  report/               leaderboard.csv/.md, best_stable.yaml, advice.md, plots/
Beside the sweeps, <storage_path>/compile_cache/ keeps a compiled shared group's
artifacts (trainer/compile_cache.py), for every sweep of that storage.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import errno
import fcntl
import itertools
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError, Problem
from trainer.fsutil import atomic_write_text, dir_problem, storage_error_line
from trainer.yaml_io import dump_yaml, parse_yaml
from tuning.search_config import Loaded, load_search, space_key_path, trial_count

SNAPSHOT = "search.snapshot.yaml"
GROUP_STATS = "group_stats.json"  # where a shared group's step thread spent its time
# Beside the sweeps of one storage (<storage_path>/compile_cache/): a compiled group's
# artifacts, so a resumed sweep, or another sweep of the same shapes, starts warm.
COMPILE_CACHE = "compile_cache"
# PHASE2_GROUP_PROFILE=N[:WARM]: the shared group's actor writes a torch.profiler report of N
# group steps, after WARM (default 20) without a compile, to GROUP_PROFILE in the sweep
# directory (trainer.step_profile).
GROUP_PROFILE_ENV, GROUP_PROFILE = "PHASE2_GROUP_PROFILE", "group_profile.txt"
LOCK = ".sweep.lock"
MLFLOW_UI_PORT = 5000  # the port the printed `mlflow ui` command and link use
# How long the shared group may take to close the runs of members whose clients left
# (each writes its summary, weights and last checkpoint).
GROUP_CLOSE_TIMEOUT_S = 300.0


def _fail(lines: list[str]) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return 2


def check_runs(loaded: Loaded) -> None:
    """Every space extreme must make a run that can happen (steps, warmup, batch)."""
    from trainer.config import config_from_data, set_dotted
    from trainer.inputs import train_size
    from trainer.plan import plan_steps
    from tuning.search_config import _domain_problems

    src = str(loaded.path)
    cfg = loaded.cfg
    base_plan = plan_steps(loaded.base.phase2, train_size(loaded.base), src)
    problems: list[Problem] = []
    for key, spec in cfg.space.items():
        _, extremes = _domain_problems(src, key, spec)
        for value in extremes:
            data = copy.deepcopy(loaded.base_data)
            set_dotted(data, space_key_path(key), value, str(loaded.path))
            trial = config_from_data(data, src)
            try:
                plan_steps(trial.phase2, train_size(trial), src)
            except ConfigError as e:
                problems += [Problem(src, f"space.{key}", f"at {value!r}: {p.message}", p.fix)
                             for p in e.problems]
    if cfg.resources.shared_group:
        problems += _group_problems(loaded)
    max_t = cfg.scheduler.max_t or base_plan.total_steps
    if cfg.scheduler.type == "asha" and cfg.scheduler.grace_period > max_t:
        problems.append(Problem(src, "scheduler.grace_period",
                                f"{cfg.scheduler.grace_period} steps > max_t ({max_t} steps)",
                                "lower grace_period below the run's total steps"))
    if problems:
        raise ConfigError(problems)


def _group_problems(loaded: Loaded) -> list[Problem]:
    """A shared group needs cached features and trials that agree on what the shared
    forward fixes (trainer.group_rules.SHARED_KEYS): checked here, before Ray starts."""
    from trainer.group_rules import SHARED_KEYS

    src, base = str(loaded.path), loaded.base
    problems = []
    if not base.data.feature_cache:
        problems.append(Problem(src, "base: data.feature_cache", "is off; a shared group "
                                "trains on cached features only",
                                "set data.feature_cache: true, or resources.shared_group: "
                                "false"))
    for key in loaded.cfg.space:
        path = space_key_path(key)
        if any(path == k or path.startswith(k + ".") for k in SHARED_KEYS):
            problems.append(Problem(src, f"space.{key}", "varies a setting every member of "
                                    "a shared group must share",
                                    "sweep it with resources.shared_group: false"))
    return problems


def _sweep_dir(loaded: Loaded) -> Path:
    root = loaded.cfg.sweep.storage_path.resolve()
    sweep_dir = root / loaded.cfg.sweep.name
    if sweep_dir.is_symlink() or (sweep_dir.exists() and sweep_dir.resolve().parent != root):
        raise ConfigError([Problem(str(loaded.path), "sweep.name",
                                   f"{sweep_dir} leaves {root} (symlink)",
                                   "remove the link or pick another name")])
    why = dir_problem(sweep_dir)
    if why:  # checked before anything starts: a file in the way, a read-only mount
        raise ConfigError([Problem(str(loaded.path), "sweep.storage_path", why,
                                   "point it at a writable directory")])
    return sweep_dir


def snapshot_text(loaded: Loaded) -> str:
    return dump_yaml({"search": loaded.raw, "base": loaded.base_data})


def _acquire_lock(sweep_dir: Path, src: str):
    sweep_dir.mkdir(parents=True, exist_ok=True)
    f = open(sweep_dir / LOCK, "a+")  # noqa: SIM115 - held open for the whole sweep
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError([Problem(src, "sweep.name",
                                   f"sweep {sweep_dir.name} is already running ({holder})",
                                   "wait for it, or use another sweep.name")]) from None
    f.seek(0)
    previous = f.read().strip()
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} running")
    f.flush()
    if previous.endswith("running"):
        # The last driver never reached its end (SIGKILL, OOM, power): its Ray cluster's
        # trial workers notice the lost driver only after up to a minute.
        print("[sweep] the previous driver of this sweep was killed; trial workers it left "
              "may train on for up to a minute. That is harmless: each trial resumes from "
              "its last checkpoint, and the steps those workers add after it are truncated "
              "before it continues.", flush=True)
    return f


def _release_lock(lock) -> None:
    """Mark a clean end (a later driver then knows this one was not killed) and unlock."""
    with contextlib.suppress(OSError):
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} ended")
        lock.flush()
    lock.close()


def _check_resume(sweep_dir: Path, loaded: Loaded, restart: bool, src: str) -> bool:
    """Decide resume vs fresh start; refuse an edited config. True = resume."""
    new = snapshot_text(loaded)
    if restart:
        for name in ("ray", "trials", "mlflow", "report", SNAPSHOT, "trials.json"):
            p = sweep_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return False
    old = _snapshot_or_recover(sweep_dir, new)
    if old is None:
        return False
    if old != new:
        diff = [d for d in difflib.unified_diff(old.splitlines(), new.splitlines(), "started with",
                                                "now", lineterm="", n=0)
                if d.startswith(("+", "-")) and not d.startswith(("+++", "---"))]
        raise ConfigError([Problem(src, "", f"sweep {sweep_dir.name} was started with a "
                                   f"different config: {' | '.join(diff[:6])}",
                                   "undo the edit, use --restart to start over, or change "
                                   "sweep.name")])
    return True


def _snapshot_problem(text: bytes) -> str | None:
    """Why snapshot bytes are not a snapshot this code wrote (None when they are)."""
    try:
        data = parse_yaml(text.decode("utf-8"), SNAPSHOT)
    except (UnicodeDecodeError, ConfigError) as e:
        return "not readable YAML" if isinstance(e, ConfigError) else "not UTF-8 text"
    if not (isinstance(data, dict) and set(data) == {"search", "base"}):
        return "empty or truncated" if not data else "not a sweep snapshot"
    return None


def _snapshot_or_recover(sweep_dir: Path, new: str) -> str | None:
    """The snapshot this sweep started with; None for a new sweep. A damaged snapshot is
    restored from the copy the embedded MLflow store keeps on the parent run; without one,
    the sweep resumes on the current search.yaml (Ray's state is intact) with a warning."""
    snap = sweep_dir / SNAPSHOT
    started = any((sweep_dir / "ray").glob("experiment_state-*.json"))
    if not snap.exists() and not started:
        return None
    try:
        raw = snap.read_bytes()
        why = _snapshot_problem(raw)
    except OSError as e:
        raw, why = b"", f"unreadable ({e.strerror or e})" if snap.exists() else "missing"
    if why is None:
        return raw.decode("utf-8")
    for copy_ in sorted((sweep_dir / "mlflow" / "mlartifacts").glob(f"*/*/artifacts/{SNAPSHOT}")):
        with contextlib.suppress(OSError):
            if _snapshot_problem(copy_.read_bytes()) is None:
                text = copy_.read_text(encoding="utf-8")
                atomic_write_text(snap, text)
                print(f"[sweep] warning: {snap} was {why}; restored it from MLflow's copy "
                      f"({copy_})", file=sys.stderr, flush=True)
                return text
    print(f"[sweep] warning: {snap} was {why} and has no intact copy; resuming from Ray's "
          "saved state with the current search.yaml (check that it is the one this sweep "
          "started with; --restart starts over)", file=sys.stderr, flush=True)
    return new


def dry_run(loaded: Loaded) -> None:
    from trainer.inputs import train_size
    from trainer.plan import plan_steps

    cfg = loaded.cfg
    plan = plan_steps(loaded.base.phase2, train_size(loaded.base), str(loaded.path))
    print(f"sweep {cfg.sweep.name} -> {_sweep_dir(loaded)}")
    print(f"trials: {trial_count(cfg)} ({cfg.num_samples} samples"
          f"{' x grid' if trial_count(cfg) != cfg.num_samples else ''}), "
          f"{cfg.max_concurrent_trials} at a time, search {cfg.search.algorithm}, "
          f"scheduler {cfg.scheduler.type}")
    print(f"each trial: {plan.total_steps} optimizer steps (base), "
          f"{cfg.resources.cpus_per_trial} CPU, {cfg.resources.gpus_per_trial} GPU")
    print("space:")
    for key, spec in cfg.space.items():
        print(f"  {space_key_path(key)}: {spec}")
    print(f"ray: {cfg.ray.address or os.environ.get('RAY_ADDRESS') or 'local'}; "
          f"mlflow: {cfg.mlflow.tracking_uri or 'sqlite under the sweep dir'}")
    _dry_run_media(loaded.base)


def _dry_run_media(base) -> None:
    """Open every media file of the user's manifests once; every bad one is reported."""
    from trainer.data import check_media, read_manifest
    from trainer.errors import ConfigError

    problems = []
    for manifest in (base.data.manifest, base.data.eval_manifest):
        if manifest is not None:  # the demo data is generated, not read
            examples = read_manifest(manifest)
            problems += check_media(examples)
            print(f"media: {len(examples)} examples of {manifest} opened")
    if problems:
        raise ConfigError(problems)


def _searcher(loaded: Loaded):
    cfg = loaded.cfg
    if cfg.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=cfg.search.metric, mode="min", seed=cfg.search.seed)
    return None  # Ray's BasicVariantGenerator: random sampling and grid expansion


def _scheduler(loaded: Loaded, total_steps: int):
    cfg = loaded.cfg
    if cfg.scheduler.type == "fifo":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="step", max_t=cfg.scheduler.max_t or total_steps,
                         grace_period=cfg.scheduler.grace_period,
                         reduction_factor=cfg.scheduler.reduction_factor)


def quiet_driver(verbose: bool = False) -> int:
    """Silence third-party lines that need no action (transformers' bars and INFO, MLflow's
    and its SQLite migrations' INFO); returns the logging level for ``ray.init``. With
    ``verbose`` every library keeps its own levels and Ray logs at INFO."""
    import logging

    from trainer.noise import quiet_transformers

    quiet_transformers(verbose)
    if verbose:
        return logging.INFO
    # MLflow sets its logger's level from this when it is first imported (later than here).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return logging.ERROR  # Ray's driver WARNINGs (e.g. token authentication) need no action


def _init_ray(loaded: Loaded, logging_level: int) -> None:
    import logging

    import ray

    rc = loaded.cfg.ray
    address = rc.address or os.environ.get("RAY_ADDRESS")
    # Without an address, ray.init() would join any cluster recorded in /tmp/ray (someone
    # else's `ray start`); "local" always starts this sweep's own.
    kwargs: dict[str, Any] = dict(logging_level=logging_level, log_to_driver=False,
                                  configure_logging=True)
    # Ray's ResultGrid warns that result.json is missing: we turned those loggers off.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=rc.num_cpus, include_dashboard=rc.include_dashboard,
                 dashboard_host="127.0.0.1", **kwargs)


def _trials_index(results) -> dict[str, Any]:
    """trial id -> Ray's final status, for `tuning.report` (which has no Ray)."""
    index = {}
    for r in results:
        # Ray names trial dirs <trainable>_<trial_id>_<n>_<params>_<date>
        m = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(r.path).name)
        trial_id = (r.metrics or {}).get("trial_id") or (m.group(1) if m else Path(r.path).name)
        index[str(trial_id)] = {"status": "ERROR" if r.error else "TERMINATED",
                                "error": str(r.error)[:500] if r.error else None}
    return index


class Interrupt:
    """SIGINT/SIGTERM -> a graceful Tune stop that we can see afterwards.

    Tune's own SIGINT handler (turned off via TUNE_DISABLE_SIGINT_HANDLER) leaves no trace
    of the interrupt, and ray.init() replaces any SIGTERM handler with a sys.exit. Ours
    records the signal and asks Tune to stop through SIGUSR1, which Tune always handles by
    saving its state and stopping the trials; a second signal stops at once.
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[sweep] {signal.Signals(signum).name}: stopping trials and saving state "
              "(send again to stop at once)", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)


    def shutting_down(self) -> None:
        """From here on a signal only says to wait: a KeyboardInterrupt raised inside
        ray.shutdown() leaves a traceback and Ray's agents running."""
        def _wait(signum: int, frame: Any) -> None:
            print("[sweep] still shutting Ray down; a moment", file=sys.stderr, flush=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _wait)


INTERRUPT = Interrupt()

def _fit(stage_dir: Path, trainable, *, param_space: dict[str, Any], tune_config,
         callbacks: list, max_failures: int, keep: int, resume: bool):
    """Run (or restore) one Tuner whose state lives in <stage_dir>/ray."""
    from ray import tune

    from tuning import disk_full
    from tuning.checkpoint_pruner import CheckpointPruner, prune_experiment

    ray_dir = stage_dir / "ray"
    if resume and tune.Tuner.can_restore(str(ray_dir)):
        print(f"[sweep] resuming {stage_dir.name} from {ray_dir}")
        tuner = tune.Tuner.restore(str(ray_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                           run_config=tune.RunConfig(
                               name="ray", storage_path=str(stage_dir), verbose=0,
                               failure_config=tune.FailureConfig(max_failures=max_failures),
                               # Ray keeps every checkpoint; CheckpointPruner deletes the
                               # old ones only once no snapshot on disk names them.
                               checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                               callbacks=[*callbacks, CheckpointPruner(keep),
                                          disk_full.DiskFullStop()]))
    INTERRUPT.install()  # after ray.init(), which installs its own SIGTERM handler
    disk_full.reset()
    results = tuner.fit()
    if disk_full.tripped():
        raise OSError(errno.ENOSPC, f"No space left on device ({disk_full.tripped()})",
                      str(stage_dir))
    # The final snapshot is on disk now: Ray's copies come down to trials.keep_checkpoints.
    try:
        prune_experiment(ray_dir, keep)
    except OSError as e:  # housekeeping: never end a sweep over it
        print(f"[sweep] warning: pruning Ray's checkpoints in {ray_dir} failed: {e}",
              file=sys.stderr)
    if INTERRUPT.signal is not None:
        raise KeyboardInterrupt  # no final statuses: the trials did not finish
    from tuning.report import TRIALS_INDEX

    index = _trials_index(results)
    atomic_write_text(stage_dir / TRIALS_INDEX, json.dumps(index, indent=2))
    return index


def _with_resources(fn, cfg, **params):
    from ray import tune

    return tune.with_resources(tune.with_parameters(fn, **params),
                               {"cpu": cfg.resources.cpus_per_trial,
                                "gpu": cfg.resources.gpus_per_trial})


def group_profile(value: str | None, sweep_dir: Path) -> tuple[str, int, int] | None:
    """PHASE2_GROUP_PROFILE's (report path, steps, warm steps), None when unset; ValueError
    (naming the variable and the fix) when it is not N or N:WARM."""
    if not value:
        return None
    steps, _, warm = value.partition(":")
    if not steps.isdigit() or not (warm or "20").isdigit() or int(steps) == 0:
        raise ValueError(f"environment: {GROUP_PROFILE_ENV}={value!r}: expected N or N:WARM, "
                         "the group steps to profile after WARM (default 20) without a "
                         "compile, e.g. 10 or 10:50; or unset it")
    return str(sweep_dir / GROUP_PROFILE), int(steps), int(warm or 20)


def _trainable(cfg, sweep_dir: Path, base: dict[str, Any], inputs, opts, compile_mode: str,
               profile: tuple[str, int, int] | None):
    """The Tune trainable, and the shared group's actor when ``resources.shared_group``
    (`profile`: its `group_profile`)."""
    import hashlib

    from ray import tune

    from tuning.trainable import run_trial

    if not cfg.resources.shared_group:
        return _with_resources(run_trial, cfg, base=base, inputs=inputs, opts=opts), None
    from tuning.group_actor import group_actor_name, run_group_member, start_group_actor

    name = group_actor_name(hashlib.sha256(str(sweep_dir).encode()).hexdigest()[:16])
    actor = start_group_actor(name, inputs, report_every=cfg.trials.report_every,
                              num_cpus=cfg.resources.cpus_per_trial,
                              num_gpus=cfg.resources.gpus_per_trial,
                              orphan_timeout_s=cfg.resources.group_orphan_timeout_s,
                              profile=profile, slots=cfg.max_concurrent_trials,
                              compile_cache=str(sweep_dir.parent / COMPILE_CACHE))
    compiled = (f"; its forward is compiled once for {cfg.max_concurrent_trials} member slots "
                "(minutes at reference scale): trials join and leave without a recompile"
                if compile_mode != "off" else "")
    print(f"[sweep] shared group: up to {cfg.max_concurrent_trials} trials in one process "
          f"over one copy of the frozen model ({cfg.resources.cpus_per_trial} CPU, "
          f"{cfg.resources.gpus_per_trial} GPU){compiled}")
    # A member's own process only relays reports: a token CPU share, no GPU.
    member = tune.with_resources(
        tune.with_parameters(run_group_member, base=base, opts=opts, actor_name=name),
        {"cpu": 0.01})
    return member, actor


def run_sweep(loaded: Loaded, *, resume_flag: bool = False, restart: bool = False,
              recheck_k: int | None = None, ray_log_level: int = logging.ERROR) -> int:
    """Everything after validation. Returns the exit code."""
    from ray import tune

    from trainer.inputs import prepare_inputs, train_size
    from trainer.plan import plan_steps
    from tuning.mlflow_callback import MlflowSweepCallback
    from tuning.progress import ProgressCallback
    from tuning.report import build_report, print_report
    from tuning.space import param_space
    from tuning.tracking import SweepTracker, TrackingUnavailable
    from tuning.trainable import TrialOptions

    cfg, src = loaded.cfg, str(loaded.path)
    sweep_dir = _sweep_dir(loaded)
    try:  # checked before anything is written
        profile = group_profile(os.environ.get(GROUP_PROFILE_ENV), sweep_dir)
    except ValueError as e:
        return _fail([str(e)])
    mlflow_dir = sweep_dir / "mlflow"
    experiment = cfg.mlflow.experiment or cfg.sweep.name
    if cfg.mlflow.tracking_uri and cfg.mlflow.on_unreachable == "fail":
        try:  # fail fast, before any directory or Ray exists
            with tempfile.TemporaryDirectory() as tmp:
                SweepTracker(cfg.mlflow.tracking_uri, experiment, Path(tmp),
                             timeout_s=cfg.mlflow.timeout_s).check_reachable()
        except TrackingUnavailable as e:
            return _fail([f"{src}: mlflow.tracking_uri: {e}"])
    lock = _acquire_lock(sweep_dir, src)
    try:
        resume = _check_resume(sweep_dir, loaded, restart, src)
        if resume_flag and not resume:
            print(f"[sweep] nothing to resume in {sweep_dir}; starting a new sweep")
        atomic_write_text(sweep_dir / SNAPSHOT, snapshot_text(loaded))
        clock = [("start", time.time())]  # the end summary's parts of the wall time
        print("[sweep] preparing shared inputs (demo assets, frozen-feature cache) ...")
        inputs = prepare_inputs(loaded.base, log=lambda m: print(m, flush=True))
        plan = plan_steps(loaded.base.phase2, train_size(loaded.base), src)
        opts = TrialOptions(
            trials_dir=sweep_dir / "trials", report_every=cfg.trials.report_every,
            checkpoint_every=cfg.trials.checkpoint_every,
            keep_checkpoints=cfg.trials.keep_checkpoints, nan_policy=cfg.stopping.nan_policy,
            divergence_factor=cfg.stopping.divergence_factor,
            stall_timeout_s=cfg.stopping.stall_timeout_s, worst_loss=cfg.stopping.worst_loss,
            cpus_per_trial=cfg.resources.cpus_per_trial)
        clock.append(("preparation", time.time()))
        _init_ray(loaded, ray_log_level)
        clock.append(("Ray start", time.time()))
        trainable, group = _trainable(cfg, sweep_dir, loaded.base_data, inputs, opts,
                                      loaded.base.model.compile, profile)
        index = _fit(
            sweep_dir, trainable,
            param_space=param_space(cfg.space),
            tune_config=tune.TuneConfig(
                metric=cfg.search.metric, mode="min", num_samples=cfg.num_samples,
                max_concurrent_trials=cfg.max_concurrent_trials, search_alg=_searcher(loaded),
                scheduler=_scheduler(loaded, plan.total_steps),
                time_budget_s=cfg.stopping.time_budget_s, reuse_actors=True),
            callbacks=[MlflowSweepCallback(
                tracking_uri=cfg.mlflow.tracking_uri, experiment_name=experiment,
                state_dir=mlflow_dir, sweep_name=cfg.sweep.name,
                parent_params=_parent_params(loaded), parent_artifacts=[sweep_dir / SNAPSHOT],
                timeout_s=cfg.mlflow.timeout_s), ProgressCallback(trial_count(cfg))],
            max_failures=cfg.trials.max_failures, keep=cfg.trials.keep_checkpoints,
            resume=resume)
        if group is not None:
            import ray

            from tuning.group_actor import describe_stats

            try:  # the figures only: a failure here must not keep the members open
                stats = ray.get(group.stats.remote(), timeout=30)  # never waits for a step
                atomic_write_text(sweep_dir / GROUP_STATS, json.dumps(stats, indent=2) + "\n")
                print(f"[sweep] shared group: {describe_stats(stats)} "
                      f"(details: {sweep_dir / GROUP_STATS})")
            except Exception as e:
                print(f"[sweep] warning: no shared-group stats: {e}", file=sys.stderr)
            try:  # stopped trials' runs end even if their client's leave is still in flight
                ray.get(group.close.remote(), timeout=GROUP_CLOSE_TIMEOUT_S)
            except Exception as e:  # a dead or stuck actor: its runs stay as they are on disk
                print(f"[sweep] warning: the shared group did not close its members: {e}",
                      file=sys.stderr)
            ray.kill(group)  # every member finished; free its GPU memory for the recheck
        clock.append(("trials", time.time()))
        report = build_report(sweep_dir, cfg.stability, cfg.sweep.name)
        top_k = cfg.recheck.top_k if recheck_k is None else recheck_k
        if top_k:
            run_recheck(loaded, sweep_dir, report, top_k, inputs=inputs, opts=opts,
                        resume=resume)
        link, left = _publish_report(cfg, experiment, mlflow_dir, report)
        clock.append(("report" + (" and recheck" if top_k else ""), time.time()))
        print_report(report)
        uri = cfg.mlflow.tracking_uri or f"sqlite:///{mlflow_dir / 'mlflow.db'}"
        print(f"\nsweep finished in {format_clock(clock)}: {len(index)} trials, "
              f"{sum(v['status'] == 'ERROR' for v in index.values())} failed")
        if left is not None:
            print(left)
        if cfg.mlflow.tracking_uri:
            print(f"MLflow: {cfg.mlflow.tracking_uri} (experiment {experiment})")
        else:
            print(f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 "
                  f"--port {MLFLOW_UI_PORT}")
        print(f"MLflow runs of this sweep: {link or f'experiment {experiment}'}")
        return 1 if index and all(v["status"] == "ERROR" for v in index.values()) else 0
    except KeyboardInterrupt:
        _kill_runs(cfg, experiment, mlflow_dir)
        raise
    finally:
        _release_lock(lock)


def format_clock(clock: list[tuple[str, float]]) -> str:
    """``412s (preparation 260s, Ray start 9s, trials 130s, report 13s)`` from (name, time)
    marks, the first one the start: the whole wall time, then each part."""
    parts = ", ".join(f"{name} {end - begin:.0f}s"
                      for (_, begin), (name, end) in itertools.pairwise(clock))
    return f"{clock[-1][1] - clock[0][1]:.0f}s ({parts})"


def _tracker(cfg, experiment: str, mlflow_dir: Path):
    """The driver's own MLflow handle, after Tune's callback is done writing."""
    from tuning.tracking import SweepTracker
    from tuning.tracking_writer import InboxBusy, replay_inbox

    tracker = SweepTracker(cfg.mlflow.tracking_uri, experiment, mlflow_dir,
                           timeout_s=cfg.mlflow.timeout_s)
    with contextlib.suppress(InboxBusy):  # busy: the callback's writer still owns it
        replay_inbox(tracker)  # what the callback's writer had not written when it stopped
    return tracker


def _kill_runs(cfg, experiment: str, mlflow_dir: Path) -> None:
    """An interrupted sweep leaves no MLflow run RUNNING or FINISHED-looking: KILLED."""
    tracker = _tracker(cfg, experiment, mlflow_dir)
    try:
        tracker.kill_running()
        if tracker.parent_run_id:
            tracker.finish_parent("KILLED")
    finally:
        tracker.close()


def run_recheck(loaded: Loaded, sweep_dir: Path, report, top_k: int, *, inputs, opts,
                resume: bool) -> None:
    """Re-run the top-K stable configs over seeds and at LR x0.67 / x1.5; recommend the one
    with the most margin among those within `recheck.loss_tolerance` of the best loss."""
    from dataclasses import replace

    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from tuning.leaderboard import write_best_stable_yaml
    from tuning.mlflow_callback import MlflowSweepCallback
    from tuning.progress import ProgressCallback
    from tuning.recheck import (
        explain_plan,
        format_recheck,
        match_plan,
        recheck_plan,
        summarize,
        write_recheck,
    )
    from tuning.report import collect_records
    from tuning.trainable import run_listed_trial

    cfg, rc = loaded.cfg, loaded.cfg.recheck
    records = collect_records(sweep_dir)
    plan = recheck_plan(records, cfg.stability, top_k, rc.seeds, rc.lr_factors,
                        swept_keys=cfg.space)
    print("\n[recheck] " + explain_plan(plan, records, cfg.stability, top_k))
    if not plan:
        return
    stage = sweep_dir / "recheck"
    # FIFO: every re-check run goes to the end, so their final losses compare.
    uri = cfg.mlflow.tracking_uri or f"sqlite:///{sweep_dir / 'mlflow' / 'mlflow.db'}"
    _fit(stage, _with_resources(run_listed_trial, cfg, configs=[t.config for t in plan],
                                base=loaded.base_data, inputs=inputs,
                                opts=replace(opts, trials_dir=stage / "trials")),
         param_space={"i": tune.grid_search(list(range(len(plan))))},
         tune_config=tune.TuneConfig(metric=cfg.search.metric, mode="min", num_samples=1,
                                     max_concurrent_trials=cfg.max_concurrent_trials,
                                     scheduler=FIFOScheduler(), reuse_actors=True),
         callbacks=[MlflowSweepCallback(
             tracking_uri=uri, experiment_name=cfg.mlflow.experiment or cfg.sweep.name,
             state_dir=stage / "mlflow", sweep_name=f"{cfg.sweep.name}-recheck",
             timeout_s=cfg.mlflow.timeout_s), ProgressCallback(len(plan))],
         max_failures=cfg.trials.max_failures, keep=cfg.trials.keep_checkpoints,
         resume=resume)
    summary = summarize(match_plan(plan, collect_records(stage)), cfg.stability,
                        loss_tolerance=rc.loss_tolerance)
    out = sweep_dir / "report"
    md, csv = write_recheck(summary, out / "recheck.md", out / "recheck.csv")
    report.files.update(recheck_md=md, recheck_csv=csv)
    print(format_recheck(summary))
    if summary.recommended:
        best = next(r for r in records if r.trial_id == summary.recommended)
        path = write_best_stable_yaml(best, out / "best_stable.yaml", sweep_name=cfg.sweep.name,
                                      rules=cfg.stability)
        report.best_trial = summary.recommended
        if path:
            report.files["best_stable"] = path


def _parent_params(loaded: Loaded) -> dict[str, Any]:
    p2 = loaded.base.phase2
    params: dict[str, Any] = {f"base.{k}": v for k, v in p2.model_dump(mode="json").items()}
    params.update({f"space.{k}": json.dumps(v) for k, v in loaded.cfg.space.items()})
    params.update(num_samples=loaded.cfg.num_samples, search=loaded.cfg.search.algorithm,
                  scheduler=loaded.cfg.scheduler.type)
    return params


def _publish_report(cfg, experiment: str, mlflow_dir: Path, report
                    ) -> tuple[str | None, str | None]:
    """Verdict tags and a ``final/stable`` metric on each child run; the report files on the
    parent run. Returns the MLflow UI link to the sweep's runs (None before any write) and
    the line that says what became of MLflow writes left over from an outage (None when
    there were none): the callback's warning about them is stale once this driver replayed
    them."""
    from tuning.stability import STABLE_KINDS
    from tuning.tracking import JOURNAL_FILE, runs_link
    from tuning.tracking_writer import INBOX_FILE

    inbox = mlflow_dir / INBOX_FILE
    had_backlog = (mlflow_dir / JOURNAL_FILE).exists() or (
        inbox.exists() and inbox.stat().st_size > 0)
    tracker = _tracker(cfg, experiment, mlflow_dir)
    last_step = {r.trial_id: r.history[-1]["step"] for r in report.records if r.history}
    try:
        for trial_id, kind in report.verdicts.items():
            if tracker.run_id_of(trial_id):
                tags = {"phase2tune.verdict": kind}
                clip = report.clip_fractions.get(trial_id)
                if clip is not None:  # reported, never a verdict: clipping is the remedy
                    tags["phase2tune.clip_fraction"] = f"{clip:.3f}"
                tracker.set_trial_tags(trial_id, tags)
                # As a number too: MLflow's parallel-coordinates chart plots metrics only.
                tracker.log_final_metrics(
                    trial_id, {"final/stable": int(kind in STABLE_KINDS)},
                    last_step.get(trial_id, 0))
        for path in report.files.values():
            tracker.log_artifact(None, path, "report")
        if report.best_trial:
            tracker.set_parent_tags({"phase2tune.best_trial": report.best_trial})
        experiment_id = tracker.experiment_id
        base = cfg.mlflow.tracking_uri or f"http://127.0.0.1:{MLFLOW_UI_PORT}"
        link = runs_link(base, experiment_id, tracker.sweep_uid) if experiment_id else None
        if not had_backlog:
            return link, None
        left = tracker.retry_journal(force=True).remaining
    finally:
        tracker.close()
    if left:
        return link, (f"MLflow: {left} write(s) still in the outage journal "
                      f"({tracker.last_outage}); replay with: python -m tuning.sync {mlflow_dir}")
    return link, ("MLflow: the writes held back during the outage are all stored now "
                  "(nothing left for tuning.sync)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuning.sweep",
                                 description="Sweep Phase 2 stability knobs with Ray Tune.")
    ap.add_argument("config", help="search.yaml (see configs/search.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a search.yaml key, e.g. --set num_samples=4")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate, print the resolved space, trial count and resources; exit")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted sweep (the default when one exists)")
    group.add_argument("--restart", action="store_true",
                       help="discard this sweep's previous state and start over")
    ap.add_argument("--recheck", type=int, default=None, metavar="K",
                    help="after the sweep, re-run the K best stable configs over "
                         "recheck.seeds and recheck.lr_factors (overrides recheck.top_k)")
    ap.add_argument("--verbose", action="store_true",
                    help="keep transformers', MLflow's and Ray's INFO/WARNING lines "
                         "(silenced by default)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's CSV/JSON/TensorBoard loggers would duplicate (and choke on) the step records:
    # the trial run dirs and MLflow hold them.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours (Interrupt) records the signal
    ray_log_level = quiet_driver(args.verbose)
    try:
        loaded = load_search(args.config, args.overrides)
        check_runs(loaded)
        _sweep_dir(loaded)
        if args.dry_run:
            dry_run(loaded)
            return 0
        # SIGTERM (e.g. from a scheduler) stops like Ctrl-C: state saved, runs KILLED.
        INTERRUPT.install()
        return run_sweep(loaded, resume_flag=args.resume, restart=args.restart,
                         recheck_k=args.recheck, ray_log_level=ray_log_level)
    except ConfigError as e:
        return _fail(e.lines())
    except OSError as e:
        where = _storage_of(args.config, args.overrides)
        line = storage_error_line(e, where, "rerun the same command to resume this sweep")
        if line is None:
            raise
        _shutdown_ray()
        return _fail([line])
    except KeyboardInterrupt:
        _shutdown_ray()
        print("interrupted: rerun the same command to resume this sweep", file=sys.stderr)
        return 130


def _storage_of(config: str, overrides: list[str]) -> str:
    """The sweep directory for an error line (the storage path when it cannot be known)."""
    try:
        return str(load_search(config, overrides).sweep_dir)
    except Exception:  # the line must come out whatever else is wrong
        return "sweep.storage_path"


def _shutdown_ray() -> None:
    """Stop this driver's Ray now, deaf to further Ctrl-C: interrupted, ray.shutdown() (or
    Ray's own atexit hook) leaves a traceback and its agents running for a minute."""
    INTERRUPT.shutting_down()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
