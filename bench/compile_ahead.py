"""A compiled group's cold start with and without `model.compile_ahead`: the time to train
the same steps when the group compiles in its own process first ("inline") against
training eagerly while a helper process compiles, then switching ("ahead").

    python bench/compile_ahead.py configs/reference.yaml --k 8 --steps 300 \\
        --set demo.num_examples=64 --device cuda                        # on a GPU
    OMP_NUM_THREADS=1 python bench/compile_ahead.py configs/phase2.yaml --tiny --k 2 \\
        --steps 200 --set demo.llm.num_hidden_layers=8                  # on a CPU

Each arm runs in a process of its own with empty caches (its own Inductor cache and
compile cache), so both compiles are cold: K members of the config (seeds and LRs
apart) in a group of K slots train `--steps` group steps; then the members are removed.
Reported per arm: the process's wall time, the time to the first trained step, the
group steps run eagerly while the helper compiled, the switch step's time (the warm
compile), the steady step after it, and the wall of the steps alone; then the ratios
ahead / inline. On a CPU the helper's compile shares the cores the eager steps use:
the GPU case, where the eager steps run on an otherwise idle device, is the one it is
for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("inline", "ahead")
TINY = ["demo.num_examples=48", "demo.llm.pretrain_steps=100", "data.eval_fraction=0.25",
        "output.log_every=1000", "phase2.warmup_steps=2", "phase2.batch_size=4"]


def run_arm(args: argparse.Namespace, arm: str, work: Path) -> dict:
    """One arm in a process of its own (this script with --child): its row, and wall."""
    out = work / f"{arm}.json"
    cmd = [sys.executable, __file__, str(args.config), "--child", arm, "--k", str(args.k),
           "--steps", str(args.steps), "--work", str(work), "--json", str(out),
           "--device", args.device, *(["--tiny"] if args.tiny else []),
           *[a for s in args.overrides for a in ("--set", s)]]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{arm}")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"[{arm}] failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                 f"{proc.stderr[-4000:]}")
    row = {"arm": arm, "process_wall_s": round(wall, 1), **json.loads(out.read_text())}
    print(json.dumps(row), flush=True)
    return row


def child(args: argparse.Namespace) -> None:
    """The arm itself: K members, `--steps` group steps, each step timed."""
    sys.path.insert(0, str(ROOT))
    import torch

    from trainer.config import load_config
    from trainer.group import TrialGroup
    from trainer.inputs import prepare_inputs

    t_start = time.perf_counter()
    steps = 10 * args.steps  # the members outlast the timed steps: removed after them

    def cfg(i: int):
        return load_config(args.config, [
            *(TINY if args.tiny else []), f"output.root={args.work / 'runs' / args.child}",
            f"output.assets_dir={args.work / 'assets'}",  # one LLM and data for both arms
            f"output.run_name=m{i}", "output.save_weights=false",
            f"phase2.total_training_steps={steps}", f"phase2.seed={i}",
            f"phase2.learning_rate={1e-4 * (1 + i)}", f"model.compile={args.mode}",
            f"model.compile_ahead={'true' if args.child == 'ahead' else 'false'}",
            *args.overrides])

    cuda = args.device.startswith("cuda")
    inputs = prepare_inputs(cfg(0), log=lambda *_: None, device=args.device)
    group = TrialGroup(inputs, args.device, log=lambda line: print(line, file=sys.stderr),
                       slots=args.k, compile_cache=args.work / f"cache-{args.child}")
    for i in range(args.k):
        group.add_member(f"m{i}", cfg(i))
    t_ready = time.perf_counter()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        group.step()
        if cuda:
            torch.cuda.synchronize()  # a step's time, not its launches'
        times.append(time.perf_counter() - t0)
    steps_wall = sum(times)
    # The step that compiled here: the first one after the eager ones (None: the helper
    # outlasted the timed steps)
    eager = group.ahead_steps
    first_compiled = None if group.compiling_ahead else eager
    for member_id in list(group.members):
        group.remove_member(member_id)
    steady = times[first_compiled + 1:] if first_compiled is not None else []
    row = {
        "k": args.k, "steps": args.steps, "setup_s": round(t_ready - t_start, 1),
        "first_step_s": round(times[0], 2), "eager_steps": eager,
        "compile_step_s": round(times[first_compiled], 2) if first_compiled is not None
        else None,
        "eager_step_ms": round(1e3 * statistics.median(times[:eager]), 1) if eager else None,
        "steady_step_ms": round(1e3 * statistics.median(steady), 1) if steady else None,
        "steps_wall_s": round(steps_wall, 1),
        # from the first step to the end of the first compiled one
        "compiled_after_s": round(sum(times[:first_compiled + 1]), 1)
        if first_compiled is not None else None,
    }
    args.json.write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--k", type=int, default=8, help="members (and slots) of the group")
    ap.add_argument("--steps", type=int, default=200, help="group steps per arm")
    ap.add_argument("--mode", default="", help="model.compile (default: reduce-overhead on "
                    "CUDA, default on a CPU)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="the test suite's tiny demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="KEY=VALUE config override for both arms")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.mode = args.mode or ("reduce-overhead" if args.device.startswith("cuda")
                              else "default")
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = {a: run_arm(args, a, Path(tmp)) for a in args.arms.split(",")}
    summary = {"k": args.k, "steps": args.steps, "mode": args.mode, "device": args.device,
               "rows": list(rows.values())}
    if set(ARMS) <= set(rows):
        inline, ahead = rows["inline"], rows["ahead"]
        summary["ratio_ahead_over_inline"] = {
            key: round(ahead[key] / inline[key], 3) if inline[key] else None
            for key in ("process_wall_s", "steps_wall_s", "first_step_s")}
        print(json.dumps(summary["ratio_ahead_over_inline"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
