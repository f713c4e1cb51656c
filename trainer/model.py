"""The Phase 2 model: projector (trained) + LLM with LoRA adapters (peft).

The frozen encoders and aligner are not part of this module: they either ran
once into the feature cache, or run beside it (`Phase1Bundle`) under no_grad.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import IGNORE_INDEX, to_device

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
    """A causal LM from a local directory (never the hub), fp32 master weights.

    `trainer.llm.check_llm` checks the directory first (files, architecture, LoRA targets).
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, attn_implementation=attn_implementation,
        dtype=torch.float32,
    ).to(device)


def low_precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None for fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


ALL_LINEAR = "all-linear"  # peft's shorthand: every Linear / Conv1D except the LM head


def linear_types() -> tuple[type[nn.Module], ...]:
    """The dense layers of a transformers LM: nn.Linear, and GPT-2's Conv1D (a transposed
    Linear computed with addmm)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def lora_target_names(lm: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the modules of `lm` (the CausalLM, before peft) that LoRA wraps.

    peft 0.21's rules: a list matches a module whose name equals an entry or ends in
    `.entry`; a string is a regular expression that must match the whole name; `all-linear`
    is every Linear / Conv1D except the output embedding. The list and regex cases call
    peft's own matcher; `all-linear` restates peft's `_maybe_include_all_linear_layers`
    (private), and tests/test_llm_families.py checks it against what peft really wraps.
    """
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = lm.get_output_embeddings()
        return [n for n, m in lm.named_modules()
                if isinstance(m, linear_types()) and m is not head]
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = LoraConfig(target_modules=_peft_targets(target_modules))
    return [n for n, _ in lm.named_modules() if n and check_target_module_exists(probe, n)]


def cast_untargeted_linears(lm: nn.Module, target_modules: list[str] | str,
                            dtype: torch.dtype | None) -> None:
    """Store the frozen LLM's dense weights that no LoRA adapter wraps in `dtype`.

    Exact under autocast to that dtype: autocast rounds an fp32 weight to `dtype` at every
    linear (and at GPT-2 Conv1D's addmm) anyway, so the stored copy gives bit-identical
    outputs and gradients, at half the memory and without a cast kernel per weight per
    step. The LoRA-wrapped base layers stay fp32 (peft casts a new adapter to its base
    layer's dtype, which would round the adapters' fp32 init), as do the embedding, the
    (tied) LM head and the norms, which run outside autocast's casting.
    """
    if dtype is None:
        return
    if any("lora_" in n for n, _ in lm.named_parameters()):
        raise ValueError("cast_untargeted_linears runs before LoRA is added")
    head = lm.get_output_embeddings()
    targeted = set(lora_target_names(lm, target_modules))
    for name, mod in lm.named_modules():
        if isinstance(mod, linear_types()) and mod is not head and name not in targeted:
            mod.to(dtype)


def _peft_targets(target_modules: list[str] | str) -> list[str] | str:
    # A string goes to peft as is (a regex, or all-linear); a list as a list.
    return target_modules if isinstance(target_modules, str) else list(target_modules)


def lora_config(r: int, alpha: float, dropout: float, target_modules: list[str] | str):
    """The one LoraConfig of a Phase 2 run (solo runs and trial-group members alike)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=_peft_targets(target_modules), bias="none",
                      task_type="CAUSAL_LM")


def add_lora(llm: nn.Module, r: int, alpha: float, dropout: float,
             target_modules: list[str] | str) -> nn.Module:
    """Wrap the LLM with peft LoRA; peft freezes every base weight."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        # GPT-2's Conv1D stores its weight transposed; peft sets fan_in_fan_out for each
        # such layer itself (and says so once per layer): the right thing, not news.
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        return get_peft_model(llm, lora_config(r, alpha, dropout, target_modules))


def wrapped_modules(llm: nn.Module) -> list[str]:
    """Names (in the CausalLM) of the modules peft wrapped with a LoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    lm = causal_lm(llm)
    return [n for n, m in lm.named_modules() if isinstance(m, BaseTunerLayer)]


def causal_lm(llm: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    from peft import PeftModel

    # PeftModel.base_model is the LoraModel tuner; its .model is the CausalLM that peft
    # injected the LoRA layers into (in place). Not get_base_model(): that reads the
    # active adapter, which a trial group leaves unset.
    return llm.base_model.model if isinstance(llm, PeftModel) else llm


def prefix_embeds(projector: Projector, embed: nn.Module, features: torch.Tensor,
                  input_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings: the projected feature tokens, then the text tokens.

    Prefixes may differ in length between rows: a feature token that is NaN is no token
    (trainer.data.prefix_features puts each row's real tokens first, then NaN). Such
    tokens go through the projector as zeros (a NaN input would make the projector's
    weight gradient NaN) and come out as zero embeddings, which `final_hidden` moves
    behind the row's text when given `prefix_gaps`. The marker is the input, never the
    output: a projector that itself goes non-finite must reach the loss and the NaN guard.
    The prefix is never a target (`find_targets` skips it).
    """
    real = ~torch.isnan(features[..., :1])  # [b, T, 1]
    prefix = projector(features.masked_fill(~real, 0.0).to(projector.net[0].weight.dtype))
    tokens = embed(input_ids)
    prefix = prefix.to(tokens.dtype).masked_fill(~real, 0.0)
    return torch.cat([prefix, tokens], dim=1)


def prefix_gaps(features: torch.Tensor, text_length: int) -> torch.Tensor:
    """[b, T + text_length] bool: True where a row has no prefix token (NaN features)."""
    return F.pad(torch.isnan(features[..., 0]), (0, text_length), value=False)


def final_hidden(lm: nn.Module, embeds: torch.Tensor, gaps: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Last hidden states of the decoder, without the LM head (`lm` is the CausalLM).

    Rows must be right-padded (trainer.data builds nothing else; a trial group pads its
    rows on the right too). No attention mask is passed, on purpose: under causal
    attention a real position only sees positions before it, which right padding never
    are, so masking the padding changes no real position's output, and padded positions
    carry no target. Without a mask HF takes SDPA's `is_causal` path (flash attention)
    instead of materialising a [B, 1, L, L] mask and falling back to the slower masked
    kernels, also inside a compiled forward, where HF cannot prove a mask is all ones.

    `gaps` (`prefix_gaps`, None when every row has its full prefix) marks where a row
    whose prefix is shorter than the batch's lacks prefix tokens. The row is compacted
    first, [its real prefix] [its text] [the rest], so it stays right-padded (no mask
    needed) and its text sits right behind its own prefix (positions as in a batch of
    one); the hidden states are then put back at the original positions, so the callers'
    target positions hold. All
    on the device, with static shapes (a gather, no host sync). Rows with a full prefix
    are gathered in place: the same numbers as without this step.
    """
    # The decoder body, not the CausalLM forward: that would run the LM head (a quarter of
    # a Qwen model) over every position, prefix and prompt included.
    if gaps is None:
        return lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    order = torch.argsort(gaps.to(torch.int8), dim=1, stable=True)  # real positions first
    packed = embeds.gather(1, order.unsqueeze(-1).expand_as(embeds))
    hidden = lm.base_model(inputs_embeds=packed, use_cache=False).last_hidden_state
    back = torch.argsort(order, dim=1).unsqueeze(-1).expand_as(hidden)  # the inverse order
    return hidden.gather(1, back)


class Targets(NamedTuple):
    """The target tokens of a batch: which positions go through the LM head (flat indices
    into [batch x length]), the label each predicts, and how many are real."""

    rows: torch.Tensor  # [n] int64
    labels: torch.Tensor  # [n] int64
    count: torch.Tensor | int  # a host int when found on the host (no copy to the device)

    def to(self, device: torch.device) -> Targets:
        return Targets(to_device(self.rows, device), to_device(self.labels, device), self.count)


def find_targets(labels: torch.Tensor, prefix: int) -> Targets:
    """Targets of text `labels` [b, t] behind `prefix` feature tokens (labels on the CPU:
    no device sync). Position i predicts label i + 1 (the usual shift), so the rows are
    the positions whose *next* label is a target."""
    b, t = labels.shape
    length = prefix + t
    full = torch.cat([labels.new_full((b, prefix), IGNORE_INDEX), labels], 1)
    bi, ti = (full[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return Targets(bi * length + ti, full[bi, ti + 1], int(bi.shape[0]))


def text_targets(labels: torch.Tensor, prefix: int) -> Targets:
    """The same targets with static shapes, for a compiled or CUDA-graph forward (labels
    on the hidden states' device): every text position's predecessor goes through the LM
    head, non-targets carry IGNORE_INDEX (prompt and padding: a few wasted rows, never
    the prefix) and the count is taken on the device. No data-dependent shape, no sync."""
    b, t = labels.shape
    start = torch.arange(b, device=labels.device).unsqueeze(1) * (prefix + t) + prefix - 1
    rows = (start + torch.arange(t, device=labels.device)).reshape(-1)
    y = labels.reshape(-1)
    return Targets(rows, y, (y != IGNORE_INDEX).sum().float())


def target_loss(hidden: torch.Tensor, targets: Targets, lm_head: nn.Module,
                chunk_rows: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (HF's loss, and NaN like HF's
    when a batch has none).

    Only the target rows go through the LM head (a Qwen head is a quarter of the model;
    prefix and prompt positions never need it), `chunk_rows` at a time with fp32 logits:
    the [tokens, vocab] logits of a whole batch never exist at once. Padding rows (static
    rows, static shapes) carry IGNORE_INDEX and add nothing to the sum.
    """
    return target_losses(hidden, [(0, targets)], lm_head, chunk_rows)[0]


def target_losses(hidden: torch.Tensor, blocks: list[tuple[int, Targets]], lm_head: nn.Module,
                  chunk_rows: int = LOSS_CHUNK_ROWS) -> list[torch.Tensor]:
    """`target_loss` of several blocks of rows of `hidden` [batch, length, width] at once:
    `blocks` holds each block's first row and its targets (flat indices into the block's
    own [rows x length]); one mean loss per block.

    Every block's target rows go through the LM head together: a trial group's members
    each ran their own head matmul before, and at the seed's batch such a matmul is bound
    by reading the head's weights (152k x 896 for Qwen, 272 MB in bf16), once per member
    forward and once backward: 16 reads per group step at K=8 instead of 2.
    """
    length, width = hidden.shape[1], hidden.shape[2]
    # A solo run's one block needs no offset and no concatenation: no extra launches.
    rows = _joined([t.rows + first * length if first else t.rows for first, t in blocks])
    labels = _joined([t.labels for _, t in blocks])
    h = hidden.reshape(-1, width).index_select(0, rows)  # [target rows, width]
    per_row = _joined([
        F.cross_entropy(lm_head(h[i : i + chunk_rows]).float(), labels[i : i + chunk_rows],
                        ignore_index=IGNORE_INDEX, reduction="none")
        for i in range(0, h.shape[0], chunk_rows)] or [h.new_zeros(0, dtype=torch.float32)])
    sums = per_row.split([t.labels.shape[0] for _, t in blocks])
    return [s.sum() / t.count for s, (_, t) in zip(sums, blocks, strict=True)]


def slot_losses(hidden: torch.Tensor, labels: torch.Tensor, prefix: int, slot_rows: int,
                lm_head: nn.Module, chunk: int) -> torch.Tensor:
    """Each slot's mean target loss, [n], of a batch of n slots of `slot_rows` rows each:
    `hidden` [n x slot_rows, prefix + t, width], `labels` [n x slot_rows, t] on its device
    (the targets of `text_targets`: every text position's predecessor goes through the LM
    head, non-targets carry IGNORE_INDEX). The slot count n may be a dynamic dimension of a
    compiled graph (a trial group stepping only its occupied slots), so nothing here loops
    over it or depends on its value: the LM head runs over `chunk` text positions of every
    slot at a time, a static number of chunks (the caller bounds chunk x its largest n)."""
    t, width = labels.shape[1], hidden.shape[-1]
    # Position i predicts label i + 1: the text's predecessors are prefix - 1 ... + t - 1.
    h = hidden[:, prefix - 1 : prefix - 1 + t].reshape(-1, slot_rows * t, width)
    y = labels.reshape(-1, slot_rows * t)
    sums = []
    for i in range(0, slot_rows * t, chunk):
        logits = lm_head(h[:, i : i + chunk]).float()
        sums.append(F.cross_entropy(logits.flatten(0, 1), y[:, i : i + chunk].reshape(-1),
                                    ignore_index=IGNORE_INDEX, reduction="none")
                    .view_as(y[:, i : i + chunk]).sum(1))
    counts = (y != IGNORE_INDEX).sum(1).float()
    return sum(sums[1:], sums[0]) / counts


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def batch_targets(labels: torch.Tensor, prefix: int, static: bool,
                  device: torch.device) -> Targets:
    """`text_targets` for static (compiled) forwards, else `find_targets` (CPU labels)."""
    if static:
        return text_targets(labels, prefix)
    return find_targets(labels, prefix).to(device)


class Phase2Model(nn.Module):
    """Projector + LoRA-wrapped LLM; the loss covers target tokens only.

    `static_loss` (set by the trainer when it compiles the forward): labels come on the
    device and the loss takes `text_targets` (static shapes, so CUDA graphs can capture
    the forward); otherwise they stay on the CPU and `find_targets` picks the rows.
    """

    def __init__(self, projector: Projector, llm: nn.Module) -> None:
        super().__init__()
        self.projector = projector
        self.llm = llm
        self.static_loss = False

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """Mean target-token loss of right-padded rows; `labels` [b, t] (text positions)."""
        lm = causal_lm(self.llm)
        embeds = prefix_embeds(self.projector, lm.get_input_embeddings(), features, input_ids)
        hidden = final_hidden(lm, embeds, prefix_gaps(features, input_ids.shape[1]))
        targets = batch_targets(labels, features.shape[1], self.static_loss, hidden.device)
        return target_loss(hidden, targets, lm.get_output_embeddings())


def build_model(llm_path: Path, align_dim: int, *, lora_r: int, lora_alpha: float,
                lora_dropout: float, target_modules: list[str] | str,
                projector_hidden: int | None,
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
