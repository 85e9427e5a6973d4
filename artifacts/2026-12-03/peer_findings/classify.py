"""Map every failure of the H200 peer runs to the finding (FINDINGS.md) that explains it.

    python artifacts/2026-12-03/peer_findings/classify.py DIR     (DIR: the unpacked shards.tar.gz of
                                                                   conformance/tools/device/peer_suite.sh)

Reads each shard's junit.xml, assigns each failed test to a finding by its test name, parameters
and failure message (rules below, first match wins), prints counts per finding and every failure
no rule explains. Exit 1 when any failure is unexplained.
"""
import glob
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter

# (peer, finding, test-name regex, failure-text regex): first match wins.
RULES = [
    ("fla", "FLA-1 window ignores scale", r"test_(win|nsa)_(matches_brute\[tied(8|16)-|random_)", r"scale=0\.|tied(8|16)-"),
    ("fla", "FLA-2 NaN on a sel row with nothing visible", r"test_sel_any_block_set", r"NSA-FINITE"),
    ("fla", "FLA-3 ties to the higher index", r"test_select_ties_go_to_lower_index", r"NSA-SEL-TIES"),
    ("fla", "FLA-5 an empty sequence before others corrupts them (CUDA)", r"test_varlen_|test_grads_finite",
     r"L=(0,|[^ ]*,0,)"),
    ("fla", "FLA-6 top-k selects next_pow2(n_sel) blocks", r"test_select_random_shapes", r"NSA-SEL-LAYOUT"),
    ("nsa_triton", "NSA-T-1 window of w + 1 keys", r"test_(win|nsa)_", r"NSA-WIN|window=1\)|\(win only\)"),
    ("nsa_triton", "NSA-T-3 NaN on a sel row with nothing visible", r"test_sel_any_block_set", r"NSA-FINITE"),
    ("nsa_triton", "NSA-T-6 avgpool compression sums in bf16", r"test_compress_matches_brute|isolate_branch\[.*-cmp\]",
     r"NSA-CMP-MEAN|cmp only"),
    ("nsa_triton", "NSA-T-7 compressed_attention asserts q_len > k_len (all-empty batch)",
     r"test_varlen_equals_per_sequence\[.*L=0,0-|test_cmp_random_varlen", r"compressed_attention\.py:\d+: AssertionError"),
]


def failures(root: str):
    for path in sorted(glob.glob(f"{root}/*/*/junit.xml")):
        peer = path.split("/")[-3]
        for tc in ET.parse(path).iter("testcase"):
            node = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
            if node is not None:
                yield peer, tc.get("name"), (node.get("message") or "") + "\n" + (node.text or "")


def main(root: str) -> int:
    counts, unexplained = Counter(), []
    for peer, name, text in failures(root):
        for rule_peer, finding, name_re, text_re in RULES:
            if rule_peer == peer and re.search(name_re, name) and re.search(text_re, name + "\n" + text):
                counts[(peer, finding)] += 1
                break
        else:
            unexplained.append((peer, name, text.strip().splitlines()[0][:200] if text.strip() else ""))
    for (peer, finding), n in sorted(counts.items()):
        print(f"{peer:11s} {n:3d}  {finding}")
    for peer in sorted({p for p, _ in counts} | {p for p, _, _ in unexplained}):
        total = sum(n for (p, _), n in counts.items() if p == peer)
        print(f"{peer:11s} {total:3d}  failures explained; "
              f"{sum(p == peer for p, _, _ in unexplained)} unexplained")
    for peer, name, first in unexplained:
        print(f"UNEXPLAINED {peer} {name}: {first}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
