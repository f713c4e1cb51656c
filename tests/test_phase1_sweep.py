"""A sweep over a Phase 1 of Hugging Face encoders (CLIP + Whisper + BERT + an aligner)
through the real CLI: the frozen features are encoded once, by the driver, and every trial
trains on that one cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_data
from phase1_parts import hf_parts, hf_phase1, mixed_manifest
from test_sweep import _sweep, _write

from trainer.config import config_from_data
from trainer.inputs import prepare_inputs
from trainer.yaml_io import dump_yaml, load_yaml_file

pytestmark = pytest.mark.slow


def test_hf_phase1_sweep_shares_one_feature_cache(tmp_path: Path, assets_dir: Path) -> None:
    demo = prepare_inputs(config_from_data(tiny_data(tmp_path / "demo", assets_dir)),
                          log=lambda *_: None)
    manifest = mixed_manifest(demo.manifest, tmp_path / "data")
    phase1 = hf_phase1(hf_parts(tmp_path / "parts"))
    assets = tmp_path / "assets"
    overrides = {
        "phase1.source": phase1["source"], "phase1.image": phase1["image"],
        "phase1.audio": phase1["audio"], "phase1.text": phase1["text"],
        "phase1.aligner_path": phase1["aligner_path"], "data.manifest": str(manifest),
        "data.feature_cache": True, "output.assets_dir": str(assets),
        # the demo LLM comes from the session's assets: only the Phase 1 is the user's
        "model.llm_path": str(demo.llm_dir)}
    path = _write(tmp_path)
    data = load_yaml_file(path)
    data["base"]["overrides"].update(overrides)
    path.write_text(dump_yaml(data))
    res = _sweep(path, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]

    # One encoding pass over the manifest, in the driver; the trials only read the cache.
    assert out.count("[feature-cache] encoding") == 1, out[-3000:]
    caches = sorted((assets / "features").glob("*.safetensors"))
    assert len(caches) == 1
    runs = sorted((tmp_path / "sweeps" / "smoke" / "trials").glob("*/config.resolved.yaml"))
    assert len(runs) == 2
    for resolved in runs:
        cfg = load_yaml_file(resolved)
        assert cfg["phase1"]["source"] == "hf"
        assert cfg["phase1"]["image"]["path"] == phase1["image"]["path"]
        assert cfg["data"]["manifest"] == str(manifest)
        steps = (resolved.parent / "metrics.jsonl").read_text().count('"loss"')
        assert steps >= 12
