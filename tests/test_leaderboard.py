"""Leaderboard ranking and exports, best_stable.yaml round-trip, and sweep advice."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuning.analysis.advice import advise, tail_relative_drop
from tuning.analysis.best_config import best_stable_config, write_best_stable_yaml, yaml_scalar
from tuning.analysis.leaderboard import best_stable_record, best_stable_row, build_leaderboard
from tuning.analysis.leaderboard_table import (
    CSV_COLUMNS,
    format_markdown,
    format_table,
    write_csv,
    write_markdown,
)
from tuning.analysis.stability import StabilityRules, verdicts_for
from tuning.analysis.trial_record import TrialRecord


def history(
    steps: int = 100,
    loss: Callable[[int], float] = lambda s: 1.0 + 2.0 * math.exp(-s / 15),
    grad: float = 2.0,
    nan_steps: tuple[int, ...] = (),
    eval_loss: float | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for step in range(1, steps + 1):
        bad = step in nan_steps
        rows.append(
            {
                "step": step,
                "loss": None if bad else loss(step),
                "grad_norm": None if bad else grad * (1 + 0.1 * math.sin(step)),
                "grad_norm/projector": grad,
                "grad_norm/lora": grad / 3,
                "lr/projector": 5e-4,
                "lr/lora": 5e-5,
                "clipped": 0,
                "skipped": int(bad),
                "nan_events": sum(1 for s in nan_steps if s <= step),
            }
        )
    if eval_loss is not None:
        rows[-1]["eval_loss"] = eval_loss
    return rows


def record(
    trial_id: str,
    lr: float = 1e-4,
    rows: list[dict[str, Any]] | None = None,
    status: str = "TERMINATED",
    end_reason: str | None = "completed",
    **params: Any,
) -> TrialRecord:
    base = {
        "learning_rate": lr,
        "projector_lr": lr * 5,
        "lora_lr": lr * 0.5,
        "warmup_steps": 100,
        "gradient_clip_val": None,
        "epochs": 3,
        "batch_size": 2,
    }
    return TrialRecord(
        trial_id=trial_id,
        params={**base, **params},
        history=history() if rows is None else rows,
        status=status,
        end_reason=end_reason,
        nan_events=[],
    )


def final_at(value: float) -> Callable[[int], float]:
    """A decaying loss whose last 10 steps average exactly ``value`` (flat tail)."""
    return lambda s: value + 2.0 * max(0, 60 - s) / 60


@pytest.fixture
def sweep() -> list[TrialRecord]:
    return [
        record("nan_t", lr=4e-4, rows=history(nan_steps=(37,))),
        record("good_b", rows=history(loss=final_at(1.2))),
        record("failed_t", rows=history(steps=20), status="ERROR", end_reason="error"),
        record("early_c", rows=history(steps=40, loss=final_at(0.9)), end_reason="early_stopped"),
        record("good_a", rows=history(loss=final_at(1.0))),
        record("div_t", lr=3e-4, rows=history(loss=lambda s: 2.0 + s / 10)),
        record("run_t", rows=history(steps=30), status="RUNNING", end_reason=None),
        record("eval_d", rows=history(loss=final_at(1.1), eval_loss=0.5)),
    ]


def test_ranking_stable_by_loss_completed_before_early_stopped(sweep: list[TrialRecord]) -> None:
    rows = build_leaderboard(sweep)
    assert [r.trial_id for r in rows] == [
        "good_a",  # 1.0 train
        "eval_d",  # 1.1 train: only eval_d has an eval (0.5), so all rank on train loss
        "good_b",  # 1.2
        "early_c",  # best loss 0.9, but early-stopped
        "run_t",
        "div_t",
        "nan_t",
        "failed_t",
    ]
    assert [r.rank for r in rows] == list(range(1, 9))
    assert [r.stable for r in rows] == [True] * 4 + [False] * 4
    assert rows[1].final_loss == 0.5 and rows[1].loss_source == "eval"
    assert rows[1].rank_loss == pytest.approx(1.1) and rows[1].rank_measure == "train@100"
    assert rows[3].rank_measure == "train@40"
    assert rows[3].early_stopped and rows[3].reason_text.startswith("early-stopped")
    assert rows[6].reason_text == "1 NaN event (first at step 37)"
    assert rows[0].projector_lr == pytest.approx(5e-4)
    assert rows[0].projector_lr_mult == pytest.approx(5.0)


def test_csv_has_every_trial_with_numbers_and_reasons(
    sweep: list[TrialRecord], tmp_path: Path
) -> None:
    path = write_csv(build_leaderboard(sweep), tmp_path / "out" / "leaderboard.csv")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        table = list(reader)
    assert [row["trial_id"] for row in table][:2] == ["good_a", "eval_d"]
    first = table[0]
    assert first["verdict"] == "stable" and first["stable"] == "true"
    assert float(first["final_loss"]) == pytest.approx(1.0)
    assert float(first["learning_rate"]) == 1e-4
    assert first["gradient_clip_val"] == ""  # None -> empty cell
    nan_row = next(row for row in table if row["trial_id"] == "nan_t")
    assert nan_row["verdict"] == "nan" and nan_row["nan_events"] == "1"
    assert nan_row["reasons"] == "1 NaN event (first at step 37)"
    early_row = next(row for row in table if row["trial_id"] == "early_c")
    assert early_row["reasons"] == ""
    assert early_row["notes"] == "early-stopped by the scheduler at step 40"
    assert not list(tmp_path.joinpath("out").glob(".*.tmp"))  # atomic write cleaned up


def test_markdown_and_terminal_table(sweep: list[TrialRecord], tmp_path: Path) -> None:
    rows = build_leaderboard(sweep)
    text = write_markdown(rows, tmp_path / "lb.md", title="sweep s1").read_text()
    lines = text.splitlines()
    assert lines[0] == "# sweep s1"
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(sweep)  # header + separator + rows
    assert table[0].startswith("| # | trial | verdict | loss (ranked on) |")
    assert "| 1 | good_a | stable | 1 train@100 |" in table[2]
    assert ("Ranked: finished trials by smoothed final training loss at step 100; then "
            "early-stopped trials, deepest first, by smoothed training loss at the step they "
            "were stopped (40)") in text
    assert "early-stopped" in next(line for line in table if "early_c" in line)
    assert "No stable trial" not in text

    terminal = format_table(rows).splitlines()
    assert len(terminal) == 3 + len(sweep)  # header, rule, rows, the ranking note
    assert terminal[2].split()[:3] == ["1", "good_a", "stable"]
    assert terminal[-1].startswith("Ranked: finished trials")
    # Columns line up: the trial id starts at the same offset on every row.
    offsets = {line.index(row.trial_id) for line, row in zip(terminal[2:], rows, strict=False)}
    assert len(offsets) == 1


def test_early_stopped_trials_rank_at_their_own_rung_never_on_other_steps() -> None:
    # ASHA cut "cut10" at step 10 and "cut30a/b" at step 30; "done" finished its 100 steps.
    # cut10's loss at step 10 is the lowest number on the board, and cut30a's is below done's
    # final loss, but neither is from the same step as what it would be compared with.
    trials = [
        record("cut10", rows=history(steps=10, loss=final_at(0.1)), end_reason="early_stopped"),
        record("cut30b", rows=history(steps=30, loss=final_at(0.7)), end_reason="early_stopped"),
        record("done", rows=history(loss=final_at(1.0), eval_loss=1.3)),
        record("cut30a", rows=history(steps=30, loss=final_at(0.6)), end_reason="early_stopped"),
    ]
    rows = build_leaderboard(trials)
    assert [r.trial_id for r in rows] == ["done", "cut30a", "cut30b", "cut10"]
    assert [r.rank_measure for r in rows] == ["eval@100", "train@30", "train@30", "train@10"]
    assert rows[0].rank_loss == 1.3  # every finished trial has an end-of-run eval: eval split
    note = format_markdown(rows).splitlines()[-1]
    assert note.startswith("Ranked: finished trials by final eval loss at step 100; then "
                           "early-stopped trials, deepest first, by smoothed training loss at "
                           "the step they were stopped (30, 10).")
    assert best_stable_row(rows).trial_id == "done"
    # Stopped before it wrote a summary: no end reason, no planned steps, only its step says
    # it is short. It must not demote the finished trials' eval split to training loss.
    trials.append(record("cut30c", rows=history(steps=30, loss=final_at(0.5)), end_reason=None))
    rows = build_leaderboard(trials)
    assert [r.trial_id for r in rows][:2] == ["done", "cut30c"]
    assert rows[0].rank_measure == "eval@100" and rows[1].rank_measure == "train@30"


def _clipped(rows: list[dict[str, Any]], every: int) -> list[dict[str, Any]]:
    for row in rows:
        row["clipped"] = int(row["step"] % every == 0)
    return rows


def test_clip_share_breaks_a_tie_and_never_removes_a_healthy_trial() -> None:
    trials = [
        record("always", rows=_clipped(history(loss=final_at(1.0)), 1), gradient_clip_val=0.5),
        record("rarely", rows=_clipped(history(loss=final_at(1.0)), 10), gradient_clip_val=1.0),
        record("worse", rows=history(loss=final_at(1.1))),
    ]
    rows = build_leaderboard(trials)
    assert [r.trial_id for r in rows] == ["rarely", "always", "worse"]
    assert all(r.stable for r in rows)
    assert rows[1].clip_fraction == 1.0 and rows[0].clip_fraction == pytest.approx(0.1)
    assert "| 100% |" in format_markdown(rows)  # the "clipped" column
    # Clipping on every step is no reason to lose: a clearly better loss still wins.
    trials[0] = record("always", rows=_clipped(history(loss=final_at(0.9)), 1),
                       gradient_clip_val=0.5)
    assert build_leaderboard(trials)[0].trial_id == "always"


def test_plateaued_trial_is_listed_after_the_stable_ones_with_its_numbers() -> None:
    trials = [
        record("stuck", rows=history(loss=lambda s: 2.6 + 0.4 * math.exp(-s / 5))),
        record("good", rows=history(loss=final_at(0.5))),
    ]
    rows = build_leaderboard(trials)
    assert [(r.trial_id, r.kind, r.stable) for r in rows] == [
        ("good", "stable", True), ("stuck", "plateaued", True)]
    assert rows[1].reason_text.startswith("plateaued: loss fell")
    assert best_stable_row(rows).trial_id == "good"


def test_markdown_escapes_pipes_and_says_when_nothing_is_stable() -> None:
    bad = record("x|y", rows=history(nan_steps=(3,)))
    text = format_markdown(build_leaderboard([bad]))
    assert "x\\|y" in text
    assert "**No stable trial in this sweep.**" in text
    assert "No stable trial in this sweep." in format_table(build_leaderboard([bad]))


def test_best_stable_config_keeps_phase2_knobs_in_seed_order(sweep: list[TrialRecord]) -> None:
    sweep[4].params.update({"seed": 7, "ray_trial_dir": "/tmp/x", "weight_decay": 0.01})
    config = best_stable_config(build_leaderboard(sweep))
    assert config == {
        "learning_rate": 1e-4,
        "projector_lr": pytest.approx(5e-4),
        "lora_lr": pytest.approx(5e-5),
        "warmup_steps": 100,
        "gradient_clip_val": None,
        "epochs": 3,
        "batch_size": 2,
        "seed": 7,
        "weight_decay": 0.01,
    }
    assert list(config)[:5] == [
        "learning_rate", "projector_lr", "lora_lr", "warmup_steps", "gradient_clip_val"
    ]  # fmt: skip


def test_best_stable_yaml_round_trips_with_floats(sweep: list[TrialRecord], tmp_path: Path) -> None:
    rows = build_leaderboard(sweep)
    best = best_stable_record(sweep, rows)
    assert best is not None and best.trial_id == "good_a"
    best.params.update(
        {
            "gradient_clip_val": 0.5,
            "precision": "bf16-mixed",
            "lora_lr": 5e-5,
            "adam_betas": (0.9, 0.999),
            "total_steps": 100,  # an MLflow param, not a phase2 knob: must not be written
        }
    )
    path = write_best_stable_yaml(best, tmp_path / "best_stable.yaml", sweep_name="s1")
    assert path is not None
    text = path.read_text()
    assert text.splitlines()[0] == (
        "# best stable config from sweep s1, trial good_a: smoothed final loss 1 (train loss)"
    )
    loaded = yaml.safe_load(text)
    assert list(loaded) == ["phase2"]
    phase2 = loaded["phase2"]
    for key in ("learning_rate", "projector_lr", "lora_lr", "gradient_clip_val"):
        assert type(phase2[key]) is float, (key, phase2[key])
    assert phase2["learning_rate"] == 1e-4
    assert phase2["projector_lr"] == 5e-4  # 12 significant digits drop 5 * 1e-4 float noise
    assert phase2["lora_lr"] == 5e-5
    assert phase2["gradient_clip_val"] == 0.5
    assert phase2["warmup_steps"] == 100 and type(phase2["warmup_steps"]) is int
    assert phase2["precision"] == "bf16-mixed"
    assert phase2["adam_betas"] == [0.9, 0.999]
    assert "total_steps" not in phase2
    assert "1e-4" not in text and "5e-05" not in text  # PyYAML would read these as strings


def test_best_stable_yaml_writes_null_clip(sweep: list[TrialRecord], tmp_path: Path) -> None:
    best = best_stable_record(sweep, build_leaderboard(sweep))
    path = write_best_stable_yaml(best, tmp_path / "best.yaml")
    assert path is not None
    assert yaml.safe_load(path.read_text())["phase2"]["gradient_clip_val"] is None
    assert "gradient_clip_val: null  # no clipping" in path.read_text()


def test_no_stable_trial_means_no_best_file(tmp_path: Path) -> None:
    rows = build_leaderboard([record("n", rows=history(nan_steps=(2,)))])
    assert best_stable_config(rows) is None
    assert best_stable_record([], rows) is None
    assert write_best_stable_yaml(None, tmp_path / "best.yaml") is None
    assert not (tmp_path / "best.yaml").exists()


def test_best_stable_yaml_refuses_unstable_record(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not stable"):
        write_best_stable_yaml(record("n", rows=history(nan_steps=(2,))), tmp_path / "b.yaml")
    assert not (tmp_path / "b.yaml").exists()


def test_yaml_scalar_keeps_long_strings_on_one_line() -> None:
    long = "x " * 100
    assert "\n" not in yaml_scalar(long)
    assert yaml.safe_load(f"k: {yaml_scalar(long)}")["k"] == long


@pytest.mark.parametrize(
    "value", [1e-4, 5e-5, 2.5e-4, 2.0, 1e20, 0.1, -3e-7, 3, "bf16-mixed", "1e-4", None, True]
)
def test_yaml_scalar_round_trips_type_and_value(value: Any) -> None:
    loaded = yaml.safe_load(f"k: {yaml_scalar(value)}")["k"]
    assert type(loaded) is type(value)
    assert loaded == value


def test_end_to_end_from_run_dirs(tmp_path: Path) -> None:
    specs = {
        "lr1": (1e-4, "completed", history()),
        "lr8": (8e-4, "nan_stop", history(10, nan_steps=(10,))),
    }
    for name, (lr, reason, rows) in specs.items():
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(
            json.dumps({"status": "TERMINATED", "end_reason": reason})
        )
        (run / "config.resolved.yaml").write_text(f"phase2:\n  learning_rate: {yaml_scalar(lr)}\n")
    records = [TrialRecord.from_run_dir(tmp_path / name) for name in sorted(specs)]
    rows = build_leaderboard(records)
    assert [(r.trial_id, r.kind) for r in rows] == [("lr1", "stable"), ("lr8", "nan")]
    out = write_best_stable_yaml(best_stable_record(records, rows), tmp_path / "best.yaml")
    assert out is not None
    assert yaml.safe_load(out.read_text())["phase2"] == {
        "learning_rate": 1e-4,
        "gradient_clip_val": None,
    }


# --------------------------------------------------------------------------- advice


def test_advice_lower_lr_cites_unstable_high_lr_and_stable_low_lr() -> None:
    records = [
        record("lo1", lr=5e-5),
        record("lo2", lr=1e-4),
        record("hi_nan", lr=2e-4, rows=history(nan_steps=(40,))),
        record("hi_div", lr=4e-4, rows=history(loss=lambda s: 2.0 + s / 10)),
    ]
    advice = advise(records, verdicts_for(records))
    lower = [a for a in advice if a.kind == "lower_lr"]
    assert len(lower) == 1
    assert lower[0].trial_ids == ["hi_nan", "hi_div", "lo1", "lo2"]
    assert lower[0].suggested == {"learning_rate": 1e-4, "gradient_clip_val": 0.5}
    assert "learning_rate >= 0.0002" in lower[0].text
    assert "gradient_clip_val: 0.5" in lower[0].text


def test_no_lr_advice_when_instability_is_not_lr_related() -> None:
    # One NaN at a low LR, stable trials at higher LRs: the LR is not the explanation.
    records = [
        record("a", lr=5e-5),
        record("b", lr=1e-4, rows=history(nan_steps=(40,))),
        record("c", lr=2e-4),
        record("d", lr=4e-4),
    ]
    assert [
        a.kind for a in advise(records, [verdicts_for(records)[r.trial_id] for r in records])
    ] == []


def test_all_unstable_sweep_advises_halving_the_lowest_lr() -> None:
    records = [
        record("x", lr=2e-4, rows=history(nan_steps=(5,)), gradient_clip_val=1.0),
        record("y", lr=4e-4, rows=history(nan_steps=(3,))),
    ]
    (advice,) = advise(records, verdicts_for(records))
    assert advice.kind == "lower_lr"
    assert advice.trial_ids == ["x", "y"]
    assert advice.suggested == {"learning_rate": pytest.approx(1e-4), "gradient_clip_val": 0.5}


def steep_tail(step: int) -> float:
    return 3.0 - 0.015 * step  # still falling 0.3 over the last 20 of 100 steps


def test_advice_slow_convergence_when_best_is_still_improving() -> None:
    records = [
        record("steep", lr=1e-4, rows=history(loss=steep_tail), warmup_steps=500),
        record("flat", lr=5e-5, rows=history(loss=final_at(2.0))),
    ]
    assert tail_relative_drop(records[0]) == pytest.approx(0.285 / 1.65, rel=0.05)
    assert tail_relative_drop(records[1]) == pytest.approx(0.0, abs=1e-9)
    (advice,) = advise(records, verdicts_for(records))
    assert advice.kind == "slow_convergence"
    assert advice.trial_ids == ["steep"]
    assert advice.suggested == {"learning_rate": pytest.approx(2e-4), "warmup_steps": 100}


def test_slow_convergence_does_not_raise_lr_into_known_failures() -> None:
    records = [
        record("steep", lr=1e-4, rows=history(loss=steep_tail), warmup_steps=500),
        record("boom", lr=2e-4, rows=history(nan_steps=(9,))),
    ]
    slow = next(a for a in advise(records, verdicts_for(records)) if a.kind == "slow_convergence")
    assert slow.suggested == {"warmup_steps": 100}
    assert "do not raise learning_rate" in slow.text


def test_no_slow_convergence_advice_when_best_has_converged() -> None:
    records = [record("flat", rows=history(loss=final_at(1.0)), warmup_steps=500)]
    assert advise(records, verdicts_for(records)) == []


def test_advice_clipping_for_hot_unclipped_stable_trials() -> None:
    records = [
        record("hot", rows=history(grad=30.0)),
        record("hot_clipped", rows=history(grad=30.0), gradient_clip_val=40.0),
        record("cool", rows=history(grad=2.0)),
    ]
    (advice,) = advise(records, verdicts_for(records))
    assert advice.kind == "add_clipping"
    assert advice.trial_ids == ["hot"]
    # p90 of 30 * (1 + 0.1 sin) is ~33 -> clip around 33, above the seed's normal max 10.
    assert 30.0 < advice.suggested["gradient_clip_val"] < 34.0
    assert "0.1-10" in advice.text


def test_healthy_sweep_gets_no_advice() -> None:
    records = [record("a", lr=5e-5), record("b", lr=1e-4, rows=history(loss=final_at(1.1)))]
    assert advise(records, verdicts_for(records, StabilityRules())) == []


def test_advice_cites_the_clip_share_and_keeps_clipped_trials_stable() -> None:
    records = [
        record("c1", lr=1e-4, rows=_clipped(history(loss=final_at(1.0)), 1), gradient_clip_val=0.5),
        record("c2", lr=1e-3, rows=_clipped(history(loss=final_at(1.02)), 1),
               gradient_clip_val=0.5),
        record("free", lr=1e-4, rows=history(loss=final_at(1.3))),
    ]
    verdicts = verdicts_for(records)
    assert all(v.stable for v in verdicts.values())
    (advice,) = [a for a in advise(records, verdicts) if a.kind == "clip_share"]
    assert advice.trial_ids == ["c1", "c2"]
    assert advice.text.startswith(
        "gradient_clip_val 0.5 acted on 100% of steps (c1, c2), learning_rate 0.0001-0.001 "
        "giving final loss 1-1.02.")
    assert "the LR mattered less" in advice.text


# --------------------------------------------------------------------------- swept columns


def test_every_swept_key_is_a_column_of_leaderboard_md_and_csv(tmp_path: Path) -> None:
    """A sweep over model.lora.r, model.lora.target_modules and seed: each is a column, its
    value read from the trial's config.resolved.yaml (dotted keys) or its phase2 knobs."""
    from tuning.report import build_report

    sweep = tmp_path / "sweep"
    space = {"learning_rate": {"choice": [1e-4]}, "model.lora.r": {"choice": [4, 16]},
             "model.lora.target_modules": {"choice": [["q_proj"], ["q_proj", "v_proj"]]},
             "phase2.seed": {"choice": [1, 2]}}
    (sweep / "trials").mkdir(parents=True)
    (sweep / "search.snapshot.yaml").write_text(yaml.safe_dump({"search": {"space": space}}))
    trials = {"t_00000": (4, ["q_proj"], 1), "t_00001": (16, ["q_proj", "v_proj"], 2)}
    for trial_id, (r, modules, seed) in trials.items():
        run = sweep / "trials" / trial_id
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in history()))
        (run / "summary.json").write_text(json.dumps({"status": "completed"}))
        (run / "config.resolved.yaml").write_text(yaml.safe_dump({
            "phase2": {"learning_rate": 1e-4, "seed": seed},
            "model": {"lora": {"r": r, "target_modules": modules}}}))
    report = build_report(sweep)

    with report.files["leaderboard_csv"].open() as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or ())
        by_trial = {row["trial_id"]: row for row in reader}
    assert header[header.index("gradient_clip_val") + 1:][:3] == [
        "model.lora.r", "model.lora.target_modules", "seed"]
    assert header.count("learning_rate") == 1  # a swept key with its own column stays one
    assert by_trial["t_00001"]["model.lora.r"] == "16"
    assert json.loads(by_trial["t_00001"]["model.lora.target_modules"]) == ["q_proj", "v_proj"]
    assert by_trial["t_00000"]["seed"] == "1"

    lines = report.files["leaderboard_md"].read_text().splitlines()
    head = next(line for line in lines if line.startswith("| #"))
    cells = [c.strip() for c in head.strip("|").split("|")]
    at = cells.index("clip") + 1
    assert cells[at:at + 3] == ["model.lora.r", "model.lora.target_modules", "seed"]
    row = next(line for line in lines if "t_00001" in line)
    assert [c.strip() for c in row.strip("|").split("|")][at:at + 3] == [
        "16", "q_proj,v_proj", "2"]
    assert "model.lora.r" in report.table  # the terminal table too


def test_without_a_search_space_the_knobs_that_vary_are_the_columns() -> None:
    rows = build_leaderboard([record("a", seed=1, weight_decay=0.0),
                              record("b", seed=2, weight_decay=0.0)])
    text = format_markdown(rows)
    assert "| seed |" in text and "weight_decay" not in text
