"""Batch or heads above 65535: one CUDA grid dimension holds at most 65535 blocks.

    python conformance/tools/probes/grid_limit.py [--provider flash_attn|torch] [--variant batch|heads] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "grid_limit"
TITLE = "dense batch = 65536 (variant batch) or heads = 65536 (variant heads), seqlen 1"
EXPECTED = "CUDA 'invalid configuration argument' (grid (m_blocks, b, h)) [src launch templates]"
RULES = ("FA2-GRID-LIMIT",)
PROVIDERS = C.BOTH
VARIANTS = ("batch", "heads")


def build(provider, variant, device):
    b, h = (65536, 1) if variant == "batch" else (1, 65536)
    q, k, v = (C.rand(b, 1, h, 64, device=device) for _ in range(3))

    def ref(dtype):
        return C.reference_dense(q, k, v, dtype=dtype)

    return C.Setup(C.dense_call(provider, q, k, v), judge=C.judge_out(ref, q.dtype), poison=[(q.shape, q.dtype)],
                   notes=[f"Hq = Hkv = {h} (no GQA, so no head folding for seqlen_q = 1)"])


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
