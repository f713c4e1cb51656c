"""The Phase 2 model: projector (trained) + LLM with LoRA adapters (peft).

The frozen encoders and aligner are not part of this module: they either ran
once into the feature cache, or run beside it (`Phase1Bundle`) under no_grad.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.data import IGNORE_INDEX


class Projector(nn.Module):
    """Aligned feature tokens -> LLM embedding space (one prefix token each).

    A 2-layer MLP (LLaVA-1.5 style), trained from scratch in Phase 2.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_llm(path: Path, attn_implementation: str = "sdpa", device: str = "cpu") -> nn.Module:
    """A causal LM from a local directory (never the hub), fp32 master weights."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, attn_implementation=attn_implementation,
        dtype=torch.float32,
    ).to(device)


def add_lora(llm: nn.Module, r: int, alpha: float, dropout: float,
             target_modules: list[str]) -> nn.Module:
    """Wrap the LLM with peft LoRA; peft freezes every base weight."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(llm, cfg)


class Phase2Model(nn.Module):
    """Projector + LoRA-wrapped LLM; the loss covers target tokens only."""

    def __init__(self, projector: Projector, llm: nn.Module) -> None:
        super().__init__()
        self.projector = projector
        self.llm = llm

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        prefix = self.projector(features.to(self.projector.net[0].weight.dtype))
        tokens = self.llm.get_input_embeddings()(input_ids)
        embeds = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)
        b, t = features.shape[:2]
        ones = attention_mask.new_ones((b, t))
        ignore = labels.new_full((b, t), IGNORE_INDEX)
        out = self.llm(inputs_embeds=embeds, attention_mask=torch.cat([ones, attention_mask], 1),
                       labels=torch.cat([ignore, labels], 1), use_cache=False)
        return out.loss


def build_model(llm_path: Path, align_dim: int, *, lora_r: int, lora_alpha: float,
                lora_dropout: float, target_modules: list[str], projector_hidden: int | None,
                projector_dropout: float, attn_implementation: str = "sdpa",
                device: str = "cpu", seed: int = 0) -> Phase2Model:
    """LLM from disk + LoRA + a freshly initialised projector (seeded)."""
    llm = load_llm(llm_path, attn_implementation, device)
    hidden = llm.config.hidden_size
    torch.manual_seed(seed)  # the projector and LoRA init are part of the trial's seed
    llm = add_lora(llm, lora_r, lora_alpha, lora_dropout, target_modules)
    projector = Projector(align_dim, hidden, projector_hidden or 4 * hidden, projector_dropout)
    return Phase2Model(projector.to(device), llm)
