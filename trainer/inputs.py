"""Shared inputs of a run (or of every trial of a sweep), prepared once.

`prepare_inputs` resolves the Phase 1 bundle, the LLM directory, the manifests
and the frozen-feature cache, generating the demo assets on first use. It
returns paths only (cheap to pass to Ray trials); `load_splits` turns them into
in-memory train/eval splits inside a run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from trainer.bundle import build_demo_bundle, read_spec
from trainer.config import DemoBundle, TrainConfig
from trainer.data import (
    Example,
    Split,
    load_media,
    prefix_features,
    read_manifest,
    split_eval,
    tokenize,
)
from trainer.demo_assets import build_demo_dataset, build_demo_llm, spec_hash
from trainer.errors import ConfigError, Problem
from trainer.feature_cache import cached_features, read_features
from trainer.fsutil import build_once, is_built
from trainer.phase1.features_file import AlignedFeatures, FeaturesFileError, read_features_file
from trainer.phase1.source import Phase1Source

EVAL_SPLIT_SEED = 0  # fixed, not the trial seed: every trial of a sweep evals the same rows


@dataclass(frozen=True)
class Inputs:
    bundle_dir: Path | None  # the Phase 1 bundle (source bundle only)
    llm_dir: Path
    manifest: Path
    eval_manifest: Path | None
    feature_cache: Path | None  # features of `manifest` (a features file: every id it has)
    eval_feature_cache: Path | None  # features of `eval_manifest`


def _demo_bundle(cfg: TrainConfig) -> Path:
    spec = cfg.demo.bundle
    target = cfg.assets_dir / f"bundle-{spec_hash(spec.model_dump(mode='json'))}"
    return build_once(target, lambda d: build_demo_bundle(spec, d))


def demo_llm_dir(cfg: TrainConfig) -> Path:
    """Where the demo LLM of `cfg` is (or will be) built; nothing is built here."""
    return cfg.assets_dir / f"llm-{spec_hash(cfg.demo.llm.model_dump(mode='json'))}"


def ready_llm_dir(cfg: TrainConfig) -> Path | None:
    """The LLM directory a run of `cfg` loads, if it is there before `prepare_inputs`: the
    user's `model.llm_path`, or a demo LLM an earlier run built (None: not built yet)."""
    if cfg.model.llm_path is not None:
        return cfg.model.llm_path
    target = demo_llm_dir(cfg)
    return target if is_built(target) else None


def inputs_to_data(inputs: Inputs) -> dict[str, str | None]:
    """`inputs` as JSON-ready data (its paths as strings); `inputs_from_data` reads it."""
    return {k: None if v is None else str(v) for k, v in asdict(inputs).items()}


def inputs_from_data(data: dict[str, str | None]) -> Inputs:
    """The `Inputs` that `inputs_to_data` wrote (KeyError: a field is missing)."""
    return Inputs(**{f.name: None if data[f.name] is None else Path(data[f.name])
                     for f in fields(Inputs)})


def _demo_llm(cfg: TrainConfig) -> Path:
    spec = cfg.demo.llm.model_dump(mode="json")
    return build_once(demo_llm_dir(cfg), lambda d: build_demo_llm(spec, d))


def _demo_data(cfg: TrainConfig, spec: DemoBundle) -> Path:
    args = dict(num_examples=cfg.demo.num_examples, image_size=spec.image_size,
                sample_rate=spec.sample_rate, audio_samples=spec.audio_samples,
                seed=cfg.demo.data_seed)
    target = cfg.assets_dir / f"data-{spec_hash(args)}"
    return build_once(target, lambda d: build_demo_dataset(d, **args)) / "manifest.jsonl"


def phase1_source(cfg: TrainConfig) -> Phase1Source:
    """The configured Phase 1 (building the demo bundle on first use)."""
    bundle_dir = None
    if cfg.phase1.source == "bundle":
        bundle_dir = cfg.phase1.bundle_path or _demo_bundle(cfg)
    return Phase1Source(cfg.phase1, bundle_dir)


def _needs_cache(cfg: TrainConfig) -> None:
    if cfg.phase1.source != "bundle" and not cfg.data.feature_cache:
        raise ConfigError([Problem("config", "data.feature_cache", "is false, but a Phase 1 "
                                   f"of source {cfg.phase1.source} only runs into the cache",
                                   "set data.feature_cache: true")])


def demo_manifest(cfg: TrainConfig, source: Phase1Source) -> Path:
    """The demo dataset's manifest (built on first use), sized for a bundle source."""
    # The demo data follows the bundle's sizes; other sources read any size and rate.
    spec = read_spec(source.bundle_dir) if source.bundle_dir is not None else cfg.demo.bundle
    return _demo_data(cfg, spec)


def prepare_inputs(cfg: TrainConfig, log=print, device: str = "cpu") -> Inputs:
    """Resolve (and on first use build) everything a run reads. Idempotent.

    `device` runs the frozen Phase 1 for the feature cache (a GPU makes it fast). Every
    check of the Phase 1 and the data happens here, before any trial starts.
    """
    _needs_cache(cfg)
    source = phase1_source(cfg)
    llm_dir = cfg.model.llm_path or _demo_llm(cfg)
    manifest = cfg.data.manifest or demo_manifest(cfg, source)
    examples = read_manifest(manifest)
    eval_examples = read_manifest(cfg.data.eval_manifest) if cfg.data.eval_manifest else None
    cache = eval_cache = None
    if cfg.phase1.source == "features":
        cache = eval_cache = cfg.phase1.features_path
        data = _user_features(cfg)
        for ex in (examples, eval_examples or []):
            _rows_for(data, ex, cfg)
    elif cfg.data.feature_cache:
        cache_dir = cfg.assets_dir / "features"
        cache = cached_features(cache_dir, source, examples, device, log)
        if eval_examples:
            eval_cache = cached_features(cache_dir, source, eval_examples, device, log)
    return Inputs(source.bundle_dir, llm_dir, manifest, cfg.data.eval_manifest, cache,
                  eval_cache)


def _user_features(cfg: TrainConfig) -> AlignedFeatures:
    try:
        return read_features_file(cfg.phase1.features_path)
    except FeaturesFileError as e:
        raise ConfigError([Problem("phase1.features_path", "", str(e),
                                   "see docs/own-model.md, 'Precomputed features'")]) from None


def _rows_for(data: AlignedFeatures, examples: list[Example], cfg: TrainConfig
              ) -> AlignedFeatures:
    try:
        return data.rows([e.id for e in examples], cfg.phase1.features_path)
    except FeaturesFileError as e:
        raise ConfigError([Problem("phase1.features_path", "", str(e),
                                   "export the file from this manifest")]) from None


def _features(cfg: TrainConfig, cache: Path, examples: list[Example], log
              ) -> AlignedFeatures:
    """Verified features of `examples` (in order); a damaged cache is rebuilt, with a
    warning line, never trained on."""
    if cfg.phase1.source == "features":
        return _rows_for(_user_features(cfg), examples, cfg)
    try:
        return read_features(cache, examples)
    except FeaturesFileError as e:
        log(f"[feature-cache] warning: {e}; rebuilding it")
    rebuilt = cached_features(cache.parent, phase1_source(cfg), examples, "cpu", log)
    return read_features(rebuilt, examples)


def _split(examples, rows, cache: Path | None, all_examples, spec, tok, cfg, log) -> Split:
    tokens = tokenize(examples, tok, cfg.data.max_prompt_tokens, cfg.data.max_target_tokens)
    split = Split([e.id for e in examples], tokens, num_tokens=int(tokens.attention_mask.sum()))
    if cache is not None:
        data = _features(cfg, cache, all_examples, log)
        split.features = prefix_features(data.features[rows], data.mask[rows])
    else:
        split.media = load_media(examples, spec)
    return split


def load_splits(cfg: TrainConfig, inputs: Inputs, tokenizer,
                log=print) -> tuple[Split, Split | None]:
    """Train and eval splits in memory (features from the cache, or raw media)."""
    spec = read_spec(inputs.bundle_dir) if inputs.bundle_dir is not None else cfg.demo.bundle
    examples = read_manifest(inputs.manifest)
    if inputs.eval_manifest:
        train_ex, eval_ex = examples, read_manifest(inputs.eval_manifest)
        eval_source, eval_cache = eval_ex, inputs.eval_feature_cache
    else:
        train_ex, eval_ex = split_eval(examples, cfg.data.eval_fraction, EVAL_SPLIT_SEED)
        eval_source, eval_cache = examples, inputs.feature_cache

    def rows(subset, source) -> list[int]:  # cache rows are in manifest order (ids unique)
        pos = {e.id: i for i, e in enumerate(source)}
        return [pos[e.id] for e in subset]

    train = _split(train_ex, rows(train_ex, examples), inputs.feature_cache, examples, spec,
                   tokenizer, cfg, log)
    if not eval_ex:
        return train, None
    return train, _split(eval_ex, rows(eval_ex, eval_source), eval_cache, eval_source, spec,
                         tokenizer, cfg, log)


def train_size(cfg: TrainConfig) -> int:
    """Training examples a run will see, computed without building anything."""
    if cfg.data.manifest is None:
        n = cfg.demo.num_examples
    else:
        n = len(read_manifest(cfg.data.manifest))
    if cfg.data.eval_manifest is not None or cfg.data.eval_fraction <= 0 or n < 2:
        return n
    return n - max(1, round(n * cfg.data.eval_fraction))
