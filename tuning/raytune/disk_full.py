"""Stop a sweep at the first trial that failed because the disk is full.

Without this, every trial fails `max_failures + 1` times on the same full disk and the
driver then dies writing the report. With it, Tune stops as on Ctrl-C (state saved, the
trials' checkpoints intact) and the driver prints one line saying where the disk is full;
the same command resumes once there is space. The callback runs in the driver process, so
what it found is kept at module level: a Tuner restored from disk holds an unpickled copy
of the callback, not the instance the driver created.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

# Text of a trial error (Ray's error.txt) that means the storage, not the trial, failed.
DISK_FULL_RE = re.compile(r"No space left on device|Disk quota exceeded|Errno 28\b|ENOSPC")

_found: list[str] = []


def reset() -> None:
    """Forget an earlier stop (a driver runs the sweep's stages one after another)."""
    _found.clear()


def tripped() -> str | None:
    """'trial ID: what its error said' for the failure that stopped the sweep, or None."""
    return _found[0] if _found else None


def disk_full_text(text: str) -> str | None:
    """The part of an error text that says the disk is full, or None."""
    match = DISK_FULL_RE.search(text)
    return match.group(0) if match else None


class DiskFullStop(Callback):
    """On the first trial failure whose error says the disk is full, ask Tune to stop."""

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial,
                         **info: Any) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial,
                       **info: Any) -> None:
        self._check(trial)

    def _check(self, trial: Trial) -> None:
        if _found:
            return
        try:  # Ray appends each failure's text to the trial's error.txt before this hook
            text = Path(trial.error_file).read_text(errors="replace")[-20_000:]
        except (OSError, TypeError):
            return
        what = disk_full_text(text)
        if what is None:
            return
        _found.append(f"trial {trial.trial_id}: {what}")
        print(f"[sweep] trial {trial.trial_id} failed: {what}; stopping the sweep and saving "
              "its state", file=sys.stderr, flush=True)
        # SIGUSR1: Tune saves its experiment state and stops the trials (as for Ctrl-C).
        os.kill(os.getpid(), signal.SIGUSR1)
