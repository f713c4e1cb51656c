"""Any causal LM from a local directory: its files, tokenizer and LoRA targets, checked
before a run writes anything.

`prepare_llm` is what a run calls first: it names missing files (config, weights,
tokenizer), loads the tokenizer (a missing pad token falls back to EOS, said in one
line), and applies the run's LoRA config with peft to the architecture on the meta
device (no weights read, nothing allocated), so a target that matches nothing, or a
module LoRA cannot wrap, is one line naming the module names that do exist, and the
modules that will be wrapped are printed with their trainable parameter count.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import LoRA
from trainer.errors import ConfigError, Problem
from trainer.model import add_lora, linear_types, lora_target_names, wrapped_modules

KEY = "model.llm_path"
TARGETS_KEY = "model.lora.target_modules"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Any one of these lets AutoTokenizer build a tokenizer (fast JSON, SentencePiece, BPE with
# its merges, WordPiece); tokenizer_config.json alone does not.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


@dataclass(frozen=True)
class LoraPlan:
    """What LoRA will wrap in this LLM, found by peft itself on the meta device."""

    architecture: str
    wrapped: list[str]  # module names inside the CausalLM
    lora_params: int

    def describe(self, r: int) -> str:
        return (f"[lora] wraps {len(self.wrapped)} modules of {self.architecture} "
                f"(r={r}, {self.lora_params:,} trainable LoRA params): "
                f"{layer_patterns(self.wrapped)}")


def layer_patterns(names: list[str]) -> str:
    """`model.layers.*.self_attn.q_proj x24, ...`: names with their layer index folded."""
    counts = Counter(re.sub(r"\.\d+\.", ".*.", n) for n in names)
    return ", ".join(p if c == 1 else f"{p} x{c}" for p, c in counts.items())


def file_problems(llm_dir: Path, source: str) -> list[Problem]:
    """The files a model directory lacks (config, weights, tokenizer), one Problem each."""
    present = sorted(p.name for p in llm_dir.iterdir()) if llm_dir.is_dir() else []
    found = f"it holds: {', '.join(present) or 'nothing'}"
    save = "save them next to the model: model.save_pretrained(DIR); " \
           "tokenizer.save_pretrained(DIR)"
    problems = []
    if "config.json" not in present:
        problems.append(Problem(source, KEY, f"{llm_dir} has no config.json ({found})", save))
    if not any(f in present for f in WEIGHT_FILES) and not any(
            n.endswith(".safetensors") for n in present):
        problems.append(Problem(source, KEY, f"{llm_dir} has no weights (none of "
                                f"{', '.join(WEIGHT_FILES)}; {found})", save))
    if not any(f in present for f in TOKENIZER_FILES):
        problems.append(Problem(source, KEY, f"{llm_dir} has no tokenizer files (none of "
                                f"{', '.join(TOKENIZER_FILES)}; {found})", save))
    elif ("vocab.json" in present and "merges.txt" not in present
          and "tokenizer.json" not in present):
        problems.append(Problem(source, KEY, f"{llm_dir} has vocab.json but no merges.txt "
                                f"(a BPE tokenizer needs both; {found})", save))
    return problems


def load_tokenizer(llm_dir: Path, source: str = "config", log: Callable[[str], Any] = print):
    """The LLM's tokenizer, ready to pad: a missing pad token becomes the EOS token.

    Padding is safe with any token: rows are right-padded and padded positions are neither
    attended by real ones (causal attention) nor targets. An EOS token is required: every
    target ends with it.
    """
    from transformers import AutoTokenizer

    problems = file_problems(llm_dir, source)
    if problems:
        raise ConfigError(problems)
    try:
        tok = AutoTokenizer.from_pretrained(str(llm_dir), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError([Problem(source, KEY, f"the tokenizer in {llm_dir} does not load: "
                                   f"{first}", "save a working tokenizer there with "
                                   "tokenizer.save_pretrained(DIR)")]) from None
    if tok.eos_token_id is None:
        raise ConfigError([Problem(source, KEY, f"the tokenizer in {llm_dir} has no EOS token "
                                   "(every target ends with one)", "set eos_token in its "
                                   "tokenizer_config.json")])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        log(f"[llm] the tokenizer has no pad token: padding with its EOS token "
            f"{tok.eos_token!r} (id {tok.eos_token_id}); padding is never a target")
    return tok


def meta_llm(llm_dir: Path, source: str = "config") -> nn.Module:
    """The CausalLM of `llm_dir` built from its config.json on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(llm_dir), local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError([Problem(source, KEY, f"{llm_dir} is not a causal LM transformers "
                                   f"can build: {first}", "point it at a directory saved with "
                                   "AutoModelForCausalLM's save_pretrained")]) from None


def adaptable_names(lm: nn.Module) -> list[str]:
    """Distinct last parts of the names of the modules LoRA can wrap (dense layers and
    embeddings), in model order: what a user can write in target_modules."""
    kinds = (*linear_types(), nn.Embedding)
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in lm.named_modules()
                              if n and isinstance(m, kinds)))


def plan_lora(lm: nn.Module, lora: LoRA, source: str = "config") -> LoraPlan:
    """Check `lora.target_modules` against `lm` (the meta CausalLM) and wrap it with peft.

    Raises ConfigError when nothing matches or a match is a module LoRA cannot wrap.
    """
    targets = lora.target_modules
    names = lora_target_names(lm, targets)
    arch = type(lm).__name__
    adaptable = adaptable_names(lm)
    existing = ", ".join(adaptable)
    shown = f"'{targets}'" if isinstance(targets, str) else f"[{', '.join(targets)}]"
    if not names:
        head = lm.get_output_embeddings()
        dense = [n.rsplit(".", 1)[-1] for n, m in lm.named_modules()
                 if isinstance(m, linear_types()) and m is not head]
        example = targets if targets in adaptable else (dense or adaptable or ["q_proj"])[0]
        how = (f"a string is a regex over the whole module name, e.g. '.*\\.{example}'; "
               if isinstance(targets, str) else "")
        raise ConfigError([Problem(
            source, TARGETS_KEY, f"{shown} matches no module of {arch}; its adaptable "
            f"modules are named: {existing}",
            f"{how}e.g. model.lora.target_modules=[{example}], or all-linear")])
    modules = dict(lm.named_modules())
    kinds = (*linear_types(), nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    bad = [n for n in names if not isinstance(modules[n], kinds)]
    if bad:
        raise ConfigError([Problem(
            source, TARGETS_KEY, f"{shown} matches {bad[0]} ({type(modules[bad[0]]).__name__}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}), which LoRA cannot wrap",
            f"target dense layers; {arch}'s are named: {existing}")])
    base = sum(p.numel() for p in lm.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's advisory warnings say nothing new here
        peft_lm = add_lora(lm, lora.r, lora.alpha, lora.dropout, targets)
    total = sum(p.numel() for p in peft_lm.parameters())
    return LoraPlan(arch, wrapped_modules(peft_lm), total - base)


def prepare_llm(llm_dir: Path, lora: LoRA, source: str = "config",
                log: Callable[[str], Any] = print):
    """Check an LLM directory against the run's LoRA config; return its tokenizer.

    Runs before the run directory is made, so bad input writes nothing. Prints the pad
    fallback (if any) and which modules LoRA wraps, with their trainable parameter count.
    """
    tok = load_tokenizer(llm_dir, source, log)
    lm = meta_llm(llm_dir, source)
    vocab = lm.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise ConfigError([Problem(source, KEY, f"the tokenizer in {llm_dir} has {len(tok)} "
                                   f"tokens, the model's embedding only {vocab}",
                                   "save the tokenizer the model was trained with, or "
                                   "resize the embedding before saving")])
    log(plan_lora(lm, lora, source).describe(lora.r))
    return tok
