"""cu_seqlens_k decreasing: a negative key length and a neighbour that reads another sequence's keys.

    python conformance/tools/probes/cu_seqlens_decreasing.py [--provider flash_attn|torch] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "cu_seqlens_decreasing"
TITLE = "cu_seqlens_k = [0, 10, 8, 16] (intended [0, 10, 10, 16]: key lengths 10, 0, 6)"
EXPECTED = "silent garbage: negative lengths, out-of-bounds reads, no error [H100]"
RULES = ("FA2-CU-SEQLENS-DECREASING",)
PROVIDERS = C.BOTH
VARIANTS = ("varlen",)

LQ, LK = (5, 5, 6), (10, 0, 6)


def build(provider, variant, device):
    q, k, v = C.rand(16, 4, 64, device=device), C.rand(16, 2, 64, device=device), C.rand(16, 2, 64, device=device)
    cu_q, cu_k = C.cumulative(LQ), C.cumulative(LK)
    call = C.varlen_call(provider, q, k, v, C.int32(cu_q, device), C.int32([0, 10, 8, 16], device), 6, 10)

    def ref(dtype):
        return C.reference_varlen(q, k, v, cu_q, cu_k, dtype=dtype)

    return C.Setup(call, judge=C.judge_out(ref, q.dtype), poison=[(q.shape, q.dtype)],
                   notes=["reference: the intended cu_seqlens_k = [0, 10, 10, 16] (sequence 1 has no keys: out 0)"])


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
