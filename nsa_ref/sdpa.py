"""NSA branches on ``torch.nn.functional.scaled_dot_product_attention`` with boolean masks.

The portable fallback: any device, any float dtype, differentiable. Queries are processed in
chunks so that ``chunk * Sk * Hq <= MASK_BUDGET_BYTES`` (the boolean mask and, on the math
backend, the score matrix stay bounded); keys are cut to the range a chunk can see (cmp: the
visible blocks, win: the last w tokens, sel: each query's own n*l' gathered tokens). GQA goes
through ``enable_gqa`` with the G query heads of a KV head as SDPA's head axis.

SDPA returns garbage on a mask row that is all False, so such rows are given a harmless full
row and their output is then replaced by exact zeros (zero gradient too). Masks come from the
named rules in ``nsa_ref.masks``; signatures match ``nsa_ref.reference``.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from nsa_ref import masks, varlen

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig

#: Upper bound on query_chunk * num_keys * Hq per SDPA call (bytes of a per-head bool mask).
MASK_BUDGET_BYTES = 64 << 20


@contextlib.contextmanager
def mask_budget(nbytes: int) -> Iterator[None]:
    """Temporarily set ``MASK_BUDGET_BYTES`` (e.g. tiny in tests to force many chunks)."""
    global MASK_BUDGET_BYTES
    if nbytes < 1:
        raise ValueError(f"mask budget must be >= 1 byte, got {nbytes}")
    old, MASK_BUDGET_BYTES = MASK_BUDGET_BYTES, nbytes
    try:
        yield
    finally:
        MASK_BUDGET_BYTES = old


def _chunk_len(num_keys: int, n_heads: int) -> int:
    return max(1, MASK_BUDGET_BYTES // max(1, num_keys * n_heads))


def _grouped_sdpa(
    qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, visible: torch.Tensor, scale: float, want_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qg: (N, G, L, Dk), kg: (N, 1, S, Dk), vg: (N, 1, S, Dv), visible: (N or 1, 1, L, S) bool
    -> (out (N, G, L, Dv), lse (N, G, L) fp32 or None). Rows with no visible key: out 0, lse -inf."""
    if kg.shape[2] == 0:
        # Empty products give exact zeros that stay attached to the graph (zero gradient).
        out = torch.einsum("ngld,nsd->ngls", qg, kg[:, 0]) @ vg
        lse = qg.new_full(qg.shape[:3], float("-inf"), dtype=torch.float32) if want_lse else None
        return out, lse
    has_key = visible.any(dim=-1, keepdim=True)  # (N|1, 1, L, 1)
    safe_mask = visible | ~has_key
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=safe_mask, scale=scale, enable_gqa=True)
    out = torch.where(has_key, out, torch.zeros_like(out))
    lse = None
    if want_lse:
        scores = torch.einsum("ngld,nsd->ngls", qg, kg[:, 0]) * scale
        scores = scores.masked_fill(~safe_mask, float("-inf"))
        lse = torch.where(has_key[..., 0], torch.logsumexp(scores, dim=-1), float("-inf")).float()
    return out, lse


def _masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float, want_lse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: (L, Hq, Dk), k: (S, Hkv, Dk), v: (S, Hkv, Dv), visible: (Hkv or 1, L, S) bool
    -> (out (L, Hq, Dv), lse (L, Hq) fp32 or None). SDPA's head axis holds the G query heads of
    one KV head, its batch axis the KV heads."""
    L, Hq, Dk = q.shape
    S, Hkv, Dv = v.shape
    qg = q.reshape(L, Hkv, Hq // Hkv, Dk).permute(1, 2, 0, 3)
    kg = k.permute(1, 0, 2)[:, None]
    vg = v.permute(1, 0, 2)[:, None]
    out, lse = _grouped_sdpa(qg, kg, vg, visible[:, None], scale, want_lse)
    out = out.permute(2, 0, 1, 3).reshape(L, Hq, Dv)
    if lse is not None:
        lse = lse.permute(2, 0, 1).reshape(L, Hq)
    return out, lse


def cmp_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cfg: "NSAConfig",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk), v_cmp: (Tc_total, Hkv, Dv)
    -> (out (T, Hq, Dv), lse (T, Hq) fp32). Same rule as ``reference.cmp_attention``; a query
    chunk only sees blocks 0..(last query's visible count - 1)."""
    T, Hq, Dk = q.shape
    scale = cfg.softmax_scale(Dk)
    outs, lses = [], []
    ca = 0
    for (a, b), tc in zip(varlen.seq_bounds(cu_seqlens, T), varlen.cmp_seqlens(cu_seqlens, T, cfg)):
        kc, vc = k_cmp[ca : ca + tc], v_cmp[ca : ca + tc]
        ca += tc
        step = _chunk_len(max(tc, 1), Hq)
        for s in range(0, b - a, step):
            e = min(b - a, s + step)
            pos = torch.arange(s, e, device=q.device)
            nvis = min(tc, int(masks.num_visible_cmp_blocks(e - 1, cfg)))
            visible = masks.cmp_visible_mask(pos, nvis, cfg)[None]
            out, lse = _masked_sdpa(q[a + s : a + e], kc[:nvis], vc[:nvis], visible, scale, want_lse=True)
            outs.append(out)
            lses.append(lse)
    return varlen.cat_rows(outs, q, (Hq, v_cmp.shape[-1])), varlen.cat_rows(lses, q, (Hq,)).float()


def sel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    cfg: "NSAConfig",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv), block_idx: (T, Hkv, n) int -> (T, Hq, Dv).

    Same rule as ``reference.sel_attention``, gathered: each (query, KV head) gets its own n*l'
    keys (the tokens of its listed blocks), so work is O(T * n * l') instead of O(T^2). SDPA runs
    with batch = query chunk * Hkv, heads = G, one query row. A repeated block counts once.
    """
    T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, lp, n = Hq // Hkv, cfg.sel_block, block_idx.shape[-1]
    scale = cfg.softmax_scale(Dk)
    offsets = torch.arange(lp, device=q.device)
    heads = torch.arange(Hkv, device=q.device)[None, :, None]
    # A key token is gathered by many queries, so its gradient is a long sum; for 16-bit inputs
    # gather from an fp32 copy so that sum (index backward) accumulates in fp32, as a matmul would.
    acc_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    def run_chunk(a: int, s: int, e: int, nb: int, seqlen: int, q_chunk, k_seq, v_seq):
        # every loop value is an argument: checkpoint re-runs this after the loop has moved on
        L = e - s
        idx = masks.unique_blocks(block_idx[a + s : a + e]).long()  # (L, Hkv, n), repeats -> -1
        listed = (idx >= 0) & (idx < nb)
        tok = idx[..., None] * lp + offsets  # (L, Hkv, n, l')
        t = torch.arange(s, e, device=q.device)[:, None, None, None]
        visible = (listed[..., None] & masks.causal_visible(t, tok)).reshape(L, Hkv, n * lp)
        # Hidden slots still gather some row; spread them over the sequence, since pointing
        # them all at token 0 makes the backward scatter-add serialise on that one row
        # (measured on H100 before this change: 486 ms for sel fwd+bwd at T=256, Hq 64, Hkv 4).
        spread = torch.arange(L * Hkv * n * lp, device=q.device).reshape(L, Hkv, n * lp) % seqlen
        tok = torch.where(visible, tok.reshape(L, Hkv, n * lp), spread)
        kg = k_seq[tok, heads].to(q.dtype).reshape(L * Hkv, 1, n * lp, Dk)
        vg = v_seq[tok, heads].to(q.dtype).reshape(L * Hkv, 1, n * lp, Dv)
        qg = q_chunk.reshape(L * Hkv, G, 1, Dk)
        out, _ = _grouped_sdpa(qg, kg, vg, visible.reshape(L * Hkv, 1, 1, n * lp), scale, False)
        return out.reshape(L, Hq, Dv)

    # With autograd on, each chunk is recomputed in backward rather than keeping its gathered
    # K/V alive (measured on H100: fwd+bwd ran out of 80 GB at T=16K without this).
    checkpointed = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outs = []
    for a, b in varlen.seq_bounds(cu_seqlens, T):
        k_seq, v_seq = k[a:b].to(acc_dtype), v[a:b].to(acc_dtype)
        nb = masks.num_sel_blocks(b - a, cfg)
        step = _chunk_len(n * lp, Hq)
        for s in range(0, b - a, step):
            e = min(b - a, s + step)
            args = (a, s, e, nb, b - a, q[a + s : a + e], k_seq, v_seq)
            if checkpointed:
                outs.append(torch.utils.checkpoint.checkpoint(run_chunk, *args, use_reentrant=False))
            else:
                outs.append(run_chunk(*args))
    return varlen.cat_rows(outs, q, (Hq, Dv))


def _win_chunk_len(seqlen: int, window: int, n_heads: int) -> int:
    """Largest power-of-two fraction L of the budget with L * min(seqlen, L + w - 1) * Hq <= budget."""
    step = _chunk_len(min(seqlen, window), n_heads)
    while step > 1 and step * min(seqlen, step + window - 1) * n_heads > MASK_BUDGET_BYTES:
        step //= 2
    return step


def win_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: "NSAConfig",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv) -> (T, Hq, Dv).
    Same rule as ``reference.win_attention``; a query chunk [s, e) uses keys max(0, s-w+1)..e-1."""
    T, Hq, Dk = q.shape
    scale = cfg.softmax_scale(Dk)
    outs = []
    for a, b in varlen.seq_bounds(cu_seqlens, T):
        step = _win_chunk_len(b - a, cfg.window, Hq)
        for s in range(0, b - a, step):
            e = min(b - a, s + step)
            lo = max(0, s - cfg.window + 1)
            q_pos = torch.arange(s, e, device=q.device)
            k_pos = torch.arange(lo, e, device=q.device)
            visible = masks.win_visible_mask(q_pos, k_pos, cfg)[None]
            outs.append(_masked_sdpa(q[a + s : a + e], k[a + lo : a + e], v[a + lo : a + e], visible, scale)[0])
    return varlen.cat_rows(outs, q, (Hq, v.shape[-1]))
