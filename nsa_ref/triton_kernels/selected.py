"""NSA's selected branch in Triton, group-centric (the NSA paper's kernel design), with backward.

Forward, one program per (token t, KV head): the G query heads of the group share one selection,
so they are loaded together as the rows of one matrix (padded to >= 16 rows for the tensor cores);
the program walks the listed blocks of l' keys with an online softmax and masks keys s > t.

Backward, two kernels and no gradient held per query:
- dQ: the same walk, one program per (t, KV head), recomputing p from the saved log-sum-exp.
- dK/dV: key-block-centric. A reverse index lists, for every (KV head, key block), the tokens that
  selected it; one program per segment of at most ``DKV_SEGMENT`` such tokens keeps the block's
  K/V tile and accumulates its dK/dV over them. Blocks picked by many tokens (the forced initial
  block is picked by all) are split into several segments whose partial sums are added in fp32
  (``atomic_add``): with one or two segments per block the result is deterministic, beyond that
  the order of fp32 additions may vary between runs.

Block lists are sorted and de-duplicated first (a repeated block counts once, -1 is ignored).
fp32 inputs use IEEE fp32 dot products; fp16/bf16 use the tensor cores with fp32 accumulation;
fp64 inputs (for gradcheck) accumulate in fp64; on a GPU their results
differ from an fp64 reference by ~1e-8 relative (H100, as if exp2/log2 ran at fp32 precision),
through Triton's CPU interpreter by rounding only.

dK is accumulated transposed (q^T dS rather than dS^T q): with Triton 3.6 on an H100 the
dS^T q form gave dK relative errors of 1.6e-2 for 16-bit inputs with head dim >= 128 (2.4e-3
bf16 / 3.0e-4 fp16 transposed, equal to dQ's; fp32 and head dim 64 were right either way), and
both forms take the same time (artifacts/2026-11-25/triton_sel/triton_variants.csv).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from nsa_ref.triton_kernels.dtypes import acc_dtype, dot_precision, tl_acc
from nsa_ref.masks import unique_blocks
from nsa_ref.triton_kernels.layout import device_table, next_pow2
from nsa_ref.varlen import seq_lengths, token_positions

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig

LOG2E = 1.4426950408889634
#: Most query tokens one dK/dV program folds into a key block before handing on to the next.
DKV_SEGMENT = 256


@triton.jit
def _listed(idx_row, pos, n_sel, SEL_BLOCK, NP: tl.constexpr):
    """How many leading entries of a sorted, -1-padded block list hold a key s <= pos."""
    s = tl.arange(0, NP)
    j = tl.load(idx_row + s, mask=s < n_sel, other=-1)
    return tl.sum(((j >= 0) & (j * SEL_BLOCK <= pos)).to(tl.int32), 0)


@triton.jit
def _query_group(Q, POS, KSTART, sq_t, sq_h, G, Dk, GP: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    """This program's token t and KV head, and the G query heads of the group as rows (GP, BDK)."""
    t = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    pos = tl.load(POS + t)
    kstart = tl.load(KSTART + t).to(tl.int64)  # packed row of key position 0 of t's sequence
    g = tl.arange(0, GP)
    head = kvh * G + g
    gm = g < G
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    q = tl.load(Q + t * sq_t + head[:, None] * sq_h + dk[None, :], mask=gm[:, None] & (dk < Dk)[None, :], other=0.0)
    return t, kvh, pos, kstart, head, gm, dk, dv, q


@triton.jit
def _key_block(K, V, j, kstart, pos, kvh, sk_t, sk_h, sv_t, sv_h, Dk, Dv, SEL_BLOCK,
               BL: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    """Selection block j of the sequence whose keys start at packed row kstart: which of its
    keys are visible from position pos (s <= pos), and its K (BL, BDK) and V (BL, BDV) tiles."""
    offs = tl.arange(0, BL)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    kpos = j * SEL_BLOCK + offs
    kmask = (offs < SEL_BLOCK) & (kpos <= pos)
    rows = kstart + kpos  # packed rows of the keys
    k = tl.load(K + rows[:, None] * sk_t + kvh * sk_h + dk[None, :], mask=kmask[:, None] & (dk < Dk)[None, :], other=0.0)
    v = tl.load(V + rows[:, None] * sv_t + kvh * sv_h + dv[None, :], mask=kmask[:, None] & (dv < Dv)[None, :], other=0.0)
    return kmask, k, v


@triton.jit
def _sel_fwd_kernel(Q, K, V, IDX, POS, KSTART, O, LSE2,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, si_t, si_h, so_t, so_h,
                    Hq, G, Dk, Dv, n_sel, scale_log2, SEL_BLOCK,
                    GP: tl.constexpr, BL: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                    NP: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    t, kvh, pos, kstart, head, gm, dk, dv, q = _query_group(Q, POS, KSTART, sq_t, sq_h, G, Dk, GP, BDK, BDV)
    m_i = tl.full([GP], float("-inf"), ACC)
    l_i = tl.zeros([GP], ACC)
    acc = tl.zeros([GP, BDV], ACC)
    idx_row = IDX + t * si_t + kvh * si_h
    for s in range(_listed(idx_row, pos, n_sel, SEL_BLOCK, NP)):
        kmask, k, v = _key_block(K, V, tl.load(idx_row + s), kstart, pos, kvh, sk_t, sk_h, sv_t, sv_h, Dk, Dv,
                                 SEL_BLOCK, BL, BDK, BDV)
        # .to(ACC): under torch.compile inductor passes Python floats as fp64 scalars, which would
        # promote the loop-carried softmax state (H200, torch 2.11: fullgraph compile failed here).
        sc = (tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale_log2).to(ACC)
        sc = tl.where(kmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))  # finite: key j * l' <= t is always visible
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(O + t * so_t + head[:, None] * so_h + dv[None, :], out.to(O.dtype.element_ty), mask=gm[:, None] & (dv < Dv)[None, :])
    tl.store(LSE2 + t * Hq + head, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")), mask=gm)


@triton.jit
def _sel_dq_kernel(Q, K, V, DO, IDX, POS, KSTART, LSE2, DELTA, DQ,
                   sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, si_t, si_h, sd_t, sd_h, sdq_t, sdq_h,
                   Hq, G, Dk, Dv, n_sel, scale, scale_log2, SEL_BLOCK,
                   GP: tl.constexpr, BL: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                   NP: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    t, kvh, pos, kstart, head, gm, dk, dv, q = _query_group(Q, POS, KSTART, sq_t, sq_h, G, Dk, GP, BDK, BDV)
    do = tl.load(DO + t * sd_t + head[:, None] * sd_h + dv[None, :], mask=gm[:, None] & (dv < Dv)[None, :], other=0.0)
    lse2 = tl.load(LSE2 + t * Hq + head, mask=gm, other=float("inf"))
    delta = tl.load(DELTA + t * Hq + head, mask=gm, other=0.0)
    dq = tl.zeros([GP, BDK], ACC)
    idx_row = IDX + t * si_t + kvh * si_h
    for s in range(_listed(idx_row, pos, n_sel, SEL_BLOCK, NP)):
        kmask, k, v = _key_block(K, V, tl.load(idx_row + s), kstart, pos, kvh, sk_t, sk_h, sv_t, sv_h, Dk, Dv,
                                 SEL_BLOCK, BL, BDK, BDV)
        sc = (tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale_log2).to(ACC)
        p = tl.where(kmask[None, :], tl.exp2(sc - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)
    tl.store(DQ + t * sdq_t + head[:, None] * sdq_h + dk[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=gm[:, None] & (dk < Dk)[None, :])


@triton.jit
def _sel_dkv_kernel(Q, K, V, DO, POS, LSE2, DELTA, DK, DV, SEG, ENTRY_T, BLOCK_ROW0, BLOCK_LEN,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sd_t, sd_h, sdk_t, sdk_h, sdv_t, sdv_h,
                    Hq, G, Dk, Dv, n_blocks, scale, scale_log2, SEL_BLOCK,
                    GP: tl.constexpr, BL: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
                    NP: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    seg = tl.program_id(0)
    owner = tl.load(SEG + seg * 3)
    e0 = tl.load(SEG + seg * 3 + 1)
    e1 = tl.load(SEG + seg * 3 + 2)
    if e1 <= e0:  # a slot past the real segment count (the grid is an upper bound)
        return
    kvh = owner // n_blocks
    blk = owner % n_blocks
    row0 = tl.load(BLOCK_ROW0 + blk).to(tl.int64)  # packed row of the block's first key
    blen = tl.load(BLOCK_LEN + blk)  # its keys inside the sequence (< l' for the last block)
    offs = tl.arange(0, BL)
    rows = row0 + offs
    g = tl.arange(0, GP)
    head = kvh * G + g
    gm = g < G
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    lmask = offs < blen
    k = tl.load(K + rows[:, None] * sk_t + kvh * sk_h + dk[None, :], mask=lmask[:, None] & (dk < Dk)[None, :], other=0.0)
    v = tl.load(V + rows[:, None] * sv_t + kvh * sv_h + dv[None, :], mask=lmask[:, None] & (dv < Dv)[None, :], other=0.0)
    dk_acc_t = tl.zeros([BDK, BL], ACC)  # dK transposed: see the note in the module docstring
    dv_acc = tl.zeros([BL, BDV], ACC)
    for e in range(e0, e1):
        t = tl.load(ENTRY_T + e).to(tl.int64)
        q = tl.load(Q + t * sq_t + head[:, None] * sq_h + dk[None, :], mask=gm[:, None] & (dk < Dk)[None, :], other=0.0)
        do = tl.load(DO + t * sd_t + head[:, None] * sd_h + dv[None, :], mask=gm[:, None] & (dv < Dv)[None, :], other=0.0)
        lse2 = tl.load(LSE2 + t * Hq + head, mask=gm, other=float("inf"))
        delta = tl.load(DELTA + t * Hq + head, mask=gm, other=0.0)
        kmask = lmask & (rows <= t)
        sc = (tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale_log2).to(ACC)
        p = tl.where(kmask[None, :], tl.exp2(sc - lse2[:, None]), 0.0)  # (GP, BL)
        dv_acc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = tl.where(kmask[None, :], p * (dp - delta[:, None]), 0.0)
        dk_acc_t += tl.dot(tl.trans(q), ds.to(q.dtype), input_precision=PREC, out_dtype=ACC)
    tl.atomic_add(DK + rows[None, :] * sdk_t + kvh * sdk_h + dk[:, None], (dk_acc_t * scale).to(ACC), mask=lmask[None, :] & (dk < Dk)[:, None])
    tl.atomic_add(DV + rows[:, None] * sdv_t + kvh * sdv_h + dv[None, :], dv_acc, mask=lmask[:, None] & (dv < Dv)[None, :])


#: Launch options per kernel (tuned on an H100, artifacts/2026-11-25/triton_sel).
LAUNCH = {"fwd": dict(num_warps=4, num_stages=2), "dq": dict(num_warps=4), "dkv": dict(num_warps=4)}


def _geometry(q, k, v, lp: int, n_sel: int):
    T, Hq, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    return dict(Hq=Hq, G=G, Dk=Dk, Dv=Dv), dict(
        GP=next_pow2(G, 16), BL=next_pow2(lp, 16), BDK=next_pow2(Dk, 16), BDV=next_pow2(Dv, 16),
        NP=next_pow2(n_sel), PREC=dot_precision(q.dtype), ACC=tl_acc(q.dtype),
    )


def _reverse_index(idx: torch.Tensor, pos: torch.Tensor, lengths: list[int], lp: int):
    """For dK/dV: (segments (S, 3) int32 [owner, first entry, end entry], tokens (E,) int32,
    block_row0 (NB,) int32, block_len (NB,) int32, NB) where owner = kvh * NB + global key block and the entries of one
    owner list the tokens that selected that block, in ascending token order."""
    T, Hkv, n = idx.shape
    device = idx.device
    nbs = [-(-L // lp) for L in lengths]
    NB = sum(nbs)
    blk_base = device_table([0] + nbs[:-1], device, torch.int64).cumsum(0)
    starts = device_table([0] + lengths[:-1], device, torch.int64).cumsum(0)
    seq_of_block = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                           device_table(nbs, device, torch.int64), output_size=NB)
    j_of_block = torch.arange(NB, device=device) - blk_base[seq_of_block]
    block_row0 = (starts[seq_of_block] + j_of_block * lp).to(torch.int32)
    block_len = torch.clamp(device_table(lengths, device, torch.int64)[seq_of_block] - j_of_block * lp,
                            max=lp).to(torch.int32)
    seq_lens = device_table(lengths, device, torch.int64)
    seq_of_tok = torch.repeat_interleave(torch.arange(len(lengths), device=device), seq_lens, output_size=T)
    j = idx.to(torch.int64)
    ok = (j >= 0) & (j * lp <= pos.to(torch.int64)[:, None, None])
    owner = torch.arange(Hkv, device=device)[None, :, None] * NB + blk_base[seq_of_tok][:, None, None] + j
    owner = torch.where(ok, owner, Hkv * NB)  # invalid entries sort last and are dropped
    flat = owner.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    tokens = (order // (Hkv * n)).to(torch.int32)
    # No host read here (a backward that syncs cannot run under CUDA graphs or sync-debug mode):
    # counts by scatter_add (bincount sizes its output from a device max), and the grid is an
    # upper bound on the segment count, sum ceil(c / S) <= ceil(E / S) + owners; the slots past
    # the real count get an empty entry range, and the kernel skips them.
    owners = Hkv * NB
    counts = torch.zeros(owners + 1, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat))[:owners]
    ends = counts.cumsum(0)
    begins = ends - counts
    nseg = (counts + DKV_SEGMENT - 1) // DKV_SEGMENT
    seg_ends = nseg.cumsum(0)
    bound = -(-flat.numel() // DKV_SEGMENT) + owners
    slot = torch.arange(bound, device=device)
    seg_owner = torch.searchsorted(seg_ends, slot, right=True)
    real = seg_owner < owners
    seg_owner = seg_owner.clamp(max=max(owners - 1, 0))
    seg_rank = slot - (seg_ends - nseg)[seg_owner]
    e0 = torch.where(real, begins[seg_owner] + seg_rank * DKV_SEGMENT, 0)
    e1 = torch.where(real, torch.minimum(e0 + DKV_SEGMENT, ends[seg_owner]), 0)
    segments = torch.stack([seg_owner, e0, e1], dim=1).to(torch.int32).contiguous()
    return segments, tokens, block_row0, block_len, NB


class _SelectedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, idx, pos, kstart, lengths, scale, lp):
        T, Hq, _ = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        dims, consts = _geometry(q, k, v, lp, idx.shape[-1])
        o = torch.empty(T, Hq, Dv, dtype=q.dtype, device=q.device)
        lse2 = torch.empty(T, Hq, dtype=acc_dtype(q.dtype), device=q.device)
        if T:
            _sel_fwd_kernel[(T, Hkv)](
                q, k, v, idx, pos, kstart, o, lse2, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                v.stride(0), v.stride(1), idx.stride(0), idx.stride(1), o.stride(0), o.stride(1),
                dims["Hq"], dims["G"], dims["Dk"], dims["Dv"], idx.shape[-1], scale * LOG2E, lp, **consts, **LAUNCH["fwd"],
            )
        ctx.save_for_backward(q, k, v, idx, pos, kstart, o, lse2)
        ctx.lengths, ctx.scale, ctx.lp = lengths, scale, lp
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, idx, pos, kstart, o, lse2 = ctx.saved_tensors
        scale, lp = ctx.scale, ctx.lp
        T, Hq, _ = q.shape
        Hkv = k.shape[1]
        dims, consts = _geometry(q, k, v, lp, idx.shape[-1])
        do = do.contiguous()
        acc = acc_dtype(q.dtype)
        delta = (do.to(acc) * o.to(acc)).sum(-1).contiguous()
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # dense, whatever q's strides
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        if T:
            _sel_dq_kernel[(T, Hkv)](
                q, k, v, do, idx, pos, kstart, lse2, delta, dq, q.stride(0), q.stride(1), k.stride(0),
                k.stride(1), v.stride(0), v.stride(1), idx.stride(0), idx.stride(1), do.stride(0),
                do.stride(1), dq.stride(0), dq.stride(1), dims["Hq"], dims["G"], dims["Dk"], dims["Dv"], idx.shape[-1], scale,
                scale * LOG2E, lp, **consts, **LAUNCH["dq"],
            )
            segments, tokens, block_row0, block_len, NB = _reverse_index(idx, pos, ctx.lengths, lp)
            if segments.shape[0]:
                _sel_dkv_kernel[(segments.shape[0],)](
                    q, k, v, do, pos, lse2, delta, dk, dv, segments, tokens, block_row0, block_len,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                    dims["Hq"], dims["G"], dims["Dk"], dims["Dv"], NB, scale, scale * LOG2E, lp, **consts,
                    **LAUNCH["dkv"],
                )
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def sel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                  cfg: "NSAConfig", cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv), block_idx: (T, Hkv, n) int -> (T, Hq, Dv).

    Query t (head h) attends the tokens s <= t of the blocks in block_idx[t, h // G]; -1 entries
    and repeats are ignored; a row with nothing listed gives 0. Differentiable in q, k and v.
    """
    T = q.shape[0]
    lengths = seq_lengths(cu_seqlens, T)
    pos, start = token_positions(cu_seqlens, T, q.device)
    pos = pos.to(torch.int32)
    idx = unique_blocks(block_idx)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _SelectedAttention.apply(q, k, v, idx, pos, start, lengths,
                                    cfg.softmax_scale(q.shape[-1]), cfg.sel_block)


@torch.no_grad()
def sel_attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                         cfg: "NSAConfig", pos: torch.Tensor, k_start: torch.Tensor) -> torch.Tensor:
    """Forward only, for decode. q: (B, Hq, Dk), one query per sequence at local position
    pos[b]; k: (S, Hkv, Dk), v: (S, Hkv, Dv) hold sequence b's keys from row k_start[b];
    block_idx: (B, Hkv, n) -> (B, Hq, Dv). Same rules as ``sel_attention``."""
    B, Hq, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    o = torch.empty(B, Hq, Dv, dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    idx = unique_blocks(block_idx)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    pos = pos.to(device=q.device, dtype=torch.int32).contiguous()
    k_start = k_start.to(device=q.device, dtype=torch.int64).contiguous()
    lse2 = torch.empty(B, Hq, dtype=acc_dtype(q.dtype), device=q.device)
    dims, consts = _geometry(q, k, v, cfg.sel_block, idx.shape[-1])
    _sel_fwd_kernel[(B, Hkv)](
        q, k, v, idx, pos, k_start, o, lse2, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), idx.stride(0), idx.stride(1), o.stride(0), o.stride(1),
        dims["Hq"], dims["G"], dims["Dk"], dims["Dv"], idx.shape[-1], cfg.softmax_scale(q.shape[-1]) * LOG2E,
        cfg.sel_block, **consts, **LAUNCH["fwd"],
    )
    return o


__all__ = ["DKV_SEGMENT", "sel_attention", "sel_attention_decode"]
