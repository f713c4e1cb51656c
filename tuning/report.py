"""`python -m tuning.report SWEEP_DIR`: rebuild a sweep's leaderboard, plots and
best_stable.yaml from its directory (the work is tuning.analysis.report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.errors import ConfigError
from trainer.fsutil import storage_error_line
from tuning.analysis.report import build_report, print_report
from tuning.analysis.stability import StabilityRules


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuning.report",
                                 description="Rebuild a sweep's leaderboard, plots and "
                                             "best_stable.yaml from its directory.")
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--config", type=Path, default=None,
                    help="search.yaml whose `stability:` rules to use (default: the sweep's)")
    args = ap.parse_args(argv)
    sweep_dir = args.sweep_dir
    if not (sweep_dir / "trials").is_dir():
        print(f"error: {sweep_dir}: not a sweep directory (no trials/; run "
              "python -m tuning.sweep first)", file=sys.stderr)
        return 2
    rules = None
    cfg_path = args.config or sweep_dir / "search.snapshot.yaml"
    try:
        if cfg_path.is_file():
            from trainer.yaml_io import load_yaml_file

            data = load_yaml_file(cfg_path)
            raw = data.get("search", data) if isinstance(data, dict) else {}
            rules = StabilityRules.model_validate(raw.get("stability", {}))
    except ConfigError as e:
        fix = "" if args.config else (" (the sweep's snapshot is damaged: pass --config with "
                                      "the sweep's search.yaml to take its stability rules)")
        print(f"error: {e.lines()[0]}{fix}", file=sys.stderr)
        return 2
    try:
        print_report(build_report(sweep_dir, rules))
    except OSError as e:
        line = storage_error_line(e, sweep_dir / "report", "rerun python -m tuning.report")
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
