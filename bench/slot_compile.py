"""A compiled trial group's compiles, cold and warm: three members in three slots, one
stepped alone, one removed, one joining into its slot; the graph count and each step's
time. Run it twice on one WORK directory (its compile cache), each time with an empty
Inductor cache of its own, to see the second start warm:

    TORCHINDUCTOR_CACHE_DIR=/tmp/ind1 python bench/slot_compile.py configs/phase2.yaml \\
        --work /tmp/slots --label cold
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind2 python bench/slot_compile.py configs/phase2.yaml \\
        --work /tmp/slots --label warm

Printed per step: its time, Dynamo's unique graphs, Inductor's FX-graph cache hits and
misses; at the end one JSON line (first step's time, graphs, whether the compile cache
was loaded or saved, every loss finite). On a GPU pass `--device cuda` (CUDA graphs).

`--trace-only` compiles with Dynamo's `eager` backend instead of Inductor: the first step's
time is then Dynamo's trace of the forward alone (what a warm start, its kernels cached,
still pays), and the JSON line counts the traced graph's nodes by the source file of
the code that made them (how much of the trace is the LLM's own code, how much the
group's LoRA routing), e.g. against `--set demo.llm.num_hidden_layers=1` for the cost of
one decoder layer.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.group import TrialGroup  # noqa: E402
from trainer.inputs import prepare_inputs  # noqa: E402
from trainer.metrics import MemorySink  # noqa: E402

# A seconds-long demo (the test suite's tiny config) unless --set says otherwise.
SMALL = ["demo.num_examples=48", "demo.llm.pretrain_steps=100", "data.eval_fraction=0.25",
         "output.log_every=1000", "model.lora.dropout=0.0", "phase2.batch_size=4",
         "phase2.warmup_steps=2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--work", type=Path, required=True,
                    help="runs, demo assets and the compile cache (reuse it for a warm run)")
    ap.add_argument("--label", default="run", help="printed with every line")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile-times", action="store_true",
                    help="print Dynamo's per-phase compile times at the end (what a cold or "
                         "warm first step spent tracing, compiling and loading)")
    ap.add_argument("--trace-only", action="store_true",
                    help="Dynamo's eager backend (no Inductor, no cache): time its trace alone "
                         "and count the graph's nodes by source file")
    ap.add_argument("--base-layers-only", action="store_true",
                    help="with --trace-only: the LoRA layers run only their frozen base layer "
                         "(losses no longer the members'), for the LoRA routing's share of "
                         "the trace")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="KEY=VALUE base-config override, after the small demo's")
    args = ap.parse_args()

    def cfg(name: str, *extra: str):
        return load_config(args.config, [
            *SMALL, f"output.root={args.work / 'runs' / args.label}",
            f"output.assets_dir={args.work / 'assets'}", f"output.run_name={name}",
            "model.compile=reduce-overhead", *args.overrides, *extra])

    nodes: collections.Counter[str] = collections.Counter()
    if args.trace_only:
        trace_only(nodes)
    if args.base_layers_only:
        import trainer.multilora

        def base_layer_only(layer: torch.nn.Module, blocks: object, stacks: object,
                            x: torch.Tensor, *rest: object, **kwargs: object) -> torch.Tensor:
            return layer.base_layer(x, *rest, **kwargs)

        trainer.multilora.block_lora_forward = base_layer_only  # routed_lora_forward's callee
    inputs = prepare_inputs(cfg("inputs"), log=lambda *_: None, device=args.device)
    group = TrialGroup(inputs, args.device, log=print, slots=3,
                       compile_cache=args.work / "compile_cache")
    sinks: dict[str, MemorySink] = {}

    def add(name: str, *extra: str) -> None:
        sinks[name] = MemorySink()
        group.add_member(name, cfg(name, *extra), sinks[name])

    def step(what: str, only: list[str] | None = None) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()  # a step's time, not its launches'
        t0 = time.perf_counter()
        group.step(only)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"{args.label} {what}: {1e3 * dt:.1f} ms, graphs "
              f"{counters['stats']['unique_graphs']}, FX-graph cache hits "
              f"{counters['inductor']['fxgraph_cache_hit']} misses "
              f"{counters['inductor']['fxgraph_cache_miss']}", flush=True)
        return dt

    add("a", "phase2.epochs=3")
    add("b", "phase2.total_training_steps=6", "phase2.learning_rate=5e-3")
    add("c", "phase2.epochs=3", "phase2.seed=3")
    first = step("first step (compiles)")
    for i in range(3):
        step(f"step {i + 2}")
    step("a alone (b and c wait)", only=["a"])
    step("all again")
    group.remove_member("c")
    step("c removed")
    add("d", "phase2.epochs=2", "phase2.seed=9")
    for i in range(3):
        step(f"d joined, step {i + 1}")
    finite = all(math.isfinite(r["loss"]) for s in sinks.values() for r in s.records)
    print(json.dumps({"label": args.label, "first_step_s": round(first, 2),
                      "graphs": counters["stats"]["unique_graphs"],
                      "cache_loaded": group.compile_cache.loaded,
                      "cache_saved": group.compile_cache.saved, "finite": finite,
                      **({"nodes": sum(nodes.values()), "nodes_by_file": dict(
                          nodes.most_common())} if args.trace_only else {})}), flush=True)
    if args.compile_times:
        from torch._dynamo.utils import compile_times

        print(compile_times(repr="str", aggregate=True), flush=True)


def trace_only(nodes: collections.Counter[str]) -> None:
    """Make every torch.compile in this process use a backend that runs Dynamo's graph
    as it is (no Inductor), counting its nodes into `nodes` by the file of the innermost
    frame of each node's stack trace."""
    real_compile = torch.compile

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        for node in gm.graph.nodes:
            frames = re.findall(r'File "([^"]+)", line', node.meta.get("stack_trace") or "")
            nodes[Path(frames[-1]).name if frames else f"({node.op})"] += 1
        return gm.forward

    def compile_eager(model: object = None, **kwargs: object) -> object:
        kwargs.pop("mode", None)  # a mode is Inductor's; the backend here is Dynamo's own
        return real_compile(model, backend=counting, **kwargs)

    torch.compile = compile_eager


if __name__ == "__main__":
    main()
