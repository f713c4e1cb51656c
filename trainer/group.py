"""Shared-weight trial groups: several Phase 2 trials in one process over one frozen LLM.

A sweep's trials differ only in what they train (projector, LoRA adapter) and how
(LRs, warmup, clipping, seed, batch size); the LLM under them is frozen and the same.
Loading it once and batching the trials' rows through it is the idea of HFTA
(Wang et al., arXiv 2102.02344: fuse the models of many trials into one so they share
the accelerator) and of ASPEN (Ye et al., arXiv 2312.02515: many LoRA jobs over one
shared base model, each row routed to its own adapter).

How one group step works (`TrialGroup.step`):
  * every active member draws its own micro-batch (its seed's epoch order, its batch size);
  * the rows are concatenated (text right-padded to the longest: with causal attention
    right padding changes nothing at the real positions), each member's prefix coming from
    its own projector;
  * ONE forward through the shared LLM, where every LoRA layer adds each row's own
    adapter (peft's per-row `adapter_names` path, fed by forward pre-hooks);
  * a loss per member over ITS target tokens only (`trainer.model.target_losses`, the
    function a solo run's `target_loss` calls, all members' target rows through the LM
    head together), and one backward of their sum. The members'
    parameters are disjoint and their rows independent (row-wise ops, per-row
    attention, frozen shared weights get no gradient), so each member's gradient is its
    solo gradient, and a NaN in one member's rows or loss stays in that member;
  * then per member, with the solo code (`trainer.loop`): norms, NaN guard, clipping,
    AdamW, schedule, NaN/divergence policy, metrics record, eval, checkpoint.

Each member is presented to that solo code as a `MemberView`: a `Phase2Model` whose
parameters are named exactly as in a solo run (its adapter shows up as peft's
"default"), so checkpoints and `trainable.safetensors` of a member load into a solo
model, and a solo `--resume` can continue a group member (and vice versa).

Exactness: with LoRA and projector dropout at 0 a member trains as the same config
trained alone, up to float rounding (bigger matmuls, longer padded sequences):
tests/test_group.py pins this. With dropout > 0 the masks come from the one process
RNG stream that every member draws from in turn, so group losses match solo runs in
distribution, not bit for bit (the order in which peft's layers draw the members'
masks even follows Python's string-hash order of the adapter names, so set
PYTHONHASHSEED for run-to-run repeatability; a compiled group draws one mask for all
members' rows when their rates agree, `_blocks_dropout`); for the same reason a
member's resume does not restore the RNG state saved in its checkpoint.

Requirements: the feature cache (encoders never run in a group), and one value per
group of everything the shared forward fixes (LLM, attention implementation, LoRA
target modules, compile mode, precision, gradient accumulation, data), and LoRA may not
target the token embedding or the LM head. With `model.compile` the shared forward is
compiled (`mode=reduce-overhead`: CUDA graphs over all members' rows at once; the
members' optimizer steps stay eager, with the device guard, and are read back together
once per window of `output.sync_every` group steps); it recompiles when the group's
make-up changes. Members of equal batch size then keep their LoRA weights as rows of one
[K, N] tensor (`LoraStacks`; each layer reads its [K, r, in] and [K, out, r] views,
HFTA's layout): one gradient for the whole group instead of one per member and
parameter, and all members' LoRA norms and clipping in one kernel each. Anything raised inside a
step (a fault hook, an out-of-memory) ends the whole group, as it would end the process
of a solo run; every member then resumes from its own checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.compile_guards import GuardSkip
from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX, place_features, to_device
from trainer.errors import ConfigError, Problem
from trainer.inputs import Inputs, prepare_inputs
from trainer.llm import prepare_llm
from trainer.loop import (
    WINDOW_MAX_S,
    AfterBackward,
    Run,
    State,
    StepTally,
    assemble_run,
    autocast_for,
    close_run,
    debug_hook,
    finish_step,
    flush_window,
    frozen_dtype,
    needs_host,
    open_sinks,
    prepare_run_dir,
    resolve_device,
    resolved_params,
    restore_state,
    scale_for_backward,
    seed_everything,
)
from trainer.metrics import MetricsSink, MultiSink, NanEvent, RunSummary
from trainer.model import (
    Phase2Model,
    Projector,
    batch_targets,
    cast_untargeted_linears,
    causal_lm,
    final_hidden,
    load_llm,
    lora_config,
    lora_target_names,
    low_precision_dtype,
    prefix_embeds,
    target_losses,
)
from trainer.step_guard import (
    DeviceGuard,
    PendingStep,
    group_norm,
    guard_inputs,
    launch_update,
    read_back,
)

SOLO_ADAPTER = "default"  # peft's adapter name in a solo run: checkpoints use it

# `...q_proj.lora_A.<adapter>.weight`, `...lora_embedding_A.<adapter>`: the adapter segment.
_ADAPTER_RE = re.compile(r"\.(lora_[A-Za-z_]+)\.([^.]+)(?=\.|$)")

# Every key whose value the shared forward fixes for the whole group.
SHARED_KEYS = (
    "model.llm_path", "model.attn_implementation", "model.lora.target_modules", "model.compile",
    "model.skip_compile_guards",
    "model.cast_frozen_linears", "phase2.precision", "phase2.gradient_accumulation_steps",
    "phase1.bundle_path",
    "data", "demo",
)


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


def _bmm_lora(result: torch.Tensor, xs: torch.Tensor, stack_a: torch.Tensor,
              stack_b: torch.Tensor, scale: float | torch.Tensor,
              weights_left: bool = True) -> torch.Tensor:
    """`result` plus every block's LoRA product: xs [K, rows x tokens, in], stack_a
    [K, r, in], stack_b [K, out, r], scale a float or [K, 1, 1].

    `weights_left` (for members' own parameters, stacked per call): the backward's weight
    gradients come out as contiguous [K, r, in] / [K, out, r], so each member's slice
    already has its parameter's layout and autograd takes it as the .grad without a copy
    (K x 2 copy kernels per LoRA layer and step saved). Activations on the left (for
    `LoraStacks`, whose gradients are concatenated anyway): the products are tall and
    thin ([rows x tokens, in] x [in, r]), which cuBLAS runs in about two thirds of the
    GPU time of the weights-left form on an H200 at the reference group's shapes
    (`bench/lora_kernels.py`, compiled forward + backward: 103 vs 153 us at out=896,
    74 vs 115 us at out=128), and the sum with `result` reads both contiguously.
    """
    k, width = xs.shape[0], result.shape[-1]
    if weights_left:
        h_t = torch.bmm(stack_a, xs.transpose(1, 2))  # [K, r, rows x tokens]
        delta_t = torch.bmm(stack_b, h_t) * scale  # [K, out, rows x tokens]
        return (result.view(k, -1, width) + delta_t.transpose(1, 2)).view(result.shape)
    h = torch.bmm(xs, stack_a.transpose(1, 2))  # [K, rows x tokens, r]
    delta = torch.bmm(h, stack_b.transpose(1, 2)) * scale  # [K, rows x tokens, out]
    return (result.view(k, -1, width) + delta).view(result.shape)


def _block_lora_forward(layer: nn.Module, blocks: list[tuple[str, int]],
                        stacks: LoraStacks | None, index: int, x: torch.Tensor,
                        *args: Any, **kwargs: Any) -> torch.Tensor:
    """A peft LoRA Linear over a batch whose rows come in contiguous per-adapter blocks.

    The same sum as peft's vanilla path (`base(x) + B(A(dropout(x))) * scaling`, with x
    cast to A's dtype), computed per block on slices instead of peft's per-row gather and
    scatter; when every block has as many rows and the adapters the same shapes (the
    usual sweep), all members' LoRA products are two batched matmuls whatever the group
    size: the launch count no longer grows with the number of members. `stacks`: the
    blocks' weights held in one tensor (`LoraStacks`, for blocks that
    `LoraStacks.stackable` accepted), this layer's being its `index`-th A and B views,
    read instead of the members' parameters.
    """
    result = layer.base_layer(x, *args, **kwargs)
    out_dtype = result.dtype
    names = [a for a, _ in blocks]
    sizes = [n for _, n in blocks]
    if stacks is not None:  # equal blocks, equal shapes: the batched path
        stack_a, stack_b = stacks.views(index)
        x = _blocks_dropout(layer, names, sizes, x.to(stack_a.dtype))  # peft's cast, dropout
        xs = x.reshape(len(blocks), -1, x.shape[-1])  # a view, no copy
        return _bmm_lora(result, xs, stack_a, stack_b, _scales(layer, names, xs),
                         weights_left=False).to(out_dtype)
    lora_a = [layer.lora_A[a].weight for a in names]
    lora_b = [layer.lora_B[a].weight for a in names]
    x = _blocks_dropout(layer, names, sizes, x.to(lora_a[0].dtype))  # peft's cast, dropout
    if _equal_blocks(layer, names, sizes) and len(blocks) > 1:
        xs = x.reshape(len(blocks), -1, x.shape[-1])  # [K, rows x tokens, in], a view
        return _bmm_lora(result, xs, torch.stack(lora_a), torch.stack(lora_b),
                         _scales(layer, names, xs)).to(out_dtype)
    # split, not x[s:e]: a slice's backward fills a zero tensor of x's full size per
    # block (K x the activations per layer); split's backward is one cat.
    delta = torch.cat([F.linear(F.linear(xb, a), b) * layer.scaling[n]
                       for n, xb, a, b in zip(names, x.split(sizes), lora_a, lora_b,
                                              strict=True)])
    return (result + delta).to(out_dtype)


def _blocks_dropout(layer: nn.Module, names: list[str], sizes: list[int],
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


def _equal_blocks(layer: nn.Module, names: list[str], sizes: list[int]) -> bool:
    """Every block as many rows, every adapter's A (and B) the same shape: one bmm."""
    return (len(set(sizes)) == 1
            and len({layer.lora_A[a].weight.shape for a in names}) == 1
            and len({layer.lora_B[a].weight.shape for a in names}) == 1)


def _scales(layer: nn.Module, names: list[str], like: torch.Tensor) -> float | torch.Tensor:
    """The blocks' LoRA scalings: one float when they agree (the usual sweep: no tensor to
    copy to the device), else [K, 1, 1] through pinned memory (a constant once compiled)."""
    scales = [layer.scaling[a] for a in names]
    if len(set(scales)) == 1:
        return scales[0]
    return to_device(torch.tensor(scales, dtype=like.dtype).view(-1, 1, 1), like.device)


def _vanilla_lora_layers(llm: nn.Module, adapters: Collection[str]) -> list[nn.Module] | None:
    """Every LoRA layer of `llm`, if all are plain peft LoRA Linears for `adapters` (None
    when some layer needs peft's own per-row path: another layer type or a LoRA variant)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = [m for m in llm.modules() if isinstance(m, LoraLayer)]  # one walk per forward
    vanilla = [m for m in layers if isinstance(m, LoraLinear)
               and not any(a in m.lora_variant for a in adapters)]
    return vanilla if len(vanilla) == len(layers) else None


def route_blocks(layers: list[nn.Module], blocks: tuple[tuple[str, int], ...],
                 stacks: LoraStacks | None = None) -> None:
    """Make each block of rows (adapter, row count), in order, take its own adapter in
    every one of `layers` until routed otherwise: an instance attribute shadows the
    class's forward. A compiled forward sees the same routing objects step after step
    (so it recompiles only when the blocks change). With `stacks`, each layer computes
    from its stacked weights."""
    for i, m in enumerate(layers):
        m.forward = functools.partial(_block_lora_forward, m, blocks, stacks, i)


class LoraStacks:
    """Every member's LoRA weights held in one [K, N] parameter, the members in block order:
    row k is member k's A and B weights of every layer, flattened one after the other.
    Each layer reads [K, r, in] and [K, out, r] views of it (HFTA's fused layout), taken
    inside the compiled graph.

    The members' own parameters become views of their spans of a row, and their
    gradients views of the same spans of the one gradient, kept for as long as the stacks
    live (zeroed in place before each step, never set to None): their optimizers,
    checkpoints and weight files work on them unchanged. The shared forward reads the one
    parameter: one graph input and one gradient node for all LoRA weights of the group
    (at K=8 on the reference model, instead of 1,536 of each), and since a member's LoRA
    gradients are one contiguous row, the group takes every member's LoRA gradient norm
    in one reduction and clips them all in one multiply (`member_norms`, `scale_grads`).

    Inside the shared forward the layers read `pieces`, which `split` makes once per
    forward: the stack cast once to the compute dtype (`compute_dtype`: autocast's, None
    for fp32), then split. Slicing the fp32 stack per layer instead made autograd sum 192
    zero-padded slice gradients, which Inductor fuses into one kernel testing every slice
    at every element: 1.1 ms of a 40 ms group step at K=8 on an H200 (run 18), against
    one concatenation and one cast here; the per-layer casts of the slices go too.
    """

    def __init__(self, layers: list[nn.Module], adapters: list[str],
                 compute_dtype: torch.dtype | None = None) -> None:
        # Every member's weights have these shapes (`stackable` checked it).
        shapes = [getattr(layer, attr)[adapters[0]].weight.shape
                  for layer in layers for attr in ("lora_A", "lora_B")]
        offsets = [0]
        for shape in shapes:
            offsets.append(offsets[-1] + shape.numel())
        self.adapters = list(adapters)
        self.spans = list(zip(offsets[:-1], shapes, strict=True))  # (offset, shape) per weight
        like = layers[0].lora_A[adapters[0]].weight
        # A Parameter, so a CUDA-graph forward takes it as a static input (no copy).
        self.flat = nn.Parameter(torch.empty(len(adapters), offsets[-1], dtype=like.dtype,
                                             device=like.device))
        self.flat.grad = torch.zeros_like(self.flat)  # backward adds into it in place
        self.compute_dtype = compute_dtype if compute_dtype != like.dtype else None
        self.pieces: list[torch.Tensor] | None = None  # set during one forward (`split`)
        self._params: list[nn.Parameter] = []
        with torch.no_grad():
            for k, adapter in enumerate(adapters):
                weights = [getattr(layer, attr)[adapter].weight
                           for layer in layers for attr in ("lora_A", "lora_B")]
                for p, (off, shape) in zip(weights, self.spans, strict=True):
                    span = slice(off, off + shape.numel())
                    self.flat.data[k, span] = p.detach().reshape(-1)
                    p.data = self.flat.data[k, span].view(shape)  # a view of its span
                    p.grad = self.flat.grad[k, span].view(shape)
                    self._params.append(p)

    @staticmethod
    def stackable(layers: list[nn.Module], adapters: list[str], sizes: list[int]) -> bool:
        """Whether `layers` take the batched path for these blocks in every call: more than
        one block, equal row counts, equal adapter shapes, and one dtype and device for
        all LoRA weights (they share one tensor). LoRA dropout does not matter
        (`_blocks_dropout`)."""
        kinds = {(p.dtype, p.device) for layer in layers for attr in ("lora_A", "lora_B")
                 for p in (getattr(layer, attr)[a].weight for a in adapters)}
        return len(adapters) > 1 and len(kinds) == 1 and all(
            _equal_blocks(layer, adapters, sizes) for layer in layers)

    def split(self) -> list[torch.Tensor]:
        """Every layer's A [K, r, in] and B [K, out, r] weights in the compute dtype, in
        layer order: one cast of the stack and one split (whose backward is one cat)."""
        k = self.flat.shape[0]
        flat = self.flat if self.compute_dtype is None else self.flat.to(self.compute_dtype)
        sizes = [shape.numel() for _, shape in self.spans]
        return [t.view(k, *shape) for t, (_, shape)
                in zip(flat.split(sizes, dim=1), self.spans, strict=True)]

    def views(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `index`-th layer's stacked A [K, r, in] and B [K, out, r] weights: this
        forward's `pieces` when set, else slices of the stack."""
        if self.pieces is not None:
            return self.pieces[2 * index], self.pieces[2 * index + 1]
        k = self.flat.shape[0]
        out = []
        for off, shape in self.spans[2 * index : 2 * index + 2]:
            out.append(self.flat[:, off : off + shape.numel()].view(k, *shape))
        return out[0], out[1]

    def zero_grads(self) -> None:
        """Every member's LoRA gradients, zeroed in place: one kernel."""
        self.flat.grad.zero_()

    def member_norms(self) -> torch.Tensor:
        """[K]: the L2 norm of each member's LoRA gradients (device values, no sync)."""
        return torch.linalg.vector_norm(self.flat.grad, 2.0, dim=1)

    def scale_grads(self, factors: torch.Tensor) -> None:
        """Multiply member k's LoRA gradients by factors[k] (its clip factor): one kernel."""
        self.flat.grad.mul_(factors.to(self.flat.grad.dtype).view(-1, 1))

    def release(self) -> None:
        """Give every member's parameter back storage of its own (the group's make-up is
        about to change; a removed member's span simply goes with the stack)."""
        with torch.no_grad():
            for p in self._params:
                p.data = p.data.clone()
                p.grad = None


@contextmanager
def adapter_blocks(llm: nn.Module, blocks: list[tuple[str, int]]) -> Iterator[None]:
    """Route each block of rows (adapter, row count), in order, through its own adapter in
    every LoRA layer of `llm` (vanilla LoRA); other layer types take peft's per-row path.
    A routing in place before (a compiled group's) is put back afterwards."""
    vanilla = _vanilla_lora_layers(llm, [a for a, _ in blocks])
    if vanilla is None:
        names = [a for a, n in blocks for _ in range(n)]
        with adapter_rows(llm, names):
            yield
        return
    saved = [m.__dict__.get("forward") for m in vanilla]
    route_blocks(vanilla, tuple(blocks))
    try:
        yield
    finally:
        for m, forward in zip(vanilla, saved, strict=True):
            if forward is None:
                del m.forward
            else:
                m.forward = forward


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
    embeds, blocks = [], []
    for p in parts:
        # Padding ids are never attended by a real position (final_hidden): any id will do.
        embeds.append(prefix_embeds(p.projector, lm.get_input_embeddings(), p.features,
                                    _pad_right(p.input_ids, length, 0)))
        blocks.append((p.adapter, p.features.shape[0]))
    if routed:
        hidden = final_hidden(lm, torch.cat(embeds))
    else:
        with adapter_blocks(llm, blocks):
            hidden = final_hidden(lm, torch.cat(embeds))
    blocks, start = [], 0
    for p in parts:  # each member's loss over its own rows and target tokens only
        blocks.append((start, batch_targets(_pad_right(p.labels, length, IGNORE_INDEX),
                                            p.features.shape[1], routed, hidden.device)))
        start += p.features.shape[0]
    return target_losses(hidden, blocks, lm.get_output_embeddings())


def stacked_rows_losses(llm: nn.Module, parts: list[Rows],
                        stacks: LoraStacks | None) -> list[torch.Tensor]:
    """A compiled group's forward (`rows_losses`, routed): with `stacks`, its layers read
    the weights `stacks.split` makes once for this forward."""
    if stacks is None:
        return rows_losses(llm, parts, routed=True)
    stacks.pieces = stacks.split()
    try:
        return rows_losses(llm, parts, routed=True)
    finally:
        stacks.pieces = None


class MemberView(Phase2Model):
    """One member seen as a solo `Phase2Model`.

    Its forward runs its rows through the shared LLM and its own adapter, and its
    parameters carry solo names: its projector, the frozen base weights and its own
    LoRA weights under peft's "default" name; other members' adapters are invisible.
    So the solo optimizer groups, checkpoints, weight files and fault hooks work on it
    unchanged.
    """

    def __init__(self, projector: Projector, llm: nn.Module, adapter: str) -> None:
        super().__init__(projector, llm)
        self.adapter = adapter

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        rows = Rows(self.projector, self.adapter, features, input_ids, labels)
        return rows_losses(self.llm, [rows])[0]

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            owner = adapter_of(name)
            if owner is None:
                yield name, p
            elif owner == self.adapter:
                yield solo_name(name, self.adapter), p


@dataclass
class Member:
    """A trial training in the group: its solo `Run`/`State` plus its sinks and clocks."""

    member_id: str
    adapter: str
    run: Run
    state: State
    sink: MultiSink
    t0: float
    t_last: float
    guard: DeviceGuard | None = None  # the device NaN guard of runs that use it
    report_due: Callable[[int], bool] | None = None  # see TrialGroup.add_member
    pending: list[PendingStep] = field(default_factory=list)  # launched, not read back yet


def _leaves(node: Any, key: str) -> dict[str, Any]:
    """Dotted leaf keys under `key` of plain config data, so a problem names the exact key."""
    if isinstance(node, dict):
        return {k: v for sub, child in node.items()
                for k, v in _leaves(child, f"{key}.{sub}").items()}
    return {key: node}


def _shared_values(cfg: TrainConfig) -> dict[str, Any]:
    plain = cfg.to_plain()
    out: dict[str, Any] = {}
    for key in SHARED_KEYS:
        node: Any = plain
        for part in key.split("."):
            node = node[part]
        out.update(_leaves(node, key))
    return out


def group_problems(ref: TrainConfig | None, cfg: TrainConfig, inputs: Inputs,
                   source: str = "config") -> list[Problem]:
    """Why `cfg` cannot join a group whose first member had `ref` (empty when it can)."""
    problems = []
    if not cfg.data.feature_cache or inputs.feature_cache is None:
        problems.append(Problem(
            source, "data.feature_cache", "is off, but a trial group trains on cached features "
            "only (the frozen encoders never run in a group)",
            "set data.feature_cache=true, or train this trial alone"))
    mine_all = _shared_values(cfg)
    theirs_all = _shared_values(ref) if ref is not None else mine_all
    reported = {p.key for p in problems}
    for key, mine in mine_all.items():
        theirs = theirs_all[key]
        if mine != theirs and key not in reported:
            problems.append(Problem(
                source, key, f"{mine!r} differs from the group's {theirs!r}; every member of "
                "a trial group shares it", "group only trials that agree on it, or train "
                "this trial alone"))
    return problems


def io_lora_problems(lm: nn.Module, cfg: TrainConfig, source: str = "config") -> list[Problem]:
    """LoRA on the token embedding or the LM head cannot be routed per row in a group.

    The group embeds every row and applies the LM head outside the per-row adapter
    routing (the head only on target positions), so those two must stay plain modules.
    """
    io = (lm.get_input_embeddings(), lm.get_output_embeddings())
    modules = dict(lm.named_modules())
    hit = sorted(n for n in lora_target_names(lm, cfg.model.lora.target_modules)
                 if any(modules[n] is x for x in io))
    if not hit:
        return []
    return [Problem(source, "model.lora.target_modules",
                    f"{hit} adapt the token embedding or the LM head, which a trial group "
                    "shares unadapted", "target only layers inside the decoder, or train "
                    "this trial alone")]


class TrialGroup:
    """Phase 2 trials training together over one frozen LLM; see the module docstring."""

    def __init__(self, inputs: Inputs, device: str | None = None, log: Callable = print) -> None:
        self.inputs = inputs
        self.device = resolve_device(device)
        self.log = log
        self.members: dict[str, Member] = {}
        self._ref: TrainConfig | None = None  # the first member's config: the group's keys
        self._lm: nn.Module | None = None  # the CausalLM, loaded once at the first member
        self._peft: nn.Module | None = None  # the peft wrapper holding every member's adapter
        self._tokenizer = None
        self._next_adapter = 0
        self.member_steps = 0  # optimizer steps trained, summed over members (for stats)
        self.sync_s = 0.0  # time spent waiting in read-backs (for stats)
        self._live_adapters: set[str] = set()  # adapters whose LoRA weights must train
        self._compiled: Callable[..., list[torch.Tensor]] | None = None  # model.compile
        self._routed: tuple[tuple[str, int], ...] | None = None  # blocks route_blocks set
        self._routed_layers: list[nn.Module] | None = None  # their layers (None: per-row)
        self._stacks: LoraStacks | None = None  # the routed make-up's stacked LoRA weights
        self._guard_skip: GuardSkip | None = None  # compiled, model.skip_compile_guards
        self._routings = 0  # how many times the LoRA layers were routed (make-up changes)
        self._device_features: dict[tuple[str, ...], torch.Tensor] = {}  # by split rows

    @property
    def compiled(self) -> bool:
        """Whether the shared forward is compiled (each new make-up is a new graph)."""
        return self._compiled is not None

    @property
    def llm(self) -> nn.Module | None:
        """The shared peft-wrapped LLM holding every member's adapter (None before the first)."""
        return self._peft

    # ------------------------------------------------------------------ membership

    def add_member(self, member_id: str, cfg: TrainConfig, sink: MetricsSink | None = None, *,
                   resume: bool = False, after_backward: AfterBackward | None = None,
                   console: bool = False, source: str = "config",
                   report_due: Callable[[int], bool] | None = None) -> None:
        """Start (or with `resume`, continue) one trial in the group, as `train()` would.

        `report_due(n)`: whether the member's n-th record from now is one its consumer must
        see before the member trains on (a Tune trial's report, where ASHA may stop it);
        the member's read-back window then ends at that step, so it never trains past it.
        """
        if member_id in self.members:
            raise ValueError(f"trial group already has a member {member_id!r}")
        problems = group_problems(self._ref, cfg, self.inputs, source)
        if problems:
            raise ConfigError(problems)
        t0 = time.perf_counter()
        if self._lm is None:
            tokenizer = prepare_llm(self.inputs.llm_dir, cfg.model.lora, source, self.log)
            lm = load_llm(self.inputs.llm_dir, cfg.model.attn_implementation, str(self.device))
            cast_untargeted_linears(lm, cfg.model.lora.target_modules, frozen_dtype(cfg))
            problems = io_lora_problems(lm, cfg, source)
            if problems:
                raise ConfigError(problems)
            self._lm, self._tokenizer = lm, tokenizer
            self._ref = cfg.model_copy(deep=True)  # what the loaded LLM was loaded with
            if cfg.model.compile != "off":
                # One compiled forward (and, with reduce-overhead, one CUDA graph) per group
                # make-up: batches keep the split's full length and a fixed target capacity,
                # so the shapes change only when a member joins or leaves.
                self._compiled = torch.compile(stacked_rows_losses, mode=cfg.model.compile,
                                               dynamic=False)
                if cfg.model.skip_compile_guards:
                    self._guard_skip = GuardSkip()
        train_split, eval_split, plan, run_dir = prepare_run_dir(
            cfg, self.inputs, self._tokenizer, resume=resume, source=source)
        # Every member trains on the same split (one data config per group): one copy.
        train_split = place_features(train_split, self.device, cfg.data.features_on_device,
                                     self._device_features)
        features = train_split.features
        adapter = f"member{self._next_adapter}"  # peft names must be plain identifiers
        self._next_adapter += 1
        view = self._new_view(cfg, adapter, features.shape[-1])
        try:
            run = assemble_run(cfg, plan, view, train_split, eval_split, None, self.device,
                               run_dir, features.shape[1], self.log)
            run.after_backward = debug_hook(cfg, after_backward)
            state = restore_state(run, self.log, restore_rng=False) if resume else State()
            out = open_sinks(run, state, sink, resume=resume, console=console,
                             console_prefix=f"[{member_id}] ")
        except BaseException:
            self._delete_adapter(adapter)
            raise
        out.log_params(resolved_params(cfg, plan))
        guard = DeviceGuard.start(state, self.device) if run.device_guard else None
        self.members[member_id] = Member(member_id, adapter, run, state, out, t0,
                                         time.perf_counter(), guard, report_due)

    def remove_member(self, member_id: str, end_reason: str = "stopped") -> RunSummary:
        """End a member from outside (e.g. an ASHA stop): weights, summary, memory freed.
        Its steps not read back yet are finished first (the weights already hold them);
        should one of them end the run, that is the summary's end reason."""
        m = self.members[member_id]
        if m.pending:
            ended = self._flush([m])
            if member_id in ended:
                return ended[member_id]
        return self._close(m, end_reason)

    # ------------------------------------------------------------------ training

    def step(self, only: Collection[str] | None = None) -> dict[str, RunSummary]:
        """One optimizer step of every active member (or of the members in `only`; the
        others wait, e.g. while their reports are unread); the summaries of those that
        ended.

        Members with the device guard are read back a window at a time, as a solo run is
        (`output.sync_every`, WINDOW_MAX_S, and at once at steps the host must see or
        that `report_due` names): all of them together, so a window costs the whole group
        one sync. Their records arrive at the window's end."""
        finished = {}
        for m in [m for m in self.members.values() if m.state.step >= m.run.plan.total_steps]:
            finished[m.member_id] = self._close(m, "completed")  # resumed at its last step
        active = [m for m in self.members.values() if only is None or m.member_id in only]
        if not active:
            return finished
        self.member_steps += len(active)
        for m, result in zip(active, self._train_step(active), strict=True):
            if isinstance(result, PendingStep):
                m.pending.append(result)
                continue
            # The host guard's record, at once (such a member never has steps pending).
            now = time.perf_counter()
            dt, m.t_last = max(now - m.t_last, 1e-9), now
            end_reason = finish_step(m.run, m.state, m.state.step + 1, *result, m.sink, dt)
            if end_reason is not None:
                finished[m.member_id] = self._close(m, end_reason)
        if any(self._window_due(m) for m in self.members.values() if m.pending):
            finished.update(self._flush([m for m in self.members.values() if m.pending]))
        return finished

    def _window_due(self, m: Member) -> bool:
        n = len(m.pending)
        return (n >= m.run.sync_every or needs_host(m.run, m.pending[-1].step)
                or (m.report_due is not None and m.report_due(n))
                or time.perf_counter() - m.t_last >= WINDOW_MAX_S)

    def _flush(self, members: list[Member]) -> dict[str, RunSummary]:
        """Read back every launched step of `members` in one transfer, then finish each
        member's window in step order (`trainer.loop.flush_window`); who ended."""
        t0 = time.perf_counter()
        rows = read_back([p for m in members for p in m.pending])  # the one sync
        # How long the host waited for the device: most of a step when the device is the
        # bottleneck, near 0 when the host is, or when the host blocks in its launches
        # instead (a full GPU queue under CUDA graphs).
        self.sync_s += time.perf_counter() - t0
        now = time.perf_counter()
        finished, start = {}, 0
        for m in members:
            n = len(m.pending)
            dt, m.t_last = max(now - m.t_last, 1e-9) / n, now  # per step, window mean
            pending, m.pending = m.pending, []
            end_reason = flush_window(m.run, m.state, pending, rows[start : start + n],
                                      m.sink, dt)
            start += n
            if end_reason is not None:
                finished[m.member_id] = self._close(m, end_reason)
        return finished

    def _train_step(self, active: list[Member]
                    ) -> list[PendingStep | tuple[dict[str, Any], NanEvent | None]]:
        """Shared forward/backward over every member's micro-batches, then each one's step:
        a launched `PendingStep` for members with the device guard (nothing read back),
        (record, NaN event) for those with the host guard."""
        # A member's steps not read back yet are not in its State.
        steps = [(m.pending[-1].step if m.pending else m.state.step) + 1 for m in active]
        tallies = [StepTally(torch.zeros((), device=self.device)) for _ in active]
        static = self._route(active)  # compiled: the LoRA routing of this make-up is set
        if self._stacks is None:
            for m in active:
                m.run.optimizer.zero_grad(set_to_none=True)
        else:  # the LoRA gradients are views of the stacks' gradients, zeroed in place
            for m in active:
                for p in m.run.groups["projector"]:
                    p.grad = None
            self._stacks.zero_grads()
        dev = self.device
        for j in range(self._ref.phase2.gradient_accumulation_steps):
            batches = [m.run.train.batch(m.run.micro_batch(s - 1, j), trim=not static)
                       for m, s in zip(active, steps, strict=True)]
            # Labels stay on the CPU, as in a solo run (no sync in the loss); a compiled
            # forward takes them on the device (static targets, no CPU tensor in the graph).
            parts = [Rows(m.run.model.projector, m.adapter,
                          *(to_device(b[k], dev) for k in ("features", "input_ids")),
                          to_device(b["labels"], dev) if static else b["labels"])
                     for m, b in zip(active, batches, strict=True)]
            with autocast_for(active[0].run):  # one precision per group
                if static:
                    with self._skip_guards(parts):
                        losses = self._compiled(self._peft, parts, self._stacks)
                else:
                    losses = rows_losses(self._peft, parts)
            # Members' parameters are disjoint: the gradient of the sum w.r.t. a member's
            # parameters is the gradient of its own loss (its own fp16 scale included).
            total = sum(scale_for_backward(m.run, loss)
                        for m, loss in zip(active, losses, strict=True))
            total.backward()
            for m, tally, b, loss in zip(active, tallies, batches, losses, strict=True):
                tally.add(m.run, b, loss)
        if self._stacks is not None and all(m.guard is not None for m in active):
            return self._launch_stacked(active, tallies, steps)
        return [tally.launch(m.run, m.guard, s) if m.guard is not None
                else tally.optimizer_step(m.run, m.state, s)
                for m, tally, s in zip(active, tallies, steps, strict=True)]

    def _launch_stacked(self, active: list[Member], tallies: list[StepTally],
                        steps: list[int]) -> list[PendingStep]:
        """The device-guarded steps of members on stacked LoRA weights, as `StepTally.launch`
        takes them one by one, but with every member's LoRA gradient norm taken in one
        reduction and their clipping done in one multiply (per member, those are a
        launch per LoRA tensor: host time that bounds a group step)."""
        assert self._stacks.adapters == [m.adapter for m in active]  # rows in block order
        for m, s in zip(active, steps, strict=True):
            if m.run.after_backward is not None:  # may change gradients: before the norms
                m.run.after_backward(s, m.run.model)
        lora = self._stacks.member_norms()
        gis = [guard_inputs(m.run, t.loss_sum / m.run.plan.accum,
                            [group_norm(m.run, "projector"), lora[k]])
               for k, (m, t) in enumerate(zip(active, tallies, strict=True))]
        if any(gi.factor is not None for gi in gis):
            one = torch.ones((), device=self.device)
            self._stacks.scale_grads(torch.stack([one if gi.factor is None else gi.factor
                                                  for gi in gis]))
            for m, gi in zip(active, gis, strict=True):
                grads = [p.grad for p in m.run.groups["projector"] if p.grad is not None]
                if gi.factor is not None and grads:
                    torch._foreach_mul_(grads, gi.factor)
        return [launch_update(m.run, m.guard, s, gi, t.samples, t.tokens)
                for m, t, s, gi in zip(active, tallies, steps, gis, strict=True)]

    # ------------------------------------------------------------------ internals

    def _route(self, active: list[Member]) -> bool:
        """For a compiled group, route every LoRA layer to the active members' row blocks,
        once per make-up (not per step); whether the compiled forward applies (False: not
        compiled, or a layer needs peft's per-row path, which runs eager)."""
        if self._compiled is None:
            return False
        # Every micro-batch of a member holds exactly batch_size rows (plan_steps drops
        # incomplete ones), so the make-up fixes the blocks.
        blocks = tuple((m.adapter, m.run.plan.batch_size) for m in active)
        if blocks != self._routed:
            # A new make-up is a new graph (its routing objects and stacks are new, and
            # the old ones never come back: adapter names are not reused). Drop the old
            # graphs first: Dynamo keeps at most `recompile_limit` (8) per function and
            # then runs it eagerly for good, which a sweep's ninth make-up would reach,
            # and their CUDA graphs hold memory. Inductor's on-disk cache is kept.
            torch.compiler.reset()
            self._routings += 1
            self._unstack()
            adapters = [a for a, _ in blocks]
            self._routed_layers = _vanilla_lora_layers(self._peft, adapters)
            if self._routed_layers is not None:
                if LoraStacks.stackable(self._routed_layers, adapters, [n for _, n in blocks]):
                    self._stacks = LoraStacks(self._routed_layers, adapters,
                                              low_precision_dtype(self._ref.phase2.precision))
                route_blocks(self._routed_layers, blocks, self._stacks)
            self._routed = blocks
        return self._routed_layers is not None

    def _skip_guards(self, parts: list[Rows]) -> contextlib.AbstractContextManager:
        """The compiled forward's guard check, skipped once this make-up's calls repeat
        (`trainer.compile_guards`). Each routing is a signature of its own, so every
        make-up change is checked in full first, even back to an earlier make-up (its
        members' LoRA stacks are new tensors then)."""
        if self._guard_skip is None:
            return contextlib.nullcontext()
        tensors = [t for p in parts for t in (p.features, p.input_ids, p.labels)]
        return self._guard_skip.around(self._peft, *tensors, key=self._routings)

    def _unstack(self) -> None:
        if self._stacks is not None:
            self._stacks.release()
            self._stacks = None

    def _new_view(self, cfg: TrainConfig, adapter: str, align_dim: int) -> MemberView:
        """A new adapter + projector with the solo run's initial weights, bit for bit."""
        from peft import get_peft_model

        m = cfg.model
        # The RNG order of trainer.model.build_model: seed, LoRA init, projector init.
        seed_everything(cfg.phase2.seed)
        lcfg = lora_config(m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
        with warnings.catch_warnings():  # peft warns about several adapters in one model
            warnings.simplefilter("ignore")
            if self._peft is None:
                self._peft = get_peft_model(self._lm, lcfg, adapter_name=adapter)
            else:
                self._peft.add_adapter(adapter, lcfg)
        hidden = self._lm.config.hidden_size
        projector = Projector(align_dim, hidden, m.projector.hidden_dim or 4 * hidden,
                              m.projector.dropout).to(self.device)
        self._live_adapters = {*self._adapters(), adapter}
        self._mark_trainable()
        view = MemberView(projector, self._peft, adapter)
        view.train()
        return view

    def _adapters(self) -> set[str]:
        return {m.adapter for m in self.members.values()}

    def _mark_trainable(self) -> None:
        # peft keeps only its *active* adapter trainable (add/delete re-apply that): every
        # member's LoRA weights must train, and the shared base weights never.
        for name, p in self._peft.named_parameters():
            p.requires_grad_(adapter_of(name) in self._live_adapters)

    def _delete_adapter(self, adapter: str) -> None:
        with warnings.catch_warnings():  # "adapter was active, setting another active"
            warnings.simplefilter("ignore")
            self._peft.delete_adapter(adapter)
        self._live_adapters = self._adapters() - {adapter}
        self._mark_trainable()

    def _close(self, m: Member, end_reason: str) -> RunSummary:
        summary = close_run(m.run, m.state, m.sink, end_reason, time.perf_counter() - m.t0)
        del self.members[m.member_id]
        # Drop the member's gradients, optimizer moments and adapter now, not at the end
        # of the group: a finished trial's memory goes back to the members still training.
        m.run.optimizer.zero_grad(set_to_none=True)
        m.run.optimizer.state.clear()
        if self._stacks is not None:  # the make-up changes: rebuilt at the next step
            self._unstack()
            self._routed = None
        self._delete_adapter(m.adapter)
        return summary


def train_group(cfgs: list[TrainConfig], sinks: list[MetricsSink | None] | None = None, *,
                inputs: Inputs | None = None, device: str | None = None,
                log: Callable = print) -> list[RunSummary]:
    """Train `cfgs` as one trial group until every member ends; summaries in `cfgs` order."""
    sinks = sinks if sinks is not None else [None] * len(cfgs)
    inputs = inputs or prepare_inputs(cfgs[0], log)
    group = TrialGroup(inputs, device, log)
    ids = [f"{i}:{cfg.output.run_name}" for i, cfg in enumerate(cfgs)]
    for member_id, cfg, sink in zip(ids, cfgs, sinks, strict=True):
        group.add_member(member_id, cfg, sink)
    summaries: dict[str, RunSummary] = {}
    while group.members:
        summaries.update(group.step())
    return [summaries[i] for i in ids]
