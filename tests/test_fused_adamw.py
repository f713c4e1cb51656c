"""ListedAdamW: the fused AdamW step over lists gathered once is `step()`, bit for bit."""

from __future__ import annotations

import pytest
import torch

from trainer.fused_adamw import ListedAdamW
from trainer.optim import guarded_step


def _model(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g))
            for shape in ((16, 8), (8,), (4, 16), (3, 5, 2))]


def _optimizer(params: list[torch.nn.Parameter], **kw) -> torch.optim.AdamW:
    groups = [{"params": params[:2], "lr": 1e-2, "name": "projector"},
              {"params": params[2:], "lr": 5e-3, "name": "lora", "weight_decay": 0.1}]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-6, **{"fused": True, **kw})


def _set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_listed_step_is_the_fused_step_bit_for_bit():
    """Same parameters, moments and step counts after every step, through skipped steps
    (found_inf 1) and LR changes between steps (the schedule's)."""
    ref, mine = _model(0), _model(0)
    opt_ref, opt_mine = _optimizer(ref), _optimizer(mine)
    for params, opt in ((ref, opt_ref), (mine, opt_mine)):
        _set_grads(params, 0)
        opt.step()  # creates the state
    listed = ListedAdamW(opt_mine)
    for step, skip in enumerate([0.0, 1.0, 0.0, 0.0, 1.0, 0.0], start=1):
        for params, opt in ((ref, opt_ref), (mine, opt_mine)):
            _set_grads(params, step)
            for group in opt.param_groups:
                group["lr"] *= 0.7
        found_inf = torch.tensor(skip)
        guarded_step(opt_ref, found_inf)
        assert listed.step(found_inf)
        for a, b in zip(ref, mine, strict=True):
            assert torch.equal(a, b), step
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt_ref.state[a][key], opt_mine.state[b][key]), (step, key)
    # the first step and 4 of the 6 listed ones: the 2 skipped left the counts as they were
    assert opt_mine.state[mine[0]]["step"].item() == 1 + 4


def test_a_parameter_without_a_gradient_leaves_the_step_to_the_optimizer():
    params = _model(1)
    opt = _optimizer(params)
    _set_grads(params, 0)
    opt.step()
    listed = ListedAdamW(opt)
    before = [p.detach().clone() for p in params]
    steps = [opt.state[p]["step"].clone() for p in params]
    _set_grads(params, 1)
    params[3].grad = None
    assert listed.step(torch.tensor(0.0)) is False
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all(torch.equal(a, opt.state[p]["step"]) for a, p in zip(steps, params, strict=True))


@pytest.mark.parametrize("kw,state", [({}, False), ({"fused": False}, True),
                                      ({"amsgrad": True}, True), ({"maximize": True}, True)])
def test_only_a_plain_fused_adamw_with_state_is_supported(kw, state):
    params = _model(2)
    opt = _optimizer(params, **kw)
    assert not ListedAdamW.supports(opt)
    if state:  # a first step creates the state; the kind of step still rules it out
        _set_grads(params, 0)
        opt.step()
        assert not ListedAdamW.supports(opt)
        with pytest.raises(ValueError, match="fused AdamW"):
            ListedAdamW(opt)
    else:
        _set_grads(params, 0)
        opt.step()
        assert ListedAdamW.supports(opt)


def test_a_resume_makes_the_lists_stale_and_the_step_declines():
    """`load_state_dict` (a resume) replaces the optimizer's state tensors: the old lists
    would update tensors it no longer holds, so `step` declines and a new one is exact."""
    ref, mine = _model(3), _model(3)
    opt_ref, opt_mine = _optimizer(ref), _optimizer(mine)
    for params, opt in ((ref, opt_ref), (mine, opt_mine)):
        _set_grads(params, 0)
        opt.step()
    stale = ListedAdamW(opt_mine)
    assert stale.fresh()
    opt_mine.load_state_dict(opt_mine.state_dict())
    assert not stale.fresh()
    before = [p.detach().clone() for p in mine]
    _set_grads(mine, 1)
    assert stale.step(torch.tensor(0.0)) is False
    assert all(torch.equal(a, b) for a, b in zip(before, mine, strict=True))
    _set_grads(ref, 1)
    guarded_step(opt_ref, torch.tensor(0.0))
    assert ListedAdamW(opt_mine).step(torch.tensor(0.0))
    for a, b in zip(ref, mine, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt_ref.state[a]["exp_avg_sq"], opt_mine.state[b]["exp_avg_sq"])


@pytest.mark.integration
def test_a_device_guarded_run_steps_listed_and_trains_as_with_step(tiny, monkeypatch):
    """A solo run with the device guard (as on a GPU) takes every step after the first
    over the listed AdamW, with the same losses and weights as `optimizer.step()`."""
    from safetensors.torch import load_file

    from trainer import step
    from trainer.loop import train
    from trainer.metrics import MemorySink

    def run(name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        cfg = tiny(run_name=name, epochs=1)
        cfg.output.sync_every = 4
        sink = MemorySink()
        train(cfg, sink, console=False, log=lambda *_: None)
        weights = load_file(str(cfg.output.root / name / "trainable.safetensors"))
        return [r["loss"] for r in sink.records], weights

    listed_steps = []
    real_step = ListedAdamW.step

    def counted(self, found_inf=None):
        done = real_step(self, found_inf)
        listed_steps.append(done)
        return done

    monkeypatch.setattr(ListedAdamW, "step", counted)
    losses, weights = run("listed")
    assert len(losses) > 2 and listed_steps == [True] * (len(losses) - 1)
    monkeypatch.setattr(step, "listed_step", lambda parts: None)
    ref_losses, ref_weights = run("step")
    assert len(listed_steps) == len(losses) - 1  # the second run never took the lists
    assert losses == ref_losses
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
