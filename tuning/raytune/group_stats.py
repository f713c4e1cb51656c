"""A shared group's figures: where its step thread spent its time (steps, compiles, waits
and why, the time before its first member), for ``group_stats.json`` and the sweep's closing
line. The actor (``tuning.raytune.group_actor``) fills a ``GroupStats``; nothing here needs
Ray."""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

LONG_STEP_S = 5.0  # a group step longer than this is counted as a compile
RECENT_STEPS = 1000  # the short group steps the stats' median is taken over
# The group's log lines kept as events (the rest are its members', through their sinks).
GROUP_EVENTS = ("[group] shared LLM", "[compile cache]", "[compile ahead]", "[compiled program]")


@dataclass
class GroupStats:
    """Where the actor's step thread spent its time: what a sweep prints at its end and
    writes to ``group_stats.json``, so that a slow group says whether it was its steps or
    its waits (and for whom) that were slow."""

    group_steps: int = 0
    # Optimizer steps launched, summed over members: with the steps a NaN stop found
    # later in its read-back window (no-ops on the device, never recorded) among them.
    member_steps: int = 0
    step_s: float = 0.0  # in TrialGroup.step (forward, backward, optimizers, read-backs)
    long_steps: int = 0  # steps over LONG_STEP_S: a compiled group's compiles
    long_step_s: float = 0.0
    # The group's first step, whatever its length: a compiled group's compile (and first
    # CUDA graph recordings), also when it is under LONG_STEP_S (a warm regional compile).
    first_step_s: float = 0.0
    ahead_steps: int = 0  # run eagerly while a helper process compiled (model.compile_ahead)
    # The short steps by how many members each stepped: [steps, seconds]. A compiled
    # group's step runs all its slots by default (model.run_empty_slots), so this says how
    # much of the wall ran few members (ASHA's tail) and what running only their slots
    # would save (docs/performance.md).
    by_members: dict[int, list[float]] = field(default_factory=dict)
    # The latest short steps' durations, for the median: the mean of the short steps
    # carries the first ones after a compile (CUDA graph recording, 1-5 s each), which in
    # a 300-step sweep raise it from the steady ~37 ms to ~50 (runs 16-20, H200).
    recent_s: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    # Of step_s, waiting in read-backs for the device to finish the launched work: most of
    # it says the device bounds the group. Little of it says less: with CUDA graphs a host
    # that runs ahead blocks in its launches once the GPU's queue is full (a GPU-bound group
    # can read near 0: docs/shared-group.md).
    sync_s: float = 0.0
    profile_report_s: float = 0.0  # writing PHASE2_GROUP_PROFILE's report (not in step_s)
    # The step thread waiting, by why: every live member paused for its client's report
    # ("clients"), a compiled group holding for paused members (BARRIER_S, "barrier") or
    # for members still joining (JOIN_WAIT_S, "joining"), or no member at all ("empty").
    wait_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("clients", "barrier", "joining", "empty"), 0.0))
    # Make-up changes: a member joining (its build, the first's included) or leaving (its
    # final weights and summary) holds the step lock, so the steps wait for it; neither is
    # a step or a wait, and a sweep with ASHA has one of each per trial.
    joins: int = 0
    join_s: float = 0.0
    leaves: int = 0
    leave_s: float = 0.0
    pauses: int = 0  # a member paused until its client polled again ...
    paused_s: float = 0.0  # ... for this long in all (the clients' round trips)
    # The actor's start and its first member's join, which loads the frozen LLM onto the
    # device: what a sweep spends before its group's first step, apart from the waits.
    created: float = field(default_factory=time.monotonic)
    # when the sweep's prepared inputs reached the actor (started before the preparation
    # ends, it loads the LLM meanwhile): the group's own figures count from here
    inputs_at: float | None = None
    preload_s: float = 0.0  # the LLM loaded ahead, as the actor starts (0: by the first join)
    first_join_s: float = 0.0
    # the first trial's join call: before `preload_s` ends, the LLM's load kept it waiting
    first_asked: float | None = None
    started: float | None = None  # the first member's join: the figures start there
    waiting: tuple[str, float] | None = None  # the wait in progress: why, since when
    # "12.3s <line>", from `created`: a few per LLM load, compile and helper, no more
    events: list[str] = field(default_factory=list)

    def event(self, line: str) -> None:
        self.events.append(f"{time.monotonic() - self.created:.1f}s {line}")

    def begin_wait(self, why: str) -> None:
        if self.started is not None:
            self.waiting = (why, time.monotonic())

    def end_wait(self) -> None:
        if self.waiting is not None:
            why, since = self.waiting
            self.wait_s[why] += time.monotonic() - since
            self.waiting = None

    def count_step(self, members: int, took: float) -> None:
        """A short (not compiling) group step of `members` members that took `took` s."""
        self.recent_s.append(took)
        tally = self.by_members.setdefault(members, [0, 0.0])
        tally[0] += 1
        tally[1] += took

    def as_dict(self) -> dict[str, Any]:
        now = time.monotonic()
        origin = self.inputs_at or now
        wall = max(now - (self.started or now), 1e-9)
        waits = dict(self.wait_s)
        if self.waiting is not None:  # counted so far
            waits[self.waiting[0]] += now - self.waiting[1]
        warm = self.group_steps - self.long_steps
        return {
            "wall_s": round(wall, 3), "group_steps": self.group_steps,
            "member_steps": self.member_steps,
            "members_per_step": round(self.member_steps / max(1, self.group_steps), 2),
            "step_s": round(self.step_s, 3),
            "step_ms_mean": round(1e3 * (self.step_s - self.long_step_s) / max(1, warm), 2),
            "step_ms_median": round(1e3 * statistics.median(self.recent_s), 2)
            if self.recent_s else 0.0,
            "long_steps": self.long_steps, "long_step_s": round(self.long_step_s, 3),
            "first_step_s": round(self.first_step_s, 3),
            "ahead_steps": self.ahead_steps,
            # JSON keys are strings: "3" -> 3 members per step
            "steps_by_members": {str(n): {"steps": int(c), "s": round(t, 3)}
                                 for n, (c, t) in sorted(self.by_members.items())},
            "sync_s": round(self.sync_s, 6),  # short on a CPU: not rounded to 0
            # 4 significant digits, not places: a CPU's read-backs are ~1e-5 of its steps, not 0
            "sync_fraction": float(
                f"{self.sync_s / max(self.step_s - self.long_step_s, 1e-9):.4g}"),
            "profile_report_s": round(self.profile_report_s, 3),
            "wait_s": {k: round(v, 3) for k, v in waits.items()},
            "busy_fraction": round(self.step_s / wall, 3),
            "joins": self.joins, "join_s": round(self.join_s, 3),
            "leaves": self.leaves, "leave_s": round(self.leave_s, 3),
            "pauses": self.pauses,
            "pause_ms_mean": round(1e3 * self.paused_s / max(1, self.pauses), 1),
            # from the inputs' arrival to its first member in: the trial processes starting,
            # and what is left of the shared LLM's load, ahead (preload_s) or in the first
            # join; the actor started `started_ahead_s` before its inputs
            "to_first_member_s": round((self.started or now) - origin, 3),
            "first_join_asked_s": round((self.first_asked or now) - origin, 3),
            "started_ahead_s": round(origin - self.created, 3),
            "preload_s": round(self.preload_s, 3),
            "first_join_s": round(self.first_join_s, 3),
            "events": list(self.events),
        }


def describe_stats(stats: dict[str, Any]) -> str:
    """One console line of ``GroupStats.as_dict()``: the group's steps, then its waits."""
    waits = ", ".join(f"{why} {s:.0f}s" for why, s in stats["wait_s"].items() if s >= 0.5)
    compiles = (f"; {stats['long_steps']} steps over {LONG_STEP_S:.0f}s (compiles) took "
                f"{stats['long_step_s']:.0f}s" if stats["long_steps"] else "")
    if stats["ahead_steps"]:
        compiles += f"; {stats['ahead_steps']} ran eagerly while a helper process compiled"
    makeup = (f"; {stats['joins']} joins took {stats['join_s']:.1f}s and {stats['leaves']} "
              f"leaves {stats['leave_s']:.1f}s of it" if stats["joins"] or stats["leaves"]
              else "")
    pauses = (f"; members paused {stats['pauses']} times for their clients' reports, "
              f"{stats['pause_ms_mean']:.0f} ms on average" if stats["pauses"] else "")
    return (f"{stats['group_steps']} group steps of {stats['members_per_step']} members, "
            f"{stats['step_ms_mean']:.1f} ms each, median {stats['step_ms_median']:.1f} ms "
            f"({100 * stats['sync_fraction']:.0f}% of it waiting for the device), the first "
            f"{stats['first_step_s']:.1f}s{compiles}; stepping "
            f"{100 * stats['busy_fraction']:.0f}% of {stats['wall_s']:.0f}s, waiting for: "
            f"{waits or 'nothing'}{makeup}{pauses}; first member in "
            f"{stats['to_first_member_s']:.0f}s after the sweep's inputs (asked at "
            f"{stats['first_join_asked_s']:.0f}s; LLM loaded ahead in "
            f"{stats['preload_s']:.0f}s from {stats['started_ahead_s']:.0f}s before the "
            f"inputs, the join {stats['first_join_s']:.0f}s)")
