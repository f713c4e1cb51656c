"""The shared group's actor class, in process (no Ray): report pacing and a failed step."""

from __future__ import annotations

import time
from collections import deque

import pytest

from trainer.inputs import prepare_inputs
from tuning.raytune.group_actor import GroupActor

pytestmark = pytest.mark.integration


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
    _wait(lambda: member.paused)
    time.sleep(0.5)  # a running member would step on in this time
    with group._lock:
        return member, [p[1] for k, p in member.events if k == "metrics"]


def test_a_member_trains_one_report_ahead_of_its_client_and_pauses_at_the_next(actor):
    """A solo trial blocks in tune.report; a member trains on while its client reports
    (the driver's round trip), but pauses at its second report the client has not taken."""
    group, cfg = actor
    member, steps = _join_until_paused(group, cfg, "m0")
    # report_every=2: reports at steps 2 and 4; it paused at the second.
    assert steps == [1, 2, 3, 4] and list(member.reports) == [2, 4]
    events, finished = group.poll("m0")  # the client takes steps 1-4 and reports them ...
    assert [p[1] for k, p in events if k == "metrics"] == [1, 2, 3, 4] and not finished
    time.sleep(0.5)
    assert member.paused and member.delivered_through == 4  # ... still paused until it
    group.poll("m0")  # polls again: both tune.report calls returned, the member trains on
    _wait(lambda: list(member.reports) == [6, 8])


def test_with_no_report_ahead_a_member_pauses_where_a_solo_trial_blocks(actor, monkeypatch):
    import tuning.raytune.group_actor as actor_mod

    monkeypatch.setattr(actor_mod, "REPORTS_AHEAD", 0)
    group, cfg = actor
    member, steps = _join_until_paused(group, cfg, "m0")
    assert steps == [1, 2] and list(member.reports) == [2]
    group.poll("m0")
    assert member.paused  # handed out, not yet reported
    group.poll("m0")
    _wait(lambda: list(member.reports) == [4])


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
    _wait(lambda: group._members["m0"].paused)


def test_a_compiled_group_waits_for_paused_members_instead_of_stepping_a_subset(
        actor, monkeypatch):
    """Each set of members stepped together is one more graph for a compiled group, so
    its actor steps ready members alone only after BARRIER_S; an eager group does not
    wait (the first test)."""
    import tuning.raytune.group_actor as actor_mod
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
    _wait(lambda: m0.paused and m1.paused)  # both at their second report, step 4
    for _ in range(2):  # m0's client reports; m1's does not (yet)
        group.poll("m0")
    time.sleep(1.0)  # an eager group would step m0 alone in this time
    assert not m0.paused and m0.delivered_through == 4
    with group._lock:
        assert not [p for k, p in m0.events if k == "metrics"]  # m0 waited for m1
    for _ in range(2):
        group.poll("m1")
    _wait(lambda: list(m0.reports) == [6, 8] and list(m1.reports) == [6, 8])
    assert set(calls) == {("m0", "m1")}, calls  # never a subset


def test_a_compiled_group_waits_for_members_still_joining(actor, monkeypatch):
    """A sweep's trials join a compiled group one after another: its first step waits until
    no member has joined for JOIN_WAIT_S, so the first graph is the whole make-up's (not
    one for m0 alone, then another for both)."""
    import tuning.raytune.group_actor as actor_mod
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


def test_a_compiled_group_whose_slots_are_all_taken_steps_without_the_join_wait(
        tiny, monkeypatch):
    """No trial can join a group whose every slot is taken: its first step does not wait
    JOIN_WAIT_S for one (10 s of every sweep on a GPU, run 25). The first join's LLM load
    and the actor's start to it are in the stats."""
    import tuning.raytune.group_actor as actor_mod
    from trainer.group import TrialGroup
    from tuning.raytune.group_stats import describe_stats

    cfg = tiny(run_name="m0")
    group = GroupActor(prepare_inputs(cfg, log=lambda *_: None), "cpu", report_every=2,
                       orphan_timeout_s=600, slots=2)
    monkeypatch.setattr(TrialGroup, "compiled", property(lambda self: True))
    monkeypatch.setattr(actor_mod, "JOIN_WAIT_S", 600.0)
    calls = _recorded_steps(group, monkeypatch)
    _join(group, cfg, "m0")
    time.sleep(1.0)  # one slot free: the group waits for a second member
    assert not calls
    _join(group, cfg, "m1")
    _wait(lambda: calls, timeout=60.0)  # both slots taken: it steps at once
    assert calls[0] == ("m0", "m1"), calls
    stats = group.stats()
    assert stats["wait_s"]["joining"] < 30.0, stats
    assert 0 < stats["first_join_s"] <= stats["to_first_member_s"], stats
    assert "first member in" in describe_stats(stats)


def test_the_actor_loads_the_shared_llm_before_its_first_member_joins(tiny):
    """Given the sweep's base config, the actor loads the frozen LLM as it starts (while a
    sweep's trial processes start), so the first join only adds its member; a member then
    trains as with the load in its join."""
    cfg = tiny(run_name="m0")
    group = GroupActor(prepare_inputs(cfg, log=lambda *_: None), "cpu", report_every=2,
                       orphan_timeout_s=600, shared_config=cfg.to_plain())
    _wait(lambda: group.stats()["preload_s"] > 0)
    assert group._group.llm is None and group._group._lm is not None  # loaded, no member
    member, steps = _join_until_paused(group, cfg, "m0")
    assert steps == [1, 2, 3, 4] and member.reports, steps
    stats = group.stats()
    assert stats["first_join_s"] > 0
    assert stats["preload_s"] <= stats["first_join_asked_s"] <= stats["to_first_member_s"]
    # the load's time is an event of the stats: Ray keeps the actor's output from the sweep
    assert [e for e in stats["events"] if "s [group] shared LLM on cpu in " in e], stats


def test_an_actor_started_before_its_inputs_loads_the_llm_and_holds_joins_until_them(tiny):
    """A sweep starts its groups as soon as Ray is up, while its preparation runs: the actor
    loads the LLM from the base config's directory meanwhile, and a trial's join waits for
    the inputs the driver hands it (`set_inputs`); the member then trains as usual."""
    import threading

    from trainer.inputs import ready_llm_dir

    cfg = tiny(run_name="m0")
    inputs = prepare_inputs(cfg, log=lambda *_: None)
    assert ready_llm_dir(cfg) == inputs.llm_dir  # built: known before any preparation
    group = GroupActor(None, "cpu", report_every=2, orphan_timeout_s=600,
                       shared_config=cfg.to_plain(), llm_dir=str(ready_llm_dir(cfg)))
    _wait(lambda: group.stats()["preload_s"] > 0)
    assert group._group._lm is not None and group._group.inputs is None
    joined = []
    data = cfg.to_plain()
    joining = threading.Thread(target=lambda: joined.append(group.join("m0", data, False)))
    joining.start()
    time.sleep(1.0)
    assert joining.is_alive() and not joined  # no inputs yet: the join waits
    time.sleep(0.5)
    group.set_inputs(inputs)
    joining.join(timeout=120)
    assert joined == [True]
    member = group._members["m0"]
    _wait(lambda: member.paused)
    with group._lock:
        steps = [p[1] for k, p in member.events if k == "metrics"]
    assert steps == [1, 2, 3, 4], steps
    stats = group.stats()
    assert stats["started_ahead_s"] >= 1.5, stats  # its figures count from the inputs
    assert stats["first_join_asked_s"] < 0 < stats["to_first_member_s"], stats


def test_a_restarted_actor_takes_the_inputs_the_driver_wrote(tiny, tmp_path):
    """Ray starts a crashed actor again with its first arguments (no inputs): it reads the
    ones the driver wrote to the sweep directory, and members join at once."""
    import json

    from trainer.inputs import inputs_to_data

    cfg = tiny(run_name="m0")
    inputs = prepare_inputs(cfg, log=lambda *_: None)
    written = tmp_path / "group_inputs.json"
    written.write_text(json.dumps(inputs_to_data(inputs)))
    group = GroupActor(None, "cpu", report_every=2, orphan_timeout_s=600,
                       inputs_file=str(written))
    assert group._group.inputs == inputs
    _, steps = _join_until_paused(group, cfg, "m0")
    assert steps == [1, 2, 3, 4], steps


def test_a_group_loaded_ahead_refuses_inputs_that_name_another_llm(tiny, tmp_path):
    """The LLM loaded before the inputs came must be the one they name: a join otherwise
    raises (its trial errors) instead of training on another model."""
    from dataclasses import replace

    from trainer.errors import ConfigError
    from trainer.inputs import ready_llm_dir

    cfg = tiny(run_name="m0")
    inputs = prepare_inputs(cfg, log=lambda *_: None)
    group = GroupActor(None, "cpu", report_every=2, orphan_timeout_s=600,
                       shared_config=cfg.to_plain(), llm_dir=str(ready_llm_dir(cfg)))
    _wait(lambda: group.stats()["preload_s"] > 0)
    group.set_inputs(replace(inputs, llm_dir=tmp_path / "another-llm"))
    with pytest.raises(ConfigError, match="the shared LLM was loaded from"):
        group.join("m0", cfg.to_plain(), False)


def test_stats_count_the_group_steps_by_how_many_members_they_stepped(actor):
    """How much of a group's stepping ran few members (ASHA's tail) is in its stats: two
    members together, then one alone, each short step counted once by its members."""
    group, cfg = actor
    with group._lock:  # both join before the step thread runs: they start together
        _join(group, cfg, "m0")
        _join(group, cfg, "m1")
    m0, m1 = group._members["m0"], group._members["m1"]
    _wait(lambda: m0.paused and m1.paused)  # both at their second report, step 4
    by = group.stats()["steps_by_members"]
    assert by == {"2": {"steps": 4, "s": by["2"]["s"]}} and by["2"]["s"] > 0, by
    for _ in range(2):  # m0's client reports, m1's does not: m0 steps alone (eager)
        group.poll("m0")
    _wait(lambda: list(m0.reports) == [6, 8])
    stats = group.stats()
    by = stats["steps_by_members"]
    assert by["2"]["steps"] == 4 and by["1"]["steps"] == 4, by
    assert stats["member_steps"] == 12 and stats["group_steps"] == 8, stats


def test_a_long_step_does_not_make_its_members_orphans(actor, monkeypatch):
    """A compiled group's first step compiles for minutes, longer than orphan_timeout_s,
    while every client's poll waits on the actor: after it, the members are still members
    (on an H200 a whole 8-trial sweep was dropped this way, run 10)."""
    import tuning.raytune.group_actor as actor_mod
    from tuning.raytune.group_stats import describe_stats

    group, cfg = actor
    group._orphan_s = 2.5  # under the 3 s step: without the fix m0 is dropped after it
    monkeypatch.setattr(actor_mod, "POLL_WAIT_S", 1.0)
    calls = _recorded_steps(group, monkeypatch, first_step_s=3.0)  # a compile's length
    _join(group, cfg, "m0")
    _wait(lambda: calls)
    time.sleep(3.5)  # the slow step is over; an orphan check has run since
    events, _ = group.poll("m0")  # raised "not a member" before the fix
    assert [p[1] for k, p in events if k == "metrics"][:2] == [1, 2]
    # the first step (a compile) is timed apart, whatever its length
    stats = group.stats()
    assert 3.0 <= stats["first_step_s"] <= stats["long_step_s"] <= stats["step_s"], stats
    assert f"the first {stats['first_step_s']:.1f}s" in describe_stats(stats)


@pytest.mark.parametrize(("ahead", "expected"), [(0, [2, 4, 5, 7]), (1, [4, 5, 7, 8])])
def test_members_read_back_in_windows_still_pause_exactly_at_their_reports(
        actor, monkeypatch, ahead, expected):
    """With the device guard (sync_every 3 here, 10 on a GPU) a member's steps are read back
    a window at a time, and every window ends at a report: the member never trains past
    the report after the REPORTS_AHEAD its client has not taken, as with a read-back per
    step."""
    import tuning.raytune.group_actor as actor_mod

    monkeypatch.setattr(actor_mod, "REPORTS_AHEAD", ahead)
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
            paused, reports = member.paused, list(member.reports)
        if paused:
            assert len(reports) == ahead + 1, reports
            assert max(seen + queued) == reports[-1], (seen, queued, reports)
            if not pauses or pauses[-1] != reports[-1]:
                pauses.append(reports[-1])
        events, finished = group.poll("m0")
        seen += [p[1] for k, p in events if k == "metrics"]
    # Reports every 2 records, and with the record after each checkpoint (3, 6): 2, 4, 5,
    # 7, 8 (9 steps). One ahead, it pauses at one of its reports after the first.
    if ahead == 0:
        assert pauses == expected
    else:  # which reports it pauses at depends on when the client polls
        assert pauses and pauses == sorted(set(pauses)) and set(pauses) <= set(expected)
    assert seen == list(range(1, len(seen) + 1))


def test_a_poll_is_served_while_the_group_steps(actor, monkeypatch):
    """A client's poll takes only the members' lock, never waits for a group step: with one
    lock held through every step, polls starved while members trained ahead of them."""
    import threading

    import tuning.raytune.group_actor as actor_mod

    group, cfg = actor
    monkeypatch.setattr(actor_mod, "POLL_WAIT_S", 0.5)
    in_step, release = threading.Event(), threading.Event()
    real_step = group._group.step

    def step(only=None):
        if not release.is_set():
            in_step.set()
            release.wait(60)  # the group step lasts until the test lets it end
        return real_step(only)

    monkeypatch.setattr(group._group, "step", step)
    _join(group, cfg, "m0")
    assert in_step.wait(60)
    polled = []
    poller = threading.Thread(target=lambda: polled.append(group.poll("m0")))
    poller.start()
    poller.join(10)
    served = not poller.is_alive()
    release.set()
    poller.join(60)
    assert served, "the poll waited for the group step"
    events, finished = polled[0]
    assert not finished and not [e for e in events if e[0] == "metrics"]  # no step yet


def test_close_ends_every_member_whose_client_never_left(actor):
    """A stopped trial's `leave` may still be in flight when the sweep ends: the driver's
    `close` ends every member still in the group, so each run has its summary."""
    import json

    group, cfg = actor
    _join_until_paused(group, cfg, "m0")
    assert group.close() == ["m0"]
    summary = json.loads((cfg.output.root / "m0" / "summary.json").read_text())
    assert summary["end_reason"] == "stopped" and summary["steps_done"] >= 2
    assert group.close() == [] and "m0" not in group._members


def test_stats_say_where_the_step_thread_spent_its_time(actor):
    """A member paused at its second unreported report: the step thread waits for its
    client ("clients"), and the pause's length is counted once the client acks."""
    from tuning.raytune.group_stats import describe_stats

    group, cfg = actor
    member, steps = _join_until_paused(group, cfg, "m0")
    time.sleep(0.3)
    stats = group.stats()
    assert stats["group_steps"] == stats["member_steps"] == len(steps) == 4, stats
    assert stats["members_per_step"] == 1 and stats["step_s"] > 0
    # the host guard (CPU): nothing is read back in windows, so no wait for a device
    assert stats["sync_s"] == 0 and stats["sync_fraction"] == 0, stats
    assert stats["wait_s"]["clients"] >= 0.5, stats  # _join_until_paused slept 0.5 s
    assert stats["pauses"] == 0  # still paused: its pause is not over yet
    group.poll("m0")
    group.poll("m0")  # both reports returned: the pause is over
    _wait(lambda: list(member.reports) == [6, 8])
    stats = group.stats()
    assert stats["pauses"] == 1 and stats["pause_ms_mean"] >= 800, stats
    assert stats["group_steps"] >= 8
    line = describe_stats(stats)
    assert line.startswith(f"{stats['group_steps']} group steps of 1.0 members"), line
    assert "(0% of it waiting for the device)" in line, line
    assert "clients" in line and "paused 1 times" in line, line
    assert stats["step_ms_median"] > 0 and f"median {stats['step_ms_median']:.1f} ms" in line


def test_the_median_step_is_the_steady_one():
    """The mean of the short steps carries the slow first steps after a compile; the
    median of the latest short steps does not, and drops the oldest past RECENT_STEPS."""
    from tuning.raytune.group_stats import RECENT_STEPS, GroupStats

    st = GroupStats(started=time.monotonic())
    durations = [3.0, 2.0, 1.5] + [0.04] * 20  # recording the CUDA graphs, then steady
    st.group_steps, st.step_s = len(durations), sum(durations)
    for took in durations:
        st.count_step(8, took)
    stats = st.as_dict()
    assert stats["step_ms_median"] == 40.0 and stats["step_ms_mean"] > 280, stats
    for _ in range(RECENT_STEPS):
        st.count_step(2, 0.05)
    stats = st.as_dict()
    assert stats["step_ms_median"] == 50.0
    # every short step counted by its members, the oldest too
    assert stats["steps_by_members"] == {
        "2": {"steps": RECENT_STEPS, "s": round(0.05 * RECENT_STEPS, 3)},
        "8": {"steps": 23, "s": round(sum(durations), 3)}}, stats
    assert GroupStats().as_dict()["step_ms_median"] == 0.0  # no step yet


def test_stats_count_the_steps_run_while_a_helper_compiled():
    from tuning.raytune.group_stats import GroupStats, describe_stats

    st = GroupStats(started=time.monotonic())
    st.group_steps, st.step_s, st.recent_s = 5, 0.5, deque([0.1] * 5)
    assert "helper" not in describe_stats(st.as_dict())
    st.ahead_steps = 4
    stats = st.as_dict()
    assert stats["ahead_steps"] == 4
    assert "4 ran eagerly while a helper process compiled" in describe_stats(stats)


def test_a_waiting_poll_gets_a_whole_read_back_window_at_once(actor, monkeypatch):
    """A window's records are queued one after the other; a poll waiting meanwhile is woken
    once they all are (after the group step), not at the first: one round trip per
    window for its client, and no wake-ups taking the step thread's GIL per record."""
    group, cfg = actor
    cfg.output.sync_every = 4
    cfg.phase2.total_training_steps = 12
    group._report_every = 4  # windows of 4 records, ending at the reports (4, 8, 12)
    import tuning.raytune.group_actor as actor_mod

    real_put = actor_mod._QueueSink._put

    def slow_put(self, kind, payload):  # a poll woken at the first record would return it
        real_put(self, kind, payload)
        time.sleep(0.05)

    monkeypatch.setattr(actor_mod._QueueSink, "_put", slow_put)
    _join(group, cfg, "m0")
    batches, finished = [], False
    while not finished:
        events, finished = group.poll("m0")
        steps = [p[1] for k, p in events if k == "metrics"]
        if steps:
            batches.append(steps)
    assert batches == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], batches


def test_the_actors_group_has_the_sweeps_capacity_in_slots(tiny):
    """The group's slots are the sweep's capacity (max_concurrent_trials), also in the fresh
    group a failed step leaves: a compiled group then builds them once, and trials join
    and leave without a recompile (tests/test_group.py)."""
    cfg = tiny(run_name="m0")
    group = GroupActor(prepare_inputs(cfg, log=lambda *_: None), "cpu", report_every=2,
                       orphan_timeout_s=600, slots=3)
    assert group._group.slots == 3
    with group._step_lock:
        group._fail_all("a failed step")
    assert group._group.slots == 3


def test_a_full_group_refuses_a_join_until_a_slot_is_free(tiny):
    """`join` counts and adds under the step lock: a group of one slot takes one member,
    says False to the next (the trial then tries another group, or waits), takes its
    own member back (a retried trial), and the next one once the first has left."""
    from tuning.raytune.group_stats import describe_stats

    cfg = tiny(run_name="m0")
    group = GroupActor(prepare_inputs(cfg, log=lambda *_: None), "cpu", report_every=2,
                       orphan_timeout_s=600, slots=1)
    data = {m: {**cfg.to_plain(), "output": {**cfg.to_plain()["output"], "run_name": m}}
            for m in ("m0", "m1")}
    assert group.join("m0", data["m0"], resume=False)
    assert group.load() == 1 and group.load(but="m0") == 0
    assert not group.join("m1", data["m1"], resume=False)
    assert "m1" not in group._members
    assert group.join("m0", data["m0"], resume=True)  # a retried trial replaces itself
    group.leave("m0")
    assert group.load() == 0
    assert group.join("m1", data["m1"], resume=False)
    stats = group.stats()
    assert stats["members"] == ["m0", "m1"]
    # Make-up changes hold the steps, so they are timed: three joins (a refused one is
    # none), two leaves (the retried trial's old member, then m0's own).
    assert (stats["joins"], stats["leaves"]) == (3, 2), stats
    assert stats["join_s"] > 0 and stats["leave_s"] > 0, stats
    assert (f"3 joins took {stats['join_s']:.1f}s and 2 leaves {stats['leave_s']:.1f}s"
            in describe_stats(stats))
    group.close()
    assert group.stats()["leaves"] == 3
