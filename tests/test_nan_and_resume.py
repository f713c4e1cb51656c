"""NaN guard per group, the NaN policies, divergence, and exact resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from trainer.loop import train
from trainer.metrics import MemorySink

pytestmark = pytest.mark.integration


def _poison(step_at: int, group: str, until: int | None = None):
    """after_backward hook: make one group's gradient NaN at step_at (..until)."""
    def hook(step: int, model) -> None:
        if step_at <= step <= (until or step_at):
            for name, p in model.named_parameters():
                if p.grad is not None and (name.startswith("projector.") == (group == "projector")):
                    p.grad.fill_(float("nan"))
    return hook


# Every guard test runs with the host guard (a read-back per step, the CPU default) and
# with the device guard (trainer.step: decisions on the device, read back every 4).
GUARDS = pytest.mark.parametrize("sync", [1, 4], ids=["host-guard", "device-guard"])


def _run(cfg, hook=None):
    sink = MemorySink()
    summary = train(cfg, sink, after_backward=hook, console=False, log=lambda *_: None)
    return summary, sink


@pytest.mark.parametrize("group", ["projector", "lora"])
@GUARDS
def test_nan_in_one_group_is_one_event_naming_it_and_the_step_is_skipped(tiny, group, sync):
    cfg = tiny(epochs=1, nan_policy="skip")
    cfg.output.sync_every = sync
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


@GUARDS
def test_stop_policy_ends_the_run_unstable(tiny, sync):
    cfg = tiny(epochs=1, nan_policy="stop")
    cfg.output.sync_every = sync
    summary, sink = _run(cfg, _poison(4, "projector"))
    assert (summary.status, summary.end_reason, summary.steps_done) == ("unstable", "nan_stop", 4)
    assert summary.nan_events[0].action == "stopped"
    assert summary.to_json()["first_nan_group"] == "projector"
    assert len(sink.records) == 4


@GUARDS
def test_skip_policy_aborts_after_n_in_a_row(tiny, sync):
    cfg = tiny(epochs=2, nan_policy="skip", max_consecutive_nan=3)
    cfg.output.sync_every = sync
    summary, _ = _run(cfg, _poison(2, "lora", until=100))
    assert (summary.end_reason, summary.steps_done) == ("nan_abort", 4)
    assert [e.action for e in summary.nan_events] == ["skipped", "skipped", "aborted"]


@GUARDS
def test_each_step_record_carries_its_nan_event_with_the_policys_action(tiny, sync):
    """The event travels in its step's record (issue 24): in metrics.jsonl as strict JSON,
    None on clean steps, and MemorySink hands the NanEvent objects back."""
    from trainer.metrics import nan_event_of

    cfg = tiny(epochs=2, nan_policy="skip", max_consecutive_nan=3)
    cfg.output.sync_every = sync
    summary, sink = _run(cfg, _poison(2, "lora", until=100))
    lines = (cfg.output.root / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["nan_event"] is None
    assert [r["nan_event"] for r in records[1:]] == [
        {"step": s, "where": "grad", "groups": ["lora"], "action": a, "fp16_overflow": False}
        for s, a in ((2, "skipped"), (3, "skipped"), (4, "aborted"))]
    assert [nan_event_of(r) for r in records[1:]] == summary.nan_events
    assert sink.nan_events == summary.nan_events  # the NanEvent objects, equal by value
    assert sink.nan_events[0] is not summary.nan_events[0]  # a copy, not the State's


@GUARDS
def test_non_finite_loss_is_a_loss_event(tiny, sync):
    def break_weights(step, model):
        if step == 2:
            with torch.no_grad():
                model.projector.net[0].weight.fill_(float("inf"))

    cfg = tiny(epochs=1, nan_policy="stop")
    cfg.output.sync_every = sync
    summary, sink = _run(cfg, break_weights)
    assert summary.end_reason == "nan_stop"
    ev = summary.nan_events[0]
    assert (ev.step, ev.where) == (3, "loss")
    assert math.isnan(sink.records[-1]["loss"])
    # the stopping event is in its step's record (metrics.jsonl), with the policy's action
    last = json.loads((cfg.output.root / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and last["loss"] is None
    event = last["nan_event"]
    assert (event["step"], event["where"], event["action"]) == (3, "loss", "stopped")
    assert event["groups"] == ev.groups
    assert [r["nan_event"] for r in sink.records[:-1]] == [None, None]


@GUARDS
def test_resume_reproduces_the_uninterrupted_losses_exactly(tiny, sync):
    straight = tiny(run_name="straight", epochs=2)
    straight.output.checkpoint_every = 4
    straight.output.sync_every = sync
    _, full = _run(straight)

    cfg = tiny(run_name="cut", epochs=2)
    cfg.output.checkpoint_every = 4
    cfg.output.sync_every = sync

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


def _final_state(cfg):
    """Trainable weights and the newest checkpoint's optimizer/schedule state of a run."""
    from safetensors.torch import load_file

    run_dir = cfg.output.root / cfg.output.run_name
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    st = torch.load(newest / "state.pt", weights_only=True)
    return load_file(str(run_dir / "trainable.safetensors")), st, newest.name


def _assert_same_run(host, device, rel=1e-5):
    """Same records (loss, norms, LRs, flags) and the same final weights, up to rounding
    (fused vs. for-each AdamW, and clip coefficients computed in fp32 on the device)."""
    (hs, hsink), (ds, dsink) = host, device
    assert (ds.end_reason, ds.steps_done) == (hs.end_reason, hs.steps_done)
    assert [e.__dict__ for e in ds.nan_events] == [e.__dict__ for e in hs.nan_events]
    assert [r["step"] for r in dsink.records] == [r["step"] for r in hsink.records]
    for h, d in zip(hsink.records, dsink.records, strict=True):
        for key in ("loss", "grad_norm", "grad_norm/projector", "grad_norm/lora",
                    "lr/projector", "lr/lora", "clipped", "skipped", "nan_events"):
            if isinstance(h[key], float) and not math.isfinite(h[key]):
                assert not math.isfinite(d[key]), (h["step"], key)
            else:
                assert d[key] == pytest.approx(h[key], rel=rel, abs=1e-7), (h["step"], key)


@pytest.mark.parametrize("policy,hook,end", [
    ("stop", _poison(6, "lora"), "nan_stop"),  # inside a read-back window (5..8)
    ("skip", _poison(5, "projector", until=7), "nan_abort"),  # 3 in a row, inside a window
    ("skip", _poison(3, "lora"), "completed"),
])
def test_device_guard_ends_where_the_host_guard_ends(tiny, policy, hook, end):
    """The device guard decides on the device and reads back every 4 steps; a stop in the
    middle of a window ends the run at that step, in the host guard's state: same records,
    same weights, the schedule and optimizer step count at the stop step."""
    runs = {}
    for sync in (1, 4):
        cfg = tiny(run_name=f"g{sync}", epochs=1, nan_policy=policy, max_consecutive_nan=3)
        cfg.output.sync_every = sync
        runs[sync] = (cfg, _run(cfg, hook))
    (hcfg, host), (dcfg, device) = runs[1], runs[4]
    assert host[0].end_reason == end
    _assert_same_run(host, device)
    (hw, hst, hname), (dw, dst, dname) = _final_state(hcfg), _final_state(dcfg)
    assert dname == hname  # the final checkpoint is at the stop step
    assert dst["scheduler"]["last_epoch"] == hst["scheduler"]["last_epoch"] == host[0].steps_done
    assert dst["scheduler"]["_last_lr"] == pytest.approx(hst["scheduler"]["_last_lr"], rel=1e-12)
    steps = {int(s["step"]) for s in dst["optimizer"]["state"].values()}
    skipped = sum(r["skipped"] for r in host[1].records)
    assert steps == {host[0].steps_done - skipped}  # skipped steps never counted by AdamW
    for k in hw:
        torch.testing.assert_close(dw[k], hw[k], rtol=1e-4, atol=1e-6)


def test_device_guard_stops_a_diverging_run_at_the_same_step(tiny):
    runs = {}
    for sync in (1, 4):
        cfg = tiny(run_name=f"d{sync}", epochs=2, learning_rate=0.5, divergence_factor=1.05,
                   gradient_clip_val=None)
        cfg.output.sync_every = sync
        runs[sync] = _run(cfg)
    assert runs[1][0].end_reason == "diverged"
    assert runs[1][0].steps_done < 22  # it stopped early, so the test can tell
    _assert_same_run(runs[1], runs[4], rel=1e-4)


def test_device_guard_clips_like_the_host_guard(tiny):
    runs = {}
    for sync in (1, 3):
        cfg = tiny(run_name=f"c{sync}", epochs=2, gradient_clip_val=0.05)
        cfg.output.sync_every = sync
        runs[sync] = _run(cfg)
    clipped = [r["clipped"] for r in runs[1][1].records]
    assert 0 < sum(clipped) < len(clipped) or sum(clipped) == len(clipped) > 0
    _assert_same_run(runs[1], runs[3], rel=1e-4)


class _LaunchWatch(MemorySink):
    """Records, for every step record, how many steps had been launched when it arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.launched = 0
        self.seen: list[tuple[int, int]] = []

    def hook(self, step, model) -> None:
        self.launched = step

    def log_metrics(self, metrics, step, checkpoint=None) -> None:
        super().log_metrics(metrics, step, checkpoint)
        self.seen.append((step, self.launched))


def test_device_guard_reads_back_in_windows(tiny, monkeypatch):
    """Records arrive a window at a time (sync_every steps, cut short at checkpoint and
    eval steps, which need that step's weights), not after every step; a window also
    closes after WINDOW_MAX_S of host time, so slow steps are still seen one by one."""
    import trainer.loop as loop_mod

    # No time limit here: on a loaded machine a few slow steps would close windows early.
    monkeypatch.setattr(loop_mod, "WINDOW_MAX_S", 3600.0)
    cfg = tiny(run_name="win", epochs=2)
    cfg.output.sync_every = 4
    cfg.output.checkpoint_every = 6
    watch = _LaunchWatch()
    summary = train(cfg, watch, after_backward=watch.hook, console=False, log=lambda *_: None)
    total = summary.total_steps
    ends = sorted({launched for _, launched in watch.seen})
    expected, start = [], 0
    for s in range(1, total + 1):  # window ends: every 4 steps, at checkpoints, at the end
        if s - start == 4 or s % 6 == 0 or s == total:
            expected.append(s)
            start = s
    assert ends == expected, (ends, expected)
    assert [s for s, _ in watch.seen] == list(range(1, total + 1))

    monkeypatch.setattr(loop_mod, "WINDOW_MAX_S", 0.0)
    cfg = tiny(run_name="win0", epochs=1)
    cfg.output.sync_every = 4
    watch = _LaunchWatch()
    train(cfg, watch, after_backward=watch.hook, console=False, log=lambda *_: None)
    assert all(step == launched for step, launched in watch.seen)  # one step per window
