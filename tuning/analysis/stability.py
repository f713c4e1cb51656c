"""Is a trial's training stable?  Rules from the Phase 2 seed, applied to one TrialRecord.

Seed thresholds (../shared/seed/phase2-differential-lr.md): gradient norm 0.1-10 is normal and
above 100 calls for clipping; a NaN loss means the base LR is too high; the loss curve should
fall smoothly.  Unstable is therefore: NaN/inf events, divergence (a smoothed loss spike, or
ending above the start), a pre-clip gradient norm persistently above 100, or a failed/stalled
run.  The verdict names the first failing rule by severity (``kind``) but lists every failing
rule in ``reasons`` so a user sees the whole picture.

Clipping is the seed's remedy, not a symptom: how often it acted (``clip_fraction``) is reported
on every verdict and may break ties in the ranking, but never makes a trial unstable.

"Plateaued" compares a trial with the rest of its sweep (``verdicts_for``): a stable trial whose
loss fell by less than ``plateau_fraction`` of what the best stable trial's fell is shown as
plateaued, with both numbers, so a finite but useless setting is not mistaken for a good one.
It stays in the stable set (nothing unstable was observed); docs/stability.md gives the evidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tuning.analysis.trial_record import TrialRecord, finite_or_none

# Most severe first: the verdict's kind is the first of these that has a reason.
KIND_PRIORITY = ("failed", "nan", "diverged", "high_grad_norm", "incomplete")
# Kinds of a stable verdict: "plateaued" is stable but learned far less than the sweep's best.
STABLE_KINDS = ("stable", "plateaued")
KINDS = (*STABLE_KINDS, *KIND_PRIORITY)

# Trainer end reasons that say the run itself broke, whatever the metrics look like.
_NAN_END_REASONS = ("nan_stop", "nan_abort")
_FAILED_END_REASONS = ("error", "stalled")
_UNFINISHED_STATUSES = ("RUNNING", "PENDING")


class StabilityRules(BaseModel):
    """Thresholds that decide whether a trial counts as stable (defaults follow the seed)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_nan_events: int = Field(default=0, ge=0)
    """NaN/inf events tolerated before a trial is unstable; the seed treats any NaN loss as a
    sign the base LR is too high, hence 0."""

    loss_spike_factor: float = Field(default=3.0, gt=1.0)
    """Diverged when the smoothed loss anywhere after the start exceeds this multiple of the
    smoothed starting loss."""

    final_above_start: bool = True
    """Diverged when the smoothed final training loss ends above the smoothed starting loss
    (the seed: the loss curve should fall smoothly)."""

    grad_norm_percentile: float = Field(default=90.0, gt=0.0, le=100.0)
    """Percentile of the global (pre-clipping) gradient norm that is compared with the limit;
    a high percentile ignores isolated spikes but catches persistently large norms."""

    grad_norm_limit: float = Field(default=100.0, gt=0.0)
    """Unstable ("high gradient norm") when that percentile exceeds this; the seed says above
    100 needs gradient clipping."""

    grad_norm_normal_max: float = Field(default=10.0, gt=0.0)
    """Top of the seed's normal gradient-norm range (0.1-10).  Not a verdict rule: advice uses
    it to recommend clipping for stable trials that run hot without it."""

    plateau_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    """Shown as "plateaued" when a stable trial's smoothed loss fell by less than this share of
    the drop of the sweep's best stable trial at the same step (0 = never).  Not in the seed:
    it marks "finite but did not learn" (an issue-20 run: 12 -> 6.8 next to 12 -> 0.21)."""

    smoothing_window: int = Field(default=10, ge=1)
    """Steps in the trailing simple moving average used for start/final/spike losses.  A plain
    mean rather than an EMA: an EMA is biased towards its very first value (one noisy step
    would set the "start"), while a mean over N steps has an exact, explainable extent."""


@dataclass
class Verdict:
    """Outcome of the stability rules for one trial."""

    stable: bool
    reasons: list[str]
    kind: str
    early_stopped: bool = False
    # Informational notes that do not make a trial unstable (e.g. "early-stopped at step 40").
    notes: list[str] = field(default_factory=list)
    final_loss: float | None = None
    final_loss_source: str | None = None  # "eval" or "train"
    grad_norm_pctl: float | None = None
    # Share of logged steps on which gradient clipping acted (None: no clip flags logged).
    clip_fraction: float | None = None
    nan_count: int = 0
    steps: int = 0
    # Smoothed training loss at the start and its relative drop by the last step
    # ((start - end) / start); plateau_fraction compares the drop with the sweep's best.
    start_loss: float | None = None
    loss_drop: float | None = None


@dataclass
class _Findings:
    """Reasons grouped by the kind they would give the trial."""

    by_kind: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, reason: str) -> None:
        self.by_kind.setdefault(kind, []).append(reason)

    def kind(self) -> str:
        return next((k for k in KIND_PRIORITY if k in self.by_kind), "stable")

    def reasons(self) -> list[str]:
        return [r for k in KIND_PRIORITY for r in self.by_kind.get(k, [])]


def verdict(record: TrialRecord, rules: StabilityRules | None = None) -> Verdict:
    """Apply every stability rule to ``record``; see the module docstring for the ordering."""
    rules = rules or StabilityRules()
    findings = _Findings()
    _check_outcome(record, findings)
    nan_count = _check_nans(record, rules, findings)
    start, drop = _check_loss(record, rules, findings)
    pctl = _check_grad_norm(record, rules, findings)
    clip_fraction = clip_share(record)
    early_stopped, notes = _check_completion(record, findings)
    final_loss, source = final_loss_with_source(record, rules.smoothing_window)
    kind = findings.kind()
    return Verdict(
        stable=kind == "stable",
        reasons=findings.reasons(),
        kind=kind,
        early_stopped=early_stopped,
        notes=notes,
        final_loss=final_loss,
        final_loss_source=source,
        grad_norm_pctl=pctl,
        clip_fraction=clip_fraction,
        nan_count=nan_count,
        steps=record.steps_done,
        start_loss=start,
        loss_drop=drop,
    )


def verdicts_for(
    records: Sequence[TrialRecord], rules: StabilityRules | None = None
) -> dict[str, Verdict]:
    """Verdicts keyed by trial id, in the records' order, with "plateaued" marked (it needs
    the whole sweep: a trial has plateaued relative to what the best one learned)."""
    rules = rules or StabilityRules()
    verdicts = {record.trial_id: verdict(record, rules) for record in records}
    mark_plateaued(records, verdicts, rules)
    return verdicts


def mark_plateaued(
    records: Sequence[TrialRecord], verdicts: Mapping[str, Verdict], rules: StabilityRules
) -> None:
    """Turn stable verdicts into "plateaued" where the trial learned too little.

    A trial's relative loss drop by its last step is compared with the largest drop any stable
    trial had reached by that same step, so an ASHA-stopped trial is judged against the others'
    losses at the step it was stopped, not against their finished runs.
    """
    if rules.plateau_fraction <= 0:
        return
    stable = [r for r in records if verdicts[r.trial_id].stable]
    curves = {r.trial_id: _smoothed_curve(r, rules.smoothing_window) for r in stable}
    for record in stable:
        v = verdicts[record.trial_id]
        if v.loss_drop is None:
            continue
        best_id, best_drop = _best_drop_at(curves, v.steps)
        if best_drop is None or best_drop <= 0 or best_id == record.trial_id:
            continue
        if v.loss_drop < rules.plateau_fraction * best_drop:
            v.kind = "plateaued"
            v.notes.append(
                f"plateaued: loss fell {v.loss_drop:.0%} by step {v.steps} "
                f"(smoothed {fmt_num(v.start_loss or 0.0)} -> "
                f"{fmt_num((v.start_loss or 0.0) * (1 - v.loss_drop))}) vs {best_drop:.0%} for "
                f"{best_id}; limit {rules.plateau_fraction:.0%} of the best"
            )


def _smoothed_curve(record: TrialRecord, window: int) -> tuple[list[int], list[float]] | None:
    steps, losses = record.series("loss")
    if len(losses) < 2:
        return None
    w = max(1, min(window, len(losses) // 2))
    return steps[w - 1 :], moving_average(losses, w)


def _best_drop_at(
    curves: Mapping[str, tuple[list[int], list[float]] | None], step: int
) -> tuple[str | None, float | None]:
    """(trial id, relative drop) of the stable trial that had fallen most by ``step``."""
    best: tuple[str | None, float | None] = (None, None)
    for trial_id, curve in curves.items():
        if curve is None or curve[0][-1] < step or curve[1][0] <= 0:
            continue
        index = int(np.searchsorted(curve[0], step, side="right")) - 1
        if index < 0:
            continue
        drop = 1.0 - curve[1][index] / curve[1][0]
        if best[1] is None or drop > best[1]:
            best = (trial_id, drop)
    return best


def index_verdicts(
    records: Sequence[TrialRecord], verdicts: Mapping[str, Verdict] | Sequence[Verdict]
) -> dict[str, Verdict]:
    """Accept verdicts keyed by trial id or as a list parallel to ``records``."""
    if isinstance(verdicts, Mapping):
        missing = [r.trial_id for r in records if r.trial_id not in verdicts]
        if missing:
            raise KeyError(f"no verdict for trials {missing}")
        return {r.trial_id: verdicts[r.trial_id] for r in records}
    if len(verdicts) != len(records):
        raise ValueError(f"{len(verdicts)} verdicts for {len(records)} records")
    return {r.trial_id: v for r, v in zip(records, verdicts, strict=True)}


def smoothed_final_loss(record: TrialRecord, window: int = 10) -> float | None:
    """Last eval_loss if any was logged, else the mean of the last ``window`` training losses."""
    return final_loss_with_source(record, window)[0]


def final_loss_with_source(
    record: TrialRecord, window: int = 10
) -> tuple[float | None, str | None]:
    """Like smoothed_final_loss, also saying whether the number is an "eval" or "train" loss.

    Eval loss wins because it is measured on held-out data over a whole eval set, so it is
    already an average and less noisy than any window of training steps.
    """
    _, eval_losses = record.series("eval_loss")
    if eval_losses:
        return eval_losses[-1], "eval"
    _, losses = record.series("loss")
    if not losses:
        return None, None
    return float(np.mean(losses[-max(1, window) :])), "train"


def smoothed_loss_at(record: TrialRecord, step: int, window: int = 10) -> float | None:
    """Mean of the last ``window`` training losses logged at or before ``step`` (None if none).

    The ranking's common-step measure: trials stopped at the same ASHA rung are compared on
    this, each at the same step of the same schedule.
    """
    steps, losses = record.series("loss")
    upto = [loss for s, loss in zip(steps, losses, strict=True) if s <= step]
    if not upto:
        return None
    return float(np.mean(upto[-max(1, window) :]))


def percentile_or_none(values: Sequence[float], q: float) -> float | None:
    """numpy percentile (linear interpolation) or None for no data."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def fmt_num(value: float) -> str:
    """Three significant digits: enough to compare thresholds, short enough for a table."""
    return f"{value:.3g}"


def _check_outcome(record: TrialRecord, findings: _Findings) -> None:
    if record.status == "ERROR":
        detail = f" ({record.end_reason})" if record.end_reason else ""
        findings.add("failed", f"trial status ERROR{detail} at step {record.steps_done}")
    elif record.end_reason in _FAILED_END_REASONS:
        findings.add("failed", f"trainer ended the run as {record.end_reason!r}")


def _check_nans(record: TrialRecord, rules: StabilityRules, findings: _Findings) -> int:
    count = nan_event_count(record)
    if count > rules.max_nan_events:
        plural = "s" if count != 1 else ""
        findings.add("nan", f"{count} NaN event{plural} ({_first_nan_detail(record)})")
    if record.end_reason in _NAN_END_REASONS:
        findings.add(
            "nan", f"trainer stopped on NaN ({record.end_reason}) at step {record.steps_done}"
        )
    return count


def nan_event_count(record: TrialRecord) -> int:
    """NaN/inf events, from whichever source saw the most.

    The summary's event list, the cumulative counter, skipped steps and None losses can each be
    missing (e.g. a crashed trial never wrote summary.json), so take the maximum.
    """
    counter = max((int(r.get("nan_events") or 0) for r in record.history), default=0)
    skipped = sum(1 for r in record.history if r.get("skipped"))
    none_loss = sum(1 for r in record.history if "loss" in r and r["loss"] is None)
    return max(len(record.nan_events), counter, skipped, none_loss)


def _first_nan_detail(record: TrialRecord) -> str:
    if record.nan_events:
        event = min(record.nan_events, key=lambda e: e.get("step") or 0)
        groups = list(event.get("groups") or [])
        if groups:
            label = "group" if len(groups) == 1 else "groups"
            where = f"{label} {', '.join(groups)}"
        else:
            where = f"in the {event.get('where') or 'loss'}"
        return f"first at step {event.get('step')}, {where}"
    for index, row in enumerate(record.history, start=1):
        if row.get("skipped") or ("loss" in row and row["loss"] is None):
            return f"first at step {row.get('step', index)}"
    return "step unknown"


def _check_loss(
    record: TrialRecord, rules: StabilityRules, findings: _Findings
) -> tuple[float | None, float | None]:
    """Divergence rules; returns the smoothed start loss and the relative drop by the end."""
    if record.end_reason == "diverged":
        findings.add("diverged", f"trainer stopped the run as diverged at step {record.steps_done}")
    steps, losses = record.series("loss")
    if len(losses) < 2:
        return None, None
    # Keep start and end windows disjoint on short runs, or "final above start" compares a
    # window with itself.
    window = max(1, min(rules.smoothing_window, len(losses) // 2))
    smooth = moving_average(losses, window)
    start = smooth[0]
    if start <= 0:
        return None, None  # ratios are meaningless for a non-positive loss
    _check_spike(steps[window - 1 :], smooth, start, rules, findings)
    final = smooth[-1]
    if rules.final_above_start and final > start:
        findings.add(
            "diverged",
            f"smoothed final loss {fmt_num(final)} is above its smoothed start {fmt_num(start)}",
        )
    return start, 1.0 - final / start


def _check_spike(
    steps: list[int], smooth: list[float], start: float, rules: StabilityRules, findings: _Findings
) -> None:
    peak_index = int(np.argmax(smooth))
    ratio = smooth[peak_index] / start
    if ratio > rules.loss_spike_factor:
        findings.add(
            "diverged",
            f"loss spiked to {_ratio(ratio)}x its start at step {steps[peak_index]} "
            f"(smoothed {fmt_num(smooth[peak_index])} vs {fmt_num(start)}, "
            f"limit {rules.loss_spike_factor:g}x)",
        )


def _ratio(ratio: float) -> str:
    # "4.1x" reads better than "4.12x"; "468x" better than "467.6x".
    return f"{ratio:.1f}" if ratio < 10 else f"{ratio:.0f}"


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing simple moving average; element i averages values[i : i + window]."""
    if window <= 1:
        return [float(v) for v in values]
    kernel = np.ones(window) / window
    return [float(v) for v in np.convolve(np.asarray(values, dtype=float), kernel, "valid")]


def _check_grad_norm(
    record: TrialRecord, rules: StabilityRules, findings: _Findings
) -> float | None:
    _, norms = record.series("grad_norm")
    pctl = percentile_or_none(norms, rules.grad_norm_percentile)
    if pctl is not None and pctl > rules.grad_norm_limit:
        findings.add(
            "high_grad_norm",
            f"p{rules.grad_norm_percentile:g} grad norm {fmt_num(pctl)} > "
            f"{rules.grad_norm_limit:g}",
        )
    return pctl


def clip_share(record: TrialRecord) -> float | None:
    """Share of logged steps on which clipping acted (None when no step logged the flag).

    Reported, never a verdict rule: the seed prescribes clipping as the remedy for NaN and
    large norms, and a clip that acts on most steps means the effective step is the clip, so
    the learning rate matters less there; that is information about the setting, not damage.
    """
    flags = [finite_or_none(r.get("clipped")) for r in record.history]
    known = [f for f in flags if f is not None]
    if not known:
        return None
    return sum(1 for f in known if f > 0) / len(known)


def _check_completion(record: TrialRecord, findings: _Findings) -> tuple[bool, list[str]]:
    """Return (early_stopped, notes); adds an "incomplete" reason for unfinished trials."""
    if not record.history:
        findings.add("incomplete", f"no metrics logged (status {record.status})")
        return False, []
    if record.status in _UNFINISHED_STATUSES:
        findings.add("incomplete", f"still {record.status} at step {record.steps_done}")
        return False, []
    if record.end_reason == "early_stopped":
        return True, [f"early-stopped by the scheduler at step {record.steps_done}"]
    planned = record.total_steps
    if record.end_reason is None and planned and record.steps_done < planned:
        # Ray stops ASHA losers without the trainer recording a reason; with no sign of a
        # crash (status is not ERROR) a short TERMINATED run is most likely one of those.
        note = f"stopped at step {record.steps_done} of {planned} (no end reason; likely ASHA)"
        return True, [note]
    return False, []


__all__ = [
    "KINDS",
    "KIND_PRIORITY",
    "STABLE_KINDS",
    "StabilityRules",
    "Verdict",
    "clip_share",
    "final_loss_with_source",
    "fmt_num",
    "index_verdicts",
    "mark_plateaued",
    "moving_average",
    "nan_event_count",
    "percentile_or_none",
    "smoothed_final_loss",
    "smoothed_loss_at",
    "verdict",
    "verdicts_for",
]
