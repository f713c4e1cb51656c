"""What `model.compile` compiles (`model.compile_scope`): the whole forward, or each block.

"model": the whole forward is one graph (a solo run's `Phase2Model.forward`, a group's
`trainer.rows.stacked_rows_losses` over all its slots): projector, every decoder block,
the LM head and the loss fused and, with `reduce-overhead`, replayed as one CUDA graph.
Its cold compile traces and compiles every block of the LLM, one after the other, though
they are the same code.

"layers" (regional compilation, PyTorch's recipe for cold-start time): each decoder
block of the LLM (`decoder_blocks`) is compiled in place and the rest stays eager
(embedding, projector, final norm, LM head and loss; a group's slot bookkeeping).
Dynamo lifts a block's parameters as graph inputs instead of baking them in as
constants, so the first block's graph serves every identical block: one block is
compiled, not all of them, whatever the layer count. The price is paid per step: each
block call is a guard check (skipped with the whole forward's once warm,
`trainer.compile_guards`), no CUDA graph (`block_mode`: `reduce-overhead` compiles the
blocks as `default`), and nothing fuses across blocks or into the loss.

A block's graph is shared only if nothing it reads names the layer (Dynamo guards on
what a trace reads): a group's routed LoRA layers hold the same routing and read their
own stacked weights as tensors (`trainer.multilora.route_blocks`, `LoraStacks.lend`).

`nn.Module.compile` compiles a block in place: parameter and state-dict names stay as
they are, so optimizer groups, checkpoints and weight files are those of an eager run.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import nn

from trainer.config import COMPILE_BACKENDS
from trainer.model import causal_lm

F = TypeVar("F", bound=Callable)

SCOPES = ("model", "layers")

# The blocks `compile_blocks` compiled, per causal LM: `eager_blocks` runs on every step of
# an uncompiled group (its whole forward is the eager path), so it must not search the
# model's modules for blocks there.
_COMPILED: weakref.WeakKeyDictionary[nn.Module, list[nn.Module]] = weakref.WeakKeyDictionary()


def decoder_blocks(llm: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a transformers causal LM (peft-wrapped or not), in order:
    the longest `nn.ModuleList` of one module type (`model.layers` for Llama/Qwen2,
    `transformer.h` for GPT-2), preferring the types transformers itself names as blocks
    (`_no_split_modules`). Raises ValueError naming the model when it has none."""
    lm = causal_lm(llm)
    lists = [m for m in lm.modules()
             if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]
    named = set(getattr(lm, "_no_split_modules", None) or ())
    preferred = [m for m in lists if type(m[0]).__name__ in named]
    found = preferred or lists
    if not found:
        raise ValueError(
            f"model.compile_scope=layers: no decoder blocks found in {type(lm).__name__} "
            "(no nn.ModuleList of one module type); set model.compile_scope=model")
    return list(max(found, key=len))


# The Inductor mode a block is compiled with: never CUDA graphs. One block graph serves
# every block, and a CUDA graph takes a graph's parameters as static inputs, fixed
# addresses: each block's own weights are other addresses, so every block call re-recorded
# its graph (up to Inductor's cudagraph_unexpected_rerecord_limit, 128 per graph), and a
# group's step went from 37 ms (compile_scope: model) to 1.45 s on an H100
# (bench/results/2026-12-06-run27).
BLOCK_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def compile_options(mode: str, device: torch.device) -> dict[str, str]:
    """`torch.compile`'s keyword for `model.compile` = `mode` on `device`: its backend
    (`trainer.config.COMPILE_BACKENDS`) or its Inductor mode."""
    if mode not in COMPILE_BACKENDS:
        return {"mode": mode}
    if device.type != "cuda":
        # What the cudagraphs backend runs off CUDA anyway (the traced graphs, eagerly),
        # without its warning per graph that it skipped CUDA graphs.
        return {"backend": "aot_eager"}
    return {"backend": COMPILE_BACKENDS[mode]}


def block_mode(mode: str) -> str:
    """The mode `compile_blocks` compiles a block with, for `model.compile` = `mode`."""
    return BLOCK_MODES.get(mode, mode)


def compile_blocks(llm: nn.Module, mode: str) -> int:
    """Compile every decoder block of `llm` in place (static shapes, `block_mode(mode)`);
    how many."""
    blocks = decoder_blocks(llm)
    for block in blocks:
        block.compile(mode=block_mode(mode), dynamic=False)
    _COMPILED[causal_lm(llm)] = blocks
    return len(blocks)


def compile_forward(forward: F, llm: nn.Module, mode: str, scope: str) -> F:
    """`forward` (a function whose decoder runs through `llm`) as `model.compile` makes it:
    compiled whole ("model", static shapes), or left eager with every decoder block of
    `llm` compiled in place ("layers")."""
    if scope == "model":
        device = next(llm.parameters()).device
        return torch.compile(forward, dynamic=False, **compile_options(mode, device))
    if scope != "layers":
        raise ValueError(f"model.compile_scope must be one of {SCOPES}, not {scope!r}")
    compile_blocks(llm, mode)
    return forward


@contextlib.contextmanager
def eager_blocks(llm: nn.Module) -> Iterator[None]:
    """Run `llm`'s blocks compiled in place (`compile_blocks`) eagerly inside the context:
    a group's per-call routings (a member's eval, peft's per-row path) would trace a graph
    per routing and length. Per model, not `torch.compiler.set_stance("force_eager")`:
    a stance is one for the whole process, and two threads entering and leaving theirs
    out of order (two groups in one process) leave the last one restored in force."""
    # `nn.Module.compile` keeps the compiled call in `_compiled_call_impl` (torch 2.x),
    # which `Module.__call__` takes when set; without it the block runs its forward.
    held = [(b, b._compiled_call_impl) for b in _COMPILED.get(causal_lm(llm), ())
            if b._compiled_call_impl is not None]
    for block, _ in held:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, compiled in held:
            block._compiled_call_impl = compiled
