"""The robustness re-check's report: a Markdown table to read, a CSV to load.

tuning.analysis.recheck decides (plan, match, summarize, with a reason per config); this
module only lays the summary out.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.fsutil import atomic_write_text
from tuning.analysis.leaderboard_table import csv_cell
from tuning.analysis.recheck import RecheckEntry, RecheckSummary
from tuning.analysis.recheck_wording import factor_label, loss_label
from tuning.analysis.stability import fmt_num


def _num(value: float | None) -> str:
    return "-" if value is None else fmt_num(value)


def _headers(factors: Sequence[float]) -> list[str]:
    return [
        "sweep rank",
        "trial",
        "mean loss (x1)",
        "std",
        "stable runs",
        *(f"stable {factor_label(f)}" for f in factors),
        "broke first",
        "status",
        "reason",
    ]


def _cells(entry: RecheckEntry, factors: Sequence[float]) -> list[str]:
    by_factor = {f.factor: f for f in entry.factors}
    per_factor = [f"{o.stable}/{o.runs}" if (o := by_factor.get(f)) else "-" for f in factors]
    broke = entry.broke_first
    return [
        "-" if entry.source_rank is None else str(entry.source_rank),
        entry.source_trial,
        loss_label(entry.mean_loss) + _partial(entry),
        _num(entry.std_loss),
        f"{entry.stable_runs}/{entry.total_runs}",
        *per_factor,
        "-" if broke is None else factor_label(broke),
        entry.status,
        entry.reason,
    ]


def _partial(entry: RecheckEntry) -> str:
    # A mean over only the seeds that stayed stable flatters the config; say so in the cell.
    if entry.mean_loss is None or entry.reproducible:
        return ""
    return f" ({entry.seeds_at_1x}/{entry.runs_at_1x} seeds)"


def format_recheck(summary: RecheckSummary) -> str:
    """Markdown (readable as-is in a terminal): the headline, then one row per config."""
    lines = ["## Robustness re-check", "", summary.message]
    if summary.entries:
        factors = summary.factors
        headers = _headers(factors)
        lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for entry in summary.entries:
            cells = [c.replace("|", "\\|") for c in _cells(entry, factors)]
            lines.append("| " + " | ".join(cells) + " |")
        tol = f"{summary.loss_tolerance:.0%}"
        lines += [
            "",
            f"Candidates: stable in every seed at x1 and within {tol} of the best "
            "mean loss; among those, the most stable runs, then the lower mean loss.",
        ]
    return "\n".join(lines) + "\n"


def _csv_columns(factors: Sequence[float]) -> list[str]:
    return [
        "sweep_rank",
        "trial_id",
        "status",
        "recommended",
        "reproducible",
        "within_tolerance",
        "mean_loss",
        "std_loss",
        "seeds_at_1x",
        "stable_runs",
        "total_runs",
        "margin",
        "neighbours_stable",
        "broke_first",
        *(f"stable_x{f:g}" for f in factors),
        "reason",
    ]


def _csv_values(entry: RecheckEntry, factors: Sequence[float]) -> list[Any]:
    by_factor = {f.factor: f for f in entry.factors}
    per_factor = [f"{o.stable}/{o.runs}" if (o := by_factor.get(f)) else None for f in factors]
    return [
        entry.source_rank,
        entry.source_trial,
        entry.status,
        entry.recommended,
        entry.reproducible,
        entry.within_tolerance,
        entry.mean_loss,
        entry.std_loss,
        entry.seeds_at_1x,
        entry.stable_runs,
        entry.total_runs,
        entry.margin,
        entry.neighbours_stable,
        entry.broke_first,
        *per_factor,
        entry.reason,
    ]


def format_recheck_csv(summary: RecheckSummary) -> str:
    """Machine-readable entries, full precision, empty cells for missing values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    factors = summary.factors
    writer.writerow(_csv_columns(factors))
    for entry in summary.entries:
        writer.writerow([csv_cell(v) for v in _csv_values(entry, factors)])
    return buffer.getvalue()


def write_recheck(
    summary: RecheckSummary, path_md: str | Path, path_csv: str | Path
) -> tuple[Path, Path]:
    """Write the Markdown report and the CSV atomically; return both paths."""
    md = atomic_write_text(path_md, format_recheck(summary))
    return md, atomic_write_text(path_csv, format_recheck_csv(summary))


__all__ = ["format_recheck", "format_recheck_csv", "write_recheck"]
