"""The sweep's Ray Tune driver: starting Ray, each trial's trainable with its resources (and
the shared groups' actors, one per GPU, with the storage check they need), the searcher and
scheduler, one Tuner run or restore under our interrupt handling, and the shared groups'
closing figures."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from trainer.errors import ConfigError, Problem
from trainer.fsutil import atomic_write_text
from trainer.inputs import Inputs, inputs_to_data, ready_llm_dir
from tuning.analysis.report import TRIALS_INDEX
from tuning.raytune import disk_full
from tuning.raytune.checkpoint_pruner import CheckpointPruner, prune_experiment
from tuning.raytune.group_actor import group_actor_name, run_group_member, start_group_actor
from tuning.raytune.group_stats import describe_stats
from tuning.raytune.interrupt import INTERRUPT
from tuning.raytune.progress import ProgressCallback
from tuning.raytune.space import param_space
from tuning.raytune.trainable import TrialOptions, run_trial
from tuning.search_config import Loaded, SearchConfig, trial_count

if TYPE_CHECKING:
    from ray.tune import ResultGrid
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.search import Searcher

    from trainer.config import TrainConfig

GROUP_STATS = "group_stats.json"  # where a shared group's step thread spent its time
GROUP_INPUTS = "group_inputs.json"  # the sweep's prepared inputs, for a restarted group actor
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
# How long the groups' placement group may take to be placed (the cluster holds its
# resources, checked before: only other work can hold it back) ...
GROUP_PLACEMENT_TIMEOUT_S = 300.0
# A shared group's member trial only relays its group's reports: a token CPU share, which
# the cluster must still have left beside the groups' bundles.
MEMBER_CPU = 0.01
# ... and every node to answer the storage check (one tiny task each).
STORAGE_PROBE_TIMEOUT_S = 60.0
STORAGE_PROBE = ".storage_probe"  # in the sweep dir: what every node must read back


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


@dataclass(frozen=True)
class GroupPlan:
    """How a sweep's shared groups are laid out (``plan_groups``)."""

    groups: int
    slots: int  # per group: trials_per_group
    concurrency: int  # Tune's max_concurrent_trials
    bundle: dict[str, float]  # one group's Ray resources ("CPU", "GPU", custom ones)


def plan_groups(cfg: SearchConfig, cluster: dict[str, float], src: str) -> GroupPlan:
    """The groups, their slots and the sweep's concurrency, from ``resources`` and the
    cluster's resources (``ray.cluster_resources()``); ConfigError when the cluster cannot
    hold the groups (a placement group would wait for them forever)."""
    res = cfg.resources
    bundle = {"CPU": res.cpus_per_trial, "GPU": res.gpus_per_trial, **res.group_resources}
    bundle = {k: v for k, v in bundle.items() if v > 0}
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in bundle.items())
    if res.groups == "auto":
        # Groups are per accelerator: without one asked for (CPU only) a sweep is one group.
        groups = fits if set(bundle) - {"CPU"} else 1
        if groups < 1:
            short = [f"{k} {v:g}" for k, v in bundle.items() if cluster.get(k, 0.0) < v]
            raise ConfigError([Problem(src, "resources.groups", "auto: the Ray cluster has "
                                       f"no room for one group ({', '.join(short)})",
                                       "lower gpus_per_trial / group_resources, or add "
                                       "nodes that have them")])
    else:
        groups = res.groups
        for k, v in bundle.items():
            if cluster.get(k, 0.0) + 1e-9 < groups * v:
                raise ConfigError([Problem(
                    src, "resources.groups", f"{groups} groups need {groups * v:g} {k} "
                    f"({v:g} each), the Ray cluster has {cluster.get(k, 0.0):g}",
                    "lower resources.groups, or set it to auto")])
    slots, concurrency = _slots(cfg, groups)
    # Each member's trial is a Ray task of its own (MEMBER_CPU, outside the groups'
    # bundles): groups that take every CPU would leave the trials pending forever.
    cpus = cluster.get("CPU", 0.0)

    def cpus_needed() -> float:
        return groups * bundle.get("CPU", 0.0) + concurrency * MEMBER_CPU

    while res.groups == "auto" and groups > 1 and cpus_needed() > cpus + 1e-9:
        groups -= 1
        slots, concurrency = _slots(cfg, groups)
    if (need := cpus_needed()) > cpus + 1e-9:
        raise ConfigError([Problem(
            src, "resources.cpus_per_trial", f"{groups} group(s) x {res.cpus_per_trial:g} CPU "
            f"and their {concurrency} trials ({MEMBER_CPU:g} CPU each, to relay reports) need "
            f"{need:g} CPU, the Ray cluster has {cpus:g}",
            f"lower cpus_per_trial to {max(cpus - concurrency * MEMBER_CPU, 0) / groups:.2f} or "
            "less (a group's CPUs; its trials share them)")])
    return GroupPlan(groups, slots, concurrency, bundle)


def _slots(cfg: SearchConfig, groups: int) -> tuple[int, int]:
    """A group's slots and the sweep's concurrency, for `groups` groups."""
    res = cfg.resources
    if res.trials_per_group is None:  # max_concurrent_trials spread over the groups
        return math.ceil(cfg.max_concurrent_trials / groups), cfg.max_concurrent_trials
    concurrency = groups * res.trials_per_group
    if "max_concurrent_trials" in cfg.model_fields_set:  # asked for fewer at once
        concurrency = min(concurrency, cfg.max_concurrent_trials)
    return res.trials_per_group, concurrency


def check_shared_storage(sweep_dir: Path, src: str) -> None:
    """ConfigError unless every alive Ray node reads the driver's sweep dir.

    A group writes its members' run dirs and checkpoints on its node and each member's
    trial reports them from its own (Tune then persists them under the same storage), so
    on a multi-node cluster ``sweep.storage_path`` must be one filesystem every node mounts.
    The driver writes a fresh token there and a task on each node reads it back."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    probe = sweep_dir / STORAGE_PROBE
    atomic_write_text(probe, token)
    try:
        read = ray.remote(num_cpus=0)(_read_token)
        refs = [read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(str(probe)) for n in nodes]
        seen = ray.get(refs, timeout=STORAGE_PROBE_TIMEOUT_S)
    finally:
        probe.unlink(missing_ok=True)
    problem = storage_problem(sweep_dir, token, [
        (n["NodeManagerAddress"], got) for n, got in zip(nodes, seen, strict=True)], src)
    if problem is not None:
        raise ConfigError([problem])


def storage_problem(sweep_dir: Path, token: str, seen: list[tuple[str, str | None]],
                    src: str) -> Problem | None:
    """The storage check's verdict on what each node (its address) read back."""
    blind = [address for address, got in seen if got != token]
    if blind:
        return Problem(
            src, "sweep.storage_path", f"{sweep_dir} is not the driver's directory on Ray "
            f"node(s) {', '.join(blind)}: shared groups on several nodes write run dirs and "
            "checkpoints that trials on other nodes read",
            "put it on a filesystem every node mounts (PHASE2_TUNE_STORAGE_PATH), or run "
            "the sweep on one node")
    return None


def _read_token(path: str) -> str | None:
    """On one node: the storage check's token as that node sees it (None: no file)."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


@dataclass
class SharedGroups:
    """The sweep's group actors (and their names), the placement group that pins them, and
    their plan."""

    plan: GroupPlan
    actors: list[Any] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    placement: Any = None
    handed: list[Any] = field(default_factory=list)  # the inputs' set_inputs calls


def start_groups(cfg: SearchConfig, plan: GroupPlan, sweep_dir: Path,
                 profile: tuple[str, int, int] | None, base: dict[str, Any] | None = None,
                 llm_dir: Path | None = None) -> SharedGroups:
    """Reserve one bundle per group (its CPUs, GPU, custom resources) in one placement
    group, and start each group's actor in its bundle, without the sweep's inputs
    (`hand_inputs` gives them). `base`: the trials' base config, each actor loads the shared
    LLM with as it starts (from `llm_dir` while it has no inputs; None: it waits for them)."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    res = cfg.resources
    # PACK: groups fill a node's GPUs before the next node's (one process per GPU, Ray
    # sets each actor's CUDA_VISIBLE_DEVICES to its bundle's GPU).
    pg = placement_group([dict(plan.bundle)] * plan.groups, strategy="PACK")
    if not pg.wait(GROUP_PLACEMENT_TIMEOUT_S):
        remove_placement_group(pg)
        raise RuntimeError(f"the shared groups' resources ({plan.groups} x {plan.bundle}) "
                           f"were not free within {GROUP_PLACEMENT_TIMEOUT_S:.0f}s: other "
                           "work holds them")
    key = hashlib.sha256(str(sweep_dir).encode()).hexdigest()[:16]
    groups = SharedGroups(plan, placement=pg,
                          names=[group_actor_name(key, i) for i in range(plan.groups)])
    for i, name in enumerate(groups.names):
        # A profile of the first group only: one report, not N racing for one file.
        groups.actors.append(start_group_actor(
            name, report_every=cfg.trials.report_every,
            num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial,
            orphan_timeout_s=res.group_orphan_timeout_s,
            profile=profile if i == 0 else None, slots=plan.slots,
            compile_cache=str(sweep_dir.parent / COMPILE_CACHE),
            resources=dict(res.group_resources),
            scheduling=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            shared_config=base, inputs_file=str(sweep_dir / GROUP_INPUTS),
            llm_dir=None if llm_dir is None else str(llm_dir)))
    return groups


def start_shared_groups(cfg: SearchConfig, sweep_dir: Path, base: TrainConfig,
                        base_data: dict[str, Any], profile: tuple[str, int, int] | None,
                        src: str = "search.yaml") -> SharedGroups | None:
    """With ``resources.shared_group``, the groups, started as soon as Ray is up and before
    the sweep's inputs are prepared: each loads the shared LLM meanwhile (from its
    directory, if an earlier run built it), and gets the inputs from `hand_inputs`. None
    without shared groups. `base`/`base_data`: the trials' base config, parsed and as data;
    `profile`: the first group's `group_profile`; `src`: search.yaml, for errors."""
    if not cfg.resources.shared_group:
        return None
    plan = plan_groups(cfg, ray.cluster_resources(), src)
    check_shared_storage(sweep_dir, src)
    # An earlier run's inputs: this run's actors must never take them for its own.
    (sweep_dir / GROUP_INPUTS).unlink(missing_ok=True)
    groups = start_groups(cfg, plan, sweep_dir, profile, base_data, ready_llm_dir(base))
    compiled = (f"; its forward is compiled once for {plan.slots} member slots "
                "(minutes at reference scale): trials join and leave without a recompile"
                if base.model.compile != "off" else "")
    res = cfg.resources
    if plan.groups == 1:
        print(f"[sweep] shared group: up to {plan.slots} trials in one process "
              f"over one copy of the frozen model ({res.cpus_per_trial} CPU, "
              f"{res.gpus_per_trial} GPU){compiled}")
    else:
        print(f"[sweep] shared groups: {plan.groups} processes, each up to {plan.slots} "
              f"trials over its own copy of the frozen model ({plan.bundle} each), "
              f"{plan.concurrency} trials at a time{compiled}")
    return groups


def hand_inputs(groups: SharedGroups, inputs: Inputs, sweep_dir: Path) -> None:
    """Give the groups the sweep's prepared inputs, and keep them in the sweep directory for
    an actor Ray restarts (it is started again with its first arguments: no inputs).

    Does not wait for the actors to take them: an actor still starting (its process and
    imports) takes them once it is up, and a trial's join waits for them (`GroupActor.join`),
    so Tune starts the trials meanwhile. The calls' refs stay with `groups` (`handed`)."""
    atomic_write_text(sweep_dir / GROUP_INPUTS, json.dumps(inputs_to_data(inputs)) + "\n")
    groups.handed = [actor.set_inputs.remote(inputs) for actor in groups.actors]


def build_trainable(cfg: SearchConfig, base: dict[str, Any], inputs: Inputs,
                    opts: TrialOptions, groups: SharedGroups | None) -> Any:
    """The Tune trainable: a solo trial, or a member of `groups` (`start_shared_groups`,
    handed their inputs)."""
    if groups is None:
        return with_resources(run_trial, cfg, base=base, inputs=inputs, opts=opts)
    res = cfg.resources
    # A member's own process only relays reports: MEMBER_CPU, no GPU. It waits for
    # a free slot as long as an orphan may hold one (and a minute for the leave's way).
    return tune.with_resources(
        tune.with_parameters(run_group_member, base=base, opts=opts, actor_names=groups.names,
                             join_wait_s=res.group_orphan_timeout_s + 60.0),
        {"cpu": MEMBER_CPU})


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
              total_steps: int, ray_log_level: int, resume: bool,
              groups: SharedGroups | None = None) -> dict[str, Any]:
    """The sweep's own Tuner: the space, the searcher and scheduler, `tracking` (the MLflow
    callback) and the live table; as many trials at a time as `groups` have slots for.
    Returns the trials' final statuses."""
    cfg = loaded.cfg
    concurrent = groups.plan.concurrency if groups is not None else cfg.max_concurrent_trials
    return fit(
        sweep_dir, trainable,
        param_space=param_space(cfg.space),
        tune_config=tune.TuneConfig(
            metric=cfg.search.metric, mode="min", num_samples=cfg.num_samples,
            max_concurrent_trials=concurrent, search_alg=_searcher(loaded),
            scheduler=_scheduler(loaded, total_steps),
            time_budget_s=cfg.stopping.time_budget_s, reuse_actors=True),
        callbacks=[tracking, ProgressCallback(
            # --verbose lets library lines interleave with the table: a redraw in
            # place would overwrite them, so it is printed as when piped.
            trial_count(cfg), in_place=None if ray_log_level > logging.INFO else False)],
        max_failures=cfg.trials.max_failures, keep=cfg.trials.keep_checkpoints,
        resume=resume)


def close_group(groups: SharedGroups, sweep_dir: Path) -> None:
    """After the trials: the shared groups' members' runs closed, then their figures to
    GROUP_STATS (one group's, or ``{"groups": [...]}``), and the actors killed and their
    placement group removed (the GPU memory freed for the recheck)."""
    from ray.util.placement_group import remove_placement_group

    # Closed first: a trial Tune stopped may still be a member whose client's leave is in
    # flight, and the group steps it until then; figures taken before would miss the
    # steps it trains meanwhile, whose records its run dir still gets.
    try:  # stopped trials' runs end even if their client's leave is still in flight
        ray.get([g.close.remote() for g in groups.actors], timeout=GROUP_CLOSE_TIMEOUT_S)
    except Exception as e:  # a dead or stuck actor: its runs stay as they are on disk
        print(f"[sweep] warning: a shared group did not close its members: {e}",
              file=sys.stderr)
    try:  # the figures only: a failure here must not keep the actors alive
        stats = ray.get([g.stats.remote() for g in groups.actors], timeout=30)  # no step waits
        data = stats[0] if len(stats) == 1 else {"groups": stats}
        atomic_write_text(sweep_dir / GROUP_STATS, json.dumps(data, indent=2) + "\n")
        for i, one in enumerate(stats):
            which = "shared group" + (f" {i}" if len(stats) > 1 else "")
            print(f"[sweep] {which}: {describe_stats(one)} (details: {sweep_dir / GROUP_STATS})")
            for line in one.get("events", []):  # seconds from the group's start
                print(f"[sweep] {which} at {line}")
    except Exception as e:
        print(f"[sweep] warning: no shared-group stats: {e}", file=sys.stderr)
    for group in groups.actors:
        ray.kill(group)  # every member finished; free its GPU memory for the recheck
    if groups.placement is not None:
        remove_placement_group(groups.placement)
