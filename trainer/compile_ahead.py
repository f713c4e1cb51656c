"""A compiled trial group's first compile, made by a helper process while the group trains.

A compiled group's first compile (cold: no artifacts in its compile cache) takes minutes at
a real model's scale, all of it on the host, with the GPU idle. With `model.compile_ahead`
the group (`trainer.group.TrialGroup`) instead starts a helper process,

    python -m trainer.compile_ahead SPEC.json

that builds a group of copies of the members' configs over the same K slots, trains one
step of it, which compiles the slots' forward and backward, and saves the artifacts to the
group's compile cache (`trainer.compile_cache`): the very file the group would have saved.
Meanwhile the group runs the same forward over the same slots and stacked LoRA weights
eagerly, so its members train from the first step (the same losses as compiled, up to
float rounding). Once the helper is done, the group loads the artifacts and compiles warm
(Dynamo's trace again; the kernels come from the cache), then runs compiled. With
`model.compile_program` the helper's group also traces and saves the slots' program
(`trainer.compile_program`, the same key as the group's), and the group loads that at the
switch instead of tracing the forward again.

What the helper trains is thrown away: its copies of the members write into a scratch
directory next to the cache, removed when it ends, and nothing in the members' runs
depends on it. It holds a second copy of the LLM and one step's activations on the same
device; should it fail (out of memory, a graph of other shapes than the group's, killed),
the group logs its last lines and compiles in its own process, as without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from trainer.config import TrainConfig, config_from_data
from trainer.inputs import Inputs, inputs_from_data, inputs_to_data

Progress = Literal["running", "ready", "failed"]
SPEC = "spec.json"
LOG = "helper.log"


def helper_config(cfg: TrainConfig, scratch: Path, name: str) -> dict:
    """`cfg` as the helper trains it: the same model, data and phase 2 keys (they fix the
    graph), its run in `scratch` (assets and feature cache still the member's), no
    weights or checkpoints written, no fault injection, no helper of its own."""
    plain = cfg.to_plain()
    plain["output"].update(root=str(scratch / "runs"), run_name=name,
                           assets_dir=str(cfg.assets_dir), save_weights=False,
                           checkpoint_every=0, eval_every=0)
    plain["debug"] = {}  # a hang or NaN injected at step 1 must not stall the compile
    plain["model"]["compile_ahead"] = False
    return plain


class CompileAhead:
    """The helper process compiling one set of slots into `cache_file`; see the module
    docstring. `poll()` each step until it is no longer "running", then `close()`."""

    def __init__(self, cfgs: Sequence[TrainConfig], inputs: Inputs, slots: int,
                 cache_file: Path, device: torch.device,
                 log: Callable[[str], None] = print) -> None:
        """Start the helper for a group of `cfgs` (the members in the order they joined,
        which names their adapters) on the group's `inputs` (LLM, data, feature caches:
        read, never built again) over `slots` slots on `device`; it must leave
        `cache_file`, the file the group's own compile would save."""
        self.cache_file = Path(cache_file)
        self.log = log
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix=".compile-ahead-",
                                             dir=self.cache_file.parent))
        spec = {"configs": [helper_config(c, self.scratch, f"m{i}") for i, c in enumerate(cfgs)],
                "inputs": inputs_to_data(inputs),
                "slots": slots, "cache_file": str(self.cache_file), "device": str(device)}
        (self.scratch / SPEC).write_text(json.dumps(spec))
        # The trainer package importable from the helper whatever its working directory
        # (a Ray worker's, a GPU host's PYTHONPATH install).
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                             if p)}
        with open(self.scratch / LOG, "wb") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        # A group dropped or a process exiting with the helper still running kills it.
        self._finalizer = weakref.finalize(self, _stop, self.proc, self.scratch)
        log(f"[compile ahead] compiling the group's {slots} slots in helper process "
            f"{self.proc.pid}; members train eagerly until it is done")

    def command(self) -> list[str]:
        """The helper's command line."""
        return [sys.executable, "-m", "trainer.compile_ahead", str(self.scratch / SPEC)]

    def poll(self) -> Progress:
        """"running", "ready" (the artifacts are in `cache_file`) or "failed" (logged)."""
        rc = self.proc.poll()
        if rc is None:
            return "running"
        if rc == 0 and self.cache_file.is_file():
            return "ready"
        tail = self.log_tail()
        self.log(f"[compile ahead] helper process failed (exit {rc}); compiling in this "
                 f"process instead. Its last lines:\n{tail}")
        return "failed"

    def log_tail(self, lines: int = 12) -> str:
        """The last lines the helper printed."""
        try:
            text = (self.scratch / LOG).read_text(errors="replace")
        except OSError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def close(self) -> None:
        """Stop the helper if it still runs, and remove its scratch directory."""
        self._finalizer()


def _stop(proc: subprocess.Popen, scratch: Path) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """The helper: compile the spec's slots and save their artifacts (exit 0), or say why
    not (exit 1: the graph's artifacts went to another file than the group's)."""
    from trainer.group import TrialGroup  # the group imports this module

    ap = argparse.ArgumentParser(
        prog="python -m trainer.compile_ahead",
        description="Compile a trial group's slots into its compile cache (started by a "
                    "group with model.compile_ahead; not meant to be run by hand).")
    ap.add_argument("spec", type=Path, help="the JSON spec the group wrote")
    spec_path = ap.parse_args(argv).spec
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as e:
        print(f"error: {spec_path}: not a readable compile-ahead spec ({e}); it is written "
              "by a group with model.compile_ahead", file=sys.stderr)
        return 2
    cfgs = [config_from_data(c, str(spec_path)) for c in spec["configs"]]
    cache_file = Path(spec["cache_file"])
    inputs = inputs_from_data(spec["inputs"])
    group = TrialGroup(inputs, spec["device"], slots=spec["slots"],
                       compile_cache=cache_file.parent)
    for i, cfg in enumerate(cfgs):
        group.add_member(f"m{i}", cfg)
    group.step()
    saved = group.compile_cache
    if saved is None or not saved.saved or saved.path != cache_file:
        print(f"[compile ahead] the compiled slots' artifacts are not {cache_file} "
              f"(saved: {saved.path if saved and saved.saved else 'nothing'}): the helper's "
              "graph is not the group's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
