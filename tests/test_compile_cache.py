"""Compiled artifacts kept on disk (trainer.compile_cache): a graph compiled once per machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from trainer.compile_cache import CompileCache, artifact_key

pytestmark = pytest.mark.integration

# One process compiles with Inductor and saves; the next, with an empty Inductor cache of
# its own, loads the file first: its compile of the same graph must hit the FX-graph cache.
_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch
    from torch._dynamo.utils import counters

    from trainer.compile_cache import CompileCache

    cache = CompileCache(Path(sys.argv[1]), "k", log=lambda *_: None)
    loaded = cache.load()
    f = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="inductor")
    f(torch.randn(16))
    saved = cache.save() if not loaded else False
    print(loaded, saved, counters["inductor"]["fxgraph_cache_hit"])
""")


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="Inductor on the CPU needs a C++ compiler")
def test_a_second_process_loads_the_saved_artifacts_and_hits_inductors_cache(tmp_path):
    def run(name: str) -> list[str]:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / name))
        out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "store")],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout.split()[-3:]

    assert run("first") == ["False", "True", "0"]  # cold: compiled, then saved
    assert (tmp_path / "store" / "k.bin").stat().st_size > 0
    loaded, saved, hits = run("second")  # its own Inductor cache is empty
    assert (loaded, saved) == ("True", "False") and int(hits) >= 1


def test_artifact_keys_tell_shapes_apart():
    a = artifact_key({"slots": 8, "rows": 2})
    assert a == artifact_key({"rows": 2, "slots": 8})  # order does not matter
    assert a != artifact_key({"slots": 7, "rows": 2})


def test_a_file_that_does_not_load_is_ignored(tmp_path):
    (tmp_path / "k.bin").write_bytes(b"not artifacts")
    seen = []
    cache = CompileCache(tmp_path, "k", log=seen.append)
    assert cache.load() is False and not cache.loaded
    assert seen and "ignoring" in seen[0]


def test_a_second_group_of_the_same_shapes_loads_what_the_first_saved(tiny, monkeypatch,
                                                                       tmp_path):
    """A compiled group saves its slots' artifacts after their first step and the next
    group of the same shapes (a resumed sweep, another sweep on the same storage) loads
    them before its first compile. The real round trip needs Inductor (the test above);
    the groups here compile with aot_eager, which makes no artifacts, so torch's two
    calls are stood in for: what the first saves is what the second loads."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    import trainer.compile_cache as cache_mod
    import trainer.group as group_mod
    from trainer.group import TrialGroup
    from trainer.inputs import prepare_inputs
    from trainer.metrics import MemorySink

    real_compile, events = torch.compile, []

    def fake_compile(fn, mode, dynamic):
        def count(gm, _):
            events.append("compile")
            return make_boxed_func(gm.forward)

        return real_compile(fn, dynamic=dynamic, backend=aot_autograd(
            fw_compiler=count, bw_compiler=lambda gm, _: make_boxed_func(gm.forward)))

    def save():
        events.append("save")
        return b"artifacts of the slots", None

    def load(data):
        events.append(("load", data))
        return object()  # torch's CacheInfo: something was loaded

    monkeypatch.setattr(group_mod.torch, "compile", fake_compile)
    monkeypatch.setattr(cache_mod.torch.compiler, "save_cache_artifacts", save)
    monkeypatch.setattr(cache_mod.torch.compiler, "load_cache_artifacts", load)
    store = tmp_path / "compile_cache"
    groups = []
    for name in ("first", "second", "moved"):
        cfg = tiny(run_name=name)
        cfg.model.compile = "reduce-overhead"
        if name == "moved":  # the same LLM from another directory: the same graph
            (llm_dir,) = cfg.assets_dir.glob("llm-*")
            cfg.model.llm_path = shutil.copytree(llm_dir, tmp_path / "elsewhere" / "llm")
        group = TrialGroup(prepare_inputs(cfg, lambda *_: None), log=lambda *_: None,
                           slots=2, compile_cache=store)
        group.add_member(name, cfg, MemorySink())
        group.step()
        groups.append(group)
        if name == "first":
            assert events == ["compile", "save"]  # nothing to load yet
            files = list(store.iterdir())
            assert [f.read_bytes() for f in files] == [b"artifacts of the slots"]
            events.clear()
    # the later groups loaded the first's file before they compiled, and saved nothing
    assert events == [("load", b"artifacts of the slots"), "compile"] * 2
    for later in groups[1:]:
        assert later.compile_cache.path == groups[0].compile_cache.path
        assert later.compile_cache.loaded
    assert list(store.iterdir()) == files
