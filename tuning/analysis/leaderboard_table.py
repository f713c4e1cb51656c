"""The leaderboard as files and text: CSV, Markdown and a fixed-width terminal table.

Renders the rows leaderboard.build_leaderboard ranked; it decides nothing about the order.
Every swept key without a fixed column of its own gets one (after the fixed knobs), and each
table ends with leaderboard.ranking_note, the line that says what the trials were ranked on.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.fsutil import atomic_write_text
from tuning.analysis.leaderboard import Row, ranking_note
from tuning.analysis.stability import fmt_num
from tuning.analysis.trial_record import finite_or_none

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


def extra_columns(rows: Sequence[Row], fixed: Sequence[str] = TABLE_KNOBS) -> list[str]:
    """Swept keys of ``rows`` that have no column among ``fixed``, in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row.swept if k not in fixed and k not in keys]
    return keys


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
    """A value in a CSV cell: empty for None, ``true``/``false`` for a bool, else str()."""
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


__all__ = [
    "CSV_COLUMNS",
    "CSV_KNOBS",
    "TABLE_KNOBS",
    "csv_cell",
    "extra_columns",
    "format_markdown",
    "format_table",
    "knob_text",
    "write_csv",
    "write_markdown",
]
