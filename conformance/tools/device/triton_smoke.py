"""GPU check and timing of the Triton selection kernels (issue: selection fast path).

    python conformance/tools/device/triton_smoke.py [--sizes 16384,65536] [--skip-check]

1. Checks, fresh random inputs per case, against the fp64 reference: ``select_blocks`` (block sets
   equal, or differing only where the reference's scores tie within the dtype's rounding),
   ``sel_attention`` forward and backward (relative error), for G in {1, 4, 16}, head dims
   64/128/192 (dv 128), varlen with an empty sequence, bf16/fp16/fp32.
2. Times with CUDA events (triton.testing.do_bench, median), bf16, Hq 64 / Hkv 4 / D 128,
   n 16, l' 64: cmp (FA-2), scoring+top-n, sel fwd, sel fwd+bwd, full NSA fwd (and fwd+bwd) on
   the triton path, and full causal FA-2 fwd / fwd+bwd in the same run, plus FLOP and byte counts.
Writes triton_check.csv and triton_timing.csv to $OUT; prints a table last.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _near_tie_ok(idx, ref_idx, q, kc, cfg, cu, tol):
    """Mismatched rows are fine when the reference's scores of the differing blocks are within tol."""
    from nsa_ref import selection
    bad = (idx != ref_idx).any(-1)  # (T, Hkv)
    if not bad.any():
        return True, 0
    rows = bad.any(-1).nonzero().flatten().tolist()
    p = selection.cmp_probabilities(q.double(), kc.double(), cfg, cu)  # (T, Hq, Tc_max)
    nb = max(cfg.num_sel_blocks(int(x)) for x in (cu.diff().tolist() if cu is not None else [q.shape[0]]))
    sc = selection.block_scores(p, kc.shape[1], nb, cfg)
    worst = 0.0
    for r in rows[:200]:
        for h in bad[r].nonzero().flatten().tolist():
            a = set(idx[r, h].tolist()) - {-1}
            b = set(ref_idx[r, h].tolist()) - {-1}
            diff = [j for j in a ^ b]
            vals = sc[r, h, diff]
            kth = sc[r, h, sorted(b)].min()
            worst = max(worst, (vals - kth).abs().max().item())
    return worst <= tol, len(rows)


def check(rows):
    from nsa_ref import NSAConfig, reference, selection
    from nsa_ref.compress import compress
    from nsa_ref.triton_kernels import scoring, selected
    cfg = NSAConfig()
    cases = [([1000], 16, 1, 64, 64), ([2111], 16, 4, 128, 128), ([1500, 0, 777], 64, 4, 192, 128),
             ([4097], 8, 2, 128, 128), ([63, 64, 65], 4, 4, 64, 64)]
    for lens, hq, hkv, dk, dv in cases:
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32) if len(lens) > 1 else None
        T = sum(lens)
        for dtype in (torch.bfloat16, torch.float16) + ((torch.float32,) if T <= 1000 else ()):
            torch.manual_seed(T + hq + dk)
            q = torch.randn(T, hq, dk, device="cuda", dtype=torch.float64)
            k = torch.randn(T, hkv, dk, device="cuda", dtype=torch.float64)
            v = torch.randn(T, hkv, dv, device="cuda", dtype=torch.float64)
            lo = [x.to(dtype) for x in (q, k, v)]
            kc, _ = compress(lo[1], cfg, cu)
            t0 = time.perf_counter()
            idx = scoring.select_blocks(lo[0], kc, cfg, cu)
            ref_idx = selection.select_blocks(lo[0], kc, cfg, cu)
            tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
            ok_sel, n_bad = _near_tie_ok(idx, ref_idx, lo[0], kc, cfg, cu, tol)
            qg, kg, vg = (x.clone().requires_grad_() for x in lo)
            out = selected.sel_attention(qg, kg, vg, ref_idx, cfg, cu)
            do = torch.randn_like(out)
            grads = torch.autograd.grad(out, (qg, kg, vg), do)
            qd, kd, vd = (x.detach().double().requires_grad_() for x in lo)
            ref = reference.sel_attention(qd, kd, vd, ref_idx, cfg, cu)
            rgrads = torch.autograd.grad(ref, (qd, kd, vd), do.double())
            row = dict(lens="+".join(map(str, lens)), hq=hq, hkv=hkv, dk=dk, dv=dv, dtype=str(dtype).split(".")[-1],
                       select_ok=ok_sel, select_rows_differing=n_bad, out_rel=rel(out, ref),
                       dq_rel=rel(grads[0], rgrads[0]), dk_rel=rel(grads[1], rgrads[1]), dv_rel=rel(grads[2], rgrads[2]),
                       nan=any(torch.isnan(x).any().item() for x in (out, *grads)), seconds=round(time.perf_counter() - t0, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)


def variants(rows):
    """Launch variants at 64K (bf16, Hq 64 / Hkv 4 / D 128): selected-attention forward by warp
    count, and the scoring pieces on their own (lse pass, score kernel without the top-n)."""
    import triton.testing as tt
    from nsa_ref import NSAConfig
    from nsa_ref.compress import compress
    from nsa_ref.triton_kernels import scoring, selected
    cfg = NSAConfig()
    base = dict(selected.LAUNCH["fwd"])
    T, hq, hkv, d = 65536, 64, 4, 128
    torch.manual_seed(T)
    q = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16)
    kc, _ = compress(k, cfg)
    lse = scoring.cmp_lse(q, kc, cfg)
    idx = scoring.select_blocks(q, kc, cfg, lse=lse)
    ms = lambda fn: tt.do_bench(fn, warmup=50, rep=200, return_mode="median")  # noqa: E731
    rows.append(dict(T=T, work="cmp_lse_triton", ms=round(ms(lambda: scoring.cmp_lse(q, kc, cfg)), 3)))
    rows.append(dict(T=T, work="slc_scores_only", ms=round(ms(lambda: scoring.block_scores(q, kc, cfg, lse=lse)), 3)))
    rows.append(dict(T=T, work="select_with_lse", ms=round(ms(lambda: scoring.select_blocks(q, kc, cfg, lse=lse)), 3)))
    for w, st in ((2, None), (4, None), (8, None), (4, 1), (4, 2), (4, 3), (4, 4)):
        selected.LAUNCH["fwd"] = dict(num_warps=w) if st is None else dict(num_warps=w, num_stages=st)
        rows.append(dict(T=T, work=f"sel_fwd_warps{w}_stages{st or 'default'}",
                         ms=round(ms(lambda: selected.sel_attention(q, k, v, idx, cfg)), 3)))
    selected.LAUNCH["fwd"] = base
    tuning = dict(scoring.TUNING)
    for key, values in (("score_warps", (4, 8)), ("score_stages", (2, 3, 4)), ("topn_chunk", (128, 256, 512, 1024)),
                        ("topn_warps", (1, 2, 4, 8))):
        for val in values:
            scoring.TUNING.update(tuning)
            scoring.TUNING[key] = val
            rows.append(dict(T=T, work=f"select_{key}{val}", ms=round(ms(lambda: scoring.select_blocks(q, kc, cfg, lse=lse)), 3)))
    scoring.TUNING.update(tuning)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    lb = {key: dict(val) for key, val in selected.LAUNCH.items()}
    for part, w in (("dq", 2), ("dq", 8), ("dkv", 2), ("dkv", 8), ("dq", 4)):
        selected.LAUNCH.update({key: dict(val) for key, val in lb.items()})
        selected.LAUNCH[part] = dict(num_warps=w)

        def fb():
            torch.autograd.backward(selected.sel_attention(qg, kg, vg, idx, cfg), do)
        rows.append(dict(T=T, work=f"sel_fwd_bwd_{part}_warps{w}", ms=round(ms(fb), 3)))
    selected.LAUNCH.update(lb)
    for r in rows:
        print(json.dumps(r), flush=True)


def bench(sizes, rows):
    import triton.testing as tt
    from nsa_ref import NSAConfig, fa2
    from nsa_ref.api import combine_branches
    from nsa_ref.compress import compress
    from nsa_ref.triton_kernels import scoring, selected
    cfg = NSAConfig()
    prov = fa2.get_provider("flash_attn") if "flash_attn" in fa2.available_providers() else fa2.get_provider("torch")
    hq, hkv, d = 64, 4, 128

    def ms(fn, rep=200):
        return tt.do_bench(fn, warmup=50, rep=rep, return_mode="median")

    for T in sizes:
        torch.manual_seed(T)
        q = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16)
        gates = torch.rand(T, hq, 3, device="cuda", dtype=torch.bfloat16)
        kc, _ = compress(k, cfg)
        vc, _ = compress(v, cfg)
        o_cmp, lse = fa2.cmp_attention(q, kc, vc, cfg, provider=prov)
        idx = scoring.select_blocks(q, kc, cfg, lse=lse)

        def nsa_fwd():
            kc_, _ = compress(k, cfg)
            vc_, _ = compress(v, cfg)
            oc, ls = fa2.cmp_attention(q, kc_, vc_, cfg, provider=prov)
            bi = scoring.select_blocks(q, kc_, cfg, lse=ls)
            os_ = selected.sel_attention(q, k, v, bi, cfg)
            ow = fa2.win_attention(q, k, v, cfg, provider=prov)
            return combine_branches(gates, oc, os_, ow)

        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        do = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16)

        def sel_fb():
            o = selected.sel_attention(qg, kg, vg, idx, cfg)
            torch.autograd.backward(o, do)

        def nsa_fb():
            kc_, _ = compress(kg, cfg)
            vc_, _ = compress(vg, cfg)
            oc, ls = fa2.cmp_attention(qg, kc_, vc_, cfg, provider=prov)
            bi = scoring.select_blocks(qg.detach(), kc_.detach(), cfg, lse=ls.detach())
            os_ = selected.sel_attention(qg, kg, vg, bi, cfg)
            ow = fa2.win_attention(qg, kg, vg, cfg, provider=prov)
            torch.autograd.backward(combine_branches(gates, oc, os_, ow), do)

        scale = d ** -0.5
        q4, k4, v4 = q[None], k[None], v[None]

        def full_fwd():
            return prov.dense(q4, k4, v4, causal=True, window=(-1, -1), scale=scale)

        qf, kf, vf = (x.clone().requires_grad_() for x in (q4, k4, v4))

        def full_fb():
            o, _ = prov.dense(qf, kf, vf, causal=True, window=(-1, -1), scale=scale)
            torch.autograd.backward(o, do[None])

        t_sel = ms(lambda: selected.sel_attention(q, k, v, idx, cfg))
        t_score = ms(lambda: scoring.select_blocks(q, kc, cfg, lse=lse))
        t_cmp = ms(lambda: fa2.cmp_attention(q, kc, vc, cfg, provider=prov))
        t_win = ms(lambda: fa2.win_attention(q, k, v, cfg, provider=prov))
        t_full = ms(full_fwd)
        t_nsa = ms(nsa_fwd)
        t_sel_fb = ms(sel_fb, rep=300)
        t_full_fb = ms(full_fb, rep=300)
        t_nsa_fb = ms(nsa_fb, rep=300)
        n, lp = cfg.n_sel, cfg.sel_block
        sel_flop = 4.0 * T * hq * n * lp * d  # QK^T + PV over n*l' keys (upper bound: last block partial)
        sel_bytes = 2.0 * (T * hq * d * 2 + T * hkv * n * lp * d * 2)  # q, o once; K/V of each (t, kv head) walk
        tc = kc.shape[0]
        score_flop = 2.0 * T * hq * d * tc / 2  # causal half of q.k_cmp
        full_flop = 4.0 * T * T * hq * d / 2
        for name, t_ms, flop in (("cmp_fa2_fwd", t_cmp, None), ("win_fa2_fwd", t_win, None),
                                 ("select_triton", t_score, score_flop), ("sel_triton_fwd", t_sel, sel_flop),
                                 ("sel_triton_fwd_bwd", t_sel_fb, sel_flop * 3.5), ("nsa_triton_fwd", t_nsa, None),
                                 ("nsa_triton_fwd_bwd", t_nsa_fb, None), ("full_causal_fa2_fwd", t_full, full_flop),
                                 ("full_causal_fa2_fwd_bwd", t_full_fb, full_flop * 3.5)):
            row = dict(T=T, work=name, ms=round(t_ms, 3), tflops=round(flop / t_ms / 1e9, 1) if flop else "",
                       gbps=round(sel_bytes / t_ms / 1e6, 1) if name == "sel_triton_fwd" else "")
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows.append(dict(T=T, work="speedup_nsa_fwd_vs_full", ms="", tflops="", gbps="", ratio=round(t_full / t_nsa, 2)))
        rows.append(dict(T=T, work="speedup_nsa_fwd_bwd_vs_full", ms="", tflops="", gbps="", ratio=round(t_full_fb / t_nsa_fb, 2)))
        del qg, kg, vg, qf, kf, vf
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16384,65536")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--variants", action="store_true", help="also time launch variants (writes triton_variants.csv)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_smoke: no CUDA device; nothing run.")
        return 0
    out = os.environ.get("OUT", ".")
    checks, timings = [], []
    if not a.skip_check:
        check(checks)
        _write(os.path.join(out, "triton_check.csv"), checks)
    var = []
    if a.variants:
        variants(var)
        _write(os.path.join(out, "triton_variants.csv"), var)
    if not a.skip_bench:
        bench([int(x) for x in a.sizes.split(",") if x], timings)
        _write(os.path.join(out, "triton_timing.csv"), timings)
    print("\n== checks ==")
    for r in checks:
        print(f"{r['lens']:>14} hq{r['hq']:>3} hkv{r['hkv']} d{r['dk']}/{r['dv']} {r['dtype']:>8} select_ok={r['select_ok']!s:5} "
              f"out={r['out_rel']:.1e} dq={r['dq_rel']:.1e} dk={r['dk_rel']:.1e} dv={r['dv_rel']:.1e} nan={r['nan']}")
    print("\n== variants ==")
    for r in var:
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print("\n== timings (ms, median) ==")
    for r in timings:
        print(f"T={r['T']:>6} {r['work']:>28} {r['ms']!s:>9} ms  {r.get('tflops', '')!s:>6} TFLOP/s  {r.get('gbps', '')!s:>7} GB/s {r.get('ratio', '')}")
    bad = [r for r in checks if not r["select_ok"] or r["nan"] or r["out_rel"] > 2e-2]
    return 1 if bad else 0


def _write(path, rows):
    if not rows:
        return
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
