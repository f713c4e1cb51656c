"""The live progress table: every swept key is a column; on a terminal it is redrawn in place,
piped it prints only the rows that changed."""

from __future__ import annotations

import io
import os
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
                                           "gradient_clip_val": None,
                                           "model.lora.target_modules": ["q_proj"]}),
              Trial("a_00001", "PENDING", {"learning_rate": 3e-4, "model.lora.r": 16,
                                           "gradient_clip_val": 1.0,
                                           "model.lora.target_modules": ["q_proj", "v_proj"]})]
    text = format_table(trials, {"a_00000": {"step": 10, "loss": 2.5}}, total=2)
    head, first, second = text.splitlines()[1:]
    assert head.split()[-4:] == ["lr", "lora.r", "clip", "lora.target_modules"]
    assert first.split()[-4:] == ["1e-3", "8", "none", "q_proj"] and " 10 " in first
    assert second.split()[-4:] == ["3e-4", "16", "1", "q_proj,v_proj"]  # a list, comma-joined


class FakeStream(io.StringIO):
    """A stream that says whether it is a terminal, as sys.stdout does."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def take(self) -> str:
        text = self.getvalue()
        self.seek(0)
        self.truncate()
        return text


def two_trials() -> list[Trial]:
    return [Trial("a_00000", "PENDING", {"learning_rate": 1e-3, "model.lora.r": 8}),
            Trial("a_00001", "PENDING", {"learning_rate": 3e-4, "model.lora.r": 16})]


def result(progress: ProgressCallback, trial: Trial, step: int, loss: float) -> None:
    progress.on_trial_result(0, [], trial, {"step": step, "loss": loss})


def test_piped_the_table_is_printed_once_then_only_changed_rows() -> None:
    trials, out = two_trials(), FakeStream(tty=False)
    progress = ProgressCallback(total_trials=2, every_s=0.0, stream=out)
    progress.on_step_end(0, trials)
    first = out.take().splitlines()
    assert first[0] == "[sweep] 0/2 trials done" and first[1].split()[-2:] == ["lr", "lora.r"]
    assert [line.split()[0] for line in first[2:]] == ["a_00000", "a_00001"]
    progress.on_step_end(1, trials)  # both still PENDING: nothing at all
    assert out.take() == ""
    trials[1].status = "RUNNING"
    result(progress, trials[1], 10, 2.5)
    progress.on_step_end(2, trials)
    title, row = out.take().splitlines()  # the title and the one row that changed
    assert title == "[sweep] 0/2 trials done"
    assert row.split()[:4] == ["a_00001", "RUNNING", "10", "2.5"]
    assert row.split()[-2:] == ["3e-4", "16"]  # the swept values stay on the row
    assert "\x1b" not in title + row  # no terminal codes in a log file
    # Ray calls on_trial_complete while the trial's status still says RUNNING.
    progress.on_trial_complete(3, trials, trials[1])
    title, row = out.take().splitlines()
    assert title == "[sweep] 1/2 trials done" and row.split()[:2] == ["a_00001", "TERMINATED"]
    progress.on_trial_error(4, trials, trials[0])
    assert out.take().splitlines()[1].split()[:2] == ["a_00000", "ERROR"]


def test_piped_a_new_column_reprints_the_whole_table() -> None:
    trials, out = two_trials(), FakeStream(tty=False)
    progress = ProgressCallback(total_trials=3, every_s=0.0, stream=out)
    progress.on_step_end(0, trials)
    out.take()
    trials.append(Trial("a_00002", "PENDING", {"learning_rate": 1e-3, "model.lora.r": 1024}))
    progress.on_step_end(1, trials)  # "1024" widens the lora.r column: rows realigned
    lines = out.take().splitlines()
    assert len(lines) == 5 and lines[1].split()[0] == "trial"


def test_on_a_terminal_the_table_is_redrawn_in_place() -> None:
    trials, out = two_trials(), FakeStream(tty=True)
    progress = ProgressCallback(total_trials=2, every_s=0.0, stream=out)
    progress.on_step_end(0, trials)
    first = out.take()
    assert not first.startswith("\x1b") and first.count("\n") == 4  # title, header, 2 rows
    progress.on_step_end(1, trials)
    assert out.take() == ""  # unchanged: not even a redraw
    trials[0].status = "RUNNING"
    result(progress, trials[0], 5, 3.0)
    progress.on_step_end(2, trials)
    second = out.take()
    # up over the 4 lines drawn, to column 0, clear to the end of the screen, draw again
    assert second.startswith("\x1b[4A\r\x1b[J")
    lines = second.removeprefix("\x1b[4A\r\x1b[J").splitlines()
    assert len(lines) == 4 and lines[2].split()[:4] == ["a_00000", "RUNNING", "5", "3"]
    assert lines[3].split()[:2] == ["a_00001", "PENDING"]  # unchanged rows are redrawn too


def test_on_a_terminal_a_wrapped_line_is_counted_when_moving_back_up(monkeypatch) -> None:
    monkeypatch.setattr("shutil.get_terminal_size", lambda: os.terminal_size((40, 50)))
    trials, out = two_trials(), FakeStream(tty=True)
    progress = ProgressCallback(total_trials=2, every_s=0.0, stream=out)
    progress.on_step_end(0, trials)
    drawn = out.take().splitlines()
    rows = sum(-(-len(line) // 40) for line in drawn)
    assert rows > len(drawn)  # the header and rows are wider than 40 columns
    trials[0].status = "RUNNING"
    progress.on_step_end(1, trials)
    assert out.take().startswith(f"\x1b[{rows}A")


def test_on_a_short_terminal_finished_trials_make_room(monkeypatch) -> None:
    monkeypatch.setattr("shutil.get_terminal_size", lambda: os.terminal_size((200, 6)))
    trials = [Trial(f"a_0000{i}", "TERMINATED" if i < 3 else "RUNNING") for i in range(5)]
    out = FakeStream(tty=True)
    ProgressCallback(total_trials=5, every_s=0.0, stream=out).on_step_end(0, trials)
    lines = out.take().splitlines()
    assert len(lines) == 5  # one line left for the cursor
    assert [line.split()[0] for line in lines[2:4]] == ["a_00003", "a_00004"]
    assert lines[4] == "  ... 3 more trials (all of them in the report)"


def test_in_place_off_prints_changes_even_on_a_terminal() -> None:
    trials, out = two_trials(), FakeStream(tty=True)
    progress = ProgressCallback(total_trials=2, every_s=0.0, stream=out, in_place=False)
    progress.on_step_end(0, trials)
    trials[0].status = "RUNNING"
    progress.on_step_end(1, trials)
    assert "\x1b" not in out.getvalue() and out.getvalue().count("a_00001") == 1


def test_the_end_summary_reports_the_whole_wall_time_and_its_parts() -> None:
    from tuning.sweep import format_clock

    clock = [("start", 100.0), ("preparation", 360.0), ("Ray start", 369.0),
             ("trials", 499.0), ("report", 512.0)]
    assert format_clock(clock) == (
        "412s (preparation 260s, Ray start 9s, trials 130s, report 13s)")
