"""Shared-weight trial groups on one GPU: K trials stepped together over one frozen LLM.

    python bench/gpu_group.py configs/reference.yaml --k 1,8,16 --batch 2 --text-len 128

For each K, one `trainer.group.TrialGroup` gets K members (the config with K different
base learning rates and seeds; every member's own batch is B examples of P prefix
tokens + `--text-len` synthetic text tokens, all of them targets, as in
bench/gpu_trainer.py) and runs `--warmup` + `--steps` group steps, synchronised with the
GPU before and after the timed steps only. K=1 is one trial alone on the same code path,
the baseline measured in the same run. Reported per K: group step time (mean), aggregate
tokens/s and trial-steps/s, MFU (same formula as bench/gpu_trainer.py: tokens/s x (4 x frozen
LLM params + 6 x one member's trainable params) / peak), peak GPU memory, and the
aggregate ratio to the first row. `--sync 1,10` times the same group reading its members
back after every group step and once per 10 (output.sync_every). The group runs eager
unless `--set model.compile=MODE` (then its shared forward is compiled once per group
size, outside the timed steps). LoRA dropout is 0 (members then train exactly as alone)
unless `--set model.lora.dropout=P` (a sweep's trials have the config's, 0.05 by default).

`--running 4,2,1` also times, for each K, group steps of only the first n members (the
others wait, as in ASHA's tail or a member waiting for its client), and `--arms
occupied,all` runs every K twice in the one process: a compiled group's step running only
the slots its members need (`model.run_empty_slots: false`), then every slot, empty ones
too (`true`, the default and the baseline); each arm compiles its own graph. What a
step of n members costs against one of K is what a sweep's tail spends:

    python bench/gpu_group.py configs/reference.yaml --k 8 --running 8,4,2,1 \
        --arms occupied,all --set model.compile=reduce-overhead

Each arm also prints how many of its compiled graphs Inductor ran without CUDA graphs
(`TORCH_LOGS=cudagraphs` says why), and `--profile-running n` profiles a window of its
steps of n members (a torch.profiler table: where the host's and the GPU's time goes).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_trainer import bench_batch, profile_steps  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.data import Split, Tokens  # noqa: E402
from trainer.group import TrialGroup  # noqa: E402
from trainer.inputs import prepare_inputs  # noqa: E402
from trainer.optim import param_groups  # noqa: E402
from trainer.plan import Plan  # noqa: E402


def _sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def run_group(cfg, inputs, k: int, tokens: Tokens, args, work: Path) -> dict:
    group = TrialGroup(inputs, device=args.device, log=lambda m: print(m, flush=True))
    skips0 = counters["inductor"]["cudagraph_skips"]
    for i in range(k):
        member = cfg.model_copy(deep=True)
        member.phase2.learning_rate = 1e-4 * (1.3 ** i)
        member.phase2.seed = i
        member.output.root = work / f"k{k}"
        member.output.run_name = f"m{i}"
        group.add_member(f"m{i}", member)
    for m in group.members.values():  # synthetic text of a fixed length, cached features
        feats = m.run.train.features
        n = min(len(feats), len(tokens.input_ids))
        m.run.train = Split([str(j) for j in range(n)],
                            Tokens(tokens.input_ids[:n], tokens.labels[:n],
                                   tokens.attention_mask[:n]), features=feats[:n])
        m.run.plan = Plan(args.batch, 1, n // args.batch, 10**9, 0)
    t0 = _sync()
    group.step()  # a compiled group compiles (and captures) its forward here
    first_s = _sync() - t0
    print(f"[k={k}] first group step {first_s:.1f} s", flush=True)
    for _ in range(args.warmup - 1):
        group.step()
    times = {}
    for sync in args.sync:  # the same group (and graph) under each read-back window
        for m in group.members.values():
            m.run.sync_every = sync if m.guard is not None else 1
        while any(m.pending for m in group.members.values()):
            group.step()  # end the window open under the previous setting
        steps = max(1, args.steps // sync) * sync  # whole windows, read-back included
        t0 = _sync()  # mean over the timed steps, synchronised at both ends only
        for _ in range(steps):
            group.step()
        times[sync] = (_sync() - t0) / steps
    ids = list(group.members)
    for n in args.running:  # steps of the first n members, the others waiting
        only = ids[:n]
        for _ in range(args.warmup):  # a new count: its CUDA graph is recorded here
            group.step(only=only)
        while any(m.pending for m in group.members.values()):
            group.step(only=only)
        sync = next(iter(group.members.values())).run.sync_every
        steps = max(1, args.steps // sync) * sync
        t0 = _sync()
        for _ in range(steps):
            group.step(only=only)
        times[("running", n)] = (_sync() - t0) / steps
        if n in args.profile_running:  # where a step of n members' time goes
            profile_steps(lambda _i, o=only: group.step(only=o), 0, max(3, sync))
    if args.profile and k == args.profile:
        profile_steps(lambda _i: group.step(), 0, max(3, args.sync[-1]))  # a whole window
    first = next(iter(group.members.values()))
    _, counts = param_groups(first.run.model)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    # Inductor's count of graphs it ran without CUDA graphs (TORCH_LOGS=cudagraphs says why;
    # on the CPU every reduce-overhead graph counts).
    skips = counters["inductor"]["cudagraph_skips"] - skips0
    print(f"[k={k}] graphs run without CUDA graphs: {skips}", flush=True)
    return {"times": times, "trainable": counts.trainable, "frozen": counts.frozen,
            "peak_mem_gib": round(peak, 2), "first_step_s": round(first_s, 1),
            "cudagraph_skips": skips}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--k", default="1,8,16", help="group sizes to measure, the first the baseline")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sync", default="10", type=lambda v: [int(x) for x in v.split(",")],
                    help="read-back windows (output.sync_every) to time the same group under")
    ap.add_argument("--running", default="", type=lambda v: [int(x) for x in v.split(",") if x],
                    help="also time steps of only the first n members, for each n")
    ap.add_argument("--arms", default="all",
                    help="all (every slot runs: model.run_empty_slots, the default), "
                         "occupied (a step runs the slots its members need), or both, "
                         "comma-separated")
    ap.add_argument("--profile", type=int, default=0,
                    help="also profile a read-back window of the group of this size")
    ap.add_argument("--profile-running", default="",
                    type=lambda v: [int(x) for x in v.split(",") if x],
                    help="also profile a window of steps of these many members (--running)")
    args = ap.parse_args()

    cfg = load_config(args.config, ["output.run_name=null", "output.save_weights=false",
                                    "output.checkpoint_every=0", "output.eval_every=0",
                                    "model.lora.dropout=0.0", *args.overrides])
    inputs = prepare_inputs(cfg, log=lambda m: print(m, flush=True), device=args.device)
    n = max(args.batch * (args.warmup + args.steps), args.batch)
    tokens, per_member, device = bench_batch(inputs, n, args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm, k in [(a, int(x)) for a in args.arms.split(",") for x in args.k.split(",")]:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            arm_cfg = cfg.model_copy(deep=True)
            arm_cfg.model.run_empty_slots = arm == "all"
            r = run_group(arm_cfg, inputs, k, tokens, args, Path(tmp) / arm)
            flops = 4 * r["frozen"] + 6 * r["trainable"]
            for what, step in r["times"].items():
                # (running, n): n members stepped, read back every sync_every steps
                sync, n = (what, k) if isinstance(what, int) else (None, what[1])
                tps = n * per_member / step
                row = {"arm": arm, "k": k, "running": n, "sync_every": sync,
                       "group_step_ms": round(step * 1e3, 2),
                       "aggregate_tokens_per_s": round(tps),
                       "trial_steps_per_s": round(n / step, 2),
                       "mfu_pct": round(100 * tps * flops / (args.peak_tflops * 1e12), 2),
                       "peak_mem_gib": r["peak_mem_gib"], "first_step_s": r["first_step_s"],
                       "cudagraph_skips": r["cudagraph_skips"]}
                rows.append(row)
                row["ratio_vs_first"] = round(
                    row["trial_steps_per_s"] / rows[0]["trial_steps_per_s"], 2)
                print(json.dumps(row), flush=True)
    for row in rows:  # the same step, every slot run: the baseline of this process
        base = [b for b in rows if b["arm"] == "all" and b["k"] == row["k"]
                and b["running"] == row["running"] and b["sync_every"] == row["sync_every"]]
        if row["arm"] != "all" and base:
            row["step_ratio_vs_all"] = round(row["group_step_ms"] / base[0]["group_step_ms"], 3)
            print(f"k={row['k']} running {row['running']}: {row['group_step_ms']} ms against "
                  f"{base[0]['group_step_ms']} ms with every slot run = "
                  f"{row['step_ratio_vs_all']}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": device, "batch": args.batch,
                                         "text_len": args.text_len, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
