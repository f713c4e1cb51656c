"""Shared fixtures: a tiny Phase 2 config whose demo assets are built once per session."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

ROOT = Path(__file__).resolve().parents[1]


def tiny_data(root: Path, assets: Path, **phase2: Any) -> dict[str, Any]:
    """Raw config data for a seconds-long CPU run (the demo at its smallest)."""
    p2 = {"learning_rate": 2e-3, "epochs": 1, "batch_size": 4, "warmup_steps": 2,
          "gradient_clip_val": 1.0, "seed": 7}
    p2.update(phase2)
    return {
        "phase2": p2,
        "demo": {"num_examples": 48, "llm": {"pretrain_steps": 100}},
        "data": {"eval_fraction": 0.25},
        "output": {"root": str(root), "assets_dir": str(assets), "log_every": 1000},
    }


@pytest.fixture(scope="session")
def assets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One demo asset directory (bundle, LLM, data, feature cache) for the whole session."""
    from trainer.config import config_from_data
    from trainer.inputs import prepare_inputs

    assets = tmp_path_factory.mktemp("assets")
    prepare_inputs(config_from_data(tiny_data(assets / "runs", assets)), log=lambda *_: None)
    return assets


_SHARED: dict[str, Path] = {}


def smoke_assets() -> Path:
    """The session's demo-asset directory for sweeps of configs/smoke.yaml (`test_sweep._write`
    points them at it): the first such sweep builds the bundle, LLM and feature cache there and
    every later one reuses them instead of building its own (about 7 s on an idle 2-core
    machine, more under load). Asset builds write to a temp file and rename, so a sweep's
    trials reading while another builds is safe."""
    return _SHARED["smoke_assets"]


@pytest.fixture(scope="session", autouse=True)
def _smoke_assets_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    _SHARED["smoke_assets"] = tmp_path_factory.mktemp("smoke_assets")


@pytest.fixture
def tiny(tmp_path: Path, assets_dir: Path):
    """Factory: tiny TrainConfig under tmp_path, phase2 keys overridable."""
    from trainer.config import config_from_data

    def make(run_name: str | None = "run", **phase2: Any):
        data = tiny_data(tmp_path / "runs", assets_dir, **phase2)
        data["output"]["run_name"] = run_name
        return config_from_data(data, "tiny.yaml")

    return make
