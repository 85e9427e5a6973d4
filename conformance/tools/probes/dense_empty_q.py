"""Dense seqlen_q == 0: an empty grid is launched (CUDA 'invalid argument').

    python conformance/tools/probes/dense_empty_q.py [--provider flash_attn|torch] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "dense_empty_q"
TITLE = "dense call with seqlen_q == 0"
EXPECTED = "CUDA 'invalid argument' (the context may be poisoned) [H100, both providers]"
RULES = ("FA2-DENSE-EMPTY-Q",)
PROVIDERS = C.BOTH
VARIANTS = ("dense",)


def build(provider, variant, device):
    q = C.rand(2, 0, 4, 64, device=device)
    k = C.rand(2, 16, 2, 64, device=device)
    v = C.rand(2, 16, 2, 64, device=device)

    def judge(result):
        out = C.first_tensor(result)
        if tuple(out.shape) == (2, 0, 4, 64):
            return "ok", f"returned an empty output {tuple(out.shape)}"
        return "silent_corruption", f"returned shape {tuple(out.shape)}, expected (2, 0, 4, 64)"

    return C.Setup(C.dense_call(provider, q, k, v), judge=judge)


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
