"""Sweep overhead on a small machine: `tuning.sweep` against a bare sequential loop.

    python bench/sweep_overhead.py [--trials 16] [--steps 200] [--concurrent 2]

Both arms run the same trials (the tiny demo model, one base LR each, `--steps`
optimizer steps) in this one run:
  baseline: a bare loop calling `trainer.train()` for each trial, one after another,
            in this process (no Ray, no MLflow, no report);
  sweep:    `python -m tuning.sweep` on a generated search.yaml (FIFO, `--concurrent`
            trials at a time, 1 CPU each), end to end: Ray start, trials, MLflow
            logging, report.
Prints both wall times and the ratio sweep / baseline (target <= 1.5).
Shared inputs (demo assets, feature cache) are built before either arm is timed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import config_from_data  # noqa: E402
from trainer.inputs import prepare_inputs  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.yaml_io import dump_yaml  # noqa: E402


def base_overrides(work: Path, steps: int) -> dict:
    return {"phase2.epochs": 1, "phase2.batch_size": 8, "phase2.warmup_steps": 10,
            "phase2.total_training_steps": steps, "phase2.gradient_clip_val": 1.0,
            "demo.num_examples": 128, "demo.llm.pretrain_steps": 50,
            "output.root": str(work / "runs"), "output.save_weights": True}


def lrs(n: int) -> list[float]:
    return [round(1e-3 * (1.25 ** i), 8) for i in range(n)]


def nested(overrides: dict) -> dict:
    data: dict = {}
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return data


def run_baseline(work: Path, steps: int, n: int) -> float:
    t0 = time.perf_counter()
    for i, lr in enumerate(lrs(n)):
        data = nested(base_overrides(work, steps))
        data["phase2"]["learning_rate"] = lr
        data["output"]["run_name"] = f"bare-{i}"
        train(config_from_data(data), console=False, log=lambda *_: None)
    return time.perf_counter() - t0


def run_sweep(work: Path, steps: int, n: int, concurrent: int) -> float:
    search = {
        "sweep": {"name": "bench", "storage_path": str(work / "sweeps")},
        "base": {"config": None, "overrides": base_overrides(work, steps)},
        "space": {"learning_rate": {"grid": lrs(n)}},
        "num_samples": 1, "max_concurrent_trials": concurrent,
        "search": {"algorithm": "grid"}, "scheduler": {"type": "fifo"},
        "resources": {"cpus_per_trial": 1}, "ray": {"num_cpus": concurrent},
        "trials": {"report_every": 10, "checkpoint_every": 0},
    }
    path = work / "search.yaml"
    path.write_text(dump_yaml(search))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tuning.sweep", str(path), "--restart"], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare_inputs(config_from_data(nested(base_overrides(work, args.steps))),
                       log=lambda *_: None)  # shared inputs, untimed, for both arms
        bare = run_baseline(work, args.steps, args.trials)
        sweep = run_sweep(work, args.steps, args.trials, args.concurrent)
    print(f"trials: {args.trials} x {args.steps} steps, sweep at {args.concurrent} concurrent")
    print(f"baseline (bare sequential loop): {bare:.1f} s")
    print(f"tuning.sweep (Ray + MLflow + report): {sweep:.1f} s")
    print(f"ratio sweep / baseline: {sweep / bare:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
