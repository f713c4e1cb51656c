"""A command's last step: exit once its work is written, without the interpreter's teardown.

After a sweep, Python's final garbage collection walks every object that torch, Ray, MLflow
and the report's plots made (hundreds of thousands), only to free memory the OS takes back
at exit anyway: about 2 s of a CI smoke sweep's process on a 2-core host, in C code that
nothing waits on (bench/results/README.md, "teardown"). What a clean exit does that is
worth keeping runs first: other threads finish, the exit handlers run (logging's flush,
Ray's and MLflow's hooks, weakref finalizers such as temporary directories' removal), and
stdout and stderr are flushed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def exit_after_handlers(code: int) -> NoReturn:
    """Exit with `code`: wait for non-daemon threads, run the exit handlers, flush stdio,
    then leave without the interpreter's teardown. Only for a command's ``__main__``, once
    everything it writes is closed (a file object left open would lose its buffer)."""
    try:
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        # The stdlib's own entry point for what `sys.exit` runs before the teardown (it
        # logs a failing handler through sys.unraisablehook and goes on, as exit does).
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
