"""Robustness re-check: plan (seeds x LR factors), matching runs, summary and recommendation."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tuning.analysis.recheck import (
    STATUS_NOT_REPRODUCIBLE,
    STATUS_OUTSIDE,
    STATUS_RECOMMENDED,
    RecheckTrial,
    explain_plan,
    match_plan,
    recheck_plan,
    summarize,
)
from tuning.analysis.recheck_report import format_recheck, write_recheck
from tuning.analysis.stability import StabilityRules
from tuning.analysis.trial_record import TrialRecord

RULES = StabilityRules()
SEEDS = [1, 2, 3]
STEPS = 60


# --------------------------------------------------------------------------- synthetic runs


def stable_history(final: float, steps: int = STEPS) -> list[dict[str, Any]]:
    """Training loss falling 3.0 -> ~1.0; the last row's eval_loss fixes the final loss."""
    rows = [
        {
            "step": s,
            "loss": 1.0 + 2.0 * math.exp(-s / 10),
            "grad_norm": 2.0,
            "clipped": 0,
            "skipped": 0,
            "nan_events": 0,
        }
        for s in range(1, steps + 1)
    ]
    rows[-1]["eval_loss"] = final
    return rows


def nan_history(at: int = 30) -> list[dict[str, Any]]:
    """Healthy until step ``at``, where the loss goes NaN and the trainer stops."""
    rows = stable_history(1.0, at)
    rows[-1].pop("eval_loss")
    rows[-1].update(loss=None, grad_norm=None, skipped=1, nan_events=1)
    return rows


def resolved_params(lr: float, **extra: Any) -> dict[str, Any]:
    """A phase2 section as config.resolved.yaml writes it: every knob, group LRs resolved."""
    params = {
        "learning_rate": lr,
        "projector_lr": lr * 5.0,
        "lora_lr": lr * 0.5,
        "warmup_steps": 20,
        "gradient_clip_val": None,
        "epochs": 2,
        "batch_size": 2,
        "seed": 42,
        "gradient_accumulation_steps": 1,
        "total_training_steps": STEPS,
        "precision": "fp32",
        "nan_policy": "stop",
        "projector_lr_mult": 5.0,
        "lora_lr_mult": 0.5,
        "weight_decay": 0.0,
        "max_consecutive_nan": 5,
        "divergence_factor": 4.0,
        "adam_betas": [0.9, 0.999],
        "adam_eps": 1e-8,
    }
    params.update(extra)
    return params


def sweep_record(
    trial_id: str, lr: float, final: float, nan: bool = False, **extra: Any
) -> TrialRecord:
    return TrialRecord(
        trial_id=trial_id,
        params=resolved_params(lr, **extra),
        history=nan_history() if nan else stable_history(final),
        status="TERMINATED",
        end_reason="nan_stop" if nan else "completed",
        nan_events=[{"step": 30, "where": "loss", "groups": ["projector"]}] if nan else [],
        total_steps=STEPS,
    )


def sweep() -> list[TrialRecord]:
    """A (best loss), B (3% worse), C (20% worse), D (lowest loss, but NaN)."""
    return [
        sweep_record("C", 3e-5, 1.20),
        sweep_record("A", 2e-4, 1.00),
        sweep_record("D", 5e-3, 0.50, nan=True),
        sweep_record("B", 1e-4, 1.03),
    ]


def trainer_resolved(config: dict[str, Any]) -> dict[str, Any]:
    """What the trainer writes for a re-check run: group LRs derived when not explicit."""
    out = dict(config)
    for group in ("projector", "lora"):
        if out.get(f"{group}_lr") is None:
            out[f"{group}_lr"] = out["learning_rate"] * out[f"{group}_lr_mult"]
    return out


Outcome = Callable[[RecheckTrial], tuple[bool, float]]  # -> (went NaN?, final loss)


def run_plan(
    plan: list[RecheckTrial],
    outcome: Outcome,
    skip: Callable[[RecheckTrial], bool] = lambda t: False,
) -> list[TrialRecord]:
    """Fake the re-check sweep: one record per plan entry, named as Ray would name it."""
    records = []
    for index, trial in enumerate(plan):
        if skip(trial):
            continue
        nan, final = outcome(trial)
        records.append(
            TrialRecord(
                trial_id=f"ray_{index:05d}",
                params=trainer_resolved(trial.config),
                history=nan_history() if nan else stable_history(final),
                status="TERMINATED",
                end_reason="nan_stop" if nan else "completed",
                nan_events=[],
                total_steps=STEPS,
            )
        )
    return records


BASE_LOSS = {"A": 1.00, "B": 1.03, "C": 1.20}
SEED_JITTER = {1: 0.0, 2: 0.01, 3: -0.01}


def loss_of(trial: RecheckTrial, base: dict[str, float] | None = None) -> float:
    return (base or BASE_LOSS)[trial.source_trial] + SEED_JITTER[trial.seed]


def a_cliff(trial: RecheckTrial) -> tuple[bool, float]:
    """A's x1.5 neighbour goes NaN in seeds 1 and 2; everything else is stable."""
    nan = trial.source_trial == "A" and trial.lr_factor == 1.5 and trial.seed in (1, 2)
    return nan, loss_of(trial)


def all_stable(trial: RecheckTrial) -> tuple[bool, float]:
    return False, loss_of(trial)


def summary_for(
    outcome: Outcome,
    records: list[TrialRecord] | None = None,
    skip: Callable[[RecheckTrial], bool] = lambda t: False,
    top_k: int = 3,
):
    plan = recheck_plan(records or sweep(), RULES, top_k=top_k, seeds=SEEDS)
    return summarize(match_plan(plan, run_plan(plan, outcome, skip)), RULES)


def entry(summary, name: str):
    return next(e for e in summary.entries if e.source_trial == name)


# --------------------------------------------------------------------------- plan


def test_plan_size_is_k_times_seeds_times_factors() -> None:
    plan = recheck_plan(sweep(), RULES, top_k=3, seeds=SEEDS)
    assert len(plan) == 3 * 3 * 3
    combos = {(t.source_trial, t.seed, t.lr_factor) for t in plan}
    assert len(combos) == 27
    assert {t.lr_factor for t in plan} == {0.67, 1.0, 1.5}
    assert {t.seed for t in plan} == set(SEEDS)
    assert all(t.config["seed"] == t.seed for t in plan)


def test_plan_takes_top_stable_trials_in_leaderboard_order() -> None:
    plan = recheck_plan(sweep(), RULES, top_k=2, seeds=[0])
    # D has the lowest loss but went NaN; C is stable but ranked third.
    assert list(dict.fromkeys(t.source_trial for t in plan)) == ["A", "B"]
    assert {t.source_trial: t.source_rank for t in plan} == {"A": 1, "B": 2}


def test_plan_keeps_an_always_clipped_trial_and_skips_a_plateaued_one() -> None:
    clipped = sweep_record("K", 1e-4, 1.01, gradient_clip_val=0.5)
    for row in clipped.history:
        row["clipped"] = 1  # clip acted on every step: the seed's remedy, still stable
    flat = sweep_record("P", 1e-6, 2.9)
    for row in flat.history:
        row["loss"] = 2.9 + 0.1 * math.exp(-row["step"] / 10)  # barely learned
    plan = recheck_plan([*sweep(), clipped, flat], RULES, top_k=10, seeds=[0])
    sources = list(dict.fromkeys(t.source_trial for t in plan))
    assert "K" in sources and "P" not in sources


def test_top_k_beyond_stable_count_uses_what_exists() -> None:
    plan = recheck_plan(sweep(), RULES, top_k=5, seeds=[0, 1])
    assert len(plan) == 3 * 2 * 3
    message = explain_plan(plan, sweep(), RULES, top_k=5)
    assert "only 3 stable of the 5 asked for" in message
    assert "= 18 runs" in message


def test_derived_group_lrs_follow_the_scaled_base_lr() -> None:
    plan = recheck_plan([sweep_record("A", 2e-4, 1.0)], RULES, top_k=1, seeds=[7])
    by_factor = {t.lr_factor: t.config for t in plan}
    assert by_factor[1.5]["learning_rate"] == 3e-4  # tidied: no 0.00030000000000000003
    assert by_factor[0.67]["learning_rate"] == pytest.approx(1.34e-4, rel=1e-12)
    for config in by_factor.values():
        # Derived LRs stay derived: None makes the trainer use the (unchanged) multiplier.
        assert config["projector_lr"] is None and config["lora_lr"] is None
        assert config["projector_lr_mult"] == 5.0 and config["lora_lr_mult"] == 0.5


def test_explicit_group_lrs_are_scaled_by_the_same_factor() -> None:
    record = sweep_record("E", 1e-4, 1.0, projector_lr=2e-3)  # 20x, not the 5x mult
    plan = recheck_plan([record], RULES, top_k=1, seeds=[7])
    for trial in plan:
        f = trial.lr_factor
        assert trial.config["learning_rate"] == pytest.approx(1e-4 * f, rel=1e-12)
        assert trial.config["projector_lr"] == pytest.approx(2e-3 * f, rel=1e-12)
        assert trial.config["projector_lr"] / trial.config["learning_rate"] == pytest.approx(20)
        assert trial.config["lora_lr"] is None  # lora was derived (0.5x)


def test_plan_configs_through_trial_config_give_scaled_effective_lrs(tmp_path: Path) -> None:
    from trainer.config import config_from_data
    from tuning.raytune.trainable import TrialOptions, trial_config

    opts = TrialOptions(
        trials_dir=tmp_path,
        report_every=10,
        checkpoint_every=50,
        keep_checkpoints=2,
        nan_policy="stop",
        divergence_factor=4.0,
        stall_timeout_s=600,
        worst_loss=1e4,
        cpus_per_trial=1,
    )
    # The base config pins an explicit projector_lr: a derived trial must not inherit it.
    base = {"phase2": {"learning_rate": 1e-4, "projector_lr": 9e-4, "epochs": 1}}
    records = [
        sweep_record("A", 2e-4, 1.00),
        sweep_record("E", 1e-4, 1.01, projector_lr=2e-3, lora_lr=1e-5),
    ]
    original = {"A": (1e-3, 1e-4), "E": (2e-3, 1e-5)}  # effective (projector, lora) LRs
    for trial in recheck_plan(records, RULES, top_k=2, seeds=[3]):
        cfg = config_from_data(trial_config(base, trial.config, "t", opts), "test")
        proj, lora = original[trial.source_trial]
        assert cfg.phase2.resolved_projector_lr == pytest.approx(proj * trial.lr_factor)
        assert cfg.phase2.resolved_lora_lr == pytest.approx(lora * trial.lr_factor)
        assert cfg.phase2.seed == 3


def test_factor_one_reproduces_the_original_knobs_except_seed() -> None:
    record = sweep_record("A", 2e-4, 1.0, weight_decay=0.01, gradient_clip_val=1.0)
    plan = recheck_plan([record], RULES, top_k=1, seeds=[9])
    config = next(t.config for t in plan if t.lr_factor == 1.0)
    resolved = trainer_resolved(config)
    for key, value in record.params.items():
        if key != "seed":
            assert resolved[key] == pytest.approx(value), key
    assert resolved["seed"] == 9


def test_swept_keys_limit_the_carried_knobs() -> None:
    record = sweep_record("A", 2e-4, 1.0, weight_decay=0.01)
    plan = recheck_plan(
        [record], RULES, top_k=1, seeds=[0], swept_keys=["learning_rate", "phase2.weight_decay"]
    )
    config = plan[0].config
    assert config["weight_decay"] == 0.01
    assert {"warmup_steps", "gradient_clip_val", "projector_lr_mult", "seed"} <= set(config)
    assert "epochs" not in config and "batch_size" not in config


def test_non_phase2_swept_key_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model\.lora\.r"):
        recheck_plan(sweep(), RULES, top_k=1, seeds=[0], swept_keys=["model.lora.r"])


@pytest.mark.parametrize(
    ("top_k", "seeds", "factors", "match"),
    [
        (0, [1], [1.0], "top_k"),
        (1, [], [1.0], "seeds"),
        (1, [1, 1], [1.0], "seeds"),
        (1, [1], [0.5, 2.0], "include 1.0"),
        (1, [1], [1.0, -1.5], "> 0"),
        (1, [1], [1.0, 1.0], "repeat"),
    ],
)
def test_bad_plan_arguments_are_refused(
    top_k: int, seeds: list[int], factors: list[float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        recheck_plan(sweep(), RULES, top_k=top_k, seeds=seeds, lr_factors=factors)


def test_record_without_learning_rate_is_refused() -> None:
    record = sweep_record("A", 2e-4, 1.0)
    record.params = {}
    with pytest.raises(ValueError, match="no learning_rate"):
        recheck_plan([record], RULES, top_k=1, seeds=[0])


# --------------------------------------------------------------------------- zero stable


def test_zero_stable_trials_give_an_empty_plan_and_a_clear_message(tmp_path: Path) -> None:
    records = [sweep_record("X", 1e-2, 0.5, nan=True), sweep_record("Y", 5e-2, 0.4, nan=True)]
    plan = recheck_plan(records, RULES, top_k=3, seeds=SEEDS)
    assert plan == []
    assert explain_plan(plan, records, RULES).startswith("No stable trial among 2 trials (2 nan)")
    assert explain_plan([], [], RULES) == "No trials in the sweep: nothing to re-check."
    summary = summarize(match_plan(plan, []), RULES)
    assert summary.recommended is None and summary.entries == []
    assert "no stable trial to re-check" in summary.message
    assert summary.message in format_recheck(summary)
    md, path_csv = write_recheck(summary, tmp_path / "r.md", tmp_path / "r.csv")
    assert md.read_text() == format_recheck(summary)
    assert list(csv.reader(path_csv.open()))[1:] == []


# --------------------------------------------------------------------------- summary


def test_recommendation_moves_off_a_best_trial_next_to_a_cliff() -> None:
    summary = summary_for(a_cliff)
    a, b, c = entry(summary, "A"), entry(summary, "B"), entry(summary, "C")
    assert summary.sweep_best == "A"
    assert summary.recommended == "B" and summary.overturned
    assert (a.stable_runs, a.total_runs) == (7, 9) and a.broke_first == 1.5
    assert not a.neighbours_stable and a.reproducible and a.within_tolerance
    assert b.margin == 1.0 and b.neighbours_stable and b.status == STATUS_RECOMMENDED
    assert c.status == STATUS_OUTSIDE and "20.0% above the best mean 1 (tolerance 5%)" in c.reason
    assert "instead of the sweep's best trial A" in summary.message
    assert "trial A sits next to a cliff: x1.5 went NaN in 2/3 seeds" in summary.message
    assert "sits next to a cliff: x1.5 went NaN in 2/3 seeds" in a.reason


def test_mean_and_std_are_over_seeds_at_factor_one() -> None:
    summary = summary_for(a_cliff)
    a = entry(summary, "A")
    expected = [1.00, 1.01, 0.99]
    assert a.mean_loss == pytest.approx(statistics.fmean(expected))
    assert a.std_loss == pytest.approx(statistics.stdev(expected))
    assert a.seeds_at_1x == a.runs_at_1x == 3
    assert summary.best_mean_loss == pytest.approx(1.0)


def test_recommendation_stays_on_the_best_trial_when_it_is_robust() -> None:
    summary = summary_for(all_stable)
    assert summary.recommended == "A" and not summary.overturned
    assert summary.message.startswith("Trial A, the sweep's best, holds up: stable in 9/9 runs")
    assert all(e.margin == 1.0 and e.broke_first is None for e in summary.entries)
    # Equal margin: B loses the tie on mean loss, and says so.
    assert "as robust, but its mean loss is higher than trial A's" in entry(summary, "B").reason


def test_cliff_alone_does_not_switch_to_a_config_outside_tolerance() -> None:
    losses = {"A": 1.00, "B": 1.10, "C": 1.20}
    summary = summary_for(lambda t: (a_cliff(t)[0], loss_of(t, losses)))
    assert summary.recommended == "A" and not summary.overturned
    assert "stays the pick with a caveat: x1.5 went NaN in 2/3 seeds" in summary.message
    assert entry(summary, "B").status == STATUS_OUTSIDE


def test_best_trial_unstable_at_its_own_lr_is_not_a_candidate() -> None:
    def outcome(trial: RecheckTrial) -> tuple[bool, float]:
        nan = trial.source_trial == "A" and trial.lr_factor == 1.0 and trial.seed == 2
        return nan, loss_of(trial)

    summary = summary_for(outcome)
    a = entry(summary, "A")
    assert a.status == STATUS_NOT_REPRODUCIBLE and not a.reproducible
    assert a.broke_first == 1.0
    assert a.seeds_at_1x == 2 and a.runs_at_1x == 3
    assert "| 0.995 (2/3 seeds) |" in format_recheck(summary)
    assert summary.recommended == "B"
    assert "trial A is not reproducible: unstable at its own LR in 1/3 seeds" in summary.message


def test_seed_luck_is_named_when_the_best_falls_outside_tolerance() -> None:
    # A ranked first in the sweep, but over three seeds it is 10% worse than B.
    losses = {"A": 1.10, "B": 1.00, "C": 1.20}
    summary = summary_for(lambda t: (False, loss_of(t, losses)))
    assert summary.recommended == "B"
    assert "trial A's sweep loss looks like seed luck: over 3 seeds" in summary.message
    assert "10.0% above the best mean" in summary.message


def test_no_recommendation_when_nothing_is_reproducible() -> None:
    summary = summary_for(lambda t: (t.lr_factor == 1.0 and t.seed == 1, loss_of(t)))
    assert summary.recommended is None
    assert summary.message.startswith("No recommendation: none of the 3 re-checked configs")
    assert {e.status for e in summary.entries} == {STATUS_NOT_REPRODUCIBLE}


def test_missing_runs_count_as_unfinished_not_stable() -> None:
    def skip(trial: RecheckTrial) -> bool:
        return trial.source_trial == "B" and trial.lr_factor == 0.67 and trial.seed == 3

    summary = summary_for(all_stable, skip=skip)
    b = entry(summary, "B")
    assert (b.stable_runs, b.total_runs) == (8, 9)
    assert b.broke_first == 0.67
    assert "x0.67 did not finish in 1/3 seeds" in b.reason
    assert summary.recommended == "A"


def test_match_plan_pairs_runs_by_their_knobs() -> None:
    plan = recheck_plan(sweep(), RULES, top_k=3, seeds=SEEDS)
    runs = run_plan(plan, all_stable)
    matched = match_plan(plan, list(reversed(runs)))  # order must not matter
    assert list(matched) == ["A", "B", "C"]
    for source, pairs in matched.items():
        assert len(pairs) == 9
        for trial, record in pairs:
            assert trial.source_trial == source
            assert record.params["seed"] == trial.seed
            assert record.params["learning_rate"] == pytest.approx(trial.config["learning_rate"])


# --------------------------------------------------------------------------- output


def test_format_recheck_has_one_row_per_config_and_factor_columns() -> None:
    text = format_recheck(summary_for(a_cliff))
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| sweep rank"))
    assert "stable x0.67" in header and "stable x1" in header and "stable x1.5" in header
    rows = [line for line in lines if line.startswith("| ") and line != header]
    assert [row.split("|")[2].strip() for row in rows] == ["A", "B", "C"]
    a_cells = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    assert a_cells[5:8] == ["3/3", "3/3", "1/3"] and a_cells[8] == "x1.5"


def test_write_recheck_csv_round_trips(tmp_path: Path) -> None:
    summary = summary_for(a_cliff)
    md, path_csv = write_recheck(
        summary, tmp_path / "out" / "recheck.md", tmp_path / "out" / "recheck.csv"
    )
    assert md.read_text() == format_recheck(summary)
    rows = list(csv.DictReader(path_csv.open()))
    assert [r["trial_id"] for r in rows] == ["A", "B", "C"]
    by_id = {r["trial_id"]: r for r in rows}
    assert by_id["B"]["recommended"] == "true" and by_id["A"]["recommended"] == "false"
    assert float(by_id["A"]["margin"]) == pytest.approx(7 / 9)
    assert by_id["A"]["stable_x1.5"] == "1/3" and by_id["A"]["broke_first"] == "1.5"
    assert float(by_id["A"]["mean_loss"]) == pytest.approx(1.0)
