"""The step arithmetic of one run: how many optimizer steps, which rows each one reads,
and at which steps the host must see the weights.

Pure functions of the config and the training split's size: no model, no device.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import Output, Phase2
from trainer.errors import ConfigError, Problem


@dataclass(frozen=True)
class Plan:
    batch_size: int  # rows per micro-batch
    accum: int  # micro-batches per optimizer step
    steps_per_epoch: int  # optimizer steps per pass over the training split
    total_steps: int  # optimizer steps of the whole run (the schedule ends at 0 here)
    warmup_steps: int  # linear warmup steps of the schedule

    def epoch_of(self, step: int) -> int:
        """The 0-based epoch of 1-based optimizer step `step`."""
        return (step - 1) // self.steps_per_epoch

    def micro_batch_rows(self, step_index: int, j: int) -> tuple[int, slice]:
        """(epoch, positions in that epoch's order) of micro-batch j of 0-based optimizer
        step `step_index`."""
        epoch, within = divmod(step_index, self.steps_per_epoch)
        k = within * self.accum + j
        return epoch, slice(k * self.batch_size, (k + 1) * self.batch_size)


def plan_steps(p2: Phase2, n_train: int, source: str = "config") -> Plan:
    """Optimizer-step plan; a run that cannot make sense is a ConfigError."""
    per_step = p2.batch_size * p2.gradient_accumulation_steps
    spe = n_train // per_step  # incomplete trailing micro-batches are dropped
    if spe < 1:
        raise ConfigError([Problem(source, "phase2.batch_size",
                                   f"{n_train} training examples < batch_size x "
                                   f"gradient_accumulation_steps = {per_step}",
                                   "lower batch_size or add data")])
    total = p2.total_training_steps or p2.epochs * spe
    if p2.warmup_steps >= total:  # equal would leave no cosine decay at all
        raise ConfigError([Problem(source, "phase2.warmup_steps",
                                   f"warmup of {p2.warmup_steps} steps is not shorter than the "
                                   f"run ({total} optimizer steps)",
                                   "lower warmup_steps or raise epochs / total_training_steps")])
    return Plan(p2.batch_size, p2.gradient_accumulation_steps, spe, total, p2.warmup_steps)


def needs_host(plan: Plan, out: Output, step: int) -> bool:
    """Whether the host must see step `step` before the next one starts: it evaluates,
    checkpoints or ends the run there, each of which needs the weights of that step."""
    return (step == plan.total_steps
            or bool(out.eval_every and step % out.eval_every == 0)
            or bool(out.checkpoint_every and step % out.checkpoint_every == 0))
