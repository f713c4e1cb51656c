"""Phase 2 differential-LR trainer: frozen Phase 1 encoders + aligner, a projector
trained from scratch and LoRA adapters on the LLM, one AdamW group each.

Imports neither Ray nor MLflow; metrics leave through `trainer.metrics.MetricsSink`.

The names below load on first use (PEP 562), not with the package: importing a light
module (`trainer.config`, `trainer.metrics`) must not import torch, since a shared
group's trial processes are thin clients that never train.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.config import TrainConfig, config_from_data, load_config
    from trainer.errors import ConfigError
    from trainer.inputs import Inputs, prepare_inputs
    from trainer.loop import train
    from trainer.metrics import MemorySink, MetricsSink, RunSummary

# Each public name and the module that defines it.
_EXPORTS = {
    "TrainConfig": "trainer.config", "config_from_data": "trainer.config",
    "load_config": "trainer.config", "ConfigError": "trainer.errors",
    "Inputs": "trainer.inputs", "prepare_inputs": "trainer.inputs", "train": "trainer.loop",
    "MemorySink": "trainer.metrics", "MetricsSink": "trainer.metrics",
    "RunSummary": "trainer.metrics",
}

__all__ = [
    "ConfigError", "Inputs", "MemorySink", "MetricsSink", "RunSummary", "TrainConfig",
    "config_from_data", "load_config", "prepare_inputs", "train",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value
