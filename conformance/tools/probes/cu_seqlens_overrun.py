"""cu_seqlens_q[-1] past the q tokens: reads (and writes) rows past the end of q / out.

    python conformance/tools/probes/cu_seqlens_overrun.py [--provider flash_attn|torch] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "cu_seqlens_overrun"
TITLE = "cu_seqlens_q = [0, 5, 24] for 16 query tokens (intended [0, 5, 16])"
EXPECTED = "silent garbage: reads past the end of q, writes past the end of out, no error [H100]"
RULES = ("FA2-CU-SEQLENS-OVERRUN",)
PROVIDERS = C.BOTH
VARIANTS = ("varlen",)

LENS = (5, 11)


def build(provider, variant, device):
    q, k, v = C.rand(16, 4, 64, device=device), C.rand(16, 2, 64, device=device), C.rand(16, 2, 64, device=device)
    cu = C.cumulative(LENS)
    call = C.varlen_call(provider, q, k, v, C.int32([0, 5, 24], device), C.int32(cu, device), 19, 11, causal=True)

    def ref(dtype):
        return C.reference_varlen(q, k, v, cu, cu, causal=True, dtype=dtype)

    return C.Setup(call, judge=C.judge_out(ref, q.dtype), poison=[(q.shape, q.dtype)],
                   notes=["reference: the intended cu_seqlens_q = [0, 5, 16], max_seqlen_q = 11 (causal, bottom-right)"])


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
