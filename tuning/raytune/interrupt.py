"""Ctrl-C and SIGTERM in the sweep driver: a graceful Tune stop that leaves a trace, and a
Ray shutdown deaf to further signals. Imports no Ray (it is only looked up once loaded), so
the CLI installs it before Ray, and even for runs that never start Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any


class Interrupt:
    """SIGINT/SIGTERM -> a graceful Tune stop that we can see afterwards.

    Tune's own SIGINT handler (turned off via TUNE_DISABLE_SIGINT_HANDLER) leaves no trace
    of the interrupt, and ray.init() replaces any SIGTERM handler with a sys.exit. Ours
    records the signal and asks Tune to stop through SIGUSR1, which Tune always handles by
    saving its state and stopping the trials; a second signal stops at once.
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[sweep] {signal.Signals(signum).name}: stopping trials and saving state "
              "(send again to stop at once)", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)

    def shutting_down(self) -> None:
        """From here on a signal only says to wait: a KeyboardInterrupt raised inside
        ray.shutdown() leaves a traceback and Ray's agents running."""
        def _wait(signum: int, frame: Any) -> None:
            print("[sweep] still shutting Ray down; a moment", file=sys.stderr, flush=True)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _wait)


INTERRUPT = Interrupt()


def shutdown_ray() -> None:
    """Stop this driver's Ray now, deaf to further Ctrl-C: interrupted, ray.shutdown() (or
    Ray's own atexit hook) leaves a traceback and its agents running for a minute."""
    INTERRUPT.shutting_down()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            ray.shutdown()

