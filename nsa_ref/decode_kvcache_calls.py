"""The FA-2 ``flash_attn_with_kvcache`` calls that the batched decode's win and cmp branches map to.

This is the seam of the GPU path of ``nsa_ref.decode_batched``. Each builder returns the keyword
arguments of one call over the cache's paged views (``PagedView``), with the new tokens
already appended (``k=None``):

    win_call(q, raw_view, cfg)  q (B, n, Hq, Dk) -> causal, window (w - 1, 0) over the raw pages
    cmp_call(q, cmp_view, cfg)  q (B, 1, Hq, Dk) -> every emitted compressed block (one query per sequence)

Nothing here runs a kernel, and nsa_ref does not check the contract itself. The tests check the
arguments against ``contracts.kvcache_reasons`` (on meta copies) and check that the mask FA-2
computes for them (``contracts.fa2_mask``) equals ``nsa_ref.masks``' rules for every sequence.

Facts these builders rely on (Documentation/Architecture/Decode.md):

- FA-2's kvcache causal mask is bottom-right aligned: query i of n sits at position
  ``cache_seqlens[b] - n + i``.
- The window is passed explicitly as (w - 1, 0), because FA-2 drops ``causal`` when there is one
  query.
- A preallocated layout (one page per sequence, ``block_table[b, 0] = b``) goes in as FA-2's
  dense ``k_cache`` (B, capacity, Hkv, D) with ``block_table=None``.
- A paged layout needs ``page_size % 256 == 0`` (contract rule FA2-PAGED-BLOCK-SIZE).
"""
from __future__ import annotations

import torch

from nsa_ref.config import NSAConfig
from nsa_ref.kv_cache import PagedView


def kvcache_layout(view: PagedView) -> dict:
    """-> ``k_cache``, ``v_cache``, ``cache_seqlens``, ``block_table`` of one store, where
    ``block_table`` is None for the preallocated layout (``view.dense``: then ``k_cache`` is
    (B, capacity, Hkv, D)). Reads nothing from the device."""
    return dict(k_cache=view.k_pages, v_cache=view.v_pages, cache_seqlens=view.cache_seqlens,
                block_table=None if view.dense else view.block_table)


def win_call(q: torch.Tensor, raw_view: PagedView, cfg: NSAConfig) -> dict:
    """q: (B, n, Hq, Dk) at positions cache_seqlens - n .. cache_seqlens - 1 -> the arguments of
    the win branch's call: keys s in [t - w + 1, t] (``masks.win_visible``)."""
    return dict(q=q, **kvcache_layout(raw_view), softmax_scale=cfg.softmax_scale(q.shape[-1]),
                causal=True, window_size=(cfg.window - 1, 0))


def cmp_call(q: torch.Tensor, cmp_view: PagedView, cfg: NSAConfig, num_splits: int = 0) -> dict:
    """q: (B, 1, Hq, Dk), the last token of each sequence -> the arguments of the cmp branch's call:
    every emitted block is visible (``masks.cmp_block_visible`` at t = length - 1), so there is
    no mask. A sequence with no block gets out 0 and lse +inf from FA-2 (-inf by this project's
    convention). ``num_splits``: FA-2's split-KV count (0: its heuristic). For n > 1 tokens, query t sees ``masks.num_visible_cmp_blocks(t)`` blocks, which
    is not bottom-right causal in block units, so this raises ValueError."""
    if q.shape[1] != 1:
        raise ValueError(
            f"cmp_call covers one query per sequence; got n={q.shape[1]}: with several, query t sees "
            "num_visible_cmp_blocks(t) blocks, not a bottom-right causal range (use the reference cmp_branch)"
        )
    return dict(q=q, **kvcache_layout(cmp_view), softmax_scale=cfg.softmax_scale(q.shape[-1]),
                causal=False, window_size=(-1, -1), num_splits=num_splits)
