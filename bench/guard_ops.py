"""Operators one optimizer step dispatches: the host guard against the device guard.

    python bench/guard_ops.py configs/phase2.yaml [--steps 20]

On a GPU the eager part of a step (everything after the backward: norms, the NaN guard,
clipping, AdamW, the schedule) is bound by the host dispatching operators, each one a
kernel launch or more; in a compiled step it is what runs outside the CUDA graph, and a
trial group pays it once per member. The count is the same on any device, so it is
measured here on the CPU: the same run (the config's demo model, fused AdamW for both, as
on CUDA) steps with each guard, and torch.profiler counts the top-level aten operators
(those the Python side dispatches) inside the optimizer step only: forward and backward
excluded, the device guard's one read-back per `--window` steps included. Prints
operators per step for each guard and the ratio device / host.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.inputs import prepare_inputs  # noqa: E402
from trainer.loop import backward_step  # noqa: E402
from trainer.optim import build_optimizer, build_scheduler  # noqa: E402
from trainer.run import build_run  # noqa: E402
from trainer.step import DeviceGuard, read_back  # noqa: E402


def ops_per_step(cfg, inputs, device_guard: bool, steps: int, window: int) -> float:
    cfg = cfg.model_copy(deep=True)
    cfg.output.sync_every = window if device_guard else 1
    run, state, _ = build_run(cfg, inputs, device="cpu", log=lambda *_: None)
    p2 = cfg.phase2
    parts = run.parts
    parts.optimizer = build_optimizer(parts.groups, p2.resolved_projector_lr,
                                      p2.resolved_lora_lr, p2.weight_decay, p2.adam_betas,
                                      p2.adam_eps, fused=True)
    parts.scheduler = build_scheduler(parts.optimizer, run.plan.warmup_steps,
                                      run.plan.total_steps)
    guard = DeviceGuard.start(p2, state, run.device)
    pending, total = [], 0
    for step in range(1, steps + 1):
        tally = backward_step(run, step)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if device_guard:
                pending.append(tally.step(run, guard, step))
                if len(pending) == window:
                    read_back(pending)
                    pending.clear()
            else:
                tally.step(run, None, step)
        total += sum(1 for e in prof.events() if _top_level_aten(e))
    return total / steps


def _top_level_aten(event) -> bool:
    """An aten operator the Python side dispatched itself (not one called inside another
    operator: the CPU runs a for-each operator as a loop of per-tensor ones, CUDA as one
    multi-tensor kernel)."""
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    return event.name.startswith("aten::") and parent is None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--window", type=int, default=10, help="device guard's sync_every")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, ["output.run_name=null", "output.save_weights=false",
                                    "output.root=runs/bench-guard-ops", *args.overrides])
    inputs = prepare_inputs(cfg, log=lambda *_: None)
    host = ops_per_step(cfg, inputs, False, args.steps, args.window)
    device = ops_per_step(cfg, inputs, True, args.steps, args.window)
    clip = cfg.phase2.clip
    print(f"top-level aten operators per optimizer step (clip {clip}, divergence_factor "
          f"{cfg.phase2.divergence_factor}): host guard {host:.1f}, device guard "
          f"{device:.1f}; ratio device / host {device / host:.2f}")


if __name__ == "__main__":
    main()
