"""Trials per GPU: the same reference trials through `tuning.sweep`, one at a time, K at
a time on one GPU (fractional GPU resources), and as one shared-weight group.

    python bench/gpu_sweep.py configs/reference.yaml --trials 8 --steps 40 --k 1,4,g8
    python bench/gpu_sweep.py configs/reference.yaml --trials 8 --steps 200 --k g8 \
        --set model.compile=reduce-overhead      # the group's shared forward compiled
    python bench/gpu_sweep.py configs/reference.yaml --trials 8 --steps 100 --k 1,8,g8c
    python bench/gpu_sweep.py configs/reference.yaml --trials 8 --k g8c:400,1:30
    # issue 21's sweeps, end to end: (a) the NaN-cliff grid, (b) 16 trials under ASHA
    python bench/gpu_sweep.py configs/reference.yaml --k g8c:400 --space '{
        "learning_rate": {"grid": [1e-4, 1e-3, 1e-2, 1e-1]},
        "gradient_clip_val": {"grid": [null, 1.0]}}'
    python bench/gpu_sweep.py configs/reference.yaml --k g8c:1000 --num-samples 16 \
        --search random --asha 100,3 --space '{"learning_rate": {"loguniform": [1e-5, 1e-3]}}'

Each arm runs `python -m tuning.sweep` end to end on a generated search.yaml (grid of
`--trials` base learning rates, FIFO). An arm `K` runs K trial processes side by side
(`gpus_per_trial = 1/K`, `max_concurrent = K`); an arm `gK` runs one shared-weight group
(`resources.shared_group: true`: one process, one copy of the frozen model, up to K trials
stepped together, the whole GPU); a trailing `c` (`g8c`) compiles that arm's forward
(`model.compile=reduce-overhead`: one graph for the group, or one per trial process),
so that eager arms and a compiled one compare in one run. An arm `NgK` (`8g8c`) runs N such
groups side by side, one per GPU (`resources.groups: N`, `trials_per_group: K`: N x K trials
at a time; docs/shared-group.md), e.g. on an 8-GPU node:

    python bench/gpu_sweep.py configs/reference.yaml --trials 64 --k 8g8c:400,g8c:400
Shared inputs (demo assets at reference scale, the feature cache) are built before the
first arm and reused. Reported per arm: wall time, aggregate trial-steps/s (all
optimizer steps of all trials / wall), aggregate tokens/s and MFU from the trials' own
metrics (tokens/s summed over concurrently running trials, averaged over their steps
after the first quarter: compilation and warm-up excluded), the steady aggregate MFU
(bench/gpu_trainer.py's formula: tokens/s x (4 x frozen + 6 x trainable params of one
trial) / `--peak-tflops`), the ratios of aggregate trial-steps/s and of steady tokens/s
to the one-at-a-time arm (`1`, else the first), and for a shared group its actor's
`group_stats.json` (time stepping against waiting, and why: tuning.raytune.group_stats.GroupStats).

End to end, per arm: `tokens` (every recorded trial step's rows x the split's mean tokens
per row, prefix included), `compile_s` and `train_s` (a shared group: its actor's steps
over 5 s, and the rest of its stepping; trial processes: per trial, the steps' time over
the steady median step (a step's time from its record: tokens / tokens_per_s), summed
and divided by K, the processes running at once), `compile_fraction` of the wall time,
and `mfu_pct_e2e` = tokens x FLOPs per token / wall / peak (Ray start, compiles, make-up
changes, checkpoints, MLflow and the report all inside the wall), next to
`mfu_pct_steady`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Keys a config refuses without model.compile: only the compiled arms take them.
COMPILED_ONLY = ("model.compile_ahead", "model.compile_program")
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.inputs import prepare_inputs  # noqa: E402
from trainer.yaml_io import dump_yaml, parse_scalar  # noqa: E402


def run_arm(config: Path, work: Path, arm: str, trials: int, steps: int, batch: int,
            overrides: dict, keep: Path | None = None, report_every: int = 10,
            profile_group: str = "", lr_growth: float = 1.3, tokens_per_row: float = 0.0,
            space: dict | None = None, num_samples: int = 1, search_alg: str = "grid",
            asha: tuple[int, float] | None = None, label: str = "",
            storage: Path | None = None) -> dict:
    arm, _, arm_steps = arm.partition(":")
    label = label or arm  # file names under `keep`: a repeated arm (cold, warm) gets its own
    steps = int(arm_steps or steps)
    groups_s, group, rest = arm.partition("g")  # "8g8c": 8 groups of 8; "g8": one group
    compiled = arm.endswith("c")
    groups = int(groups_s or 1) if group else 1
    per_group = int(rest.rstrip("c")) if group else int(arm.rstrip("c"))
    k = groups * per_group  # trials at a time
    storage = (storage or work / "sweeps").resolve()
    if compiled:  # reduce-overhead unless --set model.compile names another way to compile
        compile_as = overrides.get("model.compile", "off")
        overrides = {**overrides, "model.compile": "reduce-overhead" if compile_as in (
            "off", False, None) else compile_as}
    elif "model.compile" not in overrides:
        overrides = {k: v for k, v in overrides.items() if k not in COMPILED_ONLY}
    # A group holds a whole GPU, or its share when there are more groups than GPUs (2g4c
    # on one card: two groups of 4 side by side on it, 0.5 GPU each).
    gpus = ((min(1.0, round(_gpu_count() / groups, 4)) if group else round(1.0 / k, 4))
            if _has_cuda() else 0)
    search = {
        "sweep": {"name": f"arm-{arm}", "storage_path": str(storage)},
        "base": {"config": str(config.resolve()), "overrides": {
            **overrides, "phase2.total_training_steps": steps, "phase2.warmup_steps": 5,
            "phase2.batch_size": batch, "output.eval_every": 0, "data.eval_fraction": 0.0}},
        "space": space or {"learning_rate": {"grid": [1e-4 * lr_growth ** i
                                                      for i in range(trials)]}},
        "num_samples": num_samples, "max_concurrent_trials": k,
        "search": {"algorithm": search_alg},
        "scheduler": ({"type": "asha", "grace_period": asha[0], "reduction_factor": asha[1],
                       "max_t": steps} if asha else {"type": "fifo"}),
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": gpus, "shared_group": bool(group),
                      **({"groups": groups, "trials_per_group": per_group} if group else {})},
        "trials": {"report_every": report_every, "checkpoint_every": 0},
    }
    path = work / f"search-{arm}.yaml"
    path.write_text(dump_yaml(search))
    t0 = time.perf_counter()
    log_path = (keep or work) / f"{label}-sweep.log"
    with log_path.open("w") as log:  # the sweep's output (its trials' and actor's, via Ray)
        subprocess.run([sys.executable, "-m", "tuning.sweep", str(path), "--restart"],
                       cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "PHASE2_GROUP_PROFILE": profile_group})
    wall = time.perf_counter() - t0
    tps, done, own_s, steady_s = [], 0, [], []
    step_tokens = batch * tokens_per_row
    for metrics in (storage / f"arm-{arm}" / "trials").glob("*/metrics.jsonl"):
        recs = [json.loads(x) for x in metrics.read_text().splitlines()]
        if keep is not None:  # every trial's records in one file, for a closer look
            with (keep / f"{label}-metrics.jsonl").open("a") as f:
                f.writelines(json.dumps({"trial": metrics.parent.name, **r}) + "\n"
                             for r in recs)
        done += len(recs)
        tail = recs[len(recs) // 4:]  # skip warm-up steps (allocator, kernels)
        tps.append(sum(r["tokens_per_s"] for r in tail) / max(1, len(tail)))
        # Each step's time from its record (a window's mean over its steps): the trial's
        # time, and what it would have been at its steady (median) step.
        dts = [step_tokens / r["tokens_per_s"] for r in recs if r.get("tokens_per_s")]
        if dts:
            own_s.append(sum(dts))
            steady_s.append(len(dts) * statistics.median(dts))
    row_stats, sweep_dir = {}, storage / f"arm-{arm}"
    # Trial processes run K at a time: their summed times over K, spread over the wall.
    compile_s = (sum(own_s) - sum(steady_s)) / k
    train_s = sum(steady_s) / k
    if (sweep_dir / "group_stats.json").exists():  # a shared group: steps against waits
        stats = json.loads((sweep_dir / "group_stats.json").read_text())
        row_stats = {"group_stats": stats}
        # The actor counts steps over 5 s as compiles (tuning.raytune.group_stats.GroupStats);
        # groups side by side ({"groups": [...]}) overlap: the longest one's.
        each = stats.get("groups", [stats])
        compile_s = max(g["long_step_s"] for g in each)
        row_stats["first_step_s"] = max(g.get("first_step_s", 0.0) for g in each)
        train_s = max(g["step_s"] - g["long_step_s"] for g in each)
        row_stats["wall_parts"] = wall_parts(wall, log_path.read_text(), each[0], k)
    if (sweep_dir / "group_profile.txt").exists():
        profile = (sweep_dir / "group_profile.txt").read_text()
        print(profile, flush=True)
        if keep is not None:
            (keep / f"{label}-group_profile.txt").write_text(profile)
    return {"arm": arm, "label": label, "k": k, "groups": groups, "shared_group": bool(group),
            "steps": steps, **row_stats,
            "compile": overrides.get("model.compile", "off"),
            "compile_scope": overrides.get("model.compile_scope", "model"),
            "wall_s": round(wall, 1), "trial_steps": done,
            "trial_steps_per_s": round(done / wall, 2),
            "tokens": round(done * step_tokens), "compile_s": round(compile_s, 1),
            "train_s": round(train_s, 1), "compile_fraction": round(compile_s / wall, 3),
            "tokens_per_s_per_trial": round(sum(tps) / max(1, len(tps))),
            "aggregate_tokens_per_s_steady": round(k * sum(tps) / max(1, len(tps)))}


# The sweep's closing line: "sweep finished in 114s (preparation and Ray start 6s, ...)".
FINISHED = re.compile(r"^sweep finished in (\d+)s \((.*)\):", re.MULTILINE)


def wall_parts(wall: float, log: str, stats: dict, k: int) -> dict:
    """Where a shared group's sweep spent its wall, in seconds that add up to it: outside
    the sweep's own clock (the process's imports, validation and exit, Ray's shutdown), the
    clock's parts (`tuning.sweep.format_clock`, whole seconds) with its trials split by
    the group's stats (from the group's inputs to its first member, its first step (the
    compile), its other steps, the joins, leaves and waits that held its steps, its time
    between steps, and the rest: Tune's start and end around the group); and `slot_fill`,
    the share of slot-steps a member filled, which bounds the end-to-end MFU at fill x
    steady MFU however short the rest."""
    found = FINISHED.search(log)
    if found is None:
        return {}
    parts = {"outside the sweep's clock": wall - int(found.group(1))}
    for part in found.group(2).split(", "):
        name, _, secs = part.rpartition(" ")
        parts[name] = float(secs.rstrip("s"))
    trials = parts.pop("trials", 0.0)
    # The group's own wall starts as its first member is in (that join is before it).
    joins = stats["join_s"] - stats["first_join_s"] if "join_s" in stats else 0.0  # since run 30
    held = {"joins after the first": joins,
            "leaves": stats.get("leave_s", 0.0), "waits": sum(stats["wait_s"].values())}
    # Since session 27 the actor starts before the preparation ends; its figures count
    # from the inputs' arrival, where the clock's "trials" begin.
    group = {"group's inputs to its first member": stats["to_first_member_s"],
             "first group step (compile)": stats.get("first_step_s", 0.0),
             "other group steps": stats["step_s"] - stats.get("first_step_s", 0.0), **held,
             "group, between steps": stats["wall_s"] - stats["step_s"] - sum(held.values())}
    parts.update(group)
    parts["Tune around the group (and clock rounding)"] = trials - sum(group.values())
    out = {name: round(v, 1) for name, v in parts.items()}
    out["slot_fill"] = round(stats["members_per_step"] / k, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--k", default="1,4,g8",
                    help="arms: K = K processes with 1/K GPU each; gK = one shared group of K; "
                         "NgK = N groups of K, one per GPU; "
                         "a trailing c compiles the arm (reduce-overhead); ARM:STEPS gives "
                         "that arm its own steps per trial (a compiled group needs many "
                         "steps for its steady state to outweigh its compile)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--report-every", type=int, default=10,
                    help="trials.report_every: optimizer steps per tune.report")
    ap.add_argument("--keep-metrics", type=Path, default=None,
                    help="keep every trial's records (DIR/ARM-metrics.jsonl) and the sweep's "
                         "output (DIR/ARM-sweep.log) here")
    ap.add_argument("--profile-group", default="", metavar="N[:WARM]",
                    help="a shared group's actor profiles N group steps after WARM (default "
                         "20) without a compile (PHASE2_GROUP_PROFILE); printed, and kept")
    ap.add_argument("--lr-growth", type=float, default=1.3,
                    help="the grid's base LRs: 1e-4 x GROWTH^i for trial i (a smaller growth "
                         "keeps many trials in the stable range)")
    ap.add_argument("--space", type=json.loads, default=None,
                    help="the search space as JSON (search.yaml's space:), instead of the LR "
                         "grid of --trials; null is YAML's null")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--search", default="grid", choices=["grid", "random", "optuna"])
    ap.add_argument("--asha", default=None, metavar="GRACE,REDUCTION",
                    help="ASHA instead of FIFO: grace period (steps) and reduction factor; "
                         "max_t is the arm's steps")
    ap.add_argument("--storage", type=Path, default=None,
                    help="the sweeps' storage_path, kept (default: a temporary directory); "
                         "another run of this script with the same DIR starts warm from "
                         "the compile cache and traced program its sweeps left there")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the card's dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="KEY=VALUE base-config override for every arm, e.g. "
                         "model.compile=reduce-overhead")
    args = ap.parse_args()
    asha = None
    if args.asha:
        grace, _, reduction = args.asha.partition(",")
        asha = (int(grace), float(reduction or 3))
    # Reuse the assets of bench/gpu_trainer.py (the 2 GB reference LLM is built once).
    overrides = {"demo.num_examples": 128, "output.root": None,
                 "output.assets_dir": str(ROOT / "runs" / "_assets")}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = parse_scalar(value)
    if args.keep_metrics is not None:
        args.keep_metrics.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        overrides["output.root"] = str(work / "runs")
        # The inputs and FLOPs need no compile (and a COMPILED_ONLY key alone is refused).
        cfg = load_config(args.config, [f"{k}={v}" for k, v in overrides.items()
                                        if k not in COMPILED_ONLY] +
                          ["data.eval_fraction=0.0"])
        inputs = prepare_inputs(cfg, log=lambda m: print(m, flush=True),
                                device="cuda" if _has_cuda() else "cpu")
        flops, per_row = flops_per_token(cfg, inputs)
        rows = []
        arms = [arm.strip() for arm in args.k.split(",")]
        for i, arm in enumerate(arms):
            # The second run of an arm is the same sweep again (warm from the first's
            # compile cache): its files are labelled ARM-2, ARM-3, ...
            n = arms[:i + 1].count(arm)
            label = arm.partition(":")[0] + (f"-{n}" if n > 1 else "")
            rows.append(run_arm(args.config, work, arm, args.trials, args.steps,
                                args.batch, overrides, args.keep_metrics, args.report_every,
                                args.profile_group, args.lr_growth, per_row, args.space,
                                args.num_samples, args.search, asha, label, args.storage))
            _finish(rows, flops, args)  # each arm as it ends: a later one may time out


def _finish(rows: list[dict], flops: int, args) -> None:
    """Ratios to the one-at-a-time arm (else the first) and steady MFU; print the newest
    row, rewrite the JSON. Arms of different steps per trial: `ratio` includes each arm's
    start-up and compile over its own steps, `ratio_steady` compares steady tokens/s."""
    base = next((r for r in rows if r["arm"] == "1"), rows[0])
    for r in rows:
        for key in [k for k in r if k.startswith("ratio_")]:  # to an earlier base
            del r[key]
        r["ratio_vs_" + base["arm"]] = round(r["trial_steps_per_s"]
                                              / base["trial_steps_per_s"], 2)
        r["ratio_steady_vs_" + base["arm"]] = round(
            r["aggregate_tokens_per_s_steady"] / base["aggregate_tokens_per_s_steady"], 2)
        r["mfu_pct_steady"] = round(100 * r["aggregate_tokens_per_s_steady"] * flops
                                    / (args.peak_tflops * 1e12), 2)
        r["mfu_pct_e2e"] = round(100 * r["tokens"] * flops / r["wall_s"]
                                 / (args.peak_tflops * 1e12), 2)
        if r.get("wall_parts"):
            r["mfu_pct_e2e_ceiling"] = round(r["mfu_pct_steady"] * r["wall_parts"]["slot_fill"], 2)
    print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def flops_per_token(cfg, inputs) -> tuple[int, float]:
    """4 x frozen + 6 x trainable parameters of one trial (the model built once, on CPU),
    and the training split's mean tokens per row (text tokens plus the prefix, as the
    trainer counts them for tokens_per_s)."""
    import torch

    from trainer.optim import param_groups
    from trainer.run import build_run

    run, _, _ = build_run(cfg, inputs, device="cpu", log=lambda *_: None)
    _, counts = param_groups(run.model)
    rows = len(run.train)
    text = run.train.batch(torch.arange(rows))["attention_mask"].sum().item()
    return 4 * counts.frozen + 6 * counts.trainable, text / rows + run.prefix_tokens


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
