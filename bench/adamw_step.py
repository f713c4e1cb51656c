"""Host time of one member's AdamW step: `optimizer.step()` against `ListedAdamW.step()`.

    python bench/adamw_step.py [--device cuda] [--shapes reference|small] [--steps 200]

A trial-group member on the reference model holds a projector (1024 -> 4352 -> 896) and
LoRA r=16 on q, k, v, o of 24 layers: 4 + 192 tensors in two groups. Both arms step a
fused AdamW over the same tensors with the device guard's `found_inf`, as
`trainer.step.optimizer_step` does; the figure is the mean wall time per step of
the host loop. On a GPU the kernels queue behind the host, so without `--sync` that is the
host's time; `--shapes small` keeps the tensor count and shrinks each tensor, so on a CPU
too the figure is mostly per-tensor overhead. Prints each arm and the ratio of the listed
step to `step()` (lower is better), both measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.fused_adamw import ListedAdamW
from trainer.optim import guarded_step


def member_shapes(kind: str) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    hidden, kv, r, align, mid, layers = 896, 128, 16, 1024, 4352, 24
    if kind == "small":
        hidden, kv, r, align, mid = 8, 4, 2, 8, 8
    projector = [(mid, align), (mid,), (hidden, mid), (hidden,)]
    lora = []
    for _ in range(layers):
        for out in (hidden, kv, kv, hidden):  # q, k, v, o: A [r, in], B [out, r]
            lora += [(r, hidden), (out, r)]
    return projector, lora


def arm(name: str, device: str, shapes, steps: int, sync: bool) -> float:
    projector, lora = shapes
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in projector + lora]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW([{"params": params[:4], "lr": 5e-4},
                             {"params": params[4:], "lr": 5e-5}], fused=True)
    opt.step()  # creates the state
    listed = ListedAdamW(opt) if name == "listed" else None
    found_inf = torch.zeros((), device=device)

    def one() -> None:
        if listed is None or not listed.step(found_inf):
            guarded_step(opt, found_inf)

    for _ in range(10):
        one()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
        if sync and device == "cuda":
            torch.cuda.synchronize()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", choices=("reference", "small"), default="reference")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sync", action="store_true", help="synchronise after every step")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    shapes = member_shapes(args.shapes)
    rows = {n: arm(n, args.device, shapes, args.steps, args.sync) for n in ("step", "listed")}
    out = {"device": (torch.cuda.get_device_name() if args.device == "cuda" else "cpu"),
           "shapes": args.shapes, "tensors": sum(len(s) for s in shapes),
           "step_ms": round(rows["step"], 3), "listed_ms": round(rows["listed"], 3),
           "ratio_listed_vs_step": round(rows["listed"] / rows["step"], 3)}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
