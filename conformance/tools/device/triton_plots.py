"""Plots for the Triton selection artifacts (reads the CSVs triton_smoke.py and the sweep wrote).

    python conformance/tools/device/triton_plots.py artifacts/2026-11-25/triton_sel

Writes nsa_fwd_breakdown_64k.png (where the NSA forward's time goes, beside full causal FA-2)
and speedup_triton.png (Triton over the previous default path, by T, from bench_sweep.csv).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def breakdown(folder: Path, T: int = 65536) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = {r["work"]: float(r["ms"]) for r in _rows(folder / "triton_timing.csv") if r["T"] == str(T) and r["ms"]}
    parts = [("cmp (FA-2)", t["cmp_fa2_fwd"]), ("win (FA-2)", t["win_fa2_fwd"]),
             ("select (Triton)", t["select_triton"]), ("sel (Triton)", t["sel_triton_fwd"])]
    rest = t["nsa_triton_fwd"] - sum(v for _, v in parts)
    parts.append(("compress, gating, glue", max(rest, 0.0)))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    left = 0.0
    for name, ms in parts:
        ax.barh(["NSA fwd"], [ms], left=left, label=f"{name}: {ms:.1f} ms")
        left += ms
    ax.barh(["full causal FA-2 fwd"], [t["full_causal_fa2_fwd"]], color="grey")
    ax.axvline(30, color="red", ls="--", lw=1, label="target: NSA fwd 30 ms")
    ax.set_xlabel(f"ms (H100, bf16, T={T}, Hq 64 / Hkv 4 / D 128, median)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"NSA forward {t['nsa_triton_fwd']:.1f} ms vs full causal {t['full_causal_fa2_fwd']:.1f} ms "
                 f"({t['full_causal_fa2_fwd'] / t['nsa_triton_fwd']:.2f}x)", fontsize=9)
    fig.tight_layout()
    out = folder / "nsa_fwd_breakdown_64k.png"
    fig.savefig(out, dpi=120)
    return out


def speedups(folder: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _rows(folder / "bench_sweep.csv") if r["status"] == "ok"]
    ms = {(r["branch"], r["path"], int(r["T"]), r["mode"]): float(r["median_ms"]) for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4))
    for branch, base, mode in (("sel", "fa2:flash_attn", "fwd"), ("sel", "fa2:flash_attn", "fwdbwd"),
                               ("select", "torch", "fwd"), ("nsa", "fa2:flash_attn", "fwd"),
                               ("nsa", "fa2:flash_attn", "fwdbwd")):
        Ts = sorted(T for (b, p, T, m) in ms if b == branch and p == "triton" and m == mode and (b, base, T, m) in ms)
        if Ts:
            ax.plot(Ts, [ms[(branch, base, T, mode)] / ms[(branch, "triton", T, mode)] for T in Ts], marker="o",
                    label=f"{branch} {mode}: triton over {base}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("T (tokens, one sequence)")
    ax.set_ylabel("speedup (x)")
    ax.set_title("Triton selection paths over the previous default (H100, bf16, same run)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = folder / "speedup_triton.png"
    fig.savefig(out, dpi=120)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0] if argv else "artifacts/2026-11-25/triton_sel")
    for path in (breakdown(folder), speedups(folder)):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
