"""The robustness re-check in words: what ``tuning.analysis.recheck``'s summary says.

Its one job: turn a re-check's results into the words and labels a reader sees: an LR
factor as ``x1.5``, a mean loss to four digits, each config's reason and the summary's
headline, which say *why* one config was recommended over another in the terms of the
summary's own fields (``RecheckEntry``). ``tuning.analysis.recheck`` decides and calls
these; ``tuning.analysis.recheck_report`` lays them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tuning.analysis.stability import fmt_num

if TYPE_CHECKING:  # recheck imports this module: its types only, for the annotations
    from tuning.analysis.recheck import FactorOutcome, RecheckEntry

# How a verdict kind reads in "x1.5 went NaN in 2/3 seeds".
_KIND_WORDS = {
    "nan": "went NaN",
    "diverged": "diverged",
    "high_grad_norm": "had exploding gradients",
    "failed": "failed",
    "incomplete": "did not finish",
}


def factor_label(factor: float) -> str:
    """An LR factor as the report writes it: ``x1.5``."""
    return f"x{factor:g}"


def is_one(factor: float) -> bool:
    """Whether an LR factor is x1: the config's own learning rate."""
    return math.isclose(factor, 1.0, rel_tol=1e-9)


def _failure_text(outcome: FactorOutcome) -> str:
    """E.g. "x1.5 went NaN in 2/3 seeds and diverged in 1/3"."""
    parts = [
        f"{_KIND_WORDS.get(kind, kind)} in {n}/{outcome.runs}"
        for kind, n in outcome.failures.most_common()
    ]
    return f"{factor_label(outcome.factor)} {' and '.join(parts)} seeds"


def _breaks(entry: RecheckEntry, neighbours_only: bool = False) -> str:
    # Nearest-to-x1 first: the closest cliff is the one that matters.
    broken = sorted((f for f in entry.factors if f.broke), key=lambda f: abs(math.log(f.factor)))
    if neighbours_only:
        broken = [f for f in broken if not is_one(f.factor)]
    return "; ".join(_failure_text(f) for f in broken)


def loss_label(value: float | None) -> str:
    """A mean loss to four digits, ``-`` for none."""
    # Four digits like the leaderboard: configs 1% apart must not print the same number.
    return "-" if value is None else f"{value:.4g}"


def _loss_text(entry: RecheckEntry) -> str:
    if entry.mean_loss is None:
        return "no loss at x1"
    spread = "" if entry.std_loss is None else f" ± {fmt_num(entry.std_loss)}"
    return f"mean loss {loss_label(entry.mean_loss)}{spread} over {entry.seeds_at_1x} seeds at x1"


def _facts(entry: RecheckEntry) -> str:
    span = ", ".join(factor_label(f.factor) for f in entry.factors)
    text = f"stable in {entry.stable_runs}/{entry.total_runs} runs ({span}); {_loss_text(entry)}"
    if entry.early_stopped:
        text += f"; {entry.early_stopped} runs early-stopped (re-check with a fifo scheduler)"
    return text


def entry_reason(
    entry: RecheckEntry, best: float | None, tol: float, chosen: RecheckEntry | None
) -> str:
    """Why ``entry`` got its status, with its facts (stable runs, loss) and its cliffs."""
    breaks = _breaks(entry)
    if not entry.reproducible:
        unstable = entry.runs_at_1x - entry.seeds_at_1x
        why = (
            f"unstable at its own LR in {unstable}/{entry.runs_at_1x} seeds"
            if entry.runs_at_1x
            else f"no runs at {factor_label(1.0)}"
        )
        return f"not reproducible: {why}" + (f" ({breaks})" if breaks else "")
    if entry.recommended:
        lead = "recommended: most robust within tolerance"
    elif not entry.within_tolerance:
        lead = _outside_text(entry, best, tol)
    elif chosen is not None and entry.margin < chosen.margin:
        lead = f"sits next to a cliff: {breaks}" if breaks else "less robust"
    else:
        other = chosen.source_trial if chosen else "?"
        lead = f"as robust, but its mean loss is higher than trial {other}'s"
    return f"{lead}; {_facts(entry)}" + (f"; {breaks}" if breaks and "cliff" not in lead else "")


def _outside_text(entry: RecheckEntry, best: float | None, tol: float) -> str:
    if entry.mean_loss is None or not best:
        return "outside tolerance"
    above = (entry.mean_loss - best) / abs(best)
    return (
        f"mean loss {loss_label(entry.mean_loss)} is {above:.1%} above the best mean "
        f"{loss_label(best)} (tolerance {tol:.0%})"
    )


def headline(
    entries: Sequence[RecheckEntry],
    chosen: RecheckEntry | None,
    sweep_best: str | None,
    best: float | None,
    tol: float,
) -> str:
    """The summary's headline: the recommendation and why it holds or overturns the sweep's."""
    if chosen is None:
        return (
            f"No recommendation: none of the {len(entries)} re-checked configs was stable "
            "in every seed at its own learning rate. Lower the learning rate or add "
            "clipping, and re-check."
        )
    name = chosen.source_trial
    if sweep_best == name:
        caveat = _breaks(chosen)
        if caveat:
            return (
                f"Trial {name}, the sweep's best, stays the pick with a caveat: {caveat}; "
                f"no config within {tol:.0%} of the best mean loss was more robust. "
                f"Trial {name}: {_facts(chosen)}."
            )
        return f"Trial {name}, the sweep's best, holds up: {_facts(chosen)}."
    if sweep_best is None:
        return (
            f"Recommending trial {name} (the sweep's best trial was not re-checked): "
            f"{_facts(chosen)}."
        )
    best_entry = next(e for e in entries if e.source_trial == sweep_best)
    return (
        f"Recommending trial {name} instead of the sweep's best trial {sweep_best}: "
        f"{_why_not(best_entry, chosen, best, tol)}. Trial {name}: {_facts(chosen)}, "
        f"within {tol:.0%} of the best mean loss {loss_label(best)}."
    )


def _why_not(entry: RecheckEntry, chosen: RecheckEntry, best: float | None, tol: float) -> str:
    """Why the sweep's best trial lost, in the terms a reader would check first."""
    name = f"trial {entry.source_trial}"
    if not entry.reproducible:
        return f"{name} is {entry.reason}"
    if not entry.within_tolerance:
        return (
            f"{name}'s sweep loss looks like seed luck: over "
            f"{entry.seeds_at_1x} seeds its {_outside_text(entry, best, tol)}"
        )
    if entry.margin < chosen.margin:
        cliff = _breaks(entry, neighbours_only=True) or _breaks(entry)
        return (
            f"{name} sits next to a cliff: {cliff} (stable in "
            f"{entry.stable_runs}/{entry.total_runs} re-check runs vs "
            f"{chosen.stable_runs}/{chosen.total_runs})"
        )
    return (
        f"{name} is as robust ({entry.stable_runs}/{entry.total_runs} stable) but its "
        f"mean loss over seeds is higher ({loss_label(entry.mean_loss)} vs "
        f"{loss_label(chosen.mean_loss)})"
    )
