"""Parameter counts of a config's model on the meta device (nothing allocated).

Lets `configs/reference.yaml` be checked against the seed's table (encoders ~104M,
aligner ~1.7M, projector ~8.4M, LoRA ~2.2M, trainable ~1.79%) in a second on CPU.
"""

from __future__ import annotations

import torch

from trainer.bundle import Phase1Bundle
from trainer.config import TrainConfig
from trainer.model import Projector, add_lora


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(cfg: TrainConfig) -> dict[str, int]:
    """Counts per component for the demo-built model of `cfg`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from trainer.demo_assets import SPECIAL_TOKENS

    spec, llm_spec = cfg.demo.bundle, cfg.demo.llm
    with torch.device("meta"):
        bundle = Phase1Bundle(spec)
        llm = AutoModelForCausalLM.from_config(Qwen2Config(
            vocab_size=llm_spec.vocab_size or len(SPECIAL_TOKENS) + 95,
            hidden_size=llm_spec.hidden_size, num_hidden_layers=llm_spec.num_hidden_layers,
            num_attention_heads=llm_spec.num_attention_heads,
            num_key_value_heads=llm_spec.num_key_value_heads,
            intermediate_size=llm_spec.intermediate_size,
            tie_word_embeddings=llm_spec.tie_word_embeddings))
        llm_params = _n(llm)
        lora = cfg.model.lora
        peft_llm = add_lora(llm, lora.r, lora.alpha, lora.dropout, lora.target_modules)
        hidden = llm_spec.hidden_size
        projector = Projector(spec.align_dim, hidden, cfg.model.projector.hidden_dim or 4 * hidden)
    counts = {
        "image_encoder": _n(bundle.image_encoder), "audio_encoder": _n(bundle.audio_encoder),
        "text_encoder": _n(bundle.text_encoder), "aligner": _n(bundle.aligner),
        "projector": _n(projector), "lora": _n(peft_llm) - llm_params, "llm": llm_params,
    }
    counts["encoders"] = counts["image_encoder"] + counts["audio_encoder"] + counts["text_encoder"]
    counts["trainable"] = counts["projector"] + counts["lora"]
    counts["total"] = counts["encoders"] + counts["aligner"] + counts["trainable"] + llm_params
    return counts


def format_counts(counts: dict[str, int]) -> str:
    total = counts["total"]
    rows = [f"{k:>14}: {v / 1e6:9.2f}M" for k, v in counts.items()]
    rows.append(f"{'trainable %':>14}: {100 * counts['trainable'] / total:9.2f}%")
    return "\n".join(rows)
