"""Stability verdicts on synthetic Phase 2 metric histories, and run-directory loading."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tuning.analysis.stability import (
    StabilityRules,
    Verdict,
    index_verdicts,
    moving_average,
    smoothed_final_loss,
    smoothed_loss_at,
    verdict,
    verdicts_for,
)
from tuning.analysis.trial_record import TrialRecord, normalize_status


def decaying(step: int) -> float:
    """A healthy curve: 3.0 falling towards 1.0, with a small deterministic wiggle."""
    return 1.0 + 2.0 * math.exp(-step / 60) + 0.02 * math.sin(step)


def make_history(
    steps: int = 200,
    loss: Callable[[int], float | None] = decaying,
    grad: Callable[[int], float] = lambda s: 2.0 + 0.5 * math.sin(s / 7),
    clip: float | None = None,
    nan_steps: tuple[int, ...] = (),
    warmup: int = 20,
    base_lr: float = 1e-4,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    nan_count = 0
    for step in range(1, steps + 1):
        scale = (
            step / warmup
            if step <= warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        )
        value = None if step in nan_steps else loss(step)
        nan_count += step in nan_steps
        norm = grad(step)
        rows.append(
            {
                "step": step,
                "epoch": 0,
                "loss": value,
                "grad_norm": None if step in nan_steps else norm,
                "grad_norm/projector": norm * 0.9,
                "grad_norm/lora": norm * 0.3,
                "lr/projector": 5 * base_lr * scale,
                "lr/lora": 0.5 * base_lr * scale,
                "clipped": int(clip is not None and norm > clip),
                "skipped": int(step in nan_steps),
                "nan_events": nan_count,
                "samples_per_s": 10.0,
                "tokens_per_s": 5000.0,
            }
        )
    return rows


def make_record(
    trial_id: str = "t0",
    history: list[dict[str, Any]] | None = None,
    status: str = "TERMINATED",
    end_reason: str | None = "completed",
    nan_events: list[dict[str, Any]] | None = None,
    **params: Any,
) -> TrialRecord:
    base = {"learning_rate": 1e-4, "warmup_steps": 20, "gradient_clip_val": None}
    return TrialRecord(
        trial_id=trial_id,
        params={**base, **params},
        history=make_history() if history is None else history,
        status=status,
        end_reason=end_reason,
        nan_events=nan_events or [],
    )


def test_stable_decaying_loss_is_stable() -> None:
    v = verdict(make_record())
    assert v.stable is True
    assert v.kind == "stable"
    assert v.reasons == []
    assert v.nan_count == 0
    assert v.clip_fraction == 0.0
    assert 1.0 < v.final_loss < 1.1  # mean of the last 10 training losses
    assert v.final_loss_source == "train"


def test_nan_event_makes_trial_unstable_with_step_and_group() -> None:
    record = make_record(
        history=make_history(nan_steps=(37, 90)),
        nan_events=[
            {"step": 90, "where": "loss", "groups": []},
            {"step": 37, "where": "grad", "groups": ["projector"]},
        ],
    )
    v = verdict(record)
    assert not v.stable
    assert v.kind == "nan"
    assert v.nan_count == 2
    assert v.reasons == ["2 NaN events (first at step 37, group projector)"]


def test_nan_counted_from_history_when_summary_has_no_events() -> None:
    # A crashed trainer may never write its event list; skipped steps still count.
    v = verdict(make_record(history=make_history(nan_steps=(5,))))
    assert v.kind == "nan"
    assert v.reasons == ["1 NaN event (first at step 5)"]


def test_nan_events_tolerated_up_to_the_rule() -> None:
    record = make_record(history=make_history(nan_steps=(50,)))
    assert verdict(record, StabilityRules(max_nan_events=1)).stable


def test_nan_stop_end_reason_is_nan_even_within_tolerance() -> None:
    record = make_record(history=make_history(steps=60, nan_steps=(60,)), end_reason="nan_stop")
    v = verdict(record, StabilityRules(max_nan_events=5))
    assert v.kind == "nan"
    assert v.reasons == ["trainer stopped on NaN (nan_stop) at step 60"]


def test_loss_spike_is_diverged_and_reports_ratio_and_step() -> None:
    def spiky(step: int) -> float:
        return 12.0 if 110 <= step <= 130 else decaying(step)

    v = verdict(make_record(history=make_history(loss=spiky)))
    assert v.kind == "diverged"
    assert len(v.reasons) == 1
    # Start = mean of the first 10 losses (2.83); the trailing 10-step mean first reaches
    # 12.0 on step 119 (window 110-119) -> 4.2x.
    assert v.reasons == [
        "loss spiked to 4.2x its start at step 119 (smoothed 12 vs 2.83, limit 3x)"
    ]


def test_single_step_loss_blip_is_smoothed_away() -> None:
    v = verdict(make_record(history=make_history(loss=lambda s: 9.0 if s == 100 else decaying(s))))
    assert v.stable, v.reasons


def test_final_loss_above_start_is_diverged() -> None:
    def creeping(step: int) -> float:
        return 2.0 + step / 100  # 2.0 -> 4.0: never 3x, but ends above its start

    v = verdict(make_record(history=make_history(loss=creeping)))
    assert v.kind == "diverged"
    assert v.reasons == ["smoothed final loss 3.96 is above its smoothed start 2.06"]
    assert verdict(
        make_record(history=make_history(loss=creeping)), StabilityRules(final_above_start=False)
    ).stable


def test_trainer_diverged_end_reason() -> None:
    v = verdict(make_record(history=make_history(steps=80), end_reason="diverged"))
    assert v.kind == "diverged"
    assert "trainer stopped the run as diverged at step 80" in v.reasons


def test_persistently_high_grad_norm_is_unstable() -> None:
    v = verdict(make_record(history=make_history(grad=lambda s: 230.0 + (s % 5))))
    assert v.kind == "high_grad_norm"
    assert v.grad_norm_pctl == pytest.approx(234.0)  # norms cycle 230..234
    assert v.reasons == ["p90 grad norm 234 > 100"]


def test_isolated_grad_norm_spike_stays_stable() -> None:
    v = verdict(make_record(history=make_history(grad=lambda s: 5000.0 if s == 77 else 2.0)))
    assert v.stable, v.reasons
    assert v.grad_norm_pctl == pytest.approx(2.0)


def test_clipping_on_every_step_stays_stable_and_is_reported() -> None:
    # Clip at 0.5 with norms ~2: every step clipped. The seed's remedy, not a symptom.
    v = verdict(make_record(history=make_history(clip=0.5), gradient_clip_val=0.5))
    assert v.stable and v.kind == "stable"
    assert v.clip_fraction == 1.0
    assert v.reasons == []


def test_occasional_clipping_is_fine() -> None:
    v = verdict(make_record(history=make_history(clip=2.4), gradient_clip_val=2.4))
    assert v.stable
    assert 0.0 < v.clip_fraction < 0.5


def test_high_pre_clip_norm_is_unstable_even_when_clipped() -> None:
    # Clipping caps the update, but a pre-clip norm persistently above the seed's 100 still
    # says the setting is too hot: the rule reads the logged (pre-clip) norm.
    v = verdict(make_record(history=make_history(grad=lambda s: 300.0, clip=1.0),
                            gradient_clip_val=1.0))
    assert v.kind == "high_grad_norm" and not v.stable
    assert v.clip_fraction == 1.0


def _flat_after(level: float, start: float = 3.0) -> Callable[[int], float]:
    """Falls from ``start`` to ``level`` within 20 steps, then stays there."""
    return lambda s: level + (start - level) * math.exp(-s / 5) + 0.01 * math.sin(s)


def test_trial_that_learned_far_less_than_the_best_is_plateaued_with_numbers() -> None:
    best = make_record("best", history=make_history(loss=_flat_after(0.3)))
    stuck = make_record("stuck", history=make_history(loss=_flat_after(2.2)), learning_rate=1e-2)
    fine = make_record("fine", history=make_history(loss=_flat_after(0.5)))
    verdicts = verdicts_for([best, stuck, fine])
    assert verdicts["best"].kind == "stable" and verdicts["fine"].kind == "stable"
    v = verdicts["stuck"]
    assert v.kind == "plateaued" and v.stable  # shown as such, still in the stable set
    note = next(n for n in v.notes if n.startswith("plateaued"))
    assert "fell 13% by step 200" in note and "vs 78% for best" in note
    assert "limit 50% of the best" in note
    assert 0.1 < v.loss_drop < 0.2
    # Off when plateau_fraction is 0; a single verdict never plateaus (no sweep to compare).
    assert verdicts_for([best, stuck], StabilityRules(plateau_fraction=0))["stuck"].kind == "stable"
    assert verdict(stuck).kind == "stable"


def test_plateau_compares_an_early_stopped_trial_at_its_own_step() -> None:
    # Cut at step 30, when the best had only fallen to ~1.3: judged against that, not 0.3.
    best = make_record("best", history=make_history(loss=lambda s: 0.3 + 2.7 * math.exp(-s / 40)))
    cut = make_record("cut", history=make_history(
        steps=30, loss=lambda s: 0.3 + 2.7 * math.exp(-s / 60)), end_reason="early_stopped")
    verdicts = verdicts_for([best, cut])
    assert verdicts["cut"].early_stopped and verdicts["cut"].kind == "stable"


def test_error_status_is_failed_and_outranks_other_reasons() -> None:
    record = make_record(
        history=make_history(steps=40, nan_steps=(30,)), status="ERROR", end_reason="error"
    )
    v = verdict(record)
    assert v.kind == "failed"
    assert not v.stable
    assert v.reasons[0] == "trial status ERROR (error) at step 40"
    assert "1 NaN event (first at step 30)" in v.reasons  # every failing rule is listed


def test_no_history_is_incomplete() -> None:
    v = verdict(make_record(history=[], status="PENDING", end_reason=None))
    assert v.kind == "incomplete"
    assert v.reasons == ["no metrics logged (status PENDING)"]
    assert v.final_loss is None


def test_running_trial_is_incomplete() -> None:
    v = verdict(make_record(history=make_history(steps=50), status="RUNNING", end_reason=None))
    assert v.kind == "incomplete"
    assert v.reasons == ["still RUNNING at step 50"]


def test_asha_early_stopped_healthy_trial_is_stable_but_marked() -> None:
    v = verdict(make_record(history=make_history(steps=60), end_reason="early_stopped"))
    assert v.stable
    assert v.early_stopped
    assert v.notes == ["early-stopped by the scheduler at step 60"]


def test_short_terminated_run_without_reason_counts_as_early_stopped() -> None:
    record = make_record(history=make_history(steps=60), end_reason=None)
    record.total_steps = 200
    v = verdict(record)
    assert v.stable and v.early_stopped


def test_smoothed_final_loss_prefers_last_eval_loss() -> None:
    history = make_history()
    history[99]["eval_loss"] = 1.7
    history[199]["eval_loss"] = 1.25
    record = make_record(history=history)
    assert smoothed_final_loss(record, 10) == 1.25
    assert verdict(record).final_loss_source == "eval"


def test_smoothed_final_loss_is_mean_of_last_window_skipping_none() -> None:
    losses = [5.0, 4.0, 3.0, None, 2.0]
    history = [{"step": i + 1, "loss": x} for i, x in enumerate(losses)]
    assert smoothed_final_loss(make_record(history=history), 3) == pytest.approx(3.0)


def test_smoothed_loss_at_a_step_ignores_later_steps() -> None:
    history = [{"step": i + 1, "loss": float(10 - i)} for i in range(10)]
    record = make_record(history=history)
    assert smoothed_loss_at(record, 5, 2) == pytest.approx(6.5)  # steps 4 and 5: 7, 6
    assert smoothed_loss_at(record, 0, 2) is None


def test_moving_average_is_trailing_mean() -> None:
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5]
    assert moving_average([1.0, 2.0], 1) == [1.0, 2.0]


def test_rules_forbid_unknown_fields_and_validate_ranges() -> None:
    with pytest.raises(ValidationError):
        StabilityRules(max_nan=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        StabilityRules(max_clip_fraction=0.5)  # type: ignore[call-arg]  # no longer a rule
    with pytest.raises(ValidationError):
        StabilityRules(plateau_fraction=1.5)
    assert StabilityRules().grad_norm_limit == 100.0
    # Field docstrings become schema descriptions (used by the driver's config docs).
    assert "EMA" in StabilityRules.model_fields["smoothing_window"].description


def test_index_verdicts_accepts_list_or_mapping() -> None:
    records = [make_record("a"), make_record("b")]
    listed = [verdict(r) for r in records]
    by_id = index_verdicts(records, listed)
    assert list(by_id) == ["a", "b"]
    assert index_verdicts(records, by_id) == by_id
    with pytest.raises(ValueError):
        index_verdicts(records, listed[:1])
    with pytest.raises(KeyError):
        index_verdicts(records, {"a": listed[0]})
    assert isinstance(by_id["a"], Verdict)


# --------------------------------------------------------------------------- from_run_dir


def write_run_dir(
    path: Path, rows: list[dict[str, Any]], summary: dict[str, Any] | None, torn_tail: bool = False
) -> Path:
    path.mkdir(parents=True)
    lines = [json.dumps(row) for row in rows]
    if torn_tail:
        lines.append('{"step": 999, "loss": 1.')  # trainer caught mid-write
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    (path / "config.resolved.yaml").write_text(
        "model:\n  name: tiny\nphase2:\n  learning_rate: 1.0e-04\n  projector_lr: 0.0005\n"
        "  lora_lr: 5.0e-05\n  warmup_steps: 100\n  gradient_clip_val: null\n  seed: 3\n"
    )
    return path


def test_from_run_dir_reads_all_three_files(tmp_path: Path) -> None:
    rows = make_history(steps=30, nan_steps=(12,))
    summary = {
        "status": "completed",
        "end_reason": "completed",
        "nan_events": [{"step": 12, "where": "loss", "groups": []}],
        "steps_done": 30,
        "total_steps": 30,
        "final_loss": 1.5,
    }
    record = TrialRecord.from_run_dir(write_run_dir(tmp_path / "trial_7", rows, summary, True))
    assert record.trial_id == "trial_7"
    assert record.status == "TERMINATED"
    assert record.end_reason == "completed"
    assert record.total_steps == 30
    assert record.params == {
        "learning_rate": 1e-4,
        "projector_lr": 5e-4,
        "lora_lr": 5e-5,
        "warmup_steps": 100,
        "gradient_clip_val": None,
        "seed": 3,
    }
    assert [row["step"] for row in record.history] == list(range(1, 31))  # torn line dropped
    assert record.history[11]["loss"] is None
    assert record.nan_events == summary["nan_events"]
    assert record.projector_lr_mult == pytest.approx(5.0)
    assert record.lora_lr_mult == pytest.approx(0.5)
    assert verdict(record).kind == "nan"


def test_trainer_unstable_summary_keeps_the_specific_kind(tmp_path: Path) -> None:
    # trainer/metrics.py writes status "unstable" for runs it stopped itself.
    summary = {"status": "unstable", "end_reason": "diverged", "steps_done": 30}
    record = TrialRecord.from_run_dir(write_run_dir(tmp_path / "r", make_history(30), summary))
    assert record.status == "TERMINATED"
    assert verdict(record).kind == "diverged"


def test_from_run_dir_keeps_last_copy_of_a_repeated_step(tmp_path: Path) -> None:
    rows = make_history(5)
    redo = dict(rows[3], loss=0.123)
    run = write_run_dir(tmp_path / "r", [*rows, redo], None)
    history = TrialRecord.from_run_dir(run).history
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5]
    assert history[3]["loss"] == 0.123


def test_from_run_dir_without_summary_is_running(tmp_path: Path) -> None:
    record = TrialRecord.from_run_dir(write_run_dir(tmp_path / "r", make_history(10), None))
    assert record.status == "RUNNING"
    assert verdict(record).kind == "incomplete"


def test_from_run_dir_turns_nan_literals_into_none(tmp_path: Path) -> None:
    run = write_run_dir(tmp_path / "r", [], {"status": "TERMINATED", "end_reason": "completed"})
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": NaN, "grad_norm": Infinity}\n')
    record = TrialRecord.from_run_dir(run)
    assert record.history == [{"step": 1, "loss": None, "grad_norm": None}]


def test_from_run_dir_ignores_a_bare_nan_count_in_summary(tmp_path: Path) -> None:
    summary = {"status": "TERMINATED", "end_reason": "completed", "nan_events": 2}
    run = write_run_dir(tmp_path / "r", make_history(30, nan_steps=(4, 9)), summary)
    record = TrialRecord.from_run_dir(run)
    assert record.nan_events == []
    assert verdict(record).nan_count == 2  # still counted from the per-step metrics


@pytest.mark.parametrize(
    ("raw", "end_reason", "expected"),
    [
        ("TERMINATED", None, "TERMINATED"),
        ("error", None, "ERROR"),
        ("completed", None, "TERMINATED"),
        ("unstable", "diverged", "TERMINATED"),  # trainer stopped it; end_reason says why
        (None, "error", "ERROR"),
        (None, "completed", "TERMINATED"),
        ("exploded", None, "ERROR"),
    ],
)
def test_normalize_status(raw: str | None, end_reason: str | None, expected: str) -> None:
    assert normalize_status(raw, end_reason) == expected
