"""Time one NSA decode step: ``decode_step_batched`` (the plain-torch reference) vs.
``decode_step_fast`` (the fast step; on the CPU its torch path), both over NSAKVCache, and check their parity.

    python conformance/tools/device/decode_step_timing.py                      # CPU, small heads
    python conformance/tools/device/decode_step_timing.py --contexts 1024 4096 --batch 4 --device cpu

For each context length T: both caches are prefilled with T tokens per sequence, then ``--steps``
decode steps are timed (median ms per step, the step that appends one token to every sequence).
It also reports max|fast - reference| on the timed steps (same inputs, same dtype). The GPU
benchmark of the FA-2 / Triton path is ``decode_bench.py`` (Documentation/Architecture/Decode.md).
(Until the per-sequence ``NSACache`` was removed, this compared that old step with the reference.)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from nsa_ref import NSAConfig
from nsa_ref.decode_batched import decode_step_batched
from nsa_ref.decode_fast import decode_step_fast
from nsa_ref.kv_cache import NSAKVCache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_context(T: int, args, cfg: NSAConfig, device: torch.device, dtype: torch.dtype) -> dict:
    B, hq, hkv, dk, dv, steps = args.batch, args.hq, args.hkv, args.dk, args.dv, args.steps
    g = torch.Generator().manual_seed(T)
    total = T + steps + 1

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    q, k, v = rand(B, total, hq, dk), rand(B, total, hkv, dk), rand(B, total, hkv, dv)
    gates = torch.rand(B, total, hq, 3, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
    pk, pv = k[:, :T].reshape(B * T, hkv, dk), v[:, :T].reshape(B * T, hkv, dv)
    caches = {}
    for name in ("reference", "fast"):
        caches[name] = NSAKVCache.allocate(B, total, hkv, dk, cfg, v_head_dim=dv, dtype=dtype, device=device)
        caches[name].prefill(pk, pv, cu)
    times = {"reference": [], "fast": []}
    worst = 0.0
    with torch.no_grad():
        for t in range(T, T + steps):
            args_t = (q[:, t], k[:, t], v[:, t], gates[:, t])
            _sync(device)
            start = time.perf_counter()
            a = decode_step_batched(*args_t, caches["reference"], cfg)
            _sync(device)
            times["reference"].append(time.perf_counter() - start)
            start = time.perf_counter()
            b = decode_step_fast(*args_t, caches["fast"], cfg)
            _sync(device)
            times["fast"].append(time.perf_counter() - start)
            worst = max(worst, (a.double() - b.double()).abs().max().item())
    med = {key: 1e3 * statistics.median(val[1:] or val) for key, val in times.items()}
    return {"context": T, "reference_ms": med["reference"], "fast_ms": med["fast"], "max_abs_diff": worst}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hq", type=int, default=16)
    parser.add_argument("--hkv", type=int, default=2)
    parser.add_argument("--dk", type=int, default=64)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: on a shared 2-core machine more threads stall)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = NSAConfig()
    print(f"# {device} {args.dtype} torch {torch.__version__} threads {torch.get_num_threads()}; paper config; "
          f"B={args.batch} Hq={args.hq} Hkv={args.hkv} Dk={args.dk} Dv={args.dv}; median of {args.steps} steps")
    print("| context | decode_step_batched ms | decode_step_fast ms | speed-up | max abs diff |")
    print("|---:|---:|---:|---:|---:|")
    for T in args.contexts:
        r = time_context(T, args, cfg, device, dtype)
        print(f"| {r['context']} | {r['reference_ms']:.2f} | {r['fast_ms']:.2f} | "
              f"{r['reference_ms'] / r['fast_ms']:.1f}x | {r['max_abs_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
