"""Ours against the peers and full attention, from the ``bench.csv`` of ``nsa-fa2 bench`` (its
``nsa`` rows per path and its ``full_causal`` rows): a Markdown table, the speed targets checked,
and a speedup-vs-T plot.

    python -m conformance.tools.peer_report artifacts/<date>/peers/bench.csv [--ours triton]

Ratios are taken between rows of the same CSV (one run on one GPU): "x vs P" is P's median time
over ours, so above 1 means ours is faster. Targets (issue 18): >= 1.2x the fastest peer of the
paper layout at every T, faster than full causal FA-2 from 8K, >= 6x full causal forward at 64K,
>= 1.5x FLA's ``parallel_nsa`` in its family.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

FULL = "full_causal"
LABELS = {"triton": "ours", "triton:shapes": "ours, validate='shapes'", "peer:flash_nsa": "Scalable-Flash-NSA", "peer:nsa_triton": "native-sparse-attention-triton",
          "peer:fla": "FLA parallel_nsa", FULL: "full causal FA-2"}


def load(path: Path) -> list[dict]:
    with Path(path).open() as fh:
        return list(csv.DictReader(fh))


def _table(rows: list[dict], ours: str):
    """-> {(family, mode): {path: {T: (ms, peak_mib)}}}; full causal rows join every family."""
    t: dict = defaultdict(lambda: defaultdict(dict))
    families = {r.get("family", "paper") for r in rows if r["branch"] == "nsa"}
    for r in rows:
        if r["status"] != "ok" or not r["median_ms"]:
            continue
        cell = (float(r["median_ms"]), float(r["peak_mib"]) if r.get("peak_mib") else None)
        if r["branch"] == FULL:
            for fam in families:
                t[(fam, r["mode"])][FULL][int(r["T"])] = cell
        elif r["branch"] == "nsa":
            t[(r.get("family", "paper"), r["mode"])][r["path"]][int(r["T"])] = cell
    return t


def targets(t, ours: str) -> list[tuple[str, bool, str]]:
    """-> [(target, met, evidence)] over every (family, mode) the CSV holds."""
    out = []
    for (fam, mode), paths in sorted(t.items()):
        mine = paths.get(ours, {})
        peers = {p: v for p, v in paths.items() if p.startswith(("peer:", "impl:"))}
        if fam == "paper" and peers:
            worst = []
            for T, (ms, _) in sorted(mine.items()):
                fastest = min(((v[T][0], p) for p, v in peers.items() if T in v), default=None)
                if fastest:
                    worst.append((fastest[0] / ms, T, LABELS.get(fastest[1], fastest[1])))
            if worst:
                r, T, who = min(worst)
                out.append((f"{mode}: >= 1.2x the fastest peer at every T", r >= 1.2,
                            f"lowest {r:.2f}x at T={T} (vs {who})"))
        if fam == "fla" and "peer:fla" in peers:
            rs = [(peers["peer:fla"][T][0] / ms, T) for T, (ms, _) in mine.items() if T in peers["peer:fla"]]
            if rs:
                r, T = min(rs)
                out.append((f"{mode} (FLA family): >= 1.5x FLA parallel_nsa at every T", r >= 1.5,
                            f"lowest {r:.2f}x at T={T}"))
        if fam == "paper" and FULL in paths:
            full = paths[FULL]
            rs = [(full[T][0] / ms, T) for T, (ms, _) in mine.items() if T in full and T >= 8192]
            if rs:
                r, T = min(rs)
                out.append((f"{mode}: faster than full causal FA-2 from 8K", r > 1.0, f"lowest {r:.2f}x at T={T}"))
            if mode == "fwd" and 65536 in mine and 65536 in full:
                r = full[65536][0] / mine[65536][0]
                out.append(("fwd: >= 6x full causal FA-2 at 64K", r >= 6.0, f"{r:.2f}x"))
    return out


def markdown(t, ours: str) -> str:
    lines = []
    for (fam, mode), paths in sorted(t.items()):
        # ours, our other variants, the peers, full attention
        order = ([ours] + sorted(p for p in paths if p not in (ours, FULL) and not p.startswith(("peer:", "impl:")))
                 + sorted(p for p in paths if p.startswith(("peer:", "impl:"))) + ([FULL] if FULL in paths else []))
        Ts = sorted({T for p in order for T in paths.get(p, {})})
        lines += [f"### {fam} layout, {mode}", "",
                  "| T | " + " | ".join(f"{LABELS.get(p, p)} ms" for p in order) + " | "
                  + " | ".join(f"ours vs {LABELS.get(p, p)}" for p in order[1:]) + " | peak MiB (ours / others) |",
                  "|" + "---|" * (1 + 2 * len(order))]
        for T in Ts:
            mine = paths.get(ours, {}).get(T)
            cells = [f"{paths[p][T][0]:.2f}" if T in paths.get(p, {}) else "-" for p in order]
            ratios = [f"{paths[p][T][0] / mine[0]:.2f}x" if mine and T in paths.get(p, {}) else "-" for p in order[1:]]
            peaks = " / ".join(f"{paths[p][T][1]:.0f}" if T in paths.get(p, {}) and paths[p][T][1] is not None
                               else "-" for p in order)
            lines.append(f"| {T} | " + " | ".join(cells) + " | " + " | ".join(ratios) + f" | {peaks} |")
        lines.append("")
    lines += ["### Targets", ""] + [f"- {'met' if ok else 'NOT met'}: {name} ({ev})" for name, ok, ev in targets(t, ours)]
    return "\n".join(lines) + "\n"


def plot(t, ours: str, out: Path) -> Path | None:
    """speedup_vs_T.png: full causal FA-2 time / path time against T, forward and forward+backward."""
    try:
        import matplotlib
    except ImportError:
        print("peer_report: matplotlib not installed, no plot (pip install -e '.[plot]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    modes = [m for m in ("fwd", "fwdbwd") if ("paper", m) in t]
    if not modes:
        return None
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for fam in ("paper", "fla"):
            paths = t.get((fam, mode), {})
            full = paths.get(FULL, {})
            for p, pts in sorted(paths.items(), key=lambda kv: kv[0] != ours):
                if p == FULL or (fam == "fla" and p not in (ours, "peer:fla")):
                    continue
                Ts = [T for T in sorted(pts) if T in full]
                if not Ts:
                    continue
                label = LABELS.get(p, p) + (" (l=d=l'=64)" if fam == "fla" else "")
                ax.plot(Ts, [full[T][0] / pts[T][0] for T in Ts], marker="o", label=label,
                        linestyle="-" if fam == "paper" else ":", linewidth=2.5 if p == ours else 1.5)
        ax.axhline(1.0, color="gray", linestyle="--", label="full causal FA-2")
        ax.set(xscale="log", yscale="log", xlabel="T (tokens, one sequence)",
               ylabel="full causal FA-2 time / NSA time", title=f"NSA {mode}: speedup over full attention")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "speedup_vs_T.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.tools.peer_report", description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--ours", default="triton", help="the bench path that is ours (default: triton)")
    ap.add_argument("--out", type=Path, default=None, help="folder for peers.md and the plot (default: the CSV's)")
    args = ap.parse_args(argv)
    if not args.csv.exists():
        print(f"peer_report: {args.csv} does not exist", file=sys.stderr)
        return 2
    t = _table(load(args.csv), args.ours)
    if not t:
        print(f"peer_report: {args.csv} has no nsa / full_causal timing rows", file=sys.stderr)
        return 2
    out = args.out or args.csv.parent
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(t, args.ours)
    (out / "peers.md").write_text(md)
    print(md)
    p = plot(t, args.ours, out)
    if p:
        print(f"plot: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
