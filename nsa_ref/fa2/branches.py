"""NSA's cmp and win branches on FA-2 (signatures as in Documentation/Architecture/Design.md).

cmp uses ONE dense causal call. With t0 = l - 1 and stride group g = (t - t0) // d, every
query of group g sees exactly compressed blocks 0..g (block i is visible iff i*d + l - 1 <= t).
So q[t0 : t0 + K*d] viewed as (K, d, Hq, D) and transposed to (d, K, Hq, D) is a batch of d
"phases" whose query axis is the group; K/V = k_cmp[:K] broadcast over that batch with stride 0.
A causal call with Sq == Sk == K is then the exact cmp mask, without copying q, k or v. The < d
rows after the last full group see blocks 0..K (one small non-causal call); rows t < l - 1 see
nothing and are 0 (lse -inf).

win is one causal call with window (w - 1, 0): the w keys ending at the query, itself included.

Both run from an ``nsa_ref.fa2.calls.FA2Plan`` (dtype, padded head dim, scale, window): the one
the router checked against the contracts, or one planned here when called directly.
"""
from __future__ import annotations

import math

import torch

from nsa_ref.fa2 import calls
from nsa_ref.fa2.providers import FA2Provider
from nsa_ref.packing import as_packing, device_cu_seqlens


def _cmp_one(q, k_cmp, v_cmp, cfg, provider: FA2Provider, plan: calls.FA2Plan):
    """q: (T, Hq, Dk), k_cmp: (Tc, Hkv, Dk), v_cmp: (Tc, Hkv, Dv) -> out (T, Hq, Dv), lse (T, Hq)."""
    T, Hq, dk = q.shape
    dv = v_cmp.shape[-1]
    d = cfg.block_stride
    t0, n_groups, start = calls.cmp_fold(T, cfg)
    scale = plan.scale
    # One output buffer, each piece copied into place once (a cat of pieces would copy twice).
    out = q.new_empty(T, Hq, dv)
    out[: min(T, t0)].zero_()
    lse_out = q.new_full((T, Hq), -math.inf, dtype=torch.float32)
    qp, kp, vp = plan.prepare(q, k_cmp, v_cmp)
    if n_groups:
        q_fold = qp[t0:start].view(n_groups, d, Hq, -1).transpose(0, 1)
        k_fold = kp[:n_groups].unsqueeze(0).expand(d, -1, -1, -1)
        v_fold = vp[:n_groups].unsqueeze(0).expand(d, -1, -1, -1)
        o, lse = provider.dense(q_fold, k_fold, v_fold, causal=True, window=(-1, -1), scale=scale)
        out[t0:start].view(n_groups, d, Hq, dv).copy_(o[..., :dv].transpose(0, 1))
        lse_out[t0:start].view(n_groups, d, Hq).copy_(lse.permute(2, 0, 1))
    if start < T:
        o, lse = provider.dense(
            qp[start:].unsqueeze(0), kp[: n_groups + 1].unsqueeze(0), vp[: n_groups + 1].unsqueeze(0),
            causal=False, window=(-1, -1), scale=scale,
        )
        out[start:] = o[0, ..., :dv]
        lse_out[start:] = lse[0].transpose(0, 1)
    if start <= t0 and torch.is_grad_enabled():
        # No row sees a block (T <= l - 1): keep the all-zero result attached to the inputs so
        # backward gives them zero gradients, as the reference does.
        out = out + sum(x.sum() for x in (q, k_cmp, v_cmp) if x.requires_grad) * 0
    return out, lse_out


def cmp_attention(q, k_cmp, v_cmp, cfg, cu_seqlens=None, *, provider: FA2Provider, pref_fp16=False,
                  plan: calls.FA2Plan | None = None):
    """q: (T, Hq, Dk), k_cmp: (Tc, Hkv, Dk), v_cmp: (Tc, Hkv, Dv) -> (out (T, Hq, Dv), lse (T, Hq) fp32).

    Packed sequences run one fold per sequence (their stride groups do not line up across
    sequence starts); compressed blocks are packed per sequence as ``nsa_ref.compress`` does.
    ``plan``: the checked ``calls.plan("cmp", ...)``; planned here when None.
    """
    plan = plan or calls.plan("cmp", q, k_cmp, v_cmp, cfg, cu_seqlens, pref_fp16)
    if device_cu_seqlens(cu_seqlens) is None:
        return _cmp_one(q, k_cmp, v_cmp, cfg, provider, plan)
    # The per-sequence layout needs the lengths: the packing's one host read of the offsets.
    offsets = as_packing(cu_seqlens, q.shape[0]).offsets
    outs, lses, c0 = [], [], 0
    for start, end in zip(offsets[:-1], offsets[1:]):
        n = end - start
        tc = cfg.num_cmp_blocks(n)
        o, lse = _cmp_one(q[start:end], k_cmp[c0 : c0 + tc], v_cmp[c0 : c0 + tc], cfg, provider, plan)
        outs.append(o)
        lses.append(lse)
        c0 += tc
    if not outs:
        return q.new_zeros(0, q.shape[1], v_cmp.shape[-1]), q.new_zeros(0, q.shape[1], dtype=torch.float32)
    return torch.cat(outs), torch.cat(lses)


def win_attention(q, k, v, cfg, cu_seqlens=None, *, provider: FA2Provider, pref_fp16=False,
                  plan: calls.FA2Plan | None = None):
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv) -> out (T, Hq, Dv); window (w - 1, 0).
    ``plan``: the checked ``calls.plan("win", ...)``; planned here when None."""
    T, Hq, dk = q.shape
    dv = v.shape[-1]
    if T == 0:
        return q.new_zeros(0, Hq, dv)
    plan = plan or calls.plan("win", q, k, v, cfg, cu_seqlens, pref_fp16)
    qp, kp, vp = plan.prepare(q, k, v)
    window, scale = plan.window, plan.scale
    if device_cu_seqlens(cu_seqlens) is None:
        o, _ = provider.dense(qp[None], kp[None], vp[None], causal=True, window=window, scale=scale)
        o = o[0]
    else:
        packing = as_packing(cu_seqlens, T)
        max_len = packing.max_seqlen  # handed in, or the packing's one host read
        o, _ = provider.varlen(qp, kp, vp, packing.cu_seqlens, packing.cu_seqlens, max_len, max_len,
                               causal=True, window=window, scale=scale)
    return o[..., :dv].to(q.dtype)
