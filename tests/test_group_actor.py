"""The shared group's actor class, in process (no Ray): report pacing and a failed step."""

from __future__ import annotations

import time

import pytest

from trainer.inputs import prepare_inputs
from tuning.group_actor import GroupActor


def _wait(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.fixture
def actor(tiny):
    cfg = tiny(run_name="m0")
    group = GroupActor(prepare_inputs(cfg, log=lambda *_: None), "cpu", report_every=2,
                       orphan_timeout_s=600)
    return group, cfg


def _join(group: GroupActor, cfg, member_id: str) -> None:
    data = cfg.to_plain()
    data["output"]["run_name"] = member_id
    group.join(member_id, data, resume=False)


def _join_until_paused(group: GroupActor, cfg, member_id: str):
    """Join a member and wait until it pauses at a report; it and the steps it queued."""
    _join(group, cfg, member_id)
    member = group._members[member_id]
    _wait(lambda: member.blocked_at is not None)
    time.sleep(0.5)  # a running member would step on in this time
    with group._lock:
        return member, [p[1] for k, p in member.events if k == "metrics"]


def test_a_member_pauses_where_a_solo_trial_would_block_in_tune_report(actor):
    group, cfg = actor
    member, steps = _join_until_paused(group, cfg, "m0")
    assert steps == [1, 2] and member.blocked_at == 2  # report_every=2: blocked at step 2
    events, finished = group.poll("m0")  # the client takes steps 1-2 and reports them ...
    assert [p[1] for k, p in events if k == "metrics"] == [1, 2] and not finished
    assert member.blocked_at == 2  # ... but until it polls again, the member stays paused
    group.poll("m0")  # tune.report returned: the member may train on
    _wait(lambda: member.blocked_at == 4)


def test_a_failed_group_step_errors_its_members_and_they_can_rejoin(actor, monkeypatch):
    group, cfg = actor

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(group._group, "step", boom)
    _join(group, cfg, "m0")
    _wait(lambda: "m0" in group._failed)
    with pytest.raises(RuntimeError, match="simulated"):  # the traceback reaches the trial
        group.poll("m0")
    data = cfg.to_plain()
    data["output"]["run_name"] = "m0-retry"
    group.join("m0", data, resume=False)  # Tune's retry rejoins the fresh group
    _wait(lambda: group._members["m0"].blocked_at is not None)


def test_a_compiled_group_waits_for_paused_members_instead_of_stepping_a_subset(
        actor, monkeypatch):
    """Each set of members stepped together is one more graph for a compiled group, so
    its actor steps ready members alone only after BARRIER_S; an eager group does not
    wait (the first test)."""
    import tuning.group_actor as actor_mod
    from trainer.group import TrialGroup

    group, cfg = actor
    monkeypatch.setattr(TrialGroup, "compiled", property(lambda self: True))
    monkeypatch.setattr(actor_mod, "BARRIER_S", 600.0)
    calls = []
    real_step = group._group.step

    def step(only=None):
        calls.append(tuple(sorted(only)))
        return real_step(only)

    monkeypatch.setattr(group._group, "step", step)
    with group._lock:  # both join before the step thread runs: they start together
        _join(group, cfg, "m0")
        _join(group, cfg, "m1")
    m0, m1 = group._members["m0"], group._members["m1"]
    _wait(lambda: m0.blocked_at == 2 and m1.blocked_at == 2)
    for _ in range(2):  # m0's client reports; m1's does not (yet)
        group.poll("m0")
    time.sleep(1.0)  # an eager group would step m0 alone in this time
    assert m0.blocked_at is None and m0.delivered_through == 2
    with group._lock:
        assert not [p for k, p in m0.events if k == "metrics"]  # m0 waited for m1
    for _ in range(2):
        group.poll("m1")
    _wait(lambda: m0.blocked_at == 4 and m1.blocked_at == 4)
    assert set(calls) == {("m0", "m1")}, calls  # never a subset


def test_members_read_back_in_windows_pause_at_the_window_holding_their_report(actor):
    """With the device guard (sync_every 3 here, 10 on a GPU) a member's records arrive a
    window at a time, so it pauses at the end of the window holding its report, one step
    past it here, as far as a solo trial with the same window trains past it."""
    group, cfg = actor
    cfg.output.sync_every = 3
    member, steps = _join_until_paused(group, cfg, "m0")
    assert steps == [1, 2, 3] and member.blocked_at == 2
    events, _ = group.poll("m0")  # the client takes steps 1-3 and reports step 2 ...
    assert [p[1] for k, p in events if k == "metrics"] == [1, 2, 3]
    events, _ = group.poll("m0")  # ... then polls: the member trains its next window
    assert [p[1] for k, p in events if k == "metrics"] == [4, 5, 6]
    assert member.blocked_at == 6  # that window holds reports 4 and 6
