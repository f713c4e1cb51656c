"""Where a profiled window's host time went, by Python function: self time (its own,
its callees' taken out) and total time per step, from a torch.profiler Chrome trace
recorded with `with_stack=True` (`PROFILE_TRACE=DIR` in bench/gpu_trainer.py's
`profile_steps`).

    python bench/trace_summary.py runs/gpu-results/traces/trace-0.json.gz --steps 10
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

SLACK_US = 1.0  # how far a child's end may pass its parent's (the trace's clock jitter)


def summarize(trace_json: str, steps: int, rows: int = 25, threads: int = 2) -> str:
    """Tables of the Python functions and CPU ops (aten, CUDA runtime) with the most self
    time per step, one per thread, for the `threads` threads that ran the most (on a GPU
    the autograd engine runs the backward on a thread of its own)."""
    events = [e for e in json.loads(trace_json)["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") in ("python_function", "cpu_op",
                                                         "cuda_runtime", "cuda_driver")]
    by_thread = collections.Counter(e["tid"] for e in events)
    return "\n".join(_thread_table([e for e in events if e["tid"] == tid], tid, steps, rows)
                     for tid, _ in by_thread.most_common(threads))


def _thread_table(events: list[dict], tid: object, steps: int, rows: int) -> str:
    events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
    self_us: collections.Counter = collections.Counter()
    total_us: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    stack: list[list] = []  # [end, name, time in children, duration] of the open events
    for e in events:
        # A parent must outlast its child. The profiler's Python and op events can overlap
        # by a few microseconds without nesting (a C++ op's span ending just after the
        # Python call that started it begins its next sibling): nesting such an event
        # under the one it overlaps would charge a long call's whole span as the short
        # one's child, and the long call's caller with none of it.
        end = e["ts"] + e["dur"]
        while stack and (stack[-1][0] <= e["ts"] or stack[-1][0] < end - SLACK_US):
            _, name, child, dur = stack.pop()
            self_us[name] += dur - child
        name = ("py " if e["cat"] == "python_function" else "") + e["name"]
        if stack:
            stack[-1][2] += e["dur"]
        total_us[name] += e["dur"]
        calls[name] += 1
        stack.append([end, name, 0.0, e["dur"]])
    for _, name, child, dur in stack:
        self_us[name] += dur - child
    lines = [f"host self time per step by function (thread {tid}, {steps} steps): "
             f"{sum(self_us.values()) / steps / 1e3:.2f} ms in all traced events",
             f"{'self ms':>8} {'total ms':>9} {'calls':>7}  name"]
    for name, us in self_us.most_common(rows):
        lines.append(f"{us / steps / 1e3:8.3f} {total_us[name] / steps / 1e3:9.3f} "
                     f"{calls[name] / steps:7.1f}  {name[:110]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    if args.trace.suffix == ".gz":
        with gzip.open(args.trace, "rt") as f:
            raw = f.read()
    else:
        raw = args.trace.read_text()
    print(summarize(raw, args.steps, args.rows))


if __name__ == "__main__":
    main()
