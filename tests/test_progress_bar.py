"""Preparation progress: a tqdm bar (rate, time left) on a terminal, two plain lines when piped."""

from __future__ import annotations

import io
import sys

from trainer.progress_bar import progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_stderr_gets_a_start_and_an_end_line(capsys) -> None:
    assert list(progress(range(5), total=5, desc="[demo] pretraining", unit="step")) == \
        list(range(5))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[demo] pretraining: 5 step ..."
    assert lines[1].startswith("[demo] pretraining: done in ") and len(lines) == 2
    assert "\r" not in "".join(lines)  # no bar redraws in a log file


def test_a_terminal_gets_a_tqdm_bar_with_an_estimate(monkeypatch) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert sum(progress(range(4), total=4, desc="[feature-cache] encoding", unit="batch")) == 6
    text = term.getvalue()
    assert "[feature-cache] encoding" in text and "4/4" in text and "batch/s" in text
    assert "done in" not in text  # the bar replaces the plain lines
