"""Native Sparse Attention (Yuan et al. 2025): exact reference, SDPA fallback, FA-2 fast paths.

The rules this package pins (arXiv 2502.11089, read as written in ``nsa_ref.masks`` and
``nsa_ref.selection``); layout in Documentation/Architecture/Design.md.
Nothing here touches CUDA at import.
"""
from nsa_ref.config import NSAConfig
from nsa_ref.api import (
    cmp_attention,
    compress,
    nsa_attention,
    sel_attention,
    select_blocks,
    win_attention,
)
from nsa_ref.decode import decode_step
from nsa_ref.kv_cache import NSAKVCache
from nsa_ref.module import NSAAttention

__all__ = [
    "NSAConfig",
    "NSAAttention",
    "NSAKVCache",
    "cmp_attention",
    "compress",
    "decode_step",
    "nsa_attention",
    "sel_attention",
    "select_blocks",
    "win_attention",
]
from nsa_ref.decode_batched import decode_step_batched  # noqa: E402  batched decode (Documentation/Architecture/Decode.md)
from nsa_ref.decode_fast import decode_step_fast  # noqa: E402  fast decode step (Decode.md)
from nsa_ref.decode_graph import CapturedDecodeStep  # noqa: E402  the fast step as one CUDA graph (Decode.md)
