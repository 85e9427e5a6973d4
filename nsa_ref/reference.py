"""Exact NSA branches: naive masked softmax, one sequence at a time, in the input dtype.

The ground truth of this project: vectorised over heads and queries, differentiable, fp64-capable
(gradcheck runs on it), no fused kernels. Masks come from the named rules in ``nsa_ref.masks``.
Memory is O(Hq * T_b^2) per sequence, so keep it to test-sized inputs.

Branch signatures (shared with ``nsa_ref.sdpa`` and ``nsa_ref.fa2``)::

    cmp_attention(q, k_cmp, v_cmp, cfg, cu_seqlens=None) -> (out (T, Hq, Dv), lse (T, Hq) fp32)
    sel_attention(q, k, v, block_idx, cfg, cu_seqlens=None) -> out (T, Hq, Dv)
    win_attention(q, k, v, cfg, cu_seqlens=None) -> out (T, Hq, Dv)

Inputs are assumed valid; ``nsa_ref.api`` checks them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nsa_ref import masks, varlen
from nsa_ref.packing import as_packing

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores: (..., S), visible: bool broadcastable to scores -> (p (..., S), lse (...)).

    Softmax over the visible entries only. A row with no visible entry gets p = 0 everywhere and
    lse = -inf, with no NaN in the forward or the backward pass.
    """
    masked = scores.masked_fill(~visible, float("-inf"))
    if scores.shape[-1] == 0:
        return masked, masked.sum(-1) + float("-inf")
    row_max = masked.amax(dim=-1, keepdim=True).detach()
    # The shift cancels mathematically, so a detached one keeps gradients exact; empty rows get 0
    # so that exp(-inf - 0) = 0 instead of exp(-inf - (-inf)) = NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(masked - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    safe_denom = torch.where(nonempty, denom, torch.ones_like(denom))
    p = e / safe_denom
    lse = torch.where(nonempty, row_max + torch.log(safe_denom), torch.full_like(denom, float("-inf")))
    return p, lse.squeeze(-1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (L, Hq, Dk), k: (S, Hkv, Dk), v: (S, Hkv, Dv), visible: (Hkv or 1, L, S) bool
    -> (out (L, Hq, Dv), lse (L, Hq) fp32).

    Query head h uses KV head h // G. Rows with no visible key: out exactly 0, lse -inf.
    """
    L, Hq, Dk = q.shape
    S, Hkv, Dv = v.shape
    G = Hq // Hkv
    qg = q.reshape(L, Hkv, G, Dk)
    scores = torch.einsum("lkgd,skd->kgls", qg, k) * scale  # (Hkv, G, L, S)
    p, lse = masked_softmax(scores, visible[:, None])
    out = torch.einsum("kgls,skd->lkgd", p, v).reshape(L, Hq, Dv)
    return out, lse.permute(2, 0, 1).reshape(L, Hq).float()


def cmp_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cfg: "NSAConfig",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk), v_cmp: (Tc_total, Hkv, Dv)
    -> (out (T, Hq, Dv), lse (T, Hq) fp32).

    Query t attends compressed block i of its sequence iff i*d + l - 1 <= t
    (``masks.cmp_block_visible``). Rows with t < l - 1 see nothing: out 0, lse -inf.
    ``k_cmp`` is packed by ``cu_seqlens_cmp``, derived from ``cu_seqlens`` and cfg.
    """
    T, Hq, Dk = q.shape
    scale = cfg.softmax_scale(Dk)
    packing = as_packing(cu_seqlens, T)
    cmp_offsets = packing.cmp_offsets(cfg)
    outs, lses = [], []
    for (a, b), (ca, cb) in zip(packing.bounds, zip(cmp_offsets[:-1], cmp_offsets[1:])):
        pos = torch.arange(b - a, device=q.device)
        visible = masks.cmp_visible_mask(pos, cb - ca, cfg)[None]
        out, lse = attend(q[a:b], k_cmp[ca:cb], v_cmp[ca:cb], visible, scale)
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

    Query t, head h attends token s iff s's selection block floor(s/l') is listed in
    block_idx[t, h // G] and s <= t (``masks.sel_visible_mask``). -1 entries are ignored; a
    block listed twice counts once; a row with nothing visible gives 0.
    """
    T, Hq, Dk = q.shape
    scale = cfg.softmax_scale(Dk)
    outs = []
    for a, b in varlen.seq_bounds(cu_seqlens, T):
        pos = torch.arange(b - a, device=q.device)
        visible = masks.sel_visible_mask(pos, pos, block_idx[a:b], cfg, cfg.num_sel_blocks(b - a))
        outs.append(attend(q[a:b], k[a:b], v[a:b], visible, scale)[0])
    return varlen.cat_rows(outs, q, (Hq, v.shape[-1]))


def win_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: "NSAConfig",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv) -> (T, Hq, Dv).

    Query t attends s in [max(0, t - w + 1), t] of its own sequence (``masks.win_visible``):
    w keys including itself, i.e. FA-2 window (w - 1, 0).
    """
    T, Hq, Dk = q.shape
    scale = cfg.softmax_scale(Dk)
    outs = []
    for a, b in varlen.seq_bounds(cu_seqlens, T):
        pos = torch.arange(b - a, device=q.device)
        visible = masks.win_visible_mask(pos, pos, cfg)[None]
        outs.append(attend(q[a:b], k[a:b], v[a:b], visible, scale)[0])
    return varlen.cat_rows(outs, q, (Hq, v.shape[-1]))
