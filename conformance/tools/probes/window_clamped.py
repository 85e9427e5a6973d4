"""window_size right >= seqlen_k: FA-2 drops it (-1), so rows see keys the window excludes.

    python conformance/tools/probes/window_clamped.py [--provider flash_attn|torch] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "window_clamped"
TITLE = "dense seqlen_q = 16, seqlen_k = 4, window_size = (-1, 4)"
EXPECTED = ("semantics: the right window becomes -1 (no window at all), so rows 0-10 see keys the window "
            "excludes (rows 0-7 should see none) [H100 / api]")
RULES = ("FA2-WINDOW-RIGHT-CLAMPED",)
PROVIDERS = C.BOTH
VARIANTS = ("dense",)


def build(provider, variant, device):
    q = C.rand(1, 16, 2, 64, device=device)
    k, v = C.rand(1, 4, 2, 64, device=device), C.rand(1, 4, 2, 64, device=device)
    call = C.dense_call(provider, q, k, v, window=(-1, 4))

    def ref(dtype):  # row i sees key j iff j <= i + 4 - 16 + 4: rows 0-7 see nothing (out 0)
        return C.reference_dense(q, k, v, window=(-1, 4), dtype=dtype)

    def no_window(dtype):
        return C.reference_dense(q, k, v, dtype=dtype)

    judge = C.judge_out(ref, q.dtype, alternatives={"the no-window reference (right window dropped)": no_window})
    return C.Setup(call, judge=judge)


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
