"""`model.compile: cudagraphs` (trainer.compile_scope.compile_options): the whole forward
traced by Dynamo and AOTAutograd and replayed as CUDA graphs of torch's own kernels, with
no Inductor code generation.

A CPU has no CUDA graphs: torch runs the traced graphs eagerly there. What these tests
check on it is what decides the GPU's behaviour: the value reaches `torch.compile` as the
backend, the traced forward and backward hold no op that makes torch's cudagraphs backend
skip its CUDA graphs (its own check; an input a training graph mutates AOTAutograd
applies outside the graph, so the backend's other check cannot apply here),
and a group compiled this way keeps one graph through make-up changes and trains each
member as it trains alone.
"""

from __future__ import annotations

import sys

import pytest
import torch
from test_group import SPECS, _cfg, _solo, assert_same_steps

import trainer.compile_scope as scope_mod
from trainer.compile_scope import compile_options
from trainer.config import config_from_data
from trainer.errors import ConfigError
from trainer.group import TrialGroup
from trainer.inputs import prepare_inputs
from trainer.metrics import MemorySink


def _quiet(*_):
    pass


def test_the_value_names_a_backend_and_the_inductor_modes_stay_modes():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert compile_options("cudagraphs", cuda) == {"backend": "cudagraphs"}
    # Off CUDA the backend would run the traced graphs eagerly and warn per graph.
    assert compile_options("cudagraphs", cpu) == {"backend": "aot_eager"}
    for mode in ("default", "reduce-overhead", "max-autotune"):
        assert compile_options(mode, cuda) == compile_options(mode, cpu) == {"mode": mode}


@pytest.mark.parametrize("key,value", [("compile_scope", "layers"),
                                       ("compile_ahead", True), ("compile_program", True)])
def test_keys_that_need_inductor_are_refused_in_one_line_naming_them(key, value):
    with pytest.raises(ConfigError) as e:
        config_from_data({"model": {"compile": "cudagraphs", key: value}}, "search.yaml")
    message = str(e.value)
    assert "\n" not in message
    assert "search.yaml" in message and "model.compile: cudagraphs" in message
    shown = str(value).lower() if isinstance(value, bool) else value
    assert f"{key}: {shown}" in message
    config_from_data({"model": {"compile": "cudagraphs"}}, "search.yaml")  # alone: accepted


class CudagraphChecks:
    """Stands in for the cudagraphs backend on a CPU: traces through AOTAutograd as it
    does, runs the graphs eagerly, and keeps the ops it would skip CUDA graphs for."""

    def __init__(self) -> None:
        self.forwards: list = []
        self.skips: list[str] = []
        self.kwargs: list[dict] = []

    def compile(self, real_compile):
        def fake_compile(fn, dynamic, **kwargs):
            self.kwargs.append(kwargs)
            return real_compile(fn, dynamic=dynamic, backend=self.backend)
        return fake_compile

    def backend(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func
        from torch._inductor.utils import get_first_incompatible_cudagraph_node

        def check(graph, which):
            # The backend's test for ops (in check_for_skip), which a CPU also runs.
            if node := get_first_incompatible_cudagraph_node(graph):
                self.skips.append(f"{which}: incompatible op {node.name}")
            return make_boxed_func(graph.forward)

        def forward(graph, _):
            self.forwards.append(graph)
            return check(graph, "forward")

        return aot_autograd(fw_compiler=forward,
                            bw_compiler=lambda g, _: check(g, "backward"))(gm, example_inputs)


def test_a_group_compiled_without_inductor_keeps_one_graph_and_trains_as_alone(tiny,
                                                                                monkeypatch):
    """Two members, one removed from outside (an ASHA stop) and a trial joining into its
    slot: one forward graph, nothing in it that the cudagraphs backend skips CUDA graphs
    for, and every member's steps those of its eager solo run."""
    specs = {"a": dict(SPECS["a"], batch_size=4, epochs=2),
             "asha": dict(SPECS["c"], batch_size=4, epochs=1),
             "late": dict(SPECS["c"], batch_size=4, epochs=1, seed=5, learning_rate=3e-3)}

    def cfg(prefix, k, mode):
        c = _cfg(tiny, f"{prefix}-{k}", **specs[k])
        c.model.compile = mode
        return c

    solo = {k: _solo(cfg("solo", k, "off")) for k in specs}
    checks = CudagraphChecks()
    monkeypatch.setattr(scope_mod.torch, "compile", checks.compile(torch.compile))
    group = TrialGroup(prepare_inputs(cfg("slot", "a", "cudagraphs"), _quiet), log=_quiet,
                       slots=2)
    sinks = {k: MemorySink() for k in specs}
    for k in ("a", "asha"):
        group.add_member(k, cfg("slot", k, "cudagraphs"), sinks[k])
    for _ in range(4):
        group.step()
    group.remove_member("asha")
    group.add_member("late", cfg("slot", "late", "cudagraphs"), sinks["late"])
    while group.members:
        group.step()

    assert checks.kwargs == [{"backend": "aot_eager"}]  # the CPU's stand-in for cudagraphs
    assert len(checks.forwards) == 1 and group.fixed_slots
    assert checks.skips == []
    monkeypatch.setattr(sys.modules["test_group"], "RTOL", 1e-4)  # stacked bmm's rounding
    for k in ("a", "late"):
        assert_same_steps(solo[k].records, sinks[k].records, k)
    assert_same_steps(solo["asha"].records[:4], sinks["asha"].records, "asha")
