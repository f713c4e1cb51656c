"""A sweep's start: its shared inputs prepared, then Ray started (the old order), against
both side by side (`tuning.sweep` now).

    python bench/sweep_start.py configs/reference.yaml --set demo.num_examples=64
    python bench/sweep_start.py configs/phase2.yaml        # the demo

Each arm runs in a fresh process (imports, a local Ray of its own, shut down after), on
inputs already built (a first, untimed process builds them), alternating `--reps` times:
  sequential: `prepare_inputs`, then `tuning.raytune.driver.init_ray`;
  overlapped: `prepare_inputs` on a thread (`tuning.sweep.in_background`) while
              `init_ray` runs.
Prints each process's preparation, Ray start and their wall, then the ratio of the
medians overlapped / sequential (the saving is at most the shorter of the two parts).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("sequential", "overlapped")


def search_yaml(config: Path, overrides: list[str], work: Path) -> Path:
    """A search.yaml over `config` with `overrides`, its sweep and assets under `work`
    (the assets' own cache, runs/_assets, when the config names none)."""
    from trainer.yaml_io import dump_yaml, parse_scalar

    sets = dict(o.split("=", 1) for o in overrides)
    data = {"sweep": {"name": "start", "storage_path": str(work / "sweeps")},
            "base": {"config": str(config.resolve()),
                     "overrides": {k: parse_scalar(v) for k, v in sets.items()}},
            "space": {"learning_rate": {"grid": [1e-4]}},
            "ray": {"num_cpus": 2}}
    path = work / "search.yaml"
    path.write_text(dump_yaml(data))
    return path


def child(path: Path, arm: str) -> dict:
    """One arm's start in this process, timed ("build": the inputs, untimed)."""
    t0 = time.perf_counter()
    from trainer.inputs import prepare_inputs
    from tuning.raytune import driver
    from tuning.raytune.interrupt import shutdown_ray
    from tuning.search_config import load_search
    from tuning.sweep import in_background

    loaded = load_search(str(path), [])
    began = time.perf_counter()
    if arm == "build":  # the inputs built once, before the timed arms
        prepare_inputs(loaded.base)
        return {"arm": arm}
    if arm == "sequential":
        prepare_inputs(loaded.base, log=lambda m: None)
        prepare_s = time.perf_counter() - began
        driver.init_ray(loaded, logging.ERROR)
        ray_s = time.perf_counter() - began - prepare_s
    else:
        prepared = in_background(prepare_inputs, loaded.base, log=lambda m: None)
        driver.init_ray(loaded, logging.ERROR)
        ray_s = time.perf_counter() - began
        _, prepare_s = prepared()
    wall = time.perf_counter() - began
    shutdown_ray()
    return {"arm": arm, "imports_s": round(began - t0, 2), "prepare_s": round(prepare_s, 2),
            "ray_start_s": round(ray_s, 2), "start_wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, help="the base Phase 2 config")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="KEY=VALUE override of the base config")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", choices=("build", *ARMS), help=argparse.SUPPRESS)
    ap.add_argument("--search", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.search, args.child)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = search_yaml(args.config, args.overrides, Path(tmp))
        subprocess.run([sys.executable, __file__, str(args.config), "--child", "build",
                        "--search", str(path)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)  # build the inputs once, untimed
        rows = []
        for _ in range(args.reps):
            for arm in ARMS:
                out = subprocess.run([sys.executable, __file__, str(args.config), "--child", arm,
                                      "--search", str(path)], check=True, cwd=ROOT,
                                     capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    median = {arm: statistics.median(r["start_wall_s"] for r in rows if r["arm"] == arm)
              for arm in ARMS}
    print(json.dumps({"median_start_wall_s": median, "ratio_overlapped_over_sequential":
                      round(median["overlapped"] / median["sequential"], 3)}))


if __name__ == "__main__":
    main()
