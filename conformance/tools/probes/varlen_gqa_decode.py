"""Varlen GQA with max_seqlen_q == 1 and total_q != batch: FA-2's internal reshape fails.

    python conformance/tools/probes/varlen_gqa_decode.py [--provider flash_attn|torch] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "varlen_gqa_decode"
TITLE = "varlen GQA (Hq 4, Hkv 2), query lengths (1, 0, 1): max_seqlen_q = 1 is true, total_q 2 != batch 3"
EXPECTED = "RuntimeError from an internal reshape that names no argument (issues #1537, #1619) [H100]"
RULES = ("FA2-VARLEN-GQA-DECODE",)
PROVIDERS = C.BOTH
VARIANTS = ("varlen",)

LQ, LK = (1, 0, 1), (5, 6, 7)


def build(provider, variant, device):
    q = C.rand(2, 4, 64, device=device)
    k, v = C.rand(18, 2, 64, device=device), C.rand(18, 2, 64, device=device)
    cu_q, cu_k = C.cumulative(LQ), C.cumulative(LK)
    call = C.varlen_call(provider, q, k, v, C.int32(cu_q, device), C.int32(cu_k, device), 1, 7)

    def ref(dtype):
        return C.reference_varlen(q, k, v, cu_q, cu_k, dtype=dtype)

    return C.Setup(call, judge=C.judge_out(ref, q.dtype))


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
