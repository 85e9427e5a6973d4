"""NSA's selected branch on FA-2 varlen: gather each query's selected tokens into packed K/V.

The G query heads of a KV head share one selection, so they are folded as the query rows of one
varlen "sequence" per (token t, KV head): q viewed as (T * Hkv * G, 1, D) with sequences of G
rows (a view, no copy), and K/V the tokens of the selected blocks with s <= t, packed in that
(t, KV head) order. Listed blocks are visited in ascending order, so the partial current block
is naturally last. Queries are processed in chunks so the gathered K/V stay bounded.

This path copies up to n * l' keys per (query, KV head) through memory (the reason a fused
kernel would be faster); measured against the gathered SDPA path in artifacts/2026-11-25/fa2_harden
it is ~1.5x faster in forward from T = 1K on an H100, so it is the default (NSA_USE_FA2_SEL=0 turns
it off). With autograd on, chunks are recomputed in backward to keep memory bounded.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint

from nsa_ref import masks, varlen
from nsa_ref.fa2 import calls
from nsa_ref.fa2.providers import FA2Provider


def sel_attention(q, k, v, block_idx, cfg, cu_seqlens=None, *, provider: FA2Provider,
                  pref_fp16: bool = False, plan: calls.FA2Plan | None = None):
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv), block_idx: (T, Hkv, n) int -> (T, Hq, Dv).

    Query t (head h) attends the tokens s <= t of the blocks in block_idx[t, h // G]; -1 entries
    and repeats are ignored; a row with nothing listed gives 0 (FA-2's empty-row output).
    ``plan``: the checked ``calls.plan("sel", ...)``; planned here when None.
    """
    T, Hq, dk = q.shape
    Hkv, dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    lp = cfg.sel_block
    n = block_idx.shape[-1]
    if T == 0:
        return q.new_zeros(0, Hq, dv)
    plan = plan or calls.plan("sel", q, k, v, cfg, cu_seqlens, pref_fp16)
    qp, kp, vp = plan.prepare(q, k, v)
    D, scale = plan.head_dim, plan.scale
    pos, start = varlen.token_positions(cu_seqlens, T, q.device)
    k_rows, v_rows = kp.reshape(T * Hkv, D), vp.reshape(T * Hkv, D)
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad) and kp.dtype != torch.float32:
        # A key row is gathered by many queries: gather from fp32 so its gradient sums in fp32.
        k_rows, v_rows = k_rows.float(), v_rows.float()
    offsets = torch.arange(lp, device=q.device)
    heads = torch.arange(Hkv, device=q.device)[None, :, None, None]
    chunk = calls.sel_chunk_tokens(Hkv, n, lp)
    def run_chunk(a: int, b: int, q_chunk, k_all, v_all):
        C = b - a
        idx = masks.unique_blocks(block_idx[a:b]).long()  # sorted, repeats and -1 -> -1
        tok = idx[..., None] * lp + offsets  # (C, Hkv, n, l') local token positions
        valid = (idx >= 0)[..., None] & (tok <= pos[a:b, None, None, None])
        rows = ((tok + start[a:b, None, None, None]) * Hkv + heads)[valid]  # packed by (t, KV head)
        counts = valid.sum(dim=(-1, -2)).reshape(-1)
        cu_k = torch.zeros(C * Hkv + 1, dtype=torch.int32, device=q.device)
        cu_k[1:] = counts.cumsum(0)
        cu_q = torch.arange(0, (C * Hkv + 1) * G, G, dtype=torch.int32, device=q.device)
        o, _ = provider.varlen(q_chunk.reshape(C * Hkv * G, 1, D), k_all[rows].to(q_chunk.dtype).unsqueeze(1),
                               v_all[rows].to(q_chunk.dtype).unsqueeze(1), cu_q, cu_k, G, n * lp,
                               causal=False, window=(-1, -1), scale=scale)
        return o.reshape(C, Hq, D)

    # With autograd on, each chunk is recomputed in backward instead of keeping its gathered K/V
    # (at 64K tokens those would be ~137 GB for Hkv 4, n 16, l' 64, D 128 in bf16).
    checkpointed = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outs = []
    for a in range(0, T, chunk):
        b = min(T, a + chunk)
        if checkpointed:
            outs.append(torch.utils.checkpoint.checkpoint(run_chunk, a, b, qp[a:b], k_rows, v_rows,
                                                          use_reentrant=False))
        else:
            outs.append(run_chunk(a, b, qp[a:b], k_rows, v_rows))
    return torch.cat(outs)[..., :dv].to(q.dtype)
