"""Time each kernel of the fast decode step alone, under the settings it can be tuned by: the
numbers behind the defaults of ``nsa_ref.triton_kernels.decode_select`` / ``decode_sel`` and the
window's path (``decode_fast.win_branch_fast``).

    python conformance/tools/device/decode_tune.py --out DIR [--batches 16 64] [--contexts 65536]

Per (B, T) on a preallocated cache filled to T (bf16, Hq 64 / Hkv 4 / D 128, paper config):

    win      Triton ``decode_win`` at split targets (programs per SM) vs FA-2's windowed kvcache call
    cmp      FA-2 kvcache over the compressed cache at ``num_splits`` 0 (FA-2's heuristic), 1, 2, 4, 8
    select   Triton ``decode_select`` at CMP_TILE 64 / 128 / 256 and split targets, then warps / stages
    sel      Triton ``decode_sel`` at split targets; ``decode_sel_win`` (sel + win + gates) at warps / stages

CUDA events around a CUDA graph of 20 launches (the way the step runs), warm-up, median of
``--iters`` replays, each setting checked against the default
setting's output (max abs difference; block lists: fraction of entries that differ). Writes
decode_tune.csv / .json and prints a table. CUDA only.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch


def median_ms(fn, warmup: int, iters: int, per_graph: int = 20) -> float:
    """fn's launches captured ``per_graph`` times in one CUDA graph, replayed: median ms per fn call.
    (Timing fn eagerly would time the host: a Triton launch's Python costs more than these kernels.)"""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per_graph)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[65536])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_tune: needs CUDA (it times GPU kernels); nothing to do here", file=sys.stderr)
        return []
    from flash_attn import flash_attn_with_kvcache

    sys.path.insert(0, str(Path(__file__).parent))
    from decode_bench import fill_cache

    from nsa_ref import NSAConfig
    from nsa_ref.decode_torch_path import cmp_width
    from nsa_ref.decode_kvcache_calls import cmp_call, win_call
    from nsa_ref.kv_cache import NSAKVCache
    from nsa_ref.triton_kernels import decode_sel as dsel
    from nsa_ref.triton_kernels import decode_select as dselect
    from nsa_ref.triton_kernels.layout import sm_count

    cfg, dev, dt = NSAConfig(), torch.device("cuda"), torch.bfloat16
    sms = sm_count(torch.cuda.current_device())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def add(B, T, kernel, setting, ms, diff):
        rows.append(dict(B=B, context=T, kernel=kernel, setting=setting, ms=round(ms, 4), diff=diff))
        print(f"B={B:3d} T={T:6d} {kernel:7s} {setting:28s} {ms * 1e3:9.1f} us  diff {diff}", flush=True)

    for T in args.contexts:
        for B in args.batches:
            gen = torch.Generator(device=dev).manual_seed(B + T)
            cache = NSAKVCache.allocate(B, T + 8, 4, 128, cfg, dtype=dt, device=dev)
            fill_cache(cache, T, gen)
            raw, cmp = cache.views()
            q = torch.randn(B, 64, 128, device=dev, dtype=dt, generator=gen)
            q1 = q[:, None]
            seqlens = raw.cache_seqlens
            # win
            base = flash_attn_with_kvcache(**win_call(q1, raw, cfg))[:, 0]
            add(B, T, "win", "fa2 kvcache window", median_ms(lambda: flash_attn_with_kvcache(**win_call(q1, raw, cfg)),
                                                         args.warmup, args.iters), 0.0)
            for per_sm in (None, 1, 2, 4, 8):
                dsel.TUNING["split_programs"] = None if per_sm is None else per_sm * sms
                got = dsel.decode_win(q, raw, seqlens, cfg)
                ms = median_ms(lambda: dsel.decode_win(q, raw, seqlens, cfg), args.warmup, args.iters)
                add(B, T, "win", f"triton split target {per_sm or 'default'}/SM", ms,
                    round(float((got.float() - base.float()).abs().max()), 5))
            dsel.TUNING["split_programs"] = None
            # cmp
            call = dict(cmp_call(q1, cmp, cfg), return_softmax_lse=True)
            base_o, base_lse = flash_attn_with_kvcache(**call)[:2]
            for ns in (0, 1, 2, 4, 8):
                o, _ = flash_attn_with_kvcache(**dict(call, num_splits=ns))[:2]
                ms = median_ms(lambda: flash_attn_with_kvcache(**dict(call, num_splits=ns)), args.warmup, args.iters)
                add(B, T, "cmp", f"fa2 num_splits={ns}", ms, round(float((o.float() - base_o.float()).abs().max()), 5))
            lse = base_lse[..., 0]
            width = cmp_width(raw, cmp, cfg)
            num_sel = cfg.num_sel_blocks(raw.capacity)
            # select
            ref_idx = dselect.decode_select(q, cmp, seqlens, cfg, width=width, lse=lse, num_sel=num_sel)
            for tile in (64, 128, 256):
                for per_sm in (None, 4, 8):
                    dselect.CMP_TILE = tile
                    dselect.TUNING["split_programs"] = None if per_sm is None else per_sm * sms
                    idx = dselect.decode_select(q, cmp, seqlens, cfg, width=width, lse=lse, num_sel=num_sel)
                    ms = median_ms(lambda: dselect.decode_select(q, cmp, seqlens, cfg, width=width, lse=lse,
                                                                 num_sel=num_sel), args.warmup, args.iters)
                    add(B, T, "select", f"tile {tile} split {per_sm or 'default'}/SM", ms,
                        round(float((idx != ref_idx).float().mean()), 5))
            dselect.CMP_TILE, dselect.TUNING["split_programs"] = 64, None
            for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (2, 3)):
                dselect.TUNING.update(num_warps=warps, num_stages=stages)
                idx = dselect.decode_select(q, cmp, seqlens, cfg, width=width, lse=lse, num_sel=num_sel)
                ms = median_ms(lambda: dselect.decode_select(q, cmp, seqlens, cfg, width=width, lse=lse,
                                                             num_sel=num_sel), args.warmup, args.iters)
                add(B, T, "select", f"warps {warps} stages {stages}", ms, round(float((idx != ref_idx).float().mean()), 5))
            dselect.TUNING.update(num_warps=4, num_stages=2)
            # sel
            base = dsel.decode_sel(q, raw, seqlens, ref_idx, cfg)
            for per_sm in (None, 1, 4, 8):
                dsel.TUNING["split_programs"] = None if per_sm is None else per_sm * sms
                got = dsel.decode_sel(q, raw, seqlens, ref_idx, cfg)
                ms = median_ms(lambda: dsel.decode_sel(q, raw, seqlens, ref_idx, cfg), args.warmup, args.iters)
                add(B, T, "sel", f"triton split target {per_sm or 'default'}/SM", ms,
                    round(float((got.float() - base.float()).abs().max()), 5))
            dsel.TUNING["split_programs"] = None
            gates = torch.rand(B, 64, 3, device=dev, dtype=dt, generator=gen)
            for warps, stages in ((4, 2), (4, 3), (8, 2), (2, 2)):
                dsel.TUNING.update(num_warps=warps, num_stages=stages)
                ms = median_ms(lambda: dsel.decode_sel_win(q, raw, seqlens, ref_idx, q, gates, cfg), args.warmup, args.iters)
                add(B, T, "sel+win", f"warps {warps} stages {stages}", ms, 0.0)
            dsel.TUNING.update(num_warps=4, num_stages=2)
            del cache
            torch.cuda.empty_cache()
    with open(out / "decode_tune.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "decode_tune.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                          sms=sms, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
