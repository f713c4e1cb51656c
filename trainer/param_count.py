"""Parameter counts of a config's model on the meta device (nothing allocated).

Counts what a run of the config builds: the frozen Phase 1 (per encoder and the aligner,
for the demo bundle, Hugging Face encoders and a factory that offers a meta-device twin
as `build.meta`), the projector, the LoRA adapters and the LLM (the demo's from its
config, or `model.llm_path`'s config). `python -m trainer CONFIG --count-params` prints
them in a few seconds on CPU (configs/reference.yaml's table is in its header).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.model import Projector, add_lora


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _hf_meta(cfg: TrainConfig) -> nn.Module:
    """Route 1's Phase 1 built from the encoder dirs' configs on the meta device."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

    from trainer.phase1.hf import HFPhase1, read_aligner

    p1, parts = cfg.phase1, {}
    for name in ("image", "audio", "text"):
        enc = getattr(p1, name)
        if enc is None:
            continue
        config = AutoConfig.from_pretrained(str(enc.path), local_files_only=True)
        # Only the audio extractor is read (its sampling rate); a meta module encodes nothing.
        proc = (AutoFeatureExtractor.from_pretrained(str(enc.path), local_files_only=True)
                if name == "audio" else None)
        with torch.device("meta"):
            parts[name] = (AutoModel.from_config(config), proc)
    with torch.device("meta"):
        aligner = {k: v.to("meta") for k, v in read_aligner(p1.aligner_path).items()}
        return HFPhase1(p1, parts, aligner)


def phase1_counts(cfg: TrainConfig) -> tuple[dict[str, int], int]:
    """Per-part counts of the frozen Phase 1 and its aligned width.

    Parts: `<modality>_encoder` and `aligner` where the Phase 1 has them (bundle, hf, a
    factory returning HFPhase1), else one `phase1` count; a features file has none.
    """
    p1 = cfg.phase1
    if p1.source == "features":
        from trainer.phase1.features_file import read_features_file

        return {}, int(read_features_file(p1.features_path).features.shape[-1])
    if p1.source == "bundle":
        from trainer.bundle import Phase1Bundle, read_spec

        spec = read_spec(p1.bundle_path) if p1.bundle_path is not None else cfg.demo.bundle
        with torch.device("meta"):
            bundle = Phase1Bundle(spec)
        return {"image_encoder": _n(bundle.image_encoder),
                "audio_encoder": _n(bundle.audio_encoder),
                "text_encoder": _n(bundle.text_encoder),
                "aligner": _n(bundle.aligner)}, spec.align_dim
    if p1.source == "hf":
        module = _hf_meta(cfg)
    else:  # factory: its meta twin when it offers one, else the module itself, built
        from trainer.inputs import phase1_source
        from trainer.phase1.source import import_factory

        meta = getattr(import_factory(p1.factory), "meta", None)
        module = meta(**p1.kwargs) if meta is not None else phase1_source(cfg).build()
    encoders, heads = getattr(module, "encoders", None), getattr(module, "heads", None)
    if isinstance(encoders, nn.ModuleDict) and isinstance(heads, nn.ModuleDict):
        counts = {f"{name}_encoder": _n(enc) for name, enc in encoders.items()}
        return counts | {"aligner": _n(heads)}, int(module.align_dim)
    return {"phase1": _n(module)}, int(module.align_dim)


def _meta_llm(cfg: TrainConfig) -> nn.Module:
    if cfg.model.llm_path is not None:
        from trainer.llm import meta_llm

        return meta_llm(cfg.model.llm_path)
    from transformers import AutoModelForCausalLM

    from trainer.demo_assets import demo_llm_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            demo_llm_config(cfg.demo.llm.model_dump(mode="json")))


def count_parameters(cfg: TrainConfig) -> dict[str, int]:
    """Counts per component of the model `cfg` builds (see the module doc)."""
    counts: dict[str, Any]
    counts, align_dim = phase1_counts(cfg)
    llm = _meta_llm(cfg)
    llm_params = _n(llm)
    hidden = llm.get_input_embeddings().embedding_dim
    lora = cfg.model.lora
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's advisory warnings say nothing new here
        peft_llm = add_lora(llm, lora.r, lora.alpha, lora.dropout, lora.target_modules)
        projector = Projector(align_dim, hidden, cfg.model.projector.hidden_dim or 4 * hidden)
    counts["encoders"] = sum(v for k, v in counts.items() if k.endswith("_encoder"))
    counts.setdefault("aligner", 0)
    counts |= {"projector": _n(projector), "lora": _n(peft_llm) - llm_params, "llm": llm_params}
    counts["trainable"] = counts["projector"] + counts["lora"]
    counts["total"] = (counts["encoders"] + counts["aligner"] + counts.get("phase1", 0)
                       + counts["trainable"] + llm_params)
    return counts


def format_counts(counts: dict[str, int]) -> str:
    total = counts["total"]
    rows = [f"{k:>14}: {v / 1e6:9.2f}M" for k, v in counts.items()]
    rows.append(f"{'trainable %':>14}: {100 * counts['trainable'] / total:9.2f}%")
    return "\n".join(rows)
