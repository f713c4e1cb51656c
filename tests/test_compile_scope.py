"""`model.compile_scope: layers` (trainer.compile_scope): each decoder block compiled in
place, one graph for all of them whatever the layer count; runs train as eager ones.

On the CPU the blocks compile through AOT autograd with eager kernels (the same Dynamo
trace and guards, no Inductor), each forward graph counted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_data
from test_group import assert_same_steps
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Qwen2Config,
)

from trainer.compile_scope import (
    compile_blocks,
    compile_forward,
    decoder_blocks,
    eager_blocks,
)
from trainer.config import config_from_data
from trainer.demo_assets import build_char_tokenizer
from trainer.errors import ConfigError
from trainer.group import TrialGroup
from trainer.inputs import prepare_inputs
from trainer.loop import train
from trainer.metrics import MemorySink
from trainer.model import add_lora, causal_lm, final_hidden

RTOL, ATOL = 1e-5, 1e-6
LAYERS = (2, 4)  # the layer counts compared: the graph count must not follow them


def _quiet(*_):
    pass


def _qwen2(layers: int, vocab: int = 100) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


class Graphs:
    """What was compiled: the functions given to `torch.compile` (a block's bound
    `_call_impl` for `nn.Module.compile`) and, called, the graphs Dynamo compiled."""

    def __init__(self) -> None:
        self.compiled: list = []

    def __call__(self) -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    def blocks(self) -> list[str]:
        """The class names of the modules compiled in place, in order."""
        return [type(f.__self__).__name__ for f in self.compiled if hasattr(f, "__self__")]


@pytest.fixture
def graphs(monkeypatch) -> Graphs:
    """Every `torch.compile` (a block's `nn.Module.compile` too) through AOT autograd with
    eager kernels, a backend wrapper of its own per call as `mode=` makes one."""
    from torch._dynamo.utils import counters

    real_compile, out = torch.compile, Graphs()

    def fake_compile(fn, mode=None, dynamic=None, **_):
        out.compiled.append(fn)
        return real_compile(fn, backend="aot_eager", dynamic=dynamic)

    torch.compiler.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", fake_compile)
    yield out
    torch.compiler.reset()


@pytest.mark.parametrize(("config", "path"), [
    (_qwen2(3), "model.layers"),
    (LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64), "model.layers"),
    (GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=64), "transformer.h"),
    (GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64), "gpt_neox.layers"),
])
def test_decoder_blocks_are_the_llms_layer_list_with_lora_or_without(config, path):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    expected = list(lm.get_submodule(path))
    assert decoder_blocks(lm) == expected and len(expected) == 3
    llm = add_lora(lm, 4, 8, 0.0, "all-linear")
    assert decoder_blocks(llm) == expected  # the peft wrapper: the same blocks


def test_a_model_without_blocks_is_refused_in_one_clear_line():
    with pytest.raises(ValueError, match=r"no decoder blocks found in Sequential.*"
                                         r"set model\.compile_scope=model"):
        decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    with pytest.raises(ValueError, match="compile_scope must be one of"):
        compile_forward(lambda: None, torch.nn.Linear(2, 2), "default", "blocks")


@pytest.mark.parametrize(("mode", "block"), [
    ("reduce-overhead", "default"), ("max-autotune", "max-autotune-no-cudagraphs"),
    ("default", "default")])
def test_blocks_compile_without_cuda_graphs(monkeypatch, mode, block):
    # A CUDA graph fixes its parameters' addresses, and one block graph serves blocks whose
    # weights live elsewhere: every call would re-record it (run 27: ~40x slower steps).
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: seen.append((type(self).__name__, kw)))
    lm = AutoModelForCausalLM.from_config(_qwen2(3))
    assert compile_blocks(lm, mode) == 3
    assert seen == [("Qwen2DecoderLayer", {"mode": block, "dynamic": False})] * 3


@pytest.mark.parametrize("routed", [False, True])
def test_every_block_runs_one_graph_whatever_the_layer_count(graphs, routed):
    """A solo model's peft LoRA layers, and a group's routed ones reading stacked weights
    (`route_blocks`, `LoraStacks.lend`): one forward graph for 2 and for 4 blocks, whose
    outputs and gradients are the eager blocks'. A per-layer constant in what a block
    reads would make it one graph per block."""
    import warnings

    from peft import get_peft_model

    from trainer.model import lora_config
    from trainer.multilora import LoraStacks, route_blocks, vanilla_lora_layers

    for layers in LAYERS:
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(_qwen2(layers))
        stacks = None
        if routed:
            lcfg = lora_config(4, 8, 0.0, ["q_proj", "v_proj"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                llm = get_peft_model(lm, lcfg, adapter_name="a0")
                llm.add_adapter("a1", lcfg)
            for name, p in llm.named_parameters():
                p.requires_grad_("lora_" in name)
                if "lora_B" in name:  # peft's B starts at zero: no LoRA product to check
                    torch.nn.init.normal_(p, std=0.1)
            lora = vanilla_lora_layers(llm, ["a0", "a1"])
            stacks = LoraStacks(lora, ["a0", "a1"])
            route_blocks(lora, (("a0", 2), ("a1", 2)), stacks)
        else:
            llm = add_lora(lm, 4, 8, 0.0, ["q_proj", "v_proj"])
        # The input requires grad, as the projector's prefix makes it: a block whose input
        # does not (the first, here) and one whose does are two graphs.
        x = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        trained = [p for p in llm.parameters() if p.requires_grad]

        def forward_backward(llm=llm, stacks=stacks, trained=trained, x=x):
            for p in trained:
                p.grad = None
            if stacks is not None:
                stacks.zero_grads()
                stacks.lend(stacks.split())
            out = final_hidden(causal_lm(llm), x)
            if stacks is not None:
                stacks.lend(None)
            out.pow(2).mean().backward()
            grads = [stacks.flat.grad.clone()] if stacks is not None else []
            return out.detach(), grads + [p.grad.clone() for p in trained
                                          if p.grad is not None]

        eager_out, eager_grads = forward_backward()
        assert compile_blocks(llm, "default") == layers
        before = graphs()
        for _ in range(2):
            out, grads = forward_backward()
            torch.testing.assert_close(out, eager_out, rtol=RTOL, atol=ATOL)
            assert len(grads) == len(eager_grads) > 0
            for g, e in zip(grads, eager_grads, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=ATOL)
        assert graphs() - before == 1, (layers, graphs() - before)
        torch.compiler.reset()


def test_eager_blocks_runs_one_models_blocks_eager_and_leaves_the_others_compiled(graphs):
    """A group's eager path (a member's eval) runs its own compiled blocks eagerly and no
    one else's: per model, not a process-wide stance that two threads (two groups in one
    process) could leave in force for everything after them."""
    torch.manual_seed(0)
    mine, other = (AutoModelForCausalLM.from_config(_qwen2(2)) for _ in range(2))
    for lm in (mine, other):
        assert compile_blocks(lm, "default") == 2
    x = torch.randn(2, 5, 32, requires_grad=True)
    with eager_blocks(mine):
        before = graphs()
        final_hidden(mine, x)
        assert graphs() == before  # mine: eager, nothing traced
        final_hidden(other, x)
        assert graphs() == before + 1  # the other model's blocks: still compiled
    final_hidden(mine, x)  # restored: mine compiles (the same block graph, its own guards)
    assert all(b._compiled_call_impl is not None for b in decoder_blocks(mine))


# ------------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Tiny Qwen2 LLMs of each layer count in LAYERS, with the demo's tokenizer."""
    root = tmp_path_factory.mktemp("scope_llms")
    dirs = {}
    for layers in LAYERS:
        directory = root / f"qwen2-{layers}"
        build_char_tokenizer(directory)
        torch.manual_seed(0)
        vocab = len(AutoTokenizer.from_pretrained(str(directory)))
        AutoModelForCausalLM.from_config(_qwen2(layers, vocab)).save_pretrained(str(directory))
        dirs[layers] = directory
    return dirs


@pytest.fixture
def scope_cfg(tmp_path, assets_dir, llm_dirs):
    """Factory: a tiny config over the `layers`-layer LLM, compiled in `scope` (None: off)."""
    def make(name: str, layers: int, scope: str | None, **phase2):
        data = tiny_data(tmp_path / "runs", assets_dir, **phase2)
        data["model"] = {"llm_path": str(llm_dirs[layers]), "lora": {"dropout": 0.0},
                         "compile": "off" if scope is None else "reduce-overhead",
                         "compile_scope": scope or "model"}
        data["output"]["run_name"] = name
        data["output"]["sync_every"] = 4  # device guard, as on a GPU
        return config_from_data(data, "scope.yaml")

    return make


def _solo(cfg) -> list[dict]:
    sink = MemorySink()
    train(cfg, sink, console=False, log=_quiet)
    return sink.records


@pytest.mark.integration
def test_a_solo_run_compiled_by_layers_trains_as_the_eager_run(scope_cfg, graphs):
    """Every step's loss and gradient norms of a solo run with `compile_scope: layers` are
    the eager run's; the number of graphs (training, then evaluation: another grad and
    train mode) is the same for 2 layers and for 4, and parameter names (checkpoints,
    weight files) are the eager run's."""
    from safetensors.torch import load_file

    counts = {}
    for layers in LAYERS:
        cfgs = {scope: scope_cfg(f"{scope}-{layers}", layers, scope, total_training_steps=4,
                                 warmup_steps=1) for scope in (None, "layers")}
        for c in cfgs.values():
            c.output.eval_every = 2
        ref = _solo(cfgs[None])
        before = graphs()
        got = _solo(cfgs["layers"])
        counts[layers] = graphs() - before
        assert graphs.blocks() == ["Qwen2DecoderLayer"] * layers  # nothing else compiled
        graphs.compiled.clear()
        assert_same_steps(ref, got, layers)
        assert any("eval_loss" in r for r in got)
        names = [set(load_file(str(c.output.root / c.output.run_name
                                   / "trainable.safetensors"))) for c in cfgs.values()]
        assert names[0] == names[1]
        torch.compiler.reset()
    assert counts[2] == counts[4] == 2, counts  # training; evaluation (no grad, eval mode)


# Members that differ in what a member may have of its own; "b" has a smaller batch (its
# slot's rows right-filled) and ends first.
SPECS = {
    "a": dict(learning_rate=2e-3, warmup_steps=2, gradient_clip_val=1.0, seed=7,
              total_training_steps=6),
    "b": dict(learning_rate=5e-3, warmup_steps=1, gradient_clip_val=0.3, seed=3, batch_size=3,
              total_training_steps=4),
}


@pytest.mark.integration
def test_a_group_compiled_by_layers_trains_as_the_eager_group(scope_cfg, graphs):
    """A group's shared forward with `compile_scope: layers` (its routed LoRA layers on
    stacked weights): every member's records are the eager group's, evaluation included
    (a member's own forward runs eager), with as many graphs for 2 layers as for 4."""
    counts = {}
    for layers in LAYERS:
        sinks = {}
        for scope in (None, "layers"):
            cfgs = {k: scope_cfg(f"{scope}-{layers}-{k}", layers, scope, **p)
                    for k, p in SPECS.items()}
            group = TrialGroup(prepare_inputs(cfgs["a"], _quiet), log=_quiet)
            sinks[scope] = {k: MemorySink() for k in cfgs}
            for k, c in cfgs.items():
                c.output.eval_every = 3
                group.add_member(k, c, sinks[scope][k])
            before = graphs()
            while group.members:
                group.step()
            assert group.compiled == (scope is not None)
            if scope is not None:
                counts[layers] = graphs() - before
                assert group.fixed_slots and group.slot_table.stacks is not None
                # the blocks, each once, and not the shared forward around them
                assert graphs.blocks() == ["Qwen2DecoderLayer"] * layers
                assert len(graphs.compiled) == layers
                graphs.compiled.clear()
            torch.compiler.reset()
        for k in SPECS:
            assert_same_steps(sinks[None][k].records, sinks["layers"][k].records, (layers, k))
            assert any("eval_loss" in r for r in sinks["layers"][k].records)
    assert counts[2] == counts[4] == 1, counts


@pytest.mark.integration
def test_members_leaving_and_joining_a_group_compiled_by_layers_add_no_graph(scope_cfg,
                                                                             graphs):
    """As for the whole compiled forward (tests/test_group.py): over K fixed slots, a member
    stepped alone, one ending, one removed from outside (an ASHA stop) and a trial joining
    into a freed slot compile nothing after the first step, and every member trains as
    the same config trained alone."""
    specs = {**SPECS, "asha": dict(SPECS["a"], seed=11, learning_rate=1e-3),
             "late": dict(SPECS["a"], seed=5, learning_rate=3e-3)}
    solo = {k: _solo(scope_cfg(f"solo-{k}", 4, None, **p)) for k, p in specs.items()}
    cfgs = {k: scope_cfg(f"slot-{k}", 4, "layers", **p) for k, p in specs.items()}
    group = TrialGroup(prepare_inputs(cfgs["a"], _quiet), log=_quiet, slots=3)
    sinks = {k: MemorySink() for k in specs}
    for k in ("a", "b", "asha"):
        group.add_member(k, cfgs[k], sinks[k])
    group.step()
    assert group.fixed_slots and graphs() == 1
    group.step(only=["a"])  # the others wait for their clients
    group.step()
    group.remove_member("asha")  # stopped by the scheduler after 2 of its steps
    ended = {}
    while "b" in group.members:
        ended.update(group.step())
    assert ended["b"].end_reason == "completed"
    group.add_member("late", cfgs["late"], sinks["late"])
    while group.members:
        group.step()
    assert graphs() == 1  # every make-up above ran the first graph
    for k in ("a", "b", "late"):
        assert_same_steps(solo[k], sinks[k].records, k)
    assert_same_steps(solo["asha"][:2], sinks["asha"].records, "asha")


def test_the_scope_is_one_value_per_group_and_part_of_the_compile_cache_key(
        scope_cfg, tmp_path, monkeypatch):
    """Members of one group share its scope (a member asking for another is a config error
    naming the key), and the compiled artifacts of each scope are kept apart."""
    import trainer.compile_cache as cache_mod

    saved = []

    def save():
        saved.append(1)
        return b"artifacts", None

    monkeypatch.setattr(cache_mod.torch.compiler, "save_cache_artifacts", save)
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)  # nothing to compile here
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **_: None)
    files = []
    for scope in ("model", "layers"):
        cfg = scope_cfg(f"key-{scope}", 2, scope)
        group = TrialGroup(prepare_inputs(cfg, _quiet), log=_quiet, slots=1,
                           compile_cache=tmp_path / "cache")
        group.add_member("m", cfg, MemorySink())
        group.step()
        files.append(group.compile_cache.path)
        other = scope_cfg(f"other-{scope}", 2, "layers" if scope == "model" else "model")
        with pytest.raises(ConfigError, match=r"model\.compile_scope"):
            group.add_member("other", other, MemorySink())
    assert files[0] != files[1] and all(f.is_file() for f in files) and len(saved) == 2


@pytest.mark.integration
@torch._dynamo.config.patch(recompile_limit=2)
def test_rebuilt_slots_compile_their_blocks_again_past_dynamos_recompile_limit(scope_cfg,
                                                                               graphs):
    """A group without a set capacity rebuilds its slots when a member finds none free
    (tests/test_group.py, for the whole forward); with `compile_scope: layers` each
    rebuild drops the blocks' old graph too, so the third build, past Dynamo's limit of 2
    graphs per block code, still compiles (rather than running its blocks eagerly), and
    a member taking a freed slot compiles nothing."""
    group, counts = None, []
    for name in ("m0", "m1", "m2", "m3", "m4"):
        cfg = scope_cfg(name, 2, "layers", **dict(SPECS["a"], total_training_steps=30))
        if group is None:
            group = TrialGroup(prepare_inputs(cfg, _quiet), log=_quiet)
        group.add_member(name, cfg, MemorySink())
        if name == "m0":
            continue
        if name == "m4":
            group.remove_member("m0")
        before = graphs()
        for _ in range(3):  # compiles (or not), then a full check, then skips the check
            group.step()
        counts.append(graphs() - before)
    assert counts == [1, 1, 1, 0], counts  # slots for 2, 3 and 4 members; m4 takes m0's
    assert group._guard_skip.skipped == 4 and group.members["m4"].slot == 0
