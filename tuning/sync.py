"""Write what a sweep left pending in MLflow: ``python -m tuning.sync SWEEP_DIR``.

SWEEP_DIR is the tracker's state directory (the one holding ``mlflow_state.json`` and
``mlflow_pending.jsonl``): what a killed driver had been told and not written, and what an
outage held back, in the order it was asked for. Step records are not in it: a ship request
names the trial's ``metrics.jsonl``, which is read again above the watermark. The tracking
URI and experiment come from the state file; ``--tracking-uri`` writes to another store
instead (run ids are kept per store, so nothing from the original store is reused there).
Writing again is idempotent, and safe beside a live driver (both take the same locks).

Exit status: 0 nothing pending afterwards, 1 the store is still unreachable (what is pending
is kept), 2 SWEEP_DIR is not a sweep state directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tuning.tracking.errors import TrackingError
from tuning.tracking.state import STATE_FILE, state_problem
from tuning.tracking.tracker import SweepTracker


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tuning.sync",
        description="Write what a sweep left pending in MLflow (a killed driver, an outage).",
    )
    parser.add_argument("sweep_dir", type=Path, help="state directory with mlflow_state.json")
    parser.add_argument("--tracking-uri", help="write to this store instead of the sweep's")
    parser.add_argument(
        "--kill-running",
        action="store_true",
        help="afterwards mark the sweep's RUNNING runs KILLED (the driver died without cleanup)",
    )
    parser.add_argument("--experiment", help="the sweep's MLflow experiment, when its "
                        f"{STATE_FILE} is damaged (default: the one experiment of an "
                        "embedded store)")
    parser.add_argument("--timeout", type=float, default=10.0, help="HTTP wait bound, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    sweep_dir: Path = args.sweep_dir
    state_path = sweep_dir / STATE_FILE
    embedded_db = sweep_dir / "mlflow.db"
    if not sweep_dir.is_dir() or not (state_path.is_file() or embedded_db.is_file()):
        print(f"tuning.sync: {sweep_dir} is not a sweep state directory (no {STATE_FILE})")
        return 2
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state_problem(state) is not None:
            raise ValueError(state_problem(state))
        experiment_name = args.experiment or state["experiment_name"]
        stored_uri = state["tracking_uri"]
        embedded = bool(state.get("embedded"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # The tracker rebuilds the rest of a damaged state from the store's run tags; what
        # it needs here is which store and experiment to open.
        experiment_name = args.experiment or _only_experiment(embedded_db)
        if experiment_name is None or not (args.tracking_uri or embedded_db.is_file()):
            print(f"tuning.sync: {state_path} is unreadable or incomplete ({exc}); rerun with "
                  "--tracking-uri URI --experiment NAME (the sweep's MLflow store and "
                  "experiment)")
            return 2
        print(f"tuning.sync: warning: {state_path} is unreadable or incomplete ({exc}); "
              f"using experiment {experiment_name!r} in "
              f"{args.tracking_uri or 'the embedded store'}")
        stored_uri, embedded = None, not args.tracking_uri

    tracking_uri = args.tracking_uri or (None if embedded else stored_uri)
    tracker = SweepTracker(tracking_uri, experiment_name, sweep_dir, timeout_s=args.timeout)
    waiting = tracker.pending_operations()
    print(f"store: {tracker.tracking_uri} (experiment {experiment_name!r})")
    print(f"pending: {tracker.pending_path} with {waiting} operation(s)")
    try:
        report = tracker.catch_up(force=True)
    except TrackingError as exc:
        print(f"tuning.sync: {exc}")
        return 1
    print(report.summary())
    if report.remaining:
        print(f"store still unreachable: {report.error}; run tuning.sync again later")
        return 1
    if args.kill_running:
        tracker.kill_running()
        left = tracker.pending_operations()
        if left:
            print(f"kill-running left pending, store unreachable: {tracker.last_outage}")
            return 1
        print("marked the sweep's RUNNING runs KILLED")
    parent = tracker.parent_run_id
    if parent:
        print(f"parent run: {parent}")
    return 0


def _only_experiment(db: Path) -> str | None:
    """The one experiment (besides MLflow's Default) of an embedded store; None otherwise."""
    if not db.is_file():
        return None
    from mlflow.tracking import MlflowClient

    try:
        names = [e.name for e in MlflowClient(f"sqlite:///{db}").search_experiments()
                 if e.name != "Default"]
    except Exception:  # a damaged store: the caller asks for --experiment
        return None
    return names[0] if len(names) == 1 else None


if __name__ == "__main__":
    sys.exit(main())
