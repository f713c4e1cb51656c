"""Where a run's metrics go: a small sink interface and its plain implementations.

The trainer calls a sink; it never imports Ray or MLflow. The Ray/MLflow sinks
live in `tuning/`, and a one-run CLI may pass in any sink it built.

One record per optimizer step, keys (NaN/inf may appear as floats here; each sink
decides how to store them, JSON writes them as null):
    step, epoch, loss, grad_norm, grad_norm/projector, grad_norm/lora,
    lr/projector, lr/lora, clipped (0/1), skipped (0/1), nan_events (cumulative),
    nan_event (the step's NaN/inf event as a plain dict, `asdict(NanEvent)`, with the
    policy's action; None on a clean step), samples_per_s, tokens_per_s, wall_time (Unix
    seconds when the step's record was made), and eval_loss on evaluation steps.

`nan_event` is the one value that is not a number: sinks that only take numbers (Tune
results, MLflow metrics) skip it, and `nan_event_of` turns it back into a `NanEvent`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

STEP_KEYS = (
    "step", "epoch", "loss", "grad_norm", "grad_norm/projector", "grad_norm/lora",
    "lr/projector", "lr/lora", "clipped", "skipped", "nan_events", "nan_event",
    "samples_per_s", "tokens_per_s", "wall_time",
)


@dataclass
class NanEvent:
    step: int
    where: str  # "loss" (non-finite loss) or "grad" (finite loss, non-finite gradient)
    groups: list[str]  # optimizer groups whose gradient was non-finite, in group order
    action: str  # "skipped", "stopped" or "aborted"
    fp16_overflow: bool = False


def nan_event_of(record: Mapping[str, Any]) -> NanEvent | None:
    """The NaN/inf event a step record carries (its ``nan_event``), None for a clean step.

    Records written before the key existed have none either: a reader that must know
    about their events rebuilds them from the ``nan_events`` counter (tuning's shipper
    does). Raises TypeError/ValueError on a ``nan_event`` that is not an event's fields.
    """
    data = record.get("nan_event")
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise TypeError(f"nan_event is not a mapping: {data!r}")
    known = {f.name for f in fields(NanEvent)}
    event = NanEvent(**{k: v for k, v in data.items() if k in known})
    event.groups = list(event.groups)  # a copy: the record's list stays the record's
    return event


@dataclass
class RunSummary:
    status: str  # "completed" | "unstable"
    end_reason: str  # "completed" | "nan_stop" | "nan_abort" | "diverged"
    steps_done: int
    total_steps: int
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None
    nan_events: list[NanEvent] = field(default_factory=list)
    run_dir: str = ""
    wall_s: float = 0.0

    @property
    def first_nan(self) -> NanEvent | None:
        return self.nan_events[0] if self.nan_events else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        first = self.first_nan
        d["first_nan_step"] = first.step if first else None
        d["first_nan_group"] = (first.groups[0] if first.groups else first.where) if first else None
        return d


class MetricsSink(Protocol):
    """What the trainer needs from a metrics destination."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, Any], step: int,
                    checkpoint: Path | None = None) -> None:
        """One optimizer step's record; `checkpoint` is set when one was written at this step."""

    def close(self, summary: RunSummary) -> None: ...


def finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MemorySink:
    """Keeps everything in memory (tests, notebooks)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.records: list[dict[str, Any]] = []
        self.checkpoints: list[tuple[int, Path]] = []
        self.summary: RunSummary | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, Any], step: int,
                    checkpoint: Path | None = None) -> None:
        self.records.append(dict(metrics))
        if checkpoint is not None:
            self.checkpoints.append((step, checkpoint))

    @property
    def nan_events(self) -> list[NanEvent]:
        """The NaN/inf events of the records received, in step order of arrival."""
        return [e for r in self.records if (e := nan_event_of(r)) is not None]

    def close(self, summary: RunSummary) -> None:
        self.summary = summary


class JsonlSink:
    """`metrics.jsonl` (one strict-JSON object per step) and `summary.json` in a run dir."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.summary_path = Path(run_dir) / "summary.json"
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def _truncate_after(self, step: int) -> None:
        # A resumed run re-does the steps after its checkpoint: drop their old records
        # so every step is in the file exactly once.
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a torn last line from a crash
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log_params(self, params: dict[str, Any]) -> None:
        pass  # params live in config.resolved.yaml

    def log_metrics(self, metrics: dict[str, Any], step: int,
                    checkpoint: Path | None = None) -> None:
        clean = {k: finite_or_none(v) for k, v in metrics.items()}
        self._f.write(json.dumps(clean, allow_nan=False) + "\n")
        self._f.flush()

    def close(self, summary: RunSummary) -> None:
        self._f.close()
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary.to_json(), indent=2, default=finite_or_none))
        os.replace(tmp, self.summary_path)


class ConsoleSink:
    """Progress lines every `every` steps (step, loss, grad norm, LRs, NaN events)."""

    def __init__(self, every: int = 10, total: int | None = None, prefix: str = "") -> None:
        self.every, self.total, self.prefix = every, total, prefix

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int,
                    checkpoint: Path | None = None) -> None:
        if step % self.every and step != self.total and "eval_loss" not in metrics:
            return
        of = f"/{self.total}" if self.total else ""
        ev = f" eval {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
        print(f"{self.prefix}step {step}{of} loss {metrics['loss']:.4f}{ev} "
              f"gnorm {metrics['grad_norm']:.3g} (proj {metrics['grad_norm/projector']:.3g}, "
              f"lora {metrics['grad_norm/lora']:.3g}) lr proj {metrics['lr/projector']:.3g} "
              f"lora {metrics['lr/lora']:.3g} nan {metrics['nan_events']} "
              f"{metrics['samples_per_s']:.1f} samples/s", flush=True)

    def close(self, summary: RunSummary) -> None:
        first = summary.first_nan
        nan = (f", first NaN at step {first.step} ({first.where}: {','.join(first.groups)})"
               if first else "")
        loss = f"{summary.final_loss:.4f}" if summary.final_loss is not None else "n/a"
        ev = f", eval loss {summary.eval_loss:.4f}" if summary.eval_loss is not None else ""
        print(f"{self.prefix}done: {summary.status} ({summary.end_reason}) after "
              f"{summary.steps_done}/{summary.total_steps} steps, final loss {loss}{ev}, "
              f"{len(summary.nan_events)} NaN events{nan}, {summary.wall_s:.1f}s", flush=True)


class MultiSink:
    """Fan out to several sinks; stamps each record with its step's ``wall_time``."""

    def __init__(self, *sinks: MetricsSink) -> None:
        self.sinks = sinks

    def log_params(self, params: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log_params(params)

    def log_metrics(self, metrics: dict[str, Any], step: int,
                    checkpoint: Path | None = None) -> None:
        # Every run's sinks sit behind one MultiSink (trainer.loop.open_sinks), so this is the
        # one place each step gets its own time: readers (MLflow's relative-time axis) would
        # otherwise see the time a batch of records was reported. A replayed record keeps its
        # original time.
        metrics.setdefault("wall_time", time.time())
        for s in self.sinks:
            s.log_metrics(metrics, step, checkpoint)

    def close(self, summary: RunSummary) -> None:
        for s in self.sinks:
            s.close(summary)
