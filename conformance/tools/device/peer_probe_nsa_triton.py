"""GPU probe: native-sparse-attention-triton (Xunhao Lai) through ``conformance.adapters.nsa_triton``
against ``conformance.brute`` (fp64 truth, bf16 baseline); prints one table, writes JSON.

On the lent GPU, from the repository root, with
carry [".device-wheels", ".peers/native-sparse-attention-triton"]::

    mkdir -p /tmp/site && tar -xJf .device-wheels/flash_attn-*.tar.xz -C /tmp/site &&
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device-wheels/*.whl &&
    PYTHONPATH=/tmp/site:$PWD/.peers/native-sparse-attention-triton:$PWD \\
      python3 conformance/tools/device/peer_probe_nsa_triton.py --out "$OUT"

(``.peers/native-sparse-attention-triton`` is a ``git archive`` of the upstream repository, kept out
of git; einops comes from .device-wheels.) Dry run of this script on a CPU (the library's torch
references instead of its Triton kernels): ``... peer_probe_nsa_triton.py --device cpu --quick``.

Every case runs in its own try/except: an exception is a row ("ERROR ..."), never the end of the
run. Columns: ``err`` = max|impl - fp64 brute|, ``base`` = max|bf16 brute - fp64 brute| (the
suite's baseline: same math in bf16), ``flag`` = DIFF when err > 2 * base + 1e-2 (a semantic
difference, not rounding), NaN when the output is not finite.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.getcwd())

from conformance import brute  # noqa: E402
from conformance.adapters import nsa_triton as X  # noqa: E402
from nsa_ref import NSAConfig  # noqa: E402

ROWS: list[dict] = []


def emit(case: str, slot: str, **cols) -> None:
    row = dict(case=case, slot=slot, **cols)
    ROWS.append(row)
    shown = "  ".join(f"{k}={v}" for k, v in cols.items())
    print(f"{case:44s} {slot:9s} {shown}", flush=True)


def run(case: str, slot: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        cols = fn() or {}
    except Exception as exc:  # noqa: BLE001 - a failing case is a row
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        cols = {"flag": "ERROR", "error": f"{type(exc).__name__}: {first}"}
        if os.environ.get("PROBE_TRACEBACK"):
            traceback.print_exc()
    cols["s"] = f"{time.perf_counter() - t0:.1f}"
    emit(case, slot, **cols)


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach().double().cpu() - ref.detach().double().cpu()).abs().max()) if ref.numel() else 0.0


def compare(out, truth, base) -> dict:
    out = out.detach().cpu()
    if out.shape != truth.shape:
        return {"flag": "SHAPE", "got": tuple(out.shape), "want": tuple(truth.shape)}
    bad = int((~torch.isfinite(out.double())).sum())
    if bad:
        return {"flag": "NaN", "nonfinite": bad, "of": out.numel()}
    err, b = _err(out, truth), _err(base, truth)
    return {"err": f"{err:.2e}", "base": f"{b:.2e}", "flag": "DIFF" if err > 2 * b + 1e-2 else "ok"}


def inputs(lengths, hq, hkv, dk, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q = torch.randn(T, hq, dk, generator=g, dtype=torch.float64)
    k = torch.randn(T, hkv, dk, generator=g, dtype=torch.float64)
    v = torch.randn(T, hkv, dv, generator=g, dtype=torch.float64)
    gates = torch.rand(T, hq, 3, generator=g, dtype=torch.float64)
    cu = (torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
          if len(lengths) > 1 else None)
    # bf16-representable values, so the fp64 truth and the bf16 kernel see the same numbers
    return [t.bfloat16().double() for t in (q, k, v, gates)] + [cu]


def classify_select(idx, ref, scores, cu, lsel):
    """Rows (t, kv) where the block sets differ, split by why."""
    idx = idx.cpu()
    out = {"rows_differ": 0, "zero_score_tie": 0, "near_tie": 0, "other": 0}
    starts = [0] if cu is None else cu.tolist()[:-1]
    per_seq = []
    for b, sc in enumerate(scores):
        for t in range(sc.shape[0]):
            per_seq.append((starts[b] + t, t, sc[t]))
    example = None
    for row, t_local, sc in per_seq:
        for kv in range(idx.shape[1]):
            a = {int(j) for j in idx[row, kv].tolist() if j >= 0}
            r = {int(j) for j in ref[row, kv].tolist() if j >= 0}
            if a == r:
                continue
            out["rows_differ"] += 1
            missing, extra = r - a, a - r
            s_missing = [float(sc[kv, j]) for j in missing]
            s_extra = [float(sc[kv, j]) if j < sc.shape[-1] else float("nan") for j in extra]
            if missing and all(s == 0.0 for s in s_missing):
                out["zero_score_tie"] += 1
            elif s_extra and s_missing and min(s_missing) - max(s_extra) <= 2e-2 * max(1.0, max(s_missing)):
                out["near_tie"] += 1
            else:
                out["other"] += 1
                if example is None:
                    example = f"t={t_local} kv={kv} impl={sorted(a)} brute={sorted(r)}"
            if example is None and out["zero_score_tie"] == 1:
                example = f"t={t_local} kv={kv} impl={sorted(a)} brute={sorted(r)} (zero-score block dropped)"
    out["flag"] = "ok" if out["other"] == 0 and out["zero_score_tie"] == 0 else "DIFF"
    if example:
        out["example"] = example
    return out


def slot_cases(dev, dt, quick: bool) -> None:
    paper = NSAConfig()
    cfgs = {
        "paper 32/16/64 n16 w512": paper,
        "tied64 n16 w512": NSAConfig(block_len=64, block_stride=64, sel_block=64, n_sel=16, window=512),
        "16/8/32 n4 w20 scale.2": NSAConfig(block_len=16, block_stride=8, sel_block=32, n_sel=4, window=20, scale=0.2),
        "32/16/64 n4 init1 local0 w7": NSAConfig(n_sel=4, n_init=1, n_local=0, window=7),
        "tied32 n3 init0 local1 w33": NSAConfig(block_len=32, block_stride=32, sel_block=32, n_sel=3, n_init=0,
                                                n_local=1, window=33),
    }
    shapes = [((300,), 8, 2, 64, 64), ((1, 31, 0, 130, 257), 4, 2, 24, 16), ((1025,), 16, 1, 128, 128)]
    long_cfgs = ("paper 32/16/64 n16 w512", "tied64 n16 w512")  # T = 1025 (brute: ~30 s each)
    for cname, cfg in cfgs.items():
        for lengths, hq, hkv, dk, dv in shapes:
            if quick and cname not in ("paper 32/16/64 n16 w512", "32/16/64 n4 init1 local0 w7"):
                continue
            if sum(lengths) > 1000 and (quick or cname not in long_cfgs):
                continue
            case = f"{cname} L={list(lengths)} {hq}/{hkv} D{dk}/{dv}"
            try:
                q, k, v, gates, cu = inputs(lengths, hq, hkv, dk, dv)
                truth, P = brute.nsa_attention(q, k, v, gates, cfg, cu, return_parts=True)
                lo = [t.to(torch.bfloat16) for t in (q, k, v, gates)]
                base, Pb = brute.nsa_attention(*lo, cfg, cu, return_parts=True)
            except Exception as exc:  # noqa: BLE001
                emit(case, "brute", flag="ERROR", error=f"{type(exc).__name__}: {exc}")
                continue
            qd, kd, vd, gd = (t.to(dev, dt) for t in (q, k, v, gates))
            cud = None if cu is None else cu.to(dev)
            kc, vc = P["k_cmp"].to(dev, dt), P["v_cmp"].to(dev, dt)

            run(case, "compress", lambda: compare(X.compress(kd, cfg, cud)[0], P["k_cmp"], Pb["k_cmp"]))

            def cmp_case():
                res = X.cmp_attention(qd, kc, vc, cfg, cud)
                out, lse = (res if isinstance(res, tuple) else (res, None))
                cols = compare(out, P["cmp"], Pb["cmp"])
                if lse is not None:
                    ref = P["lse"]
                    fin = torch.isfinite(ref)
                    lse = lse.detach().cpu().double()
                    cols["lse_err"] = f"{_err(lse[fin], ref[fin]):.2e}"
                    cols["lse_inf_rows_ok"] = bool((lse[~fin] == float("-inf")).all())
                return cols
            run(case, "cmp", cmp_case)

            def select_case():
                idx = X.select_blocks(qd, kc, cfg, cud)
                scores = brute.selection_scores(q, P["k_cmp"], cfg, cu)
                return classify_select(idx, P["block_idx"], scores, cu, cfg.sel_block)
            run(case, "select", select_case)
            run(case, "sel", lambda: compare(X.sel_attention(qd, kd, vd, P["block_idx"].to(dev), cfg, cud),
                                              P["sel"], Pb["sel"]))
            run(case, "win", lambda: compare(X.win_attention(qd, kd, vd, cfg, cud), P["win"], Pb["win"]))
            def nsa_case():
                out = X.nsa_attention(qd, kd, vd, gd, cfg, cud)
                cols = compare(out, truth, base)
                if "err" in cols:  # is the whole difference the window's w + 1 keys?
                    w1 = NSAConfig(**{**cfg.model_dump(), "window": cfg.window + 1})
                    cols["err_vs_brute_w+1"] = f"{_err(out, brute.nsa_attention(q, k, v, gates, w1, cu)):.2e}"
                return cols
            run(case, "nsa", nsa_case)


def edge_cases(dev, dt) -> None:
    paper = NSAConfig()

    # E1: every sequence shorter than l (T < l): compression has no block
    for T in (1, 31):
        q, k, v, gates, _ = inputs((T,), 4, 2, 64, 64)
        truth = brute.nsa_attention(q, k, v, gates, paper)
        qd, kd, vd, gd = (t.to(dev, dt) for t in (q, k, v, gates))
        run(f"E1 T={T} < l=32 (no cmp block)", "compress", lambda: {"Tc": tuple(X.compress(kd, paper)[0].shape)})
        run(f"E1 T={T} < l=32 (no cmp block)", "nsa", lambda: compare(X.nsa_attention(qd, kd, vd, gd, paper), truth,
                                                                     truth))

    # E2: varlen with empty and short sequences, every slot through nsa
    q, k, v, gates, cu = inputs((0, 5, 130, 0, 64), 4, 2, 64, 64)
    truth = brute.nsa_attention(q, k, v, gates, paper, cu)
    base = brute.nsa_attention(*(t.bfloat16() for t in (q, k, v, gates)), paper, cu)
    run("E2 varlen (0,5,130,0,64)", "nsa",
        lambda: compare(X.nsa_attention(*(t.to(dev, dt) for t in (q, k, v, gates)), paper, cu.to(dev)), truth, base))

    # E3: arbitrary block sets incl. future blocks and empty rows (suite: test_sel_any_block_set)
    cfg = NSAConfig(block_len=32, block_stride=16, sel_block=64, n_sel=4, window=8)
    T = 200
    q, k, v, _, _ = inputs((T,), 4, 2, 64, 64)
    g = torch.Generator().manual_seed(7)
    nb = math.ceil(T / 64)
    idx = torch.full((T, 2, 4), -1, dtype=torch.int32)
    for t in range(T):
        for h in range(2):
            c = int(torch.randint(0, min(nb, 4) + 1, (1,), generator=g))
            idx[t, h, :c] = torch.tensor(sorted(torch.randperm(nb, generator=g)[:c].tolist()), dtype=torch.int32)
    truth = brute.sel_attention(q, k, v, idx, cfg)
    base = brute.sel_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), idx, cfg)
    empty = torch.tensor([all(j < 0 or j * 64 > t for j in idx[t, h].tolist()) for t in range(T) for h in range(2)])

    def e3():
        out = X.sel_attention(*(t.to(dev, dt) for t in (q, k, v)), idx.to(dev), cfg).detach().cpu().double()
        cols = {"empty_rows": int(empty.sum())}
        rows = out.view(T, 2, 2, -1)  # (T, Hkv, G, Dv)
        e = empty.view(T, 2)
        cols["empty_rows_nonfinite"] = int((~torch.isfinite(rows[e])).any(-1).any(-1).sum())
        cols["empty_rows_nonzero"] = int((rows[e].nan_to_num(1.0) != 0).any(-1).any(-1).sum())
        ne = ~e
        cols["err_nonempty"] = f"{_err(rows[ne], truth.view(T, 2, 2, -1)[ne]):.2e}"
        cols["base"] = f"{_err(base, truth):.2e}"
        cols["flag"] = "ok" if cols["empty_rows_nonfinite"] == cols["empty_rows_nonzero"] == 0 else "DIFF"
        return cols
    run("E3 sel: random block sets, empty rows", "sel", e3)

    # E4: exact tie (suite: test_select_ties_go_to_lower_index): blocks 1, 2 tie; spec picks 1
    cfg = NSAConfig(block_len=4, block_stride=4, sel_block=4, n_sel=2, n_init=1, n_local=0, window=4)
    u = torch.linspace(-1, 1, 8, dtype=torch.float64)
    qt = u.expand(16, 2, 8).clone()
    kct = torch.stack([0.3 * u.flip(0), u, u, -u]).unsqueeze(1)

    def e4():
        idx = X.select_blocks(qt.to(dev, dt), kct.to(dev, dt), cfg).cpu()
        got = {t: idx[t, 0].tolist() for t in (11, 15)}
        ok = all(v == [0, 1] for v in got.values())
        return {"t11": got[11], "t15": got[15], "spec": [0, 1], "flag": "ok" if ok else "DIFF"}
    run("E4 select: exact tie -> lower index", "select", e4)

    # E5: zero-score current block with n_local = 0 ("fewer candidates than n: take all")
    cfg = NSAConfig(block_len=4, block_stride=4, sel_block=4, n_sel=2, n_init=1, n_local=0, window=4)
    for T in (13, 64):
        q, k, _, _, _ = inputs((T,), 1, 1, 16, 16, seed=0)
        kc, _ = brute.compress(k, cfg)
        ref = brute.select_blocks(q, kc, cfg)
        sc = brute.selection_scores(q, kc, cfg)
        run(f"E5 select: zero-score block c, T={T}", "select",
            lambda: classify_select(X.select_blocks(q.to(dev, dt), kc.to(dev, dt), cfg), ref, sc, None, 4))

    # E6: no compressed block visible at all (suite: test_select_no_visible_block_picks_lowest)
    cfg = NSAConfig(block_len=16, block_stride=4, sel_block=4, n_sel=2, n_init=0, n_local=0, window=4)
    q6 = torch.randn(14, 2, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def e6():
        idx = X.select_blocks(q6.to(dev, dt), torch.zeros(0, 1, 16, device=dev, dtype=dt), cfg).cpu()
        want = [[0, 1] if t // 4 >= 1 else [0, -1] for t in range(14)]
        got = [idx[t, 0].tolist() for t in range(14)]
        bad = [t for t in range(14) if got[t] != want[t]]
        return {"bad_t": bad[:6], "example": (f"t={bad[0]} got {got[bad[0]]} want {want[bad[0]]}" if bad else ""),
                "flag": "ok" if not bad else "DIFF"}
    run("E6 select: all scores 0 (T=14 < l)", "select", e6)

    # E7: window size: w keys (spec) vs w + 1 (flash_attn window_size=(w, -1))
    cfg = NSAConfig(block_len=32, block_stride=16, sel_block=64, n_sel=4, window=7)
    q, k, v, _, _ = inputs((20,), 2, 1, 64, 64)
    cfg8 = NSAConfig(block_len=32, block_stride=16, sel_block=64, n_sel=4, window=8)

    def e7():
        out = X.win_attention(*(t.to(dev, dt) for t in (q, k, v)), cfg).detach().cpu().double()
        return {"err_vs_w": f"{_err(out, brute.win_attention(q, k, v, cfg)):.2e}",
                "err_vs_w+1": f"{_err(out, brute.win_attention(q, k, v, cfg8)):.2e}",
                "path": "flash_attn" if (dev != "cpu" and X._flash_attn_varlen()) else "emulated",
                "flag": "DIFF" if _err(out, brute.win_attention(q, k, v, cfg)) > 1e-2 else "ok"}
    run("E7 win: w=7, T=20", "win", e7)

    # E8: decode window: the module's decode path attends the sliding cache (window_size tokens)
    def e8():
        ops = X._import("native_sparse_attention.ops")
        w, T = 7, 20
        qq, kk, vv, _, _ = inputs((T,), 2, 1, 64, 64)
        qd = qq[T - 1:T].to(dev, dt)                       # (B=1, Hq, D)
        kc = kk[T - w:].unsqueeze(0).to(dev, dt).contiguous()  # (B, w, Hkv, D): the sliding cache
        vc = vv[T - w:].unsqueeze(0).to(dev, dt).contiguous()
        out = ops.flash_attention_decode(qd, kc, vc, torch.tensor([w], dtype=torch.int32, device=dev)).cpu().double()
        pre = X.win_attention(qq.to(dev, dt), kk.to(dev, dt), vv.to(dev, dt),
                              NSAConfig(block_len=32, block_stride=16, sel_block=64, n_sel=4, window=w)).cpu().double()
        ref_w = brute.win_attention(qq, kk, vv, NSAConfig(window=w, n_sel=16))[T - 1]
        return {"decode_vs_prefill": f"{_err(out[0], pre[T - 1]):.2e}",
                "decode_vs_brute_w": f"{_err(out[0], ref_w):.2e}",
                "flag": "DIFF" if _err(out[0], pre[T - 1]) > 1e-2 else "ok"}
    if dev != "cpu":
        run("E8 decode window vs prefill window (w=7)", "win", e8)

    # E9: backward vs fp64 brute autograd (cmp, sel, win)
    cfg = NSAConfig(block_len=32, block_stride=16, sel_block=64, n_sel=4, window=40)
    q, k, v, _, _ = inputs((130,), 4, 2, 64, 64)
    P = brute.nsa_attention(q, k, v, torch.rand(130, 4, 3, dtype=torch.float64), cfg, return_parts=True)[1]
    dout = torch.randn(130, 4, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64).bfloat16().double()

    def grads(fn, tensors, lowp):
        xs = [t.detach().to(dev, dt if lowp else torch.float64).requires_grad_() for t in tensors]
        out = fn(*xs)
        out = out[0] if isinstance(out, tuple) else out
        (out.double() * dout.to(out.device)).sum().backward()
        return [x.grad.detach().cpu().double() for x in xs]

    def gcase(impl_fn, ref_fn, tensors):
        g_impl = grads(impl_fn, tensors, True)
        xs = [t.detach().clone().requires_grad_() for t in tensors]  # fp64 brute on the CPU
        out = ref_fn(*xs)
        out = out[0] if isinstance(out, tuple) else out
        (out * dout).sum().backward()
        g_ref = [x.grad for x in xs]
        cols, worst, finite = {}, 0.0, True
        for name, a, b in zip("qkv", g_impl, g_ref):
            rel = _err(a, b) / (float(b.abs().max()) or 1.0)
            worst = max(worst, rel)
            finite = finite and bool(torch.isfinite(a).all())
            cols[f"d{name}_relerr"] = f"{rel:.2e}"
        cols["flag"] = "NaN" if not finite else ("ok" if worst < 5e-2 else "DIFF")
        return cols
    cfg_w1 = NSAConfig(block_len=32, block_stride=16, sel_block=64, n_sel=4, window=41)  # the library's w + 1 keys
    run("E9 backward cmp (dq, dk_cmp, dv_cmp)", "cmp",
        lambda: gcase(lambda a, b, c: X.cmp_attention(a, b, c, cfg), lambda a, b, c: brute.cmp_attention(a, b, c, cfg),
                      [q, P["k_cmp"], P["v_cmp"]]))
    run("E9 backward sel", "sel",
        lambda: gcase(lambda a, b, c: X.sel_attention(a, b, c, P["block_idx"].to(a.device), cfg),
                      lambda a, b, c: brute.sel_attention(a, b, c, P["block_idx"], cfg), [q, k, v]))
    run("E9 backward win (vs brute with w + 1 keys)", "win",
        lambda: gcase(lambda a, b, c: X.win_attention(a, b, c, cfg),
                      lambda a, b, c: brute.win_attention(a, b, c, cfg_w1), [q, k, v]))

    # E10: the paper's head dims (Dk 192, Dv 128): above the README's 128 limit
    cfg = NSAConfig()
    q, k, v, gates, _ = inputs((300,), 8, 2, 192, 128)
    truth, P = brute.nsa_attention(q, k, v, gates, cfg, return_parts=True)
    base = brute.nsa_attention(*(t.bfloat16() for t in (q, k, v, gates)), cfg)
    run("E10 paper dims Dk=192 Dv=128", "nsa",
        lambda: compare(X.nsa_attention(*(t.to(dev, dt) for t in (q, k, v, gates)), cfg), truth, base))

    # E12: the library's own pipeline with no forced block (n_init = n_local = 0): rows where
    # nothing is visible yet get a row of -1 (future zero-score blocks win the top-k); does the
    # selected branch then return NaN for them?
    cfg = NSAConfig(block_len=32, block_stride=16, sel_block=32, n_sel=1, n_init=0, n_local=0, window=8)
    q, k, v, gates, _ = inputs((100,), 4, 2, 64, 64)
    truth = brute.nsa_attention(q, k, v, gates, cfg)

    def e12():
        kc, _ = brute.compress(k, cfg)
        idx = X.select_blocks(q.to(dev, dt), kc.to(dev, dt), cfg).cpu()
        out = X.nsa_attention(*(t.to(dev, dt) for t in (q, k, v, gates)), cfg).detach().cpu().double()
        rows_nan = int((~torch.isfinite(out)).any(-1).any(-1).sum())
        empty = int((idx < 0).all(-1).any(-1).sum())
        fin = torch.isfinite(out).all(-1).all(-1)
        return {"select_rows_all_-1": empty, "nsa_rows_nonfinite": rows_nan,
                "err_finite_rows": f"{_err(out[fin], truth[fin]):.2e}",
                "flag": "NaN" if rows_nan else ("DIFF" if empty else "ok")}
    run("E12 nsa pipeline n_init=n_local=0, T=100", "nsa", e12)

    # E11: the library's two top-k paths (parallel_topk_compute True / False; False is used above 32K
    # tokens) agree
    def e11():
        ops = X._import("native_sparse_attention.ops")
        T = 4096
        g = torch.Generator().manual_seed(11)
        qq = torch.randn(T, 16, 64, generator=g).to(dev, dt)
        kk = torch.randn(T, 2, 64, generator=g).to(dev, dt)
        kc, cuc = ops.avgpool_compress(kk, None, torch.tensor([0, T], dtype=torch.int32, device=dev), 32, 16, None)
        cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
        res = [ops.compressed_attention(qq, kc, kc, 32, 16, 64, 16, cu, cuc, T, kc.shape[0], None, 1, 2,
                                        parallel_topk_compute=p)[1] for p in (True, False)]
        differ = int((res[0] != res[1]).any(-1).sum())
        return {"rows_differ": differ, "flag": "ok" if differ == 0 else "DIFF"}
    if dev != "cpu":
        run("E11 top-k parallel vs serial path, T=4096", "select", e11)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--quick", action="store_true", help="fewer configs and shapes")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    dev, dt = args.device, {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "device": dev, "dtype": args.dtype}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"unavailable: {exc}"
    env["flash_attn"] = "importable" if X._flash_attn_varlen() else "not importable (window emulated)"
    try:
        env["native_sparse_attention"] = os.path.dirname(X._import("native_sparse_attention").__file__ or "")
    except Exception as exc:  # noqa: BLE001
        env["native_sparse_attention"] = f"unavailable: {exc}"
    reason = X.unavailable_reason(dev)
    env["unavailable"] = reason
    print(json.dumps(env, indent=1), flush=True)
    for slot in X.__all__[3:]:
        caps = getattr(X, slot).capabilities(dev)
        print(f"capabilities {slot}: {caps.summary()}", flush=True)
    if reason:
        print("cannot run:", reason)
        return 2
    print(f"\n{'case':44s} {'slot':9s} columns", flush=True)
    t0 = time.perf_counter()
    slot_cases(dev, dt, args.quick)
    edge_cases(dev, dt)
    flags = {}
    for r in ROWS:
        flags[r.get("flag", "?")] = flags.get(r.get("flag", "?"), 0) + 1
    print(f"\n{len(ROWS)} rows in {time.perf_counter() - t0:.0f} s: {flags}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "peer_probe_nsa_triton.json"), "w") as fh:
            json.dump({"env": env, "rows": ROWS}, fh, indent=1, default=str)
        print("wrote", os.path.join(args.out, "peer_probe_nsa_triton.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
