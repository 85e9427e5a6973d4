"""Timing sweep of NSA branches over paths: FA-2 (each provider), Triton, SDPA fallback, FlexAttention.

    python -m conformance.bench --branches win,cmp --T 4096,16384,65536 --out artifacts/x

CUDA-event timing: warm-up, then ``--reps`` timed runs rotating over ``--rotate`` input sets;
the median (and p10/p90) is recorded. Rows are appended to ``bench.csv`` as they finish, so a
rerun with the same --out skips cases already measured (resumable). Ratios between paths are
only meaningful inside one run on one GPU. On a machine without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from pathlib import Path

FIELDS = ["gpu", "branch", "path", "version", "T", "hq", "hkv", "dk", "dv", "dtype", "mode",
          "median_ms", "p10_ms", "p90_ms", "fwd_tflops", "status"]


def _parse_list(text, cast=str):
    return [cast(x) for x in text.split(",") if x]


def cmp_pairs(T: int, cfg) -> int:
    """Visible (query, compressed block) pairs of one sequence: work of the cmp branch."""
    l, d = cfg.block_len, cfg.block_stride
    return sum((t - l + 1) // d + 1 for t in range(l - 1, T))


def win_pairs(T: int, w: int) -> int:
    return sum(min(t + 1, w) for t in range(T))


def time_cuda(fn, inputs, warmup: int, reps: int):
    """Median, p10, p90 in ms of fn(*inputs[i % len]) timed with CUDA events."""
    import torch

    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
    return statistics.median(times), q(0.1), q(0.9)


def _flex_fn(branch, cfg, T, G):
    import torch
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Each case compiles its own kernels (shapes, grad mode): start from a clean cache so the
    # recompile limit never sends flex to its unfused, memory-hungry fallback.
    torch._dynamo.reset()

    l, d, w = cfg.block_len, cfg.block_stride, cfg.window
    if branch == "win":
        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & (qi - ki < w)
        kv_len = T
    else:
        def mask_mod(b, h, qi, ki):
            return ki * d + l - 1 <= qi
        kv_len = cfg.num_cmp_blocks(T)
    block_mask = create_block_mask(mask_mod, None, None, T, kv_len, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        # (T, H, D) -> (1, H, T, D); rows with no visible key come back as 0 from flex.
        o = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                 block_mask=block_mask, enable_gqa=G > 1)
        return o[0].transpose(0, 1)
    return run


def build_case(branch, path, T, hq, hkv, dk, dv, dtype, cfg, mode_is_bwd: bool = False):
    """(callable, inputs list-of-tuples builder) for one case, or raise LookupError(reason)."""
    import torch
    from nsa_ref import fa2
    from nsa_ref.compress import compress

    G = hq // hkv

    def make(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        q = torch.randn(T, hq, dk, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(T, hkv, dk, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(T, hkv, dv, device="cuda", dtype=dtype, generator=g)
        return q, k, v

    prov = None
    if path.startswith("fa2:"):
        prov = fa2.get_provider(path[4:])
        if not prov.is_available():
            raise LookupError(f"provider {prov.name} not usable")
    if branch == "win":
        if prov is not None:
            return (lambda q, k, v: fa2.win_attention(q, k, v, cfg, provider=prov)), make
        if path == "sdpa":
            from nsa_ref import sdpa
            return (lambda q, k, v: sdpa.win_attention(q, k, v, cfg)), make
        if path == "flex":
            return _flex_fn("win", cfg, T, G), make
    if branch == "cmp":
        def make_cmp(seed):
            q, k, v = make(seed)
            return q, compress(k, cfg)[0], compress(v, cfg)[0]
        if prov is not None:
            return (lambda q, kc, vc: fa2.cmp_attention(q, kc, vc, cfg, provider=prov)[0]), make_cmp
        if path == "sdpa":
            from nsa_ref import sdpa
            return (lambda q, kc, vc: sdpa.cmp_attention(q, kc, vc, cfg)[0]), make_cmp
        if path == "flex":
            return _flex_fn("cmp", cfg, T, G), make_cmp
    if branch == "select":
        from nsa_ref import selection

        if mode_is_bwd:
            raise LookupError("block selection has no backward")

        def make_select(seed):
            q, k, _ = make(seed)
            kc = compress(k, cfg)[0]
            lse = None
            if path == "triton":  # the cmp branch's lse, as nsa_attention hands it over
                from nsa_ref.triton_kernels.scoring import cmp_lse
                lse = cmp_lse(q, kc, cfg)
            return q, kc, lse
        if path == "triton":
            from nsa_ref.triton_kernels import select_blocks as triton_select
            return (lambda q, kc, lse: triton_select(q, kc, cfg, lse=lse)), make_select
        if path == "torch":
            return (lambda q, kc, lse: selection.select_blocks(q, kc, cfg)), make_select
    if branch == "sel" and (path in ("sdpa", "triton") or prov is not None):
        from nsa_ref import sdpa, select_blocks

        def make_sel(seed):
            q, k, v = make(seed)
            with torch.no_grad():
                idx = select_blocks(q, compress(k, cfg)[0], cfg)
            return q, k, v, idx
        if prov is not None:
            return (lambda q, k, v, idx: fa2.sel_attention(q, k, v, idx, cfg, provider=prov)), make_sel
        if path == "triton":
            from nsa_ref import triton_kernels
            return (lambda q, k, v, idx: triton_kernels.sel_attention(q, k, v, idx, cfg)), make_sel
        return (lambda q, k, v, idx: sdpa.sel_attention(q, k, v, idx, cfg)), make_sel
    if branch == "full_causal" and prov is not None:
        def full(q, k, v):
            return prov.dense(q[None], k[None], v[None], causal=True, window=(-1, -1), scale=dk ** -0.5)[0]
        return full, make
    if branch == "nsa":
        from nsa_ref import nsa_attention

        def make_nsa(seed):
            q, k, v = make(seed)
            gates = torch.rand(T, hq, 3, device="cuda", dtype=dtype)
            return q, k, v, gates
        if prov is not None:
            import os

            # backend="fa2" puts all three branches on FA-2 (sel via the gather path).
            os.environ["NSA_FA2_PROVIDER"] = prov.name
            return (lambda q, k, v, g: nsa_attention(q, k, v, g, cfg, backend="fa2")), make_nsa
        if path == "sdpa":
            return (lambda q, k, v, g: nsa_attention(q, k, v, g, cfg, backend="sdpa")), make_nsa
        if path == "triton":
            # Triton for selection and sel; cmp and win take the auto route (FA-2).
            return (lambda q, k, v, g: nsa_attention(q, k, v, g, cfg, backend="triton")), make_nsa
    raise LookupError(f"no {path} path for {branch}")


def fwd_flops(branch, T, hq, dk, dv, cfg) -> float:
    per_pair = 2 * hq * (dk + dv)
    if branch == "win":
        return per_pair * win_pairs(T, cfg.window)
    if branch == "cmp":
        return per_pair * cmp_pairs(T, cfg)
    if branch == "full_causal":
        return per_pair * T * (T + 1) / 2
    if branch == "sel":
        # each query sees at most n * l' selected keys (all earlier ones while t < n * l')
        return per_pair * sum(min(t + 1, cfg.n_sel * cfg.sel_block) for t in range(T))
    if branch == "select":
        # q . k_cmp over the visible compressed blocks (the scores' only matrix product)
        return 2 * hq * dk * cmp_pairs(T, cfg)
    return float("nan")


def merge_csvs(parts: list[Path], target: Path) -> int:
    """Append the rows of each shard CSV to `target` (header once); returns rows merged."""
    rows = []
    for part in parts:
        if part.exists():
            with part.open() as fh:
                rows.extend(csv.DictReader(fh))
    new_file = not target.exists()
    with target.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def run_sharded(argv: list[str], workers: int, out: Path) -> int:
    """One subprocess per GPU (CUDA_VISIBLE_DEVICES=i), shard i of n each; merge their CSVs."""
    import os
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(workers):
        shard_out = out / f"shard_{i}"
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(i))
        cmd = [sys.executable, "-m", "conformance.bench", *argv, "--workers", "1",
               "--shard", f"{i}/{workers}", "--out", str(shard_out)]
        print(f"bench: worker {i} on GPU {i} -> {shard_out}", flush=True)
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    merged = merge_csvs([out / f"shard_{i}" / "bench.csv" for i in range(workers)], out / "bench.csv")
    print(f"bench: merged {merged} rows from {workers} workers into {out / 'bench.csv'}")
    return max(codes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nsa-fa2 bench", description=__doc__.splitlines()[0])
    ap.add_argument("--branches", default="win,cmp,sel,select,nsa,full_causal")
    ap.add_argument("--paths", default="fa2:flash_attn,fa2:torch,triton,torch,sdpa,flex")
    ap.add_argument("--T", default="256,1024,4096,16384,65536")
    ap.add_argument("--head-dims", default="128", help="dk or dk/dv, comma separated, e.g. 128,192/128")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--hq", type=int, default=64)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rotate", type=int, default=2, help="input sets rotated between runs")
    ap.add_argument("--max-sdpa-T", type=int, default=16384, help="skip the SDPA fallback above this T")
    ap.add_argument("--out", default="artifacts/bench")
    ap.add_argument("--workers", type=int, default=0,
                    help="one worker process per GPU (0 = every visible GPU; 1 = run in this process)")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th case starting at i (set by --workers)")
    args = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        print("nsa-fa2 bench: no CUDA device here; the sweep needs a GPU (nothing was timed).")
        return 0
    workers = args.workers or torch.cuda.device_count()
    if workers > 1 and args.shard == "0/1":
        return run_sharded(argv if argv is not None else sys.argv[1:], workers, Path(args.out))
    shard_i, shard_n = (int(x) for x in args.shard.split("/"))
    from nsa_ref.config import NSAConfig

    cfg = NSAConfig()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    gpu = torch.cuda.get_device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "bench.csv"
    done = set()
    if csv_path.exists():
        with csv_path.open() as fh:
            done = {tuple(r[f] for f in ("branch", "path", "T", "dk", "dv", "dtype", "mode")) for r in csv.DictReader(fh)}
    cases = [(b, p, T, hd, dt, m)
             for hd in _parse_list(args.head_dims) for dt in _parse_list(args.dtypes)
             for T in _parse_list(args.T, int) for b in _parse_list(args.branches)
             for p in _parse_list(args.paths) for m in _parse_list(args.modes)]
    # Shards interleave cases so every worker gets a mix of short and long sequences.
    cases = cases[shard_i::shard_n]
    new_file = not csv_path.exists()
    with csv_path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        t_start = time.time()
        for n, (branch, path, T, hd, dt, mode) in enumerate(cases, 1):
            dk, dv = (int(x) for x in (hd.split("/") + [hd])[:2])
            key = (branch, path, str(T), str(dk), str(dv), dt, mode)
            if key in done:
                continue
            row = dict(gpu=gpu, branch=branch, path=path, version="", T=T, hq=args.hq, hkv=args.hkv,
                       dk=dk, dv=dv, dtype=dt, mode=mode, median_ms="", p10_ms="", p90_ms="",
                       fwd_tflops="", status="ok")
            try:
                if path == "sdpa" and T > args.max_sdpa_T:
                    raise LookupError(f"SDPA skipped above T={args.max_sdpa_T} (--max-sdpa-T)")
                fn, make = build_case(branch, path, T, args.hq, args.hkv, dk, dv, dtypes[dt], cfg,
                                      mode_is_bwd=mode == "fwdbwd")
                if path.startswith("fa2:"):
                    from nsa_ref.fa2 import get_provider
                    row["version"] = get_provider(path[4:]).version()
                elif path == "flex":
                    row["version"] = torch.__version__
                elif path == "triton":
                    from nsa_ref.triton_kernels import triton_version
                    row["version"] = triton_version()
                inputs = [make(s) for s in range(args.rotate)]
                if mode == "fwdbwd":
                    for inp in inputs:
                        for t in inp[:3]:  # q, k, v (or q, k_cmp, v_cmp)
                            t.requires_grad_()

                    def step(*inp, _fn=fn):
                        o = _fn(*inp)
                        o.backward(torch.ones_like(o))
                    run = step
                else:
                    def run(*inp, _fn=fn):
                        with torch.no_grad():
                            _fn(*inp)
                med, p10, p90 = time_cuda(run, inputs, args.warmup, args.reps)
                row.update(median_ms=f"{med:.4f}", p10_ms=f"{p10:.4f}", p90_ms=f"{p90:.4f}")
                if mode == "fwd":
                    row["fwd_tflops"] = f"{fwd_flops(branch, T, args.hq, dk, dv, cfg) / med / 1e9:.1f}"
            except LookupError as exc:
                row["status"] = f"skipped: {exc}"
            except torch.cuda.OutOfMemoryError:
                row["status"] = "oom"
            except Exception as exc:  # recorded, the sweep goes on
                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            finally:
                torch.cuda.empty_cache()
            writer.writerow(row)
            fh.flush()
            el = time.time() - t_start
            print(f"[{n}/{len(cases)} {el:6.0f}s] {branch:11s} {path:15s} T={T:<6d} d={dk}/{dv} {dt} "
                  f"{mode:6s} {row['median_ms'] or '-':>10s} ms  {row['status']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
