"""Rank sweep trials (stable first, each compared at a common step) and export the winner.

Ranking rule, fair to trials ASHA stopped and trials that finished: stable trials that ran their
whole schedule come first, compared on their final loss (eval when every one of them has an
end-of-run eval, else the smoothed training loss), all at the same last step; trials ASHA
stopped follow, deepest rung first, each rung's trials compared on the smoothed training loss
at the step they were stopped.  Every comparison is between losses from the same step and split;
a finished trial outranks a stopped one because ASHA compared them at the stopped trial's rung
and kept the other.  Ties (equal to 4 significant digits) go to the trial whose clip acted on
fewer steps.  "Plateaued" trials (stable, but learned far less than the best) follow the stable
ones; unstable trials come last, grouped by what went wrong.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.fsutil import atomic_write_text
from tuning.analysis.stability import (
    KIND_PRIORITY,
    StabilityRules,
    Verdict,
    fmt_num,
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

# Swept knobs that already have a column of their own; any other swept key (``seed``,
# ``model.lora.r``, ``model.lora.target_modules``) gets one after these, in the space's order.
TABLE_KNOBS = ("learning_rate", "projector_lr", "lora_lr", "warmup_steps", "gradient_clip_val")
CSV_KNOBS = (*TABLE_KNOBS, "projector_lr_mult", "lora_lr_mult")

CSV_COLUMNS = (
    "rank",
    "trial_id",
    "verdict",
    "stable",
    "early_stopped",
    "final_loss",
    "loss_source",
    "rank_loss",
    "rank_measure",
    "learning_rate",
    "projector_lr",
    "lora_lr",
    "projector_lr_mult",
    "lora_lr_mult",
    "warmup_steps",
    "gradient_clip_val",
    "grad_norm_pctl",
    "clip_fraction",
    "nan_events",
    "steps",
    "status",
    "end_reason",
    "reasons",
    "notes",
)


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


def extra_columns(rows: Sequence[Row], fixed: Sequence[str] = TABLE_KNOBS) -> list[str]:
    """Swept keys of ``rows`` that have no column among ``fixed``, in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row.swept if k not in fixed and k not in keys]
    return keys


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


# --------------------------------------------------------------------------- exports


def write_csv(rows: Sequence[Row], path: str | Path) -> Path:
    """Machine-readable leaderboard: full-precision numbers, empty cell for missing values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    extra = extra_columns(rows, CSV_KNOBS)
    # The extra knob columns go after the fixed knobs, before the measurements.
    at = CSV_COLUMNS.index("gradient_clip_val") + 1
    writer.writerow([*CSV_COLUMNS[:at], *extra, *CSV_COLUMNS[at:]])
    for row in rows:
        values = [csv_cell(value) for value in _row_values(row)]
        knobs = [_csv_knob(row.swept[k]) if k in row.swept else "" for k in extra]
        writer.writerow([*values[:at], *knobs, *values[at:]])
    return atomic_write_text(path, buffer.getvalue())


def _csv_knob(value: Any) -> str:
    # A list knob (target_modules) as JSON, so a reader gets the list back, not Python's repr.
    return json.dumps(value) if isinstance(value, list | tuple | dict) else csv_cell(value)


def _row_values(row: Row) -> list[Any]:
    return [
        row.rank,
        row.trial_id,
        row.kind,
        row.stable,
        row.early_stopped,
        row.final_loss,
        row.loss_source,
        row.rank_loss,
        row.rank_measure,
        row.learning_rate,
        row.projector_lr,
        row.lora_lr,
        row.projector_lr_mult,
        row.lora_lr_mult,
        row.warmup_steps,
        row.gradient_clip_val,
        row.grad_norm_pctl,
        row.clip_fraction,
        row.nan_events,
        row.steps,
        row.status,
        row.end_reason,
        "; ".join(row.reasons),
        "; ".join(row.notes),
    ]


def csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_DISPLAY_HEADERS = (
    "#",
    "trial",
    "verdict",
    "loss (ranked on)",
    "lr",
    "proj lr",
    "lora lr",
    "warmup",
    "clip",
    "grad p{pct}",
    "clipped",
    "NaN",
    "steps",
    "reason / note",
)


# The swept keys without a fixed column are inserted after this header ("clip").
_EXTRA_AT = _DISPLAY_HEADERS.index("clip") + 1


def _headers(rows: Sequence[Row], extra: Sequence[str]) -> list[str]:
    pct = rows[0].grad_norm_percentile if rows else 90.0
    heads = [header.format(pct=f"{pct:g}") for header in _DISPLAY_HEADERS]
    return [*heads[:_EXTRA_AT], *extra, *heads[_EXTRA_AT:]]


def _cells(row: Row, extra: Sequence[str]) -> list[str]:
    cells = _display_cells(row)
    knobs = [knob_text(row.swept[k]) if k in row.swept else "-" for k in extra]
    return [*cells[:_EXTRA_AT], *knobs, *cells[_EXTRA_AT:]]


def knob_text(value: Any) -> str:
    """A swept value in a table cell: ``none``, 4 significant digits, a list comma-joined."""
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(knob_text(item) for item in value)
    number = finite_or_none(value)
    return fmt_num(number) if isinstance(value, float) and number is not None else str(value)


def _display_cells(row: Row) -> list[str]:
    verdict_text = row.kind + (" (early-stopped)" if row.early_stopped else "")
    if row.rank_loss is not None:
        loss = f"{row.rank_loss:.4g} {row.rank_measure}"
    else:
        loss = "-" if row.final_loss is None else f"{row.final_loss:.4g} {row.loss_source}"
    clipped = "-" if row.clip_fraction is None else f"{row.clip_fraction:.0%}"
    return [
        str(row.rank),
        row.trial_id,
        verdict_text,
        loss,
        _short(row.learning_rate),
        _short(row.projector_lr),
        _short(row.lora_lr),
        "-" if row.warmup_steps is None else str(row.warmup_steps),
        f"{row.gradient_clip_val:g}" if row.gradient_clip_val else "none",  # 0 = off too
        _short(row.grad_norm_pctl),
        clipped,
        str(row.nan_events),
        str(row.steps),
        row.reason_text,
    ]


def _short(value: float | None) -> str:
    return "-" if value is None else fmt_num(value)


def write_markdown(rows: Sequence[Row], path: str | Path, title: str | None = None) -> Path:
    """GitHub-flavoured Markdown table of the leaderboard (for MLflow artifacts / PRs)."""
    return atomic_write_text(path, format_markdown(rows, title))


def format_markdown(rows: Sequence[Row], title: str | None = None) -> str:
    """The Markdown text that write_markdown writes."""
    extra = extra_columns(rows)
    heads = _headers(rows, extra)
    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join(heads) + " |")
    lines.append("|" + "|".join("---" for _ in heads) + "|")
    for row in rows:
        # A literal "|" inside a cell would split it into two columns.
        cells = [cell.replace("|", "\\|") for cell in _cells(row, extra)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", ranking_note(rows)]
    if not any(row.stable for row in rows):
        lines += ["", "**No stable trial in this sweep.**"]
    return "\n".join(lines) + "\n"


def format_table(rows: Sequence[Row]) -> str:
    """Fixed-width plain-text table for the terminal."""
    extra = extra_columns(rows)
    table = [_headers(rows, extra), *(_cells(row, extra) for row in rows)]
    # The free-text last column is left unpadded so long reasons do not widen every line.
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    out = []
    for line in table:
        padded = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        out.append("  ".join([*padded, line[-1]]).rstrip())
    out.insert(1, "  ".join("-" * width for width in widths) + "  " + "-" * 13)
    out.append(ranking_note(rows))
    if not any(row.stable for row in rows):
        out.append("No stable trial in this sweep.")
    return "\n".join(out)


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
    "CSV_COLUMNS",
    "CSV_KNOBS",
    "PHASE2_KNOBS",
    "TABLE_KNOBS",
    "Row",
    "best_stable_record",
    "best_stable_row",
    "build_leaderboard",
    "csv_cell",
    "extra_columns",
    "format_markdown",
    "format_table",
    "knob_text",
    "rank_measures",
    "ranking_note",
    "varied_knobs",
    "write_csv",
    "write_markdown",
]
