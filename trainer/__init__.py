"""Phase 2 differential-LR trainer: frozen Phase 1 encoders + aligner, a projector
trained from scratch and LoRA adapters on the LLM, one AdamW group each.

Imports neither Ray nor MLflow; metrics leave through `trainer.metrics.MetricsSink`.
"""

from trainer.config import TrainConfig, config_from_data, load_config
from trainer.errors import ConfigError
from trainer.inputs import Inputs, prepare_inputs
from trainer.loop import train
from trainer.metrics import MemorySink, MetricsSink, RunSummary

__all__ = [
    "ConfigError", "Inputs", "MemorySink", "MetricsSink", "RunSummary", "TrainConfig",
    "config_from_data", "load_config", "prepare_inputs", "train",
]
