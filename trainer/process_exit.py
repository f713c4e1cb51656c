"""How this project's command-line entry points leave the interpreter."""

from __future__ import annotations

import gc
import sys
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """Exit with `code` as `sys.exit` does (atexit handlers run, output is flushed, Ray's
    own shutdown hook runs), without the garbage collector's passes over every object the
    run left behind.

    A process that imported torch, transformers, Ray and MLflow holds millions of objects,
    and the interpreter's teardown collects them all again: seconds of a sweep's wall after
    its last line was printed (`bench/cli_exit.py` measures both ways). Frozen objects are
    skipped by those passes; only finalizers of objects in reference cycles go unrun, and
    nothing here relies on them (every file this project writes is written, flushed and
    closed or renamed into place before its function returns)."""
    gc.freeze()
    sys.exit(code)
