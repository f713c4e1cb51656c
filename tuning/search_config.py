"""`search.yaml`: a base Phase 2 config, a search space and how to run the sweep.

Validated once, before anything starts: every problem names the file, the key
and the fix. Nothing here imports Ray; `tuning.raytune.space` turns the validated space
into Ray Tune domains.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from trainer.config import (
    NAME_RE,
    Phase2,
    TrainConfig,
    anchor_paths,
    config_from_data,
    set_dotted,
    validation_problems,
)
from trainer.errors import ConfigError, Problem
from trainer.yaml_io import load_yaml_file
from tuning.analysis.stability import StabilityRules

FORMS = ("grid", "choice", "uniform", "loguniform", "quniform", "qloguniform", "randint",
         "qrandint")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Sweep(_Strict):
    name: str = "phase2-sweep"  # sweep directory and MLflow experiment name
    storage_path: Path = Path("runs/sweeps")  # sweeps live in <storage_path>/<name>/

    @field_validator("storage_path")
    @classmethod
    def _path(cls, v: Path) -> Path:
        if "\0" in str(v):
            raise ValueError("contains a NUL byte")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v) or v in {".", ".."}:
            raise ValueError(f"{v!r} must match {NAME_RE.pattern} (no '/', no '..')")
        return v


class Base(_Strict):
    # A Phase 2 YAML; null = defaults. Relative: to this file's directory (like the input
    # paths inside either file), so the sweep works from any working directory.
    config: Path | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted keys on top of it


class Search(_Strict):
    algorithm: Literal["random", "grid", "optuna"] = "random"
    metric: Literal["loss", "eval_loss"] = "loss"  # what the searcher/scheduler minimise
    seed: int | None = 0  # sampling seed (null = random)


class Scheduler(_Strict):
    type: Literal["fifo", "asha"] = "asha"
    grace_period: int = Field(20, ge=1)  # optimizer steps every trial gets before a cut
    max_t: int | None = Field(None, ge=1)  # optimizer steps; null = the run's total steps
    reduction_factor: float = Field(3.0, gt=1)


class Resources(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)  # fractions share a GPU (0.25 = 4 trials/GPU)
    # One process trains up to max_concurrent_trials trials over one copy of the frozen
    # model (tuning/raytune/group_actor.py); the group then holds cpus_per_trial CPUs and
    # gpus_per_trial GPUs in all, and each trial's own process only relays its reports.
    shared_group: bool = False
    group_orphan_timeout_s: float = Field(120.0, gt=0)  # a member nobody polls is dropped
    # Shared groups side by side, one per GPU (docs/shared-group.md): each holds the
    # resources above plus group_resources, pinned through a placement group bundle.
    # "auto" = as many as the cluster holds of them (its GPUs, or group_resources'), 1 on
    # a cluster without either.
    groups: int | Literal["auto"] = Field(1)
    # A group's capacity (its compiled forward's slots); null = max_concurrent_trials over
    # the groups. Set, the sweep runs groups x trials_per_group trials at a time.
    trials_per_group: int | None = Field(None, ge=1)
    # Custom Ray resources each group also holds, e.g. {fake_gpu: 1} (the tests' stand-in
    # for a GPU on CPU) or a node type's own resource.
    group_resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1, or auto")
        return v

    @field_validator("group_resources")
    @classmethod
    def _group_resources(cls, v: dict[str, float]) -> dict[str, float]:
        for name, amount in v.items():
            if name in ("CPU", "GPU", "cpu", "gpu", "memory"):
                raise ValueError(f"{name}: set cpus_per_trial / gpus_per_trial instead")
            if not amount > 0:
                raise ValueError(f"{name}: {amount} must be > 0")
        return v


class Stopping(_Strict):
    nan_policy: Literal["skip", "stop"] = "stop"  # trials: stop at the first NaN (unstable)
    divergence_factor: float | None = Field(4.0, gt=1)  # smoothed loss > k x first = diverged
    stall_timeout_s: float = Field(600.0, gt=0)  # no optimizer step for this long = stalled
    time_budget_s: float | None = Field(None, gt=0)  # whole-sweep wall-clock limit
    worst_loss: float = Field(1.0e4, gt=0)  # reported to schedulers instead of NaN/inf


class Trials(_Strict):
    report_every: int = Field(10, ge=1)  # optimizer steps per tune.report (all steps kept)
    checkpoint_every: int = Field(50, ge=0)  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = Field(2, ge=2)  # >= 2: one is reported a step after it is written
    max_failures: int = Field(2, ge=0)  # retries from the last checkpoint per trial


class RayCfg(_Strict):
    address: str | None = None  # null = RAY_ADDRESS or a local Ray; "auto" = running cluster
    include_dashboard: bool = False  # the dashboard binds 127.0.0.1 when on
    num_cpus: int | None = Field(None, ge=1)  # local Ray only; null = all cores


class MlflowCfg(_Strict):
    tracking_uri: str | None = None  # null = SQLite under the sweep dir; http://host:5000
    experiment: str | None = None  # null = the sweep name
    on_unreachable: Literal["fail", "continue"] = "fail"  # tracking server down at start
    timeout_s: float = Field(10.0, gt=0)  # bound on every tracking request


class Recheck(_Strict):
    """Robustness re-check of the best stable configs (`--recheck K` or top_k here)."""

    top_k: int = Field(0, ge=0)  # re-check the K best stable trials; 0 = off
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1)
    lr_factors: list[float] = Field(default_factory=lambda: [0.67, 1.0, 1.5], min_length=1)
    loss_tolerance: float = Field(0.05, ge=0)  # "as good as the best": within 5% of its loss


class SearchConfig(_Strict):
    sweep: Sweep = Field(default_factory=Sweep)
    base: Base = Field(default_factory=Base)
    space: dict[str, Any] = Field(default_factory=dict)
    num_samples: int = Field(8, ge=1)  # samples (x every grid combination)
    max_concurrent_trials: int = Field(2, ge=1)
    search: Search = Field(default_factory=Search)
    scheduler: Scheduler = Field(default_factory=Scheduler)
    resources: Resources = Field(default_factory=Resources)
    stopping: Stopping = Field(default_factory=Stopping)
    trials: Trials = Field(default_factory=Trials)
    ray: RayCfg = Field(default_factory=RayCfg)
    mlflow: MlflowCfg = Field(default_factory=MlflowCfg)
    stability: StabilityRules = Field(default_factory=StabilityRules)
    recheck: Recheck = Field(default_factory=Recheck)


class Loaded:
    """A validated search.yaml plus the base TrainConfig data it sweeps over."""

    def __init__(self, path: Path, cfg: SearchConfig, base_data: dict[str, Any],
                 base: TrainConfig, raw: dict[str, Any]) -> None:
        self.path, self.cfg, self.base_data, self.base, self.raw = path, cfg, base_data, base, raw

    @property
    def sweep_dir(self) -> Path:
        return (self.cfg.sweep.storage_path / self.cfg.sweep.name).resolve()


def space_key_path(key: str) -> str:
    """Space keys name phase2 knobs (`learning_rate`) or any dotted config key."""
    return key if "." in key else f"phase2.{key}"


def domain_problems(src: str, key: str, spec: Any) -> tuple[list[Problem], list[Any]]:
    """Check one space entry; return problems and the extreme values to validate."""
    k = f"space.{key}"
    if not isinstance(spec, dict):
        return [], [spec]  # a constant
    if len(spec) != 1 or next(iter(spec)) not in FORMS:
        return [Problem(src, k, f"unknown domain {sorted(map(str, spec))}",
                        f"use one of: {', '.join(FORMS)}, e.g. {{loguniform: [1.0e-5, 1.0e-3]}}")
                ], []
    form, args = next(iter(spec.items()))
    if form in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            return [Problem(src, f"{k}.{form}", "empty or not a list",
                            "give at least one value, e.g. [0.5, 1.0, null]")], []
        return [], list(args)
    n = 3 if form.startswith("q") else 2
    if not isinstance(args, list) or len(args) != n or not all(
            isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        return [Problem(src, f"{k}.{form}", f"expected {n} numbers",
                        "[min, max]" + (", q]" if n == 3 else "]"))], []
    lo, hi = args[0], args[1]
    problems = []
    if lo > hi:
        problems.append(Problem(src, f"{k}.{form}", f"min {lo} > max {hi}", "swap the bounds"))
    if "log" in form and min(lo, hi) <= 0:
        problems.append(Problem(src, f"{k}.{form}", "log-uniform bounds must be > 0",
                                "use positive bounds, e.g. [1.0e-5, 1.0e-3]"))
    if n == 3 and args[2] <= 0:
        problems.append(Problem(src, f"{k}.{form}", "quantum q must be > 0", "e.g. q = 10"))
    if form in ("randint", "qrandint") and not all(isinstance(a, int) for a in args):
        problems.append(Problem(src, f"{k}.{form}", "bounds must be integers", "e.g. [10, 200]"))
    return problems, [lo, hi - 1 if form == "randint" else hi]


def _check_space(src: str, cfg: SearchConfig, base_data: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    if not cfg.space:
        problems.append(Problem(src, "space", "empty search space",
                                "add e.g. learning_rate: {loguniform: [1.0e-5, 1.0e-3]}"))
    for key, spec in cfg.space.items():
        path = space_key_path(key)
        if "." not in key and key not in Phase2.model_fields:
            import difflib

            close = difflib.get_close_matches(key, list(Phase2.model_fields), n=1)
            problems.append(Problem(src, f"space.{key}", "not a phase2 knob",
                                    f"did you mean '{close[0]}'?" if close
                                    else "use a phase2 key or a dotted config key"))
            continue
        found, extremes = domain_problems(src, key, spec)
        problems += found
        if isinstance(spec, dict) and next(iter(spec), None) == "grid" and (
                cfg.search.algorithm == "optuna"):
            problems.append(Problem(src, f"space.{key}.grid", "grid is not supported by optuna",
                                    "use choice, or search.algorithm: grid / random"))
        if cfg.search.algorithm == "grid" and not (
                not isinstance(spec, dict) or next(iter(spec), None) == "grid"):
            problems.append(Problem(src, f"space.{key}", "search.algorithm grid needs grid forms",
                                    "write {grid: [...]} or switch to random / optuna"))
        for value in extremes:  # each sampled extreme must make a valid trainer config
            data = copy.deepcopy(base_data)
            try:
                set_dotted(data, path, value, src)
                config_from_data(data, src)
            except ConfigError as e:
                problems += [Problem(src, f"space.{key}", p.message, p.fix) for p in e.problems
                             if p.key == path or p.key.startswith(path + ".")
                             or path.startswith(p.key + ".")]
    return problems


STORAGE_ENV = "PHASE2_TUNE_STORAGE_PATH"


def _apply_environment(raw: dict[str, Any]) -> dict[str, Any]:
    """Deployment settings from the environment (docker/compose.yaml sets them).

    PHASE2_TUNE_STORAGE_PATH replaces sweep.storage_path, and the shared demo assets and
    feature caches move under it, so every Ray node reads them from the shared mount;
    MLFLOW_TRACKING_URI applies when mlflow.tracking_uri is left null.
    """
    import os

    raw = copy.deepcopy(raw)
    storage = os.environ.get(STORAGE_ENV)
    if storage:
        raw.setdefault("sweep", {})["storage_path"] = storage
        overrides = raw.setdefault("base", {}).setdefault("overrides", {})
        if isinstance(overrides, dict):
            overrides.setdefault("output.assets_dir", str(Path(storage) / "_assets"))
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow = raw.setdefault("mlflow", {})
    if uri and isinstance(mlflow, dict) and mlflow.get("tracking_uri") is None:
        mlflow["tracking_uri"] = uri
    return raw


def load_search(path: str | Path, overrides: list[str] | None = None) -> Loaded:
    """Load and fully validate a search.yaml (and the base config it names)."""
    from trainer.config import apply_overrides

    path = Path(path)
    src = str(path)
    raw = load_yaml_file(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem(src, "", "the top level must be a mapping",
                                   "see configs/search.yaml")])
    if overrides:
        raw = apply_overrides(copy.deepcopy(raw), overrides)
    raw = _apply_environment(raw)
    try:
        cfg = SearchConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(validation_problems(err, src, SearchConfig,
                                              "configs/search.yaml")) from None
    base_src = src
    if cfg.base.config is not None:
        base_path = cfg.base.config.expanduser()
        if not base_path.is_absolute():
            base_path = path.resolve().parent / base_path
        if not base_path.is_file():
            raise ConfigError([Problem(src, "base.config", f"file {base_path} not found",
                                       "point it at a Phase 2 YAML (a relative path is "
                                       f"relative to {path.resolve().parent}), or null for "
                                       "defaults")])
        base_data = load_yaml_file(base_path) or {}
        base_src = str(base_path)
    else:
        base_data = {}
    base_data = copy.deepcopy(base_data)
    if not isinstance(base_data, dict):
        raise ConfigError([Problem(base_src, "", "the top level must be a mapping",
                                   "start the file with `phase2:`")])
    if cfg.base.config is not None:
        anchor_paths(base_data, Path(base_src).parent)
    if "phase2" not in base_data and any(k in Phase2.model_fields for k in base_data):
        base_data = {"phase2": base_data}  # a seed-style bare block
    overrides_ = anchor_paths(dict(cfg.base.overrides), path.resolve().parent)
    for key, value in overrides_.items():
        set_dotted(base_data, key, value, src)
    try:
        base = config_from_data(base_data, base_src)
    except ConfigError as e:
        # A bad value that came from base.overrides is search.yaml's fault, not the base's.
        raise ConfigError([
            Problem(src, f"base.overrides.{p.key}", p.message, p.fix)
            if p.key in cfg.base.overrides else p for p in e.problems]) from None
    problems = _check_space(src, cfg, base_data)
    if 1.0 not in cfg.recheck.lr_factors or len(set(cfg.recheck.seeds)) != len(cfg.recheck.seeds):
        problems.append(Problem(src, "recheck", "lr_factors must include 1.0 and seeds be unique",
                                "e.g. seeds: [1, 2, 3], lr_factors: [0.67, 1.0, 1.5]"))
    if cfg.scheduler.max_t is not None and cfg.scheduler.grace_period > cfg.scheduler.max_t:
        problems.append(Problem(src, "scheduler.grace_period",
                                f"{cfg.scheduler.grace_period} > max_t {cfg.scheduler.max_t}",
                                "lower grace_period or raise max_t"))
    problems += _check_groups(src, cfg)
    if cfg.mlflow.tracking_uri and not cfg.mlflow.tracking_uri.startswith(
            ("http://", "https://", "sqlite:///", "postgresql://", "file:")):
        problems.append(Problem(src, "mlflow.tracking_uri", "unsupported URI scheme",
                                "use http(s)://host:port, sqlite:///path or null"))
    if cfg.mlflow.experiment is not None and not NAME_RE.match(cfg.mlflow.experiment):
        problems.append(Problem(src, "mlflow.experiment", "invalid name",
                                f"must match {NAME_RE.pattern}"))
    if problems:
        raise ConfigError(problems)
    return Loaded(path, cfg, base_data, base, raw)


def _check_groups(src: str, cfg: SearchConfig) -> list[Problem]:
    """Group keys that only a shared group reads, and a concurrency no slot could take."""
    res = cfg.resources
    set_keys = [k for k in ("groups", "trials_per_group", "group_resources")
                if k in res.model_fields_set and getattr(res, k) not in (1, None, {})]
    if not res.shared_group:
        return [Problem(src, f"resources.{k}", "applies only to a shared group",
                        "set resources.shared_group: true, or remove it") for k in set_keys]
    if (isinstance(res.groups, int) and res.trials_per_group is not None
            and "max_concurrent_trials" in cfg.model_fields_set
            and cfg.max_concurrent_trials > res.groups * res.trials_per_group):
        return [Problem(src, "max_concurrent_trials",
                        f"{cfg.max_concurrent_trials} > groups {res.groups} x trials_per_group "
                        f"{res.trials_per_group}: trials would wait for a free slot",
                        "leave max_concurrent_trials out (it is groups x trials_per_group), "
                        "or raise trials_per_group")]
    return []


def trial_count(cfg: SearchConfig) -> int:
    grid = math.prod(len(next(iter(s.values()))) for s in cfg.space.values()
                     if isinstance(s, dict) and next(iter(s)) == "grid")
    return cfg.num_samples * grid
