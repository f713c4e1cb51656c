"""The shared group's per-layer kernels at the reference shapes, timed alone on a GPU.

    python bench/lora_kernels.py --json runs/lora_kernels.json

A compiled group of 8 reference trials spends its GPU time in a few kinds of kernels
(README, Performance; `PHASE2_GROUP_PROFILE`): the frozen LLM's matmuls, attention, the
members' LoRA products and LoRA dropout. This times forward + backward of the candidates
for the LoRA products and attention, one layer's worth at the sweep's shapes (K members x
2 rows x 291 tokens, hidden 896, LoRA r 16, q/o 896 wide and k/v 128, 14 query and 2 KV
heads of 64), under bf16 autocast over fp32 weights as the trainer runs them:

- LoRA, per projection width: `bmm_wleft` (trainer.multilora.bmm_lora: weights on the left of
  two batched matmuls), `bmm_xleft` (activations on the left) and `blockdiag` (every
  member's A in one [K x r, in] matmul over all rows, masked to each member's own block,
  then one [K x r, out] matmul: K times the LoRA FLOPs, in two plain GEMMs), each eager
  and compiled (Inductor, default mode);
- LoRA of q, k and v together: three separate products against one A product over the
  three stacked along the batch and one B product for k and v;
- SDPA with `is_causal`, per backend (cuDNN, flash, memory-efficient), GQA via
  `enable_gqa` and with the KV heads repeated as HF's fallback does.

Times are GPU kernel time per call (torch.profiler, the mean over `--iters` calls after
`--warmup`), including the casts and the loss's sum and its backward, which are the same
for every form; each row also gives its ratio to the first row of its kind (the
trainer's current form), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def bmm_wleft(xs, a, b, scale):
    h_t = torch.bmm(a, xs.transpose(1, 2))
    return (torch.bmm(b, h_t) * scale).transpose(1, 2)


def bmm_xleft(xs, a, b, scale):
    return torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)) * scale


def blockdiag(xs, a, b, scale):
    k, n, width = xs.shape
    r = a.shape[1]
    y = xs.reshape(k * n, width) @ a.reshape(k * r, width).t()  # [K N, K r]
    rows = torch.arange(k * n, device=xs.device) // n
    cols = torch.arange(k * r, device=xs.device) // r
    h = y * (rows[:, None] == cols[None, :]).to(y.dtype)
    delta = h @ b.transpose(1, 2).reshape(k * r, -1)  # [K N, out]
    return (delta * scale).view(k, n, -1)


def _time(fn: Callable[[], None], warmup: int, iters: int) -> float:
    """GPU kernel time per call (us), from torch.profiler: the sum of the kernels' own
    durations, not wall time, which at these sizes is the host's launch time (a first
    version of this bench timed CUDA events around each call and measured ~1 ms for
    every form alike)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in kernels) / iters


def lora_rows(args) -> list[dict]:
    dev = "cuda"
    k, n, width, r = args.k, args.rows * args.tokens, 896, 16
    out = []
    for out_dim in (896, 128):
        base = None
        for name, form in (("bmm_wleft", bmm_wleft), ("bmm_xleft", bmm_xleft),
                           ("blockdiag", blockdiag)):
            for compiled in (False, True):
                xs = torch.randn(k, n, width, device=dev, requires_grad=True)
                a = (torch.randn(k, r, width, device=dev) * 0.02).requires_grad_()
                b = (torch.randn(k, out_dim, r, device=dev) * 0.02).requires_grad_()
                f = torch.compile(form, dynamic=False) if compiled else form

                def step(f=f, xs=xs, a=a, b=b):
                    with torch.autocast("cuda", torch.bfloat16):
                        y = f(xs, a, b, 2.0)
                    y.float().sum().backward()

                us = _time(step, args.warmup, args.iters)
                with torch.autocast("cuda", torch.bfloat16):
                    ref = bmm_wleft(xs, a, b, 2.0).float()
                    got = f(xs, a, b, 2.0).float()
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                base = base or us
                out.append({"kind": f"lora out={out_dim}", "form": name, "compiled": compiled,
                            "fwd_bwd_us": round(us, 1), "ratio_vs_first": round(us / base, 3),
                            "max_rel_err_vs_bmm_wleft": err})
                print(json.dumps(out[-1]), flush=True)
    return out


def qkv_rows(args) -> list[dict]:
    """q, k and v's LoRA products of one layer: three `bmm_wleft` calls (three dropout
    inputs of the same activations) against one A product over the three stacked along the
    batch (3K) and the k and v B products stacked (their outputs are equally wide)."""
    dev = "cuda"
    k, n, width, r = args.k, args.rows * args.tokens, 896, 16
    outs = (896, 128, 128)

    def separate(xs3, a3, bs):
        return [bmm_wleft(xs3[i], a3[i], bs[i], 2.0) for i in range(3)]

    def batched(xs3, a3, bs):
        h_t = torch.bmm(a3.reshape(3 * k, r, width), xs3.reshape(3 * k, n, width).transpose(1, 2))
        h_t = h_t.view(3, k, r, n)
        q = (torch.bmm(bs[0], h_t[0]) * 2.0).transpose(1, 2)
        kv = torch.bmm(torch.stack(bs[1:]).reshape(2 * k, 128, r), h_t[1:].reshape(2 * k, r, n))
        kv = (kv * 2.0).view(2, k, 128, n).transpose(2, 3)
        return [q, kv[0], kv[1]]

    out, base = [], None
    for name, form in (("separate", separate), ("batched", batched)):
        for compiled in (False, True):
            xs3 = torch.randn(3, k, n, width, device=dev, requires_grad=True)
            a3 = (torch.randn(3, k, r, width, device=dev) * 0.02).requires_grad_()
            bs = [(torch.randn(k, o, r, device=dev) * 0.02).requires_grad_() for o in outs]
            f = torch.compile(form, dynamic=False) if compiled else form

            def step(f=f, xs3=xs3, a3=a3, bs=bs):
                with torch.autocast("cuda", torch.bfloat16):
                    ys = f(xs3, a3, bs)
                sum(y.float().sum() for y in ys).backward()

            us = _time(step, args.warmup, args.iters)
            base = base or us
            out.append({"kind": "lora q+k+v", "form": name, "compiled": compiled,
                        "fwd_bwd_us": round(us, 1), "ratio_vs_first": round(us / base, 3)})
            print(json.dumps(out[-1]), flush=True)
    return out


def sdpa_rows(args) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, b, t, h, kv, d = "cuda", args.k * args.rows, args.tokens, 14, 2, 64
    out, base = [], None
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION):
        for gqa in (True, False):
            q = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
            kk = torch.randn(b, kv, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
            vv = torch.randn(b, kv, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)

            def step(q=q, kk=kk, vv=vv, gqa=gqa, backend=backend):
                with sdpa_kernel([backend]):
                    if gqa:
                        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True,
                                                           enable_gqa=True)
                    else:
                        o = F.scaled_dot_product_attention(
                            q, kk.repeat_interleave(h // kv, 1), vv.repeat_interleave(h // kv, 1),
                            is_causal=True)
                o.float().sum().backward()

            try:
                us = _time(step, args.warmup, args.iters)
            except RuntimeError as e:  # a backend that refuses these inputs
                out.append({"kind": "sdpa", "backend": backend.name, "gqa": gqa,
                            "error": str(e).splitlines()[0][:160]})
                print(json.dumps(out[-1]), flush=True)
                continue
            base = base or us
            out.append({"kind": "sdpa", "backend": backend.name, "gqa": gqa,
                        "fwd_bwd_us": round(us, 1), "ratio_vs_first": round(us / base, 3)})
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=8, help="members (default 8)")
    ap.add_argument("--rows", type=int, default=2, help="rows per member (the seed's batch: 2)")
    ap.add_argument("--tokens", type=int, default=291,
                    help="tokens per row (the reference sweep's split: 291)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/lora_kernels.py: needs a CUDA GPU (CUDA events, bf16 kernels)")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = {"device": torch.cuda.get_device_name(), "k": args.k, "rows": args.rows,
            "tokens": args.tokens,
            "results": lora_rows(args) + qkv_rows(args) + sdpa_rows(args)}
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
