"""A compiled trial group's cold start in each `model.compile_scope` (and `model.compile`):
the whole shared forward compiled ("model") against each decoder block compiled
("layers"), or against the whole forward in CUDA graphs without Inductor
("model:cudagraphs").

    python bench/compile_scope.py configs/reference.yaml --k 8        # on a GPU
    python bench/compile_scope.py configs/reference.yaml --k 8 --arms model,model:cudagraphs
    OMP_NUM_THREADS=1 python bench/compile_scope.py configs/phase2.yaml --tiny --k 2 \
        --mode default --set demo.llm.num_hidden_layers=8              # on a CPU

An arm is SCOPE or SCOPE:COMPILE (`--mode` where it names none). Each arm runs in a
process of its own (`bench/gpu_group.py`: K members of the config
with synthetic text of `--text-len` tokens, every member's batch `--batch` rows) with an
empty Inductor (and Triton) cache of its own, so both compiles are cold. Reported per scope:
the process's wall time, the group's first step (its compile, CUDA graph recordings and the
step itself) and its steady step time; with `--warm`, a second process of the same scope on
the caches the first left (a warm compile, as a sweep's second group or second sweep gets);
then the ratios layers / model. `--tiny` runs the
test suite's seconds-long demo (a 2-layer LLM: `--set demo.llm.num_hidden_layers=N` for
more) instead of the config's data and LLM. On a CPU shared with other work, one OpenMP
thread keeps the steady step from swinging with the others' load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCOPES = ("model", "layers")
TINY = ["demo.num_examples=48", "demo.llm.pretrain_steps=100", "data.eval_fraction=0.25",
        "output.log_every=1000", "phase2.warmup_steps=2", "phase2.batch_size=4"]


def run_scope(args: argparse.Namespace, arm: str, work: Path, label: str = "cold") -> dict:
    """One arm's group in a process of its own: its gpu_group.py row, and wall. The arm's
    caches are its own: empty for its first (cold) process, the first's for the next."""
    scope, _, mode = arm.partition(":")
    name = arm.replace(":", "-")
    out = work / f"{name}-{label}.json"
    sets = [*(TINY if args.tiny else []), f"model.compile={mode or args.mode}",
            f"model.compile_scope={scope}", *args.overrides]
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_group.py"), str(args.config),
           "--k", str(args.k), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--text-len", str(args.text_len), "--sync", "1",
           "--json", str(out), *[a for s in sets for a in ("--set", s)]]
    if args.device:
        cmd += ["--device", args.device]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{name}"),
           "TRITON_CACHE_DIR": str(work / f"triton-{name}")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"[{arm} {label}] gpu_group.py failed ({proc.returncode}):\n"
                 f"{proc.stderr[-4000:]}")
    for line in proc.stdout.splitlines():  # the shared LLM's load, the first step
        if line.startswith(("[group]", "[k=")):
            print(f"[{arm} {label}] {line}", flush=True)
    row = json.loads(out.read_text())["rows"][0]
    result = {"arm": arm, "scope": scope, "compile": mode or args.mode, "cache": label,
              "process_wall_s": round(wall, 1),
              "first_step_s": row["first_step_s"], "group_step_ms": row["group_step_ms"],
              "mfu_pct": row["mfu_pct"], "peak_mem_gib": row["peak_mem_gib"]}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--k", type=int, default=8, help="members (slots) of the group")
    ap.add_argument("--mode", default="reduce-overhead",
                    help="model.compile of an arm that names none (CPU: default)")
    ap.add_argument("--arms", "--scopes", default=",".join(SCOPES),
                    help="SCOPE or SCOPE:COMPILE, comma-separated; ratios are to the first")
    ap.add_argument("--steps", type=int, default=10, help="timed steady steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps before them, the first too")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--device", default="", help="gpu_group.py's default: cuda if present")
    ap.add_argument("--tiny", action="store_true", help="the test suite's tiny demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="KEY=VALUE config override for both scopes")
    ap.add_argument("--warm", action="store_true",
                    help="then each scope again, warm from its first process's caches")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    arms = args.arms.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {a: run_scope(args, a, Path(tmp)) for a in arms}
        warm = {a: run_scope(args, a, Path(tmp), "warm") for a in arms} if args.warm else {}
    summary = {"k": args.k, "mode": args.mode, "rows": [*rows.values(), *warm.values()]}
    for label, done in (("", rows), ("warm_", warm)):
        if len(done) < 2:
            continue
        base = done[arms[0]]
        for arm in arms[1:]:
            ratio = {key: round(done[arm][key] / base[key], 3) if base[key] else None
                     for key in ("process_wall_s", "first_step_s", "group_step_ms")}
            key = f"{label}ratio_{arm}_over_{arms[0]}".replace(":", "-")
            summary[key] = ratio
            print(json.dumps({key: ratio}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
