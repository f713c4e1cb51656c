"""The sweep driver's own MLflow work around the Ray run: the reachability check before
anything starts, the Tune callback with the parent run's params, the report published on
the runs afterwards, the runs marked KILLED after an interrupt, and where to look."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tuning.analysis.report import Report
from tuning.analysis.stability import STABLE_KINDS
from tuning.search_config import Loaded, SearchConfig
from tuning.tracking.callback import MlflowSweepCallback
from tuning.tracking.errors import TrackingUnavailable
from tuning.tracking.names import runs_link
from tuning.tracking.tracker import SweepTracker

MLFLOW_UI_PORT = 5000  # the port the printed `mlflow ui` command and link use


def unreachable_line(cfg: SearchConfig, experiment: str, src: str) -> str | None:
    """The error line when `mlflow.tracking_uri` cannot be reached and
    `mlflow.on_unreachable` is fail (None otherwise): checked before any directory or Ray
    exists."""
    if cfg.mlflow.tracking_uri and cfg.mlflow.on_unreachable == "fail":
        try:
            with tempfile.TemporaryDirectory() as tmp:
                SweepTracker(cfg.mlflow.tracking_uri, experiment, Path(tmp),
                             timeout_s=cfg.mlflow.timeout_s).check_reachable()
        except TrackingUnavailable as e:
            return f"{src}: mlflow.tracking_uri: {e}"
    return None


def sweep_callback(loaded: Loaded, experiment: str, mlflow_dir: Path, snapshot: Path
                   ) -> MlflowSweepCallback:
    """The Tune callback that writes the sweep's parent run (its params and `snapshot`) and
    one child run per trial."""
    cfg = loaded.cfg
    return MlflowSweepCallback(
        tracking_uri=cfg.mlflow.tracking_uri, experiment_name=experiment,
        state_dir=mlflow_dir, sweep_name=cfg.sweep.name,
        parent_params=parent_params(loaded), parent_artifacts=[snapshot],
        timeout_s=cfg.mlflow.timeout_s)


def open_store(cfg: SearchConfig, experiment: str, mlflow_dir: Path) -> None:
    """Open the sweep's own SQLite store (`mlflow.tracking_uri` unset) ahead of Tune's
    callback, which otherwise creates its tables (about 2 s) while every trial waits to
    start; the sweep runs this once its inputs are prepared, while Ray still starts or the
    shared groups take their inputs (`tuning.sweep.StoreAfterPreparation`). A store that cannot
    be used is left for the callback to meet and report, as without this; a state
    directory that cannot be written stops the sweep as any other write to its directory."""
    if cfg.mlflow.tracking_uri is not None:
        return  # a server's store exists already (and was probed before the sweep began)
    tracker = driver_tracker(cfg, experiment, mlflow_dir)  # saves its state file first
    try:
        tracker.check_reachable()
    except TrackingUnavailable:
        pass
    finally:
        tracker.close()


def driver_tracker(cfg: SearchConfig, experiment: str, mlflow_dir: Path) -> SweepTracker:
    """The driver's own MLflow handle, after Tune's callback is done writing (what it left
    pending is written by this handle's first write, before anything newer)."""
    return SweepTracker(cfg.mlflow.tracking_uri, experiment, mlflow_dir,
                        timeout_s=cfg.mlflow.timeout_s)


def kill_runs(cfg: SearchConfig, experiment: str, mlflow_dir: Path) -> None:
    """An interrupted sweep leaves no MLflow run RUNNING or FINISHED-looking: KILLED."""
    tracker = driver_tracker(cfg, experiment, mlflow_dir)
    try:
        tracker.kill_running()
        if tracker.parent_run_id:
            tracker.finish_parent("KILLED")
    finally:
        tracker.close()


def parent_params(loaded: Loaded) -> dict[str, Any]:
    """The parent run's params: the base phase2 settings, the space and how it is searched."""
    p2 = loaded.base.phase2
    params: dict[str, Any] = {f"base.{k}": v for k, v in p2.model_dump(mode="json").items()}
    params.update({f"space.{k}": json.dumps(v) for k, v in loaded.cfg.space.items()})
    params.update(num_samples=loaded.cfg.num_samples, search=loaded.cfg.search.algorithm,
                  scheduler=loaded.cfg.scheduler.type)
    return params


def publish_report(cfg: SearchConfig, experiment: str, mlflow_dir: Path, report: Report
                   ) -> tuple[str | None, str | None]:
    """Verdict tags and a ``final/stable`` metric on each child run; the report files on the
    parent run. Returns the MLflow UI link to the sweep's runs (None before any write) and
    the line that says what became of MLflow writes left over from an outage (None when
    there were none): the callback's warning about them is stale once this driver wrote
    them."""
    tracker = driver_tracker(cfg, experiment, mlflow_dir)
    had_backlog = tracker.pending_operations() > 0
    last_step = {r.trial_id: r.history[-1]["step"] for r in report.records if r.history}
    try:
        for trial_id, kind in report.verdicts.items():
            if tracker.run_id_of(trial_id):
                tags = {"phase2tune.verdict": kind}
                clip = report.clip_fractions.get(trial_id)
                if clip is not None:  # reported, never a verdict: clipping is the remedy
                    tags["phase2tune.clip_fraction"] = f"{clip:.3f}"
                tracker.set_trial_tags(trial_id, tags)
                # As a number too: MLflow's parallel-coordinates chart plots metrics only.
                tracker.log_final_metrics(
                    trial_id, {"final/stable": int(kind in STABLE_KINDS)},
                    last_step.get(trial_id, 0))
        for path in report.files.values():
            tracker.log_artifact(None, path, "report")
        if report.best_trial:
            tracker.set_parent_tags({"phase2tune.best_trial": report.best_trial})
        experiment_id = tracker.experiment_id
        base = cfg.mlflow.tracking_uri or f"http://127.0.0.1:{MLFLOW_UI_PORT}"
        link = runs_link(base, experiment_id, tracker.sweep_uid) if experiment_id else None
        if not had_backlog:
            return link, None
        left = tracker.catch_up(force=True).remaining
    finally:
        tracker.close()
    if left:
        return link, (f"MLflow: {left} write(s) still pending ({tracker.last_outage}); "
                      f"write them with: python -m tuning.sync {mlflow_dir}")
    return link, ("MLflow: the writes held back during the outage are all stored now "
                  "(nothing left for tuning.sync)")


def where_lines(cfg: SearchConfig, experiment: str, mlflow_dir: Path, link: str | None
                ) -> list[str]:
    """The closing lines that say where this sweep's MLflow runs are and how to see them."""
    uri = cfg.mlflow.tracking_uri or f"sqlite:///{mlflow_dir / 'mlflow.db'}"
    if cfg.mlflow.tracking_uri:
        where = f"MLflow: {cfg.mlflow.tracking_uri} (experiment {experiment})"
    else:
        where = (f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 "
                 f"--port {MLFLOW_UI_PORT}")
    return [where, f"MLflow runs of this sweep: {link or f'experiment {experiment}'}"]
