"""Quick GPU check of the FA-2 layouts on both providers against the fp64 reference.

    python conformance/tools/device/smoke_fa2.py     (on a CUDA machine)

Prints one line per case: relative error of the FA-2 path and of the same reference run in the
input dtype (the precision baseline), and writes smoke.csv to $OUT when set.
"""
from __future__ import annotations

import csv
import os
import sys

import torch

from nsa_ref import fa2, reference
from nsa_ref.compress import compress
from nsa_ref.config import NSAConfig


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def main() -> int:
    if not torch.cuda.is_available():
        print("smoke_fa2: no CUDA device; nothing run.")
        return 0
    cfg = NSAConfig()
    rows = []
    cases = [(1, 2, 2, 128, 128), (31, 4, 2, 128, 128), (97, 8, 2, 64, 64), (1025, 32, 2, 128, 128),
             (4099, 8, 2, 192, 128), (1025, 4, 1, 96, 96), (300, 2, 2, 59, 59)]
    for name in fa2.available_providers():
        prov = fa2.get_provider(name)
        for T, hq, hkv, dk, dv in cases:
            g = torch.Generator(device="cuda").manual_seed(T)
            q = torch.randn(T, hq, dk, device="cuda", generator=g, dtype=torch.float64)
            k = torch.randn(T, hkv, dk, device="cuda", generator=g, dtype=torch.float64)
            v = torch.randn(T, hkv, dv, device="cuda", generator=g, dtype=torch.float64)
            kc, vc = compress(k, cfg)[0], compress(v, cfg)[0]
            for dtype in (torch.bfloat16, torch.float16):
                lo = [x.to(dtype) for x in (q, k, v, kc, vc)]
                for branch in ("win", "cmp"):
                    try:
                        if branch == "win":
                            out = fa2.win_attention(lo[0], lo[1], lo[2], cfg, provider=prov)
                            ref = reference.win_attention(q, k, v, cfg)
                            base = reference.win_attention(lo[0], lo[1], lo[2], cfg)
                        else:
                            out = fa2.cmp_attention(lo[0], lo[3], lo[4], cfg, provider=prov)[0]
                            ref = reference.cmp_attention(q, kc, vc, cfg)[0]
                            base = reference.cmp_attention(lo[0], lo[3], lo[4], cfg)[0]
                        torch.cuda.synchronize()
                        r = dict(provider=name, branch=branch, T=T, hq=hq, hkv=hkv, dk=dk, dv=dv,
                                 dtype=str(dtype)[6:], rel_err=rel(out, ref), base_rel_err=rel(base, ref),
                                 finite=bool(torch.isfinite(out).all()), status="ok")
                    except Exception as exc:
                        r = dict(provider=name, branch=branch, T=T, hq=hq, hkv=hkv, dk=dk, dv=dv,
                                 dtype=str(dtype)[6:], rel_err="", base_rel_err="", finite="",
                                 status=f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                    rows.append(r)
                    print(" ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "smoke.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    bad = [r for r in rows if r["status"] != "ok" or not r["finite"] or r["rel_err"] > 3 * r["base_rel_err"] + 1e-4]
    print(f"smoke_fa2: {len(rows) - len(bad)} ok, {len(bad)} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
