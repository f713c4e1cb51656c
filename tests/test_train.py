"""End-to-end runs of the real trainer on the tiny demo model (CPU, seconds)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file

from trainer.loop import train
from trainer.metrics import STEP_KEYS, MemorySink
from trainer.optim import lr_factor
from trainer.yaml_io import load_yaml_file

pytestmark = pytest.mark.integration


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_demo_run_learns_and_writes_its_artifacts(tiny):
    cfg = tiny(epochs=6, warmup_steps=5, learning_rate=5e-3)
    sink = MemorySink()
    summary = train(cfg, sink, console=False, log=lambda *_: None)
    run_dir = cfg.output.root / "run"

    assert summary.status == "completed" and summary.steps_done == summary.total_steps == 54
    recs = _records(run_dir)
    assert [r["step"] for r in recs] == list(range(1, 55))
    assert set(STEP_KEYS) <= set(recs[0])
    assert recs == sink.records  # the file and the sink saw the same steps
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.5 * first, (first, last)  # the loss clearly falls
    assert summary.eval_loss is not None and summary.eval_loss < first

    resolved = load_yaml_file(run_dir / "config.resolved.yaml")["phase2"]
    assert resolved["projector_lr"] == pytest.approx(2.5e-2)  # 5 x 5e-3
    assert resolved["lora_lr"] == pytest.approx(2.5e-3)  # 0.5 x 5e-3
    assert resolved["total_training_steps"] == 54
    assert sink.params["projector_lr"] == pytest.approx(2.5e-2)

    weights = load_file(str(run_dir / "trainable.safetensors"))
    assert weights and all(k.startswith("projector.") or "lora_" in k for k in weights)
    assert json.loads((run_dir / "summary.json").read_text())["end_reason"] == "completed"


def test_per_group_lrs_follow_warmup_then_cosine(tiny):
    cfg = tiny(epochs=2, warmup_steps=4, learning_rate=1e-3)
    train(cfg, console=False, log=lambda *_: None)
    recs = _records(cfg.output.root / "run")
    total = len(recs)
    for r in recs:
        f = lr_factor(r["step"] - 1, 4, total)  # LR in effect during step s
        assert r["lr/projector"] == pytest.approx(5e-3 * f, abs=1e-12)
        assert r["lr/lora"] == pytest.approx(5e-4 * f, abs=1e-12)
    peak = max(range(total), key=lambda i: recs[i]["lr/projector"])
    assert recs[peak]["step"] == 5  # warmup ends after 4 steps


def test_gradient_accumulation_counts_optimizer_steps(tiny):
    cfg = tiny(epochs=1, gradient_accumulation_steps=3, warmup_steps=1)
    summary = train(cfg, console=False, log=lambda *_: None)
    assert summary.total_steps == 36 // (4 * 3)  # micro-batches / accumulation


def test_clipping_caps_the_update_and_flags_the_step(tiny):
    cfg = tiny(epochs=1, gradient_clip_val=1e-6)
    sink = MemorySink()
    train(cfg, sink, console=False, log=lambda *_: None)
    assert all(r["clipped"] == 1 for r in sink.records)
    cfg2 = tiny(run_name="noclip", epochs=1, gradient_clip_val=None)
    sink2 = MemorySink()
    train(cfg2, sink2, console=False, log=lambda *_: None)
    assert all(r["clipped"] == 0 for r in sink2.records)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(tiny, precision):
    cfg = tiny(epochs=1, precision=precision)
    sink = MemorySink()
    summary = train(cfg, sink, console=False, log=lambda *_: None)
    assert summary.steps_done == summary.total_steps
    finite = [r for r in sink.records if r["skipped"] == 0]
    assert finite and all(torch.isfinite(torch.tensor(r["loss"])) for r in finite)


def test_frozen_linears_stored_in_bf16_train_bit_identically(tiny):
    """Under bf16 autocast, storing the untargeted frozen linears in bf16 changes nothing
    but their memory: autocast rounds those fp32 weights to bf16 at every linear anyway."""
    from trainer.inputs import prepare_inputs
    from trainer.run import build_run

    records, dtypes = {}, {}
    for cast in (False, True):
        cfg = tiny(run_name=f"cast-{cast}", epochs=1, precision="bf16")
        cfg.model.cast_frozen_linears = cast
        run, _, _ = build_run(cfg, prepare_inputs(cfg, lambda *_: None), log=lambda *_: None)
        dtypes[cast] = {n: p.dtype for n, p in run.model.named_parameters()}
        sink = MemorySink()
        train(cfg, sink, console=False, log=lambda *_: None)
        records[cast] = [(r["loss"], r["grad_norm"]) for r in sink.records]
    cast_names = {n for n, d in dtypes[True].items() if d == torch.bfloat16}
    assert cast_names and all("mlp." in n for n in cast_names)  # gate/up/down projections
    assert all(d == torch.float32 for d in dtypes[False].values())
    # LoRA-wrapped base layers, adapters, projector, embeddings and norms stay fp32
    assert not any("lora_" in n or "projector" in n or "norm" in n or "embed" in n
                   or "q_proj" in n for n in cast_names)
    assert records[True] == records[False]  # bit for bit


def test_compiled_forward_trains_like_the_eager_one(tiny, monkeypatch):
    """`model.compile` compiles the forward over full-length rows and a fixed target
    capacity (static shapes). On the CPU it runs through aot_eager (the same tracing, no
    Inductor): the records must equal the eager run's, with Dynamo's guard check skipped
    on warm calls (`model.skip_compile_guards`, the default) and with every call checked.
    Evaluation every 3 steps switches grad and train mode and the batch shape in between:
    those calls get their own signature, and training calls go on skipping."""
    import trainer.compile_guards as guards_mod
    import trainer.run as run_mod

    traced, real_compile = [], torch.compile

    def fake_compile(fn, mode, dynamic):
        traced.append(mode)
        return real_compile(fn, backend="aot_eager", dynamic=dynamic)

    skipping: list[bool] = []  # per training-mode forward call: did it skip the guards?

    class SpyGuardSkip(guards_mod.GuardSkip):
        @contextlib.contextmanager
        def around(self, module, *inputs):
            before = self.skipped
            with super().around(module, *inputs):
                if module.training:
                    skipping.append(self.skipped > before)
                yield

    monkeypatch.setattr(run_mod.torch, "compile", fake_compile)
    monkeypatch.setattr(run_mod, "GuardSkip", SpyGuardSkip)
    records, skipped = {}, {}
    for mode, skip in (("off", True), ("reduce-overhead", True), ("reduce-overhead", False)):
        cfg = tiny(run_name=f"compile-{mode}-{skip}", epochs=1)
        cfg.model.compile = mode
        cfg.model.skip_compile_guards = skip
        cfg.model.lora.dropout = 0.0  # a compiled graph draws dropout masks differently
        cfg.output.eval_every = 3
        sink = MemorySink()
        skipping.clear()
        train(cfg, sink, console=False, log=lambda *_: None)
        records[mode, skip], skipped[mode, skip] = sink.records, list(skipping)
    assert traced == ["reduce-overhead", "reduce-overhead"]
    steps = len(records["off", True])
    # The first WARM_CALLS training calls are checked in full, every later one skips.
    assert skipped["reduce-overhead", True] == (
        [False] * guards_mod.WARM_CALLS + [True] * (steps - guards_mod.WARM_CALLS))
    assert skipped["off", True] == skipped["reduce-overhead", False] == []
    for compiled in (records["reduce-overhead", True], records["reduce-overhead", False]):
        assert [r["step"] for r in compiled] == [r["step"] for r in records["off", True]]
        for a, b in zip(records["off", True], compiled, strict=True):
            for key in ("loss", "grad_norm", "eval_loss"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_warmup_longer_than_run_is_a_config_error(tiny):
    from trainer.errors import ConfigError

    cfg = tiny(epochs=1, warmup_steps=500)
    with pytest.raises(ConfigError, match=r"phase2.warmup_steps: warmup of 500 steps"):
        train(cfg, console=False, log=lambda *_: None)
    assert not (cfg.output.root / "run").exists()  # nothing written


def test_batches_reach_a_cuda_device_through_pinned_memory():
    """A pageable host-to-GPU copy waits for the stream to drain: a hidden sync per batch.
    to_device pins first and copies asynchronously (a stand-in tensor records the calls,
    so this runs without a GPU); elsewhere it is a plain .to()."""
    from unittest import mock

    from trainer.data import to_device

    t = mock.MagicMock()
    out = to_device(t, torch.device("cuda", 0))
    t.pin_memory.assert_called_once_with()
    t.pin_memory.return_value.to.assert_called_once_with(torch.device("cuda", 0),
                                                         non_blocking=True)
    assert out is t.pin_memory.return_value.to.return_value
    t.to.assert_not_called()

    cpu = torch.arange(3)
    assert to_device(cpu, torch.device("cpu")) is cpu  # no copy, no pinning on the CPU
    on_gpu = mock.MagicMock()
    on_gpu.device.type = "cuda"  # already there (features held on the GPU): no pinning
    assert to_device(on_gpu, torch.device("cuda", 0)) is on_gpu.to.return_value
    on_gpu.pin_memory.assert_not_called()


def test_cached_features_go_to_the_gpu_only_when_asked_or_small(monkeypatch):
    """data.features_on_device: true/false decide; null holds them on a GPU when they fit
    FEATURES_ON_DEVICE_BYTES; never on the CPU, never for raw media."""
    import trainer.data as data
    from trainer.data import Split, Tokens, features_on_device

    ids = torch.zeros(4, 3, dtype=torch.long)
    split = Split(["a", "b", "c", "d"], Tokens(ids, ids, ids), features=torch.zeros(4, 5, 8))
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert features_on_device(split, gpu, None)
    assert features_on_device(split, gpu, True)
    assert not features_on_device(split, gpu, False)
    assert not features_on_device(split, cpu, True)
    assert not features_on_device(Split(split.ids, split.tokens), gpu, True)  # media
    monkeypatch.setattr(data, "FEATURES_ON_DEVICE_BYTES", 4 * 5 * 8 * 4 - 1)  # one byte short
    assert not features_on_device(split, gpu, None)
    assert features_on_device(split, gpu, True)
