"""Per-call host overhead of nsa_attention on a GPU: CUDA-event time and wall time, same run.

    python conformance/tools/device/host_overhead.py                 # T=4K bf16, Hq 64 / Hkv 4 / D 128, paper config
    python conformance/tools/device/host_overhead.py --T 4096,16384 --modes fwd,fwdbwd --out $OUT

For every variant (how the packing and the value checks are given) and mode, ``--reps`` timed
calls after ``--warmup``: per call, ``enqueue_ms`` is the wall time until nsa_attention returns
(Python, routing, checks, launches; a host sync inside shows up here), ``wall_ms`` the wall time
until the GPU is done (synchronize after the call), ``cuda_ms`` the CUDA-event time around the
call on the stream. Medians (and p10/p90) go to ``host_overhead.json`` in ``--out`` (default:
$OUT, else the current directory) with the environment, and a table is printed.
Variants: ``none`` (cu_seqlens=None), ``packed`` (one sequence as cu_seqlens: one host read),
``host_meta`` (the same plus cu_seqlens_cpu and max_seqlen: no read), each with
``validate="values"`` (default: the gates check syncs) and ``"shapes"``. Against an older
nsa_ref without those arguments (the "before" run: ``PYTHONPATH=<old checkout>``), the variants
and levels it cannot express are left out and its default is recorded as ``validate="default"``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

VARIANTS = ("none", "packed", "host_meta")
VALIDATE = ("values", "shapes")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", default="4096", help="comma-separated token counts (default 4096)")
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--d", type=int, default=128, help="head dim (Dk = Dv)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args(argv)
    args.T = [int(x) for x in args.T.split(",") if x]
    args.modes = [m for m in args.modes.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [m for m in args.modes if m not in ("fwd", "fwdbwd")] + [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown mode/variant: {', '.join(bad)}")
    return args


def _summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
    return {"median": statistics.median(xs), "p10": q[0], "p90": q[-1]}


def measure(args, T: int, variant: str, validate: str, mode: str) -> dict:
    import torch

    from nsa_ref import NSAConfig, nsa_attention
    from nsa_ref.varlen import cu_seqlens_from_lengths  # in old and new checkouts alike

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    grad = mode == "fwdbwd"
    q, k, v = (torch.randn(T, h, args.d, device="cuda", dtype=dtype, generator=gen).requires_grad_(grad)
               for h in (args.hq, args.hkv, args.hkv))
    gates = torch.rand(T, args.hq, 3, device="cuda", dtype=dtype, generator=gen)
    cfg = NSAConfig()
    kw = dict(backend=args.backend) if validate == "default" else dict(backend=args.backend, validate=validate)
    if variant != "none":
        kw["cu_seqlens"] = cu_seqlens_from_lengths([T], device="cuda")
    if variant == "host_meta":
        kw.update(cu_seqlens_cpu=[0, T], max_seqlen=T)

    def call():
        out = nsa_attention(q, k, v, gates, cfg, **kw)
        if grad:
            out.backward(torch.ones_like(out))
        return out

    for _ in range(args.warmup):
        call()
    torch.cuda.synchronize()
    enqueue, wall, cuda = [], [], []
    for _ in range(args.reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        call()
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        enqueue.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
        cuda.append(start.elapsed_time(end))
    return {"T": T, "variant": variant, "validate": validate, "mode": mode,
            "enqueue_ms": _summary(enqueue), "wall_ms": _summary(wall), "cuda_ms": _summary(cuda)}


def environment() -> dict:
    import torch

    from nsa_ref import fa2
    from nsa_ref.triton_kernels import triton_version

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version(),
           "fa2_providers": {n: fa2.get_provider(n).version() for n in fa2.available_providers()}}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("host_overhead: no CUDA device here; nothing measured")
        return 0
    import inspect

    from nsa_ref import nsa_attention

    params = inspect.signature(nsa_attention).parameters
    levels = VALIDATE if "validate" in params else ("default",)
    variants = [v for v in args.variants if v != "host_meta" or "cu_seqlens_cpu" in params]
    rows = [measure(args, T, variant, validate, mode)
            for T in args.T for mode in args.modes for variant in variants for validate in levels]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "host_overhead.json"
    path.write_text(json.dumps({"config": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
                                "env": environment(), "rows": rows}, indent=1))
    print(f"{'T':>6} {'mode':7} {'variant':10} {'validate':8} {'enqueue ms':>11} {'wall ms':>9} {'cuda ms':>9}")
    for r in rows:
        print(f"{r['T']:>6} {r['mode']:7} {r['variant']:10} {r['validate']:8} {r['enqueue_ms']['median']:>11.3f} "
              f"{r['wall_ms']['median']:>9.3f} {r['cuda_ms']['median']:>9.3f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
