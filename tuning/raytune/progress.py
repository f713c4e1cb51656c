"""A compact live progress table for the driver's terminal (a Ray Tune callback)."""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from tuning.tracking.tracker import short_key, short_value


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


class ProgressCallback(Callback):
    """Prints one line per trial (status, step, loss, grad norm, NaN events, the swept
    values) every `every_s` seconds and whenever a trial ends, if anything changed."""

    def __init__(self, total_trials: int, every_s: float = 15.0) -> None:
        self.total_trials, self.every_s = total_trials, every_s
        self._last: dict[str, dict[str, Any]] = {}
        self._printed = 0.0
        self._shown = ""  # the last table printed

    def __getstate__(self) -> dict[str, Any]:  # pickled into Ray's experiment state
        return {"total_trials": self.total_trials, "every_s": self.every_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._last[trial.trial_id] = {k: result.get(k) for k in
                                      ("step", "loss", "grad_norm", "nan_events", "end_reason")}

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self._printed >= self.every_s:
            self._print(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(trials)

    def _print(self, trials: list) -> None:
        self._printed = time.monotonic()
        text = format_table(trials, self._last, self.total_trials)
        # Piped output (a log file) gets a table only when something in it changed: trials
        # waiting as PENDING would otherwise repeat the same block every `every_s`.
        if text == self._shown:
            return
        self._shown = text
        print(text, flush=True)


def format_table(trials: list, last: dict[str, dict[str, Any]], total: int) -> str:
    """The progress table: one row per trial, every swept key as a column (short names)."""
    done = sum(str(t.status) in ("TERMINATED", "ERROR") for t in trials)
    keys: list[str] = []
    for t in trials:
        keys += [k for k in t.config if k not in keys]
    heads = [short_key(k) for k in keys]
    rows = []
    for t in trials:
        rows.append([short_value(t.config.get(k)) if k in t.config else "-" for k in keys])
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(heads)]
    swept_head = "".join(f"  {h:>{w}}" for h, w in zip(heads, widths, strict=True))
    lines = [f"[sweep] {done}/{total} trials done",
             f"  {'trial':<14}{'status':<11}{'step':>6}{'loss':>10}{'gnorm':>9}{'nan':>5}"
             + swept_head]
    for t, row in zip(trials, rows, strict=True):
        r = last.get(t.trial_id, {})
        swept = "".join(f"  {v:>{w}}" for v, w in zip(row, widths, strict=True))
        lines.append(f"  {t.trial_id:<14}{t.status!s:<11}{_fmt(r.get('step')):>6}"
                     f"{_fmt(r.get('loss')):>10}{_fmt(r.get('grad_norm'), '.3g'):>9}"
                     f"{_fmt(r.get('nan_events')):>5}" + swept)
    return "\n".join(lines)
