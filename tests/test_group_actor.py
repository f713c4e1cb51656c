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


def _recorded_steps(group: GroupActor, monkeypatch, first_step_s: float = 0.0) -> list:
    """The members of each group step, in order (the first step made `first_step_s` longer,
    holding the actor's lock as a compile does)."""
    real_step, calls = group._group.step, []

    def step(only=None):
        calls.append(tuple(sorted(only)))
        if len(calls) == 1:
            time.sleep(first_step_s)
        return real_step(only)

    monkeypatch.setattr(group._group, "step", step)
    return calls


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
    monkeypatch.setattr(actor_mod, "JOIN_WAIT_S", 0.2)
    calls = _recorded_steps(group, monkeypatch)
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


def test_a_compiled_group_waits_for_members_still_joining(actor, monkeypatch):
    """A sweep's trials join a compiled group one after another: its first step waits until
    no member has joined for JOIN_WAIT_S, so the first graph is the whole make-up's (not
    one for m0 alone, then another for both)."""
    import tuning.group_actor as actor_mod
    from trainer.group import TrialGroup

    group, cfg = actor
    monkeypatch.setattr(TrialGroup, "compiled", property(lambda self: True))
    monkeypatch.setattr(actor_mod, "JOIN_WAIT_S", 3.0)
    calls = _recorded_steps(group, monkeypatch)
    _join(group, cfg, "m0")
    time.sleep(1.0)  # an eager group steps m0 alone in this time (the first test)
    assert not calls
    _join(group, cfg, "m1")
    _wait(lambda: calls)
    assert calls[0] == ("m0", "m1"), calls


def test_a_long_step_does_not_make_its_members_orphans(actor, monkeypatch):
    """A compiled group's first step compiles for minutes, longer than orphan_timeout_s,
    while every client's poll waits on the actor: after it, the members are still members
    (on an H200 a whole 8-trial sweep was dropped this way, run 10)."""
    import tuning.group_actor as actor_mod

    group, cfg = actor
    group._orphan_s = 2.5  # under the 3 s step: without the fix m0 is dropped after it
    monkeypatch.setattr(actor_mod, "POLL_WAIT_S", 1.0)
    calls = _recorded_steps(group, monkeypatch, first_step_s=3.0)  # a compile's length
    _join(group, cfg, "m0")
    _wait(lambda: calls)
    time.sleep(3.5)  # the slow step is over; an orphan check has run since
    events, _ = group.poll("m0")  # raised "not a member" before the fix
    assert [p[1] for k, p in events if k == "metrics"][:2] == [1, 2]


def test_members_read_back_in_windows_still_pause_exactly_at_their_reports(actor):
    """With the device guard (sync_every 3 here, 10 on a GPU) a member's steps are read back
    a window at a time, and every window ends at a report: the member never trains past a
    report its client has not taken, as with a read-back per step."""
    group, cfg = actor
    cfg.output.sync_every = 3
    cfg.output.checkpoint_every = 3  # a checkpoint is reported with the record after it
    _join(group, cfg, "m0")
    member = group._members["m0"]
    seen, pauses, finished = [], [], False
    while not finished and len(pauses) < 4:  # the client's loop, with a pause between polls
        time.sleep(0.3)  # a member that did not pause would run ahead meanwhile
        with group._lock:
            queued = [p[1] for k, p in member.events if k == "metrics"]
            blocked = member.blocked_at
        if blocked is not None:
            assert max(seen + queued) == blocked, (seen, queued, blocked)
            if not pauses or pauses[-1] != blocked:
                pauses.append(blocked)
        events, finished = group.poll("m0")
        seen += [p[1] for k, p in events if k == "metrics"]
    # report_every 2 from step 0, and the record after each checkpoint (3, 6): 2, 4, 5, 7.
    assert pauses == [2, 4, 5, 7]
    assert seen == list(range(1, len(seen) + 1))
