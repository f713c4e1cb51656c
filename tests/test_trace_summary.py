"""bench/trace_summary.py: the host's self time per function from a profiler trace."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "trace_summary", Path(__file__).parents[1] / "bench" / "trace_summary.py")
trace_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trace_summary)


def _event(name: str, ts: float, dur: float, cat: str = "python_function") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, "pid": 1}


def _self_ms(table: str) -> dict[str, float]:
    rows = [line.split(None, 3) for line in table.splitlines()[2:]]
    return {name: float(self_ms) for self_ms, _, _, name in rows}


def test_an_overlapping_event_is_not_charged_as_a_child():
    # A Python call (1,000 us) whose first C++ op's span ends 50 us after the next call
    # began: the next call (800 us) overlaps the op without nesting in it, and belongs to
    # the outer call.
    events = [_event("outer", 0, 1000),
              _event("prologue_op", 10, 100, cat="cpu_op"),
              _event("body", 60, 900),
              _event("leaf_op", 100, 500, cat="cpu_op")]
    table = trace_summary.summarize(json.dumps({"traceEvents": events}), steps=1)
    self_ms = _self_ms(table)
    assert self_ms["py body"] == 0.4       # 900 - its op's 500
    assert self_ms["leaf_op"] == 0.5
    assert self_ms["prologue_op"] == 0.1
    assert self_ms["py outer"] == 0.0      # 1000 - prologue 100 - body 900


def test_nested_events_take_their_childrens_time_out():
    events = [_event("step", 0, 1000), _event("forward", 100, 600),
              _event("aten::mm", 200, 300, cat="cpu_op"), _event("optimizer", 700, 250)]
    self_ms = _self_ms(trace_summary.summarize(json.dumps({"traceEvents": events}), steps=2))
    assert self_ms == {"py step": 0.075, "py forward": 0.15, "aten::mm": 0.15,
                       "py optimizer": 0.125}
