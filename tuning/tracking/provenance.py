"""What produced a run: the code version (git describe) and the library versions, as tags."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

from tuning.tracking.names import TAG_CODE_VERSION


def git_describe(repo_dir: Path | None = None) -> str:
    """``git describe --always --dirty`` of this checkout, or "unknown" (no git, no repo)."""
    cwd = repo_dir or Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def _dist_version(name: str) -> str:
    # importlib.metadata instead of importing torch/ray: importing torch costs seconds.
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def runtime_tags() -> dict[str, str]:
    """Code and library versions, so a run says what produced it."""
    return {
        TAG_CODE_VERSION: git_describe(),
        "phase2tune.ray_version": _dist_version("ray"),
        "phase2tune.torch_version": _dist_version("torch"),
        "phase2tune.mlflow_version": _dist_version("mlflow"),
    }

