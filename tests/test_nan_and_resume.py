"""NaN guard per group, the NaN policies, divergence, and exact resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from trainer.loop import train
from trainer.metrics import MemorySink


def _poison(step_at: int, group: str, until: int | None = None):
    """after_backward hook: make one group's gradient NaN at step_at (..until)."""
    def hook(step: int, model) -> None:
        if step_at <= step <= (until or step_at):
            for name, p in model.named_parameters():
                if p.grad is not None and (name.startswith("projector.") == (group == "projector")):
                    p.grad.fill_(float("nan"))
    return hook


def _run(cfg, hook=None):
    sink = MemorySink()
    summary = train(cfg, sink, after_backward=hook, console=False, log=lambda *_: None)
    return summary, sink


@pytest.mark.parametrize("group", ["projector", "lora"])
def test_nan_in_one_group_is_one_event_naming_it_and_the_step_is_skipped(tiny, group):
    cfg = tiny(epochs=1, nan_policy="skip")
    summary, sink = _run(cfg, _poison(3, group))
    assert summary.status == "completed"
    assert len(summary.nan_events) == 1
    ev = summary.nan_events[0]
    assert (ev.step, ev.where, ev.groups, ev.action) == (3, "grad", [group], "skipped")
    rec = sink.records[2]
    assert rec["skipped"] == 1 and rec["nan_events"] == 1
    assert math.isnan(rec[f"grad_norm/{group}"])
    other = "lora" if group == "projector" else "projector"
    assert math.isfinite(rec[f"grad_norm/{other}"])
    # the skipped step did not touch the weights: no NaN reached any parameter
    weights = (cfg.output.root / "run" / "trainable.safetensors")
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(str(weights)).values())
    # jsonl holds null, not NaN (strict JSON)
    lines = (cfg.output.root / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[2])[f"grad_norm/{group}"] is None


def test_stop_policy_ends_the_run_unstable(tiny):
    summary, sink = _run(tiny(epochs=1, nan_policy="stop"), _poison(4, "projector"))
    assert (summary.status, summary.end_reason, summary.steps_done) == ("unstable", "nan_stop", 4)
    assert summary.nan_events[0].action == "stopped"
    assert summary.to_json()["first_nan_group"] == "projector"
    assert len(sink.records) == 4


def test_skip_policy_aborts_after_n_in_a_row(tiny):
    cfg = tiny(epochs=2, nan_policy="skip", max_consecutive_nan=3)
    summary, _ = _run(cfg, _poison(2, "lora", until=100))
    assert (summary.end_reason, summary.steps_done) == ("nan_abort", 4)
    assert [e.action for e in summary.nan_events] == ["skipped", "skipped", "aborted"]


def test_non_finite_loss_is_a_loss_event(tiny):
    def break_weights(step, model):
        if step == 2:
            with torch.no_grad():
                model.projector.net[0].weight.fill_(float("inf"))

    summary, sink = _run(tiny(epochs=1, nan_policy="stop"), break_weights)
    assert summary.end_reason == "nan_stop"
    ev = summary.nan_events[0]
    assert (ev.step, ev.where) == (3, "loss")
    assert math.isnan(sink.records[-1]["loss"])


def test_divergence_rule_on_a_synthetic_loss_history():
    from trainer.config import Phase2
    from trainer.loop import State, _apply_policy

    p2 = Phase2(divergence_factor=2.0)
    state = State()
    reasons = [_apply_policy(p2, state, None, loss) for loss in [4.0, 3.0, 2.5, 9.0, 30.0, 60.0]]
    # EMA(0.9) of the loss crosses 2 x the first loss (8.0) only at the sustained blow-up
    assert reasons == [None, None, None, None, None, "diverged"]
    assert _apply_policy(Phase2(), State(), None, 1e9) is None  # off by default


def test_resume_reproduces_the_uninterrupted_losses_exactly(tiny):
    straight = tiny(run_name="straight", epochs=2)
    straight.output.checkpoint_every = 4
    _, full = _run(straight)

    cfg = tiny(run_name="cut", epochs=2)
    cfg.output.checkpoint_every = 4

    class Crash(Exception):
        pass

    def crash(step, model):
        if step == 11:
            raise Crash

    with pytest.raises(Crash):
        _run(cfg, crash)
    run_dir = cfg.output.root / "cut"
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == [
        "step_000004", "step_000008"]
    sink = MemorySink()
    summary = train(cfg, sink, resume=True, console=False, log=lambda *_: None)
    assert [r["step"] for r in sink.records] == list(range(9, 19))
    assert summary.steps_done == 18
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    resumed = [json.loads(x)["loss"] for x in lines]
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 19))  # each step once
    assert resumed == [r["loss"] for r in full.records]  # bit-identical


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tiny):
    cfg = tiny(run_name="trunc", epochs=1)
    cfg.output.checkpoint_every = 3
    cfg.output.keep_checkpoints = 3
    _run(cfg)
    ckpts = sorted((cfg.output.root / "trunc" / "checkpoints").iterdir())
    newest = ckpts[-1] / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # torn write
    shutil.rmtree(ckpts[-1].parent.parent / "trainable.safetensors", ignore_errors=True)
    from trainer.checkpoint import latest_readable
    found = latest_readable(ckpts[-1].parent, log=lambda *_: None)
    assert found is not None and found[0] == ckpts[-2]
