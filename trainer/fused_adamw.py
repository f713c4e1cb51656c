"""A fused AdamW step over tensor lists gathered once, for optimizers stepped every step.

`torch.optim.AdamW(fused=True).step()` launches one fused kernel per parameter group, but
first walks every parameter in Python: grad and state lookups, list building, grouping by
device and dtype. For a trial group's member (projector + 192 LoRA tensors on the
reference model) that walk is most of the step's host time, which a group pays once per
member (measured by `bench/adamw_step.py`; figures in docs/performance.md).
`ListedAdamW` gathers the parameters, moments
and step counts once and then launches what `step()` launches: the step counts'
increment, one `torch._fused_adamw_` per group with that group's current hyperparameters,
and, with `found_inf`, the step counts' decrement, so the update is the same, bit for
bit. It applies only where `step()` would take exactly that path (`supports`) and only
while the lists stay valid: the caller builds it after a first `step()` has created the
state; once `load_state_dict` has replaced the optimizer's state (a resume) it is stale
(`fresh`) and its `step` declines, so the caller takes `step()` and builds a new one.
"""

from __future__ import annotations

import torch

_OFF = ("amsgrad", "maximize", "capturable", "differentiable")  # flags step() would honour


class ListedAdamW:
    """The fused AdamW step of `optimizer` over lists gathered at construction."""

    def __init__(self, optimizer: torch.optim.AdamW) -> None:
        if not self.supports(optimizer):
            raise ValueError("ListedAdamW needs a fused AdamW with its state created")
        self.optimizer = optimizer
        state = self._state = optimizer.state
        self._groups = [(g, list(g["params"]),
                         [state[p]["exp_avg"] for p in g["params"]],
                         [state[p]["exp_avg_sq"] for p in g["params"]],
                         [state[p]["step"] for p in g["params"]])
                        for g in optimizer.param_groups]
        self._steps = [s for *_, steps in self._groups for s in steps]

    @staticmethod
    def supports(optimizer: torch.optim.Optimizer) -> bool:
        """Whether `step()` of `optimizer` is one fused AdamW kernel per group over
        parameters that all have state already (after its first step)."""
        if not isinstance(optimizer, torch.optim.AdamW) or not optimizer.param_groups:
            return False
        groups = optimizer.param_groups
        if any(not g.get("fused") or any(g.get(k) for k in _OFF) for g in groups):
            return False
        if any(isinstance(v, torch.Tensor) for g in groups for v in (g["lr"], *g["betas"])):
            return False  # step() moves tensor hyperparameters: keep to its own path
        return all("exp_avg" in optimizer.state.get(p, {}) for g in groups for p in g["params"])

    def fresh(self) -> bool:
        """Whether the optimizer still holds the state and groups the lists came from
        (`load_state_dict` replaces both, and stepping stale lists would update tensors
        the optimizer no longer holds)."""
        groups = self.optimizer.param_groups
        return (self.optimizer.state is self._state and len(groups) == len(self._groups)
                and all(a is g for a, (g, *_) in zip(groups, self._groups, strict=True)))

    def step(self, found_inf: torch.Tensor | None = None) -> bool:
        """One step (skipped on the device where `found_inf` is 1.0, as `guarded_step`);
        False, doing nothing, when some parameter has no gradient (then `step()` would
        skip that parameter) or the lists are stale (`fresh`): the caller takes `step()`."""
        if not self.fresh():
            return False
        grads = [[p.grad for p in params] for _, params, *_ in self._groups]
        if any(g is None for gs in grads for g in gs):
            return False
        torch._foreach_add_(self._steps, 1)
        for (g, params, exp_avgs, exp_avg_sqs, steps), gs in zip(self._groups, grads,
                                                                 strict=True):
            beta1, beta2 = g["betas"]
            torch._fused_adamw_(params, gs, exp_avgs, exp_avg_sqs, [], steps,
                                amsgrad=False, lr=g["lr"], beta1=beta1, beta2=beta2,
                                weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
                                grad_scale=None, found_inf=found_inf)
        if found_inf is not None:
            torch._foreach_sub_(self._steps, [found_inf] * len(self._steps))
        return True
