"""The sweep's Ray Tune driver: starting Ray, each trial's trainable with its resources (and
the shared group's actor), the searcher and scheduler, one Tuner run or restore under our
interrupt handling, and the shared group's closing figures."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from trainer.fsutil import atomic_write_text
from trainer.inputs import Inputs
from tuning.analysis.report import TRIALS_INDEX
from tuning.raytune import disk_full
from tuning.raytune.checkpoint_pruner import CheckpointPruner, prune_experiment
from tuning.raytune.group_actor import (
    describe_stats,
    group_actor_name,
    run_group_member,
    start_group_actor,
)
from tuning.raytune.interrupt import INTERRUPT
from tuning.raytune.progress import ProgressCallback
from tuning.raytune.space import param_space
from tuning.raytune.trainable import TrialOptions, run_trial
from tuning.search_config import Loaded, SearchConfig, trial_count

if TYPE_CHECKING:
    from ray.tune import ResultGrid
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

GROUP_STATS = "group_stats.json"  # where a shared group's step thread spent its time
# Beside the sweeps of one storage (<storage_path>/compile_cache/): a compiled group's
# artifacts, so a resumed sweep, or another sweep of the same shapes, starts warm.
COMPILE_CACHE = "compile_cache"
# PHASE2_GROUP_PROFILE=N[:WARM]: the shared group's actor writes a torch.profiler report of N
# group steps, after WARM (default 20) without a compile, to GROUP_PROFILE in the sweep
# directory (trainer.step_profile).
GROUP_PROFILE_ENV, GROUP_PROFILE = "PHASE2_GROUP_PROFILE", "group_profile.txt"
# How long the shared group may take to close the runs of members whose clients left
# (each writes its summary, weights and last checkpoint).
GROUP_CLOSE_TIMEOUT_S = 300.0


def _searcher(loaded: Loaded) -> Searcher | None:
    cfg = loaded.cfg
    if cfg.search.algorithm == "optuna":
        # Optuna loads only for the sweeps that search with it.
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=cfg.search.metric, mode="min", seed=cfg.search.seed)
    return None  # Ray's BasicVariantGenerator: random sampling and grid expansion


def _scheduler(loaded: Loaded, total_steps: int) -> TrialScheduler:
    cfg = loaded.cfg
    if cfg.scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", max_t=cfg.scheduler.max_t or total_steps,
                         grace_period=cfg.scheduler.grace_period,
                         reduction_factor=cfg.scheduler.reduction_factor)


def init_ray(loaded: Loaded, logging_level: int) -> None:
    """Join `ray.address` (or RAY_ADDRESS), else start this sweep's own local Ray."""
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


def _trials_index(results: ResultGrid) -> dict[str, Any]:
    """trial id -> Ray's final status, for `tuning.analysis.report` (which has no Ray)."""
    index = {}
    for r in results:
        # Ray names trial dirs <trainable>_<trial_id>_<n>_<params>_<date>
        m = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(r.path).name)
        trial_id = (r.metrics or {}).get("trial_id") or (m.group(1) if m else Path(r.path).name)
        index[str(trial_id)] = {"status": "ERROR" if r.error else "TERMINATED",
                                "error": str(r.error)[:500] if r.error else None}
    return index


def fit(stage_dir: Path, trainable: Any, *, param_space: dict[str, Any],
        tune_config: tune.TuneConfig, callbacks: list, max_failures: int, keep: int,
        resume: bool) -> dict[str, Any]:
    """Run (or restore) one Tuner whose state lives in <stage_dir>/ray; returns the trials'
    final statuses (also written to <stage_dir>/trials.json)."""
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
    index = _trials_index(results)
    atomic_write_text(stage_dir / TRIALS_INDEX, json.dumps(index, indent=2))
    return index


def with_resources(fn: Callable, cfg: SearchConfig, **params: Any) -> Any:
    """`fn` with its large inputs through the object store and one trial's resources."""
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


def build_trainable(cfg: SearchConfig, sweep_dir: Path, base: dict[str, Any],
                    inputs: Inputs, opts: TrialOptions, compile_mode: str,
                    profile: tuple[str, int, int] | None) -> tuple[Any, Any]:
    """The Tune trainable, and the shared group's actor when ``resources.shared_group``
    (`profile`: its `group_profile`)."""
    if not cfg.resources.shared_group:
        return with_resources(run_trial, cfg, base=base, inputs=inputs, opts=opts), None
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


def trial_options(cfg: SearchConfig, trials_dir: Path) -> TrialOptions:
    """What every trial runs with, from search.yaml's trials, stopping and resources."""
    return TrialOptions(
        trials_dir=trials_dir, report_every=cfg.trials.report_every,
        checkpoint_every=cfg.trials.checkpoint_every,
        keep_checkpoints=cfg.trials.keep_checkpoints, nan_policy=cfg.stopping.nan_policy,
        divergence_factor=cfg.stopping.divergence_factor,
        stall_timeout_s=cfg.stopping.stall_timeout_s, worst_loss=cfg.stopping.worst_loss,
        cpus_per_trial=cfg.resources.cpus_per_trial)


def fit_sweep(loaded: Loaded, sweep_dir: Path, trainable: Any, tracking: tune.Callback, *,
              total_steps: int, ray_log_level: int, resume: bool) -> dict[str, Any]:
    """The sweep's own Tuner: the space, the searcher and scheduler, `tracking` (the MLflow
    callback) and the live table. Returns the trials' final statuses."""
    cfg = loaded.cfg
    return fit(
        sweep_dir, trainable,
        param_space=param_space(cfg.space),
        tune_config=tune.TuneConfig(
            metric=cfg.search.metric, mode="min", num_samples=cfg.num_samples,
            max_concurrent_trials=cfg.max_concurrent_trials, search_alg=_searcher(loaded),
            scheduler=_scheduler(loaded, total_steps),
            time_budget_s=cfg.stopping.time_budget_s, reuse_actors=True),
        callbacks=[tracking, ProgressCallback(
            # --verbose lets library lines interleave with the table: a redraw in
            # place would overwrite them, so it is printed as when piped.
            trial_count(cfg), in_place=None if ray_log_level > logging.INFO else False)],
        max_failures=cfg.trials.max_failures, keep=cfg.trials.keep_checkpoints,
        resume=resume)


def close_group(group: Any, sweep_dir: Path) -> None:
    """After the trials: the shared group's figures to GROUP_STATS, its members' runs
    closed, and the actor killed (its GPU memory freed for the recheck)."""
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
