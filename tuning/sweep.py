"""`python -m tuning.sweep configs/search.yaml`: a Ray Tune sweep of Phase 2 runs.

Order of work, so that bad input costs nothing: validate search.yaml and the
base config (exit 2, nothing written) -> check every sampled extreme makes a
valid run (tuning.preflight) -> take the sweep lock (tuning.sweep_dir) -> prepare
shared inputs once (demo assets and the frozen-feature cache) while Ray starts -> fit or
restore (tuning.raytune.driver) -> report, recheck -> MLflow (tuning.tracking.publish).
The sweep directory's layout: tuning.sweep_dir.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from trainer.errors import ConfigError
from trainer.fsutil import atomic_write_text, storage_error_line
from trainer.inputs import prepare_inputs, train_size
from trainer.noise import quiet_transformers
from trainer.plan import plan_steps
from trainer.process_exit import exit_after_handlers
from tuning.preflight import check_runs, dry_run
from tuning.raytune.interrupt import INTERRUPT, shutdown_ray
from tuning.search_config import Loaded, load_search
from tuning.sweep_dir import (
    SNAPSHOT,
    acquire_lock,
    check_resume,
    release_lock,
    resolve_sweep_dir,
    snapshot_text,
)

T = TypeVar("T")


def in_background(fn: Callable[..., T], *args: Any,
                  **kwargs: Any) -> Callable[[], tuple[T, float]]:
    """Start `fn(*args, **kwargs)` on a thread of its own; the returned call waits for it
    and gives its result and seconds, or raises what it raised. A daemon thread: an
    interrupted sweep does not wait for it (what the preparation writes is written to a
    temporary name and renamed into place, so a stopped build leaves nothing half-made)."""
    done: Future[tuple[T, float]] = Future()

    def work() -> None:
        began = time.perf_counter()
        try:
            done.set_result((fn(*args, **kwargs), time.perf_counter() - began))
        except BaseException as e:  # handed to the caller, who raises it
            done.set_exception(e)

    threading.Thread(target=work, name=f"background-{fn.__name__}", daemon=True).start()
    return done.result


class StoreAfterPreparation:
    """The sweep's start on its background thread: the shared inputs prepared, then the
    MLflow store opened (`open_store`) on a thread of its own. `wait` waits for the store
    and stops one not yet begun from beginning, so an exit never leaves its tables half
    made."""

    def __init__(self, open_store: Callable[[], None]) -> None:
        self._open_store = open_store
        self._lock = threading.Lock()
        self._stopped = False
        self._opened: Callable[[], tuple[None, float]] | None = None

    def prepare_then_open(self, base: Any) -> Any:
        """`prepare_inputs(base)`, then the store's opening started; returns the inputs."""
        inputs = prepare_inputs(base, log=lambda m: print(m, flush=True))
        with self._lock:
            if not self._stopped:
                self._opened = in_background(self._open_store)
        return inputs

    def wait(self) -> None:
        """Wait for the store if it is being opened, and let no later opening begin."""
        with self._lock:
            self._stopped = True
            opened = self._opened
        if opened is not None:
            opened()


def _fail(lines: list[str]) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return 2


def quiet_driver(verbose: bool = False) -> int:
    """Silence third-party lines that need no action (transformers' bars and INFO, MLflow's
    and its SQLite migrations' INFO); returns the logging level for ``ray.init``. With
    ``verbose`` every library keeps its own levels and Ray logs at INFO."""
    quiet_transformers(verbose)
    if verbose:
        return logging.INFO
    # MLflow sets its logger's level from this when it is first imported (later than here).
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return logging.ERROR  # Ray's driver WARNINGs (e.g. token authentication) need no action


def run_sweep(loaded: Loaded, *, resume_flag: bool = False, restart: bool = False,
              recheck_k: int | None = None, ray_log_level: int = logging.ERROR) -> int:
    """Everything after validation: prepare -> Ray -> report -> MLflow. Returns the exit
    code."""
    # Ray, MLflow and the report's plotting load here, not at import: `--help` and
    # `--dry-run` never pay for them.
    from tuning.analysis.report import build_report, print_report
    from tuning.raytune import driver
    from tuning.raytune.recheck import run_recheck
    from tuning.tracking import publish

    cfg, src = loaded.cfg, str(loaded.path)
    sweep_dir = resolve_sweep_dir(loaded)
    try:  # checked before anything is written
        profile = driver.group_profile(os.environ.get(driver.GROUP_PROFILE_ENV), sweep_dir)
    except ValueError as e:
        return _fail([str(e)])
    mlflow_dir = sweep_dir / "mlflow"
    experiment = cfg.mlflow.experiment or cfg.sweep.name
    unreachable = publish.unreachable_line(cfg, experiment, src)  # before any dir or Ray
    if unreachable:
        return _fail([unreachable])
    lock = acquire_lock(sweep_dir, src)
    try:
        resume = check_resume(sweep_dir, loaded, restart, src)
        if resume_flag and not resume:
            print(f"[sweep] nothing to resume in {sweep_dir}; starting a new sweep")
        atomic_write_text(sweep_dir / SNAPSHOT, snapshot_text(loaded))
        clock = [("start", time.time())]  # the end summary's parts of the wall time
        print("[sweep] preparing shared inputs (demo assets, frozen-feature cache) while "
              "Ray starts ...")
        # Side by side: Ray's start is mostly waiting for its processes, the preparation
        # is this process's work (seconds each on a GPU host; a bad input found by the
        # preparation still exits 2, Ray is shut down).
        # The MLflow store's tables are made once the preparation is done, not beside it:
        # both are import-heavy Python on this process's one GIL (side by side, the
        # reference preparation took 1.3-1.6x as long). Where Ray's start is the longer
        # (cached inputs), the store is still made while Ray starts; else while the groups
        # take their inputs.
        store = StoreAfterPreparation(lambda: publish.open_store(cfg, experiment, mlflow_dir))
        prepared = in_background(store.prepare_then_open, loaded.base)
        try:
            began = time.perf_counter()
            driver.init_ray(loaded, ray_log_level)
            ray_s = time.perf_counter() - began
            # Shared groups start at once: each loads the frozen LLM while the preparation
            # runs on, and gets the inputs once they are ready (on a GPU host the LLM's
            # first imports take longer than what is left of the preparation).
            group = driver.start_shared_groups(cfg, sweep_dir, loaded.base, loaded.base_data,
                                               profile, src)
            inputs, prepare_s = prepared()
            if group is not None:
                driver.hand_inputs(group, inputs, sweep_dir)
        finally:  # Tune's callback opens the store next; an exit never cuts its tables short
            store.wait()
        print(f"[sweep] inputs ready in {prepare_s:.1f}s, Ray started in {ray_s:.1f}s, "
              "side by side")
        plan = plan_steps(loaded.base.phase2, train_size(loaded.base), src)
        opts = driver.trial_options(cfg, sweep_dir / "trials")
        clock.append(("preparation and Ray start", time.time()))
        trainable = driver.build_trainable(cfg, loaded.base_data, inputs, opts, group)
        index = driver.fit_sweep(
            loaded, sweep_dir, trainable,
            publish.sweep_callback(loaded, experiment, mlflow_dir, sweep_dir / SNAPSHOT),
            total_steps=plan.total_steps, ray_log_level=ray_log_level, resume=resume,
            groups=group)
        if group is not None:
            driver.close_group(group, sweep_dir)
        clock.append(("trials", time.time()))
        report = build_report(sweep_dir, cfg.stability, cfg.sweep.name)
        top_k = cfg.recheck.top_k if recheck_k is None else recheck_k
        if top_k:
            run_recheck(loaded, sweep_dir, report, top_k, inputs=inputs, opts=opts,
                        resume=resume)
        link, left = publish.publish_report(cfg, experiment, mlflow_dir, report)
        clock.append(("report" + (" and recheck" if top_k else ""), time.time()))
        print_report(report)
        print(f"\nsweep finished in {format_clock(clock)}: {len(index)} trials, "
              f"{sum(v['status'] == 'ERROR' for v in index.values())} failed")
        if left is not None:
            print(left)
        for line in publish.where_lines(cfg, experiment, mlflow_dir, link):
            print(line)
        return 1 if index and all(v["status"] == "ERROR" for v in index.values()) else 0
    except KeyboardInterrupt:
        publish.kill_runs(cfg, experiment, mlflow_dir)
        raise
    finally:
        release_lock(lock)


def format_clock(clock: list[tuple[str, float]]) -> str:
    """``412s (preparation 260s, Ray start 9s, trials 130s, report 13s)`` from (name, time)
    marks, the first one the start: the whole wall time, then each part."""
    parts = ", ".join(f"{name} {end - begin:.0f}s"
                      for (_, begin), (name, end) in itertools.pairwise(clock))
    return f"{clock[-1][1] - clock[0][1]:.0f}s ({parts})"


def main(argv: list[str] | None = None) -> int:
    """The CLI: arguments, then bad input -> 2, a full or unwritable disk -> 2, all trials
    failed -> 1, interrupted -> 130."""
    ap = argparse.ArgumentParser(prog="python -m tuning.sweep",
                                 description="Sweep Phase 2 stability knobs with Ray Tune.")
    ap.add_argument("config", help="search.yaml (see configs/search.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a search.yaml key, e.g. --set num_samples=4")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate, print the resolved space, trial count and resources; exit")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted sweep (the default when one exists)")
    group.add_argument("--restart", action="store_true",
                       help="discard this sweep's previous state and start over")
    ap.add_argument("--recheck", type=int, default=None, metavar="K",
                    help="after the sweep, re-run the K best stable configs over "
                         "recheck.seeds and recheck.lr_factors (overrides recheck.top_k)")
    ap.add_argument("--verbose", action="store_true",
                    help="keep transformers', MLflow's and Ray's INFO/WARNING lines "
                         "(silenced by default)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's CSV/JSON/TensorBoard loggers would duplicate (and choke on) the step records:
    # the trial run dirs and MLflow hold them.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours (Interrupt) records the signal
    ray_log_level = quiet_driver(args.verbose)
    try:
        loaded = load_search(args.config, args.overrides)
        check_runs(loaded)
        resolve_sweep_dir(loaded)
        if args.dry_run:
            dry_run(loaded)
            return 0
        # SIGTERM (e.g. from a scheduler) stops like Ctrl-C: state saved, runs KILLED.
        INTERRUPT.install()
        code = run_sweep(loaded, resume_flag=args.resume, restart=args.restart,
                         recheck_k=args.recheck, ray_log_level=ray_log_level)
        # Ray's own exit hook would do it too, after sleeping half a second for log lines
        # its workers might still print (theirs do not reach this driver: log_to_driver).
        shutdown_ray()
        return code
    except ConfigError as e:
        shutdown_ray()  # a problem found after Ray started (the shared groups' resources)
        return _fail(e.lines())
    except OSError as e:
        where = _storage_of(args.config, args.overrides)
        line = storage_error_line(e, where, "rerun the same command to resume this sweep")
        if line is None:
            raise
        shutdown_ray()
        return _fail([line])
    except KeyboardInterrupt:
        shutdown_ray()
        print("interrupted: rerun the same command to resume this sweep", file=sys.stderr)
        return 130


def _storage_of(config: str, overrides: list[str]) -> str:
    """The sweep directory for an error line (the storage path when it cannot be known)."""
    try:
        return str(load_search(config, overrides).sweep_dir)
    except Exception:  # the line must come out whatever else is wrong
        return "sweep.storage_path"


if __name__ == "__main__":
    exit_after_handlers(main())
