"""A sweep over each way of bringing a Phase 1, through the real CLI: Hugging Face encoders
(CLIP + Whisper + BERT + an aligner), the user's factory, and precomputed features written
by `python -m trainer.phase1 export`. The frozen features are encoded once, by the driver
(none at all for precomputed ones), and every trial trains on that one cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_data
from phase1_parts import hf_parts, hf_phase1, mixed_manifest
from test_sweep import _write

from trainer.config import config_from_data
from trainer.inputs import prepare_inputs
from trainer.yaml_io import dump_yaml, load_yaml_file

pytestmark = pytest.mark.slow


TESTS = Path(__file__).resolve().parent
FACTORY = {"source": "factory", "factory": "phase1_parts:build", "kwargs": {"tokens": 2}}


def _env() -> dict[str, str]:
    # the factory lives beside the tests (phase1_parts.py): the driver and Ray's workers
    # import it by its dotted path, as a user's own package would be
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}


def _export(tmp_path: Path, base: dict) -> Path:
    """Precomputed features of the factory's Phase 1, written by the export command."""
    config = tmp_path / "export.yaml"
    config.write_text(dump_yaml({**base, "phase1": FACTORY}))
    out = tmp_path / "feats.safetensors"
    res = subprocess.run([sys.executable, "-m", "trainer.phase1", "export", str(config),
                          str(out)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.mark.parametrize("route", ["hf", "factory", "features"])
def test_phase1_sweep_shares_one_feature_cache(route: str, tmp_path: Path,
                                               assets_dir: Path) -> None:
    demo_data = tiny_data(tmp_path / "demo", assets_dir)
    demo = prepare_inputs(config_from_data(demo_data), log=lambda *_: None)
    manifest = mixed_manifest(demo.manifest, tmp_path / "data")
    if route == "hf":
        phase1 = hf_phase1(hf_parts(tmp_path / "parts"))
    elif route == "factory":
        phase1 = FACTORY
    else:
        phase1 = {"source": "features", "features_path": str(_export(
            tmp_path, {**demo_data, "data": {**demo_data["data"], "manifest": str(manifest)}}))}
    assets = tmp_path / "assets"
    overrides = {
        **{f"phase1.{k}": v for k, v in phase1.items()}, "data.manifest": str(manifest),
        "data.feature_cache": True, "output.assets_dir": str(assets),
        # the demo LLM comes from the session's assets: only the Phase 1 is the user's
        "model.llm_path": str(demo.llm_dir)}
    path = _write(tmp_path)
    data = load_yaml_file(path)
    data["base"]["overrides"].update(overrides)
    path.write_text(dump_yaml(data))
    res = subprocess.run([sys.executable, "-m", "tuning.sweep", str(path)], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]

    # One encoding pass over the manifest, in the driver; the trials only read the cache
    # (precomputed features are read from the user's file: nothing to encode).
    assert out.count("[feature-cache] encoding") == (route != "features"), out[-3000:]
    runs = sorted((tmp_path / "sweeps" / "smoke" / "trials").glob("*/config.resolved.yaml"))
    assert len(runs) == 2
    for resolved in runs:
        cfg = load_yaml_file(resolved)
        assert cfg["phase1"]["source"] == phase1["source"]
        assert cfg["data"]["manifest"] == str(manifest)
        if route == "hf":
            assert cfg["phase1"]["image"]["path"] == phase1["image"]["path"]
        steps = (resolved.parent / "metrics.jsonl").read_text().count('"loss"')
        assert steps >= 12
    if route != "features":
        assert len(sorted((assets / "features").glob("*.safetensors"))) == 1
