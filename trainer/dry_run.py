"""`--dry-run`: the checks a run makes before training, with nothing trained or built.

- The LLM (trainer.llm): its directory holds a config, weights and tokenizer files; the
  tokenizer loads and pads (a missing pad token becomes EOS, said in one line); the LoRA
  targets match modules LoRA can wrap, found by peft on the architecture built on the
  meta device (no weights read). The demo LLM, when not built yet, is checked the same way
  from its config alone (its tokenizer is generated with a pad and an EOS token).
- The media of the user's manifests: every file opened once, every bad one reported.

Every problem is collected and raised once as a ConfigError (one line each, exit 2).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from trainer.config import TrainConfig
from trainer.data import check_media, read_manifest
from trainer.errors import ConfigError, Problem
from trainer.inputs import demo_llm_dir
from trainer.llm import plan_lora, prepare_llm


def llm_problems(cfg: TrainConfig, source: str = "config",
                 log: Callable[[str], Any] = print) -> list[Problem]:
    """Problems of the LLM and its LoRA targets (empty when the run can build them)."""
    lora = cfg.model.lora
    try:
        if cfg.model.llm_path is not None:
            prepare_llm(cfg.model.llm_path, lora, source, log)
        elif (demo_llm_dir(cfg) / ".complete").is_file():
            prepare_llm(demo_llm_dir(cfg), lora, source, log)
        else:  # not built yet: its architecture is known from the config, no need to build
            from transformers import AutoModelForCausalLM

            from trainer.demo_assets import demo_llm_config

            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lm = AutoModelForCausalLM.from_config(
                    demo_llm_config(cfg.demo.llm.model_dump(mode="json")))
            log(plan_lora(lm, lora, source).describe(lora.r))
    except ConfigError as e:
        return e.problems
    return []


def media_problems(cfg: TrainConfig, log: Callable[[str], Any] = print) -> list[Problem]:
    """Open every media file of the user's manifests once; one problem per bad file."""
    problems: list[Problem] = []
    for manifest in (cfg.data.manifest, cfg.data.eval_manifest):
        if manifest is not None:  # the demo data is generated, not read
            try:
                examples = read_manifest(manifest)
            except ConfigError as e:  # duplicate ids, empty targets...: listed with the rest
                problems += e.problems
                continue
            problems += check_media(examples)
            log(f"media: {len(examples)} examples of {manifest} opened")
    return problems


def dry_run(cfg: TrainConfig, source: str = "config",
            log: Callable[[str], Any] = print) -> None:
    """Every check above; raises one ConfigError listing every problem found."""
    problems = llm_problems(cfg, source, log) + media_problems(cfg, log)
    if problems:
        raise ConfigError(problems)
