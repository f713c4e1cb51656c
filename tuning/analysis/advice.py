"""Next-sweep advice in the seed's terms, each item backed by the trials that show it.

The seed's playbook (../shared/seed/phase2-differential-lr.md):
  * NaN loss          -> lower the base LR (1e-4 -> 5e-5) and add gradient_clip_val 0.5;
  * slow convergence  -> raise the base LR (1e-4 -> 2e-4) and shorten warmup (500 -> 100);
  * grad norm > 10    -> outside the normal 0.1-10 range; clip (needed above 100).
Advice is only emitted when the sweep itself contains the evidence, and cites those trials.
How often clipping acted is evidence too (never a reason to call a trial unstable): where a
clip acts on most steps the update is set by the clip, so the learning rate matters less.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuning.analysis.stability import (
    StabilityRules,
    Verdict,
    fmt_num,
    index_verdicts,
    percentile_or_none,
)
from tuning.analysis.trial_record import TrialRecord, finite_or_none

# The seed's remedies, verbatim.
SEED_NAN_CLIP_VAL = 0.5
SEED_SHORT_WARMUP = 100
SEED_LR_RAISE_FACTOR = 2.0  # 1e-4 -> 2e-4
SEED_LR_LOWER_FACTOR = 0.5  # 1e-4 -> 5e-5

# Slow-convergence test: share of the run treated as "the end", how steep counts as steep
# (relative loss drop across that tail), and how many of the best trials to look at.
TAIL_FRACTION = 0.2
STEEP_RELATIVE_DROP = 0.05
TOP_K = 3
MIN_TAIL_POINTS = 5

_UNSTABLE_LR_KINDS = ("nan", "diverged")
# "The clip acted on most steps": from here on the advice says the LR mattered less.
MOSTLY_CLIPPED = 0.5


@dataclass
class Advice:
    """One recommendation for the next sweep."""

    kind: str  # "lower_lr" | "slow_convergence" | "add_clipping" | "clip_share"
    text: str
    trial_ids: list[str]
    # Phase2 knob values to try next (keys as in the trainer's phase2 section).
    suggested: dict[str, Any] = field(default_factory=dict)


def advise(
    records: Sequence[TrialRecord],
    verdicts: Mapping[str, Verdict] | Sequence[Verdict],
    rules: StabilityRules | None = None,
) -> list[Advice]:
    """Evidence-backed advice; ``verdicts`` keyed by trial id or parallel to ``records``."""
    rules = rules or StabilityRules()
    by_id = index_verdicts(records, verdicts)
    ceiling = _lr_ceiling(records, by_id)
    candidates = [
        _lower_lr_advice(records, by_id, ceiling),
        _slow_convergence_advice(records, by_id, ceiling),
        _clipping_advice(records, by_id, rules),
        _clip_share_advice(records, by_id),
    ]
    return [item for item in candidates if item is not None]


# --------------------------------------------------------------------------- base LR too high


@dataclass
class _Ceiling:
    """Lowest base LR that went NaN/diverged, with the trials on either side of it."""

    lr: float
    unstable: list[TrialRecord]
    stable_below: list[TrialRecord]
    stable_at_or_above: list[TrialRecord]


def _lr_ceiling(records: Sequence[TrialRecord], by_id: Mapping[str, Verdict]) -> _Ceiling | None:
    with_lr = [r for r in records if r.base_lr is not None]
    unstable = [r for r in with_lr if by_id[r.trial_id].kind in _UNSTABLE_LR_KINDS]
    if not unstable:
        return None
    lowest = min(_lr(r) for r in unstable)
    stable = [r for r in with_lr if by_id[r.trial_id].stable]
    return _Ceiling(
        lr=lowest,
        unstable=sorted(unstable, key=_lr),
        stable_below=sorted((r for r in stable if _lr(r) < lowest), key=_lr),
        stable_at_or_above=[r for r in stable if _lr(r) >= lowest],
    )


def _lr(record: TrialRecord) -> float:
    lr = record.base_lr
    assert lr is not None  # callers filter on base_lr first
    return lr


def _lower_lr_advice(
    records: Sequence[TrialRecord], by_id: Mapping[str, Verdict], ceiling: _Ceiling | None
) -> Advice | None:
    if ceiling is None:
        return None
    clip_note = _clip_note(ceiling.unstable)
    if not ceiling.stable_below:
        if any(v.stable for v in by_id.values()):
            return None  # stable trials exist only above the failures: LR is not the lever
        target = ceiling.lr * SEED_LR_LOWER_FACTOR
        text = (
            f"No trial was stable; {len(ceiling.unstable)} went NaN/diverged at base "
            f"learning_rate {fmt_num(ceiling.lr)} and up. Per the seed, lower learning_rate "
            f"to {fmt_num(target)}{clip_note}."
        )
        return Advice("lower_lr", text, _ids(ceiling.unstable), _lower_suggestion(target))
    # Evidence that LR is the cause: at or above the threshold, most trials broke.
    above = len(ceiling.unstable) + len(ceiling.stable_at_or_above)
    if len(ceiling.unstable) / above < 0.5:
        return None
    target = max(_lr(r) for r in ceiling.stable_below)
    exceptions = (
        f" ({len(ceiling.stable_at_or_above)} stable trial(s) at or above it too: "
        "multipliers/seed matter, but the trend is clear)"
        if ceiling.stable_at_or_above
        else ""
    )
    text = (
        f"Trials with base learning_rate >= {fmt_num(ceiling.lr)} went NaN/diverged "
        f"({', '.join(_ids(ceiling.unstable))}) while {len(ceiling.stable_below)} below stayed "
        f"stable ({', '.join(_ids(ceiling.stable_below))}){exceptions}. Keep learning_rate below "
        f"{fmt_num(ceiling.lr)}: {fmt_num(target)} is the highest stable value tried"
        f"{clip_note}."
    )
    if not _already_clipped(ceiling.unstable):
        text += _over_clip_caveat(ceiling.stable_below)
    cited = _ids(ceiling.unstable) + _ids(ceiling.stable_below)
    return Advice("lower_lr", text, cited, _lower_suggestion(target))


def _already_clipped(unstable: Sequence[TrialRecord]) -> bool:
    clips = [finite_or_none(r.params.get("gradient_clip_val")) for r in unstable]
    return all(c is not None and c <= SEED_NAN_CLIP_VAL for c in clips)


def _clip_note(unstable: Sequence[TrialRecord]) -> str:
    if _already_clipped(unstable):
        return f" (they already clipped at <= {SEED_NAN_CLIP_VAL:g}, so the LR is the lever)"
    return f", and add gradient_clip_val: {SEED_NAN_CLIP_VAL:g} as the seed advises for NaN loss"


def _over_clip_caveat(stable: Sequence[TrialRecord]) -> str:
    # Clipping only changes steps whose norm exceeds the clip value; if the stable runs'
    # typical norm is above 0.5, the seed's value clips most steps: still stable, but the
    # step is then set by the clip rather than by the LR, which the reader should expect.
    norms = [n for r in stable for n in r.series("grad_norm")[1]]
    if not norms:
        return ""
    median = float(np.median(norms))
    if median <= SEED_NAN_CLIP_VAL:
        return ""
    return (
        f" Note: the stable trials' median grad norm is {fmt_num(median)}, so a clip of "
        f"{SEED_NAN_CLIP_VAL:g} would act on most steps; the step size is then the clip's and "
        "the learning rate matters less (the leaderboard's clipped column shows how often)."
    )


def _lower_suggestion(lr: float) -> dict[str, Any]:
    return {"learning_rate": lr, "gradient_clip_val": SEED_NAN_CLIP_VAL}


# --------------------------------------------------------------------------- slow convergence


def tail_relative_drop(record: TrialRecord, tail_fraction: float = TAIL_FRACTION) -> float | None:
    """Relative loss decrease across the last ``tail_fraction`` of logged steps.

    A least-squares line through the tail's training losses, its drop over the tail divided by
    the tail's mean loss: 0.10 means "still losing 10% of the loss in the last fifth of the
    run", although cosine decay has already brought the LR close to zero.  None when the
    tail has too few points to fit a line.
    """
    steps, losses = record.series("loss")
    count = max(MIN_TAIL_POINTS, math.ceil(len(losses) * tail_fraction))
    if len(losses) < 2 * MIN_TAIL_POINTS or count >= len(losses):
        return None
    x = np.asarray(steps[-count:], dtype=float)
    y = np.asarray(losses[-count:], dtype=float)
    mean = float(y.mean())
    if mean <= 0 or x[-1] == x[0]:
        return None
    slope = float(np.polyfit(x, y, 1)[0])
    return -slope * float(x[-1] - x[0]) / mean


def _slow_convergence_advice(
    records: Sequence[TrialRecord], by_id: Mapping[str, Verdict], ceiling: _Ceiling | None
) -> Advice | None:
    top = _best_completed(records, by_id)
    if not top:
        return None
    drops = {r.trial_id: tail_relative_drop(r) for r in top}
    steep = [r for r in top if (drops[r.trial_id] or 0.0) > STEEP_RELATIVE_DROP]
    # The best trial itself must still be falling: otherwise the winner has converged and a
    # steep runner-up only says that it was behind.
    if not steep or steep[0] is not top[0]:
        return None
    best = top[0]
    suggested, actions = _speedup_actions(best, ceiling)
    if not actions:
        return None
    evidence = ", ".join(f"{r.trial_id} {drops[r.trial_id]:.0%}" for r in steep)
    text = (
        f"The best stable trials were still improving steeply at the end (loss drop over the "
        f"last {TAIL_FRACTION:.0%} of steps: {evidence}); per the seed for slow convergence, "
        + "; ".join(actions)
        + "."
    )
    return Advice("slow_convergence", text, _ids(steep), suggested)


def _best_completed(
    records: Sequence[TrialRecord], by_id: Mapping[str, Verdict]
) -> list[TrialRecord]:
    # Early-stopped trials are excluded: their "end" is where ASHA cut them, not convergence.
    done = [
        r
        for r in records
        if by_id[r.trial_id].stable
        and not by_id[r.trial_id].early_stopped
        and by_id[r.trial_id].final_loss is not None
    ]
    done.sort(key=lambda r: (by_id[r.trial_id].final_loss, r.trial_id))
    return done[:TOP_K]


def _speedup_actions(
    best: TrialRecord, ceiling: _Ceiling | None
) -> tuple[dict[str, Any], list[str]]:
    suggested: dict[str, Any] = {}
    actions: list[str] = []
    lr = best.base_lr
    if lr is not None:
        target = lr * SEED_LR_RAISE_FACTOR
        if ceiling is None or target < ceiling.lr:
            suggested["learning_rate"] = target
            actions.append(f"raise learning_rate from {fmt_num(lr)} to {fmt_num(target)}")
        else:
            # A higher LR already failed in this sweep; do not recommend walking into it.
            actions.append(
                f"do not raise learning_rate ({fmt_num(target)} would reach the "
                f"{fmt_num(ceiling.lr)} where trials went NaN/diverged)"
            )
    warmup = finite_or_none(best.params.get("warmup_steps"))
    if warmup is not None and warmup > SEED_SHORT_WARMUP:
        suggested["warmup_steps"] = SEED_SHORT_WARMUP
        actions.append(f"shorten warmup_steps from {int(warmup)} to {SEED_SHORT_WARMUP}")
    return suggested, actions if suggested else []


# --------------------------------------------------------------------------- clipping


def _clipping_advice(
    records: Sequence[TrialRecord], by_id: Mapping[str, Verdict], rules: StabilityRules
) -> Advice | None:
    hot: list[tuple[TrialRecord, float]] = []
    for record in records:
        if not by_id[record.trial_id].stable or record.params.get("gradient_clip_val"):
            continue
        pctl = percentile_or_none(record.series("grad_norm")[1], rules.grad_norm_percentile)
        if pctl is not None and pctl > rules.grad_norm_normal_max:
            hot.append((record, pctl))
    if not hot:
        return None
    # Clip at the trials' typical high percentile: caps the tail without clipping most steps
    # (the seed's 0.5 is its NaN remedy; on these norms it would clip nearly every step, so
    # the clip rather than the LR would set every update).
    value = _two_sig(max(float(np.median([p for _, p in hot])), rules.grad_norm_normal_max))
    p = f"p{rules.grad_norm_percentile:g}"
    evidence = ", ".join(f"{r.trial_id} {p} {fmt_num(v)}" for r, v in hot)
    text = (
        f"Stable trials without gradient clipping ran above the seed's normal grad-norm range "
        f"0.1-{rules.grad_norm_normal_max:g} ({evidence}); add gradient_clip_val around "
        f"{value:g} so spikes are capped while ordinary steps stay unclipped."
    )
    return Advice("add_clipping", text, [r.trial_id for r, _ in hot], {"gradient_clip_val": value})


def _clip_share_advice(
    records: Sequence[TrialRecord], by_id: Mapping[str, Verdict]
) -> Advice | None:
    """Stable trials whose clip acted on most steps, grouped by clip value, with the loss
    spread across their learning rates as the evidence that the LR mattered less there."""
    groups: dict[float, list[TrialRecord]] = {}
    for record in records:
        v = by_id[record.trial_id]
        clip = finite_or_none(record.params.get("gradient_clip_val"))
        if v.stable and clip and v.clip_fraction is not None and v.clip_fraction >= MOSTLY_CLIPPED:
            groups.setdefault(clip, []).append(record)
    if not groups:
        return None
    parts, cited = [], []
    for clip, members in sorted(groups.items()):
        shares = [by_id[r.trial_id].clip_fraction or 0.0 for r in members]
        share = f"{min(shares):.0%}" if min(shares) == max(shares) else (
            f"{min(shares):.0%}-{max(shares):.0%}")
        part = f"gradient_clip_val {clip:g} acted on {share} of steps ({', '.join(_ids(members))})"
        lrs = sorted({r.base_lr for r in members if r.base_lr is not None})
        losses = [by_id[r.trial_id].final_loss for r in members]
        known = [x for x in losses if x is not None]
        if len(lrs) > 1 and known:
            part += (f", learning_rate {fmt_num(lrs[0])}-{fmt_num(lrs[-1])} giving final loss "
                     f"{fmt_num(min(known))}-{fmt_num(max(known))}")
        parts.append(part)
        cited += _ids(members)
    text = (
        "; ".join(parts) + ". There the clip, not the learning rate, set most updates, so the "
        "LR mattered less; these trials are stable (clipping is the seed's remedy), and the "
        "leaderboard prefers the smaller clip share only between equal losses."
    )
    return Advice("clip_share", text, cited)


def _two_sig(value: float) -> float:
    return float(f"{value:.2g}")


def _ids(records: Sequence[TrialRecord]) -> list[str]:
    return [r.trial_id for r in records]


__all__ = ["Advice", "advise", "tail_relative_drop"]
