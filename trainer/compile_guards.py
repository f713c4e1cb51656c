"""Skipping TorchDynamo's guard check on a compiled forward once its calls repeat.

Before every call of a `torch.compile`d function, Dynamo checks the guards of its cached
graph: every parameter's and input's metadata and the module attributes the trace read.
For the Phase 2 forward over a 24-layer LLM with LoRA that is about 2-3 ms of host time
per call (`bench/guard_eval.py`), and a compiled step at the seed's batch size is bound by
the host (README, Performance). A training run calls its forward with the same shapes,
grad mode and train mode step after step, so once a signature has been called
`WARM_CALLS` times with the full check (the first one compiles), later calls with that
signature run under `torch.compiler.set_stance(skip_guard_eval_unsafe=True)`: Dynamo then
runs only the guards that tell its cached graphs apart (tensor metadata, and any guard
that has failed once), not the rest.

Why "unsafe" does not bite here: the skipped guards cover state that a run does not
change between training steps (module attributes, autocast, flags). What does change --
grad mode and train mode for evaluation, input shapes for an eval batch -- is part of the
signature checked here on the host, so such a call gets the full check (and compiles its
own graph when it needs one). `model.skip_compile_guards: false` checks every call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator

import torch

WARM_CALLS = 2  # full checks per signature before skipping (the first call compiles)


class GuardSkip:
    """Decides, per call of one compiled forward, whether its guard check may be skipped."""

    def __init__(self, warm_calls: int = WARM_CALLS) -> None:
        self.warm_calls = warm_calls
        self._calls: dict[tuple, int] = {}
        self.skipped = 0  # calls run with the guards skipped (for tests and benches)

    @contextlib.contextmanager
    def around(self, module: torch.nn.Module, *inputs: torch.Tensor,
               key: Hashable = None) -> Iterator[None]:
        """Context for one call of `module`'s compiled forward on `inputs`; `key`: what else
        tells this call's graph apart (a trial group's make-up: its routed member blocks)."""
        sig = (key, torch.is_grad_enabled(), module.training,
               tuple((t.shape, t.dtype, t.device) for t in inputs))
        seen = self._calls.get(sig, 0)
        self._calls[sig] = seen + 1
        if seen < self.warm_calls:
            yield
            return
        self.skipped += 1
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            yield
