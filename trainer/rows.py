"""A trial group's shared forward: several members' rows through one LLM in one pass.

Its one job: given each member's rows (`Rows`: its projector, adapter, features and
tokens), run them all through the shared LLM at once, each row block through its own
adapter, and return each member's own mean target loss. `trainer.group` builds the rows
and steps the members; `trainer.group_member.MemberView` (a member seen as a solo model)
runs its rows alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.compile_scope import eager_blocks
from trainer.data import IGNORE_INDEX
from trainer.model import (
    Projector,
    batch_targets,
    causal_lm,
    final_hidden,
    prefix_embeds,
    prefix_gaps,
    target_losses,
)
from trainer.multilora import LoraStacks, adapter_blocks


@dataclass
class Rows:
    """One member's share of a shared forward (right-padded rows)."""

    projector: Projector
    adapter: str
    features: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor  # [b, t]: on the CPU, on the device for a compiled forward


def _pad_right(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, length - t.shape[1]), value=value)


def rows_losses(llm: nn.Module, parts: list[Rows], routed: bool = False) -> list[torch.Tensor]:
    """One forward of every part's rows through `llm`; each part's mean target loss.

    `routed`: a compiled group's forward: the parts' adapters are routed already
    (`route_blocks`), labels are on the device and the targets static (`text_targets`).
    """
    lm = causal_lm(llm)
    length = max(p.input_ids.shape[1] for p in parts)
    embeds, gaps, blocks = [], [], []
    for p in parts:
        # Padding ids are never attended by a real position (final_hidden): any id will do.
        embeds.append(prefix_embeds(p.projector, lm.get_input_embeddings(), p.features,
                                    _pad_right(p.input_ids, length, 0)))
        gaps.append(prefix_gaps(p.features, length))
        blocks.append((p.adapter, p.features.shape[0]))
    if routed:
        hidden = final_hidden(lm, torch.cat(embeds), torch.cat(gaps))
    else:
        # Eager, as with a whole compiled forward, also where the decoder blocks are
        # compiled (`model.compile_scope: layers`): a member's own forward (its eval) and
        # peft's per-row path route every call anew, over trimmed rows, which would trace
        # a graph per routing and length.
        with adapter_blocks(llm, blocks), eager_blocks(llm):
            hidden = final_hidden(lm, torch.cat(embeds), torch.cat(gaps))
    blocks, start = [], 0
    for p in parts:  # each member's loss over its own rows and target tokens only
        blocks.append((start, batch_targets(_pad_right(p.labels, length, IGNORE_INDEX),
                                            p.features.shape[1], routed, hidden.device)))
        start += p.features.shape[0]
    return target_losses(hidden, blocks, lm.get_output_embeddings())


def stacked_rows_losses(llm: nn.Module, parts: list[Rows],
                        stacks: LoraStacks | None) -> list[torch.Tensor]:
    """A compiled group's forward (`rows_losses`, routed): with `stacks`, its layers read
    the weights `stacks.split` makes once for this forward (`LoraStacks.lend`)."""
    if stacks is None:
        return rows_losses(llm, parts, routed=True)
    stacks.lend(stacks.split())
    try:
        return rows_losses(llm, parts, routed=True)
    finally:
        stacks.lend(None)
