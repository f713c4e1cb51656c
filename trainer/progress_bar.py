"""Progress of the long preparation steps (demo LLM pretraining, feature-cache encoding).

One library for every bar: tqdm, with ``disable=None`` so the bar (with its rate and time
left) is drawn only when stderr is a terminal; piped or in a log file, the step prints a
plain start line and an end line with its duration instead of carriage-return noise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int, desc: str, unit: str = "it") -> Iterator[T]:
    """Yield ``items`` under a tqdm bar on a terminal, or between two plain lines otherwise."""
    bar = tqdm(items, total=total, desc=desc, unit=unit, disable=None, file=sys.stderr,
               leave=True)
    if not bar.disable:
        yield from bar
        return
    start = time.monotonic()
    print(f"{desc}: {total} {unit} ...", file=sys.stderr, flush=True)
    yield from items
    print(f"{desc}: done in {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)
