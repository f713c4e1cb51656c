"""A trial group's member: what one trial is inside a `trainer.group.TrialGroup`.

Its one job: the two views of a member the group keeps. `MemberView` is the member seen
as a solo `Phase2Model` (its projector, the shared LLM through its own adapter, its
parameters under solo names), so the solo run's optimizer, checkpoints and hooks work on
it unchanged; `Member` is the group's record of it (its solo `Run` and `State`, sinks,
clocks, launched steps and slot).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.metrics import MultiSink
from trainer.model import Phase2Model, Projector
from trainer.multilora import adapter_of, solo_name
from trainer.rows import Rows, rows_losses
from trainer.run import Run
from trainer.step import DeviceGuard, PendingStep, State


class MemberView(Phase2Model):
    """One member seen as a solo `Phase2Model`.

    Its forward runs its rows through the shared LLM and its own adapter, and its
    parameters carry solo names: its projector, the frozen base weights and its own
    LoRA weights under peft's "default" name; other members' adapters are invisible.
    So the solo optimizer groups, checkpoints, weight files and fault hooks work on it
    unchanged.
    """

    def __init__(self, projector: Projector, llm: nn.Module, adapter: str) -> None:
        super().__init__(projector, llm)
        self.adapter = adapter

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        rows = Rows(self.projector, self.adapter, features, input_ids, labels)
        return rows_losses(self.llm, [rows])[0]

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            owner = adapter_of(name)
            if owner is None:
                yield name, p
            elif owner == self.adapter:
                yield solo_name(name, self.adapter), p


@dataclass
class Member:
    """A trial training in the group: its solo `Run`/`State` plus its sinks and clocks."""

    member_id: str
    adapter: str
    run: Run
    state: State
    sink: MultiSink
    t0: float
    t_last: float
    guard: DeviceGuard | None = None  # the device NaN guard of runs that use it
    report_due: Callable[[int], bool] | None = None  # see TrialGroup.add_member
    pending: list[PendingStep] = field(default_factory=list)  # launched, not read back yet
    slot: int | None = None  # its row of a compiled group's LoRA stacks (group_slots.SlotTable)
