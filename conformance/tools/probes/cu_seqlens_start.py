"""cu_seqlens_q[0] != 0: sequences are read from the wrong offsets, rows before it never written.

    python conformance/tools/probes/cu_seqlens_start.py [--provider flash_attn|torch] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "cu_seqlens_start"
TITLE = "cu_seqlens_q starts at 3 instead of 0 (intended lengths 5, 11)"
EXPECTED = "silent garbage: out-of-bounds or skipped rows, non-finite or finite, no error [H100]"
RULES = ("FA2-CU-SEQLENS-START",)
PROVIDERS = C.BOTH
VARIANTS = ("varlen",)

LENS = (5, 11)


def build(provider, variant, device):
    q, k, v = C.rand(16, 4, 64, device=device), C.rand(16, 2, 64, device=device), C.rand(16, 2, 64, device=device)
    cu = C.cumulative(LENS)  # intended [0, 5, 16]
    call = C.varlen_call(provider, q, k, v, C.int32([3, 5, 16], device), C.int32(cu, device), 11, 11, causal=True)

    def ref(dtype):
        return C.reference_varlen(q, k, v, cu, cu, causal=True, dtype=dtype)

    return C.Setup(call, judge=C.judge_out(ref, q.dtype), poison=[(q.shape, q.dtype)],
                   notes=["reference: the same call with the intended cu_seqlens_q = [0, 5, 16]"])


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
