"""A compiled group forward's traced program kept on disk (trainer.compile_program): a warm
start runs it without Dynamo tracing the forward again."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import trainer.compile_program as program_mod
from trainer.compile_program import SUFFIX, TracedProgram, program_key
from trainer.errors import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="Inductor on the CPU needs a C++ compiler")]


def scaled_sine(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * scale + 1


def test_a_saved_program_runs_in_a_new_object_without_a_trace(tmp_path):
    x, scale = torch.randn(16), torch.tensor(2.0)
    first = TracedProgram(scaled_sine, "default", tmp_path, "k", log=lambda *_: None)
    assert first.matches("sig")  # the first call traces, whatever its signature
    expected = first("sig", x, scale)
    assert first.saved and (tmp_path / f"k{SUFFIX}").stat().st_size > 0
    assert torch.allclose(expected, scaled_sine(x, scale))
    assert first.matches("sig") and not first.matches("another signature")

    traces = counters["stats"]["unique_graphs"]
    second = TracedProgram(scaled_sine, "default", tmp_path, "k", log=lambda *_: None)
    out = second("sig", x, 3 * scale)  # new tensors of the same shapes
    assert second.loaded and not second.saved
    assert counters["stats"]["unique_graphs"] == traces  # Dynamo traced nothing
    assert torch.allclose(out, scaled_sine(x, 3 * scale))


def test_the_program_is_traced_where_torch_keeps_aot_compile_off_by_default(tmp_path):
    # torch 2.11 and 2.12 attach `.aot_compile` only when this flag is set (off there)
    seen: list[str] = []
    with torch._dynamo.config.patch(enable_aot_compile=False):
        program = TracedProgram(scaled_sine, "default", tmp_path, "k", log=seen.append)
        x, scale = torch.randn(8), torch.tensor(0.5)
        assert torch.allclose(program("sig", x, scale), scaled_sine(x, scale))
        assert torch._dynamo.config.enable_aot_compile is False  # not left switched on
    assert program.saved and not program.failed, seen


def test_a_loaded_program_is_wrapped_for_its_mode_as_the_traced_one(tmp_path):
    # Inductor decides whether a loaded graph runs as a CUDA graph from its config at load
    # time. On the CPU a reduce-overhead graph is considered and skipped (a counted skip):
    # a loaded program that was never considered would run without CUDA graphs on a GPU.
    x, scale = torch.randn(8), torch.tensor(0.5)
    skips = counters["inductor"]["cudagraph_skips"]
    TracedProgram(scaled_sine, "reduce-overhead", tmp_path, "k", log=lambda *_: None)(
        "sig", x, scale)
    traced = counters["inductor"]["cudagraph_skips"] - skips
    assert traced > 0
    loaded = TracedProgram(scaled_sine, "reduce-overhead", tmp_path, "k", log=lambda *_: None)
    skips = counters["inductor"]["cudagraph_skips"]
    assert torch.allclose(loaded("sig", x, scale), scaled_sine(x, scale))
    assert loaded.loaded
    assert counters["inductor"]["cudagraph_skips"] - skips == traced


def test_a_program_file_that_does_not_load_is_traced_again(tmp_path):
    (tmp_path / f"k{SUFFIX}").write_bytes(b"not a program")
    seen: list[str] = []
    program = TracedProgram(scaled_sine, "default", tmp_path, "k", log=seen.append)
    x, scale = torch.randn(8), torch.tensor(0.5)
    assert torch.allclose(program("sig", x, scale), scaled_sine(x, scale))
    assert not program.loaded and program.saved and not program.failed, seen
    assert "ignoring" in seen[0] and "saved" in seen[-1]
    assert (tmp_path / f"k{SUFFIX}").read_bytes() != b"not a program"


def test_a_loaded_program_that_fails_at_its_first_call_is_traced_again(tmp_path,
                                                                       monkeypatch):
    from torch._dynamo.aot_compile import AOTCompiledFunction

    class Unrunnable:  # e.g. a file that another torch wrote and reads otherwise
        def __call__(self, *_args: object) -> None:
            raise RuntimeError("saved by another torch")

    (tmp_path / f"k{SUFFIX}").write_bytes(b"a program")
    monkeypatch.setattr(AOTCompiledFunction, "deserialize",
                        classmethod(lambda cls, *_a, **_k: Unrunnable()))
    seen: list[str] = []
    program = TracedProgram(scaled_sine, "default", tmp_path, "k", log=seen.append)
    x, scale = torch.randn(8), torch.tensor(0.5)
    assert torch.allclose(program("sig", x, scale), scaled_sine(x, scale))
    assert not program.loaded and program.saved and not program.failed, seen
    assert "failed at its first call" in seen[1], seen


def test_a_forward_that_cannot_be_traced_whole_runs_as_usual(tmp_path):
    def breaks(x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()  # aot_compile needs one graph (fullgraph)
        return x + 1

    seen: list[str] = []
    program = TracedProgram(breaks, "default", tmp_path, "k", log=seen.append)
    assert torch.equal(program("sig", torch.zeros(2)), torch.ones(2))
    assert program.failed and not program.matches("sig")
    assert "off" in seen[0] and not list(tmp_path.iterdir())


def test_the_key_follows_the_code_and_the_graph(tmp_path, monkeypatch):
    class LLM:  # defined here: its file is this test's
        pass

    package = tmp_path / "trainer"
    package.mkdir()
    (package / "rows.py").write_text("x = 1\n")
    monkeypatch.setattr(program_mod, "PACKAGE_DIR", package)
    key = program_key("cache-key", LLM)
    assert key == program_key("cache-key", LLM)
    assert key != program_key("another graph", LLM)
    (package / "rows.py").write_text("x = 2\n")  # an edited trainer module: another program
    assert key != program_key("cache-key", LLM)


@pytest.mark.parametrize("clash", ["compile=off", "compile_scope=layers"])
def test_compile_program_rejects_what_it_cannot_keep(tiny, clash):
    from trainer.config import config_from_data

    data = tiny().to_plain()
    data["model"].update(compile="default", compile_program=True)
    key, value = clash.split("=")
    data["model"][key] = {"true": True, "false": False}.get(value, value)
    with pytest.raises(ConfigError, match=r"model\.compile_program"):
        config_from_data(data, "tiny.yaml")


@pytest.mark.parametrize("run_empty", [True, False])
def test_a_second_group_trains_on_the_first_groups_program(tiny, tmp_path, monkeypatch,
                                                           run_empty):
    """The first compiled group traces its slots' forward, compiles it and saves the
    program beside the compile cache; a second group of the same shapes (a resumed sweep,
    the next sweep on the storage) loads it: Dynamo traces nothing, and its members train
    step for step as the first group's did, and as the same configs alone. With
    `run_empty_slots: false` the members end one after the other, so the one program runs
    4 slots, then 2 (the count a dynamic dimension of it)."""
    from trainer.group import TrialGroup
    from trainer.group_slots import SlotTable
    from trainer.inputs import prepare_inputs
    from trainer.loop import train
    from trainer.metrics import MemorySink

    ran, real_running = [], SlotTable.running

    def running(self, active):  # the slots each step ran (run_empty_slots: false)
        out = real_running(self, active)
        ran.append(len(out[0]))
        return out

    monkeypatch.setattr(SlotTable, "running", running)

    steps = {"a": 6, "b": 4, "c": 3}  # members of different lengths

    def cfg(name: str, member: str, compiled: bool = True):
        c = tiny(run_name=f"{name}-{member}", learning_rate=2e-3 * (1 + len(member) % 3),
                 warmup_steps=2, gradient_clip_val=1.0, seed=ord(member),
                 total_training_steps=steps[member])
        c.model.lora.dropout = 0.0
        if compiled:
            c.model.compile, c.model.run_empty_slots = "default", run_empty
            c.model.compile_program = True
        return c

    solo = {}
    for member in steps:
        solo[member] = MemorySink()
        train(cfg("solo", member, compiled=False), solo[member], console=False,
              log=lambda *_: None)
    store, logs, sinks, programs = tmp_path / "compile_cache", [], [], []
    for name in ("first", "second"):
        traces = counters["stats"]["unique_graphs"]
        group = TrialGroup(prepare_inputs(cfg(name, "a"), lambda *_: None), log=logs.append,
                           slots=4, compile_cache=store)
        sinks.append({m: MemorySink() for m in steps})
        for member in steps:
            group.add_member(f"{name}-{member}", cfg(name, member), sinks[-1][member])
        while group.members:
            group.step()
        programs.append(group.slot_table.program)
        # 3 members run 4 slots; from c's end 2 (a alone too); the one program each time
        assert ran == ([] if run_empty else [4] * 3 + [2] * 3), ran
        ran.clear()
        if name == "second":
            assert counters["stats"]["unique_graphs"] == traces, logs  # no Dynamo trace
    assert programs[0].saved and not programs[0].loaded
    assert programs[1].loaded and not programs[1].saved, logs
    assert programs[0].path == programs[1].path and programs[0].path.parent == store
    assert [p.name for p in Path(store).glob(f"*{SUFFIX}")] == [programs[0].path.name]
    for group_sinks in sinks:
        for member, sink in group_sinks.items():
            records = sink.records
            assert [r["step"] for r in records] == [r["step"] for r in solo[member].records]
            for s, g in zip(solo[member].records, records, strict=True):
                for key in ("loss", "grad_norm", "lr/projector", "lr/lora"):
                    assert g[key] == pytest.approx(s[key], rel=1e-4, abs=1e-6), (
                        member, g["step"], key)
