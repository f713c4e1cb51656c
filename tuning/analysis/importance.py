"""Which swept knobs explain a sweep's final loss and its stability (fANOVA importance).

The trials are replayed into an in-memory Optuna study (``optuna.trial.create_trial``) with
one distribution per swept key, built from the values the trials actually ran, and Optuna's
``FanovaImportanceEvaluator`` (a random forest, then the share of the target's variance each
knob explains) ranks the knobs.  Two targets: the smoothed final loss (trials with a finite
one) and stability (1 = stable verdict, 0 = any other).  No Ray, no MLflow: the report runs
on copied run directories.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainer.fsutil import atomic_write_bytes, atomic_write_text
from tuning.analysis.stability import Verdict
from tuning.analysis.trial_record import TrialRecord, finite_or_none, swept_values

# Below this many trials a random forest over the knobs explains noise, not the sweep.
MIN_TRIALS = 4
# A positive numeric knob spanning more than this ratio is treated on a log scale (an LR).
LOG_SPAN = 10.0
TARGETS = ("final_loss", "stability")
TARGET_LABELS = {"final_loss": "final loss", "stability": "stability (stable = 1)"}


@dataclass
class Importance:
    """Per-target knob importances (each sums to 1) or the one line saying why there are none."""

    importances: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why not computed
    trials: dict[str, int] = field(default_factory=dict)  # target -> trials it used

    def as_json(self) -> dict[str, Any]:
        return {target: {"trials": self.trials.get(target, 0),
                         "importances": self.importances.get(target),
                         "skipped": self.skipped.get(target)} for target in TARGETS}


def compute_importance(records: Sequence[TrialRecord], verdicts: Mapping[str, Verdict],
                       keys: Sequence[str] | None = None, seed: int = 0) -> Importance:
    """fANOVA importance of the swept ``keys`` (default: the phase2 params that vary) for
    the final loss and for stability."""
    if keys is None:
        keys = sorted({k for r in records for k in r.params})
    values = {r.trial_id: swept_values(r, keys) for r in records}
    distributions = _distributions(values.values(), keys)
    # fANOVA needs every knob on every trial: one that never got its config is left out.
    complete = [tid for tid, v in values.items() if tid in verdicts
                and all(k in v for k in distributions)]
    result = Importance()
    losses = {tid: verdicts[tid].final_loss for tid in complete
              if finite_or_none(verdicts[tid].final_loss) is not None}
    stable = {tid: float(verdicts[tid].stable) for tid in complete}
    for target, y in (("final_loss", losses), ("stability", stable)):
        result.trials[target] = len(y)
        why = _why_not(y, distributions)
        if why:
            result.skipped[target] = why
            continue
        try:
            result.importances[target] = _fanova(values, y, distributions, seed)
        except (ValueError, RuntimeError) as e:  # the rest of the report must still be written
            result.skipped[target] = f"fANOVA failed: {e}"
    return result


def _why_not(y: Mapping[str, float], distributions: Mapping[str, Any]) -> str | None:
    if len(y) < MIN_TRIALS:
        return f"{len(y)} trial(s) with this target; importance needs at least {MIN_TRIALS}"
    if len(distributions) < 2:
        return (f"{len(distributions)} swept knob(s) varied; importance ranks two or more "
                "(the sweep's plots show a single knob directly)")
    if len(set(y.values())) < 2:
        return "every trial has the same value; there is nothing for the knobs to explain"
    return None


def _distributions(rows: Any, keys: Sequence[str]) -> dict[str, Any]:
    """One Optuna distribution per key that takes two or more values across the trials."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    rows = list(rows)
    out: dict[str, Any] = {}
    for key in keys:
        seen = [_hashable(row[key]) for row in rows if key in row]
        unique = list(dict.fromkeys(seen))
        if len(unique) < 2:
            continue  # a constant explains nothing
        numbers = [finite_or_none(v) for v in unique]
        if all(n is not None for n in numbers):
            lo, hi = min(numbers), max(numbers)
            log = lo > 0 and hi / lo > LOG_SPAN
            if all(isinstance(v, int) for v in unique):
                out[key] = IntDistribution(int(lo), int(hi), log=log)
            else:
                out[key] = FloatDistribution(lo, hi, log=log)
        else:  # e.g. gradient_clip_val: null / 1.0 / 5.0 - null is a category of its own
            out[key] = CategoricalDistribution(unique)
    return out


def _hashable(value: Any) -> Any:
    """A scalar as it is; a list or mapping (``target_modules: [q_proj, v_proj]``) as its
    canonical JSON text, so that equal values are one category."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _fanova(values: Mapping[str, Mapping[str, Any]], y: Mapping[str, float],
            distributions: Mapping[str, Any], seed: int) -> dict[str, float]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    study = optuna.create_study(direction="minimize")
    for tid, target in y.items():
        params = {k: _as_choice(v, distributions[k]) for k, v in values[tid].items()
                  if k in distributions}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: distributions[k] for k in params}, value=target))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {k: float(v) for k, v in found.items()}


def _as_choice(value: Any, distribution: Any) -> Any:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return _hashable(value)
    return float(value) if isinstance(distribution, optuna.distributions.FloatDistribution) \
        else int(value)


def format_importance(result: Importance) -> str:
    """A short text table per target (most important knob first), or the reason it is absent."""
    lines = []
    for target in TARGETS:
        label = TARGET_LABELS[target]
        if target in result.skipped:
            lines.append(f"{label}: not computed ({result.skipped[target]})")
            continue
        ranked = result.importances.get(target, {})
        lines.append(f"{label} ({result.trials[target]} trials):")
        lines += [f"  {key:<28} {share:6.1%}  {'#' * round(share * 30)}"
                  for key, share in ranked.items()]
    return "\n".join(lines)


def write_importance_json(result: Importance, path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(result.as_json(), indent=2) + "\n")


def plot_importance(result: Importance, path: str | Path) -> Path:
    """Horizontal bars per target; a target that was not computed says why in its panel."""
    fig = Figure(figsize=(10, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(TARGETS))
    for ax, target in zip(axes, TARGETS, strict=True):
        ranked = result.importances.get(target)
        ax.set_title(f"{TARGET_LABELS[target]} ({result.trials.get(target, 0)} trials)")
        if not ranked:
            ax.text(0.5, 0.5, _wrap(result.skipped.get(target, "not computed")),
                    transform=ax.transAxes, ha="center", va="center", fontsize=9, color="grey")
            ax.set_axis_off()
            continue
        keys = list(ranked)[::-1]  # most important on top
        ax.barh(keys, [ranked[k] for k in keys], color="#1f77b4")
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of variance explained (fANOVA)")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("Parameter importance")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write_bytes(path, buffer.getvalue())


def _wrap(text: str, width: int = 40) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


__all__ = [
    "MIN_TRIALS",
    "Importance",
    "compute_importance",
    "format_importance",
    "plot_importance",
    "write_importance_json",
]
