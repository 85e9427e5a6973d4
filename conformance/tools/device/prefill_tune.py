"""Time the prefill Triton kernels under the launch settings they can be tuned by: the numbers
behind ``nsa_ref.triton_kernels.selected.LAUNCH`` and ``scoring.TUNING`` on this GPU.

    python conformance/tools/device/prefill_tune.py --out DIR [--T 8192 65536]

Per T (bf16, Hq 64 / Hkv 4 / D 128, paper config, one sequence; real selections from our own
select_blocks on seeded inputs):

    select   scores split in planes or atomic x scoring warps x stages, top-n chunk x warps
             (``scoring.TUNING``)
    sel_fwd  forward warps x stages (``selected.LAUNCH["fwd"]``)
    sel_bwd  dQ warps, dK/dV warps (forward + backward timed, ``LAUNCH["dq"]`` / ``["dkv"]``)

Each setting is set in the module's dict, the call timed (CUDA events, warm-up, median), and its
output compared with the default setting's (select: fraction of block-list entries that differ;
sel: max abs difference). The defaults are put back after each setting. Writes prefill_tune.csv
and prints the best setting per group beside the default. CUDA only.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

import torch

from conformance.tools.bench import time_cuda


def _inputs(T, hq, hkv, d, cfg):
    from nsa_ref import api

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kc, vc = api.compress(k, cfg)[0], api.compress(v, cfg)[0]
    _, lse = api.cmp_attention(q, kc, vc, cfg, return_lse=True)
    return q, k, v, kc, lse


def _sweep(name, table, key_values, run, compare, reps, warmup):
    """Set each combination in ``table``, time ``run``, compare with the default's output."""
    keys = list(key_values)
    saved = dict(table)
    default = {k: table.get(k) for k in keys}
    ref = run()
    base_ms = time_cuda(lambda: run(), [()], warmup, reps)[0]
    rows = [dict(group=name, setting="default " + str(default), ms=base_ms, diff=0.0)]
    for combo in itertools.product(*(key_values[k] for k in keys)):
        setting = dict(zip(keys, combo))
        if setting == default:
            continue
        table.update(setting)
        try:
            out = run()
            ms = time_cuda(lambda: run(), [()], warmup, reps)[0]
            rows.append(dict(group=name, setting=str(setting), ms=ms, diff=compare(out, ref)))
        except Exception as exc:  # noqa: BLE001 - a setting that does not compile is recorded
            rows.append(dict(group=name, setting=str(setting), ms=float("nan"),
                             diff=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
        finally:
            table.clear()
            table.update(saved)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill_tune: needs CUDA (nothing was timed)")
        return 0
    from nsa_ref.config import NSAConfig
    from nsa_ref.triton_kernels import scoring, selected

    cfg = NSAConfig()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for T in args.T:
        q, k, v, kc, lse = _inputs(T, 64, 4, 128, cfg)
        idx = scoring.select_blocks(q, kc, cfg, lse=lse)
        frac = lambda a, b: float((a != b).float().mean())  # noqa: E731
        maxdiff = lambda a, b: float((a.float() - b.float()).abs().max())  # noqa: E731
        sel_rows = _sweep("select", scoring.TUNING,
                          {"score_split": [True, False], "score_warps": [4, 8], "score_stages": [1, 2, 3, 4]},
                          lambda: scoring.select_blocks(q, kc, cfg, lse=lse), frac, args.reps, args.warmup)
        sel_rows += _sweep("topn", scoring.TUNING, {"topn_chunk": [128, 256, 512, 1024], "topn_warps": [1, 2, 4]},
                           lambda: scoring.select_blocks(q, kc, cfg, lse=lse), frac, args.reps, args.warmup)
        with torch.no_grad():
            sel_rows += _sweep("sel_fwd", selected.LAUNCH["fwd"], {"num_warps": [2, 4, 8], "num_stages": [1, 2, 3, 4]},
                               lambda: selected.sel_attention(q, k, v, idx, cfg), maxdiff, args.reps, args.warmup)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def fwd_bwd():
            o = selected.sel_attention(*leaves, idx, cfg)
            return torch.autograd.grad(o, leaves, torch.ones_like(o))[0]
        sel_rows += _sweep("sel_dq", selected.LAUNCH["dq"], {"num_warps": [2, 4, 8], "num_stages": [1, 2, 3]},
                           fwd_bwd, maxdiff, args.reps, args.warmup)

        def fwd_bwd_dk():
            o = selected.sel_attention(*leaves, idx, cfg)
            return torch.autograd.grad(o, leaves, torch.ones_like(o))[1]
        sel_rows += _sweep("sel_dkv", selected.LAUNCH["dkv"], {"num_warps": [4, 8], "num_stages": [1, 2, 3]},
                           fwd_bwd_dk, maxdiff, args.reps, args.warmup)
        for r in sel_rows:
            r["T"] = T
        rows += sel_rows
        for group in dict.fromkeys(r["group"] for r in sel_rows):
            g = [r for r in sel_rows if r["group"] == group]
            best = min((r for r in g if r["ms"] == r["ms"]), key=lambda r: r["ms"])
            print(f"T={T:6d} {group:8s} default {g[0]['ms']:8.3f} ms   best {best['ms']:8.3f} ms {best['setting']} "
                  f"(diff {best['diff']})", flush=True)
        del q, k, v, kc, lse, idx, leaves
        torch.cuda.empty_cache()
    with (out / "prefill_tune.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["T", "group", "setting", "ms", "diff"])
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
