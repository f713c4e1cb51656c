"""Robustness re-check of a sweep's best stable trials (the pure part: no Ray).

One lucky run proves little: the sweep's best trial may sit right next to a cliff, where a
slightly higher learning rate (a larger batch, another dataset) or another seed goes NaN.
The re-check re-runs the top K stable configs over several seeds and at neighbouring
learning rates (every group LR scaled by the same factor) and recommends, among configs
whose mean loss is close to the best, the one that stayed stable most often.

Workflow: ``recheck_plan`` -> run each ``RecheckTrial.config`` as a trial (FIFO, no early
stopping) -> ``match_plan`` pairs the finished runs with the plan -> ``summarize`` ->
``tuning.analysis.recheck_report`` lays the summary out.

The words are in ``tuning.analysis.recheck_wording``: every config's reason and the
headline say *why* one config was recommended over another in the terms of the summary's
own fields, so a change to the rule here wants a look at its explanation there.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuning.analysis.leaderboard import PHASE2_KNOBS, build_leaderboard
from tuning.analysis.recheck_wording import entry_reason, factor_label, headline, is_one
from tuning.analysis.stability import StabilityRules, verdict, verdicts_for
from tuning.analysis.trial_record import (
    DEFAULT_LORA_LR_MULT,
    DEFAULT_PROJECTOR_LR_MULT,
    TrialRecord,
    finite_or_none,
)

DEFAULT_LR_FACTORS: tuple[float, ...] = (0.67, 1.0, 1.5)

# The knobs every re-check config carries; the LR groups are handled by _group_knobs.
_CORE_KNOBS = ("learning_rate", "warmup_steps", "gradient_clip_val")
_GROUPS = (("projector", DEFAULT_PROJECTOR_LR_MULT), ("lora", DEFAULT_LORA_LR_MULT))

# A resolved config stores projector_lr = learning_rate x mult as a float product; a looser
# tolerance than float noise would mistake a genuinely explicit LR for a derived one only if
# it agreed with the product to 6 digits, which gives the same run anyway.
_DERIVED_RTOL = 1e-6
# Matching a finished run to its plan entry: the values went through YAML and back.
_MATCH_RTOL = 1e-9

STATUS_RECOMMENDED = "recommended"
STATUS_WITHIN = "within tolerance"
STATUS_OUTSIDE = "outside tolerance"
STATUS_NOT_REPRODUCIBLE = "not reproducible"


@dataclass
class RecheckTrial:
    """One re-check run: a stable sweep trial's config at another seed and LR scale."""

    source_trial: str
    seed: int
    lr_factor: float
    config: dict[str, Any]  # sampled keys for tuning.raytune.trainable.trial_config
    # Leaderboard rank of the source trial (1 = the sweep's best), so summarize() can tell
    # whether its recommendation overturns the sweep's choice.
    source_rank: int | None = None


@dataclass
class FactorOutcome:
    """How one LR factor fared across the seeds of one source config."""

    factor: float
    runs: int
    stable: int
    failures: Counter[str] = field(default_factory=Counter)  # verdict kind -> unstable runs

    @property
    def broke(self) -> bool:
        return self.stable < self.runs


@dataclass
class RecheckEntry:
    """The re-check verdict for one source config."""

    source_trial: str
    source_rank: int | None
    mean_loss: float | None  # over stable seeds at x1 (smoothed final loss)
    std_loss: float | None  # sample std (n-1); None with fewer than 2 seeds
    seeds_at_1x: int  # stable runs at x1 that have a loss (the mean's n)
    runs_at_1x: int
    stable_runs: int
    total_runs: int
    factors: list[FactorOutcome]
    early_stopped: int = 0  # early-stopped runs: their losses are not comparable
    within_tolerance: bool = False
    recommended: bool = False
    reason: str = ""

    @property
    def margin(self) -> float:
        """Fraction of all its re-check runs that were stable."""
        return self.stable_runs / self.total_runs if self.total_runs else 0.0

    @property
    def reproducible(self) -> bool:
        """Stable in every seed at its own LR: the minimum for being recommended."""
        return self.runs_at_1x > 0 and self.seeds_at_1x == self.runs_at_1x

    @property
    def neighbours_stable(self) -> bool:
        """Every run away from x1 (all seeds) stayed stable."""
        return not any(f.broke for f in self.factors if not is_one(f.factor))

    @property
    def broke_first(self) -> float | None:
        """The failing factor nearest x1 (the smallest LR change that breaks it)."""
        broken = [f.factor for f in self.factors if f.broke]
        return min(broken, key=lambda f: (abs(math.log(f)), -f)) if broken else None

    @property
    def status(self) -> str:
        if self.recommended:
            return STATUS_RECOMMENDED
        if not self.reproducible:
            return STATUS_NOT_REPRODUCIBLE
        return STATUS_WITHIN if self.within_tolerance else STATUS_OUTSIDE


@dataclass
class RecheckSummary:
    """All entries (in sweep-rank order), the recommendation and the headline."""

    entries: list[RecheckEntry]
    recommended: str | None
    sweep_best: str | None
    loss_tolerance: float
    message: str
    best_mean_loss: float | None = None

    @property
    def overturned(self) -> bool:
        """True when the re-check recommends something other than the sweep's best trial."""
        return self.recommended is not None and self.recommended != self.sweep_best

    @property
    def factors(self) -> list[float]:
        return sorted({f.factor for e in self.entries for f in e.factors})


# --------------------------------------------------------------------------- plan


def recheck_plan(
    records: Sequence[TrialRecord],
    rules: StabilityRules | None,
    top_k: int,
    seeds: Sequence[int],
    lr_factors: Sequence[float] = DEFAULT_LR_FACTORS,
    *,
    swept_keys: Iterable[str] | None = None,
) -> list[RecheckTrial]:
    """Configs for the top ``top_k`` stable trials x ``seeds`` x ``lr_factors``.

    ``swept_keys`` (e.g. the search space's keys) limits the carried knobs to the LR knobs,
    warmup, clipping, seed and those keys; by default every phase2 knob in the record's
    params is carried, since the resolved config is exactly what ran. An empty list means
    no stable trial (see ``explain_plan`` for the message).
    """
    _check_plan_args(top_k, seeds, lr_factors)
    by_id = {record.trial_id: record for record in records}
    # Plateaued trials are stable but learned far less than the best: not worth re-running.
    rows = [row for row in build_leaderboard(records, rules)
            if row.stable and row.kind != "plateaued"][:top_k]
    keys = _normalize_swept_keys(swept_keys)
    plan: list[RecheckTrial] = []
    for row in rows:
        base = source_config(by_id[row.trial_id], keys)
        plan += [
            RecheckTrial(row.trial_id, seed, factor, scaled_config(base, factor, seed), row.rank)
            for seed in seeds
            for factor in lr_factors
        ]
    return plan


def _check_plan_args(top_k: int, seeds: Sequence[int], factors: Sequence[float]) -> None:
    problems = []
    if top_k < 1:
        problems.append(f"top_k must be >= 1, got {top_k}")
    if not seeds or len(set(seeds)) != len(seeds):
        problems.append(f"seeds must be a non-empty list without repeats, got {list(seeds)}")
    if not factors or any(not (f > 0 and math.isfinite(f)) for f in factors):
        problems.append(f"lr_factors must be finite and > 0, got {list(factors)}")
    elif len(set(factors)) != len(factors):
        problems.append(f"lr_factors repeat a value: {list(factors)}")
    elif not any(is_one(f) for f in factors):
        # summarize() ranks configs by their loss at their own LR, so x1 must be run.
        problems.append(f"lr_factors must include 1.0, got {list(factors)}")
    if problems:
        raise ValueError("; ".join(problems))


def _normalize_swept_keys(swept_keys: Iterable[str] | None) -> list[str] | None:
    if swept_keys is None:
        return None
    keys = [key.removeprefix("phase2.") for key in swept_keys]
    # A TrialRecord holds only the phase2 section, so e.g. model.lora.r cannot be recovered;
    # re-running without it would silently re-check a different config.
    bad = [key for key in keys if key not in PHASE2_KNOBS]
    if bad:
        raise ValueError(
            f"cannot re-check swept keys {bad}: trial records hold only phase2 knobs; "
            "fix those keys in the base config or drop them from the space"
        )
    return keys


def source_config(record: TrialRecord, swept_keys: Sequence[str] | None = None) -> dict[str, Any]:
    """The trial's knobs at x1, without the seed, in PHASE2_KNOBS order."""
    params = record.params
    base = record.base_lr
    if base is None:
        raise ValueError(
            f"trial {record.trial_id} has no learning_rate in its params "
            "(config.resolved.yaml missing?): cannot scale its LRs"
        )
    if swept_keys is None:
        wanted = set(PHASE2_KNOBS)
    else:
        missing = [k for k in swept_keys if k not in params and k != "seed"]
        if missing:
            raise ValueError(f"trial {record.trial_id} has no value for swept keys {missing}")
        wanted = {*_CORE_KNOBS, *swept_keys}
    config = {key: params[key] for key in PHASE2_KNOBS if key in wanted and key in params}
    config.update(_group_knobs(params, base))
    config.pop("seed", None)  # set per re-check run
    return {key: config[key] for key in PHASE2_KNOBS if key in config}


def _group_knobs(params: Mapping[str, Any], base: float) -> dict[str, Any]:
    """Multipliers as they were; a group LR only if it was explicit, else None.

    None is written on purpose rather than left out: trial_config merges into the base
    config, and an explicit projector_lr there would otherwise stay unscaled while
    learning_rate moves. None makes the trainer derive the group LR from the multiplier.
    """
    knobs: dict[str, Any] = {}
    for group, default in _GROUPS:
        mult = finite_or_none(params.get(f"{group}_lr_mult")) or default
        lr = finite_or_none(params.get(f"{group}_lr"))
        derived = lr is None or math.isclose(lr, base * mult, rel_tol=_DERIVED_RTOL)
        knobs[f"{group}_lr_mult"] = mult
        knobs[f"{group}_lr"] = None if derived else lr
    return knobs


def scaled_config(config: Mapping[str, Any], factor: float, seed: int) -> dict[str, Any]:
    """``config`` with the base LR and any explicit group LR times ``factor``, and ``seed``."""
    out = dict(config)
    for key in ("learning_rate", "projector_lr", "lora_lr"):
        if out.get(key) is not None:
            out[key] = _tidy(out[key] * factor)
    out["seed"] = seed
    return out


def _tidy(value: float) -> float:
    # 12 significant digits drop float noise (1.5 x 1e-4 = 0.00015000000000000001) that
    # would otherwise show up in YAML, MLflow params and the report.
    return float(f"{value:.12g}")


def explain_plan(
    plan: Sequence[RecheckTrial],
    records: Sequence[TrialRecord],
    rules: StabilityRules | None = None,
    top_k: int | None = None,
) -> str:
    """One line saying what the plan re-checks, or why it is empty."""
    if not plan:
        return _empty_plan_message(records, rules)
    sources = list(dict.fromkeys(t.source_trial for t in plan))
    seeds = sorted({t.seed for t in plan})
    factors = sorted({t.lr_factor for t in plan})
    short = (
        f" (only {len(sources)} stable of the {top_k} asked for)"
        if (top_k is not None and len(sources) < top_k)
        else ""
    )
    return (
        f"Re-checking {len(sources)} stable trial(s){short}: {', '.join(sources)} x "
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}) x {len(factors)} LR factors "
        f"({', '.join(factor_label(f) for f in factors)}) = {len(plan)} runs"
    )


def _empty_plan_message(records: Sequence[TrialRecord], rules: StabilityRules | None) -> str:
    if not records:
        return "No trials in the sweep: nothing to re-check."
    kinds = Counter(v.kind for v in verdicts_for(records, rules).values())
    detail = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    return (
        f"No stable trial among {len(records)} trials ({detail}): nothing to re-check. "
        "Fix the instability first (see report/advice.md), then re-check."
    )


# --------------------------------------------------------------------------- matching


def match_plan(
    plan: Sequence[RecheckTrial], records: Sequence[TrialRecord]
) -> dict[str, list[tuple[RecheckTrial, TrialRecord]]]:
    """Pair each plan entry with the finished run whose resolved params match its config.

    Ray names trials itself, so runs are matched by their knobs. A plan entry with no run
    gets an empty PENDING record: it counts as "did not finish", never silently as stable.
    """
    out: dict[str, list[tuple[RecheckTrial, TrialRecord]]] = {}
    for trial in plan:
        found = next((r for r in records if _matches(trial.config, r.params)), None)
        out.setdefault(trial.source_trial, []).append((trial, found or _missing_record(trial)))
    return out


def _matches(config: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    want, have = _effective(config), _effective(params)
    return all(key in have and _same(value, have[key]) for key, value in want.items())


def _effective(knobs: Mapping[str, Any]) -> dict[str, Any]:
    """Knobs with the group LRs resolved the trainer's way (explicit LR, else base x mult)."""
    out = dict(knobs)
    base = finite_or_none(knobs.get("learning_rate"))
    for group, default in _GROUPS:
        mult = finite_or_none(knobs.get(f"{group}_lr_mult")) or default
        if out.get(f"{group}_lr") is None and base is not None:
            out[f"{group}_lr"] = base * mult
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int):
        return math.isclose(a, b, rel_tol=_MATCH_RTOL)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _missing_record(trial: RecheckTrial) -> TrialRecord:
    return TrialRecord(
        trial_id=f"{trial.source_trial}/seed{trial.seed}/{factor_label(trial.lr_factor)}",
        params=dict(trial.config),
        history=[],
        status="PENDING",
        end_reason=None,
        nan_events=[],
    )


# --------------------------------------------------------------------------- summary


def summarize(
    plan_records: Mapping[str, Sequence[tuple[RecheckTrial, TrialRecord]]],
    rules: StabilityRules | None = None,
    loss_tolerance: float = 0.05,
) -> RecheckSummary:
    """Per source config: loss over seeds, stability at every factor, and a recommendation.

    Only configs stable in every seed at their own LR are candidates. Among those whose
    mean loss is within ``loss_tolerance`` (relative) of the best mean, the most robust one
    (largest fraction of stable runs) wins; ties go to the lower mean loss.
    """
    if loss_tolerance < 0:
        raise ValueError(f"loss_tolerance must be >= 0, got {loss_tolerance}")
    rules = rules or StabilityRules()
    entries = [_entry(source, pairs, rules) for source, pairs in plan_records.items()]
    entries.sort(key=lambda e: math.inf if e.source_rank is None else e.source_rank)
    sweep_best = _sweep_best(entries, plan_records)
    if not entries:
        message = "No re-check runs: the sweep had no stable trial to re-check."
        return RecheckSummary([], None, None, loss_tolerance, message)
    best_mean = _mark_tolerance(entries, loss_tolerance)
    chosen = _choose(entries)
    if chosen is not None:
        chosen.recommended = True
    for entry in entries:
        entry.reason = entry_reason(entry, best_mean, loss_tolerance, chosen)
    message = headline(entries, chosen, sweep_best, best_mean, loss_tolerance)
    name = chosen.source_trial if chosen else None
    return RecheckSummary(entries, name, sweep_best, loss_tolerance, message, best_mean)


def _entry(
    source: str, pairs: Sequence[tuple[RecheckTrial, TrialRecord]], rules: StabilityRules
) -> RecheckEntry:
    outcomes: dict[float, FactorOutcome] = {}
    losses: list[float] = []
    runs_at_1x = early = 0
    for trial, record in pairs:
        v = verdict(record, rules)
        outcome = outcomes.setdefault(trial.lr_factor, FactorOutcome(trial.lr_factor, 0, 0))
        outcome.runs += 1
        outcome.stable += int(v.stable)
        early += int(v.stable and v.early_stopped)
        if not v.stable:
            outcome.failures[v.kind] += 1
        if is_one(trial.lr_factor):
            runs_at_1x += 1
            # v.final_loss is smoothed_final_loss(record, rules.smoothing_window).
            if v.stable and v.final_loss is not None:
                losses.append(v.final_loss)
    ranks = [t.source_rank for t, _ in pairs if t.source_rank is not None]
    factors = [outcomes[f] for f in sorted(outcomes)]
    return RecheckEntry(
        source_trial=source,
        source_rank=min(ranks) if ranks else None,
        mean_loss=statistics.fmean(losses) if losses else None,
        std_loss=statistics.stdev(losses) if len(losses) > 1 else None,
        seeds_at_1x=len(losses),
        runs_at_1x=runs_at_1x,
        stable_runs=sum(f.stable for f in factors),
        total_runs=sum(f.runs for f in factors),
        factors=factors,
        early_stopped=early,
    )


def _sweep_best(entries: Sequence[RecheckEntry], plan_records: Mapping[str, Any]) -> str | None:
    ranked = [e for e in entries if e.source_rank is not None]
    if ranked:
        # Rank 1 may be absent when the caller re-checked a subset; only call the lowest
        # rank "the sweep's best" when it really is rank 1.
        best = min(ranked, key=lambda e: e.source_rank or 0)
        return best.source_trial if best.source_rank == 1 else None
    return next(iter(plan_records), None)  # no ranks: plan order is leaderboard order


def _candidates(entries: Sequence[RecheckEntry]) -> list[RecheckEntry]:
    return [e for e in entries if e.reproducible and e.mean_loss is not None]


def _mark_tolerance(entries: Sequence[RecheckEntry], tolerance: float) -> float | None:
    candidates = _candidates(entries)
    if not candidates:
        return None
    best = min(e.mean_loss for e in candidates if e.mean_loss is not None)
    for entry in candidates:
        assert entry.mean_loss is not None
        entry.within_tolerance = entry.mean_loss <= best + tolerance * abs(best)
    return best


def _choose(entries: Sequence[RecheckEntry]) -> RecheckEntry | None:
    pool = [e for e in _candidates(entries) if e.within_tolerance]
    if not pool:
        return None
    return min(pool, key=lambda e: (-e.margin, e.mean_loss, _rank_key(e)))


def _rank_key(entry: RecheckEntry) -> float:
    return math.inf if entry.source_rank is None else entry.source_rank


__all__ = [
    "DEFAULT_LR_FACTORS",
    "FactorOutcome",
    "RecheckEntry",
    "RecheckSummary",
    "RecheckTrial",
    "explain_plan",
    "match_plan",
    "recheck_plan",
    "scaled_config",
    "source_config",
    "summarize",
]
