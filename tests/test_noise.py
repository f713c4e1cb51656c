"""Third-party noise is silenced by default in both CLIs; --verbose keeps it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT
from transformers.utils import logging as hf_logging

import tuning.sweep as sweep
from trainer.__main__ import main as trainer_main


@pytest.fixture(autouse=True)
def library_defaults(monkeypatch):
    """Each test starts from the libraries' own levels and leaves them as it found them."""
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "MLFLOW_LOGGING_LEVEL"):
        monkeypatch.delenv(name, raising=False)

    def reset() -> None:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.NOTSET)

    reset()
    yield
    reset()


@pytest.mark.parametrize("verbose", [False, True])
def test_trainer_cli_silences_transformers_unless_verbose(verbose, capsys) -> None:
    argv = [str(ROOT / "configs" / "phase2.yaml"), "--count-params"] + (
        ["--verbose"] if verbose else [])
    assert trainer_main(argv) == 0
    assert "projector" in capsys.readouterr().out
    assert hf_logging.get_verbosity() == (logging.WARNING if verbose else logging.ERROR)
    assert hf_logging.is_progress_bar_enabled() is verbose


@pytest.mark.parametrize("verbose", [False, True])
def test_sweep_cli_silences_mlflow_ray_transformers_unless_verbose(verbose, tmp_path,
                                                                    monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(sweep, "INTERRUPT", SimpleNamespace(install=lambda: None))
    monkeypatch.setattr(sweep, "run_sweep", lambda loaded, **kw: seen.update(kw) or 0)
    argv = [str(ROOT / "configs" / "search.yaml"), "--set",
            f"sweep.storage_path={tmp_path}"] + (["--verbose"] if verbose else [])
    assert sweep.main(argv) == 0
    # what ray.init(logging_level=...) gets
    assert seen["ray_log_level"] == (logging.INFO if verbose else logging.ERROR)
    assert logging.getLogger("mlflow").level == (logging.NOTSET if verbose else logging.WARNING)
    assert os.environ.get("MLFLOW_LOGGING_LEVEL") == (None if verbose else "WARNING")
    assert hf_logging.get_verbosity() == (logging.WARNING if verbose else logging.ERROR)
    assert hf_logging.is_progress_bar_enabled() is verbose


def test_a_process_without_transformers_is_quiet_once_it_imports_it() -> None:
    """The sweep's driver quiets transformers without importing it (it may never need it):
    the variables set before its import give the same levels as the explicit calls."""
    child = (
        "import sys\n"
        "from trainer.noise import quiet_transformers\n"
        "quiet_transformers()\n"
        "print('imported' if 'transformers' in sys.modules else 'not imported')\n"
        "import logging\n"
        "from transformers.utils import logging as hf\n"
        "print(hf.get_verbosity() == logging.ERROR, hf.is_progress_bar_enabled())\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    out = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == ["not", "imported", "True", "False"], out
