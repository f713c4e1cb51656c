"""Host time of one device-guarded AdamW step: torch's `optimizer.step()` vs the trainer's call.

    python bench/adamw_host.py [--tensors 196] [--numel 16] [--steps 2000]

The device guard hands AdamW a `found_inf` flag and lets torch's fused kernel skip bad
steps. `trainer.optim.fused_adamw_step` makes the same kernel calls as torch's fused path
without its per-step Python (per-parameter checks, regrouping, hooks); this bench measures
what that saves per step, the baseline (torch's own step) measured in the same run.

Setup: the two groups of a Phase 2 run (projector 4 tensors, LoRA the rest; 196 in all
is configs/reference.yaml's count: 24 layers x q,k,v,o x A,B + 4), fused AdamW on the
CPU, tensors of `--numel` elements so the kernels' own work stays small next to the host
overhead being measured. On a GPU the kernels run asynchronously and the host part is
what a small-batch step waits for. Both arms alternate in rounds; the median round counts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.optim import _torch_step, fused_adamw_step


def build(tensors: int, numel: int) -> torch.optim.AdamW:
    params = [torch.nn.Parameter(torch.randn(numel)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([{"params": params[:4], "lr": 5e-4, "name": "projector"},
                             {"params": params[4:], "lr": 5e-5, "name": "lora"}],
                            weight_decay=0.01, fused=True)
    _torch_step(opt, torch.zeros(()))  # creates the state
    return opt


def per_step_us(step, opt, found_inf: torch.Tensor, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        step(opt, found_inf)
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=196)
    ap.add_argument("--numel", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2000, help="steps per arm and round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    found_inf = torch.zeros(())
    arms = {"torch optimizer.step()": _torch_step, "trainer fused_adamw_step": fused_adamw_step}
    opts = {name: build(args.tensors, args.numel) for name in arms}
    rounds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, step in arms.items():
            rounds[name].append(per_step_us(step, opts[name], found_inf, args.steps))
    med = {name: statistics.median(v) for name, v in rounds.items()}
    for name, us in med.items():
        print(f"{name:26s} {us:8.1f} us/step (median of {args.rounds} rounds)")
    base, fast = med["torch optimizer.step()"], med["trainer fused_adamw_step"]
    print(f"ratio trainer / torch: {fast / base:.3f} ({base - fast:.0f} us less host time per "
          f"step, {args.tensors} tensors of {args.numel})")


if __name__ == "__main__":
    main()
