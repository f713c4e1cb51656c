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
    LOSS_CHUNK_ROWS,
    Projector,
    batch_targets,
    causal_lm,
    final_hidden,
    prefix_embeds,
    prefix_gaps,
    slot_losses,
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


def rows_losses(llm: nn.Module, parts: list[Rows], routed: bool = False,
                rows: torch.Tensor | None = None) -> list[torch.Tensor] | torch.Tensor:
    """One forward of every part's rows through `llm`; each part's mean target loss.

    `routed`: a compiled group's forward: the parts' adapters are routed already
    (`route_blocks`), labels are on the device and the targets static (`text_targets`).
    `rows` (routed, parts of equal rows: a group's fixed slots): only the parts whose rows
    these are (every row of each, in part order) go through the LLM, and the result is
    their losses as one tensor, in that order; see `stacked_rows_losses`.
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
    if rows is not None:
        return _slot_losses(lm, parts, torch.cat(embeds), torch.cat(gaps), length, rows)
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


def _slot_losses(lm: nn.Module, parts: list[Rows], embeds: torch.Tensor, gaps: torch.Tensor,
                 length: int, rows: torch.Tensor) -> torch.Tensor:
    """The decoder and the loss over `rows` only (`rows_losses`)."""
    hidden = final_hidden(lm, embeds.index_select(0, rows), gaps.index_select(0, rows))
    labels = torch.cat([_pad_right(p.labels, length, IGNORE_INDEX) for p in parts])
    # The LM head's fp32 logits of one chunk: at most LOSS_CHUNK_ROWS rows with every
    # slot running.
    chunk = max(1, LOSS_CHUNK_ROWS // len(parts))
    return slot_losses(hidden, labels.index_select(0, rows), parts[0].features.shape[1],
                       parts[0].features.shape[0], lm.get_output_embeddings(), chunk)


def stacked_rows_losses(llm: nn.Module, parts: list[Rows], stacks: LoraStacks | None,
                        slots: torch.Tensor | None = None) -> list[torch.Tensor] | torch.Tensor:
    """A compiled group's forward (`rows_losses`, routed): with `stacks`, its layers read
    the weights `stacks.split` makes once for this forward (`LoraStacks.lend`).

    `slots` (with `stacks`: one part per slot of the stacks, in slot order, all of equal
    rows): the slots to run, ascending, an int64 tensor whose length may be a dynamic
    dimension. The other slots' rows are left out of the decoder (their projectors still
    run, which costs little), and each layer takes only the running slots' rows of the
    stacks, so a step's cost follows its members while the graph stays one for every
    count. Their losses come back as one tensor, in slot order."""
    if stacks is None:
        return rows_losses(llm, parts, routed=True)
    rows = None
    if slots is None:
        stacks.lend(stacks.split())
    else:
        per = parts[0].features.shape[0]  # every slot runs as many rows
        rows = (slots.unsqueeze(1) * per + torch.arange(per, device=slots.device)).reshape(-1)
        stacks.lend(stacks.split(slots), stacks.scales.index_select(0, slots))
    try:
        return rows_losses(llm, parts, routed=True, rows=rows)
    finally:
        stacks.lend(None)
