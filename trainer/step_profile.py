"""torch.profiler over a few warm steps of a running loop, written as a text report.

For a loop that cannot be stopped to be profiled (a sweep's shared-group actor), this
profiles `steps` consecutive steps once `warm` steps in a row have run without a long one
(a compile restarts the count), then writes where the host's time went and the GPU's:
the tables of `torch.profiler`'s key averages, sorted by self CPU time and, on a GPU, by
self CUDA time, under a line of per-step wall and kernel time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from trainer.fsutil import atomic_write_text

ROWS = 30  # table rows per sort order


class StepProfiler:
    """Profiles `steps` steps after `warm` short ones in a row; writes `path` once."""

    def __init__(self, path: Path, steps: int, warm: int = 20, long_s: float = 5.0) -> None:
        self.path, self.steps, self.warm, self.long_s = Path(path), steps, warm, long_s
        self._short = 0  # short steps in a row so far
        self._done = 0  # steps profiled so far
        self._prof: torch.profiler.profile | None = None
        self._t0 = 0.0
        self.written = False
        # Seconds spent building and writing the report (inside the last profiled step's
        # exit: tens of seconds at reference scale), for loops that time their steps.
        self.report_s = 0.0

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Around one step of the loop."""
        if self.written or self.steps <= 0:
            yield
            return
        if self._prof is None and self._short >= self.warm:
            self._start()
        started = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - started
            if self._prof is not None:
                self._done += 1
                if self._done >= self.steps:
                    self._finish()
            else:
                self._short = self._short + 1 if took < self.long_s else 0

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._prof = profile(activities=acts)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def _finish(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ended = time.perf_counter()
        wall = (ended - self._t0) / self._done
        self._prof.__exit__(None, None, None)
        atomic_write_text(self.path, profile_report(self._prof, self._done, wall))
        self._prof, self.written = None, True
        self.report_s = time.perf_counter() - ended


def profile_report(prof: torch.profiler.profile, steps: int, wall_s: float,
                   rows: int = ROWS) -> str:
    """A finished profile of `steps` steps (`wall_s` each) as text: one line of per-step
    wall and GPU kernel time, then the key averages by self CPU and self CUDA time."""
    events = prof.key_averages()
    # Kernels only: CPU-side ranges (an optimizer step, a compiled region) carry the device
    # time of the kernels under them too, which would count those twice.
    gpu = sum(e.self_device_time_total for e in events
              if e.device_type == torch.autograd.DeviceType.CUDA) / steps / 1e3
    parts = [f"{steps} steps profiled: wall {wall_s * 1e3:.2f} ms/step (profiled), "
             f"GPU kernels {gpu:.2f} ms/step\n",
             events.table(sort_by="self_cpu_time_total", row_limit=rows)]
    if torch.cuda.is_available():
        parts.append(events.table(sort_by="self_cuda_time_total", row_limit=rows))
    return "\n".join(parts) + "\n"
