"""Host time of TorchDynamo's guard check on a compiled Phase 2 forward, with and without
`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`.

    python bench/guard_eval.py configs/phase2.yaml [--layers 24] [--calls 200]

A compiled step at the seed's batch size is bound by the host (README, Performance): before
each call of the compiled forward, Dynamo checks its guards (every parameter's and input's
shape, dtype and device, the module attributes the trace read), ~2 ms per call in the run-2
GPU profile of the 24-layer reference LLM. The guards are the same on any device and for
any backend, so this measures them on the CPU: the config's demo LLM with `--layers`
decoder layers (the reference has 24; hidden sizes do not change the guards), the forward
compiled with backend "eager" (no Inductor compile time; Dynamo traces and guards it the
same way), then calls of one fixed batch timed interleaved, guards checked against guards
skipped. Prints ms per call for each and the saving per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.inputs import prepare_inputs  # noqa: E402
from trainer.run import build_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, [f"demo.llm.num_hidden_layers={args.layers}",
                                    "demo.llm.pretrain_steps=0", *args.overrides])
    inputs = prepare_inputs(cfg, log=lambda m: print(m, flush=True), device="cpu")
    run, _, _ = build_run(cfg, inputs, device="cpu", log=lambda *_: None)
    model = run.model
    model.static_loss = True
    b = run.train.batch(run.micro_batch(0, 0), trim=False)
    call_args = (b["features"], b["input_ids"], b["labels"])
    fwd = torch.compile(model.forward, backend="eager", dynamic=False)
    fwd(*call_args)  # trace and guard once
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.calls):
        skip = bool(i % 2)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip):
            t0 = time.perf_counter()
            fwd(*call_args)
            times[skip].append(time.perf_counter() - t0)
    checked, skipped = (statistics.median(times[s]) * 1e3 for s in (False, True))
    print(f"{args.layers} layers, {sum(p.numel() for p in model.parameters())} params in "
          f"{sum(1 for _ in model.parameters())} tensors; median of {args.calls // 2} calls "
          f"each: guards checked {checked:.2f} ms, skipped {skipped:.2f} ms, "
          f"saving {checked - skipped:.2f} ms per call (ratio {skipped / checked:.3f})")


if __name__ == "__main__":
    main()
