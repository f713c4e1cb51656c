"""Rank sweep trials (stable first, each compared at a common step) and pick the best stable one.

Ranking rule, fair to trials ASHA stopped and trials that finished: stable trials that ran their
whole schedule come first, compared on their final loss (eval when every one of them has an
end-of-run eval, else the smoothed training loss), all at the same last step; trials ASHA
stopped follow, deepest rung first, each rung's trials compared on the smoothed training loss
at the step they were stopped.  Every comparison is between losses from the same step and split;
a finished trial outranks a stopped one because ASHA compared them at the stopped trial's rung
and kept the other.  Ties (equal to 4 significant digits) go to the trial whose clip acted on
fewer steps.  "Plateaued" trials (stable, but learned far less than the best) follow the stable
ones; unstable trials come last, grouped by what went wrong.

The ranked rows as CSV, Markdown and a terminal table: leaderboard_table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tuning.analysis.stability import (
    KIND_PRIORITY,
    StabilityRules,
    Verdict,
    smoothed_loss_at,
    verdicts_for,
)
from tuning.analysis.trial_record import (
    TrialRecord,
    finite_or_none,
    swept_values,
)

# Knobs of the trainer's `phase2:` section, in the order the seed's examples list them.
PHASE2_KNOBS = (
    "learning_rate",
    "projector_lr",
    "lora_lr",
    "warmup_steps",
    "gradient_clip_val",
    "epochs",
    "batch_size",
    "seed",
    "gradient_accumulation_steps",
    "total_training_steps",
    "precision",
    "nan_policy",
    "projector_lr_mult",
    "lora_lr_mult",
    "weight_decay",
    # Also accepted by trainer/config.py's Phase2 (extra="forbid": nothing else may appear).
    "max_consecutive_nan",
    "divergence_factor",
    "adam_betas",
    "adam_eps",
)

# Unstable trials are listed closest-to-usable first: a still-running trial may turn out fine,
# a failed one tells us least about the knobs.
_UNSTABLE_ORDER = ("incomplete", "high_grad_norm", "diverged", "nan", "failed")
assert set(_UNSTABLE_ORDER) == set(KIND_PRIORITY)


@dataclass
class Row:
    """One leaderboard line: a trial's knobs, verdict and ranking metric."""

    rank: int
    trial_id: str
    stable: bool
    kind: str
    early_stopped: bool
    final_loss: float | None
    loss_source: str | None
    learning_rate: float | None
    projector_lr: float | None
    lora_lr: float | None
    projector_lr_mult: float | None
    lora_lr_mult: float | None
    warmup_steps: int | None
    gradient_clip_val: float | None
    grad_norm_pctl: float | None
    clip_fraction: float | None
    nan_events: int
    steps: int
    status: str
    end_reason: str | None
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    grad_norm_percentile: float = 90.0  # which percentile grad_norm_pctl is
    # What the row was ranked on: the loss, and "eval@60" / "train@30" (split @ step).
    rank_loss: float | None = None
    rank_measure: str | None = None
    # Every swept key's value (``phase2.`` dropped, dotted keys read from the trial's
    # config.resolved.yaml); the tables show those without a column of their own.
    swept: dict[str, Any] = field(default_factory=dict)

    @property
    def reason_text(self) -> str:
        """Why the trial is unstable, or the notes (e.g. early stop) of a stable one."""
        return "; ".join(self.reasons or self.notes)


def build_leaderboard(
    records: Sequence[TrialRecord],
    rules: StabilityRules | None = None,
    swept_keys: Sequence[str] | None = None,
) -> list[Row]:
    """Stable trials ranked on a common-step loss (module docstring), then plateaued ones, then
    the unstable ones grouped by what went wrong.

    ``swept_keys`` are the search space's keys (dotted ones such as ``model.lora.r`` too);
    without them, the phase2 knobs whose values differ between the trials are taken.
    """
    rules = rules or StabilityRules()
    keys = [k.removeprefix("phase2.") for k in swept_keys] if swept_keys is not None \
        else varied_knobs(records)
    swept = {record.trial_id: swept_values(record, keys) for record in records}
    verdicts = verdicts_for(records, rules)
    measures = rank_measures(records, verdicts, rules)
    pairs = [(record, verdicts[record.trial_id]) for record in records]
    pairs.sort(key=lambda pair: _sort_key(pair[0], pair[1], measures.get(pair[0].trial_id)))
    rows = [_make_row(rank, record, v) for rank, (record, v) in enumerate(pairs, start=1)]
    for row in rows:
        row.grad_norm_percentile = rules.grad_norm_percentile
        row.swept = swept[row.trial_id]
        if row.trial_id in measures:
            row.rank_loss, split, step = measures[row.trial_id]
            row.rank_measure = f"{split}@{step}"
    return rows


def varied_knobs(records: Sequence[TrialRecord]) -> list[str]:
    """The phase2 knobs whose values differ between ``records`` (sorted): the swept ones when
    the search space is not known."""
    seen: dict[str, set[str]] = {}
    for record in records:
        for key, value in record.params.items():
            seen.setdefault(key, set()).add(repr(value))  # repr: lists are not hashable
    return sorted(key for key, values in seen.items() if len(values) > 1
                  or any(key not in r.params for r in records))


def rank_measures(
    records: Sequence[TrialRecord], verdicts: dict[str, Verdict], rules: StabilityRules
) -> dict[str, tuple[float, str, int]]:
    """(loss, split, step) each stable trial is ranked on; see the module docstring."""
    stable = [r for r in records if verdicts[r.trial_id].stable]
    # Finished = not stopped early and at the deepest step: a trial ASHA stopped before it
    # wrote its summary has no planned step count to tell it is short, only its step.
    deepest = max((r.steps_done for r in stable), default=0)
    finished = [r for r in stable
                if not verdicts[r.trial_id].early_stopped and r.steps_done == deepest]
    # One split for all finished trials: eval only when each has an eval at its last step.
    use_eval = bool(finished) and all(_end_eval(r) is not None for r in finished)
    out: dict[str, tuple[float, str, int]] = {}
    for record in stable:
        step = record.steps_done
        if use_eval and record in finished:
            loss, split = _end_eval(record), "eval"
        else:
            loss, split = smoothed_loss_at(record, step, rules.smoothing_window), "train"
        if loss is not None:
            out[record.trial_id] = (loss, split, step)
    return out


def _end_eval(record: TrialRecord) -> float | None:
    steps, losses = record.series("eval_loss")
    return losses[-1] if steps and steps[-1] == record.steps_done else None


def ranking_note(rows: Sequence[Row]) -> str:
    """One line saying which measure ranked the stable trials (printed with every table)."""
    measures = sorted({row.rank_measure for row in rows if row.rank_measure},
                      key=lambda m: -int(m.rpartition("@")[2]))
    if not measures:
        return "Ranked: no stable trial to rank."
    deepest = int(measures[0].rpartition("@")[2])
    finished = [r.rank_measure for r in rows if r.rank_measure and not r.early_stopped
                and int(r.rank_measure.rpartition("@")[2]) == deepest]
    parts = []
    if finished:
        split, _, step = finished[0].partition("@")
        what = "final eval loss" if split == "eval" else "smoothed final training loss"
        parts.append(f"finished trials by {what} at step {step}")
    stopped = sorted({int(r.rank_measure.rpartition("@")[2]) for r in rows
                      if r.rank_measure and r.rank_measure not in finished}, reverse=True)
    if stopped:
        parts.append("then early-stopped trials, deepest first, by smoothed training loss at "
                     f"the step they were stopped ({', '.join(map(str, stopped))})")
    return ("Ranked: " + "; ".join(parts) + ". Every compared loss is from the same step and "
            "split; ties go to the smaller clip share.")


def _sort_key(record: TrialRecord, v: Verdict,
              measure: tuple[float, str, int] | None) -> tuple[Any, ...]:
    if v.stable:
        plateaued = int(v.kind == "plateaued")
        if measure is None:
            return (0, plateaued, 1, 0, math.inf, 1.0, record.trial_id)
        loss, _, step = measure
        clip = v.clip_fraction if v.clip_fraction is not None else 0.0
        # Deeper tiers first (finished = the whole schedule), then the loss at 4 significant
        # digits, so that losses that read the same in the table tie and the clip share decides.
        return (0, plateaued, int(v.early_stopped), -step, float(f"{loss:.4g}"), clip,
                record.trial_id)
    loss = v.final_loss if v.final_loss is not None else math.inf
    return (1, _UNSTABLE_ORDER.index(v.kind), 0, 0, loss, 0.0, record.trial_id)


def _make_row(rank: int, record: TrialRecord, v: Verdict) -> Row:
    params = record.params
    base = record.base_lr
    proj_mult, lora_mult = record.projector_lr_mult, record.lora_lr_mult
    return Row(
        rank=rank,
        trial_id=record.trial_id,
        stable=v.stable,
        kind=v.kind,
        early_stopped=v.early_stopped,
        final_loss=v.final_loss,
        loss_source=v.final_loss_source,
        learning_rate=base,
        projector_lr=_group_lr(params.get("projector_lr"), base, proj_mult),
        lora_lr=_group_lr(params.get("lora_lr"), base, lora_mult),
        projector_lr_mult=proj_mult,
        lora_lr_mult=lora_mult,
        warmup_steps=_int_or_none(params.get("warmup_steps")),
        gradient_clip_val=finite_or_none(params.get("gradient_clip_val")),
        grad_norm_pctl=v.grad_norm_pctl,
        clip_fraction=v.clip_fraction,
        nan_events=v.nan_count,
        steps=v.steps,
        status=record.status,
        end_reason=record.end_reason,
        reasons=list(v.reasons),
        notes=list(v.notes),
        params=dict(params),
    )


def _group_lr(explicit: Any, base: float | None, mult: float | None) -> float | None:
    value = finite_or_none(explicit)
    if value is not None:
        return value
    return base * mult if base is not None and mult is not None else None


def _int_or_none(value: Any) -> int | None:
    number = finite_or_none(value)
    return int(number) if number is not None else None


# --------------------------------------------------------------------------- best config


def best_stable_row(rows: Sequence[Row]) -> Row | None:
    """Top-ranked stable row, or None when no trial was stable."""
    # A plateaued trial is stable but never "the best": it learned far less than another.
    stable = [row for row in rows if row.stable and row.kind != "plateaued"]
    return min(stable, key=lambda row: row.rank) if stable else None


def best_stable_record(records: Sequence[TrialRecord], rows: Sequence[Row]) -> TrialRecord | None:
    """The record behind best_stable_row, for write_best_stable_yaml and plot_lr_schedule."""
    row = best_stable_row(rows)
    if row is None:
        return None
    return next((record for record in records if record.trial_id == row.trial_id), None)


__all__ = [
    "PHASE2_KNOBS",
    "Row",
    "best_stable_record",
    "best_stable_row",
    "build_leaderboard",
    "rank_measures",
    "ranking_note",
    "varied_knobs",
]
