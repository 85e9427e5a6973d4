"""max_seqlen_q below the longest query sequence: rows past ceil(max_seqlen_q / kBlockM) tiles are never written.

    python conformance/tools/probes/max_seqlen_q_low.py [--provider flash_attn|torch] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "max_seqlen_q_low"
TITLE = "max_seqlen_q = 40 for query lengths (300, 40)"
EXPECTED = "silent garbage: rows past ceil(max_seqlen_q / kBlockM) tiles never written [H100]"
RULES = ("FA2-MAX-SEQLEN-Q-LOW",)
PROVIDERS = C.BOTH
VARIANTS = ("varlen",)

LENS = (300, 40)


def build(provider, variant, device):
    q, k, v = C.rand(340, 2, 64, device=device), C.rand(340, 2, 64, device=device), C.rand(340, 2, 64, device=device)
    cu = C.cumulative(LENS)
    call = C.varlen_call(provider, q, k, v, C.int32(cu, device), C.int32(cu, device), 40, 300, causal=True)

    def ref(dtype):
        return C.reference_varlen(q, k, v, cu, cu, causal=True, dtype=dtype)

    return C.Setup(call, judge=C.judge_out(ref, q.dtype), poison=[(q.shape, q.dtype)],
                   notes=["the output is allocated over NaN-filled memory: rows never written show up as NaN"])


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
