"""A command's exit: the time from its `main()` returning to its process ending, leaving
as `python -m tuning.sweep` does (`trainer.process_exit.exit_process`: the garbage
collector's teardown passes skipped) against a plain `sys.exit`.

    python bench/cli_exit.py                      # the CI smoke sweep, 2 reps per arm
    python bench/cli_exit.py --reps 3 --set base.overrides.phase2.total_training_steps=4

Each rep runs the real sweep CLI (`tuning.sweep.main`) end to end in a fresh process, on
`--config` with its storage in a temporary directory, the arms alternating; the process
prints a time stamp as `main()` returns, then leaves one way or the other. Prints, per
arm, the median exit time and process wall, then the ratio exit_process / sys.exit of
the median exit times.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = "@@main-returned "
CHILD = """
import sys, time
import tuning.sweep as sweep
code = sweep.main(sys.argv[2:])
print({stamp!r} + repr(time.time()), flush=True)
(sweep.exit_process if sys.argv[1] == "exit_process" else sys.exit)(code)
"""


def one(arm: str, config: Path, overrides: list[str], storage: Path) -> tuple[float, float]:
    """(exit seconds, process wall seconds) of one sweep ending `arm`'s way."""
    args = [sys.executable, "-c", CHILD.format(stamp=STAMP), arm, str(config), "--restart",
            "--set", f"sweep.storage_path={storage}"]
    for o in overrides:
        args += ["--set", o]
    began = time.time()
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    ended = time.time()
    returned = float(next(line for line in out.splitlines()
                          if line.startswith(STAMP))[len(STAMP):])
    return ended - returned, ended - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "smoke.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    arms = ("sys.exit", "exit_process")
    times: dict[str, list[tuple[float, float]]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for arm in arms:
                exit_s, wall_s = one(arm, args.config, args.overrides, Path(tmp) / arm)
                times[arm].append((exit_s, wall_s))
                print(f"rep {rep + 1} {arm:>12}: exit {exit_s:.2f}s of a {wall_s:.1f}s process",
                      flush=True)
    med = {a: (statistics.median(e for e, _ in t), statistics.median(w for _, w in t))
           for a, t in times.items()}
    for arm, (exit_s, wall_s) in med.items():
        print(f"{arm:>12}: median exit {exit_s:.2f}s, median process wall {wall_s:.1f}s")
    print(f"exit ratio exit_process / sys.exit: {med['exit_process'][0] / med['sys.exit'][0]:.3f}")


if __name__ == "__main__":
    main()
