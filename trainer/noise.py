"""Third-party console noise, silenced by default (``--verbose`` keeps it).

transformers' INFO/WARNING lines and its progress bars ("Writing model shards", "Loading
weights") say nothing a user must act on, and they bury the run's own lines. The environment
variables reach processes started later (Ray workers, subprocesses) too.
"""

from __future__ import annotations

import os
import sys
import warnings


def quiet_transformers(verbose: bool = False) -> None:
    """transformers at ERROR with no progress bars, unless ``verbose``."""
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by worker processes
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\b")
    if "transformers" not in sys.modules:
        # transformers reads both variables as it is imported, so a process that has not
        # imported it yet is quiet without importing it here: the sweep's driver may never
        # need it, and its import (about a second) would delay the sweep's start.
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
