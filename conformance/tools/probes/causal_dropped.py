"""max_seqlen_q == 1 with causal=True: FA-2 switches causal off, though sequences have more queries.

    python conformance/tools/probes/causal_dropped.py [--provider flash_attn|torch] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "causal_dropped"
TITLE = "causal=True, max_seqlen_q = 1 for query lengths (4, 6)"
EXPECTED = "semantics: causal silently switched off (every row sees every key) [H100 / api]"
RULES = ("FA2-CAUSAL-DROPPED", "FA2-MAX-SEQLEN-Q-LOW")
PROVIDERS = C.BOTH
VARIANTS = ("varlen",)

LENS = (4, 6)


def build(provider, variant, device):
    q, k, v = C.rand(10, 2, 64, device=device), C.rand(10, 2, 64, device=device), C.rand(10, 2, 64, device=device)
    cu = C.cumulative(LENS)
    call = C.varlen_call(provider, q, k, v, C.int32(cu, device), C.int32(cu, device), 1, 6, causal=True)

    def ref(dtype, causal=True):
        return C.reference_varlen(q, k, v, cu, cu, causal=causal, dtype=dtype)

    judge = C.judge_out(ref, q.dtype, alternatives={"the NON-causal reference": lambda dt: ref(dt, causal=False)})
    return C.Setup(call, judge=judge)


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
