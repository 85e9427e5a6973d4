"""Timing sweep of NSA branches over paths: FA-2 (each provider), Triton, SDPA fallback, FlexAttention.

    python -m conformance.tools.bench --branches win,cmp --T 4096,16384,65536 --out artifacts/x

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

FIELDS = ["gpu", "family", "branch", "path", "version", "T", "hq", "hkv", "dk", "dv", "dtype", "mode",
          "median_ms", "p10_ms", "p90_ms", "fwd_tflops", "peak_mib", "status"]

#: Block layouts the sweep can run in: the paper's (ours, Scalable-Flash-NSA, native-sparse-
#: attention-triton) and FLA's tied one (``peer:fla`` expresses nothing else).
FAMILIES = {"paper": {}, "fla": dict(block_len=64, block_stride=64, sel_block=64)}


#: The columns that identify a case (a rerun into the same --out skips cases already measured).
KEY = ("family", "branch", "path", "T", "dk", "dv", "dtype", "mode")


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


def _backend_for(branch: str, path: str):
    """A bench path -> (the router's backend name, NSASettings or None), or LookupError when that
    backend has no kernel for ``branch``. "fa2:<provider>" pins the provider through the settings
    handed to the router; "torch" is the torch block selection (where select goes on "reference")."""
    from nsa_ref.backends import BY_NAME
    from nsa_ref.settings import current_settings

    settings = None
    if path.startswith("fa2:"):
        name, settings = "fa2", current_settings().model_copy(update={"fa2_provider": path[4:]})
    elif path == "torch" and branch == "select":
        return "reference", None
    elif path in ("sdpa", "triton"):
        name = path
    else:
        raise LookupError(f"no {path} path for {branch}")
    if branch not in BY_NAME[name].branches:
        raise LookupError(f"no {path} path for {branch}")
    return name, settings


def _routed(branch: str, backend: str, cfg, settings):
    """fn(q, k, v, *rest) -> the branch's result on the route the router picks for ``backend``
    (args as the public branch function takes them, cfg appended)."""
    from nsa_ref import router

    def run(q, k, v, *rest):
        args = (q, k, v, *rest, cfg)
        kv = (k, k) if branch == "select" else (k, v)
        route = router.choose(branch, backend, q=q, k=kv[0], v=kv[1], cfg=cfg, settings=settings)
        return route.run(args, None)
    return run


def build_case(branch, path, T, hq, hkv, dk, dv, dtype, cfg, mode_is_bwd: bool = False):
    """(callable, inputs list-of-tuples builder) for one case, or raise LookupError(reason).
    NSA's own paths run where the router sends the backend the path names (``_backend_for``);
    peer paths (``conformance.tools.peers``) run another implementation's whole NSA."""
    import torch
    from conformance.tools import peers
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
    if path == "flex" and branch in ("win", "cmp"):
        fn = _flex_fn(branch, cfg, T, G)
    elif branch == "full_causal" and prov is not None:
        def fn(q, k, v):
            return prov.dense(q[None], k[None], v[None], causal=True, window=(-1, -1), scale=dk ** -0.5)[0]
    elif branch == "nsa" and peers.is_peer(path):
        peer, version = peers.peer_fn(path, cfg, hq, hkv, dk, dv)
        fn = lambda q, k, v, g, _p=peer: _p(q, k, v, g, cfg)  # noqa: E731
        fn.version = version
    elif peers.is_peer(path):
        raise LookupError(f"{path} is timed on the nsa branch only")
    elif branch == "nsa":
        from nsa_ref import nsa_attention

        # backend="fa2" puts all three branches on FA-2 (sel via the gather path); "triton":
        # Triton for selection and sel, cmp and win on the auto route (FA-2). A ":shapes" suffix
        # calls with validate="shapes" (no device read of the gates: how NSAAttention calls it,
        # its gates being sigmoid outputs); without it, the default "values" check syncs once.
        backend, settings = _backend_for("sel", path.removesuffix(":shapes"))
        validate = "shapes" if path.endswith(":shapes") else "values"

        def fn(q, k, v, g):
            return nsa_attention(q, k, v, g, cfg, backend=backend, settings=settings, validate=validate)
    else:
        if branch == "select" and mode_is_bwd:
            raise LookupError("block selection has no backward")
        backend, settings = _backend_for(branch, path)
        fn = _routed(branch, backend, cfg, settings)
    if branch == "cmp":
        def make_cmp(seed):
            q, k, v = make(seed)
            return q, compress(k, cfg)[0], compress(v, cfg)[0]
        return ((lambda q, kc, vc: fn(q, kc, vc)[0]) if path != "flex" else fn), make_cmp
    if branch == "select":
        def make_select(seed):
            q, k, _ = make(seed)
            kc = compress(k, cfg)[0]
            lse = None
            if path == "triton":  # the cmp branch's lse, as nsa_attention hands it over
                from nsa_ref.triton_kernels.scoring import cmp_lse
                lse = cmp_lse(q, kc, cfg)
            return q, kc, lse
        return (lambda q, kc, lse: fn(q, kc, lse)), make_select
    if branch == "sel":
        from nsa_ref import select_blocks

        def make_sel(seed):
            q, k, v = make(seed)
            with torch.no_grad():
                idx = select_blocks(q, compress(k, cfg)[0], cfg)
            return q, k, v, idx
        return fn, make_sel
    if branch == "nsa":
        def make_nsa(seed):
            q, k, v = make(seed)
            gates = torch.rand(T, hq, 3, device="cuda", dtype=dtype)
            return q, k, v, gates
        return fn, make_nsa
    return fn, make


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
        cmd = [sys.executable, "-m", "conformance.tools.bench", *argv, "--workers", "1",
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
    ap.add_argument("--family", default="paper", choices=sorted(FAMILIES),
                    help="block layout: paper (l 32, d 16, l' 64) or fla (l = d = l' = 64, FLA's only one)")
    ap.add_argument("--peer-path", action="append", default=[],
                    help="folder put on sys.path to import a peer (e.g. a checkout of "
                         "Scalable-Flash-Native-Sparse-Attention for peer:flash_nsa); repeatable")
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
    from conformance.tools.peers import add_peer_paths
    from nsa_ref.config import NSAConfig

    add_peer_paths(args.peer_path)
    cfg = NSAConfig(**FAMILIES[args.family])
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    gpu = torch.cuda.get_device_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "bench.csv"
    done = set()
    if csv_path.exists():
        with csv_path.open() as fh:
            # CSVs from before the family column hold paper-layout rows.
            done = {tuple(r.get(f) or "paper" if f == "family" else r[f] for f in KEY) for r in csv.DictReader(fh)}
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
            key = (args.family, branch, path, str(T), str(dk), str(dv), dt, mode)
            if key in done:
                continue
            row = dict(gpu=gpu, family=args.family, branch=branch, path=path, version="", T=T, hq=args.hq, hkv=args.hkv,
                       dk=dk, dv=dv, dtype=dt, mode=mode, median_ms="", p10_ms="", p90_ms="",
                       fwd_tflops="", peak_mib="", status="ok")
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
                elif path.startswith("triton"):
                    from nsa_ref.triton_kernels import triton_version
                    row["version"] = triton_version()
                elif hasattr(fn, "version"):
                    row["version"] = fn.version
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
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                med, p10, p90 = time_cuda(run, inputs, args.warmup, args.reps)
                # Working memory of one call beyond its inputs (outputs, saved tensors, scratch).
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                row.update(median_ms=f"{med:.4f}", p10_ms=f"{p10:.4f}", p90_ms=f"{p90:.4f}", peak_mib=f"{peak:.0f}")
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
