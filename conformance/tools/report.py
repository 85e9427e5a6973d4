"""Markdown summaries of GPU parity verdicts and environment reports, for artifacts/.

    python -m conformance.tools.report parity gpu_parity.json env.json > gpu_parity/README.md
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def env_table(env: dict) -> str:
    keys = ["gpu", "compute_capability", "driver", "cuda_runtime", "torch", "flash_attn", "triton", "python"]
    rows = "\n".join(f"| {k} | {env.get(k, 'n/a')} |" for k in keys)
    return "| what | value |\n|---|---|\n" + rows + "\n"


def parity_table(results: list[dict]) -> str:
    """One row per (branch, provider, quantity, dtype): cases, worst err/allowed, pass count."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        words = r["case"].split()
        # "<branch> <provider> ..." or "<branch> grad <dq|dk|dv> <provider> ..."
        branch, provider = (f"{words[0]} grad", words[3]) if words[1] == "grad" else (words[0], words[1])
        groups[(branch, provider, r["quantity"], r["dtype"])].append(r)
    lines = ["| branch | provider | quantity | dtype | cases | passed | worst err / allowed | worst case |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups):
        rs = groups[key]
        worst = max(rs, key=lambda r: r["err"] / r["allowed"] if r["allowed"] else 0.0)
        ratio = worst["err"] / worst["allowed"] if worst["allowed"] else 0.0
        lines.append(f"| {' | '.join(key)} | {len(rs)} | {sum(r['passed'] for r in rs)} | "
                     f"{ratio:.2f} ({worst['err']:.2e} / {worst['allowed']:.2e}) | {worst['case']} |")
    total, ok = len(results), sum(r["passed"] for r in results)
    return "\n".join(lines) + f"\n\n{ok} of {total} checked quantities within tolerance.\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "parity":
        print("usage: python -m conformance.tools.report parity gpu_parity.json env.json", file=sys.stderr)
        return 2
    with open(argv[1]) as fh:
        results = json.load(fh)
    with open(argv[2]) as fh:
        env = json.load(fh)
    print("## Environment\n\n" + env_table(env) + "\n## Verdicts\n\n" + parity_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
