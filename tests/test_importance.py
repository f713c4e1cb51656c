"""Parameter importance (fANOVA): the knob that drives the loss ranks first, a noise knob
does not; too few trials or a single knob say so; the report writes importance.json/.png."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import yaml

from tuning.analysis.importance import (
    MIN_TRIALS,
    compute_importance,
    format_importance,
    plot_importance,
)
from tuning.analysis.report import build_report, print_report
from tuning.analysis.stability import verdicts_for
from tuning.analysis.trial_record import TrialRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows(final: float, steps: int = 60, nan_at: int | None = None) -> list[dict]:
    # A decaying loss with a flat tail at `final`, so the smoothed final loss is `final`.
    return [{"step": s, "loss": None if s == nan_at else final + max(0, 30 - s) / 30,
             "grad_norm": 1.0, "clipped": 0, "nan_events": int(nan_at is not None and s >= nan_at)}
            for s in range(1, steps + 1)]


def sweep_records(n: int = 24) -> list[TrialRecord]:
    """learning_rate decides the loss (and NaN above 1e-2); warmup_steps is pure noise."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        lr = 10 ** rng.uniform(-5, -1)
        warmup = rng.choice([10, 20, 30, 40])
        clip = rng.choice([None, 1.0, 5.0])
        nan_at = 40 if lr > 1e-2 else None
        out.append(TrialRecord(
            trial_id=f"t{i:02d}",
            params={"learning_rate": lr, "warmup_steps": warmup, "gradient_clip_val": clip},
            history=rows(0.2 + abs(math.log10(lr) + 3.5), nan_at=nan_at),
            status="TERMINATED", end_reason="nan_stop" if nan_at else "completed",
            nan_events=[{"step": 40}] if nan_at else [], total_steps=60))
    return out


def test_the_determining_knob_ranks_first_for_loss_and_stability() -> None:
    records = sweep_records()
    verdicts = verdicts_for(records)
    assert {v.stable for v in verdicts.values()} == {True, False}  # both outcomes present
    result = compute_importance(records, verdicts,
                                ["learning_rate", "warmup_steps", "gradient_clip_val"])
    assert result.skipped == {}
    for target in ("final_loss", "stability"):
        ranked = result.importances[target]
        assert next(iter(ranked)) == "learning_rate", (target, ranked)
        assert ranked["learning_rate"] > 0.5 > ranked["warmup_steps"]
        assert math.isclose(sum(ranked.values()), 1.0, rel_tol=1e-6)
    text = format_importance(result)
    assert text.index("learning_rate") < text.index("warmup_steps")


def test_too_few_trials_and_a_single_knob_say_so_in_one_line(tmp_path: Path) -> None:
    few = sweep_records(MIN_TRIALS - 1)
    result = compute_importance(few, verdicts_for(few), ["learning_rate", "warmup_steps"])
    assert result.importances == {}
    assert "importance needs at least 4" in result.skipped["final_loss"]
    one = sweep_records()
    result = compute_importance(one, verdicts_for(one), ["learning_rate"])
    assert "1 swept knob(s) varied" in result.skipped["final_loss"]
    lines = format_importance(result).splitlines()
    assert len(lines) == 2 and all("not computed" in line for line in lines)
    png = plot_importance(result, tmp_path / "imp.png")  # still a plot, saying why
    assert png.read_bytes().startswith(PNG_MAGIC)


def write_trial(trials: Path, rec: TrialRecord, lora_r: int) -> None:
    run = trials / rec.trial_id
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rec.history))
    (run / "summary.json").write_text(json.dumps({
        "status": "completed", "end_reason": rec.end_reason, "total_steps": rec.total_steps,
        "nan_events": rec.nan_events}))
    (run / "config.resolved.yaml").write_text(yaml.safe_dump(
        {"phase2": rec.params, "model": {"lora": {"r": lora_r}}}))


def test_build_report_writes_importance_files_for_the_parent_run(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    for i, rec in enumerate(sweep_records(12)):
        write_trial(sweep / "trials", rec, lora_r=[4, 8][i % 2])
    space = {"learning_rate": {"loguniform": [1e-5, 1e-1]},
             "warmup_steps": {"choice": [10, 20, 30, 40]}, "model.lora.r": {"choice": [4, 8]}}
    (sweep / "search.snapshot.yaml").write_text(yaml.safe_dump({"search": {"space": space}}))
    report = build_report(sweep)
    data = json.loads(report.files["importance"].read_text())
    assert report.files["importance"] == sweep / "report" / "importance.json"
    ranked = data["final_loss"]["importances"]
    assert set(ranked) == {"learning_rate", "warmup_steps", "model.lora.r"}  # dotted key read
    assert next(iter(ranked)) == "learning_rate"
    assert data["final_loss"]["trials"] == 12
    assert report.files["importance_plot"].read_bytes().startswith(PNG_MAGIC)
    print_report(report)
    out = capsys.readouterr().out
    assert "Parameter importance" in out and "importance.png" in out


def test_a_trial_without_its_swept_values_is_left_out_not_fatal() -> None:
    records = sweep_records(6)
    records[0].params = {}  # e.g. a trial that never wrote config.resolved.yaml
    result = compute_importance(records, verdicts_for(records), ["learning_rate", "warmup_steps"])
    assert result.trials["final_loss"] == 5
    assert set(result.importances["final_loss"]) == {"learning_rate", "warmup_steps"}


def test_a_list_valued_knob_is_one_category_per_distinct_list(tmp_path: Path) -> None:
    # A sweep over model.lora.target_modules: each trial's value (read from its
    # config.resolved.yaml) is a list, which is not hashable; equal lists must be one
    # category and the report must still rank the knobs.
    records = sweep_records(12)
    for i, record in enumerate(records):
        record.run_dir = tmp_path / record.trial_id
        record.run_dir.mkdir()
        modules = ["q_proj", "v_proj"] if i % 2 else ["q_proj"]
        (record.run_dir / "config.resolved.yaml").write_text(
            yaml.safe_dump({"model": {"lora": {"target_modules": modules}}}))
    keys = ["learning_rate", "model.lora.target_modules"]
    result = compute_importance(records, verdicts_for(records), keys)
    assert result.skipped == {}
    assert set(result.importances["final_loss"]) == set(keys)
    assert next(iter(result.importances["final_loss"])) == "learning_rate"
