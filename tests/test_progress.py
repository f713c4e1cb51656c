"""The live progress table: every swept key is a column; an unchanged table is not reprinted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuning.raytune.progress import ProgressCallback, format_table


@dataclass
class Trial:
    trial_id: str
    status: str = "PENDING"
    config: dict[str, Any] = field(default_factory=dict)


def test_every_swept_key_is_a_column() -> None:
    trials = [Trial("a_00000", "RUNNING", {"learning_rate": 1e-3, "model.lora.r": 8,
                                           "gradient_clip_val": None}),
              Trial("a_00001", "PENDING", {"learning_rate": 3e-4, "model.lora.r": 16,
                                           "gradient_clip_val": 1.0})]
    text = format_table(trials, {"a_00000": {"step": 10, "loss": 2.5}}, total=2)
    head, first, second = text.splitlines()[1:]
    assert head.split()[-3:] == ["lr", "lora.r", "clip"]
    assert first.split()[-3:] == ["1e-3", "8", "none"] and " 10 " in first
    assert second.split()[-3:] == ["3e-4", "16", "1"]


def test_an_unchanged_table_is_printed_once(capsys) -> None:
    trials = [Trial("a_00000", "PENDING", {"learning_rate": 1e-3})]
    progress = ProgressCallback(total_trials=1, every_s=0.0)
    progress.on_step_end(0, trials)
    progress.on_step_end(1, trials)
    assert capsys.readouterr().out.count("[sweep] 0/1 trials done") == 1
    trials[0].status = "RUNNING"
    progress.on_step_end(2, trials)
    assert "RUNNING" in capsys.readouterr().out


def test_the_end_summary_reports_the_whole_wall_time_and_its_parts() -> None:
    from tuning.sweep import format_clock

    clock = [("start", 100.0), ("preparation", 360.0), ("Ray start", 369.0),
             ("trials", 499.0), ("report", 512.0)]
    assert format_clock(clock) == (
        "412s (preparation 260s, Ray start 9s, trials 130s, report 13s)")
