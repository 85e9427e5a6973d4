"""Head dim of v != head dim of q/k (NSA paper: dk = 192, dv = 128): FA-2 refuses cleanly.

    python conformance/tools/probes/head_dim_v.py [--provider flash_attn|torch] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "head_dim_v"
TITLE = "dense dk = 192, dv = 128"
EXPECTED = "clean RuntimeError 'v must have shape' (api CHECK_SHAPE); pad v or use another kernel"
RULES = ("FA2-HEAD-DIM-V",)
PROVIDERS = C.BOTH
VARIANTS = ("dense",)


def build(provider, variant, device):
    q, k = C.rand(1, 16, 2, 192, device=device), C.rand(1, 16, 2, 192, device=device)
    v = C.rand(1, 16, 2, 128, device=device)

    def ref(dtype):
        return C.reference_dense(q, k, v, dtype=dtype)

    return C.Setup(C.dense_call(provider, q, k, v), judge=C.judge_out(ref, q.dtype))


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
