"""Checks before a sweep starts, so that bad input costs nothing: every sampled extreme of
the space makes a run that can happen, a shared group's rules hold, and `--dry-run`'s
summary (with every media file of the user's manifests opened once)."""

from __future__ import annotations

import copy
import itertools
import json
import os

from trainer.config import TrainConfig, config_from_data, set_dotted
from trainer.dry_run import llm_problems, media_problems
from trainer.errors import ConfigError, Problem
from trainer.group_rules import SHARED_KEYS
from trainer.inputs import train_size
from trainer.plan import plan_steps
from tuning.search_config import (
    Loaded,
    SearchConfig,
    domain_problems,
    space_key_path,
    trial_count,
)
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


def _at_a_time(cfg: SearchConfig) -> str:
    """Trials at once: max_concurrent_trials, or (shared groups with trials_per_group)
    groups x trials_per_group, capped by an explicit max_concurrent_trials; with
    groups: auto the count is known only once Ray is up."""
    res = cfg.resources
    if not res.shared_group or res.trials_per_group is None:
        return str(cfg.max_concurrent_trials)
    if res.groups == "auto":
        return f"(groups x {res.trials_per_group})"
    n = res.groups * res.trials_per_group
    if "max_concurrent_trials" in cfg.model_fields_set:
        n = min(n, cfg.max_concurrent_trials)
    return str(n)


def dry_run(loaded: Loaded) -> None:
    """`--dry-run`: what the sweep would do (no Ray, nothing written); the LLM and LoRA
    targets checked on the meta device and every media file of the user's manifests opened
    once."""
    cfg = loaded.cfg
    plan = plan_steps(loaded.base.phase2, train_size(loaded.base), str(loaded.path))
    print(f"sweep {cfg.sweep.name} -> {resolve_sweep_dir(loaded)}")
    print(f"trials: {trial_count(cfg)} ({cfg.num_samples} samples"
          f"{' x grid' if trial_count(cfg) != cfg.num_samples else ''}), "
          f"{_at_a_time(cfg)} at a time, search {cfg.search.algorithm}, "
          f"scheduler {cfg.scheduler.type}")
    res = cfg.resources
    if res.shared_group:
        print(f"each trial: {plan.total_steps} optimizer steps (base), in one of "
              f"{res.groups} shared group(s) of "
              f"{res.trials_per_group or 'max_concurrent_trials / groups'} slots, each group "
              f"{res.cpus_per_trial} CPU, {res.gpus_per_trial} GPU"
              + (f", {res.group_resources}" if res.group_resources else ""))
    else:
        print(f"each trial: {plan.total_steps} optimizer steps (base), "
              f"{res.cpus_per_trial} CPU, {res.gpus_per_trial} GPU")
    print("space:")
    for key, spec in cfg.space.items():
        print(f"  {space_key_path(key)}: {spec}")
    print(f"ray: {cfg.ray.address or os.environ.get('RAY_ADDRESS') or 'local'}; "
          f"mlflow: {cfg.mlflow.tracking_uri or 'sqlite under the sweep dir'}")
    _dry_run_checks(loaded)


# Space keys that change which LLM a trial builds or what LoRA wraps in it: every value the
# space can give them is checked by the dry run, not only the base config's.
LLM_SPACE_KEYS = ("model.llm_path", "model.lora.target_modules")


def _base_source(loaded: Loaded) -> str:
    base = loaded.cfg.base.config
    return str(loaded.path) if base is None else str(
        loaded.path.resolve().parent / base.expanduser())


def _llm_variants(loaded: Loaded) -> list[tuple[str, TrainConfig]]:
    """(the search.yaml key to blame, its trial config) per distinct LLM / target choice."""
    keys = [k for k in loaded.cfg.space if space_key_path(k) in LLM_SPACE_KEYS]
    choices = []
    for key in keys:
        spec = loaded.cfg.space[key]
        # choice / grid list their values; anything else is a constant (numeric forms
        # cannot name a path or a target list)
        choices.append(next(iter(spec.values())) if isinstance(spec, dict) else [spec])
    variants = [("", loaded.base)]
    for combo in itertools.product(*choices) if keys else []:
        data = copy.deepcopy(loaded.base_data)
        for key, value in zip(keys, combo, strict=True):
            set_dotted(data, space_key_path(key), value, str(loaded.path))
        blame = ", ".join(f"space.{k}={v!r}" for k, v in zip(keys, combo, strict=True))
        variants.append((blame, config_from_data(data, str(loaded.path))))
    return variants


def _dry_run_checks(loaded: Loaded) -> None:
    """The trainer's dry-run checks (trainer.dry_run) before any trial: the LLM and its
    LoRA targets for the base config and every LLM / target value the space can sample,
    and every media file of the user's manifests. Every problem is reported at once."""
    problems: list[Problem] = []
    seen: set[str] = set()
    overrides = loaded.cfg.base.overrides
    for blame, cfg in _llm_variants(loaded):
        what = json.dumps([str(cfg.model.llm_path), cfg.model.lora.target_modules])
        if what in seen:
            continue
        seen.add(what)
        for p in llm_problems(cfg, _base_source(loaded)):
            if blame:  # a sampled value: name it in search.yaml
                p = Problem(str(loaded.path), blame, p.message, p.fix)
            elif p.key in overrides:  # search.yaml's override, not the base config
                p = Problem(str(loaded.path), f"base.overrides.{p.key}", p.message, p.fix)
            problems.append(p)
    problems += media_problems(loaded.base)
    if problems:
        raise ConfigError(problems)
