"""Batched multi-LoRA (trainer.multilora): each block of rows gets exactly its own
adapter's product, as peft computes it with that adapter active, in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.multilora import (
    LoraStacks,
    adapter_blocks,
    adapter_of,
    bmm_lora,
    route_blocks,
    solo_name,
    vanilla_lora_layers,
)

IN, HIDDEN, OUT = 12, 10, 6
ADAPTERS = ["member0", "member1", "member2"]
# Per adapter: (rank, alpha). Equal shapes and scalings take the batched path; the
# third set differs in rank and scaling, so its layers take the per-block path.
SAME = [(4, 8), (4, 8), (4, 8)]
MIXED = [(4, 8), (2, 3), (4, 16)]


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(IN, HIDDEN)
        self.down = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _peft_model(ranks: list[tuple[int, int]], dropout: float = 0.0) -> nn.Module:
    """A two-layer peft model holding one randomly initialised adapter per member (peft's
    default B = 0 would make every product zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = None
    for name, (r, alpha) in zip(ADAPTERS, ranks, strict=True):
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                         target_modules=["up", "down"], init_lora_weights=False)
        if model is None:
            model = get_peft_model(TwoLinears(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    for n, p in model.named_parameters():
        p.requires_grad_(adapter_of(n) is not None)
    return model


def _lora_params(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if adapter_of(n) == adapter}


def _peft_reference(model: nn.Module, xs: list[torch.Tensor]
                    ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Each block through peft with only its own adapter active: outputs, and the gradients
    of sum(out^2) w.r.t. that adapter's weights."""
    outs, grads = [], []
    for adapter, x in zip(ADAPTERS, xs, strict=True):
        model.base_model.set_adapter(adapter)
        params = _lora_params(model, adapter)
        for p in params.values():
            p.requires_grad_(True)
        out = model(x)
        outs.append(out.detach())
        got = torch.autograd.grad(out.pow(2).sum(), list(params.values()))
        grads.append({n: g for n, g in zip(params, got, strict=True)})
    model.base_model.set_adapter(ADAPTERS)  # every adapter active again, as in a group
    for n, p in model.named_parameters():
        p.requires_grad_(adapter_of(n) is not None)
    return outs, grads


def _assert_matches_peft(model: nn.Module, xs: list[torch.Tensor], out: torch.Tensor,
                         ref_out: list[torch.Tensor], ref_grads: list[dict]) -> None:
    for k, o in enumerate(out.detach().split([len(x) for x in xs])):
        torch.testing.assert_close(o, ref_out[k], rtol=1e-5, atol=1e-6)
    for p in model.parameters():
        p.grad = None
    out.pow(2).sum().backward()
    for adapter, ref in zip(ADAPTERS, ref_grads, strict=True):
        for n, p in _lora_params(model, adapter).items():
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("ranks", "sizes"), [(SAME, [3, 3, 3]), (SAME, [2, 4, 3]),
                                              (MIXED, [3, 3, 3])])
def test_routed_blocks_give_each_member_its_peft_product(ranks, sizes):
    """`adapter_blocks` (the eager group's routing): the batched bmm path (equal blocks and
    shapes), the per-block path (unequal rows, or unequal ranks and scalings): every
    block's output and its adapter's gradients are peft's with that adapter alone."""
    model = _peft_model(ranks)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 5, IN, generator=g) for n in sizes]
    ref_out, ref_grads = _peft_reference(model, xs)
    with adapter_blocks(model, list(zip(ADAPTERS, sizes, strict=True))):
        out = model(torch.cat(xs))
    _assert_matches_peft(model, xs, out, ref_out, ref_grads)
    # The routing is undone: peft's own forward (every adapter summed) is back.
    layers = vanilla_lora_layers(model, ADAPTERS)
    assert layers and all("forward" not in m.__dict__ for m in layers)


def test_stacked_weights_give_each_member_its_peft_product():
    """`LoraStacks`: every member's weights in one tensor, read through per-layer views;
    the products are peft's and the gradients land in each member's own parameters (views
    of the one stacked gradient), also after `split` (a compiled group's read)."""
    model = _peft_model(SAME)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 5, IN, generator=g) for _ in ADAPTERS]
    ref_out, ref_grads = _peft_reference(model, xs)
    layers = vanilla_lora_layers(model, ADAPTERS)
    blocks = tuple((a, 3) for a in ADAPTERS)
    assert LoraStacks.stackable(layers, ADAPTERS, [3, 3, 3])
    assert not LoraStacks.stackable(layers, ADAPTERS[:1], [3])  # one member: nothing to stack
    stacks = LoraStacks(layers, ADAPTERS)
    route_blocks(layers, blocks, stacks)
    for use_split in (False, True):
        stacks.zero_grads()
        stacks.lend(stacks.split() if use_split else None)
        out = model(torch.cat(xs))
        for k, o in enumerate(out.detach().split(3)):
            torch.testing.assert_close(o, ref_out[k], rtol=1e-5, atol=1e-6)
        out.pow(2).sum().backward()
        stacks.lend(None)
        for adapter, ref in zip(ADAPTERS, ref_grads, strict=True):
            for n, p in _lora_params(model, adapter).items():
                torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6)
        # each member's LoRA gradient norm is its row's; scale_grads scales its row only
        norms = stacks.member_norms()
        for k, adapter in enumerate(ADAPTERS):
            mine = torch.stack([p.grad.norm() for p in _lora_params(model, adapter).values()])
            torch.testing.assert_close(norms[k], torch.linalg.vector_norm(mine))
    before = [p.grad.clone() for p in _lora_params(model, ADAPTERS[1]).values()]
    stacks.scale_grads(torch.tensor([1.0, 0.5, 1.0]))
    for b, p in zip(before, _lora_params(model, ADAPTERS[1]).values(), strict=True):
        torch.testing.assert_close(p.grad, 0.5 * b)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    stacks.release()  # own storage again, same values
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
        if adapter_of(n) is not None:
            assert p.untyped_storage().data_ptr() != stacks.flat.untyped_storage().data_ptr()


def test_both_bmm_lora_forms_are_each_members_own_lora_product():
    """The stacked path's activations-left products and the weights-left ones give each
    block of rows its own adapter's `B(A(x)) * scale` (peft's per-member F.linear), in
    value and in gradient."""
    g = torch.Generator().manual_seed(0)
    k, n, width, r, out = 3, 10, 12, 4, 6
    xs = torch.randn(k, n, width, generator=g)
    a, b = torch.randn(k, r, width, generator=g), torch.randn(k, out, r, generator=g)
    result = torch.randn(k * n, out, generator=g)
    ref = result + torch.cat([F.linear(F.linear(xs[i], a[i]), b[i]) * 0.5 for i in range(k)])
    grads = []
    for left in (True, False):
        ws = [t.clone().requires_grad_() for t in (xs, a, b)]
        got = bmm_lora(result, *ws, 0.5, weights_left=left)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        got.pow(2).sum().backward()
        grads.append([w.grad for w in ws])
    for g_left, g_right in zip(*grads, strict=True):
        torch.testing.assert_close(g_left, g_right, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rates", [(0.5, 0.5, 0.5), (0.5, 0.2, 0.9)])
def test_routed_blocks_draw_each_members_dropout(rates):
    """With LoRA dropout every block goes through its own adapter's dropout module (one
    call when the rates agree): at rate 1.0 for one member only that member's LoRA
    product vanishes, and in eval mode dropout is off and the products are peft's."""
    model = _peft_model(SAME, dropout=0.5)
    for adapter, p in zip(ADAPTERS, rates, strict=True):
        for m in model.modules():
            if hasattr(m, "lora_dropout") and adapter in m.lora_dropout:
                m.lora_dropout[adapter].p = p
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 5, IN, generator=g) for _ in ADAPTERS]
    model.eval()
    ref_out, _ = _peft_reference(model, xs)
    with torch.no_grad(), adapter_blocks(model, [(a, 3) for a in ADAPTERS]):
        out = model(torch.cat(xs))
    for k, o in enumerate(out.split(3)):
        torch.testing.assert_close(o, ref_out[k], rtol=1e-5, atol=1e-6)
    model.train()
    for m in model.modules():
        if hasattr(m, "lora_dropout") and ADAPTERS[1] in m.lora_dropout:
            m.lora_dropout[ADAPTERS[1]].p = 1.0
    with adapter_blocks(model, [(a, 3) for a in ADAPTERS]):
        out = model(torch.cat(xs))
    out.pow(2).sum().backward()
    dropped = _lora_params(model, ADAPTERS[1])
    assert all(p.grad.abs().sum() == 0 for n, p in dropped.items() if "lora_A" in n)
    assert all(p.grad.abs().sum() > 0 for a in (ADAPTERS[0], ADAPTERS[2])
               for p in _lora_params(model, a).values())


def test_member_parameter_names_map_to_solo_names():
    name = "base_model.model.layers.0.q_proj.lora_A.member3.weight"
    assert adapter_of(name) == "member3"
    assert solo_name(name, "member3") == "base_model.model.layers.0.q_proj.lora_A.default.weight"
    assert solo_name(name, "member4") == name  # another member's name stays as it is
    assert adapter_of("projector.net.0.weight") is None


def test_slots_take_members_in_and_out_without_changing_the_stacks_shape():
    """`LoraStacks` slots: an empty slot's rows get the base output only (no LoRA product)
    and a zero gradient row; a member attached to a freed slot gets its own peft product
    and gradients; a detached member keeps its weights in storage of its own. The stack
    keeps its shape and identity throughout (a compiled forward's one input)."""
    model = _peft_model([(4, 8), (4, 16), (4, 4)])  # one rank, three scalings
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 5, IN, generator=g) for _ in ADAPTERS]
    ref_out, ref_grads = _peft_reference(model, xs)
    layers = vanilla_lora_layers(model, ADAPTERS)
    with torch.no_grad():
        model.base_model.set_adapter([])  # no adapter: the base output of each block
        base = [model(x) for x in xs]
        model.base_model.set_adapter(ADAPTERS)
    stacks = LoraStacks(layers, ADAPTERS[:2], slots=3)  # member2 not in yet
    flat = stacks.flat
    route_blocks(layers, tuple((f"slot{k}", 3) for k in range(3)), stacks)

    def forward_and_grads():
        stacks.zero_grads()
        out = model(torch.cat(xs))
        out.pow(2).sum().backward()
        return out.detach().split(3)

    out = forward_and_grads()
    torch.testing.assert_close(out[2], base[2], rtol=1e-6, atol=1e-6)  # slot 2 is empty
    assert not stacks.flat.grad[2].any()
    for k in range(2):
        torch.testing.assert_close(out[k], ref_out[k], rtol=1e-5, atol=1e-6)

    kept = {n: p.detach().clone() for n, p in _lora_params(model, ADAPTERS[0]).items()}
    stacks.detach(0)  # member0 leaves ...
    stacks.attach(2, ADAPTERS[2])  # ... member2 joins into the free slot 2
    assert stacks.flat is flat and stacks.adapters == [None, ADAPTERS[1], ADAPTERS[2]]
    for n, p in _lora_params(model, ADAPTERS[0]).items():
        assert torch.equal(p, kept[n])
        assert p.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    out = forward_and_grads()
    torch.testing.assert_close(out[0], base[0], rtol=1e-6, atol=1e-6)  # slot 0 now empty
    assert not stacks.flat.grad[0].any()
    for k in (1, 2):
        torch.testing.assert_close(out[k], ref_out[k], rtol=1e-5, atol=1e-6)
        for n, p in _lora_params(model, ADAPTERS[k]).items():
            torch.testing.assert_close(p.grad, ref_grads[k][n], rtol=1e-4, atol=1e-6)
