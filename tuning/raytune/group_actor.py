"""Shared-weight trial groups under Ray Tune: many trials, one copy of the frozen model.

With ``resources.shared_group: true`` the sweep starts one Ray actor (``GroupActor``) that holds
a ``trainer.group.TrialGroup``: the frozen LLM once, and per trial its own projector, LoRA
adapter, optimizer, schedule, clipping and NaN handling, all stepped together (their batches
pass through the frozen layers as one). Each Tune trial stays a trial of its own -- sampled by
the searcher, stopped by ASHA, logged to MLflow as its own child run -- but its process is
only a thin client: ``run_group_member`` joins the actor, pulls the member's events (params,
per-step records, checkpoints, the summary) and replays them into the same ``RayReportSink`` a
solo trial uses, so reports, checkpoints and NaN handling look exactly like a solo trial's.

Why the actor paces members: a solo trial blocks in ``tune.report`` until the driver has taken
the result (and ASHA may stop it there). A member trains on while its client reports, but
at most REPORTS_AHEAD reports ahead of it: it pauses at the record of the next report until
its client polls again (which it does only after its reports returned). Waiting out every
report's round trip would leave a group's GPU idle meanwhile, for all its members at once;
one report ahead hides a round trip shorter than a report interval, and a trial stopped at
a report has trained at most one report interval past it (steps it never reports). A
client's poll never waits for a group step (two locks, see ``__init__``). On a GPU a
member's steps are read back a window of ``output.sync_every`` steps at a time
(trainer.step), and a window ends at every report (``_QueueSink.report_due``).
A member whose client went away (stopped by Tune, or its worker died) is dropped after
``orphan_timeout_s`` without a poll; a step longer than POLL_WAIT_S (a compiled group's
first step compiles for minutes, holding the GIL for long stretches) does not count
against the members' silence.

Over 500 lines because the actor, its member queue (``_QueueSink``, the pacing above) and
the trial-side client (``join_group``, ``run_group_member``) are the two ends of one
protocol: join, poll, leave; the numbers it reports are in ``group_stats``.

Ownership: the driver creates the actors before ``Tuner.fit`` (a Ray actor dies with its
owner, so a trial process must not own it); trials look them up by name. It creates them as
soon as Ray is up, while the sweep's preparation (assets, the frozen-feature cache) is
still running: an actor loads the shared LLM from the base config's directory, if it is
there, and gets the prepared inputs later (``set_inputs``; joins wait for them). The driver
also writes them to the sweep directory (``GROUP_INPUTS``), where a restarted actor, which
Ray starts again with its first arguments, finds them.

One group per GPU (``resources.groups``): the driver starts N actors, each in its own bundle
of one placement group (its GPU, or ``resources.group_resources``), each with K slots
(``resources.trials_per_group``). A trial joins the least loaded group that has a free
slot: ``join`` counts and adds under the actor's step lock, so two trials never take one
slot, and a group that is full says so (``False``) and the trial tries the next one, and
waits while every slot is taken (a stopped trial's ``leave`` may still be on its way). A
retried or restored trial first leaves every group (its old member, wherever it was),
then joins like any other, resuming from its checkpoint. Members' run dirs and
checkpoints are paths under ``sweep.storage_path``, written by the group's node and read
by the trial's: on a multi-node cluster that must be one filesystem every node mounts
(the driver checks it: ``tuning.raytune.driver.check_shared_storage``).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from trainer.metrics import RunSummary
from tuning.raytune.group_stats import GROUP_EVENTS, LONG_STEP_S, GroupStats

if TYPE_CHECKING:  # annotations only: a trial client imports no torch
    from trainer.inputs import Inputs

GROUP_ACTOR_PREFIX = "phase2-group-"
# A client's poll returns after this long even with nothing new; a group step longer than
# this (a compile) counts as long in the stats, since it kept the polls waiting.
POLL_WAIT_S = LONG_STEP_S
# A compiled group waits this long for paused members before stepping the others alone:
# its forward runs every slot whoever steps (trainer.group), so a step of a subset costs
# a whole step (and, for a group whose members cannot take fixed slots, a new graph).
BARRIER_S = 10.0
# Trials of a sweep join over a few seconds (each trial process starts, then joins): a
# compiled group takes its first step only once no member has joined for this long, so
# its first graph holds them all, or at once when every one of its `slots` is taken (no
# trial can join before a member leaves). Once its slots are built a member joins into a
# free slot without a compile, and the group steps on without waiting.
JOIN_WAIT_S = 10.0
# Reports a member may have made that its client has not yet returned from (module docstring);
# 0 pauses it at every report, as a solo trial blocks in tune.report.
REPORTS_AHEAD = 1
# How often a trial that found every group's slots taken asks again.
JOIN_RETRY_S = 1.0
# How long a join waits for a group's inputs: the driver sends them before any trial starts,
# and an actor still starting takes them once it is up (seconds), so only a restarted actor
# that cannot read GROUP_INPUTS waits this long (its trial errors and Tune retries it).
INPUTS_WAIT_S = 120.0


def group_actor_name(sweep_key: str, index: int = 0) -> str:
    """The name of the sweep's `index`-th group actor (the first keeps the old name)."""
    return f"{GROUP_ACTOR_PREFIX}{sweep_key}" + (f"-{index}" if index else "")


@dataclass
class _Member:
    events: deque[tuple[str, Any]] = field(default_factory=deque)
    # Steps whose records make the client tune.report, until it has returned from them.
    reports: deque[int] = field(default_factory=deque)
    delivered_through: int = 0  # highest step handed out by the last poll
    last_poll: float = field(default_factory=time.monotonic)
    done: bool = False
    paused_since: float | None = None  # when it last paused for its client (stats)

    @property
    def paused(self) -> bool:
        """Whether the member waits for its client (more than REPORTS_AHEAD reports out)."""
        return len(self.reports) > REPORTS_AHEAD


class _QueueSink:
    """The member's MetricsSink inside the actor: queues events for its client to pull.

    It shadows the client's ``RayReportSink`` decisions (a report every ``report_every``
    records, a checkpoint reported with the record after it) to know at which record a
    solo trial would block in ``tune.report``; the member pauses at such a record while
    more than REPORTS_AHEAD of them wait for its client (to poll again).
    """

    def __init__(self, member: _Member, wake: threading.Condition, report_every: int) -> None:
        self.member, self.wake, self.report_every = member, wake, report_every
        self.pending = 0
        self.stashed = False

    def log_params(self, params: dict[str, Any]) -> None:
        self._put("params", dict(params))

    def _rule(self, stashed: bool, pending: int, checkpoint: bool) -> tuple[bool, bool, int]:
        """RayReportSink.log_metrics' decision for one record: whether it reports, and the
        (stashed, pending) state after it."""
        reports = stashed
        if reports:
            stashed, pending = False, 0
        pending += 1
        if checkpoint:
            stashed = True
        elif pending >= self.report_every:
            reports, pending = True, 0
        return reports, stashed, pending

    def log_metrics(self, metrics: dict[str, Any], step: int,
                    checkpoint: Path | None = None) -> None:
        reports, self.stashed, self.pending = self._rule(self.stashed, self.pending,
                                                         checkpoint is not None)
        with self.wake:
            if reports:
                self.member.reports.append(step)
                if self.member.paused and self.member.paused_since is None:
                    self.member.paused_since = time.monotonic()
            self._put("metrics", (dict(metrics), step, str(checkpoint) if checkpoint else None))

    def report_due(self, n: int) -> bool:
        """Whether the n-th record from now makes the client report: the same rule, run
        ahead over n records (a checkpoint only ever comes last in a read-back window,
        where the window ends anyway, so none is among the n - 1 before)."""
        stashed, pending, reports = self.stashed, self.pending, False
        for _ in range(n):
            reports, stashed, pending = self._rule(stashed, pending, checkpoint=False)
        return reports

    def close(self, summary: RunSummary) -> None:
        self.member.done = True
        self._put("close", summary)

    def _put(self, kind: str, payload: Any) -> None:
        # No notify here: a group step's read-back window puts every member's records at
        # once, and waking the clients' polls at each one (all of them, at every record)
        # handed each client one record per Ray round trip and took the GIL from the step
        # thread each time. Whoever puts events wakes the polls once it is done (`_wake`).
        with self.wake:
            self.member.events.append((kind, payload))


class GroupActor:
    """Owns one ``TrialGroup`` and steps it on a thread while members are active."""

    def __init__(self, inputs: Inputs | None, device: str | None, report_every: int,
                 orphan_timeout_s: float, profile: tuple[str, int, int] | None = None,
                 slots: int | None = None, compile_cache: str | None = None,
                 shared_config: dict[str, Any] | None = None, inputs_file: str | None = None,
                 llm_dir: str | None = None) -> None:
        """`inputs`: the sweep's prepared inputs, or None to be handed them later
        (`set_inputs`; `inputs_file`: where a restarted actor reads them). `profile`:
        (path, steps, warm): write a torch.profiler report of `steps` group steps, after
        `warm` without a compile, to path (trainer.step_profile; the sweep's
        PHASE2_GROUP_PROFILE). `slots`: the group's capacity (the sweep's
        max_concurrent_trials): a compiled group's forward runs that many member slots.
        `compile_cache`: the directory of its compiled artifacts (trainer.compile_cache).
        `shared_config`: the sweep's base trial config: the step thread loads the frozen
        LLM with it before any member joins, while the trial processes start; from `llm_dir`
        before the inputs are there (None: it waits for them)."""
        from trainer.group import TrialGroup
        from trainer.inputs import inputs_from_data
        from trainer.step_profile import StepProfiler

        self._device, self._slots = device, slots
        self._shared_config = shared_config
        self._llm_dir = Path(llm_dir) if llm_dir else None
        self._cache = Path(compile_cache) if compile_cache else None
        self._stats = GroupStats()
        self._has_inputs = threading.Event()
        self._group = TrialGroup(None, device=device, log=self._group_log, slots=slots,
                                 compile_cache=self._cache)
        self._report_every = max(1, report_every)
        self._orphan_s = orphan_timeout_s
        self._members: dict[str, _Member] = {}
        self._failed: dict[str, str] = {}  # member -> traceback of the group step that failed
        # Two locks, always taken in this order. `_step_lock` serialises whatever touches
        # the TrialGroup: a group step, a member joining or leaving. `_lock` guards the
        # members' bookkeeping (events, reports, polls) and is held only briefly, so a
        # client's poll never waits for a group step. With one lock held through every
        # step, the step thread took it again at once after each (Python's locks are not
        # fair): while members trained ahead, their clients' polls could not be served.
        self._step_lock = threading.Lock()
        self._lock = threading.Condition()
        self._wakes = 0  # bumped (under _lock) whenever the step thread should look again
        self._barrier_since: float | None = None  # a compiled group waiting for members
        self._joined_at = 0.0  # when the newest member joined (time.monotonic)
        self._makeup: tuple[str, ...] = ()  # the members of the last group step
        self._joined: set[str] = set()  # every member that ever joined (group_stats.json)
        self._profiler = (StepProfiler(Path(profile[0]), profile[1], warm=profile[2],
                                       long_s=POLL_WAIT_S) if profile else None)
        if inputs is None and inputs_file and Path(inputs_file).is_file():
            # A restarted actor (Ray passes its first arguments again): what the driver
            # handed its first life.
            inputs = inputs_from_data(json.loads(Path(inputs_file).read_text()))
        if inputs is not None:
            self.set_inputs(inputs)
        self._thread = threading.Thread(target=self._loop, name="group-steps", daemon=True)
        self._thread.start()

    def set_inputs(self, inputs: Inputs) -> None:
        """The sweep's prepared inputs (once; later calls change nothing): joins wait for
        them."""
        with self._lock:
            if self._has_inputs.is_set():
                return
            self._group.inputs = inputs
            self._stats.inputs_at = time.monotonic()
            self._has_inputs.set()
            self._wake()

    def join(self, member_id: str, cfg_data: dict[str, Any], resume: bool) -> bool:
        """Add (or, for a retried trial, replace) a member; errors raise in the caller.
        False (nothing changed) when all of the group's `slots` are taken by others: the
        count and the add are one step under the step lock, so no two trials take a slot."""
        from trainer.config import config_from_data

        cfg = config_from_data(cfg_data, f"trial {member_id}")
        with self._lock:
            if self._stats.first_asked is None:
                self._stats.first_asked = time.monotonic()
        if not self._has_inputs.wait(INPUTS_WAIT_S):
            raise RuntimeError(f"trial {member_id}: the shared group had no inputs from the "
                               f"sweep's driver after {INPUTS_WAIT_S:.0f}s")
        with self._step_lock:
            began = time.monotonic()
            if self._slots is not None and self.load(but=member_id) >= self._slots:
                return False
            self._drop(member_id)  # a retried trial's old member, if still there (a leave)
            adding = time.monotonic()
            member = _Member()
            sink = _QueueSink(member, self._lock, self._report_every)
            # The member's read-back windows end at its reports: it pauses exactly there.
            self._group.add_member(member_id, cfg, sink, resume=resume,
                                   report_due=sink.report_due)
            with self._lock:
                self._failed.pop(member_id, None)  # a retry of a trial a failed step dropped
                self._members[member_id] = member
                self._joined.add(member_id)
                self._joined_at = time.monotonic()
                self._stats.joins += 1
                self._stats.join_s += self._joined_at - adding
                if self._stats.started is None:
                    self._stats.started = self._joined_at
                    self._stats.first_join_s = self._joined_at - began
                self._wake()
        return True

    def load(self, but: str | None = None) -> int:
        """The members training now (finished ones wait only for their last poll), other
        than `but`: how many of the group's slots are taken."""
        with self._lock:
            return sum(not s.done for m, s in self._members.items() if m != but)

    def poll(self, member_id: str) -> tuple[list[tuple[str, Any]], bool]:
        """Events since the last poll (waits up to POLL_WAIT_S for one); and whether the
        member is finished (its last event was delivered)."""
        deadline = time.monotonic() + POLL_WAIT_S
        with self._lock:
            member = self._members.get(member_id)
            if member is None and member_id in self._failed:
                raise RuntimeError("the shared group's step failed; Tune retries this trial "
                                   f"from its checkpoint:\n{self._failed.pop(member_id)}")
            if member is None:
                # Dropped as an orphan, or the actor restarted and lost it: the trial errors
                # and Tune retries it from its last checkpoint (it rejoins with resume).
                raise RuntimeError(f"trial {member_id} is not a member of the shared group")
            # This poll means the client has processed what the last one handed out (its
            # tune.report calls returned): those reports no longer hold the member back.
            acked = False
            while member.reports and member.reports[0] <= member.delivered_through:
                member.reports.popleft()
                acked = True
            if acked:
                if member.paused_since is not None and not member.paused:
                    self._stats.pauses += 1
                    self._stats.paused_s += time.monotonic() - member.paused_since
                    member.paused_since = None
                self._wake()
            while not member.events and not member.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            member.last_poll = time.monotonic()
            events = list(member.events)
            member.events.clear()
            steps = [payload[1] for kind, payload in events if kind == "metrics"]
            member.delivered_through = max(steps, default=member.delivered_through)
            finished = member.done
            if finished:
                self._members.pop(member_id, None)
            self._wake()
            return events, finished

    def leave(self, member_id: str) -> None:
        """The client is going away (stopped by Tune): end the member."""
        with self._step_lock:
            self._drop(member_id)

    def stats(self) -> dict[str, Any]:
        """Where the step thread's time went so far (``GroupStats``), as plain data, with
        the members that ever joined and the Ray node the group ran on."""
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        with self._lock:
            return {**self._stats.as_dict(), "members": sorted(self._joined), "node_id": node}

    def close(self) -> list[str]:
        """End every member still here (the sweep is over); the ones it ended.

        A trial Tune stopped sends ``leave`` as its client goes away, without waiting for
        it; one still in flight when the sweep ends would die with the actor, and its run
        would have no summary. The driver calls this before it kills the actor."""
        with self._step_lock:
            with self._lock:
                left = [m for m, s in self._members.items() if not s.done]
            for member_id in left:
                self._drop(member_id)
        return left

    # ------------------------------------------------------------------ the step thread

    def _wake(self) -> None:
        """Under `_lock`: wake the step thread (and waiting polls) to look again."""
        self._wakes += 1
        self._lock.notify_all()

    def _drop(self, member_id: str) -> None:
        """End a member, if it is one (the caller holds `_step_lock`, not `_lock`)."""
        began = time.monotonic()
        with self._lock:
            member = self._members.pop(member_id, None)
        left = member is not None and not member.done
        if left:
            self._group.remove_member(member_id)  # queues its summary
        with self._lock:
            if left:
                self._stats.leaves += 1
                self._stats.leave_s += time.monotonic() - began
            self._wake()

    def _preload(self, llm_dir: Path | None) -> None:
        """Load the shared LLM before the first join (the caller holds `_step_lock`), from
        `llm_dir` (None: the inputs'). A failure is only logged: the first join loads it
        again and its trial gets the error."""
        from trainer.config import config_from_data

        began = time.monotonic()
        try:
            cfg = config_from_data(self._shared_config, "the sweep's base trial config")
            self._group.load_shared_llm(cfg, "the sweep's base trial config", llm_dir)
        except Exception:  # the first join reports it, in the trial's own words
            print(f"[group] loading the shared LLM ahead failed; the first join loads it:\n"
                  f"{traceback.format_exc()}", flush=True)
        self._stats.preload_s = time.monotonic() - began

    def _loop(self) -> None:
        if self._shared_config is not None:
            if self._llm_dir is None:  # the preparation builds the LLM: wait for it
                self._has_inputs.wait()
            with self._step_lock:
                self._preload(self._llm_dir)
        while True:
            with self._step_lock:
                ready, wait_s, seen, why = self._plan_step()
                if ready:
                    self._step(ready)
            if not ready:
                with self._lock:
                    if self._wakes == seen:  # nothing changed since the plan was made
                        self._stats.begin_wait(why)
                        self._lock.wait(wait_s)
                        self._stats.end_wait()

    def _plan_step(self) -> tuple[list[str], float, int, str]:
        """The members to step now, else ([], how long to wait); the wake count the
        decision saw; and why it waits (a GroupStats.wait_s key). The caller holds
        `_step_lock`."""
        with self._lock:
            now = time.monotonic()
            orphans = [m for m, s in self._members.items()
                       if not s.done and now - s.last_poll > self._orphan_s]
        for member_id in orphans:
            self._drop(member_id)  # its client is gone
        with self._lock:
            seen = self._wakes
            # Members waiting for their client's report sit this step out (paused).
            live = [m for m, s in self._members.items() if not s.done]
            ready = [m for m in live if not self._members[m].paused]
            if not ready:
                return [], 1.0, seen, "clients" if live else "empty"
            full = self._slots is not None and len(live) >= self._slots
            if (self._group.compiled and not self._group.fixed_slots and not full
                    and now - self._joined_at < JOIN_WAIT_S):
                return [], 0.05, seen, "joining"  # more members may be on their way
            if len(ready) < len(live) and self._group.compiled:
                # Members of one sweep reach their reports at the same steps: wait for
                # the paused ones' clients rather than compile a graph for a subset.
                if self._barrier_since is None:
                    self._barrier_since = now
                if now - self._barrier_since < BARRIER_S:
                    return [], 0.05, seen, "barrier"
            self._barrier_since = None
            return ready, 0.0, seen, ""

    def _step(self, ready: list[str]) -> None:
        """One group step of `ready` (the caller holds `_step_lock`, not `_lock`)."""
        makeup = tuple(sorted(ready))
        if self._group.compiled and not self._group.fixed_slots and makeup != self._makeup:
            # For the actor's Ray worker log (the sweep runs Ray with log_to_driver off;
            # its console says a compiled group compiles): a new make-up is a new graph,
            # and its first step compiles for minutes at reference scale.
            print(f"[group] stepping {len(ready)} members together (the first step "
                  "compiles; later members take free slots)", flush=True)
        self._makeup = makeup
        # The group stepped (a failed step replaces self._group) and its count before.
        group, started = self._group, time.monotonic()
        trained, synced, eager = group.member_steps, group.sync_s, group.ahead_steps
        try:
            with self._profiler.step() if self._profiler else contextlib.nullcontext():
                group.step(only=ready)
        except Exception:  # an OOM, a fault hook: the whole group step is lost
            self._fail_all(traceback.format_exc())
        ended = time.monotonic()
        # Not the profile report's writing (tens of seconds once, counted apart): it is
        # neither a compile nor a step.
        report_s = self._profiler.report_s if self._profiler else 0.0
        took = ended - started - (report_s - self._stats.profile_report_s)
        long = took > POLL_WAIT_S
        with self._lock:
            self._wake()  # the step's records (and summaries) are all queued: hand them out
            st = self._stats
            st.group_steps += 1
            if st.group_steps == 1:
                st.first_step_s = took
            # what it launched: a member in `ready` that ends before training is not counted
            stepped = group.member_steps - trained
            st.member_steps += stepped
            st.sync_s += group.sync_s - synced
            st.ahead_steps += group.ahead_steps - eager
            st.profile_report_s = report_s
            st.step_s += took
            if long:
                st.long_steps += 1
                st.long_step_s += took
                # A compile holds the GIL for long stretches, and a client's polls may
                # have been slow to be served: not their silence.
                for member in self._members.values():
                    member.last_poll = max(member.last_poll, ended)
            else:
                st.count_step(stepped, took)
        if long:
            print(f"[group] a step of {len(ready)} members took {took:.0f}s", flush=True)

    def _group_log(self, line: str) -> None:
        """The group's log: its shared LLM's load, its compile cache's, compiled program's
        and compile-ahead helper's lines (a failed helper says why) become events of its
        stats, which the sweep prints as it ends (Ray does not forward a worker's output
        to the driver's console); the members' own lines go through their sinks."""
        if line.startswith(GROUP_EVENTS):
            self._stats.event(line)
            print(line, flush=True)  # and the actor's worker log, as it happens

    def _fail_all(self, error: str) -> None:
        """Every member's client raises (Tune retries each trial from its checkpoint, and it
        rejoins); the group restarts empty, as a crashed solo process would. The caller
        holds `_step_lock`."""
        from trainer.group import TrialGroup

        fresh = TrialGroup(self._group.inputs, device=self._device, log=self._group_log,
                           slots=self._slots, compile_cache=self._cache)
        with self._lock:
            for member_id, member in self._members.items():
                member.done = True
                self._failed[member_id] = error
            self._members.clear()
            self._group = fresh
            self._wake()


def start_group_actor(name: str, *, report_every: int, num_cpus: float, num_gpus: float,
                      orphan_timeout_s: float,
                      profile: tuple[str, int, int] | None = None,
                      slots: int | None = None, compile_cache: str | None = None,
                      resources: dict[str, float] | None = None,
                      scheduling: Any = None,
                      shared_config: dict[str, Any] | None = None,
                      inputs_file: str | None = None, llm_dir: str | None = None) -> Any:
    """Create one of the sweep's group actors (owned by the driver); returns its handle.
    It starts without the sweep's inputs: the driver hands them later (``set_inputs``) and
    also writes them to `inputs_file`, for a restarted actor. `slots`: the group's capacity
    (resources.trials_per_group); `compile_cache`: a directory for its compiled artifacts,
    shared by the sweeps of one storage; `resources`: custom Ray resources it also holds;
    `scheduling`: its Ray scheduling strategy (the driver's: its bundle of the sweep's
    placement group); `shared_config`: the sweep's base trial config, to load the shared LLM
    with as the actor starts (from `llm_dir` before its inputs are there)."""
    device = "cuda" if num_gpus > 0 else "cpu"
    cls = ray.remote(GroupActor)
    # max_concurrency: polls block (up to POLL_WAIT_S) in threads; one per member plus joins.
    # max_restarts: a crashed group comes back empty, its trials error and are retried
    # from their checkpoints (FailureConfig), rejoining a group (a restart keeps its bundle).
    return cls.options(name=name, num_cpus=num_cpus, num_gpus=num_gpus,
                       resources=resources or None, scheduling_strategy=scheduling,
                       max_concurrency=64, max_restarts=3).remote(
        None, device, report_every, orphan_timeout_s, profile, slots, compile_cache,
        shared_config, inputs_file, llm_dir)


def join_group(actors: list[Any], member_id: str, cfg_data: dict[str, Any], resume: bool,
               wait_s: float) -> Any:
    """Join `member_id` to the least loaded of `actors` with a free slot; its handle.

    With several groups a retried trial's old member may sit in any of them: it leaves
    them all first (two members of one trial would write one run dir). Every slot taken
    (a leaving trial's ``leave`` still on its way, an orphan not yet dropped): it asks
    again every JOIN_RETRY_S, up to `wait_s`, then raises (Tune retries the trial)."""
    if len(actors) > 1:
        ray.get([a.leave.remote(member_id) for a in actors])
    deadline = time.monotonic() + wait_s
    while True:
        loads = ray.get([a.load.remote() for a in actors])
        for i in sorted(range(len(actors)), key=lambda i: (loads[i], i)):
            if ray.get(actors[i].join.remote(member_id, cfg_data, resume)):
                return actors[i]
        if time.monotonic() > deadline:
            raise RuntimeError(f"trial {member_id}: no shared group had a free slot for "
                               f"{wait_s:.0f}s (loads {loads})")
        time.sleep(JOIN_RETRY_S)


def run_group_member(config: dict[str, Any], *, base: dict[str, Any], opts: Any,
                     actor_names: list[str], join_wait_s: float = 300.0) -> None:
    """Ray Tune function trainable: one trial as a member of one of the sweep's shared
    groups (`actor_names`; `join_wait_s`: how long it waits for a free slot)."""
    from tuning.raytune.trainable import RayReportSink, start_trial

    start = start_trial(config, base, opts)
    if start is None:
        return
    trial_id, run_dir, watchdog = start.trial_id, start.run_dir, start.watchdog
    actors = [ray.get_actor(name) for name in actor_names]
    actor = join_group(actors, trial_id, start.data, start.resume, join_wait_s)
    watchdog.start()
    sink = RayReportSink(opts, run_dir, watchdog)
    finished = False
    try:
        while not finished:
            events, finished = ray.get(actor.poll.remote(trial_id))
            for kind, payload in events:
                if kind == "params":
                    sink.log_params(payload)
                elif kind == "metrics":
                    metrics, step, checkpoint = payload
                    sink.log_metrics(metrics, step, Path(checkpoint) if checkpoint else None)
                elif kind == "close":
                    sink.close(payload)
                    finished = True
    finally:
        if not finished:  # stopped by Tune between polls, or an error here
            actor.leave.remote(trial_id)
