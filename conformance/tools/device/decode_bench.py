"""Benchmark the fast NSA decode step against full-attention decode (issue 16, point 4).

    python conformance/tools/device/decode_bench.py --out artifacts/<date>/decode_bench --plot     # H200
    python conformance/tools/device/decode_bench.py --device cpu --tiny --out /tmp/db              # smoke

For each batch size B and context T (default bf16, Hq 64 / Hkv 4 / D 128, paper config
l=32 d=16 l'=64 n=16 w=512, B in 1 16 64, T in 4096 16384 65536) it fills an ``NSAKVCache`` to T
tokens per sequence (random K/V written into the pages, compressed blocks computed from them),
then times with CUDA events (``--warmup`` steps, median of ``--iters``):

    nsa_eager_ms   ``decode_step_fast`` (append + branches), eager
    nsa_graph_ms   the same step as ``CapturedDecodeStep`` captures it: append (``append_static``) and
                   branches, one CUDA graph replayed (the basis of full_graph_ms: GPU time, no host);
                   nsa_graph_attend_ms: ``decode_attend_fast`` alone replayed from a graph;
                   nsa_call_ms: ``CapturedDecodeStep.__call__`` (host room check, input copies,
                   replay, host lengths): what a Python loop that waits for each step pays
    full_eager_ms  full attention: ``flash_attn_with_kvcache`` (append + attention) on a dense raw cache
                   of the same context; full_graph_ms: the same call replayed from a CUDA graph

and reports full/NSA ratios, tokens/s (B / step time), bytes per sequence (NSA raw + compressed,
full raw), which path each branch took, and max|fast - reference| on the first step (the
reference: ``nsa_ref.decode_batched``'s branch functions on the same cache). Each config runs in
its own try/except: a failure is a row with status "error: ...", a config whose caches would
pass ``--mem-limit-gb`` is a row with status "skipped: ...". Writes decode_bench.csv and .json
(and decode_bench.png with --plot) to --out and prints a table last.
Without CUDA (``--device cpu``) there are no events or graphs: wall-clock times, graph columns empty,
full attention in plain torch.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from nsa_ref import NSAConfig, telemetry
from nsa_ref.api import combine_branches
from nsa_ref.compress import mean_phi
from nsa_ref.decode_batched import cmp_branch, sel_branch, select_from_probs, win_branch
from nsa_ref.decode_fast import decode_attend_fast, decode_step_fast, resolve_kvcache
from nsa_ref.decode_graph import CapturedDecodeStep, advance_host_lengths, append_static
from nsa_ref.decode_torch_path import attend_fixed
from nsa_ref.kv_cache import NSAKVCache

TINY = dict(batches=[1, 3], contexts=[40, 150], hq=8, hkv=2, dim=16, warmup=1, iters=3)
TINY_CFG = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=4, n_init=1, n_local=1, window=16)


def log(msg: str) -> None:
    print(f"[decode_bench] {msg}", file=sys.stderr, flush=True)


class Timer:
    """Median ms of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def median_ms(self, fn, warmup: int, iters: int) -> float:
        """fn() ``warmup`` times, then the median ms of ``iters`` timed calls."""
        for _ in range(warmup):
            fn()
        times = []
        if self.cuda:
            torch.cuda.synchronize()
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)


def fill_cache(cache: NSAKVCache, T: int, gen: torch.Generator) -> None:
    """Every sequence of a preallocated ``cache`` gets T random tokens (written into the pages) and
    the compressed blocks of the mean phi computed from them; paged caches go through prefill."""
    raw, cmp, cfg = cache.raw, cache.cmp, cache.cfg
    B = raw.batch_size
    if raw.view().dense and cmp.view().dense and cache.phi_k is mean_phi and cache.phi_v is mean_phi:
        for pages in (raw.k_pages, raw.v_pages):
            pages[:, :T].normal_(generator=gen)
        tc = cfg.num_cmp_blocks(T)
        for src, dst in ((raw.k_pages, cmp.k_pages), (raw.v_pages, cmp.v_pages)):
            for b in range(B if tc else 0):  # block i = mean of tokens [i*d, i*d + l) (mean_phi); per sequence
                blocks = src[b, : (tc - 1) * cfg.block_stride + cfg.block_len].unfold(0, cfg.block_len, cfg.block_stride)
                dst[b, :tc] = blocks.to(torch.promote_types(blocks.dtype, torch.float32)).mean(-1).to(dst.dtype)
        raw.set_lengths([T] * B)
        cmp.set_lengths([tc] * B)
        return
    H, dk, dv = raw.k_pages.shape[2], raw.k_pages.shape[3], raw.v_pages.shape[3]
    dev, dt = raw.k_pages.device, raw.k_pages.dtype
    k = torch.randn(B * T, H, dk, device=dev, dtype=dt, generator=gen)
    v = torch.randn(B * T, H, dv, device=dev, dtype=dt, generator=gen)
    cache.prefill(k, v, torch.arange(0, B * T + 1, T, dtype=torch.int32, device=dev),
                  cu_seqlens_cpu=list(range(0, B * T + 1, T)))


def reference_attend(q: torch.Tensor, gates: torch.Tensor, cache: NSAKVCache, cfg: NSAConfig) -> torch.Tensor:
    """``decode_step_batched``'s branches after the append (the reference of ``decode_attend_fast``)."""
    q4 = q[:, None]
    q_pos = cache.cache_seqlens.long()[:, None] - 1
    raw, cmp = cache.views()
    o_cmp, p_cmp = cmp_branch(q4, q_pos, cmp, cfg)
    block_idx = select_from_probs(p_cmp, q_pos, raw.k_pages.shape[2], cfg.num_sel_blocks(raw.max_length), cfg)
    o_sel = sel_branch(q4, q_pos, block_idx, raw, cfg)
    o_win = win_branch(q4, q_pos, raw, cfg)
    return combine_branches(gates[:, None], o_cmp, o_sel, o_win)[:, 0]


def full_attention(device: torch.device):
    """-> (name, fn(q (B,1,Hq,D), k_cache, v_cache, k_new, v_new, cache_seqlens) -> out): FA-2's kvcache
    call (appends k_new / v_new at cache_seqlens in place), or the same in plain torch."""
    if device.type == "cuda":
        try:
            from flash_attn import flash_attn_with_kvcache

            def fa2(q, kc, vc, k, v, seqlens):
                return flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=seqlens, causal=True)

            return "flash_attn_with_kvcache", fa2
        except ImportError:
            pass

    def torch_full(q, kc, vc, k, v, seqlens):
        B = q.shape[0]
        b = torch.arange(B, device=q.device)
        kc[b, seqlens.long()] = k[:, 0]
        vc[b, seqlens.long()] = v[:, 0]
        valid = torch.arange(kc.shape[1], device=q.device)[None, :] <= seqlens.long()[:, None]
        return attend_fixed(q[:, 0], kc.transpose(1, 2), vc.transpose(1, 2), valid[:, None, :],
                            q.shape[-1] ** -0.5)[0][:, None]

    return "torch (masked softmax over the dense cache)", torch_full


def graph_of(fn):
    """Capture fn() in a CUDA graph (after a warm-up on a side stream) -> (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class CapturedAttend:
    """decode_attend_fast alone (no append) in a CUDA graph: the branches' share of the step."""

    def __init__(self, cache, cfg, q, gates, fa2, select="auto", win="auto"):
        self.q, self.g = q.clone(), gates.clone()
        self.graph, self.out = graph_of(lambda: decode_attend_fast(self.q, self.g, cache, cfg, fa2=fa2, select=select,
                                                                        win=win))


def bench_one(B: int, T: int, args, cfg: NSAConfig, device: torch.device, dtype: torch.dtype) -> dict:
    hq, hkv, d = args.hq, args.hkv, args.dim
    item = torch.empty((), dtype=dtype).element_size()
    steps = args.warmup + args.iters
    capacity = T + 3 * steps + 8
    tc = cfg.num_cmp_blocks(T)
    row = dict(B=B, context=T, hq=hq, hkv=hkv, dim=d, dtype=str(dtype).replace("torch.", ""),
               nsa_bytes_per_seq=(T + tc) * hkv * 2 * d * item, full_bytes_per_seq=T * hkv * 2 * d * item)
    need_gb = B * capacity * hkv * 2 * d * item * (2 + 1 / cfg.block_stride) / 2**30
    row["cache_gb"] = round(need_gb, 3)
    if need_gb > args.mem_limit_gb:
        row["status"] = f"skipped: caches need {need_gb:.1f} GB > --mem-limit-gb {args.mem_limit_gb}"
        return row
    gen = torch.Generator(device=device).manual_seed(B * 1_000_003 + T)
    timer = Timer(device)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    n_in = 3 * steps + 4
    qs, ks, vs = rand(n_in, B, hq, d), rand(n_in, B, hkv, d), rand(n_in, B, hkv, d)
    gs = torch.rand(n_in, B, hq, 3, device=device, generator=gen).to(dtype)
    fa2 = None if args.fa2 == "none" else "auto"
    select, win = getattr(args, "select", "auto"), getattr(args, "win", "auto")
    cache = NSAKVCache.allocate(B, capacity, hkv, d, cfg, dtype=dtype, device=device)
    fill_cache(cache, T, gen)

    # correctness on the first step: fast vs the reference branches on the same cache
    cache.append(ks[0], vs[0])
    telemetry.reset()
    got = decode_attend_fast(qs[0], gs[0], cache, cfg, fa2=fa2, select=select, win=win)
    paths = sorted({(b, p) for (b, p, _r) in telemetry.snapshot()["counts"]})
    row["paths"] = " ".join(f"{b}={p}" for b, p in paths)
    kernel, why = resolve_kvcache(fa2)
    row["fa2_kernel"] = kernel.name if kernel is not None else f"none ({why})"
    if not args.no_check:
        want = reference_attend(qs[0], gs[0], cache, cfg)
        row["max_abs_diff_vs_reference"] = float((got.float() - want.float()).abs().max())
    i = [1]

    def nsa_step():
        j = i[0]
        i[0] += 1
        return decode_step_fast(qs[j], ks[j], vs[j], gs[j], cache, cfg, fa2=fa2, validate="shapes", select=select,
                                win=win)

    row["nsa_eager_ms"] = timer.median_ms(nsa_step, args.warmup, args.iters)
    if device.type == "cuda":
        step = CapturedDecodeStep(cache, cfg, qs[i[0]], ks[i[0]], vs[i[0]], gs[i[0]], fa2=fa2, select=select, win=win)

        replays = [0]

        def nsa_replay():  # the inputs stay in the step's static buffers: GPU time only
            step.graph.replay()
            replays[0] += 1

        row["nsa_graph_ms"] = timer.median_ms(nsa_replay, args.warmup, args.iters)
        advance_host_lengths(cache, replays[0])

        def nsa_call():
            j = i[0]
            i[0] += 1
            step(qs[j], ks[j], vs[j], gs[j])

        row["nsa_call_ms"] = timer.median_ms(nsa_call, args.warmup, args.iters)
        attend = CapturedAttend(cache, cfg, qs[0], gs[0], fa2, select, win)
        row["nsa_graph_attend_ms"] = timer.median_ms(attend.graph.replay, args.warmup, args.iters)
        del step, attend
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()

    name, full = full_attention(device)
    row["full_impl"] = name
    kc, vc = rand(B, capacity, hkv, d), rand(B, capacity, hkv, d)
    seqlens = torch.full((B,), T, dtype=torch.int32, device=device)  # the new token overwrites slot T each step
    q1, k1, v1 = qs[0][:, None].clone(), ks[0][:, None].clone(), vs[0][:, None].clone()
    row["full_eager_ms"] = timer.median_ms(lambda: full(q1, kc, vc, k1, v1, seqlens), args.warmup, args.iters)
    if device.type == "cuda":
        graph, _ = graph_of(lambda: full(q1, kc, vc, k1, v1, seqlens))
        row["full_graph_ms"] = timer.median_ms(graph.replay, args.warmup, args.iters)
        del graph
    del kc, vc
    for kind in ("eager", "graph"):
        nsa, fl = row.get(f"nsa_{kind}_ms"), row.get(f"full_{kind}_ms")
        if nsa and fl:
            row[f"full_over_nsa_{kind}"] = fl / nsa
            row[f"nsa_{kind}_tok_s"] = B / nsa * 1e3
            row[f"full_{kind}_tok_s"] = B / fl * 1e3
    row["status"] = "ok"
    return row


def profile_one(B: int, T: int, args, cfg: NSAConfig, device: torch.device, dtype: torch.dtype, steps: int = 5) -> str:
    """torch.profiler over ``steps`` eager steps of what ``CapturedDecodeStep`` captures
    (``append_static`` + ``decode_attend_fast``) on a cache filled to T: the ops and kernels by
    device (or CPU) time, one table."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device=device).manual_seed(B + T)
    capacity = T + 3 * steps + 8
    cache = NSAKVCache.allocate(B, capacity, args.hkv, args.dim, cfg, dtype=dtype, device=device)
    fill_cache(cache, T, gen)
    q = torch.randn(B, args.hq, args.dim, device=device, dtype=dtype, generator=gen)
    g = torch.rand(B, args.hq, 3, device=device, generator=gen).to(dtype)
    fa2 = None if args.fa2 == "none" else "auto"
    select, win = getattr(args, "select", "auto"), getattr(args, "win", "auto")
    k = torch.randn(B, args.hkv, args.dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, args.hkv, args.dim, device=device, dtype=dtype, generator=gen)

    def step():
        append_static(cache, k, v)
        advance_host_lengths(cache, 1)
        return decode_attend_fast(q, g, cache, cfg, fa2=fa2, select=select, win=win)

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)


COLUMNS = ["B", "context", "status", "nsa_eager_ms", "nsa_graph_ms", "nsa_graph_attend_ms", "nsa_call_ms", "full_eager_ms",
           "full_graph_ms", "full_over_nsa_eager", "full_over_nsa_graph", "nsa_eager_tok_s", "nsa_graph_tok_s",
           "full_eager_tok_s", "full_graph_tok_s", "nsa_bytes_per_seq", "full_bytes_per_seq", "cache_gb",
           "max_abs_diff_vs_reference", "paths", "fa2_kernel", "full_impl", "hq", "hkv", "dim", "dtype"]


def plot(rows: list[dict], path: Path) -> None:
    """tokens/s vs context, one panel per B: NSA eager / graph, full eager / graph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    batches = sorted({r["B"] for r in ok})
    fig, axes = plt.subplots(1, max(1, len(batches)), figsize=(5 * max(1, len(batches)), 4), squeeze=False)
    for ax, B in zip(axes[0], batches):
        rs = sorted((r for r in ok if r["B"] == B), key=lambda r: r["context"])
        for key, style in (("nsa_eager_tok_s", "o-"), ("nsa_graph_tok_s", "o--"),
                           ("full_eager_tok_s", "s-"), ("full_graph_tok_s", "s--")):
            pts = [(r["context"], r[key]) for r in rs if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("_tok_s", ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"B = {B}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for decode_bench.csv / .json / .png")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--hq", type=int, default=64)
    parser.add_argument("--hkv", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128, help="Dk = Dv")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--fa2", default="auto", choices=["auto", "none"], help="none: the fast step's torch path")
    parser.add_argument("--select", default="auto", choices=["auto", "triton", "torch"],
                        help="the selection: Triton decode_select where it runs (auto), forced, or the torch ops")
    parser.add_argument("--win", default="auto", choices=["auto", "triton", "fa2", "torch"],
                        help="the window: Triton decode_win where it runs (auto), forced, FA-2's windowed kvcache "
                             "call, or the torch gather")
    parser.add_argument("--mem-limit-gb", type=float, default=60.0)
    parser.add_argument("--no-check", action="store_true", help="skip the first-step comparison with the reference")
    parser.add_argument("--plot", action="store_true", help="also write decode_bench.png (tokens/s vs context)")
    parser.add_argument("--tiny", action="store_true", help="small shapes and config (CPU smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (--device cpu)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: torch.profiler over eager steps (append + attend) per config, the kernels "
                             "that take the time written to profile_B<B>_T<T>.txt")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    cfg = NSAConfig()
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
        cfg = TINY_CFG
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and args.tiny:
        dtype = torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                cfg=repr(cfg), warmup=args.warmup, iters=args.iters, argv=sys.argv[1:] if argv is None else argv)
    log(f"{meta['device']} torch {torch.__version__}; {cfg!r}; B {args.batches} x T {args.contexts}")
    if args.profile:
        for T in args.contexts:
            for B in args.batches:
                text = profile_one(B, T, args, cfg, device, dtype)
                (out / f"profile_B{B}_T{T}.txt").write_text(text)
                print(f"## B={B} T={T}\n{text}")
        return []
    rows = []
    for T in args.contexts:
        for B in args.batches:
            t0 = time.perf_counter()
            try:
                row = bench_one(B, T, args, cfg, device, dtype)
            except Exception as e:  # noqa: BLE001 - one failed config must not stop the sweep
                row = dict(B=B, context=T, status=f"error: {type(e).__name__}: {e}"[:500])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            log(f"B={B} T={T}: {row['status']} nsa {_fmt(row.get('nsa_eager_ms'))} ms eager, "
                f"{_fmt(row.get('nsa_graph_ms'))} ms graph; full {_fmt(row.get('full_eager_ms'))} ms "
                f"({row['seconds']} s)")
            (out / "decode_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    with open(out / "decode_bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + ["seconds"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if args.plot:
        try:
            plot(rows, out / "decode_bench.png")
        except Exception as e:  # noqa: BLE001 - the numbers are written already
            log(f"plot failed: {type(e).__name__}: {e}")
    print(f"# {meta['device']}, {dtype}, Hq {args.hq} / Hkv {args.hkv} / D {args.dim}, {cfg!r}; "
          f"median of {args.iters} after {args.warmup} warm-ups")
    print("| B | context | NSA eager ms | NSA graph ms | NSA call ms | full eager ms | full graph ms | full/NSA eager | "
          "full/NSA graph | NSA tokens/s (graph) | KiB/seq NSA | KiB/seq full | status |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        tok = r.get("nsa_graph_tok_s") or r.get("nsa_eager_tok_s")
        print(f"| {r['B']} | {r['context']} | {_fmt(r.get('nsa_eager_ms'))} | {_fmt(r.get('nsa_graph_ms'))} | "
              f"{_fmt(r.get('nsa_call_ms'))} | "
              f"{_fmt(r.get('full_eager_ms'))} | {_fmt(r.get('full_graph_ms'))} | "
              f"{_fmt(r.get('full_over_nsa_eager'), '.2f')} | {_fmt(r.get('full_over_nsa_graph'), '.2f')} | "
              f"{_fmt(tok, '.0f')} | {_fmt(r.get('nsa_bytes_per_seq') and r['nsa_bytes_per_seq'] / 1024, '.0f')} | "
              f"{_fmt(r.get('full_bytes_per_seq') and r['full_bytes_per_seq'] / 1024, '.0f')} | {r['status']} |")
    print("graph: one CUDA graph replayed (GPU time); call: CapturedDecodeStep.__call__ with its host work; "
          "tokens/s = B / graph step time; KiB/seq: raw + compressed cache bytes per sequence and layer")
    return rows


if __name__ == "__main__":
    main()
