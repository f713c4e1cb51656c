"""The Phase 2 model: projector (trained) + LLM with LoRA adapters (peft).

The frozen encoders and aligner are not part of this module: they either ran
once into the feature cache, or run beside it (`Phase1Bundle`) under no_grad.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import IGNORE_INDEX

LOSS_CHUNK_ROWS = 4096  # LM-head rows per chunk of the loss: bounds the fp32 logits' memory


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


def low_precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None for fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def cast_untargeted_linears(lm: nn.Module, target_modules: list[str],
                            dtype: torch.dtype | None) -> int:
    """Store the frozen LLM's Linear weights that no LoRA adapter wraps in `dtype`.

    Exact under autocast to that dtype: autocast rounds an fp32 weight to `dtype` at every
    linear anyway, so the stored copy gives bit-identical outputs and gradients, at half
    the memory and without a cast kernel per weight per step. The LoRA-wrapped base
    layers stay fp32 (peft casts a new adapter to its base layer's dtype, which would
    round the adapters' fp32 init), as do the embedding, the (tied) LM head and the
    norms, which run outside autocast's casting. Returns the number of parameters cast.
    """
    if dtype is None:
        return 0
    if any("lora_" in n for n, _ in lm.named_parameters()):
        raise ValueError("cast_untargeted_linears runs before LoRA is added")
    head = lm.get_output_embeddings()
    cast = 0
    for name, mod in lm.named_modules():
        if (not isinstance(mod, nn.Linear) or mod is head
                or any(name == t or name.endswith("." + t) for t in target_modules)):
            continue
        if mod.weight.dtype != dtype:
            mod.to(dtype)
            cast += sum(p.numel() for p in mod.parameters())
    return cast


def lora_config(r: int, alpha: float, dropout: float, target_modules: list[str]):
    """The one LoraConfig of a Phase 2 run (solo runs and trial-group members alike)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM")


def add_lora(llm: nn.Module, r: int, alpha: float, dropout: float,
             target_modules: list[str]) -> nn.Module:
    """Wrap the LLM with peft LoRA; peft freezes every base weight."""
    from peft import get_peft_model

    return get_peft_model(llm, lora_config(r, alpha, dropout, target_modules))


def causal_lm(llm: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    from peft import PeftModel

    # PeftModel.base_model is the LoraModel tuner; its .model is the CausalLM that peft
    # injected the LoRA layers into (in place). Not get_base_model(): that reads the
    # active adapter, which a trial group leaves unset.
    return llm.base_model.model if isinstance(llm, PeftModel) else llm


def prefix_inputs(projector: Projector, embed: nn.Module, features: torch.Tensor,
                  input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected feature tokens before the text: (embeds, attention mask, labels).

    The prefix is always attended and never a target.
    """
    prefix = projector(features.to(projector.net[0].weight.dtype))
    tokens = embed(input_ids)
    embeds = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)
    b, t = features.shape[:2]
    ones = attention_mask.new_ones((b, t))
    ignore = labels.new_full((b, t), IGNORE_INDEX)
    return embeds, torch.cat([ones, attention_mask], 1), torch.cat([ignore, labels], 1)


def final_hidden(lm: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """Last hidden states of the decoder, without the LM head (`lm` is the CausalLM).

    Rows must be right-padded (trainer.data builds nothing else; a trial group pads its
    rows on the right too). No attention mask is passed, on purpose: under causal
    attention a real position only sees positions before it, which right padding never
    are, so masking the padding changes no real position's output, and padded positions
    carry no target. Without a mask HF takes SDPA's `is_causal` path (flash attention)
    instead of materialising a [B, 1, L, L] mask and falling back to the slower masked
    kernels, also inside a compiled forward, where HF cannot prove a mask is all ones.
    """
    # The decoder body, not the CausalLM forward: that would run the LM head (a quarter of
    # a Qwen model) over every position, prefix and prompt included.
    return lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state


# Eager even inside a torch.compile'd forward: the number of targets is data-dependent,
# and a compiled graph would break (and recompile) on it every batch.
@torch.compiler.disable
def target_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
                chunk_rows: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (labels != IGNORE_INDEX).

    Position i predicts label i + 1 (the usual shift), so only the positions whose *next*
    label is a target go through the LM head, `chunk_rows` at a time with fp32 logits:
    the [tokens, vocab] logits of a whole batch never exist at once. Sum / number of
    targets is HF's mean loss (and NaN, like HF, when a batch has no target).

    `labels` may stay on the CPU (the trainer keeps them there): the target positions
    are then found without a device sync.
    """
    b, length, width = hidden.shape
    keep = labels[:, 1:] != IGNORE_INDEX  # [b, length - 1], on the labels' device
    bi, ti = keep.nonzero(as_tuple=True)
    y = labels[bi, ti + 1].to(hidden.device, non_blocking=True)
    rows = (bi * length + ti).to(hidden.device, non_blocking=True)
    h = hidden.reshape(b * length, width).index_select(0, rows)  # [targets, hidden]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, y.shape[0], chunk_rows):
        logits = lm_head(h[i : i + chunk_rows]).float()
        total = total + F.cross_entropy(logits, y[i : i + chunk_rows], reduction="sum")
    return total / y.shape[0]


def masked_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """The same mean target-token loss with static shapes, for a compiled forward.

    Every position goes through the LM head and non-targets are masked out of the
    cross-entropy (HF's loss): more FLOPs than `target_loss`, but no data-dependent shape,
    so `torch.compile` keeps the whole step in one graph (and CUDA graphs can capture it).
    `labels` must be on the hidden states' device.
    """
    logits = lm_head(hidden[:, :-1]).float()
    target = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum()


class Phase2Model(nn.Module):
    """Projector + LoRA-wrapped LLM; the loss covers target tokens only.

    `static_loss` (set by the trainer when it compiles the forward) picks `masked_loss`
    over `target_loss`: equal values, shapes a compiled graph can keep.
    """

    def __init__(self, projector: Projector, llm: nn.Module) -> None:
        super().__init__()
        self.projector = projector
        self.llm = llm
        self.static_loss = False

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lm = causal_lm(self.llm)
        embeds, _, labels = prefix_inputs(self.projector, lm.get_input_embeddings(),
                                             features, input_ids, attention_mask, labels)
        hidden = final_hidden(lm, embeds)
        if self.static_loss:
            return masked_loss(hidden, labels, lm.get_output_embeddings())
        return target_loss(hidden, labels, lm.get_output_embeddings())


def build_model(llm_path: Path, align_dim: int, *, lora_r: int, lora_alpha: float,
                lora_dropout: float, target_modules: list[str], projector_hidden: int | None,
                projector_dropout: float, attn_implementation: str = "sdpa",
                device: str = "cpu", seed: int = 0,
                frozen_dtype: torch.dtype | None = None) -> Phase2Model:
    """LLM from disk + LoRA + a freshly initialised projector (seeded).

    `frozen_dtype`: the run's autocast dtype, to store the untargeted frozen linears in
    (`cast_untargeted_linears`); None keeps every weight fp32.
    """
    llm = load_llm(llm_path, attn_implementation, device)
    cast_untargeted_linears(llm, target_modules, frozen_dtype)
    hidden = llm.config.hidden_size
    torch.manual_seed(seed)  # the projector and LoRA init are part of the trial's seed
    llm = add_lora(llm, lora_r, lora_alpha, lora_dropout, target_modules)
    projector = Projector(align_dim, hidden, projector_hidden or 4 * hidden, projector_dropout)
    return Phase2Model(projector.to(device), llm)
