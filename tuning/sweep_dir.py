"""The sweep directory (<storage_path>/<name>/): where it is, its lock (one driver at a
time), the snapshot of the config it was started with, and the resume-or-restart decision
(an edited config is refused; a damaged snapshot is recovered from MLflow's copy).

Layout:
  search.snapshot.yaml  what this sweep was started with (resume refuses edits)
  ray/                  Ray Tune's experiment state, checkpoints and results
  trials/<trial_id>/    each trial's trainer run dir (metrics.jsonl, summary.json, ...)
  mlflow/               embedded MLflow store (unless mlflow.tracking_uri), its state
                        and what is not written to it yet (mlflow_pending.jsonl)
  report/               leaderboard.csv/.md, best_stable.yaml, advice.md, plots/
Beside the sweeps, <storage_path>/compile_cache/ keeps a compiled shared group's
artifacts (trainer/compile_cache.py), for every sweep of that storage.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import os
import shutil
import sys
from pathlib import Path
from typing import TextIO

from trainer.errors import ConfigError, Problem
from trainer.fsutil import atomic_write_text, dir_problem
from trainer.yaml_io import dump_yaml, parse_yaml
from tuning.search_config import Loaded

SNAPSHOT = "search.snapshot.yaml"
LOCK = ".sweep.lock"


def resolve_sweep_dir(loaded: Loaded) -> Path:
    """<storage_path>/<name>/, refused (ConfigError) when it leaves the storage root or
    cannot be written."""
    root = loaded.cfg.sweep.storage_path.resolve()
    sweep_dir = root / loaded.cfg.sweep.name
    if sweep_dir.is_symlink() or (sweep_dir.exists() and sweep_dir.resolve().parent != root):
        raise ConfigError([Problem(str(loaded.path), "sweep.name",
                                   f"{sweep_dir} leaves {root} (symlink)",
                                   "remove the link or pick another name")])
    why = dir_problem(sweep_dir)
    if why:  # checked before anything starts: a file in the way, a read-only mount
        raise ConfigError([Problem(str(loaded.path), "sweep.storage_path", why,
                                   "point it at a writable directory")])
    return sweep_dir


def snapshot_text(loaded: Loaded) -> str:
    """What `SNAPSHOT` holds: the search.yaml and base config this sweep runs."""
    return dump_yaml({"search": loaded.raw, "base": loaded.base_data})


def acquire_lock(sweep_dir: Path, src: str) -> TextIO:
    """Hold the sweep's lock (ConfigError when another driver holds it); says so when the
    last driver was killed."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    f = open(sweep_dir / LOCK, "a+")  # noqa: SIM115 - held open for the whole sweep
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError([Problem(src, "sweep.name",
                                   f"sweep {sweep_dir.name} is already running ({holder})",
                                   "wait for it, or use another sweep.name")]) from None
    f.seek(0)
    previous = f.read().strip()
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} running")
    f.flush()
    if previous.endswith("running"):
        # The last driver never reached its end (SIGKILL, OOM, power): its Ray cluster's
        # trial workers notice the lost driver only after up to a minute.
        print("[sweep] the previous driver of this sweep was killed; trial workers it left "
              "may train on for up to a minute. That is harmless: each trial resumes from "
              "its last checkpoint, and the steps those workers add after it are truncated "
              "before it continues.", flush=True)
    return f


def release_lock(lock: TextIO) -> None:
    """Mark a clean end (a later driver then knows this one was not killed) and unlock."""
    with contextlib.suppress(OSError):
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} ended")
        lock.flush()
    lock.close()


def check_resume(sweep_dir: Path, loaded: Loaded, restart: bool, src: str) -> bool:
    """Decide resume vs fresh start; refuse an edited config. True = resume."""
    new = snapshot_text(loaded)
    if restart:
        for name in ("ray", "trials", "mlflow", "report", SNAPSHOT, "trials.json"):
            p = sweep_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return False
    old = _snapshot_or_recover(sweep_dir, new)
    if old is None:
        return False
    if old != new:
        diff = [d for d in difflib.unified_diff(old.splitlines(), new.splitlines(), "started with",
                                                "now", lineterm="", n=0)
                if d.startswith(("+", "-")) and not d.startswith(("+++", "---"))]
        raise ConfigError([Problem(src, "", f"sweep {sweep_dir.name} was started with a "
                                   f"different config: {' | '.join(diff[:6])}",
                                   "undo the edit, use --restart to start over, or change "
                                   "sweep.name")])
    return True


def _snapshot_problem(text: bytes) -> str | None:
    """Why snapshot bytes are not a snapshot this code wrote (None when they are)."""
    try:
        data = parse_yaml(text.decode("utf-8"), SNAPSHOT)
    except (UnicodeDecodeError, ConfigError) as e:
        return "not readable YAML" if isinstance(e, ConfigError) else "not UTF-8 text"
    if not (isinstance(data, dict) and set(data) == {"search", "base"}):
        return "empty or truncated" if not data else "not a sweep snapshot"
    return None


def _snapshot_or_recover(sweep_dir: Path, new: str) -> str | None:
    """The snapshot this sweep started with; None for a new sweep. A damaged snapshot is
    restored from the copy the embedded MLflow store keeps on the parent run; without one,
    the sweep resumes on the current search.yaml (Ray's state is intact) with a warning."""
    snap = sweep_dir / SNAPSHOT
    started = any((sweep_dir / "ray").glob("experiment_state-*.json"))
    if not snap.exists() and not started:
        return None
    try:
        raw = snap.read_bytes()
        why = _snapshot_problem(raw)
    except OSError as e:
        raw, why = b"", f"unreadable ({e.strerror or e})" if snap.exists() else "missing"
    if why is None:
        return raw.decode("utf-8")
    for copy_ in sorted((sweep_dir / "mlflow" / "mlartifacts").glob(f"*/*/artifacts/{SNAPSHOT}")):
        with contextlib.suppress(OSError):
            if _snapshot_problem(copy_.read_bytes()) is None:
                text = copy_.read_text(encoding="utf-8")
                atomic_write_text(snap, text)
                print(f"[sweep] warning: {snap} was {why}; restored it from MLflow's copy "
                      f"({copy_})", file=sys.stderr, flush=True)
                return text
    print(f"[sweep] warning: {snap} was {why} and has no intact copy; resuming from Ray's "
          "saved state with the current search.yaml (check that it is the one this sweep "
          "started with; --restart starts over)", file=sys.stderr, flush=True)
    return new

