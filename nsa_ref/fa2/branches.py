"""NSA's cmp and win branches on FA-2 (signatures as in Documentation/Architecture/Design.md).

cmp uses ONE dense causal call. With t0 = l - 1 and stride group g = (t - t0) // d, every
query of group g sees exactly compressed blocks 0..g (block i is visible iff i*d + l - 1 <= t).
So q[t0 : t0 + K*d] viewed as (K, d, Hq, D) and transposed to (d, K, Hq, D) is a batch of d
"phases" whose query axis is the group; K/V = k_cmp[:K] broadcast over that batch with stride 0.
A causal call with Sq == Sk == K is then the exact cmp mask, without copying q, k or v. The < d
rows after the last full group see blocks 0..K (one small non-causal call); rows t < l - 1 see
nothing and are 0 (lse -inf).

win is one causal call with window (w - 1, 0): the w keys ending at the query, itself included.

dtype policy: fp16/bf16 run as they are; fp32 is cast to bf16 (fp16 with pref_fp16) and the
result cast back. Head dims are padded with zeros to a common multiple of 8 (the scale is passed
explicitly, so zero padding leaves q.k unchanged); this also covers dk != dv.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nsa_ref.fa2.providers import FA2Provider

FA2_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype, pref_fp16: bool = False) -> torch.dtype:
    """The dtype FA-2 runs in for inputs of `dtype` (fp32 -> bf16, or fp16 when preferred)."""
    if dtype in FA2_DTYPES:
        return dtype
    if dtype == torch.float32:
        return torch.float16 if pref_fp16 else torch.bfloat16
    raise ValueError(f"FA-2 paths take fp16, bf16 or fp32 inputs, got {dtype}")


def padded_head_dim(dk: int, dv: int) -> int:
    """Common head dim for q, k and v: max(dk, dv) rounded up to a multiple of 8."""
    return -(-max(dk, dv) // 8) * 8


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _prepare(q, k, v, pref_fp16):
    """q: (..., Dk), k: (..., Dk), v: (..., Dv) -> cast and padded to one head dim."""
    dtype = compute_dtype(q.dtype, pref_fp16)
    d = padded_head_dim(q.shape[-1], v.shape[-1])
    return tuple(_pad_last(x.to(dtype), d) for x in (q, k, v))


def _scale(cfg, dk: int) -> float:
    return cfg.scale if cfg.scale is not None else 1.0 / math.sqrt(dk)


def _host_offsets(cu_seqlens: torch.Tensor) -> list[int]:
    # One host copy of the offsets (a device sync): the per-sequence layout needs the lengths.
    return [int(x) for x in cu_seqlens.tolist()]


def _cmp_one(q, k_cmp, v_cmp, cfg, provider: FA2Provider, pref_fp16: bool):
    """q: (T, Hq, Dk), k_cmp: (Tc, Hkv, Dk), v_cmp: (Tc, Hkv, Dv) -> out (T, Hq, Dv), lse (T, Hq)."""
    T, Hq, dk = q.shape
    dv = v_cmp.shape[-1]
    l, d = cfg.block_len, cfg.block_stride
    t0 = l - 1
    scale = _scale(cfg, dk)
    n_groups = max(T - t0, 0) // d  # K: full stride groups; K <= Tc always
    start = t0 + n_groups * d  # first row of the < d remainder rows
    # One output buffer, each piece copied into place once (a cat of pieces would copy twice).
    out = q.new_empty(T, Hq, dv)
    out[: min(T, t0)].zero_()
    lse_out = q.new_full((T, Hq), -math.inf, dtype=torch.float32)
    qp, kp, vp = _prepare(q, k_cmp, v_cmp, pref_fp16)
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


def cmp_attention(q, k_cmp, v_cmp, cfg, cu_seqlens=None, *, provider: FA2Provider, pref_fp16=False):
    """q: (T, Hq, Dk), k_cmp: (Tc, Hkv, Dk), v_cmp: (Tc, Hkv, Dv) -> (out (T, Hq, Dv), lse (T, Hq) fp32).

    Packed sequences run one fold per sequence (their stride groups do not line up across
    sequence starts); compressed blocks are packed per sequence as ``nsa_ref.compress`` does.
    """
    if cu_seqlens is None:
        return _cmp_one(q, k_cmp, v_cmp, cfg, provider, pref_fp16)
    offsets = _host_offsets(cu_seqlens)
    outs, lses, c0 = [], [], 0
    for start, end in zip(offsets[:-1], offsets[1:]):
        n = end - start
        tc = cfg.num_cmp_blocks(n)
        o, lse = _cmp_one(q[start:end], k_cmp[c0 : c0 + tc], v_cmp[c0 : c0 + tc], cfg, provider, pref_fp16)
        outs.append(o)
        lses.append(lse)
        c0 += tc
    if not outs:
        return q.new_zeros(0, q.shape[1], v_cmp.shape[-1]), q.new_zeros(0, q.shape[1], dtype=torch.float32)
    return torch.cat(outs), torch.cat(lses)


def win_attention(q, k, v, cfg, cu_seqlens=None, *, provider: FA2Provider, pref_fp16=False):
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv) -> out (T, Hq, Dv); window (w - 1, 0)."""
    T, Hq, dk = q.shape
    dv = v.shape[-1]
    if T == 0:
        return q.new_zeros(0, Hq, dv)
    qp, kp, vp = _prepare(q, k, v, pref_fp16)
    window = (cfg.window - 1, 0)
    scale = _scale(cfg, dk)
    if cu_seqlens is None:
        o, _ = provider.dense(qp[None], kp[None], vp[None], causal=True, window=window, scale=scale)
        o = o[0]
    else:
        offsets = _host_offsets(cu_seqlens)
        max_len = max(b - a for a, b in zip(offsets[:-1], offsets[1:]))
        o, _ = provider.varlen(qp, kp, vp, cu_seqlens, cu_seqlens, max_len, max_len,
                               causal=True, window=window, scale=scale)
    return o[..., :dv].to(q.dtype)


def planned_calls(branch: str, q, k, v, cfg, cu_seqlens=None, pref_fp16: bool = False) -> list[dict]:
    """Meta-tensor stand-ins for the FA-2 calls a branch would make, for a contract check.

    Each entry: ``{"kind": "dense"|"varlen", "q", "k", "v", ...kwargs}``; nothing is allocated
    and nothing is read from the device. Packed cmp is planned as one fold over all T tokens
    (the longest case of the per-sequence folds it runs).
    """
    T, Hq, dk = q.shape
    Hkv = k.shape[1]
    dp = padded_head_dim(dk, v.shape[-1])
    dtype = compute_dtype(q.dtype, pref_fp16) if q.dtype.is_floating_point else q.dtype

    def meta(*shape):
        return torch.empty(shape, dtype=dtype, device="meta")

    if branch == "win":
        if cu_seqlens is None:
            return [{"kind": "dense", "q": meta(1, T, Hq, dp), "k": meta(1, T, Hkv, dp),
                     "v": meta(1, T, Hkv, dp), "causal": True, "window_size": (cfg.window - 1, 0)}]
        cu = torch.empty(cu_seqlens.shape, dtype=cu_seqlens.dtype, device="meta")
        return [{"kind": "varlen", "q": meta(T, Hq, dp), "k": meta(T, Hkv, dp), "v": meta(T, Hkv, dp),
                 "cu_seqlens_q": cu, "cu_seqlens_k": cu, "max_seqlen_q": T, "max_seqlen_k": T,
                 "causal": True, "window_size": (cfg.window - 1, 0)}]
    if branch == "cmp":
        n_groups = max(T - cfg.block_len + 1, 0) // cfg.block_stride
        calls = []
        if n_groups:
            calls.append({"kind": "dense", "q": meta(cfg.block_stride, n_groups, Hq, dp),
                          "k": meta(cfg.block_stride, n_groups, Hkv, dp),
                          "v": meta(cfg.block_stride, n_groups, Hkv, dp), "causal": True})
        calls.append({"kind": "dense", "q": meta(1, cfg.block_stride, Hq, dp),
                      "k": meta(1, n_groups + 1, Hkv, dp), "v": meta(1, n_groups + 1, Hkv, dp),
                      "causal": False})
        return calls
    if branch == "sel":
        from nsa_ref.fa2.selected import GATHER_BUDGET

        keys = cfg.n_sel * cfg.sel_block
        rows = min(T, max(1, GATHER_BUDGET // (Hkv * keys))) * Hkv  # one chunk of (t, KV head) rows
        cu = torch.empty(rows + 1, dtype=torch.int32, device="meta")
        G = Hq // max(Hkv, 1)
        return [{"kind": "varlen", "q": meta(rows * G, 1, dp), "k": meta(rows * keys, 1, dp),
                 "v": meta(rows * keys, 1, dp), "cu_seqlens_q": cu, "cu_seqlens_k": cu,
                 "max_seqlen_q": G, "max_seqlen_k": keys, "causal": False}]
    raise ValueError(f"no FA-2 plan for branch {branch!r}")
