"""Where the time of one NSA call goes: each stage of ``nsa_attention`` timed on its own, against
the GPU's ceilings, beside the whole call (the difference is glue: launches, host work, copies).

    python -m conformance.tools.stages --T 8192,65536 --out artifacts/x/stages [--profile]

Stages (forward; forward+backward for the differentiable ones): ``compress`` (mean phi of k and
v), ``cmp``, ``select`` (scores + top-n; no backward), ``sel``, ``win``, ``combine`` (and
``combine_torch``, the torch ops it replaced where it is fused, not counted in the sum), and
``nsa`` (the whole ``nsa_attention``). Each row: median ms (CUDA events, warm-up, medians), the
stage's share of ``nsa``, its forward FLOPs and TFLOP/s, the minimum HBM bytes it must move (each
tensor it reads or writes once) and TB/s, each against ``--peak-tflops`` / ``--peak-tbs``
(defaults: an H200's dense bf16 and copy bandwidth). ``--profile`` adds a torch.profiler kernel
table of the whole call (``kernels_T<T>_<mode>.txt``), its host vs device time, and a cProfile of
the host's Python (``host_T<T>_<mode>.txt``). Without CUDA
it says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

FIELDS = ["gpu", "family", "T", "hq", "hkv", "dk", "dv", "dtype", "mode", "stage", "path", "median_ms",
          "share_of_nsa", "gflop", "tflops", "pct_peak_flops", "min_mb", "tbs", "pct_peak_bw"]


def _flops(stage: str, T: int, hq: int, dk: int, dv: int, cfg, bwd: bool) -> float:
    """Forward matmul FLOPs (x 2.5 with the backward: dQ, dK, dV and the recomputed scores)."""
    from conformance.tools.bench import fwd_flops

    if stage in ("cmp", "sel", "win", "select"):
        f = fwd_flops(stage, T, hq, dk, dv, cfg)
        return f * 2.5 if bwd and stage != "select" else f
    return 0.0


def _min_bytes(stage: str, T: int, hq: int, hkv: int, dk: int, dv: int, cfg, esize: int, bwd: bool) -> float:
    """Bytes a stage must move at least: its inputs read once, its outputs written once
    (x 2 with the backward: gradients of the same sizes come back)."""
    tc = cfg.num_cmp_blocks(T)
    q, kv, o = T * hq * dk, T * hkv * (dk + dv), T * hq * dv
    kvc = tc * hkv * (dk + dv)
    b = {
        "compress": (kv + kvc) * esize,
        "cmp": (q + kvc + o) * esize + T * hq * 4,
        "select": (q * esize + tc * hkv * dk * esize + T * hq * 4 + T * hkv * cfg.n_sel * 4),
        "sel": (q + kv + o) * esize + T * hkv * cfg.n_sel * 4,
        "win": (q + kv + o) * esize,
        "combine": (4 * o + T * hq * 3) * esize,
    }.get(stage, 0.0)
    return b * 2 if bwd and stage != "select" else b


def _stage_fns(T, hq, hkv, dk, dv, dtype, cfg):
    """-> {stage: (fn(*inputs) -> tensor or tuple, inputs)} built from one seeded input set, each
    stage fed the previous stages' real outputs (so select and sel see real selections)."""
    import torch

    from nsa_ref import api, nsa_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, hq, dk, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(T, hkv, dk, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(T, hkv, dv, device="cuda", dtype=dtype, generator=g)
    gates = torch.rand(T, hq, 3, device="cuda", dtype=dtype, generator=g)
    with torch.no_grad():
        kc, vc = api.compress(k, cfg)[0], api.compress(v, cfg)[0]
        o_cmp, lse = api.cmp_attention(q, kc, vc, cfg, return_lse=True)
        idx = api.select_blocks(q, kc, cfg, lse=lse)
        o_sel = api.sel_attention(q, k, v, idx, cfg)
        o_win = api.win_attention(q, k, v, cfg)
    return {
        "compress": (lambda k_, v_: (api.compress(k_, cfg)[0], api.compress(v_, cfg)[0]), (k, v)),
        "cmp": (lambda q_, kc_, vc_: api.cmp_attention(q_, kc_, vc_, cfg, return_lse=True)[0], (q, kc, vc)),
        "select": (lambda q_, kc_, lse_: api.select_blocks(q_, kc_, cfg, lse=lse_), (q, kc, lse)),
        "sel": (lambda q_, k_, v_, i_: api.sel_attention(q_, k_, v_, i_, cfg), (q, k, v, idx)),
        "win": (lambda q_, k_, v_: api.win_attention(q_, k_, v_, cfg), (q, k, v)),
        "combine": (lambda g_, a, b, c: api.combine_branches(g_, a, b, c), (gates, o_cmp, o_sel, o_win)),
        # The torch ops the fused combine replaced, for a same-run ratio (not part of nsa).
        "combine_torch": (lambda g_, a, b, c: (g_[..., 0:1] * a).addcmul_(g_[..., 1:2], b).addcmul_(g_[..., 2:3], c),
                          (gates, o_cmp, o_sel, o_win)),
        "nsa": (lambda q_, k_, v_, g_: nsa_attention(q_, k_, v_, g_, cfg), (q, k, v, gates)),
    }


def _runner(fn, inputs, bwd: bool):
    """-> (run(), leaves): run() calls fn once (forward, or forward + backward of every float
    output with ones) on copies of ``inputs`` that require grad where they are float."""
    import torch

    if not bwd:
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    leaves = tuple(x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs)

    def run_bwd():
        out = fn(*leaves)
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return run_bwd


def _route_paths(stages: dict) -> dict:
    """-> {branch: path the router took} for one forward of the whole call."""
    from nsa_ref import api, telemetry

    telemetry.reset()
    fn, inputs = stages["nsa"]
    import torch
    with torch.no_grad():
        fn(*inputs)
    paths = {branch: path for (branch, path, _) in telemetry.snapshot()["counts"]}
    paths["compress"] = paths["combine_torch"] = "torch"
    paths["combine"] = "triton" if api._fused_combine(*stages["combine"][1]) else "torch"
    return paths


def _profile(run, out: Path, name: str) -> dict:
    """torch.profiler over 3 calls -> kernel table file; -> host and device ms per call."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 3 * 1e3
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    (out / f"kernels_{name}.txt").write_text(table)
    # Kernels and copies only (operator rows would count their kernels' time again).
    dev = sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 3e3
    # Where the host's time goes: Python functions of 5 calls, by cumulative time.
    import cProfile
    import io
    import pstats

    cp = cProfile.Profile()
    cp.enable()
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    cp.disable()
    buf = io.StringIO()
    pstats.Stats(cp, stream=buf).sort_stats("cumulative").print_stats(45)
    (out / f"host_{name}.txt").write_text(buf.getvalue())
    return {"wall_ms_profiled": round(wall, 3), "device_ms": round(dev, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.tools.stages", description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="8192,65536")
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--family", default="paper")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 ceiling (H200: about 790)")
    ap.add_argument("--peak-tbs", type=float, default=4.3, help="copy bandwidth ceiling in TB/s (H200: about 4.3)")
    ap.add_argument("--profile", action="store_true", help="also a torch.profiler kernel table of the whole call")
    ap.add_argument("--out", default="artifacts/stages")
    args = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("stages: no CUDA device here; the stage timing needs a GPU (nothing was timed).")
        return 0
    from conformance.tools.bench import FAMILIES, time_cuda
    from nsa_ref.config import NSAConfig

    cfg = NSAConfig(**FAMILIES[args.family])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dk = dv = args.head_dim
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    rows, host = [], {}
    for T in (int(x) for x in args.T.split(",") if x):
        stages = _stage_fns(T, args.hq, args.hkv, dk, dv, dtype, cfg)
        paths = _route_paths(stages)
        for mode in args.modes.split(","):
            bwd = mode == "fwdbwd"
            times = {}
            for stage, (fn, inputs) in stages.items():
                if bwd and stage == "select":
                    continue
                run = _runner(fn, inputs, bwd)
                times[stage] = time_cuda(run, [()], args.warmup, args.reps)[0]
                if stage == "nsa" and args.profile:
                    host[f"T{T}_{mode}"] = _profile(run, out, f"T{T}_{mode}")
            for stage, ms in times.items():
                fl = _flops(stage, T, args.hq, dk, dv, cfg, bwd)
                by = _min_bytes(stage, T, args.hq, args.hkv, dk, dv, cfg, 2, bwd)
                rows.append(dict(
                    gpu=gpu, family=args.family, T=T, hq=args.hq, hkv=args.hkv, dk=dk, dv=dv, dtype=args.dtype,
                    mode=mode, stage=stage, path=paths.get(stage, ""), median_ms=f"{ms:.4f}",
                    share_of_nsa=f"{ms / times['nsa']:.3f}", gflop=f"{fl / 1e9:.1f}",
                    tflops=f"{fl / ms / 1e9:.1f}" if fl else "",
                    pct_peak_flops=f"{100 * fl / ms / 1e9 / args.peak_tflops:.1f}" if fl else "",
                    min_mb=f"{by / 1e6:.1f}", tbs=f"{by / ms / 1e9:.3f}" if by else "",
                    pct_peak_bw=f"{100 * by / ms / 1e9 / args.peak_tbs:.1f}" if by else ""))
            stage_sum = sum(ms for s, ms in times.items() if s not in ("nsa", "combine_torch"))
            print(f"T={T} {mode}: nsa {times['nsa']:.2f} ms, stages sum {stage_sum:.2f} ms "
                  f"(glue {times['nsa'] - stage_sum:+.2f} ms)", flush=True)
        del stages
        torch.cuda.empty_cache()
    with (out / "stages.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    if host:
        import json
        (out / "host_vs_device.json").write_text(json.dumps(host, indent=1))
    print(f"{'T':>6} {'mode':6} {'stage':9} {'path':7} {'ms':>8} {'share':>6} {'TFLOP/s':>8} {'TB/s':>6}")
    for r in rows:
        print(f"{r['T']:>6} {r['mode']:6} {r['stage']:9} {r['path']:7} {float(r['median_ms']):8.2f} "
              f"{r['share_of_nsa']:>6} {r['tflops'] or '-':>8} {r['tbs'] or '-':>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
