"""model.compile_ahead: a compiled group's cold compile made by a helper process while the
members train eagerly, then the switch to the compiled forward (CPU, Inductor)."""

from __future__ import annotations

import sys

import pytest
from test_group import SPECS, assert_same_steps
from torch._dynamo.utils import counters

from trainer.compile_ahead import CompileAhead, helper_config
from trainer.errors import ConfigError
from trainer.group import TrialGroup
from trainer.inputs import prepare_inputs
from trainer.loop import train
from trainer.metrics import MemorySink

pytestmark = pytest.mark.integration

MEMBERS = {
    "a": dict(SPECS["a"], batch_size=4, total_training_steps=8),
    "c": dict(SPECS["c"], batch_size=4, total_training_steps=8),
}
EAGER_STEPS = 2  # group steps run while the helper compiles; the rest run compiled


def _quiet(*_):
    pass


def _cfg_of(tiny, prefix, k, compiled, ahead=False, program=False):
    c = tiny(run_name=f"{prefix}-{k}", **MEMBERS[k])
    c.model.lora.dropout = 0.0  # exact: no masks drawn from the shared RNG stream
    c.model.compile = "default" if compiled else "off"
    c.model.compile_ahead = ahead
    c.model.compile_program = program
    return c


def _solo(cfg):
    sink = MemorySink()
    train(cfg, sink, console=False, log=_quiet)
    return sink


def _group(tiny, tmp_path, logs, program=False):
    cfgs = {k: _cfg_of(tiny, "ahead", k, True, ahead=True, program=program) for k in MEMBERS}
    group = TrialGroup(prepare_inputs(cfgs["a"], _quiet), log=logs.append, slots=2,
                       compile_cache=tmp_path / "compile_cache")
    sinks = {k: MemorySink() for k in MEMBERS}
    for k, cfg in cfgs.items():
        group.add_member(k, cfg, sinks[k])
    return group, sinks


def _run_through_switch(group, sinks):
    """EAGER_STEPS steps while the helper compiles, wait for it, then to the end."""
    for _ in range(EAGER_STEPS):
        group.step()
        assert group.compiling_ahead  # a cold compile takes seconds: still running
    group.wait_compile_ahead(timeout=600)
    before = dict(counters["inductor"]), dict(counters["aot_autograd"])
    group.step()  # the switch: this process compiles the slots' forward
    assert not group.compiling_ahead
    while group.members:
        group.step()
    return before


@pytest.mark.slow
def test_members_train_eagerly_while_a_helper_compiles_then_run_compiled(tiny, tmp_path):
    """The helper saves the slots' artifacts; the group loads them and compiles warm (no
    Inductor compile of its own), and every member trains as the same config alone."""
    solo = {k: _solo(_cfg_of(tiny, "solo", k, False)) for k in MEMBERS}
    logs: list[str] = []
    group, sinks = _group(tiny, tmp_path, logs)
    inductor, aot = _run_through_switch(group, sinks)
    assert group.ahead_steps == EAGER_STEPS
    assert group.compile_cache.loaded and not group.compile_cache.saved
    assert group.compile_cache.path.is_file()
    # Warm: the forward and backward came from the loaded artifacts, nothing was built.
    hits = (counters["aot_autograd"]["autograd_cache_hit"] - aot.get("autograd_cache_hit", 0)
            + counters["inductor"]["fxgraph_cache_hit"] - inductor.get("fxgraph_cache_hit", 0))
    assert hits >= 1
    assert counters["inductor"]["fxgraph_cache_miss"] == inductor.get("fxgraph_cache_miss", 0)
    assert any("compiling the group's 2 slots in helper process" in line for line in logs)
    assert any(f"done after {EAGER_STEPS} eager group steps" in line for line in logs)
    assert not list((tmp_path / "compile_cache").glob(".compile-ahead-*"))  # scratch gone
    for k in MEMBERS:
        assert [r["step"] for r in sinks[k].records] == list(range(1, 9))
        assert_same_steps(solo[k].records, sinks[k].records, k)


@pytest.mark.slow
def test_with_compile_program_the_group_runs_the_helpers_program_untraced(tiny, tmp_path):
    """With `model.compile_program` the helper also traces the slots' forward and saves its
    program; at the switch the group loads that program: Dynamo traces nothing in the
    group's process, and every member still trains as the same config alone."""
    solo = {k: _solo(_cfg_of(tiny, "solo", k, False)) for k in MEMBERS}
    logs: list[str] = []
    group, sinks = _group(tiny, tmp_path, logs, program=True)
    traces = counters["stats"]["unique_graphs"]
    _run_through_switch(group, sinks)
    assert counters["stats"]["unique_graphs"] == traces, logs  # no trace here, eager or not
    program = group.slot_table.program
    assert program.loaded and not program.saved, logs
    assert program.path.parent == tmp_path / "compile_cache" and program.path.is_file()
    assert any("Dynamo's trace skipped" in line for line in logs)
    assert group.ahead_steps == EAGER_STEPS
    for k in MEMBERS:
        assert [r["step"] for r in sinks[k].records] == list(range(1, 9))
        assert_same_steps(solo[k].records, sinks[k].records, k)


@pytest.mark.slow
def test_a_failed_helper_leaves_the_compile_to_the_group(tiny, tmp_path, monkeypatch):
    """A helper that dies (out of memory, say) costs the warm start, not the run: the group
    says why, with the helper's last lines, compiles cold itself and saves the artifacts."""
    monkeypatch.setattr(CompileAhead, "command", lambda self: [
        sys.executable, "-c",  # after the group's eager steps, as a real helper's failure
        "import sys, time; time.sleep(10); print('CUDA out of memory (test)'); sys.exit(3)"])
    logs: list[str] = []
    group, sinks = _group(tiny, tmp_path, logs)
    _run_through_switch(group, sinks)
    failed = [line for line in logs if "helper process failed (exit 3)" in line]
    assert failed and "CUDA out of memory (test)" in failed[0]
    assert group.compile_cache.saved and group.compile_cache.path.is_file()
    assert all(len(sinks[k].records) == 8 for k in MEMBERS)
    assert all(r["loss"] == r["loss"] for k in MEMBERS for r in sinks[k].records)  # finite


def test_compile_ahead_without_compile_is_a_config_error(tiny):
    from trainer.config import config_from_data

    data = tiny().to_plain()
    data["model"]["compile_ahead"] = True
    with pytest.raises(ConfigError, match=r"model.*compile_ahead.*set model.compile"):
        config_from_data(data, "search.yaml")


def test_the_helper_trains_copies_in_its_scratch_directory(tiny, tmp_path):
    """The helper's configs keep what fixes the graph and write nothing of the member's:
    their runs go to the scratch directory, no weights, no fault injection, no helper."""
    cfg = _cfg_of(tiny, "m", "a", True, ahead=True)
    cfg.debug.hang_at_step = 1
    plain = helper_config(cfg, tmp_path / "scratch", "m0")
    assert plain["output"]["root"] == str(tmp_path / "scratch" / "runs")
    assert plain["output"]["assets_dir"] == str(cfg.assets_dir)
    assert plain["output"]["save_weights"] is False and plain["debug"] == {}
    assert plain["model"] == {**cfg.to_plain()["model"], "compile_ahead": False}
    assert plain["phase2"] == cfg.to_plain()["phase2"]
    assert plain["data"] == cfg.to_plain()["data"]
