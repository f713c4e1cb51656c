"""A compact live progress table for the driver's terminal (a Ray Tune callback)."""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback


def _fmt(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


class ProgressCallback(Callback):
    """Prints one line per trial (status, step, loss, grad norm, NaN events) every
    `every_s` seconds and whenever a trial ends."""

    def __init__(self, total_trials: int, every_s: float = 15.0) -> None:
        self.total_trials, self.every_s = total_trials, every_s
        self._last: dict[str, dict[str, Any]] = {}
        self._printed = 0.0

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
        done = sum(str(t.status) in ("TERMINATED", "ERROR") for t in trials)
        lines = [f"[sweep] {done}/{self.total_trials} trials done",
                 f"  {'trial':<14}{'status':<11}{'step':>6}{'loss':>10}{'gnorm':>9}{'nan':>5}"
                 "  lr"]
        for t in trials:
            r = self._last.get(t.trial_id, {})
            lr = t.config.get("learning_rate")
            lines.append(f"  {t.trial_id:<14}{t.status!s:<11}{_fmt(r.get('step')):>6}"
                         f"{_fmt(r.get('loss')):>10}{_fmt(r.get('grad_norm'), '.3g'):>9}"
                         f"{_fmt(r.get('nan_events')):>5}  {_fmt(lr, '.3g')}")
        print("\n".join(lines), flush=True)
