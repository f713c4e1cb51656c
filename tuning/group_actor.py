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
its client polls again (which it does only after its reports returned). With 8 trials the
driver's round trip took about as long as the 10 steps between two reports (an H200 sweep ran
its group at 14% MFU against 27.5% stepped directly, run 11), so a member that waited out
every report left the GPU idle half the time; one report ahead hides the round trip, and a
trial stopped at a report has trained at most one report interval past it (the steps it
never reports). On a GPU its steps are read back a window of ``output.sync_every`` steps at
a time (trainer.step_guard), and a window ends at every report (``_QueueSink.report_due``).
A member whose client went away (stopped by Tune, or its worker died) is dropped after
``orphan_timeout_s`` without a poll; a step longer than POLL_WAIT_S (a compiled group's
first step compiles for minutes) kept every client's poll waiting on the actor, so that
silence does not count against them.

Ownership: the driver creates the actor before ``Tuner.fit`` (a Ray actor dies with its
owner, so a trial process must not own it); trials look it up by name. Trials must run on the
actor's node (run dirs are local paths); on one machine this always holds.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from trainer.inputs import Inputs
from trainer.metrics import RunSummary

GROUP_ACTOR_PREFIX = "phase2-group-"
POLL_WAIT_S = 5.0  # a client's poll returns after this long even with nothing new
# A compiled group waits this long for paused members before stepping the others alone:
# every different set of members stepped together is another graph to compile.
BARRIER_S = 10.0
# Trials of a sweep join over a few seconds (each trial process starts, then joins): a
# compiled group takes its first step with a new member only once no member has joined
# for this long, so it compiles the whole make-up once instead of each one on the way.
JOIN_WAIT_S = 10.0
# Reports a member may have made that its client has not yet returned from (module docstring);
# 0 pauses it at every report, as a solo trial blocks in tune.report.
REPORTS_AHEAD = 1


def group_actor_name(sweep_key: str) -> str:
    return f"{GROUP_ACTOR_PREFIX}{sweep_key}"


@dataclass
class _Member:
    events: deque[tuple[str, Any]] = field(default_factory=deque)
    # Steps whose records make the client tune.report, until it has returned from them.
    reports: deque[int] = field(default_factory=deque)
    delivered_through: int = 0  # highest step handed out by the last poll
    last_poll: float = field(default_factory=time.monotonic)
    done: bool = False

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
        if reports:
            self.member.reports.append(step)
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
        with self.wake:
            self.member.events.append((kind, payload))
            self.wake.notify_all()


class GroupActor:
    """Owns one ``TrialGroup`` and steps it on a thread while members are active."""

    def __init__(self, inputs: Inputs, device: str | None, report_every: int,
                 orphan_timeout_s: float) -> None:
        from trainer.group import TrialGroup

        self._inputs, self._device = inputs, device
        self._group = TrialGroup(inputs, device=device, log=lambda *_: None)
        self._report_every = max(1, report_every)
        self._orphan_s = orphan_timeout_s
        self._members: dict[str, _Member] = {}
        self._failed: dict[str, str] = {}  # member -> traceback of the group step that failed
        self._lock = threading.Condition()  # members + group structure vs. the step thread
        self._barrier_since: float | None = None  # a compiled group waiting for members
        self._joined_at = 0.0  # when the newest member joined (time.monotonic)
        self._makeup: tuple[str, ...] = ()  # the members of the last group step
        self._thread = threading.Thread(target=self._loop, name="group-steps", daemon=True)
        self._thread.start()

    def join(self, member_id: str, cfg_data: dict[str, Any], resume: bool) -> None:
        """Add (or, for a retried trial, replace) a member; errors raise in the caller."""
        from trainer.config import config_from_data

        cfg = config_from_data(cfg_data, f"trial {member_id}")
        with self._lock:
            if member_id in self._members:
                self._drop(member_id)
            self._failed.pop(member_id, None)  # a retry of a trial the failed step dropped
            member = _Member()
            sink = _QueueSink(member, self._lock, self._report_every)
            # The member's read-back windows end at its reports: it pauses exactly there.
            self._group.add_member(member_id, cfg, sink, resume=resume,
                                   report_due=sink.report_due)
            self._members[member_id] = member
            self._joined_at = time.monotonic()
            self._lock.notify_all()

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
                self._lock.notify_all()
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
            self._lock.notify_all()
            return events, finished

    def leave(self, member_id: str) -> None:
        """The client is going away (stopped by Tune): end the member."""
        with self._lock:
            if member_id in self._members:
                self._drop(member_id)

    # ------------------------------------------------------------------ the step thread

    def _drop(self, member_id: str) -> None:
        member = self._members.pop(member_id)
        if not member.done:
            self._group.remove_member(member_id)

    def _loop(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                for member_id, member in list(self._members.items()):
                    if not member.done and now - member.last_poll > self._orphan_s:
                        self._drop(member_id)  # its client is gone
                # Members waiting for their client's report sit this step out (paused).
                live = [m for m, s in self._members.items() if not s.done]
                ready = [m for m in live if not self._members[m].paused]
                if not ready:
                    self._lock.wait(1.0)
                    continue
                if self._group.compiled and now - self._joined_at < JOIN_WAIT_S:
                    self._lock.wait(0.05)  # more members may be on their way
                    continue
                if len(ready) < len(live) and self._group.compiled:
                    # Members of one sweep reach their reports at the same steps: wait for
                    # the paused ones' clients rather than compile a graph for a subset.
                    if self._barrier_since is None:
                        self._barrier_since = now
                    if now - self._barrier_since < BARRIER_S:
                        self._lock.wait(0.05)
                        continue
                self._barrier_since = None
                makeup = tuple(sorted(ready))
                if self._group.compiled and makeup != self._makeup:
                    # For the actor's Ray worker log (the sweep runs Ray with log_to_driver
                    # off; its console says a compiled group compiles): a new make-up is a
                    # new graph, and its first step compiles for minutes at reference scale.
                    print(f"[group] stepping {len(ready)} members together (a new set "
                          "compiles first)", flush=True)
                self._makeup = makeup
                started = time.monotonic()
                try:
                    self._group.step(only=ready)
                except Exception:  # an OOM, a fault hook: the whole group step is lost
                    self._fail_all(traceback.format_exc())
                ended = time.monotonic()
                if ended - started > POLL_WAIT_S:
                    print(f"[group] a step of {len(ready)} members took "
                          f"{ended - started:.0f}s", flush=True)
                    # The clients' polls waited on the lock all along: not their silence.
                    for member in self._members.values():
                        member.last_poll = max(member.last_poll, ended)

    def _fail_all(self, error: str) -> None:
        """Every member's client raises (Tune retries each trial from its checkpoint, and it
        rejoins); the group restarts empty, as a crashed solo process would."""
        from trainer.group import TrialGroup

        for member_id, member in self._members.items():
            member.done = True
            self._failed[member_id] = error
        self._members.clear()
        self._group = TrialGroup(self._inputs, device=self._device, log=lambda *_: None)
        self._lock.notify_all()


def start_group_actor(name: str, inputs: Inputs, *, report_every: int, num_cpus: float,
                      num_gpus: float, orphan_timeout_s: float) -> Any:
    """Create the sweep's group actor (owned by the driver); returns its handle."""
    device = "cuda" if num_gpus > 0 else "cpu"
    cls = ray.remote(GroupActor)
    # max_concurrency: polls block (up to POLL_WAIT_S) in threads; one per member plus joins.
    # max_restarts: a crashed group comes back empty, its trials error and are retried
    # from their checkpoints (FailureConfig), rejoining the new actor.
    return cls.options(name=name, num_cpus=num_cpus, num_gpus=num_gpus,
                       max_concurrency=64, max_restarts=3).remote(
        inputs, device, report_every, orphan_timeout_s)


def run_group_member(config: dict[str, Any], *, base: dict[str, Any], opts: Any,
                     actor_name: str) -> None:
    """Ray Tune function trainable: one trial as a member of the sweep's shared group."""
    from tuning.trainable import RayReportSink, start_trial

    start = start_trial(config, base, opts)
    if start is None:
        return
    trial_id, run_dir, watchdog = start.trial_id, start.run_dir, start.watchdog
    actor = ray.get_actor(actor_name)
    ray.get(actor.join.remote(trial_id, start.data, start.resume))
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
