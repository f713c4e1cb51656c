"""A whole sweep's wall clock, this working tree against a baseline commit, through the CLI.

    python bench/sweep_wall.py --baseline HEAD~1                    # the CI smoke sweep
    python bench/sweep_wall.py --baseline ec3b3d1 --reps 5 --config configs/smoke.yaml
    python bench/sweep_wall.py --baseline HEAD --set resources.shared_group=true --fresh-data 256

The baseline is checked out into a temporary git worktree. Each rep runs `python -m
tuning.sweep CONFIG --restart` in a fresh process from each tree (the arms alternating,
each with its own storage in a temporary directory, both on the same demo assets, built by
an untimed first run), and times the process from its start to its exit: imports, Ray,
the trials, the report and the exit, all of it. Prints every process's wall and the
sweep's own clock line, then each arm's median and the ratio tree / baseline.
`--fresh-data N` gives every sweep a demo dataset of its own (N + a different count of
examples each), so each one's preparation builds the data and encodes its frozen-feature
cache, as a sweep on new data does; the demo LLM and Phase 1 stay the warm-up's.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINISHED = re.compile(r"sweep finished in .*")


def one(tree: Path, config: Path, storage: Path, assets: Path,
        overrides: list[str]) -> tuple[float, str]:
    """(process wall seconds, the sweep's 'finished in' line) of one sweep from `tree`."""
    args = [sys.executable, "-m", "tuning.sweep", str(config), "--restart",
            "--set", f"sweep.storage_path={storage}",
            "--set", f"base.overrides.output.assets_dir={assets}"]
    for item in overrides:
        args += ["--set", item]
    began = time.perf_counter()  # the CLI sets its own offline and telemetry variables
    done = subprocess.run(args, cwd=tree, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{tree}: the sweep exited {done.returncode}\n{done.stderr[-3000:]}")
    found = FINISHED.search(done.stdout)
    return wall, found.group(0) if found else "(no finished line)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="the commit to compare against")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "smoke.yaml")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="a search.yaml override for every sweep")
    ap.add_argument("--fresh-data", type=int, default=None, metavar="N",
                    help="each sweep prepares a new demo dataset of about N examples")
    args = ap.parse_args()
    config = args.config.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base),
                        args.baseline], check=True)
        try:
            trees = {"baseline": base, "tree": ROOT}
            assets = Path(tmp) / "assets"
            # builds the assets (with --fresh-data: the LLM and Phase 1), untimed
            one(ROOT, config, Path(tmp) / "warm-up", assets, args.overrides)
            runs = 0
            walls: dict[str, list[float]] = {arm: [] for arm in trees}
            for rep in range(args.reps):
                for arm, tree in trees.items():
                    extra = list(args.overrides)
                    if args.fresh_data is not None:
                        runs += 1
                        extra.append(f"base.overrides.demo.num_examples={args.fresh_data + runs}")
                    wall, line = one(tree, config, Path(tmp) / f"{arm}-{rep}", assets, extra)
                    walls[arm].append(wall)
                    print(f"rep {rep + 1} {arm:>8}: {wall:5.1f}s process wall; {line}",
                          flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False)
    med = {arm: statistics.median(w) for arm, w in walls.items()}
    for arm, m in med.items():
        print(f"{arm:>8}: median process wall {m:.1f}s over {args.reps}")
    print(f"ratio tree / baseline ({args.baseline}): {med['tree'] / med['baseline']:.3f}")


if __name__ == "__main__":
    main()
