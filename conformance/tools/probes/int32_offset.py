"""Backward with b * round_up(sq, 128) * h * d_rounded >= 2**31: int32 offsets overflow (issue #1311).

    python conformance/tools/probes/int32_offset.py [--provider flash_attn|torch] [--json]

The backward's fp32 dq accumulator alone is b * round_up(sq, 128) * h * d_rounded * 4 bytes (about
8.1 GiB here): the probe checks free device memory first and says "skipped: needs N GiB" when it
does not fit.
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "int32_offset"
TITLE = "dense backward, b = 8300, seqlen_q = 1, seqlen_k = 4, 16 heads, d = 128 (PR #2260's shape)"
EXPECTED = "illegal memory access in the backward (int32 dq_accum offsets; fixed only on main, PR #2260)"
RULES = ("FA2-INT32-OFFSET",)
PROVIDERS = C.BOTH
VARIANTS = ("dense",)

B, SQ, SK, H, D = 8300, 1, 4, 16, 128


def needs_bytes(provider: str) -> int:
    """dq_accum (fp32, rows rounded to 128, d rounded) plus q/k/v/out/grads with room to spare."""
    from contracts import spec_for

    spec = spec_for(provider)
    rows = (SQ + spec.seqlen_q_round - 1) // spec.seqlen_q_round * spec.seqlen_q_round
    accum = B * rows * H * spec.head_dim_rounded(D) * 4
    tensors = B * (SQ + 2 * SK) * H * D * 2 * 4
    return accum + tensors


def build(provider, variant, device):
    q = C.rand(B, SQ, H, D, device=device, requires_grad=True)
    k = C.rand(B, SK, H, D, device=device, requires_grad=True)
    v = C.rand(B, SK, H, D, device=device, requires_grad=True)
    call = C.dense_call(provider, q, k, v)
    dout = C.rand(B, SQ, H, D, device=device)

    def ref(q_, k_, v_, dtype):
        return C.reference_dense(q_, k_, v_, dtype=dtype)

    spec_rows = 128
    return C.Setup(call, run=C.forward_backward(call, dout, poison_grads=False),
                   judge=C.judge_grads({"dq": q, "dk": k, "dv": v}, ref, dout, q.dtype),
                   needs_bytes=needs_bytes(provider),
                   notes=[f"backward offsets: {B} * round_up({SQ}, {spec_rows}) * {H} * d_rounded {D} = "
                          f"{B * spec_rows * H * D} >= 2**31 = {2**31}",
                          f"device memory needed: about {needs_bytes(provider) / 2**30:.1f} GiB"])


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
