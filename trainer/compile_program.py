"""A compiled group forward whose Dynamo trace is kept on disk too (`model.compile_program`).

The compile cache (trainer.compile_cache) keeps Inductor's and AOTAutograd's output, so a
warm start builds no kernels, but Dynamo still traces the forward again: on the 24-layer
reference LLM that is most of a warm start (bench/slot_compile.py --trace-only:
transformers' decoder code, traced once per layer). Here the forward is compiled with
`torch.compile(...).aot_compile` (PyTorch's ahead-of-time precompile), which returns the
traced program, bytecode and compiled graphs in one object that `save_compiled_function`
writes and `AOTCompiledFunction.deserialize` reads back in another process without
tracing anything.

Dynamo's guards cannot all be saved (they name objects of this process: modules, the
routing's closures, classes defined in functions), so the program is saved with none
(`drop_guards`), and what the guards would have checked is checked here instead:

- which program: the file name is a hash of everything the trace read
  (`program_key`): the compile cache's key (input shapes and dtypes, the projector's
  shapes, the LoRA dropout rates, the LLM's and the model's config, precision, device),
  plus the torch, transformers, peft and Python versions, this package's source and the
  LLM class's source file. Another version or an edited trainer module is another file,
  never a stale program;
- each call: `TracedProgram.matches` compares the call's signature (grad mode, train mode,
  input shapes, dropout rates) with the one the program was traced for; a call that
  differs runs the ordinary compiled forward (which traces its own graph), as does every
  call after a failure to trace, save or load a program (logged, never fatal).
"""

from __future__ import annotations

import hashlib
import inspect
import platform
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.fsutil import atomic_write_bytes

SUFFIX = ".program"
PACKAGE_DIR = Path(__file__).resolve().parent  # trainer/: the code the forward runs


def drop_guards(entries: Sequence[Any]) -> list[bool]:
    """Dynamo's guard filter that keeps none (see the module docstring for what replaces
    them)."""
    return [False] * len(entries)


def source_digest(llm_class: type) -> str:
    """A hash of the code a traced group forward runs: every module of this package and
    the file that defines the LLM's class (transformers' or the user's own)."""
    h = hashlib.sha256()
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    try:
        files.append(Path(inspect.getfile(llm_class)))
    except (TypeError, OSError):  # a class without a file: its name stands for it
        h.update(llm_class.__qualname__.encode())
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def program_key(cache_key: str, llm_class: type) -> str:
    """The program file's key: the compile cache's key (the graph's shapes and configs)
    with the versions and the source the trace depends on."""
    import peft
    import transformers

    text = "|".join([cache_key, torch.__version__, transformers.__version__,
                     peft.__version__, platform.python_version(), source_digest(llm_class)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class TracedProgram:
    """One group forward's program: loaded from `directory` if a process of the same key
    saved it, else traced at its first call and saved there."""

    def __init__(self, fn: Callable[..., Any], mode: str, directory: Path, key: str,
                 log: Callable[[str], None] = print) -> None:
        self.fn, self.mode, self.log = fn, mode, log
        self.path = Path(directory) / f"{key}{SUFFIX}"
        self.signature: Hashable | None = None  # what the program was traced for
        self.program: Any = None
        self.failed = False  # tracing, saving or loading failed: the ordinary path only
        self.loaded = False
        self.saved = False

    def matches(self, signature: Hashable) -> bool:
        """Whether a call of this signature may run the program: the one it was traced for
        (or the first call, which traces it, unless that failed)."""
        if self.failed:
            return False
        return self.signature is None or signature == self.signature

    def __call__(self, signature: Hashable, *args: Any) -> Any:
        """Run the program on `args` (a call `matches` accepted): loaded or traced first."""
        if self.program is None:
            self.signature = signature
            loaded = self._load()
            if loaded is not None:
                try:
                    out = loaded(*args)
                except Exception as e:  # e.g. saved by a torch that reads it otherwise
                    self.log(f"[compiled program] {self.path} failed at its first call, "
                             f"tracing it again: {type(e).__name__}: {str(e)[:300]}")
                    self.loaded = False
                else:
                    self.program = loaded
                    return out
            self.program = self._trace(args)
            if self.program is None:
                self.failed = True
                return self.fn(*args)
        return self.program(*args)

    def _load(self) -> Any:
        if not self.path.is_file():
            return None
        from torch._dynamo.aot_compile import AOTCompiledFunction
        from torch._inductor import list_mode_options

        try:
            # The loaded graphs are wrapped (CUDA graphs or not) from Inductor's config of
            # the moment, not the one they were compiled under: without the mode's options
            # here a reduce-overhead program would run without its CUDA graphs.
            with torch._inductor.config.patch(list_mode_options(self.mode)):
                program = AOTCompiledFunction.deserialize(self.path.read_bytes(),
                                                          f_globals=self.fn.__globals__)
        except Exception as e:  # another torch's file, a truncated copy: trace it again
            self.log(f"[compiled program] ignoring {self.path}: {type(e).__name__}: {e}")
            return None
        self.loaded = True
        self.log(f"[compiled program] loaded {self.path}: Dynamo's trace skipped")
        return program

    def _trace(self, args: tuple[Any, ...]) -> Any:
        from torch._inductor import list_mode_options

        options = {**list_mode_options(self.mode), "guard_filter_fn": drop_guards}
        try:
            # torch.compile attaches `.aot_compile` only while this flag is set: on by
            # default from torch 2.13, off in 2.11 and 2.12 (where the API already works)
            with torch._dynamo.config.patch(enable_aot_compile=True):
                compiled = torch.compile(self.fn, fullgraph=True, dynamic=False,
                                         options=options)
            program = compiled.aot_compile((args, {}))
        except Exception as e:  # e.g. a graph break, or a torch without aot_compile
            self.log(f"[compiled program] off, the forward compiles as usual: "
                     f"{type(e).__name__}: {str(e)[:300]}")
            return None
        try:
            saved = type(program).serialize(program)
            data = getattr(saved, "serialized_data", saved)  # bytes in older torch releases
            atomic_write_bytes(self.path, data)
        except Exception as e:  # unpicklable state, a full or read-only store: not kept
            self.log(f"[compiled program] traced, not saved: {type(e).__name__}: "
                     f"{str(e)[:300]}")
            return program
        self.saved = True
        self.log(f"[compiled program] saved {self.path}")
        return program
