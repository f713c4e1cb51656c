"""Batched multi-LoRA: many peft LoRA adapters over one frozen LLM in one forward.

A trial group (`trainer.group`) runs the rows of several trials through one shared
peft model, each row through its own trial's adapter. peft's own per-row path
(`adapter_names`, `adapter_rows` here) gathers and scatters rows per adapter; when the
rows come in contiguous per-adapter blocks (a group's concatenated micro-batches) each
LoRA layer computes the blocks on slices instead (`route_blocks`,
`block_lora_forward`), and when every block has as many rows and the adapters the same
shapes, all blocks' products are two batched matmuls (`bmm_lora`) over weights that may
live in one stacked tensor (`LoraStacks`, HFTA's fused layout). Each block's product is
its own adapter's `B(A(dropout(x))) * scaling`, peft's vanilla LoRA
(tests/test_multilora.py checks each against peft, forward and backward).

Parameter names: a member's adapter is named `<adapter>` in the shared model and
"default" in a solo run (`SOLO_ADAPTER`, `adapter_of`, `solo_name`), so its checkpoints
load either way.
"""

from __future__ import annotations

import re
import types
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data import to_device

SOLO_ADAPTER = "default"  # peft's adapter name in a solo run: checkpoints use it

# `...q_proj.lora_A.<adapter>.weight`, `...lora_embedding_A.<adapter>`: the adapter segment.
_ADAPTER_RE = re.compile(r"\.(lora_[A-Za-z_]+)\.([^.]+)(?=\.|$)")


def adapter_of(name: str) -> str | None:
    """The LoRA adapter a parameter name belongs to (None for projector / base weights)."""
    m = _ADAPTER_RE.search(name)
    return m.group(2) if m else None


def solo_name(name: str, adapter: str) -> str:
    """A member's parameter name as the same parameter is named in a solo run."""
    return _ADAPTER_RE.sub(
        lambda m: f".{m.group(1)}.{SOLO_ADAPTER}" if m.group(2) == adapter else m.group(0), name)


@contextmanager
def adapter_rows(llm: nn.Module, names: list[str]) -> Iterator[None]:
    """Route batch row i through LoRA adapter names[i] in every LoRA layer of `llm`.

    peft's own `_enable_peft_forward_hooks` does this for inference only (it refuses in
    training mode); the layer path it feeds (`_mixed_batch_forward`) is plain autograd,
    so the same hooks are registered here for training too.
    """
    from peft.tuners.lora import LoraLayer

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in llm.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def bmm_lora(result: torch.Tensor, xs: torch.Tensor, stack_a: torch.Tensor,
              stack_b: torch.Tensor, scale: float | torch.Tensor,
              weights_left: bool = True) -> torch.Tensor:
    """`result` plus every block's LoRA product: xs [K, rows x tokens, in], stack_a
    [K, r, in], stack_b [K, out, r], scale a float or [K, 1, 1].

    `weights_left` (for members' own parameters, stacked per call): the backward's weight
    gradients come out as contiguous [K, r, in] / [K, out, r], so each member's slice
    already has its parameter's layout and autograd takes it as the .grad without a copy
    (K x 2 copy kernels per LoRA layer and step saved). Activations on the left (for
    `LoraStacks`, whose gradients are concatenated anyway): the products are tall and
    thin ([rows x tokens, in] x [in, r]), which cuBLAS runs faster than the weights-left
    form at the reference group's shapes (`bench/lora_kernels.py`; figures in
    docs/performance.md), and the sum with `result` reads both contiguously.
    """
    k, width = xs.shape[0], result.shape[-1]
    if weights_left:
        h_t = torch.bmm(stack_a, xs.transpose(1, 2))  # [K, r, rows x tokens]
        delta_t = torch.bmm(stack_b, h_t) * scale  # [K, out, rows x tokens]
        return (result.view(k, -1, width) + delta_t.transpose(1, 2)).view(result.shape)
    h = torch.bmm(xs, stack_a.transpose(1, 2))  # [K, rows x tokens, r]
    delta = torch.bmm(h, stack_b.transpose(1, 2)) * scale  # [K, rows x tokens, out]
    return (result.view(k, -1, width) + delta).view(result.shape)


def block_lora_forward(layer: nn.Module, blocks: list[tuple[str, int]],
                        stacks: LoraStacks | None, x: torch.Tensor,
                        *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA Linear over a batch whose rows come in contiguous per-adapter blocks.

    The same sum as peft's vanilla path (`base(x) + B(A(dropout(x))) * scaling`, with x
    cast to A's dtype), computed per block on slices instead of peft's per-row gather and
    scatter; when every block has as many rows and the adapters the same shapes (the
    usual sweep), all members' LoRA products are two batched matmuls whatever the group
    size: the launch count no longer grows with the number of members. `stacks`: the
    blocks' weights held in one tensor (`LoraStacks`, for blocks that
    `LoraStacks.stackable` accepted), this layer's A and B views of it read instead of
    the members' parameters.
    """
    result = layer.base_layer(x, *args, **kwargs)
    out_dtype = result.dtype
    names = [a for a, _ in blocks]
    sizes = [n for _, n in blocks]
    if stacks is not None:  # equal blocks, equal shapes: the batched path
        stack_a, stack_b = stacks.layer_views(layer)
        x = stacks.dropout(x.to(stack_a.dtype), sizes, layer.training)  # peft's cast
        # As many blocks as the stacks lent this forward (a group's running slots), not
        # len(blocks): their count may be a dynamic dimension of the graph.
        xs = x.reshape(stack_a.shape[0], -1, x.shape[-1])  # a view, no copy
        return bmm_lora(result, xs, stack_a, stack_b, stacks.layer_scales().to(xs.dtype),
                         weights_left=False).to(out_dtype)
    lora_a = [layer.lora_A[a].weight for a in names]
    lora_b = [layer.lora_B[a].weight for a in names]
    x = blocks_dropout(layer, names, sizes, x.to(lora_a[0].dtype))  # peft's cast, dropout
    if equal_blocks(layer, names, sizes) and len(blocks) > 1:
        xs = x.reshape(len(blocks), -1, x.shape[-1])  # [K, rows x tokens, in], a view
        return bmm_lora(result, xs, torch.stack(lora_a), torch.stack(lora_b),
                         block_scales(layer, names, xs)).to(out_dtype)
    # split, not x[s:e]: a slice's backward fills a zero tensor of x's full size per
    # block (K x the activations per layer); split's backward is one cat.
    delta = torch.cat([F.linear(F.linear(xb, a), b) * layer.scaling[n]
                       for n, xb, a, b in zip(names, x.split(sizes), lora_a, lora_b,
                                              strict=True)])
    return (result + delta).to(out_dtype)


def blocks_dropout(layer: nn.Module, names: list[str], sizes: list[int],
                    x: torch.Tensor) -> torch.Tensor:
    """Each block of rows of `x` through its own adapter's LoRA dropout (peft's
    `lora_dropout[adapter]`), as one tensor again.

    Dropout draws an independent mask per element, so when every block's dropout is the
    same module type and rate (the usual sweep, where dropout is not swept) one call over
    the whole batch is the per-block calls in distribution, in one kernel and with no
    copy: the batched path stays open to the default LoRA dropout (0.05). Blocks with
    different rates go one by one and are concatenated (one copy).
    """
    mods = [layer.lora_dropout[a] for a in names]
    if all(isinstance(d, nn.Identity) for d in mods):
        return x
    if len({(type(d), getattr(d, "p", None), d.training) for d in mods}) == 1:
        return mods[0](x)
    return torch.cat([d(xb) for d, xb in zip(mods, x.split(sizes), strict=True)])


def dropout_rate(layer: nn.Module, adapter: str) -> float:
    """The LoRA dropout rate of `adapter` in a peft layer (0.0 where peft put an Identity)."""
    return float(getattr(layer.lora_dropout[adapter], "p", 0.0))


def equal_blocks(layer: nn.Module, names: list[str], sizes: list[int]) -> bool:
    """Every block as many rows, every adapter's A (and B) the same shape: one bmm."""
    return (len(set(sizes)) == 1
            and len({layer.lora_A[a].weight.shape for a in names}) == 1
            and len({layer.lora_B[a].weight.shape for a in names}) == 1)


def block_scales(layer: nn.Module, names: list[str], like: torch.Tensor) -> float | torch.Tensor:
    """The blocks' LoRA scalings: one float when they agree (the usual sweep: no tensor to
    copy to the device), else [K, 1, 1] through pinned memory (a constant once compiled)."""
    scales = [layer.scaling[a] for a in names]
    if len(set(scales)) == 1:
        return scales[0]
    return to_device(torch.tensor(scales, dtype=like.dtype).view(-1, 1, 1), like.device)


def vanilla_lora_layers(llm: nn.Module, adapters: Collection[str]) -> list[nn.Module] | None:
    """Every LoRA layer of `llm`, if all are plain peft LoRA Linears for `adapters` (None
    when some layer needs peft's own per-row path: another layer type or a LoRA variant)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in llm.modules() if isinstance(m, LoraLayer)]  # one walk per forward
    vanilla = [m for m in layers if isinstance(m, LoraLinear)
               and not any(a in m.lora_variant for a in adapters)]
    return vanilla if len(vanilla) == len(layers) else None


def routed_lora_forward(self: nn.Module, x: torch.Tensor, *args: Any,
                        **kwargs: Any) -> torch.Tensor:
    """A routed LoRA layer's forward (`route_blocks`): `block_lora_forward` with the
    routing the layer holds (`lora_route`: its blocks and stacks)."""
    blocks, stacks = self.lora_route
    return block_lora_forward(self, blocks, stacks, x, *args, **kwargs)


def route_blocks(layers: list[nn.Module], blocks: tuple[tuple[str, int], ...],
                 stacks: LoraStacks | None = None) -> None:
    """Make each block of rows (adapter, row count), in order, take its own adapter in
    every one of `layers` until routed otherwise: an instance attribute shadows the
    class's forward. A compiled forward sees the same routing objects step after step
    (so it recompiles only when the blocks change). With `stacks`, each layer computes
    from its stacked weights.

    Every layer gets the same function and the same routing objects, and nothing that
    names the layer (no index, no per-layer object): Dynamo guards on what a traced
    forward reads, so a per-layer constant would make a compiled decoder block
    (`model.compile_scope: layers`) one graph per layer instead of one for all. A
    layer's own stacked weights reach it as tensors it holds (`LoraStacks.lend`)."""
    for m in layers:
        m.lora_route = (blocks, stacks)
        m.forward = types.MethodType(routed_lora_forward, m)


class LoraStacks:
    """Every member's LoRA weights held in one [K, N] parameter, one row per slot: row k is
    the weights of the member in slot k, its A and B of every layer flattened one after the
    other. Each layer reads [K, r, in] and [K, out, r] views of it (HFTA's fused layout),
    taken inside the compiled graph.

    Slots (`slots`, K; default one per adapter given): a member is `attach`ed to a free slot
    and `detach`ed when it leaves, which leaves every shape as it was, so a compiled forward
    over the stacks keeps its graph when the group's make-up changes. An empty slot holds
    zero weights and a zero scale (`scales`), so its rows get no LoRA product and its row of
    the gradient is zero. The per-slot LoRA scalings (`scales`, a [K, 1, 1] tensor, not
    Python floats the graph would bake in) and dropout rates (`rates`; a changed rate is a
    new graph, as Dynamo guards it) are the members' own.

    The members' own parameters become views of their spans of a row, and their
    gradients views of the same spans of the one gradient, kept for as long as they are
    attached (zeroed in place before each step, never set to None): their optimizers,
    checkpoints and weight files work on them unchanged. The shared forward reads the one
    parameter: one graph input and one gradient node for all LoRA weights of the group
    (at K=8 on the reference model, instead of 1,536 of each), and since a member's LoRA
    gradients are one contiguous row, the group takes every member's LoRA gradient norm
    in one reduction and clips them all in one multiply (`member_norms`, `scale_grads`).

    Inside the shared forward the layers read the pieces that `split` makes once per
    forward (`lend` hands each layer its own): the stack cast once to the compute dtype
    (`compute_dtype`: autocast's, None for fp32), then split. Slicing the fp32 stack per
    layer instead made autograd sum 192 zero-padded slice gradients, which Inductor fuses
    into one kernel testing every slice at every element (a visible share of the group
    step in the profile of docs/performance.md), against one concatenation and one cast
    here; the per-layer casts of the slices go too.
    """

    def __init__(self, layers: list[nn.Module], adapters: list[str],
                 compute_dtype: torch.dtype | None = None, slots: int | None = None) -> None:
        slots = len(adapters) if slots is None else slots
        if not adapters or len(adapters) > slots:
            raise ValueError(f"{len(adapters)} adapters for {slots} slots")
        self.layers = layers
        # Every member's weights have these shapes (`stackable` / `fits` check it).
        shapes = [getattr(layer, attr)[adapters[0]].weight.shape
                  for layer in layers for attr in ("lora_A", "lora_B")]
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + shape.numel())
        self.spans = list(zip(offsets[:-1], shapes, strict=True))  # (offset, shape) per weight
        like = layers[0].lora_A[adapters[0]].weight
        # A Parameter, so a CUDA-graph forward takes it as a static input (no copy).
        self.flat = nn.Parameter(torch.zeros(slots, offsets[-1], dtype=like.dtype,
                                             device=like.device))
        self.flat.grad = torch.zeros_like(self.flat)  # backward adds into it in place
        # A static input too (a Parameter without a gradient), updated in place.
        self.scales = nn.Parameter(torch.zeros(slots, 1, 1, device=like.device),
                                   requires_grad=False)
        self.rates = [dropout_rate(layers[0], adapters[0])] * slots
        self.compute_dtype = compute_dtype if compute_dtype != like.dtype else None
        self.lend(None)
        self.adapters: list[str | None] = [None] * slots  # who holds each slot
        self._params: list[list[nn.Parameter]] = [[] for _ in range(slots)]
        for k, adapter in enumerate(adapters):
            self.attach(k, adapter)

    @staticmethod
    def stackable(layers: list[nn.Module], adapters: list[str], sizes: list[int],
                  single: bool = False) -> bool:
        """Whether `layers` take the batched path for these blocks in every call: more than
        one block (or one, with `single`), equal row counts, equal adapter shapes, and one
        dtype and device for all LoRA weights (they share one tensor). LoRA dropout does
        not matter (`dropout`)."""
        kinds = {(p.dtype, p.device) for layer in layers for attr in ("lora_A", "lora_B")
                 for p in (getattr(layer, attr)[a].weight for a in adapters)}
        return (len(adapters) > 1 or (single and len(adapters) == 1)) and len(kinds) == 1 \
            and all(equal_blocks(layer, adapters, sizes) for layer in layers)

    def fits(self, adapter: str) -> bool:
        """Whether `adapter`'s weights have the slots' shapes, dtype and device."""
        weights = [getattr(layer, attr)[adapter].weight
                   for layer in self.layers for attr in ("lora_A", "lora_B")]
        return all(w.shape == shape and w.dtype == self.flat.dtype
                   and w.device == self.flat.device
                   for w, (_, shape) in zip(weights, self.spans, strict=True))

    def free_slots(self) -> list[int]:
        return [k for k, a in enumerate(self.adapters) if a is None]

    def attach(self, slot: int, adapter: str) -> None:
        """Put `adapter` in the empty `slot`: its weights are copied into the slot's row and
        its parameters (the same objects: optimizers keep them) become views of it."""
        if self.adapters[slot] is not None:
            raise ValueError(f"slot {slot} holds {self.adapters[slot]!r}")
        weights = [getattr(layer, attr)[adapter].weight
                   for layer in self.layers for attr in ("lora_A", "lora_B")]
        with torch.no_grad():
            for p, (off, shape) in zip(weights, self.spans, strict=True):
                span = slice(off, off + shape.numel())
                self.flat.data[slot, span] = p.detach().reshape(-1)
                p.data = self.flat.data[slot, span].view(shape)  # a view of its span
                p.grad = self.flat.grad[slot, span].view(shape)
            self.flat.grad[slot].zero_()
            self.scales.data[slot] = float(self.layers[0].scaling[adapter])
        self.rates[slot] = dropout_rate(self.layers[0], adapter)
        self.adapters[slot] = adapter
        self._params[slot] = weights

    def detach(self, slot: int) -> None:
        """Empty `slot`: its member's parameters get storage of their own again (same
        values), and the slot's row and scale are zeroed, so its rows get no LoRA product
        (whatever the member left there, a non-finite weight included)."""
        with torch.no_grad():
            for p in self._params[slot]:
                p.data = p.data.clone()
                p.grad = None
            self.flat.data[slot].zero_()
            self.flat.grad[slot].zero_()
            self.scales.data[slot] = 0.0
        self._params[slot] = []
        self.adapters[slot] = None

    def dropout(self, x: torch.Tensor, sizes: list[int], training: bool) -> torch.Tensor:
        """Each slot's rows of `x` through its member's LoRA dropout rate: one call over all
        rows when the rates agree (the usual sweep: dropout draws an independent mask per
        element, so that is the per-slot calls in distribution), else one per slot."""
        if not training or not any(self.rates):
            return x
        if len(set(self.rates)) == 1:
            return F.dropout(x, self.rates[0], training=True)
        return torch.cat([F.dropout(xb, p, training=True) if p else xb
                          for p, xb in zip(self.rates, x.split(sizes), strict=True)])

    def split(self, slots: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every layer's A [K, r, in] and B [K, out, r] weights in the compute dtype, in
        layer order: one cast of the stack and one split (whose backward is one cat).
        `slots`: only these slots' rows, in this order ([n, r, in] and [n, out, r])."""
        flat = self.flat if slots is None else self.flat.index_select(0, slots)
        k = flat.shape[0]
        flat = flat if self.compute_dtype is None else flat.to(self.compute_dtype)
        sizes = [shape.numel() for _, shape in self.spans]
        return [t.view(k, *shape) for t, (_, shape)
                in zip(flat.split(sizes, dim=1), self.spans, strict=True)]

    def lend(self, pieces: list[torch.Tensor] | None,
             scales: torch.Tensor | None = None) -> None:
        """Hand every layer its A and B of `pieces` (`split`, for one forward) as a
        tensor attribute of its own (`lora_stacked`); None takes them back. Attributes,
        not `pieces[2 * index]` read by layer index: a compiled decoder block reads them
        as its inputs, the same code for every layer (`route_blocks`). `scales`: the
        LoRA scalings of the slots `pieces` hold, when not all of them (`layer_scales`)."""
        self.lent_scales = scales
        for i, layer in enumerate(self.layers):
            layer.lora_stacked = (None if pieces is None
                                  else (pieces[2 * i], pieces[2 * i + 1]))

    def layer_scales(self) -> torch.Tensor:
        """The LoRA scalings [n, 1, 1] of the slots lent for this forward (all K: `scales`)."""
        return self.scales if self.lent_scales is None else self.lent_scales

    def layer_views(self, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """`layer`'s stacked A and B: what it was lent for this forward, else `views`."""
        if layer.lora_stacked is not None:
            return layer.lora_stacked
        return self.views(self.layers.index(layer))

    def views(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `index`-th layer's stacked A [K, r, in] and B [K, out, r] weights: what it
        was lent for this forward (`lend`), else slices of the stack."""
        lent = self.layers[index].lora_stacked
        if lent is not None:
            return lent
        k = self.flat.shape[0]
        out = []
        for off, shape in self.spans[2 * index : 2 * index + 2]:
            out.append(self.flat[:, off : off + shape.numel()].view(k, *shape))
        return out[0], out[1]

    def zero_grads(self) -> None:
        """Every member's LoRA gradients, zeroed in place: one kernel."""
        self.flat.grad.zero_()

    def member_norms(self) -> torch.Tensor:
        """[K]: the L2 norm of each slot's LoRA gradients (device values, no sync)."""
        return torch.linalg.vector_norm(self.flat.grad, 2.0, dim=1)

    def scale_grads(self, factors: torch.Tensor) -> None:
        """Multiply slot k's LoRA gradients by factors[k] (its clip factor): one kernel."""
        self.flat.grad.mul_(factors.to(self.flat.grad.dtype).view(-1, 1))

    def release(self) -> None:
        """Give every member's parameter back storage of its own (the stacks are about to
        be dropped)."""
        for k, adapter in enumerate(self.adapters):
            if adapter is not None:
                self.detach(k)


@contextmanager
def adapter_blocks(llm: nn.Module, blocks: list[tuple[str, int]]) -> Iterator[None]:
    """Route each block of rows (adapter, row count), in order, through its own adapter in
    every LoRA layer of `llm` (vanilla LoRA); other layer types take peft's per-row path.
    A routing in place before (a compiled group's) is put back afterwards."""
    vanilla = vanilla_lora_layers(llm, [a for a, _ in blocks])
    if vanilla is None:
        names = [a for a, n in blocks for _ in range(n)]
        with adapter_rows(llm, names):
            yield
        return
    saved = [(m.__dict__.get("forward"), m.__dict__.get("lora_route")) for m in vanilla]
    route_blocks(vanilla, tuple(blocks))
    try:
        yield
    finally:
        for m, (forward, route) in zip(vanilla, saved, strict=True):
            if forward is None:
                del m.forward, m.lora_route
            else:
                m.forward, m.lora_route = forward, route
