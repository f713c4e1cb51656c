"""Shared inputs of a run (or of every trial of a sweep), prepared once.

`prepare_inputs` resolves the Phase 1 bundle, the LLM directory, the manifests
and the frozen-feature cache, generating the demo assets on first use. It
returns paths only (cheap to pass to Ray trials); `load_splits` turns them into
in-memory train/eval splits inside a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.bundle import build_demo_bundle, read_spec
from trainer.config import DemoBundle, TrainConfig
from trainer.data import Split, load_media, read_manifest, split_eval, tokenize
from trainer.demo_assets import build_demo_dataset, build_demo_llm, spec_hash
from trainer.feature_cache import cached_features, read_features
from trainer.fsutil import build_once

EVAL_SPLIT_SEED = 0  # fixed, not the trial seed: every trial of a sweep evals the same rows


@dataclass(frozen=True)
class Inputs:
    bundle_dir: Path
    llm_dir: Path
    manifest: Path
    eval_manifest: Path | None
    feature_cache: Path | None  # features of `manifest`, in manifest order
    eval_feature_cache: Path | None  # features of `eval_manifest`


def _demo_bundle(cfg: TrainConfig) -> Path:
    spec = cfg.demo.bundle
    target = cfg.assets_dir / f"bundle-{spec_hash(spec.model_dump(mode='json'))}"
    return build_once(target, lambda d: build_demo_bundle(spec, d))


def _demo_llm(cfg: TrainConfig) -> Path:
    spec = cfg.demo.llm.model_dump(mode="json")
    return build_once(cfg.assets_dir / f"llm-{spec_hash(spec)}", lambda d: build_demo_llm(spec, d))


def _demo_data(cfg: TrainConfig, spec: DemoBundle) -> Path:
    args = dict(num_examples=cfg.demo.num_examples, image_size=spec.image_size,
                sample_rate=spec.sample_rate, audio_samples=spec.audio_samples,
                seed=cfg.demo.data_seed)
    target = cfg.assets_dir / f"data-{spec_hash(args)}"
    return build_once(target, lambda d: build_demo_dataset(d, **args)) / "manifest.jsonl"


def prepare_inputs(cfg: TrainConfig, log=print, device: str = "cpu") -> Inputs:
    """Resolve (and on first use build) everything a run reads. Idempotent.

    `device` runs the frozen encoders for the feature cache (a GPU makes it fast).
    """
    bundle_dir = cfg.phase1.bundle_path or _demo_bundle(cfg)
    llm_dir = cfg.model.llm_path or _demo_llm(cfg)
    spec = read_spec(bundle_dir)
    manifest = cfg.data.manifest or _demo_data(cfg, spec)
    cache = eval_cache = None
    if cfg.data.feature_cache:
        cache_dir = cfg.assets_dir / "features"
        cache = cached_features(cache_dir, bundle_dir, read_manifest(manifest), device, log)
        if cfg.data.eval_manifest:
            eval_cache = cached_features(cache_dir, bundle_dir,
                                         read_manifest(cfg.data.eval_manifest), device, log)
    return Inputs(bundle_dir, llm_dir, manifest, cfg.data.eval_manifest, cache, eval_cache)


def _split(examples, rows, cache: Path | None, all_examples, spec, tok, cfg) -> Split:
    tokens = tokenize(examples, tok, cfg.data.max_prompt_tokens, cfg.data.max_target_tokens)
    split = Split([e.id for e in examples], tokens, num_tokens=int(tokens.attention_mask.sum()))
    if cache is not None:
        split.features = read_features(cache, all_examples)[rows]
    else:
        split.media = load_media(examples, spec)
    return split


def load_splits(cfg: TrainConfig, inputs: Inputs, tokenizer) -> tuple[Split, Split | None]:
    """Train and eval splits in memory (features from the cache, or raw media)."""
    spec = read_spec(inputs.bundle_dir)
    examples = read_manifest(inputs.manifest)
    if inputs.eval_manifest:
        train_ex, eval_ex = examples, read_manifest(inputs.eval_manifest)
        eval_source, eval_cache = eval_ex, inputs.eval_feature_cache
    else:
        train_ex, eval_ex = split_eval(examples, cfg.data.eval_fraction, EVAL_SPLIT_SEED)
        eval_source, eval_cache = examples, inputs.feature_cache

    def rows(subset, source) -> list[int]:  # cache rows are in manifest order
        pos = {e.id: i for i, e in enumerate(source)}
        return [pos[e.id] for e in subset]

    train = _split(train_ex, rows(train_ex, examples), inputs.feature_cache, examples, spec,
                   tokenizer, cfg)
    if not eval_ex:
        return train, None
    return train, _split(eval_ex, rows(eval_ex, eval_source), eval_cache, eval_source, spec,
                         tokenizer, cfg)


def train_size(cfg: TrainConfig) -> int:
    """Training examples a run will see, computed without building anything."""
    if cfg.data.manifest is None:
        n = cfg.demo.num_examples
    else:
        n = len(read_manifest(cfg.data.manifest))
    if cfg.data.eval_manifest is not None or cfg.data.eval_fraction <= 0 or n < 2:
        return n
    return n - max(1, round(n * cfg.data.eval_fraction))
