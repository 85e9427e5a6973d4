"""num_heads_k == 0: both providers divide by it on the host (SIGFPE kills the process).

    python conformance/tools/probes/heads_kv_zero.py [--provider flash_attn|torch] [--json]
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "heads_kv_zero"
TITLE = "num_heads_k == 0 (k and v have no heads)"
EXPECTED = "SIGFPE: the process is killed (num_heads % num_heads_k on the host) [H100, both providers]"
RULES = ("FA2-HEADS-KV-ZERO",)
PROVIDERS = C.BOTH
VARIANTS = ("dense",)


def build(provider, variant, device):
    q = C.rand(2, 16, 4, 64, device=device)
    k = C.rand(2, 16, 0, 64, device=device)
    v = C.rand(2, 16, 0, 64, device=device)
    # There is nothing to compare with: returning at all would be news.
    return C.Setup(C.dense_call(provider, q, k, v))


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
