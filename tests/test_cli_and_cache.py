"""The trainer CLI, the frozen-feature cache and the reference-scale counts."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, tiny_data

from trainer.bundle import load_bundle
from trainer.config import config_from_data, load_config
from trainer.data import read_manifest
from trainer.feature_cache import cache_key, cached_features, read_features
from trainer.inputs import phase1_source, prepare_inputs
from trainer.loop import train
from trainer.metrics import MemorySink
from trainer.yaml_io import dump_yaml

pytestmark = pytest.mark.integration


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_runs_a_seed_only_block_file(tmp_path, assets_dir):
    data = tiny_data(tmp_path / "runs", assets_dir, epochs=1)
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(data))
    res = _cli(str(path), "--set", "output.run_name=cli", "--set", "output.log_every=3",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "[optim] projector:" in res.stdout and "step 3/9 loss" in res.stdout
    assert "done: completed (completed) after 9/9 steps" in res.stdout
    assert (tmp_path / "runs" / "cli" / "metrics.jsonl").is_file()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("phase2:\n  learning_rat: 1e-4\n", "phase2.learning_rat: unknown key (did you mean"),
        ("phase2:\n  learning_rate: 1e-4\n  learning_rate: 2e-4\n", "duplicate key"),
        ("phase2: [\n", "invalid YAML"),
        ("phase2:\n  learning_rate: -1\n", "phase2.learning_rate"),
    ],
)
def test_cli_bad_config_exits_2_with_one_line(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    res = _cli(str(path), cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_cli_print_config_shows_resolved_lrs(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text("learning_rate: 0.00005\ngradient_clip_val: 0.5\n")
    res = _cli(str(path), "--print-config", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "projector_lr: 0.00025" in res.stdout and "lora_lr: 2.5e-05" in res.stdout


def test_cli_refuses_to_overwrite_a_run(tmp_path, assets_dir):
    data = tiny_data(tmp_path / "runs", assets_dir, epochs=1)
    data["output"]["run_name"] = "same"
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(data))
    assert _cli(str(path), cwd=tmp_path).returncode == 0
    before = (tmp_path / "runs" / "same" / "metrics.jsonl").read_bytes()
    res = _cli(str(path), cwd=tmp_path)
    assert res.returncode == 2 and "already exists" in res.stderr
    assert (tmp_path / "runs" / "same" / "metrics.jsonl").read_bytes() == before


def test_feature_cache_matches_running_the_encoders(tiny):
    cached = tiny(run_name="cached", epochs=1)
    live = tiny(run_name="live", epochs=1)
    live.data.feature_cache = False
    a, b = MemorySink(), MemorySink()
    train(cached, a, console=False, log=lambda *_: None)
    train(live, b, console=False, log=lambda *_: None)
    for ra, rb in zip(a.records, b.records, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)


def test_cache_is_keyed_by_content(tmp_path, assets_dir):
    cfg = config_from_data(tiny_data(tmp_path / "runs", assets_dir))
    inputs = prepare_inputs(cfg, log=lambda *_: None)
    source = phase1_source(cfg)
    examples = read_manifest(inputs.manifest)
    key = cache_key(source, examples)
    copy = tmp_path / "img.png"
    copy.write_bytes(examples[0].image.read_bytes())
    changed = [examples[0].__class__(examples[0].id, copy, examples[0].audio,
                                     examples[0].prompt, examples[0].target), *examples[1:]]
    assert cache_key(source, changed) == key  # same bytes, same key
    copy.write_bytes(copy.read_bytes() + b"\0")
    assert cache_key(source, changed) != key  # edited input, new cache
    no_audio = [examples[0].__class__(examples[0].id, examples[0].image, None,
                                      examples[0].prompt, examples[0].target), *examples[1:]]
    assert cache_key(source, no_audio) != key  # a dropped modality, new cache


def _build(args):
    cache_dir, runs, assets, manifest = args
    cfg = config_from_data(tiny_data(Path(runs), Path(assets)))
    return str(cached_features(Path(cache_dir), phase1_source(cfg),
                               read_manifest(Path(manifest)), log=lambda *_: None))


def test_concurrent_cache_builds_agree(tmp_path, assets_dir):
    inputs = prepare_inputs(config_from_data(tiny_data(tmp_path / "r", assets_dir)),
                            log=lambda *_: None)
    job = (str(tmp_path / "cache"), str(tmp_path / "r"), str(assets_dir), str(inputs.manifest))
    # spawn, not fork: forking a process that already ran torch threads can deadlock
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = list(pool.map(_build, [job, job]))
    assert paths[0] == paths[1]
    examples = read_manifest(inputs.manifest)
    data = read_features(Path(paths[0]), examples)
    bundle = load_bundle(inputs.bundle_dir)
    assert data.features.shape == (len(examples), bundle.num_tokens, bundle.align_dim)
    assert bool(data.mask.all())  # every demo example has every modality
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(paths[0]).name]  # no temps


def test_reference_config_counts_its_real_architectures():
    """configs/reference.yaml counts the public checkpoints' shapes, each against the
    transformers module built from its config, and the seed's trainable parts."""
    import torch
    import transformers as tf

    from trainer.param_count import count_parameters

    c = count_parameters(load_config(ROOT / "configs" / "reference.yaml"))
    with torch.device("meta"):
        clip = tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=768, num_hidden_layers=12,
                                                      num_attention_heads=12,
                                                      intermediate_size=3072,
                                                      image_size=224, patch_size=16))
        whisper = tf.WhisperModel(tf.WhisperConfig(
            d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
            decoder_attention_heads=8)).get_encoder()
        bert = tf.BertModel(tf.BertConfig())  # BERT-base: the config's defaults
    want = {"image_encoder": clip, "audio_encoder": whisper, "text_encoder": bert}
    for key, module in want.items():
        assert c[key] == sum(p.numel() for p in module.parameters()), key
    assert abs(c["image_encoder"] - 85.8e6) < 0.1e6  # CLIP ViT-B/16's vision tower
    assert abs(c["audio_encoder"] - 20.6e6) < 0.1e6  # Whisper-base's encoder
    assert abs(c["text_encoder"] - 109.5e6) < 0.1e6  # BERT-base (its pooler unused)
    assert c["aligner"] == (768 + 512 + 768) * 1024 + 3 * 3 * 1024  # 3 Linear + LayerNorm
    seed = {"projector": 8.4e6, "lora": 2.2e6, "llm": 494e6}
    for key, want_n in seed.items():
        assert abs(c[key] - want_n) / want_n < 0.05, (key, c[key])
    assert c["total"] == c["encoders"] + c["aligner"] + c["trainable"] + c["llm"]


