"""trainer.step_profile: a profile of warm steps of a loop that keeps running."""

from __future__ import annotations

import time

import torch

from trainer.step_profile import StepProfiler


def test_profiles_the_steps_after_enough_short_ones_in_a_row(tmp_path):
    path = tmp_path / "profile.txt"
    prof = StepProfiler(path, steps=2, warm=2, long_s=0.2)
    x = torch.randn(64, 64)
    # short, long (restarts the count), short, short: the 5th and 6th steps are profiled
    for i, pause in enumerate([0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0]):
        with prof.step():
            time.sleep(pause)
            y = x @ x if i in (4, 5) else x + 1  # only the profiled steps multiply
        assert prof.written == (i >= 5), i
        assert (prof.report_s > 0) == prof.written  # the report's time, for the caller
    text = path.read_text()
    assert text.startswith("2 steps profiled: wall "), text[:200]
    assert "aten::mm" in text and "aten::add" not in text, text  # steps 5 and 6 only
    assert y.shape == (64, 64)
