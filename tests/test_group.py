"""Trial groups: every member trains exactly as the same config trained alone (CPU, fp32)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from trainer.errors import ConfigError
from trainer.group import TrialGroup, adapter_of, train_group
from trainer.inputs import prepare_inputs
from trainer.loop import train
from trainer.metrics import MemorySink

pytestmark = pytest.mark.integration

RTOL, ATOL = 1e-5, 1e-6
# Trained weights after a dozen AdamW steps: an element whose gradient is near zero has its
# update m/sqrt(v) set by rounding, so a stacked bmm (another summation order than the
# eager matmuls) moves it by a few 1e-6 while every logged step still agrees to ATOL.
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 1e-5
COMPARED = ("loss", "grad_norm", "grad_norm/projector", "grad_norm/lora", "lr/projector",
            "lr/lora", "clipped", "skipped", "nan_events", "eval_loss")

# Three trials that differ in everything a member may have of its own; B stops after 5
# steps and C runs 12, so members leave the group at different steps.
SPECS = {
    "a": dict(learning_rate=2e-3, warmup_steps=2, gradient_clip_val=1.0, seed=7),
    "b": dict(learning_rate=5e-3, projector_lr_mult=2.0, lora_lr_mult=1.0, warmup_steps=1,
              gradient_clip_val=0.3, seed=3, batch_size=3, total_training_steps=5),
    "c": dict(learning_rate=1e-3, projector_lr=4e-3, warmup_steps=3, gradient_clip_val=None,
              seed=11, batch_size=6, epochs=2, weight_decay=0.01),
}


def _quiet(*_):
    pass


def _cfg(tiny, name, *, lora_dropout=0.0, projector_dropout=0.0, **p2):
    cfg = tiny(run_name=name, **p2)
    cfg.model.lora.dropout = lora_dropout
    cfg.model.projector.dropout = projector_dropout
    return cfg


def _solo(cfg, hook=None, resume=False):
    sink = MemorySink()
    train(cfg, sink, after_backward=hook, resume=resume, console=False, log=_quiet)
    return sink


def assert_same_steps(solo, grouped, who):
    """Every step's record of a group member equals the solo run's (names the member)."""
    assert [r["step"] for r in grouped] == [r["step"] for r in solo], who
    for s, g in zip(solo, grouped, strict=True):
        for key in COMPARED:
            assert (key in s) == (key in g), (who, s["step"], key)
            if key not in s:
                continue
            a, b = s[key], g[key]
            if isinstance(a, float) and math.isnan(a):
                assert math.isnan(b), (who, s["step"], key, a, b)
                continue
            assert b == pytest.approx(a, rel=RTOL, abs=ATOL), (
                f"member {who} step {s['step']} {key}: solo {a!r} != group {b!r} "
                "(another member's rows leaked into this one?)")


def _weights(run_dir):
    return load_file(str(run_dir / "trainable.safetensors"))


def _member_adapters(group):
    return {adapter_of(n) for n, _ in group.llm.named_parameters()} - {None}



def _count_group_graphs(monkeypatch) -> list:
    """Make trainer.group's torch.compile trace eagerly through AOT autograd and return the
    list its forward graphs are appended to (one per Dynamo compile)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    import trainer.group as group_mod

    real_compile, graphs = torch.compile, []

    def fake_compile(fn, mode, dynamic):
        def count(gm, _):
            graphs.append(gm)
            return make_boxed_func(gm.forward)

        return real_compile(fn, dynamic=dynamic, backend=aot_autograd(
            fw_compiler=count, bw_compiler=lambda gm, _: make_boxed_func(gm.forward)))

    monkeypatch.setattr(group_mod.torch, "compile", fake_compile)
    return graphs

def test_target_loss_equals_the_hf_causal_lm_loss(tiny):
    """Our loss (target rows only, chunked, no attention mask for right padding) equals
    HF's causal-LM loss over the masked batch; so does the static-shape variant that
    compiled forwards get."""
    from trainer.data import IGNORE_INDEX
    from trainer.model import (
        build_model,
        causal_lm,
        final_hidden,
        find_targets,
        prefix_embeds,
        target_loss,
        text_targets,
    )

    cfg = tiny()
    inputs = prepare_inputs(cfg, _quiet)
    model = build_model(inputs.llm_dir, 32, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj"], projector_hidden=None,
                        projector_dropout=0.0)
    lm = causal_lm(model.llm)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.config.vocab_size, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[mask == 0] = -100
    features = torch.randn(3, 5, 32, generator=gen)
    embeds = prefix_embeds(model.projector, lm.get_input_embeddings(), features, ids)
    full_mask = torch.cat([torch.ones(3, 5, dtype=mask.dtype), mask], 1)
    full_labels = torch.cat([torch.full((3, 5), IGNORE_INDEX), labels], 1)
    with torch.no_grad():
        hf = model.llm(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels,
                       use_cache=False).loss
        ours = model(features, ids, labels)
        hidden = final_hidden(lm, embeds)
        head = lm.get_output_embeddings()
        chunked = target_loss(hidden, find_targets(labels, 5), head, chunk_rows=5)
        static = text_targets(labels, 5)
        assert static.rows.shape == (36,) and int(static.count) == int((labels != -100).sum())
        model.static_loss = True  # what a compiled forward uses
        ours_static = model(features, ids, labels)
        model.static_loss = False
        padded = model(features, F.pad(ids, (0, 4)), F.pad(labels, (0, 4), value=-100))
    assert ours.item() == pytest.approx(hf.item(), rel=1e-5)
    assert chunked.item() == pytest.approx(hf.item(), rel=1e-5)  # several chunks, same sum
    assert ours_static.item() == pytest.approx(hf.item(), rel=1e-5)
    assert padded.item() == pytest.approx(hf.item(), rel=1e-5)  # more right padding: same


def test_target_losses_of_several_blocks_are_each_blocks_own_loss():
    """All blocks' target rows through the LM head at once give each block the loss (and
    hidden-state gradient) it gets alone, in several chunks too; a NaN in one block's
    hidden rows stays in that block."""
    from trainer.model import find_targets, target_loss, target_losses, text_targets

    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 17, bias=False)
    hidden = torch.randn(5, 9, 8, generator=gen)
    labels = torch.randint(0, 17, (5, 6), generator=gen)
    labels[:, :2] = -100
    labels[3, 4:] = -100
    blocks = [(0, 2), (2, 1), (3, 2)]  # (first row, rows)
    for static in (False, True):
        find = text_targets if static else find_targets
        targets = [find(labels[a : a + n], 3) for a, n in blocks]
        for chunk in (4096, 7):
            h1 = hidden.clone().requires_grad_()
            firsts = [(a, t) for (a, _), t in zip(blocks, targets, strict=True)]
            calls = []
            hook = head.register_forward_hook(lambda *_, calls=calls: calls.append(1))
            together = target_losses(h1, firsts, head, chunk_rows=chunk)
            hook.remove()
            # one head matmul per chunk of all blocks' rows, not one per block
            assert len(calls) == -(-sum(t.labels.shape[0] for t in targets) // chunk)
            sum(together).backward()
            h2 = hidden.clone().requires_grad_()
            alone = [target_loss(h2[a : a + n], t, head)
                     for (a, n), t in zip(blocks, targets, strict=True)]
            sum(alone).backward()
            for x, y in zip(together, alone, strict=True):
                assert x.item() == pytest.approx(y.item(), rel=1e-6)
            torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    poisoned = hidden.clone()
    poisoned[2, 5] = float("nan")  # a target row of the second block
    targets = [find_targets(labels[a : a + n], 3) for a, n in blocks]
    firsts = [(a, t) for (a, _), t in zip(blocks, targets, strict=True)]
    losses = target_losses(poisoned, firsts, head)
    assert [math.isnan(x.item()) for x in losses] == [False, True, False]
    # a batch without a single target: NaN, as HF's loss (no LM-head row at all)
    none = find_targets(torch.full((2, 6), -100), 3)
    assert none.count == 0 and math.isnan(target_loss(hidden[:2], none, head).item())


# Members with the host guard, and with the device guard (trainer.step: their steps
# are read back together, one sync per window of group steps); the solo runs use the same guard (the
# device guard needs the fused AdamW, whose rounding differs from the for-each one's).
GUARDS = pytest.mark.parametrize("sync", [1, 4], ids=["host-guard", "device-guard"])


@GUARDS
def test_members_train_exactly_as_they_train_alone(tiny, sync):
    solo_cfgs = {k: _cfg(tiny, f"solo-{k}", **p) for k, p in SPECS.items()}
    solo_cfgs["c"].output.eval_every = 4
    for cfg in solo_cfgs.values():
        cfg.output.sync_every = sync
    solo = {k: _solo(cfg) for k, cfg in solo_cfgs.items()}

    group_cfgs = {k: _cfg(tiny, f"group-{k}", **p) for k, p in SPECS.items()}
    group_cfgs["c"].output.eval_every = 4
    for cfg in group_cfgs.values():
        cfg.output.sync_every = sync
    group = TrialGroup(prepare_inputs(group_cfgs["a"], _quiet), log=_quiet)
    sinks = {k: MemorySink() for k in SPECS}
    for k, cfg in group_cfgs.items():
        group.add_member(k, cfg, sinks[k])
    assert len(_member_adapters(group)) == 3
    ended_at, n = {}, 0
    while group.members:
        n += 1
        for k, summary in group.step().items():
            ended_at[k] = n
            assert summary.end_reason == "completed"
    assert ended_at == {"b": 5, "a": 9, "c": 12}
    assert _member_adapters(group) == set()  # finished members' adapters are deleted

    # Non-vacuous: the members really differ, so a leak would show up as a mismatch.
    firsts = [sinks[k].records[0]["loss"] for k in SPECS]
    assert len({round(x, 6) for x in firsts}) == 3, firsts
    root = group_cfgs["a"].output.root
    for k in SPECS:
        assert_same_steps(solo[k].records, sinks[k].records, k)
        run_dir = root / f"group-{k}"
        assert sorted(p.name for p in run_dir.iterdir()) == [
            "checkpoints", "config.resolved.yaml", "metrics.jsonl", "summary.json",
            "trainable.safetensors"]
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [r["step"] for r in sinks[k].records]
        # Same tensor names as a solo run (so a solo model loads them), and equal values.
        mine, theirs = _weights(run_dir), _weights(root / f"solo-{k}")
        assert set(mine) == set(theirs) and all(".default." in n for n in mine if "lora_" in n)
        for name in theirs:
            torch.testing.assert_close(mine[name], theirs[name], rtol=RTOL, atol=ATOL)
        assert sinks[k].params == solo[k].params


@GUARDS
def test_a_nan_stays_in_its_member(tiny, sync):
    def break_weights(step, model):  # the member's own forward turns non-finite at step 3
        if step == 2:
            with torch.no_grad():
                model.projector.net[0].weight.fill_(float("inf"))

    specs = {
        "skip": dict(SPECS["a"], nan_policy="skip"),
        "stop": dict(SPECS["b"], nan_policy="stop"),
        "clean": SPECS["c"],
    }
    hooks = {"stop": break_weights}

    def cfg(prefix, k):
        c = _cfg(tiny, f"{prefix}-{k}", **specs[k])
        c.output.sync_every = sync
        if k == "skip":
            c.debug.inject_nan_at_step = 3
            c.debug.inject_nan_group = "lora"
        return c

    solo = {k: _solo(cfg("solo", k), hooks.get(k)) for k in specs}
    group = TrialGroup(prepare_inputs(cfg("group", "skip"), _quiet), log=_quiet)
    sinks = {k: MemorySink() for k in specs}
    for k in specs:
        group.add_member(k, cfg("group", k), sinks[k], after_backward=hooks.get(k))
    while group.members:
        group.step()

    skip = sinks["skip"].summary
    assert skip.end_reason == "completed" and len(skip.nan_events) == 1
    ev = skip.nan_events[0]
    assert (ev.step, ev.where, ev.groups, ev.action) == (3, "grad", ["lora"], "skipped")
    stop = sinks["stop"].summary
    assert (stop.status, stop.end_reason, stop.steps_done) == ("unstable", "nan_stop", 3)
    ev = stop.nan_events[0]
    assert (ev.step, ev.where, ev.action) == (3, "loss", "stopped")
    assert math.isnan(sinks["stop"].records[-1]["loss"])
    assert sinks["clean"].summary.nan_events == []
    # A member's records carry its own events (trainer.loop.finish_step), as a solo run's do.
    for k in specs:
        assert sinks[k].nan_events == sinks[k].summary.nan_events == solo[k].nan_events, k
    for k in specs:  # NaN rows and NaN gradients did not reach any other member
        assert_same_steps(solo[k].records, sinks[k].records, k)
    clean = _weights(tiny().output.root / "group-clean")
    assert all(torch.isfinite(t).all() for t in clean.values())


def test_members_share_the_splits_read_at_the_first_join(tiny, monkeypatch):
    """The feature cache is read and checked once per group, not at every join: a sweep's
    group takes a member at every make-up change while its steps wait, and the re-read
    was most of a join. Every member (one joining after another left too) trains on the
    first join's splits."""
    import trainer.group as group_mod

    loads = []

    def counting_load_splits(*args, **kwargs):
        loads.append(1)
        return real_load_splits(*args, **kwargs)

    real_load_splits = group_mod.load_splits
    monkeypatch.setattr(group_mod, "load_splits", counting_load_splits)
    group = TrialGroup(prepare_inputs(_cfg(tiny, "a"), _quiet), log=_quiet)
    for k in ("a", "b"):
        group.add_member(k, _cfg(tiny, k, **SPECS[k]), MemorySink())
    group.step()
    group.remove_member("b")
    group.add_member("c", _cfg(tiny, "c", **SPECS["c"]), MemorySink())
    assert len(loads) == 1
    first, third = group.members["a"].run, group.members["c"].run
    assert third.train.tokens is first.train.tokens and third.eval is first.eval
    assert len(first.train) + len(first.eval) == tiny().demo.num_examples


def test_removed_member_ends_cleanly_and_frees_its_adapter(tiny, monkeypatch):
    keep = _cfg(tiny, "solo-keep", **SPECS["a"])
    solo = _solo(keep)

    import trainer.data as data_mod

    # Features held on the device (as on a GPU): the members share one copy.
    monkeypatch.setattr(data_mod, "features_on_device", lambda *_: True)
    group = TrialGroup(prepare_inputs(keep, _quiet), log=_quiet)
    sinks = {"keep": MemorySink(), "gone": MemorySink()}
    group.add_member("keep", _cfg(tiny, "keep", **SPECS["a"]), sinks["keep"])
    group.add_member("gone", _cfg(tiny, "gone", **SPECS["c"]), sinks["gone"])
    assert group.members["keep"].run.train.features is group.members["gone"].run.train.features
    gone_adapter = group.members["gone"].adapter
    before = sum(p.numel() for p in group.llm.parameters())
    for _ in range(3):
        group.step()
    summary = group.remove_member("gone")

    assert (summary.status, summary.end_reason, summary.steps_done) == ("stopped", "stopped", 3)
    run_dir = tiny().output.root / "gone"
    assert json.loads((run_dir / "summary.json").read_text())["end_reason"] == "stopped"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert (run_dir / "trainable.safetensors").is_file()
    # The adapter is gone from the shared model: no layer, config or parameter keeps it.
    assert gone_adapter not in group.llm.peft_config
    assert _member_adapters(group) == {group.members["keep"].adapter}
    assert sum(p.numel() for p in group.llm.parameters()) < before
    while group.members:
        group.step()
    assert_same_steps(solo.records, sinks["keep"].records, "keep")


def test_device_guarded_members_are_read_back_a_window_at_a_time(tiny, monkeypatch):
    """All members' steps are read back together every sync_every group steps (one sync per
    window, as in a solo run), cut short where a member must be seen (its checkpoint); a
    member removed mid-window first finishes the steps its weights already hold."""
    import trainer.group as group_mod

    # Windows by step count only: WINDOW_MAX_S would end one early on a loaded machine.
    monkeypatch.setattr(group_mod, "WINDOW_MAX_S", 600.0)
    cfgs = {"a": _cfg(tiny, "win-a", **SPECS["a"]), "c": _cfg(tiny, "win-c", **SPECS["c"])}
    for cfg in cfgs.values():
        cfg.output.sync_every = 4
    cfgs["c"].output.checkpoint_every = 6
    group = TrialGroup(prepare_inputs(cfgs["a"], _quiet), log=_quiet)
    sinks = {k: MemorySink() for k in cfgs}
    for k, cfg in cfgs.items():
        group.add_member(k, cfg, sinks[k])
    seen = []
    for _ in range(7):
        group.step()
        seen.append((len(sinks["a"].records), len(sinks["c"].records)))
    # Windows end at group steps 4 and 6 (c's checkpoint): a is read back with c.
    assert seen == [(0, 0), (0, 0), (0, 0), (4, 4), (4, 4), (6, 6), (6, 6)]
    summary = group.remove_member("a")
    assert (summary.end_reason, summary.steps_done) == ("stopped", 7)
    assert [r["step"] for r in sinks["a"].records] == list(range(1, 8))
    assert len(sinks["c"].records) == 6  # c's pending step stays in its window

    solo_c = _cfg(tiny, "win-solo-c", **SPECS["c"])
    solo_c.output.sync_every, solo_c.output.checkpoint_every = 4, 6
    solo = _solo(solo_c)
    while group.members:
        group.step()
    assert_same_steps(solo.records, sinks["c"].records, "c")


@pytest.mark.parametrize(("key", "change"), [
    ("phase2.precision", lambda c: setattr(c.phase2, "precision", "bf16")),
    ("model.lora.target_modules", lambda c: setattr(c.model.lora, "target_modules", ["q_proj"])),
    ("phase2.gradient_accumulation_steps",
     lambda c: setattr(c.phase2, "gradient_accumulation_steps", 2)),
    ("model.compile", lambda c: setattr(c.model, "compile", "default")),
    ("data.feature_cache", lambda c: setattr(c.data, "feature_cache", False)),
])
def test_incompatible_member_is_a_config_error_naming_the_key(tiny, key, change):
    first = _cfg(tiny, "first", **SPECS["b"])
    group = TrialGroup(prepare_inputs(first, _quiet), log=_quiet)
    group.add_member("first", first, MemorySink())
    other = _cfg(tiny, "other", **SPECS["a"])
    change(other)
    with pytest.raises(ConfigError, match=rf"trial.yaml: {key.replace('.', '[.]')}: ") as err:
        group.add_member("other", other, MemorySink(), source="trial.yaml")
    assert [p.key for p in err.value.problems] == [key]
    assert not (other.output.root / "other").exists()  # nothing written
    assert list(group.members) == ["first"]


def test_resume_continues_a_member_like_an_uninterrupted_run(tiny):
    def with_ckpts(c):
        c.output.checkpoint_every = 4
        return c

    straight = {k: _solo(with_ckpts(_cfg(tiny, f"solo-{k}", **SPECS[k]))) for k in ("a", "c")}

    class Crash(Exception):
        pass

    def crash(step, model):
        if step == 7:
            raise Crash

    cfgs = {k: with_ckpts(_cfg(tiny, f"cut-{k}", **SPECS[k])) for k in ("a", "c")}
    group = TrialGroup(prepare_inputs(cfgs["a"], _quiet), log=_quiet)
    group.add_member("a", cfgs["a"], MemorySink(), after_backward=crash)
    group.add_member("c", cfgs["c"], MemorySink())
    with pytest.raises(Crash):
        while group.members:
            group.step()

    # Member a continues in a new group; member c's group checkpoint continues *solo*.
    resumed = TrialGroup(prepare_inputs(cfgs["a"], _quiet), log=_quiet)
    sink_a = MemorySink()
    resumed.add_member("a", cfgs["a"], sink_a, resume=True)
    while resumed.members:
        resumed.step()
    sink_c = _solo(cfgs["c"], resume=True)

    for k, sink in (("a", sink_a), ("c", sink_c)):
        assert sink.records[0]["step"] == 5, k  # from the step-4 checkpoint
        run_dir = cfgs[k].output.root / f"cut-{k}"
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [r["step"] for r in straight[k].records]
        assert_same_steps(straight[k].records, lines, k)


def test_members_with_dropout_still_learn(tiny):
    specs = [dict(SPECS["a"], epochs=2, learning_rate=5e-3),
             dict(SPECS["c"], learning_rate=5e-3)]
    cfgs = [_cfg(tiny, f"drop{i}", lora_dropout=0.1, projector_dropout=0.1, **p)
            for i, p in enumerate(specs)]
    sinks = [MemorySink(), MemorySink()]
    summaries = train_group(cfgs, sinks, inputs=prepare_inputs(cfgs[0], _quiet), log=_quiet)
    assert [s.end_reason for s in summaries] == ["completed", "completed"]
    for sink in sinks:
        losses = [r["loss"] for r in sink.records]
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert all(math.isfinite(x) for x in losses)
        assert last < 0.8 * first, (first, last)


def test_fp16_members_keep_their_own_loss_scale(tiny):
    # fp16 on CPU overflows now and then: each member's GradScaler must skip and rescale
    # exactly as the same run alone does (its scale multiplies only its own loss).
    specs = {"a": dict(SPECS["a"], total_training_steps=6), "b": SPECS["b"]}
    solo = {k: _solo(_cfg(tiny, f"solo-{k}", precision="fp16", **p)) for k, p in specs.items()}
    cfgs = [_cfg(tiny, f"fp16-{k}", precision="fp16", **p) for k, p in specs.items()]
    sinks = [MemorySink(), MemorySink()]
    train_group(cfgs, sinks, inputs=prepare_inputs(cfgs[0], _quiet), log=_quiet)
    for k, sink in zip(specs, sinks, strict=True):
        assert_same_steps(solo[k].records, sink.records, k)
    assert any(r["skipped"] for s in sinks for r in s.records)  # the overflow path ran


def test_lora_on_the_lm_head_cannot_be_grouped(tiny):
    cfg = _cfg(tiny, "head", **SPECS["b"])
    cfg.model.lora.target_modules = ["q_proj", "lm_head"]
    group = TrialGroup(prepare_inputs(cfg, _quiet), log=_quiet)
    with pytest.raises(ConfigError, match=r"model[.]lora[.]target_modules: \['lm_head'\]"):
        group.add_member("head", cfg, MemorySink())
    assert group.members == {} and not (cfg.output.root / "head").exists()


def test_members_of_equal_batch_size_take_the_batched_lora_path_and_match_solo(tiny, monkeypatch):
    """Equal blocks: every member's LoRA product is one bmm over all adapters; still solo."""
    from trainer import group as group_mod

    specs = {"a": SPECS["a"], "b": dict(SPECS["b"], batch_size=4, total_training_steps=None),
             "c": dict(SPECS["c"], batch_size=4, epochs=1)}
    solo = {k: _solo(_cfg(tiny, f"solo-{k}", **p)) for k, p in specs.items()}
    calls = {"bmm": 0}
    real_bmm = torch.bmm

    def counting_bmm(*args, **kwargs):
        calls["bmm"] += 1
        return real_bmm(*args, **kwargs)

    monkeypatch.setattr(group_mod.torch, "bmm", counting_bmm)
    cfgs = {k: _cfg(tiny, f"group-{k}", **p) for k, p in specs.items()}
    group = TrialGroup(prepare_inputs(cfgs["a"], _quiet), log=_quiet)
    sinks = {k: MemorySink() for k in specs}
    for k, cfg in cfgs.items():
        group.add_member(k, cfg, sinks[k])
    group.step()
    # The members' LoRA gradients of one layer are slices of the bmm's one gradient,
    # taken as each .grad without a copy (their layout is already the parameters').
    grads = {n: p.grad for n, p in group.llm.named_parameters()
             if "layers.0.self_attn.q_proj.lora_A" in n}
    assert len(grads) == 3 and all(g is not None and g.is_contiguous() for g in grads.values())
    assert len({g.untyped_storage().data_ptr() for g in grads.values()}) == 1, grads.keys()
    while group.members:
        group.step()
    assert calls["bmm"] > 0  # the batched path ran
    # bmm rounds differently from two F.linear calls: the first step agrees to RTOL (a leak
    # would not), later steps drift by float rounding only (measured < 2e-5).
    for k in specs:
        assert_same_steps(solo[k].records[:1], sinks[k].records[:1], k)
    monkeypatch.setattr(sys.modules[__name__], "RTOL", 1e-4)
    for k in specs:
        assert_same_steps(solo[k].records, sinks[k].records, k)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_group_forward_matches_the_eager_group(tiny, monkeypatch, precision):
    """`model.compile` on a group compiles the shared forward (full-length rows, targets
    static). On the CPU the graph runs through aot_eager (the same
    tracing, no Inductor): members must train as the same members do eagerly."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    import trainer.group as group_mod

    traced, graphs, real_compile = [], [], torch.compile

    def count(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def fake_compile(fn, mode, dynamic):
        traced.append(mode)
        backend = aot_autograd(fw_compiler=count,
                               bw_compiler=lambda gm, _: make_boxed_func(gm.forward))
        return real_compile(fn, backend=backend, dynamic=dynamic)

    monkeypatch.setattr(group_mod.torch, "compile", fake_compile)
    specs = {k: SPECS[k] for k in ("a", "c")}
    sinks = {}
    for compile_mode in ("off", "reduce-overhead"):
        cfgs = {k: _cfg(tiny, f"{compile_mode}-{k}", **p, precision=precision)
                for k, p in specs.items()}
        for c in cfgs.values():
            c.model.compile = compile_mode
            c.output.sync_every = 4  # device guard, as on a GPU
        group = TrialGroup(prepare_inputs(cfgs["a"], _quiet), log=_quiet)
        sinks[compile_mode] = {k: MemorySink() for k in specs}
        for k, c in cfgs.items():
            group.add_member(k, c, sinks[compile_mode][k])
        assert (group._compiled is None) == (compile_mode == "off")
        calls = 0
        while group.members:
            calls += len(group.members) > 0
            group.step()
        if compile_mode != "off":
            # Dynamo's guard check is skipped on every call of a make-up after its first
            # two (trainer.compile_guards); the records below match the eager group's.
            assert group._guard_skip.skipped == calls - 2 * 2, (group._guard_skip.skipped,
                                                                calls)
    assert traced == ["reduce-overhead"]
    # One graph for the group's two slots: a and c together, then c alone with a's slot
    # empty (its rows masked), not one per make-up; a's batch is padded to c's 6 rows.
    assert len(graphs) == 1, len(graphs)
    for k in specs:
        eager, compiled = sinks["off"][k].records, sinks["reduce-overhead"][k].records
        if precision == "fp32":
            assert_same_steps(eager, compiled, k)
        else:  # bf16 rounds differently once the graph is traced: same run, looser match
            assert [r["step"] for r in compiled] == [r["step"] for r in eager]
            for a, b in zip(eager, compiled, strict=True):
                assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), (k, a["step"])


def test_compiled_group_of_equal_members_trains_on_stacked_lora_weights(tiny, monkeypatch):
    """Members of equal batch size in a compiled group keep their LoRA weights as slices of
    one stacked tensor per layer (trainer.multilora.LoraStacks): the graph reads the stacks,
    autograd accumulates one gradient per stack, and each member's parameters and
    gradients are views of its slices. Members still train as in the eager group, through
    checkpoints, weight files and members leaving (a leaving member's slot is emptied, the
    stacks and the graph stay)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    import trainer.group as group_mod

    real_compile = torch.compile
    inputs = []  # the names of each traced graph's inputs
    stack_users = []  # per graph: how many ops read the stacked tensor

    def fake_compile(fn, mode, dynamic):
        aot = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                           bw_compiler=lambda gm, _: make_boxed_func(gm.forward))

        def backend(gm, example_inputs):
            inputs.append([n.name for n in gm.graph.nodes if n.op == "placeholder"])
            stack_users.append([len(n.users) for n in gm.graph.nodes
                                if n.op == "placeholder" and n.name == "l_stacks_flat"])
            return aot(gm, example_inputs)

        return real_compile(fn, backend=backend, dynamic=dynamic)

    monkeypatch.setattr(group_mod.torch, "compile", fake_compile)
    specs = {"a": dict(SPECS["a"], batch_size=4, total_training_steps=9),
             "b": dict(SPECS["b"], batch_size=4),  # leaves after 5 steps
             "c": dict(SPECS["c"], batch_size=4, epochs=1)}
    sinks, roots = {}, {}
    for mode in ("off", "reduce-overhead"):
        cfgs = {k: _cfg(tiny, f"stack-{mode}-{k}", **p) for k, p in specs.items()}
        for c in cfgs.values():
            c.model.compile = mode
            c.output.sync_every = 4  # device guard, as on a GPU
            c.output.checkpoint_every = 3
        # a NaN in one member's row of the shared gradient stays in that member
        cfgs["a"].debug.inject_nan_at_step = 2
        cfgs["a"].debug.inject_nan_group = "lora"
        group = TrialGroup(prepare_inputs(cfgs["a"], _quiet), log=_quiet)
        sinks[mode] = {k: MemorySink() for k in specs}
        for k, c in cfgs.items():
            group.add_member(k, c, sinks[mode][k])
        group.step()
        if mode == "off":
            assert group.slot_table.stacks is None  # eager groups stack per call, as before
        else:
            stacks = group.slot_table.stacks
            assert stacks is not None and len(stacks.spans) == 2 * len(group.slot_table.layers)
            stack_a, _ = stacks.views(0)
            layer = group.slot_table.layers[0]
            for i, m in enumerate(group.members.values()):
                weight = layer.lora_A[m.adapter].weight
                for mine, flat in ((weight, stacks.flat), (weight.grad, stacks.flat.grad)):
                    assert mine.untyped_storage().data_ptr() == \
                        flat.untyped_storage().data_ptr()
                assert torch.equal(weight, stack_a[i])
                # a member's LoRA gradients are one row: its norm is the row's
                grads = [p.grad for p in m.run.groups["lora"]]
                assert sum(g.numel() for g in grads) == stacks.flat.shape[1]
                torch.testing.assert_close(
                    stacks.member_norms()[i],
                    torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            # From the second step on, each member's AdamW runs over lists gathered once
            # (trainer.fused_adamw); the records below still match the eager group's.
            assert all(m.run.parts.listed is None for m in group.members.values())
            group.step()
            assert all(m.run.parts.listed is not None for m in group.members.values())
        while group.members:
            group.step()
        if mode != "off":  # every slot empty at the end, the stacks still there
            assert group.slot_table.stacks.adapters == [None] * 3
            assert not group.slot_table.stacks.flat.detach().any()
        assert [e.step for e in sinks[mode]["a"].summary.nan_events] == [2]
        assert not sinks[mode]["b"].summary.nan_events + sinks[mode]["c"].summary.nan_events
        roots[mode] = cfgs["a"].output.root
    # One graph for the three slots (a, b, c; then a, c with b's slot empty; then c
    # alone), reading the one stacked tensor and no member's own LoRA parameter, so
    # guarding none. One op reads the stack (its split, once per forward): slices per
    # layer would make autograd sum one zero-padded gradient per slice (LoraStacks'
    # docstring).
    assert len(inputs) == 1
    for names in inputs:
        assert not [n for n in names if "lora_A" in n or "lora_B" in n], names
    assert stack_users == [[1]], stack_users
    for k in specs:
        assert_same_steps(sinks["off"][k].records, sinks["reduce-overhead"][k].records, k)
        eager = _weights(roots["off"] / f"stack-off-{k}")
        stacked = _weights(roots["reduce-overhead"] / f"stack-reduce-overhead-{k}")
        assert set(eager) == set(stacked)
        for name in eager:
            torch.testing.assert_close(stacked[name], eager[name], rtol=WEIGHT_RTOL,
                                       atol=WEIGHT_ATOL)


def test_members_leaving_and_joining_a_compiled_group_add_no_graph(tiny, monkeypatch):
    """A compiled group of K fixed slots keeps one graph whoever holds them: a member
    stopped by a NaN, one removed from outside (an ASHA stop), a member stepped alone
    while the others wait (a client that has not taken its report) and a trial joining
    into a freed slot add no compile. An empty slot is masked: every member, the one that
    joined late included, trains as the same config trained alone (a smaller batch too,
    right-filled to the slot's rows)."""
    def break_weights(step, model):  # the member's own forward turns non-finite at step 3
        if step == 2:
            with torch.no_grad():
                model.projector.net[0].weight.fill_(float("inf"))

    specs = {
        "a": dict(SPECS["a"], batch_size=4, epochs=2),
        "nan": dict(SPECS["b"], nan_policy="stop"),  # batch 3: one filler row per batch
        "asha": dict(SPECS["c"], batch_size=4, epochs=1),
        "late": dict(SPECS["c"], batch_size=4, epochs=1, seed=5, learning_rate=3e-3),
    }
    hooks = {"nan": break_weights}

    def cfg(prefix, k, compiled):
        c = _cfg(tiny, f"{prefix}-{k}", **specs[k])
        c.output.sync_every = 4  # device guard, as on a GPU
        c.model.compile = "reduce-overhead" if compiled else "off"
        return c

    solo = {k: _solo(cfg("solo", k, False), hooks.get(k)) for k in specs}
    graphs = _count_group_graphs(monkeypatch)
    group = TrialGroup(prepare_inputs(cfg("slot", "a", True), _quiet), log=_quiet, slots=3)
    sinks = {k: MemorySink() for k in specs}
    for k in ("a", "nan", "asha"):
        group.add_member(k, cfg("slot", k, True), sinks[k], after_backward=hooks.get(k))
    group.step()
    assert len(graphs) == 1 and group.fixed_slots
    freed = {group.members[k].slot for k in ("nan", "asha")}
    # Each slot's projector weights stay at the addresses a CUDA graph recorded.
    addresses = [[q.data_ptr() for q in f.parameters()] for f in group.slot_table.fillers]
    # A step of seated members walks no module tree (host time that grows with the LLM's
    # modules, thousands with K adapters); a joining member's check does.
    import trainer.group_slots as slots_mod
    walks = []
    real_walk = slots_mod.vanilla_lora_layers
    monkeypatch.setattr(slots_mod, "vanilla_lora_layers",
                        lambda *a: walks.append(a) or real_walk(*a))
    group.step(only=["a"])  # the others wait for their clients
    ended = {}
    for _ in range(3):
        ended.update(group.step())
    assert walks == []
    group.remove_member("asha")  # stopped by the scheduler after 4 of its steps
    ended.update(group.step())
    assert ended["nan"].end_reason == "nan_stop"
    group.add_member("late", cfg("slot", "late", True), sinks["late"])
    group.step()
    assert len(walks) == 1  # the late member's seating checked its LoRA layers once
    while group.members:
        group.step()
        if "late" in group.members:
            late = group.members["late"]
            assert late.slot in freed
            assert [q.data_ptr() for q in late.run.model.projector.parameters()] == \
                addresses[late.slot]
    assert len(graphs) == 1, len(graphs)  # every make-up above ran the first graph

    monkeypatch.setattr(sys.modules[__name__], "RTOL", 1e-4)  # stacked bmm's rounding
    for k in ("a", "nan", "late"):
        assert_same_steps(solo[k].records, sinks[k].records, k)
    asha = sinks["asha"].records
    assert [r["step"] for r in asha] == [1, 2, 3, 4]
    assert_same_steps(solo["asha"].records[:4], asha, "asha")


@pytest.mark.parametrize("run_empty", [False, True])
def test_a_compiled_groups_step_runs_only_its_members_slots(tiny, monkeypatch, run_empty):
    """As members leave a compiled group of 4 slots, its steps run only as many slots as
    its members need (a power of two, at least two): 4, then 2 slots' rows through the
    LLM, in the one graph, whose slot count is a dynamic dimension (empty slots no longer
    cost full ones: ASHA's tail). Every member trains as the same config trained alone.
    `model.run_empty_slots: true` runs all 4 slots every step, in a static graph."""
    from trainer.group_slots import SlotTable

    specs = {k: dict(SPECS["a"], batch_size=4, seed=i, learning_rate=1e-3 * (i + 1),
                     total_training_steps=n)
             for i, (k, n) in enumerate({"a": 9, "b": 7, "c": 5, "d": 3}.items())}

    def cfg(prefix, k, compiled):
        c = _cfg(tiny, f"{prefix}-{k}", **specs[k])
        c.output.sync_every = 4  # device guard, as on a GPU
        c.model.compile = "reduce-overhead" if compiled else "off"
        c.model.run_empty_slots = run_empty
        return c

    solo = {k: _solo(cfg("solo", k, False)) for k in specs}
    graphs = _count_group_graphs(monkeypatch)
    ran, real_running = [], SlotTable.running

    def running(self, active):
        out = real_running(self, active)
        ran.append(len(out[0]))
        return out

    monkeypatch.setattr(SlotTable, "running", running)
    group = TrialGroup(prepare_inputs(cfg("run", "a", True), _quiet), log=_quiet, slots=4)
    sinks = {k: MemorySink() for k in specs}
    for k in specs:
        group.add_member(k, cfg("run", k, True), sinks[k])
    while group.members:
        group.step()
    assert len(graphs) == 1, len(graphs)
    # the graph's inputs: a symbolic slot count, unless every slot runs
    symbolic = [n for n in graphs[0].graph.nodes if n.op == "placeholder"
                and isinstance(n.meta.get("val"), torch.SymInt)]
    if run_empty:
        assert ran == [] and not symbolic
    else:
        # d ends, then c (3 members run in 4 slots: counts are powers of two), then b
        # (a alone runs in 2: never 1)
        assert ran == [4] * 3 + [4] * 2 + [2] * 2 + [2] * 2, ran
        assert symbolic, [n.meta.get("val") for n in graphs[0].graph.nodes
                          if n.op == "placeholder"]
    monkeypatch.setattr(sys.modules[__name__], "RTOL", 1e-4)  # stacked bmm's rounding
    for k in specs:
        assert_same_steps(solo[k].records, sinks[k].records, k)


@pytest.mark.parametrize("rates", [(0.1, 0.1), (0.1, 0.3)])
def test_compiled_group_with_lora_dropout_stays_on_stacked_weights(tiny, monkeypatch, rates):
    """LoRA dropout (0.05 by default) does not close the batched path: the members' rows
    go through their adapters' dropout (one call for equal rates, one per block else)
    and on to the stacked bmm. With every rate at 1 nothing reaches the LoRA branch, so
    its gradient is zero while the projector's is not; at the configured rates the
    members train, and learn."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    import trainer.group as group_mod

    real_compile = torch.compile

    def fake_compile(fn, mode, dynamic):
        return real_compile(fn, dynamic=dynamic, backend=aot_autograd(
            fw_compiler=lambda gm, _: make_boxed_func(gm.forward),
            bw_compiler=lambda gm, _: make_boxed_func(gm.forward)))

    monkeypatch.setattr(group_mod.torch, "compile", fake_compile)
    specs = [dict(SPECS["a"], batch_size=4, epochs=2, learning_rate=5e-3),
             dict(SPECS["c"], batch_size=4, learning_rate=5e-3)]
    lora_grads = {}
    for all_dropped in (True, False):
        cfgs = [_cfg(tiny, f"drop-{all_dropped}-{i}-{rates[i]}", lora_dropout=rates[i], **p)
                for i, p in enumerate(specs)]
        for c in cfgs:
            c.model.compile = "reduce-overhead"
        group = TrialGroup(prepare_inputs(cfgs[0], _quiet), log=_quiet)
        sinks = [MemorySink(), MemorySink()]
        for i, c in enumerate(cfgs):
            group.add_member(f"m{i}", c, sinks[i])
        if all_dropped:
            for m in group.llm.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 1.0
        group.step()
        assert group.slot_table.stacks is not None  # the batched path, dropout and all
        lora_grads[all_dropped] = group.slot_table.stacks.flat.grad.abs().sum().item()
        proj = [p.grad for m in group.members.values() for p in m.run.groups["projector"]]
        assert all(g is not None and g.abs().sum() > 0 for g in proj)
        if all_dropped:
            continue
        while group.members:
            group.step()
        for sink in sinks:
            losses = [r["loss"] for r in sink.records]
            assert all(math.isfinite(x) for x in losses)
            assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert lora_grads[True] == 0.0 and lora_grads[False] > 0.0, lora_grads


# Dynamo's config patch, not monkeypatch: undoing a monkeypatch of this ContextVar-backed
# entry left it unreadable, which failed the next compiled test in the same process.
@torch._dynamo.config.patch(recompile_limit=2)
def test_a_compiled_group_past_its_slots_rebuilds_them_past_dynamos_recompile_limit(
        tiny, monkeypatch):
    """A group without a set capacity (`slots`) has as many slots as members at its first
    compiled step; a member joining when none is free rebuilds the slots, a new graph.
    Dynamo keeps at most `recompile_limit` graphs per function before it runs that
    function eagerly for good (and, with the guard check skipped, raised), so the group
    drops the old graph at each rebuild. Here the limit is 2 and the slots are built 3
    times: each build is compiled, each still steps with the guards skipped once warm,
    and a member taking a freed slot afterwards compiles nothing."""
    assert torch._dynamo.config.recompile_limit == 2
    graphs = _count_group_graphs(monkeypatch)
    spec = dict(SPECS["a"], batch_size=4, epochs=3)
    group = None
    for name in ("m0", "m1", "m2", "m3", "m4"):
        cfg = _cfg(tiny, name, **spec)
        cfg.model.compile = "reduce-overhead"
        if group is None:
            group = TrialGroup(prepare_inputs(cfg, _quiet), log=_quiet)
        group.add_member(name, cfg, MemorySink())
        if name == "m0":
            continue
        if name == "m4":
            group.remove_member("m0")
        before = len(graphs)
        for _ in range(3):  # compiles (or not), then a full check, then skips the check
            group.step()
        built = name != "m4"  # m1..m3 each find no free slot; m4 takes m0's
        assert len(graphs) == before + built, (name, len(graphs))
    # slots built for 2, 3 and 4 members: three graphs, past the limit of 2; m4: none
    assert len(graphs) == 3 and group._guard_skip.skipped == 4
    assert group.members["m4"].slot == 0 and len(group.slot_table.stacks.adapters) == 4
