"""A shared group's trial process: what its imports cost, now that it imports no torch.

    python bench/client_start.py --reps 5

A shared group's Tune trials are thin clients (join the group actor, poll, report), one
Ray worker process each, started side by side as the sweep begins (while the actor imports
the LLM's code). Each arm runs in a fresh interpreter, alternating `--reps` times:
  with torch: the client's modules after `import torch` (what the client imported before:
              the trainer package loaded torch with any of its modules);
  client:     the client's modules alone (`tuning.raytune.group_actor`,
              `tuning.raytune.trainable`, `ray.tune`).
Prints each arm's median import time and peak resident memory, and the ratios client /
with torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CLIENT = "import tuning.raytune.group_actor, tuning.raytune.trainable, ray.tune"
ARMS = {"with torch": "import torch\n" + CLIENT, "client": CLIENT}


def child(imports: str) -> dict:
    code = ("import resource, sys, time, json\n"
            "t = time.perf_counter()\n"
            f"{imports}\n"
            "print(json.dumps({'s': time.perf_counter() - t, 'torch': 'torch' in sys.modules,"
            " 'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    child(CLIENT)  # untimed: the file cache warm for both arms
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for _ in range(args.reps):
        for arm, imports in ARMS.items():
            runs[arm].append(child(imports))
    med = {arm: {"import_s": round(statistics.median(r["s"] for r in rs), 3),
                 "rss_mb": round(statistics.median(r["rss_mb"] for r in rs)),
                 "torch_loaded": rs[0]["torch"]} for arm, rs in runs.items()}
    for arm, m in med.items():
        print(json.dumps({"arm": arm, **m}))
    new, old = med["client"], med["with torch"]
    print(f"client / with torch: imports {new['import_s'] / old['import_s']:.3f}x "
          f"({new['import_s']:.2f}s vs {old['import_s']:.2f}s), peak memory "
          f"{new['rss_mb'] / old['rss_mb']:.3f}x ({new['rss_mb']} vs {old['rss_mb']} MB)")


if __name__ == "__main__":
    main()
