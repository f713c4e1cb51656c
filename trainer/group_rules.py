"""Who may join a trial group: the config keys the shared forward fixes for every member,
and the LoRA targets a group cannot route per row. Checked before a member is built (and
by `tuning.sweep` before Ray starts), each problem naming its key and the fix.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from trainer.config import TrainConfig
from trainer.errors import Problem
from trainer.inputs import Inputs
from trainer.model import lora_target_names

# Every key whose value the shared forward fixes for the whole group.
SHARED_KEYS = (
    "model.llm_path", "model.attn_implementation", "model.lora.target_modules", "model.compile",
    "model.compile_scope", "model.compile_ahead", "model.run_empty_slots",
    "model.skip_compile_guards", "model.compile_program",
    "model.cast_frozen_linears", "phase2.precision", "phase2.gradient_accumulation_steps",
    "phase1.bundle_path",
    "data", "demo",
)


def _leaves(node: Any, key: str) -> dict[str, Any]:
    """Dotted leaf keys under `key` of plain config data, so a problem names the exact key."""
    if isinstance(node, dict):
        return {k: v for sub, child in node.items()
                for k, v in _leaves(child, f"{key}.{sub}").items()}
    return {key: node}


def _shared_values(cfg: TrainConfig) -> dict[str, Any]:
    plain = cfg.to_plain()
    out: dict[str, Any] = {}
    for key in SHARED_KEYS:
        node: Any = plain
        for part in key.split("."):
            node = node[part]
        out.update(_leaves(node, key))
    return out


def group_problems(ref: TrainConfig | None, cfg: TrainConfig, inputs: Inputs,
                   source: str = "config") -> list[Problem]:
    """Why `cfg` cannot join a group whose first member had `ref` (empty when it can)."""
    problems = []
    if not cfg.data.feature_cache or inputs.feature_cache is None:
        problems.append(Problem(
            source, "data.feature_cache", "is off, but a trial group trains on cached features "
            "only (the frozen encoders never run in a group)",
            "set data.feature_cache=true, or train this trial alone"))
    mine_all = _shared_values(cfg)
    theirs_all = _shared_values(ref) if ref is not None else mine_all
    reported = {p.key for p in problems}
    for key, mine in mine_all.items():
        theirs = theirs_all[key]
        if mine != theirs and key not in reported:
            problems.append(Problem(
                source, key, f"{mine!r} differs from the group's {theirs!r}; every member of "
                "a trial group shares it", "group only trials that agree on it, or train "
                "this trial alone"))
    return problems


def io_lora_problems(lm: nn.Module, cfg: TrainConfig, source: str = "config") -> list[Problem]:
    """LoRA on the token embedding or the LM head cannot be routed per row in a group.

    The group embeds every row and applies the LM head outside the per-row adapter
    routing (the head only on target positions), so those two must stay plain modules.
    """
    io = (lm.get_input_embeddings(), lm.get_output_embeddings())
    modules = dict(lm.named_modules())
    hit = sorted(n for n in lora_target_names(lm, cfg.model.lora.target_modules)
                 if any(modules[n] is x for x in io))
    if not hit:
        return []
    return [Problem(source, "model.lora.target_modules",
                    f"{hit} adapt the token embedding or the LM head, which a trial group "
                    "shares unadapted", "target only layers inside the decoder, or train "
                    "this trial alone")]
