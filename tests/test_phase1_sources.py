"""The Phase 1 routes end to end on CPU: Hugging Face encoders, a factory, precomputed
features (and the export command between them); variable-length prefixes through the
LLM; validation before anything trains; the verified frozen-feature cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_data
from phase1_parts import ALIGN_DIM, hf_parts, hf_phase1, mixed_manifest
from transformers import AutoTokenizer

from trainer.config import config_from_data
from trainer.data import read_manifest
from trainer.errors import ConfigError
from trainer.feature_cache import cache_key
from trainer.inputs import load_splits, phase1_source, prepare_inputs
from trainer.loop import train
from trainer.metrics import MemorySink
from trainer.phase1.contract import RawBatch
from trainer.phase1.features_file import (
    AlignedFeatures,
    FeaturesFileError,
    read_features_file,
    write_features,
)
from trainer.phase1.random_parts import AUDIO_KINDS, build_aligner, build_audio_encoder
from trainer.yaml_io import dump_yaml

TESTS = Path(__file__).resolve().parent
QUIET = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def world(tmp_path_factory, assets_dir):
    """Tiny HF parts and a mixed-media manifest (any size, mode, rate, width; rows
    lacking an image or an audio clip)."""
    root = tmp_path_factory.mktemp("phase1")
    demo = prepare_inputs(config_from_data(tiny_data(root / "runs", assets_dir)), **QUIET)
    return {"parts": hf_parts(root / "parts"),
            "manifest": mixed_manifest(demo.manifest, root / "data"), "root": root}


def _cfg(tmp_path: Path, assets: Path, world: dict, phase1: dict, run: str = "run", **data):
    raw = tiny_data(tmp_path / "runs", assets, total_training_steps=6)
    raw["phase1"] = phase1
    raw["data"].update({"manifest": str(world["manifest"]), **data})
    raw["output"]["run_name"] = run
    return raw


def _train(raw: dict) -> MemorySink:
    sink = MemorySink()
    summary = train(config_from_data(raw, "t.yaml"), sink, console=False, log=lambda *_: None)
    assert summary.status == "completed"
    return sink


def _losses(sink: MemorySink) -> list[float]:
    return [r["loss"] for r in sink.records if "loss" in r]


def test_hf_route_trains_on_mixed_media_with_variable_prefixes(tmp_path, assets_dir, world):
    raw = _cfg(tmp_path, assets_dir, world, hf_phase1(world["parts"]))
    cfg = config_from_data(raw)
    logs: list[str] = []
    inputs = prepare_inputs(cfg, log=logs.append)
    assert any("encoding 24 examples with the frozen Phase 1 (hf)" in m for m in logs)
    data = read_features_file(inputs.feature_cache)
    real = data.mask.sum(1)
    examples = read_manifest(world["manifest"])
    # Image: 4 pooled tokens; Whisper: the frames of the clip only, 10 per token; text: 1.
    image_only = [i for i, e in enumerate(examples) if e.audio is None]
    audio_only = [i for i, e in enumerate(examples) if e.image is None]
    assert set(real[image_only].tolist()) == {4 + 1}
    assert all(2 <= n - 1 <= 3 for n in real[audio_only].tolist())
    assert len(set(real.tolist())) > 1  # prefixes of different lengths
    losses = _losses(_train(raw))
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    again: list[str] = []
    prepare_inputs(cfg, log=again.append)  # the cache is reused, not rebuilt
    assert not any("encoding" in m for m in again)


def test_hf_route_checks_the_aligner_before_anything_runs(tmp_path, assets_dir, world):
    from trainer.phase1.random_parts import build_aligner

    wrong = build_aligner(tmp_path / "wrong.safetensors", {"image": 48, "audio": 32,
                                                           "text": 32}, ALIGN_DIM)
    p1 = hf_phase1(world["parts"]) | {"aligner_path": str(wrong)}
    with pytest.raises(ConfigError) as e:
        prepare_inputs(config_from_data(_cfg(tmp_path, assets_dir, world, p1)), **QUIET)
    [line] = e.value.lines()
    assert "image.0.weight is (16, 48)" in line and "width is 32" in line
    assert not (tmp_path / "runs" / "run").exists()


# Clip lengths at 16 kHz: under one 25 ms fbank window, 0.25 s, 1 s, and 3 s (over the
# tiny AST's 1.28 s of fbank frames).
CLIP_SAMPLES = (300, 4000, 16000, 48000)


def _wav2vec2_frames(n: int) -> int:
    for kernel, stride in ((10, 5), (3, 2)):  # the tiny wav2vec2's feature-encoder convs
        n = (n - kernel) // stride + 1
    return n


# The documented prefix-token rule of each audio encoder (docs/own-model.md), per clip.
EXPECTED_TOKENS = {
    "whisper": lambda n: -(-n // 320),  # 50 frames per second of clip, not the 30 s padding
    "wav2vec2": _wav2vec2_frames,  # every frame of the clip alone
    # AST: the time columns (stride 8 fbank frames, 15 in all) that start inside the clip
    "ast": lambda n: min(15, -(-(1 + max(0, n - 400) // 160) // 8)),
}


@pytest.fixture(scope="module")
def audio_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audio")
    dirs = {kind: build_audio_encoder(root / kind, kind) for kind in AUDIO_KINDS}
    dirs["aligner"] = build_aligner(root / "aligner.safetensors", {"audio": 32, "text": 32},
                                    ALIGN_DIM)
    return dirs


@pytest.mark.parametrize("kind", AUDIO_KINDS)
def test_each_audio_encoder_gives_the_documented_tokens(audio_dirs, kind):
    from trainer.config import Phase1 as Phase1Config
    from trainer.phase1.hf import HFPhase1

    assert set(EXPECTED_TOKENS) == set(AUDIO_KINDS)  # a new encoder kind states its rule
    cfg = Phase1Config(source="hf", audio={"path": audio_dirs[kind]},
                       aligner_path=audio_dirs["aligner"])
    p1 = HFPhase1(cfg).eval()
    assert p1.sample_rate == 16000  # read from the encoder's own feature extractor
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in CLIP_SAMPLES]
    with torch.no_grad():
        feats, mask = p1(RawBatch([str(n) for n in CLIP_SAMPLES], [None] * len(clips), clips,
                                  [""] * len(clips)))
    assert mask.sum(1).tolist() == [EXPECTED_TOKENS[kind](n) for n in CLIP_SAMPLES]
    assert feats.shape[-1] == ALIGN_DIM and torch.isfinite(feats[mask]).all()
    if kind == "ast":  # each token is one time column of the patch grid, averaged over
        enc = p1.encoders["audio"]  # frequency; [CLS] and distillation tokens dropped
        inputs = p1.processors["audio"](clips[1], sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            patches = enc(**inputs).last_hidden_state[0, 2:]
            grid = patches.reshape(2, 15, -1)  # frequency-major, as the patch conv flattens
            want = p1.heads["audio"](grid[:, :3].mean(0))
        torch.testing.assert_close(feats[1, :3], want)


def test_hf_route_trains_with_an_ast_audio_encoder(tmp_path, assets_dir, world, audio_dirs):
    p1 = {"source": "hf", "audio": {"path": str(audio_dirs["ast"])},
          "text": {"path": str(world["parts"]["text"])},
          "aligner_path": str(audio_dirs["aligner"])}
    raw = _cfg(tmp_path, assets_dir, world, p1)
    inputs = prepare_inputs(config_from_data(raw), **QUIET)
    real = read_features_file(inputs.feature_cache).mask.sum(1)
    examples = read_manifest(world["manifest"])
    # 0.25 s clips: 23 fbank frames -> 3 time columns; + 1 text token; no audio: text only.
    assert [int(n) for n in real] == [4 if e.audio is not None else 1 for e in examples]
    losses = _losses(_train(raw))
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def _real_counts(module) -> dict[str, int]:
    counts = {f"{n}_encoder": sum(p.numel() for p in e.parameters())
              for n, e in module.encoders.items()}
    return counts | {"aligner": sum(p.numel() for p in module.heads.parameters())}


def test_param_count_of_hf_encoders_is_the_loaded_modules(tmp_path, assets_dir, world):
    from trainer.param_count import count_parameters

    cfg = config_from_data(_cfg(tmp_path, assets_dir, world, hf_phase1(world["parts"])))
    real = phase1_source(cfg).build()  # loaded from the dirs, as a run loads them
    counted = count_parameters(cfg)  # from their configs, on the meta device
    assert {k: counted[k] for k in _real_counts(real)} == _real_counts(real)
    assert counted["encoders"] == sum(v for k, v in _real_counts(real).items()
                                      if k.endswith("_encoder"))


def test_reference_factory_writes_its_parts_once_and_encodes(tmp_path, assets_dir, world):
    """configs/reference.yaml's Phase 1 at its tiny scale: written on first use, reused
    after, counted exactly by its meta twin, encoded by route 1's rules."""
    from trainer.param_count import count_parameters
    from trainer.phase1.random_parts import reference_phase1

    kwargs = {"directory": str(tmp_path / "parts"), "scale": "tiny", "align_dim": ALIGN_DIM}
    p1 = {"source": "factory", "factory": "trainer.phase1.random_parts:reference_phase1",
          "kwargs": kwargs}
    cfg = config_from_data(_cfg(tmp_path, assets_dir, world, p1))
    counted = count_parameters(cfg)
    assert not (tmp_path / "parts").exists()  # counting writes nothing
    inputs = prepare_inputs(cfg, **QUIET)
    [parts] = (tmp_path / "parts").iterdir()
    assert sorted(p.name for p in parts.iterdir()) == [".complete", "aligner.safetensors",
                                                        "audio", "image", "text"]
    module = reference_phase1(**kwargs)
    assert {k: counted[k] for k in _real_counts(module)} == _real_counts(module)
    assert [p.name for p in (tmp_path / "parts").iterdir()] == [parts.name]  # reused
    real = read_features_file(inputs.feature_cache).mask.sum(1)
    examples = read_manifest(world["manifest"])
    # CLIP at 32 px, 8 px patches: 16 + [CLS]; Whisper: 0.25 s = 13 frames; BERT mean: 1.
    for n, e in zip(real.tolist(), examples, strict=True):
        assert n == (17 if e.image else 0) + (13 if e.audio else 0) + 1, (e.id, n)


def test_factory_route_is_frozen_asserted_and_cached(tmp_path, assets_dir, world):
    p1 = {"source": "factory", "factory": "phase1_parts:build", "kwargs": {"tokens": 2}}
    raw = _cfg(tmp_path, assets_dir, world, p1)
    cfg = config_from_data(raw)
    module = phase1_source(cfg).build()
    assert not any(p.requires_grad for p in module.parameters()) and not module.training
    inputs = prepare_inputs(cfg, **QUIET)
    key = cache_key(phase1_source(cfg), read_manifest(world["manifest"]))
    assert inputs.feature_cache.name == f"features-{key}.safetensors"
    other = config_from_data(_cfg(tmp_path, assets_dir, world, p1 | {"kwargs": {"seed": 1}}))
    assert cache_key(phase1_source(other), read_manifest(world["manifest"])) != key  # weights
    assert len(_losses(_train(raw))) == 6


@pytest.mark.parametrize(("factory", "needle"), [
    ("no_such_pkg.mod:build", "cannot import no_such_pkg.mod"),
    ("phase1_parts:nothing", "phase1_parts has no callable nothing"),
    ("phase1_parts:hf_parts", "hf_parts() missing 1 required positional argument"),
])
def test_factory_errors_are_one_line(tmp_path, assets_dir, world, factory, needle):
    p1 = {"source": "factory", "factory": factory}
    with pytest.raises(ConfigError) as e:
        prepare_inputs(config_from_data(_cfg(tmp_path, assets_dir, world, p1)), **QUIET)
    [line] = e.value.lines()
    assert needle in line and "phase1" in line


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{TESTS}"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_export_then_train_on_precomputed_features(tmp_path, assets_dir, world):
    raw = _cfg(tmp_path, assets_dir, world, hf_phase1(world["parts"]))
    config = tmp_path / "hf.yaml"
    config.write_text(dump_yaml(raw))
    out = tmp_path / "feats.safetensors"
    res = _cli("trainer.phase1", "export", str(config), str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    exported = read_features_file(out)
    cache = read_features_file(prepare_inputs(config_from_data(raw), **QUIET).feature_cache)
    assert exported.ids == cache.ids and torch.equal(exported.features, cache.features)
    res = _cli("trainer.phase1", "export", str(config), str(out), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "exists" in res.stderr and "Traceback" not in res.stderr

    p1 = {"source": "features", "features_path": str(out)}
    from_file = _losses(_train(_cfg(tmp_path, assets_dir, world, p1, run="features")))
    from_hf = _losses(_train(_cfg(tmp_path, assets_dir, world, hf_phase1(world["parts"]),
                                  run="hf")))
    assert from_file == pytest.approx(from_hf, rel=1e-6)  # the same features, the same run


def test_a_user_written_features_file_trains_and_is_validated(tmp_path, assets_dir, world):
    ids = [e.id for e in read_manifest(world["manifest"])]
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(ids), 7, 8, generator=g)
    mask = torch.arange(7)[None, :] < torch.randint(1, 8, (len(ids), 1), generator=g)
    path = tmp_path / "mine.safetensors"
    write_features(path, AlignedFeatures(ids, feats, mask))
    p1 = {"source": "features", "features_path": str(path)}
    assert len(_losses(_train(_cfg(tmp_path, assets_dir, world, p1)))) == 6

    short = tmp_path / "short.safetensors"
    write_features(short, AlignedFeatures(ids[1:], feats[1:], mask[1:]))
    with pytest.raises(ConfigError) as e:
        prepare_inputs(config_from_data(_cfg(tmp_path, assets_dir, world,
                                             p1 | {"features_path": str(short)})), **QUIET)
    [line] = e.value.lines()
    assert f"no features for 1 manifest id(s), e.g. {ids[0]!r}" in line and str(short) in line
    with pytest.raises(FeaturesFileError, match="non-finite"):
        write_features(short, AlignedFeatures(ids, feats.masked_fill(mask[..., None],
                                                                     float("inf")), mask))


def test_shorter_prefixes_give_the_rows_own_outputs(assets_dir, tmp_path):
    """A row with a shorter prefix in a batch gives the same hidden states at its text as
    that row alone with no padding at all (so the padding changes nothing)."""
    from trainer.data import prefix_features
    from trainer.model import Projector, final_hidden, load_llm, prefix_embeds, prefix_gaps

    inputs = prepare_inputs(config_from_data(tiny_data(tmp_path, assets_dir)), **QUIET)
    lm = load_llm(inputs.llm_dir).eval()
    torch.manual_seed(0)
    proj = Projector(8, lm.config.hidden_size, 32)
    feats = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0]], dtype=torch.bool)
    ids = torch.randint(3, 50, (2, 6))
    embed = lm.get_input_embeddings()
    with torch.no_grad():
        padded = prefix_features(feats, mask)
        batch = final_hidden(lm, prefix_embeds(proj, embed, padded, ids),
                             prefix_gaps(padded, ids.shape[1]))
        alone = final_hidden(lm, prefix_embeds(proj, embed, feats[1:, [0, 2]], ids[1:]))
        full = final_hidden(lm, prefix_embeds(proj, embed, feats[:1], ids[:1]))
    torch.testing.assert_close(batch[1, 5:], alone[0, 2:], rtol=1e-5, atol=1e-5)
    # A full row is untouched by the other row's gaps: equal up to the batched kernels'
    # rounding (a batch of 2 and a batch of 1 take different matmul paths).
    torch.testing.assert_close(batch[0], full[0], rtol=1e-5, atol=1e-5)
    # A projector gone non-finite is not taken for missing tokens: it reaches the hidden
    # states (and so the loss and the NaN guard) of every row.
    with torch.no_grad():
        proj.net[0].weight.fill_(float("inf"))
        broken = final_hidden(lm, prefix_embeds(proj, embed, padded, ids),
                              prefix_gaps(padded, ids.shape[1]))
    assert not torch.isfinite(broken[0]).any() and not torch.isfinite(broken[1]).any()


def test_group_rows_equal_solo_with_variable_prefixes(assets_dir, tmp_path):
    """A trial group's shared forward gives each member the loss of its solo forward, with
    prefixes of different lengths."""
    from trainer.data import prefix_features
    from trainer.model import Phase2Model, Projector, add_lora, load_llm
    from trainer.rows import Rows, rows_losses

    inputs = prepare_inputs(config_from_data(tiny_data(tmp_path, assets_dir)), **QUIET)
    llm = add_lora(load_llm(inputs.llm_dir), 4, 8.0, 0.0, ["q_proj", "v_proj"]).eval()
    torch.manual_seed(1)
    proj = Projector(8, llm.config.hidden_size, 32).eval()
    feats = prefix_features(torch.randn(3, 4, 8),
                            torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 0, 0]]).bool())
    ids = torch.randint(3, 50, (3, 5))
    labels = ids.clone()
    labels[:, :2] = -100
    solo = Phase2Model(proj, llm)(feats, ids, labels)
    [grouped] = rows_losses(llm, [Rows(proj, "default", feats, ids, labels)])
    torch.testing.assert_close(grouped, solo, rtol=0, atol=0)


def _damage(path: Path, how: str) -> None:
    blob = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(blob[: len(blob) // 2]))
    else:  # one bit flipped in the tensor data, same size: loads fine without the digest
        blob[len(blob) // 2] ^= 0x10
        path.write_bytes(bytes(blob))


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, assets_dir, how):
    raw = tiny_data(tmp_path / "runs", assets_dir)
    raw["demo"]["num_examples"] = 16  # a cache of its own (the LLM is the shared one)
    cfg = config_from_data(raw)
    inputs = prepare_inputs(cfg, **QUIET)
    good = read_features_file(inputs.feature_cache)
    _damage(inputs.feature_cache, how)
    with pytest.raises(FeaturesFileError):
        read_features_file(inputs.feature_cache)
    logs: list[str] = []

    tok = AutoTokenizer.from_pretrained(str(inputs.llm_dir))
    train_split, _ = load_splits(cfg, inputs, tok, log=logs.append)  # a trial's side
    assert any("warning" in m and "rebuilding" in m and str(inputs.feature_cache) in m
               for m in logs), logs
    assert torch.equal(read_features_file(inputs.feature_cache).features, good.features)
    assert not torch.isnan(train_split.features).any()  # demo: every token real
    _damage(inputs.feature_cache, how)
    logs.clear()
    prepare_inputs(cfg, log=logs.append)  # the driver's side
    assert any("rebuilding" in m for m in logs)
    assert torch.equal(read_features_file(inputs.feature_cache).features, good.features)
