"""One Phase 2 training step, naive loop vs. the project's trainer, same model and batch.

    python bench/gpu_trainer.py configs/reference.yaml --batch 2 --text-len 128
    python bench/gpu_trainer.py configs/reference.yaml --batch 16 --text-len 512

Model: the config's model (configs/reference.yaml: Qwen2.5-0.5B-shaped LLM, LoRA r=16 on
q,k,v,o, 8.4M projector; a frozen Phase 1 of Hugging Face CLIP ViT-B/16-, Whisper-base-
and BERT-base-shaped encoders and an aligner; random init). Batch: B examples of P prefix
tokens (one per aligned feature token, the longest row of the feature cache: 197 image +
50 audio + 1 text at reference scale) plus `--text-len` random text tokens, all trained
(labels = inputs), so tokens per step = B x (P + text_len).

Arms, timed in the same process one after the other:
  naive    fp32, no TF32, the frozen encoders run on every step (a bundle from media
           tensors; any other Phase 1 from the media read once, through its processors),
           logits over the whole vocabulary at every position (HF's loss), unfused
           (for-loop) AdamW, `loss.item()` every step.
  trainer  the project's hot path as `trainer.loop.train_loop` runs it: bf16 autocast
           over fp32 trainable weights (the frozen MLP linears stored in bf16), fused
           AdamW with the device-side NaN guard (read back every `output.sync_every`
           steps), TF32, SDPA causal attention, cached features.
  trainer-nocache  the same with `data.feature_cache: false` (the frozen encoders and
           aligner run every step, no_grad): what the cache saves in time and memory.
           A bundle Phase 1 only: the other sources run only into the cache.
Reported per arm: step time (mean over the timed steps, synchronised before and after
them only), tokens/s, peak GPU memory, MFU.
MFU = tokens/s x (4 x frozen LLM params + 6 x trainable params) / peak FLOP/s, the
peak being the card's dense bf16 figure (`--peak-tflops`, default 989 for H100/H200
SXM); the naive arm is measured against the same peak. The ratio line compares
step times: trainer / naive (target <= 0.1 at the seed's batch size).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.bundle import load_bundle  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import Split, Tokens, load_media, read_manifest  # noqa: E402
from trainer.inputs import phase1_source, prepare_inputs  # noqa: E402
from trainer.loop import backward_step, flush_window  # noqa: E402
from trainer.metrics import MultiSink  # noqa: E402
from trainer.model import build_model  # noqa: E402
from trainer.optim import param_groups  # noqa: E402
from trainer.phase1.contract import RawBatch, read_batch, sample_rate_of  # noqa: E402
from trainer.phase1.features_file import read_features_file  # noqa: E402
from trainer.plan import Plan  # noqa: E402
from trainer.run import build_run  # noqa: E402
from trainer.step import DeviceGuard, State, read_back  # noqa: E402
from trainer.step_profile import profile_report  # noqa: E402


def synthetic_tokens(n: int, length: int, vocab: int, seed: int = 0) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, length), generator=g)
    return Tokens(ids, ids.clone(), torch.ones_like(ids))


def bench_batch(inputs, n: int, args) -> tuple[Tokens, int, str]:
    """`n` rows of synthetic text, the tokens per step of one trial (prefix + text, times
    the batch) and the device's name; prints what one step holds."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(str(inputs.llm_dir)).vocab_size
    tokens = synthetic_tokens(n, args.text_len, min(vocab, 99))
    if inputs.feature_cache is not None:  # any Phase 1: its longest row
        prefix = read_features_file(inputs.feature_cache).features.shape[1]
    else:
        prefix = load_bundle(inputs.bundle_dir, "cpu").num_tokens
    per_step = args.batch * (prefix + args.text_len)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {device_name}; per trial: batch {args.batch} x ({prefix} prefix + "
          f"{args.text_len} text) = {per_step} tokens/step", flush=True)
    return tokens, per_step, device_name


def _sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _timed(step_fn, warmup: int, steps: int) -> list[float]:
    """Mean step time over `steps` steps after `warmup`, synchronised only at both ends (a
    sync per step would hide what the trainer gains by never waiting for the GPU)."""
    for i in range(warmup):
        step_fn(i)
    t0 = _sync_time()
    for i in range(warmup, warmup + steps):
        step_fn(i)
    return [(_sync_time() - t0) / steps]


def trainer_stepper(run, state, cfg):
    """One optimizer step of the trainer as its loop runs it: the device guard with a
    read-back every `run.sync_every` steps where the run has one, else the host guard."""
    guard = DeviceGuard.start(cfg.phase2, state, run.device) if run.device_guard else None
    pending, sink = [], MultiSink()

    def stepper(i: int) -> None:
        pending.append(backward_step(run, i + 1).step(run, guard, i + 1))
        if len(pending) >= run.sync_every:  # 1 with the host guard
            flush_window(run, state, pending, read_back(pending), sink, 1.0)
            pending.clear()
    return stepper


def trainer_arm(cfg, inputs, tokens: Tokens, batch: int, args) -> tuple[list[float], dict]:
    run, state, _ = build_run(cfg, inputs, device=args.device, log=lambda *_: None)
    feats = run.train.features
    n = min(len(feats), len(tokens.input_ids))
    run.train = Split([str(i) for i in range(n)],
                      Tokens(tokens.input_ids[:n], tokens.labels[:n], tokens.attention_mask[:n]),
                      features=feats[:n])
    run.plan = Plan(batch, 1, n // batch, 10**9, 0)
    state = State()
    stepper = trainer_stepper(run, state, cfg)
    times = _timed(stepper, args.warmup, args.steps)
    done = args.warmup + args.steps
    if args.guard_compare and run.guard_skip is not None:
        done = guard_compare(run, stepper, done)
    if args.adamw_compare and run.device_guard:
        done = adamw_compare(run, stepper, done)
    if args.profile:
        profile_steps(stepper, done, 10)
    _, counts = param_groups(run.model)
    return times, {"trainable": counts.trainable, "frozen": counts.frozen}, _peak_gib()


def guard_compare(run, stepper, first: int) -> int:
    """The compiled trainer's step with TorchDynamo's guard check skipped on warm calls
    (`model.skip_compile_guards`, the default) against every call checked."""
    skip = run.guard_skip

    def use(on: bool) -> None:
        run.guard_skip = skip if on else None
    return interleaved(stepper, first, use, "guards_skipped", "guards_checked")


def adamw_compare(run, stepper, first: int) -> int:
    """The device guard's AdamW step over lists gathered once (`trainer.step.
    listed_step`, the default) against torch's `optimizer.step()`."""
    from trainer import step

    listed = step.listed_step

    def use(on: bool) -> None:
        step.listed_step = listed if on else (lambda parts: None)
    return interleaved(stepper, first, use, "adamw_listed", "adamw_step")


def interleaved(stepper, first: int, use, on_name: str, off_name: str, rounds: int = 3,
                block: int = 10) -> int:
    """One run and graph stepped with a choice off and on (`use(bool)`), alternating
    blocks of `block` steps (each after 2 untimed ones), so host drift hits both alike;
    ends with it on. Prints both means; returns the next step index."""
    times = {True: [], False: []}
    for r in range(2 * rounds):
        on = bool(r % 2)
        use(on)
        base = first
        times[on] += _timed(lambda i, base=base: stepper(base + i), 2, block)
        first += 2 + block
    use(True)
    off, on = (1e3 * statistics.mean(times[k]) for k in (False, True))
    print(json.dumps({f"{off_name}_step_ms": round(off, 2), f"{on_name}_step_ms": round(on, 2),
                      f"ratio_{on_name}_vs_{off_name}": round(on / off, 3)}),
          flush=True)
    return first


def profile_steps(step_fn, first: int, n: int) -> None:
    """torch.profiler over `n` more steps: where the host's time goes, and the GPU's.
    With `PROFILE_TRACE=DIR` the profile also records Python calls and leaves its
    Chrome trace in DIR (gzipped), and prints the Python functions that took the host's
    time (`bench/trace_summary.py`)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                     else [])
    trace_dir = os.environ.get("PROFILE_TRACE")
    t0 = _sync_time()
    with profile(activities=acts, with_stack=bool(trace_dir)) as prof:
        for i in range(first, first + n):
            step_fn(i)
        _sync_time()
    wall = (_sync_time() - t0) / n
    print("[profile] " + profile_report(prof, n, wall, rows=20), flush=True)
    if trace_dir:
        from trace_summary import summarize

        out = Path(trace_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"trace-{len(list(out.glob('trace-*')))}.json"
        prof.export_chrome_trace(str(path))  # torch writes only to a file
        raw = path.read_text()  # read once: summarised, then kept gzipped
        path.unlink()
        with gzip.open(f"{path}.gz", "wt") as dst:
            dst.write(raw)
        print(f"[profile] trace {path}.gz\n" + summarize(raw, n), flush=True)


def trainer_nocache_arm(cfg, inputs, tokens: Tokens, batch: int, args):
    """The trainer with `data.feature_cache: false`: encoders + aligner run every step
    (under no_grad, bf16 autocast): the memory and time the feature cache saves."""
    from dataclasses import replace

    if cfg.phase1.source != "bundle":
        raise SystemExit(f"trainer-nocache: phase1.source {cfg.phase1.source} runs only into "
                         "the feature cache (the demo bundle runs per step); drop this arm")
    nocache = cfg.model_copy(update={"data": cfg.data.model_copy(update={"feature_cache": False})})
    raw = replace(inputs, feature_cache=None, eval_feature_cache=None)  # splits carry media
    run, state, _ = build_run(nocache, raw, device=args.device, log=lambda *_: None)
    examples = read_manifest(inputs.manifest)[: len(tokens.input_ids)]
    media = load_media(examples, run.bundle.spec)
    n = len(examples)
    run.train = Split([str(i) for i in range(n)],
                      Tokens(tokens.input_ids[:n], tokens.labels[:n], tokens.attention_mask[:n]),
                      media=media)
    run.plan = Plan(batch, 1, n // batch, 10**9, 0)
    state = State()
    return _timed(trainer_stepper(run, state, nocache), args.warmup, args.steps), _peak_gib()


def naive_loss(model, features, input_ids, attention_mask, labels) -> torch.Tensor:
    """The textbook forward: logits over the whole vocabulary at every position, HF's loss."""
    from trainer.data import IGNORE_INDEX

    prefix = model.projector(features)
    tokens = model.llm.get_input_embeddings()(input_ids)
    b, t = features.shape[:2]
    out = model.llm(inputs_embeds=torch.cat([prefix.to(tokens.dtype), tokens], 1),
                    attention_mask=torch.cat([attention_mask.new_ones((b, t)), attention_mask], 1),
                    labels=torch.cat([labels.new_full((b, t), IGNORE_INDEX), labels], 1),
                    use_cache=False)
    return out.loss


def naive_arm(cfg, inputs, tokens: Tokens, batch: int, args) -> list[float]:
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    examples = read_manifest(inputs.manifest)[: len(tokens.input_ids)]
    encode = NaiveEncoder(cfg, inputs, examples, dev)
    m = cfg.model
    model = build_model(inputs.llm_dir, encode.align_dim, lora_r=m.lora.r,
                        lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                        target_modules=m.lora.target_modules,
                        projector_hidden=m.projector.hidden_dim,
                        projector_dropout=m.projector.dropout, device=str(dev))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False, fused=False)
    n = len(examples)

    def step(i: int) -> None:
        idx = torch.arange(i * batch, (i + 1) * batch) % n
        with torch.no_grad():
            feats = encode(idx)
        loss = naive_loss(model, feats, tokens.input_ids[idx].to(dev),
                          tokens.attention_mask[idx].to(dev), tokens.labels[idx].to(dev))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the per-step host sync a naive loop has

    return _timed(step, args.warmup, args.steps), _peak_gib()


class NaiveEncoder:
    """The frozen Phase 1 of the naive arm, run on the rows `idx` at every step: the demo
    bundle on media tensors (as before), any other Phase 1 through its contract
    (trainer.phase1.contract) on the media read once, its processors run every step."""

    def __init__(self, cfg, inputs, examples, dev: torch.device) -> None:
        self.dev = dev
        if cfg.phase1.source == "bundle":
            self.bundle = load_bundle(inputs.bundle_dir, dev)
            self.media = load_media(examples, self.bundle.spec)
            self.align_dim = self.bundle.align_dim
        else:
            self.bundle = None
            self.phase1 = phase1_source(cfg).build(dev)
            self.raw = read_batch(examples, sample_rate_of(self.phase1))
            self.align_dim = self.phase1.align_dim

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.bundle is not None:
            m = self.media
            return self.bundle(m.images[idx].to(self.dev), m.audio[idx].to(self.dev),
                               m.text[idx].to(self.dev))
        rows = idx.tolist()
        r = self.raw
        feats, mask = self.phase1(RawBatch([r.ids[i] for i in rows],
                                           [r.images[i] for i in rows],
                                           [r.audio[i] for i in rows],
                                           [r.texts[i] for i in rows]))
        if not bool(mask.all()):  # naive_loss has no prefix mask
            raise SystemExit("naive arm: rows with prefixes of different lengths; use data "
                             "whose every example has every modality (the demo data)")
        return feats


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def summarize(name: str, times: list[float], mem: float, tokens_per_step: int,
              flops_per_token: float, peak: float) -> dict:
    step = statistics.median(times)
    tps = tokens_per_step / step
    out = {"arm": name, "step_ms": round(step * 1e3, 2), "tokens_per_s": round(tps),
           "peak_mem_gib": round(mem, 2), "mfu_pct": round(100 * tps * flops_per_token / peak, 2)}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--arms", default="naive,trainer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", type=Path, default=None, help="also write results here")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, profile 10 more of the trainer arm")
    ap.add_argument("--guard-compare", action="store_true",
                    help="compiled trainer arm: also time steps with every guard checked "
                         "against guards skipped, interleaved (model.skip_compile_guards)")
    ap.add_argument("--adamw-compare", action="store_true",
                    help="trainer arm: also time the listed AdamW step against torch's "
                         "optimizer.step(), interleaved (trainer.step.listed_step)")
    ap.add_argument("--sdpa", choices=("auto", "flash", "cudnn", "efficient"), default="auto",
                    help="the only SDPA backend torch may pick (auto: torch's own order)")
    args = ap.parse_args()
    if args.sdpa != "auto":  # process-wide, before anything is compiled
        for name, enable in (("flash", torch.backends.cuda.enable_flash_sdp),
                             ("cudnn", torch.backends.cuda.enable_cudnn_sdp),
                             ("efficient", torch.backends.cuda.enable_mem_efficient_sdp)):
            enable(name == args.sdpa)

    cfg = load_config(args.config, [*args.overrides, "output.run_name=null",
                                    "output.save_weights=false"])
    inputs = prepare_inputs(cfg, log=lambda m: print(m, flush=True), device=args.device)
    n = max(args.batch * (args.warmup + args.steps), args.batch)
    n = min(n, cfg.demo.num_examples if cfg.data.manifest is None else n)
    tokens, per_step, device_name = bench_batch(inputs, n, args)
    results, counts = {}, None
    for arm in args.arms.split(","):
        gc.collect()  # the previous arm's model must not count against this one
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if arm == "trainer":
            times, counts, mem = trainer_arm(cfg, inputs, tokens, args.batch, args)
        elif arm == "trainer-nocache":
            times, mem = trainer_nocache_arm(cfg, inputs, tokens, args.batch, args)
        elif arm == "naive":
            times, mem = naive_arm(cfg, inputs, tokens, args.batch, args)
        else:
            ap.error(f"unknown arm {arm!r} (naive, trainer, trainer-nocache)")
        results[arm] = (times, mem)
    if counts is None:
        from trainer.param_count import count_parameters

        c = count_parameters(cfg)
        counts = {"trainable": c["trainable"], "frozen": c["llm"]}
    flops = 4 * counts["frozen"] + 6 * counts["trainable"]
    rows = [summarize(a, t, mem, per_step, flops, args.peak_tflops * 1e12)
            for a, (t, mem) in results.items()]
    for row in rows[1:]:
        ratio = row["step_ms"] / rows[0]["step_ms"]
        print(f"ratio step time {row['arm']} / {rows[0]['arm']}: {ratio:.3f} "
              f"(speed-up {1 / ratio:.1f}x) on {device_name}")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "batch": args.batch,
                                         "text_len": args.text_len, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
