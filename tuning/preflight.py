"""Checks before a sweep starts, so that bad input costs nothing: every sampled extreme of
the space makes a run that can happen, a shared group's rules hold, and `--dry-run`'s
summary (with every media file of the user's manifests opened once)."""

from __future__ import annotations

import copy
import os

from trainer.config import TrainConfig, config_from_data, set_dotted
from trainer.data import check_media, read_manifest
from trainer.errors import ConfigError, Problem
from trainer.group_rules import SHARED_KEYS
from trainer.inputs import train_size
from trainer.plan import plan_steps
from tuning.search_config import Loaded, domain_problems, space_key_path, trial_count
from tuning.sweep_dir import resolve_sweep_dir


def check_runs(loaded: Loaded) -> None:
    """Every space extreme must make a run that can happen (steps, warmup, batch)."""
    src = str(loaded.path)
    cfg = loaded.cfg
    base_plan = plan_steps(loaded.base.phase2, train_size(loaded.base), src)
    problems: list[Problem] = []
    for key, spec in cfg.space.items():
        _, extremes = domain_problems(src, key, spec)
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
        problems += group_problems(loaded)
    max_t = cfg.scheduler.max_t or base_plan.total_steps
    if cfg.scheduler.type == "asha" and cfg.scheduler.grace_period > max_t:
        problems.append(Problem(src, "scheduler.grace_period",
                                f"{cfg.scheduler.grace_period} steps > max_t ({max_t} steps)",
                                "lower grace_period below the run's total steps"))
    if problems:
        raise ConfigError(problems)


def group_problems(loaded: Loaded) -> list[Problem]:
    """A shared group needs cached features and trials that agree on what the shared
    forward fixes (trainer.group_rules.SHARED_KEYS): checked here, before Ray starts."""
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


def dry_run(loaded: Loaded) -> None:
    """`--dry-run`: what the sweep would do (no Ray, nothing written), and every media file
    of the user's manifests opened once."""
    cfg = loaded.cfg
    plan = plan_steps(loaded.base.phase2, train_size(loaded.base), str(loaded.path))
    print(f"sweep {cfg.sweep.name} -> {resolve_sweep_dir(loaded)}")
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


def _dry_run_media(base: TrainConfig) -> None:
    """Open every media file of the user's manifests once; every bad one is reported."""
    problems = []
    for manifest in (base.data.manifest, base.data.eval_manifest):
        if manifest is not None:  # the demo data is generated, not read
            examples = read_manifest(manifest)
            problems += check_media(examples)
            print(f"media: {len(examples)} examples of {manifest} opened")
    if problems:
        raise ConfigError(problems)
