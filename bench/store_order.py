"""A sweep's start on the reference inputs: its MLflow store opened beside the preparation
(session 26's order) or after it (`tuning.sweep.StoreAfterPreparation`), Ray starting meanwhile.

    python bench/store_order.py --reps 3

Each run is a fresh process (one arm, timed from after its imports to the inputs, the store
and Ray all ready); the arms alternate after an untimed first run that builds what the
inputs lack. Prints each run, each arm's median and the ratio after / beside.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["base.config=reference.yaml", "base.overrides.demo.num_examples=64",
             "base.overrides.phase2.warmup_steps=5"]


def one_run(arm: str) -> None:
    """In a fresh process: one arm's start, its times printed as one RESULT line."""
    import ray

    import tuning.sweep as sweep
    from tuning.raytune import driver
    from tuning.search_config import load_search
    from tuning.tracking import publish

    work = Path(tempfile.mkdtemp())
    loaded = load_search(str(ROOT / "configs" / "search.yaml"),
                         [*OVERRIDES, f"sweep.storage_path={work}"])
    cfg, mlflow_dir = loaded.cfg, work / "mlflow"
    began = time.perf_counter()
    if arm == "beside":
        prepared = sweep.in_background(sweep.prepare_inputs, loaded.base, log=lambda m: None)
        store_opened = sweep.in_background(publish.open_store, cfg, "bench", mlflow_dir)
        wait_store = store_opened
    else:
        store = sweep.StoreAfterPreparation(
            lambda: publish.open_store(cfg, "bench", mlflow_dir))
        prepared = sweep.in_background(store.prepare_then_open, loaded.base)
        wait_store = store.wait
    ray_began = time.perf_counter()
    driver.init_ray(loaded, logging.ERROR)
    ray_s = time.perf_counter() - ray_began
    _, prepare_s = prepared()
    wait_store()
    ready_s = time.perf_counter() - began
    print(f"RESULT {arm} ready {ready_s:.2f} prepare {prepare_s:.2f} ray {ray_s:.2f}", flush=True)
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # one run, in a child process
    args = ap.parse_args()
    if args.arm:
        one_run(args.arm)
        return
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": path}

    def run(arm: str) -> list[str]:
        done = subprocess.run([sys.executable, __file__, "--arm", arm], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{arm}: exited {done.returncode}\n{done.stderr[-3000:]}")
        return next(line for line in done.stdout.splitlines()
                    if line.startswith("RESULT")).split()

    run("after")  # builds what the reference inputs lack, untimed
    ready: dict[str, list[float]] = {"beside": [], "after": []}
    for rep in range(args.reps):
        for arm in ready:
            fields = run(arm)
            ready[arm].append(float(fields[3]))
            print(f"rep {rep + 1} {arm:>6}: ready {fields[3]}s (preparation {fields[5]}s, "
                  f"Ray {fields[7]}s)", flush=True)
    med = {arm: statistics.median(v) for arm, v in ready.items()}
    for arm, m in med.items():
        print(f"{arm:>6}: median {m:.2f}s over {args.reps}")
    print(f"ratio after / beside: {med['after'] / med['beside']:.3f}")


if __name__ == "__main__":
    main()
