"""Turn a bench.csv into speedups, min-length thresholds and plots.

    python -m conformance.tools.analysis artifacts/<date>/fa2_harden/bench.csv [--write-thresholds]

Threshold rule (per GPU, branch, head dim, dtype): the smallest measured T from which the FA-2
path the router would pick stays >= --min-ratio (default 1.2) times faster than the SDPA fallback
for every larger measured T, in every measured mode (fwd, fwdbwd). 0 means "from the first
measured T"; no qualifying T means FA-2 is never routed by default for that case.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

PROVIDER_ORDER = ("fa2:flash_attn", "fa2:torch")  # the router's auto preference
NEVER = 1 << 30


def load_rows(path: Path) -> list[dict]:
    with Path(path).open() as fh:
        return [r for r in csv.DictReader(fh) if r["status"] == "ok" and r["median_ms"]]


def _key(r: dict) -> tuple:
    return (r["gpu"], r["branch"], int(r["dk"]), int(r["dv"]), r["dtype"], r["mode"])


def speedups(rows: list[dict], baseline: str = "sdpa") -> dict[tuple, dict[str, dict[int, float]]]:
    """{(gpu, branch, dk, dv, dtype, mode): {path: {T: baseline_ms / path_ms}}} for every non-baseline path."""
    ms: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        ms[_key(r)][r["path"]][int(r["T"])] = float(r["median_ms"])
    out: dict[tuple, dict[str, dict[int, float]]] = {}
    for key, paths in ms.items():
        base = paths.get(baseline, {})
        out[key] = {p: {T: base[T] / t for T, t in sorted(ts.items()) if T in base}
                    for p, ts in paths.items() if p != baseline}
    return out


def min_len(ratios: dict[int, float], min_ratio: float) -> int:
    """Smallest T with ratio >= min_ratio at it and at every larger measured T (NEVER if none)."""
    best = NEVER
    for T in sorted(ratios, reverse=True):
        if ratios[T] < min_ratio:
            break
        best = T
    if best != NEVER and best == min(ratios):
        return 0
    return best


def recommend(rows: list[dict], min_ratio: float = 1.2) -> dict:
    """{gpu: {branch: {dk: {"min_len", "provider", "per_mode": {mode: T}}}}} for cmp and win."""
    sp = speedups(rows)
    result: dict = defaultdict(lambda: defaultdict(dict))
    grouped: dict[tuple, dict[str, dict[int, float]]] = defaultdict(dict)
    for (gpu, branch, dk, dv, dtype, mode), paths in sp.items():
        if branch not in ("cmp", "win"):
            continue
        provider = next((p for p in PROVIDER_ORDER if paths.get(p)), None)
        if provider is None:
            continue
        grouped[(gpu, branch, dk, dtype, provider)][mode] = paths[provider]
    for (gpu, branch, dk, dtype, provider), modes in grouped.items():
        per_mode = {m: min_len(r, min_ratio) for m, r in modes.items()}
        entry = result[gpu][branch].get(dk)
        value = max(per_mode.values())
        if entry is None or value > entry["min_len"]:  # the strictest dtype wins
            result[gpu][branch][dk] = {"min_len": value, "provider": provider, "dtype": dtype,
                                       "per_mode": per_mode}
    return json.loads(json.dumps(result))


def thresholds_yaml(rec: dict, source: str) -> str:
    """The router's fa2_thresholds.yaml for the recommendation `rec` (NEVER kept as a large int)."""
    lines = [
        "# Shortest sequence length T (tokens) from which the router sends a branch to FA-2 instead of",
        "# SDPA, per GPU (matched as a substring of torch.cuda.get_device_name) and head dim (the",
        "# closest listed head dim at or above the query's). NSA_FA2_MIN_LEN_WIN / _CMP override these.",
        f"# Written by `python -m conformance.tools.analysis --write-thresholds` from {source}:",
        "# the smallest T from which FA-2 stays >= 1.2x faster than SDPA for every larger measured T,",
        f"# in fwd and fwd+bwd. {NEVER} = FA-2 never reached 1.2x there (SDPA stays the default).",
        "default:",
        "  win: 0",
        "  cmp: 0",
        "gpus:",
    ]
    for gpu in sorted(rec):
        lines.append(f'  "{gpu}":')
        for branch in sorted(rec[gpu]):
            lines.append(f"    {branch}:")
            for dk in sorted(rec[gpu][branch], key=int):
                lines.append(f"      {dk}: {rec[gpu][branch][dk]['min_len']}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path, min_ratio: float = 1.2) -> list[Path]:
    """time_<branch>.png (ms vs T per path) and speedup_<branch>.png (SDPA / path vs T)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sp = speedups(rows)
    branches = sorted({r["branch"] for r in rows})
    modes = sorted({r["mode"] for r in rows}, key=lambda m: m != "fwd")
    for branch in branches:
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            series = defaultdict(dict)
            for r in rows:
                if r["branch"] == branch and r["mode"] == mode:
                    label = f"{r['path']} d={r['dk']}" + (f"/{r['dv']}" if r["dv"] != r["dk"] else "") + f" {r['dtype']}"
                    series[label][int(r["T"])] = float(r["median_ms"])
            for label, pts in sorted(series.items()):
                Ts = sorted(pts)
                ax.plot(Ts, [pts[t] for t in Ts], marker="o", label=label)
            ax.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="median ms",
                   title=f"{branch} {mode}: time (lower is better)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(rows[0]["gpu"])
        fig.tight_layout()
        path = out / f"time_{branch}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
        drew = False
        for ax, mode in zip(axes[0], modes):
            for key, paths in sorted(sp.items()):
                gpu, b, dk, dv, dtype, m = key
                if b != branch or m != mode:
                    continue
                for p, ratios in sorted(paths.items()):
                    if ratios:
                        Ts = sorted(ratios)
                        dims = f"{dk}" if dk == dv else f"{dk}/{dv}"
                        ax.plot(Ts, [ratios[t] for t in Ts], marker="o", label=f"{p} d={dims} {dtype}")
                        drew = True
            ax.axhline(min_ratio, color="red", linestyle="--", label=f"{min_ratio}x gate")
            ax.set(xscale="log", xlabel="T (tokens)", ylabel="SDPA time / path time",
                   title=f"{branch} {mode}: speedup over SDPA")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(rows[0]["gpu"])
        fig.tight_layout()
        if drew:
            path = out / f"speedup_{branch}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.tools.analysis", description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="folder for plots and thresholds.json (default: the CSV's)")
    ap.add_argument("--min-ratio", type=float, default=1.2)
    ap.add_argument("--write-thresholds", action="store_true", help="rewrite nsa_ref/fa2_thresholds.yaml")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if not args.csv.exists():
        print(f"analysis: {args.csv} does not exist", file=sys.stderr)
        return 2
    rows = load_rows(args.csv)
    if not rows:
        print(f"analysis: {args.csv} has no successful timing rows", file=sys.stderr)
        return 2
    out = args.out or args.csv.parent
    out.mkdir(parents=True, exist_ok=True)
    rec = recommend(rows, args.min_ratio)
    (out / "thresholds.json").write_text(json.dumps(rec, indent=2) + "\n")
    for gpu, branches in rec.items():
        for branch, dims in branches.items():
            for dk, e in sorted(dims.items(), key=lambda kv: int(kv[0])):
                shown = "never" if e["min_len"] >= NEVER else e["min_len"]
                print(f"{gpu} {branch} d={dk}: FA-2 from T >= {shown} ({e['provider']}, per mode {e['per_mode']})")
    if args.write_thresholds:
        from nsa_ref.fa2 import thresholds

        thresholds.THRESHOLDS_FILE.write_text(thresholds_yaml(rec, args.csv.as_posix()))
        print(f"wrote {thresholds.THRESHOLDS_FILE}")
    if not args.no_plots:
        for path in plot(rows, out, args.min_ratio):
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
