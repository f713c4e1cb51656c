"""The end-of-sweep report, rebuilt from what a sweep left on disk.

`python -m tuning.report SWEEP_DIR` works on a finished or interrupted sweep:
trial records come from each trial's run directory (metrics.jsonl, summary.json,
config.resolved.yaml) and the trial statuses from `trials.json`, which the sweep
driver writes from Ray's results.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from trainer.errors import ConfigError
from trainer.fsutil import atomic_write_text
from tuning.analysis.advice import advise
from tuning.analysis.best_config import write_best_stable_yaml
from tuning.analysis.importance import (
    compute_importance,
    format_importance,
    plot_importance,
    write_importance_json,
)
from tuning.analysis.leaderboard import best_stable_record, build_leaderboard
from tuning.analysis.leaderboard_table import format_table, write_csv, write_markdown
from tuning.analysis.plots import (
    plot_grad_norms,
    plot_loss_curves,
    plot_lr_schedule,
    plot_stability_map,
)
from tuning.analysis.stability import StabilityRules, verdicts_for
from tuning.analysis.trial_record import STALL_FILE, TrialRecord, read_json_object

TRIALS_INDEX = "trials.json"


@dataclass
class Report:
    table: str
    records: list[TrialRecord]
    files: dict[str, Path] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)
    best_trial: str | None = None
    verdicts: dict[str, str] = field(default_factory=dict)  # trial id -> kind
    # trial id -> share of optimizer steps on which clipping acted (None: no clip value)
    clip_fractions: dict[str, float | None] = field(default_factory=dict)
    importance: str = ""  # the parameter-importance table, as printed


def collect_records(sweep_dir: Path) -> list[TrialRecord]:
    """One TrialRecord per trial directory, with Ray's status where known."""
    index_path = sweep_dir / TRIALS_INDEX
    index = read_json_object(index_path) if index_path.is_file() else {}
    if index is None:
        # Ray's final statuses only: each trial's own run directory still holds its steps.
        print(f"warning: {index_path} is damaged; trial statuses are taken from the trials' "
              "run directories (rerun the sweep's command to rewrite it)", file=sys.stderr)
        index = {}
    records = []
    trials_dir = sweep_dir / "trials"
    for run_dir in sorted(p for p in trials_dir.iterdir() if p.is_dir()) if trials_dir.is_dir() \
            else []:
        rec = TrialRecord.from_run_dir(run_dir, trial_id=run_dir.name)
        info = index.get(run_dir.name)
        info = info if isinstance(info, dict) else {}
        if (run_dir / STALL_FILE).is_file():
            rec = replace(rec, status="ERROR", end_reason="stalled")
        elif info.get("status") == "ERROR":
            rec = replace(rec, status="ERROR", end_reason=rec.end_reason or "error")
        elif info.get("status") == "TERMINATED" and rec.status in {"RUNNING", "PENDING"}:
            rec = replace(rec, status="TERMINATED")  # cut by the scheduler before its end
        records.append(rec)
    return records


def build_report(sweep_dir: Path, rules: StabilityRules | None = None,
                 sweep_name: str | None = None) -> Report:
    """Leaderboard (CSV/Markdown), best_stable.yaml, advice and plots under report/."""
    rules = rules or StabilityRules()
    name = sweep_name or sweep_dir.name
    out = sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = collect_records(sweep_dir)
    keys = swept_keys(sweep_dir)
    rows = build_leaderboard(records, rules, keys)
    verdicts = verdicts_for(records, rules)
    report = Report(format_table(rows), records,
                    verdicts={k: v.kind for k, v in verdicts.items()},
                    clip_fractions={k: v.clip_fraction for k, v in verdicts.items()})
    report.files["leaderboard_csv"] = write_csv(rows, out / "leaderboard.csv")
    report.files["leaderboard_md"] = write_markdown(rows, out / "leaderboard.md",
                                                    title=f"Sweep {name}")
    best = best_stable_record(records, rows)
    if best is not None:
        report.best_trial = best.trial_id
        path = write_best_stable_yaml(best, out / "best_stable.yaml", sweep_name=name, rules=rules)
        if path:
            report.files["best_stable"] = path
    report.advice = [f"{a.text} (trials: {', '.join(a.trial_ids)})"
                     for a in advise(records, verdicts, rules)]
    atomic_write_text(out / "advice.md", "# Advice\n\n" + "".join(
        f"- {line}\n" for line in report.advice or ["No advice: the evidence is not decisive."]))
    report.files["advice"] = out / "advice.md"
    if records:
        plots = out / "plots"
        report.files["loss_curves"] = plot_loss_curves(records, verdicts, plots / "loss.png")
        report.files["stability_map"] = plot_stability_map(records, verdicts,
                                                           plots / "stability_map.png", keys)
        report.files["grad_norms"] = plot_grad_norms(records, plots / "grad_norms.png")
        lr_rec = best or max(records, key=lambda r: len(r.history))
        report.files["lr_schedule"] = plot_lr_schedule(lr_rec, plots / "lr_schedule.png")
    importance = compute_importance(records, verdicts, keys)
    report.importance = format_importance(importance)
    report.files["importance"] = write_importance_json(importance, out / "importance.json")
    report.files["importance_plot"] = plot_importance(importance, out / "importance.png")
    return report


def swept_keys(sweep_dir: Path) -> list[str] | None:
    """The `space:` keys of the sweep's snapshot (None without one: importance then ranks
    the phase2 knobs that vary across the trials)."""
    path = sweep_dir / "search.snapshot.yaml"
    if not path.is_file():
        return None
    from trainer.yaml_io import load_yaml_file

    try:
        data = load_yaml_file(path)
    except ConfigError:
        return None  # main() reports a damaged snapshot; the importance falls back
    search = data.get("search") if isinstance(data, dict) else None
    space = search.get("space") if isinstance(search, dict) else None
    return [str(k) for k in space] if isinstance(space, dict) else None


def print_report(report: Report, stream=None) -> None:
    stream = stream or sys.stdout  # looked up per call: a redirected stdout is honoured
    print("\nLeaderboard (stable first; the measure it ranks on is the line under it):",
          file=stream)
    print(report.table, file=stream)
    if report.best_trial:
        print(f"\nBest stable trial: {report.best_trial}", file=stream)
    else:
        print("\nNo stable trial: see the reasons above and the advice below.", file=stream)
    for line in report.advice:
        print(f"advice: {line}", file=stream)
    if report.importance:
        print("\nParameter importance (fANOVA, share of variance explained):", file=stream)
        print(report.importance, file=stream)
    print("\nWritten:", file=stream)
    for key, path in report.files.items():
        print(f"  {key:>15}: {path}", file=stream)
