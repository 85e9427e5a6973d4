"""NSA decode sel and win attention, one Triton launch each, straight from the paged raw cache: no gather.

    decode_sel(q, raw, seqlens, block_idx, cfg) -> o_sel (B, Hq, Dv) in q's dtype
    decode_win(q, raw, seqlens, cfg)            -> o_win (B, Hq, Dv): the same kernel over the window

One program per (sequence b, KV head h), grid (B, Hkv) (on a GPU where B * Hkv leaves SMs idle:
(B, Hkv, splits) over the n_sel entries and a merge launch, ``split_count``): its G query heads are the rows of one
(G, Dk) matrix (padded to 16 rows for the dot products); for each of the n_sel entries of
block_idx[b, h] (-1: skipped) it reads the l' tokens of that selection block through the block
table (token s at k_pages[block_table[b, s // P], s % P, h]), masks s > t (t = seqlens[b] - 1, read on
the device) and runs an online softmax, accumulating in fp32 (fp64 for fp64 inputs). A row with
no visible key gives 0, as ``decode_fast.attend_fixed``. What ``decode_fast``'s sel branch computes
(``sel_gather`` + ``attend_fixed`` or the FA-2 call over the gathered slots), to rounding.
Capturable in a CUDA graph: the launch depends on the cache's geometry only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from nsa_ref.triton_kernels.dtypes import dot_precision, tl_acc
from nsa_ref.triton_kernels.layout import next_pow2, split_programs

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig
    from nsa_ref.kv_cache import PagedView

MAX_HEAD_DIM = 256
#: split_programs: None = about two programs per SM on a GPU, one per (b, h) elsewhere; an int
#: forces that target (tests run the split path on the interpreter with it).
TUNING = {"num_warps": 4, "num_stages": 2, "split_programs": None}


@triton.jit
def _decode_sel_kernel(
    Q, KP_, VP_, BT, SEQ, IDX, OUT, PART_M, PART_L, PART_ACC,
    sq_b, sq_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, sbt_b, si_b, si_h, so_b, so_h,
    G, Dk, Dv, P, scale, n_sel, SEL_BLOCK, per_split, win_back,
    GP: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BL: tl.constexpr, SPLITS: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, WINDOW: tl.constexpr,
):
    """sel (WINDOW False): the n_sel blocks listed in IDX. win (WINDOW True): the n_sel tiles of
    SEL_BLOCK tokens from the one holding lo = max(t - win_back, 0), tokens s in [lo, t]."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    t = tl.load(SEQ + b) - 1
    g = tl.arange(0, GP)
    row_ok = g < G
    head = kvh * G + g
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    q = tl.load(Q + b.to(tl.int64) * sq_b + head[:, None] * sq_h + d[None, :],
                mask=row_ok[:, None] & (d < Dk)[None, :], other=0.0)
    m_i = tl.full([GP], float("-inf"), ACC)
    l_i = tl.zeros([GP], ACC)
    acc = tl.zeros([GP, BDV], ACC)
    u = tl.arange(0, BL)
    idx_row = IDX + b.to(tl.int64) * si_b + kvh * si_h
    lo = 0
    if WINDOW:
        lo = tl.maximum(t - win_back, 0)
    r_lo = split * per_split
    r_hi = n_sel
    if SPLITS > 1:
        r_hi = tl.minimum(n_sel, r_lo + per_split)
    for r in range(r_lo, r_hi):
        if WINDOW:
            j = lo // SEL_BLOCK + r
        else:
            j = tl.load(idx_row + r)
        s_tok = j * SEL_BLOCK + u
        ok = (u < SEL_BLOCK) & (s_tok >= lo) & (s_tok <= t)  # j = -1: every s_tok < 0
        ssafe = tl.where(ok, s_tok, 0)
        page = tl.load(BT + b.to(tl.int64) * sbt_b + ssafe // P, mask=ok, other=0).to(tl.int64)
        off = (ssafe % P).to(tl.int64)
        k = tl.load(KP_ + (page * sk_p + off * sk_s + kvh * sk_h)[:, None] + d[None, :],
                    mask=ok[:, None] & (d < Dk)[None, :], other=0.0)
        v = tl.load(VP_ + (page * sv_p + off * sv_s + kvh * sv_h)[:, None] + dv[None, :],
                    mask=ok[:, None] & (dv < Dv)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    if SPLITS > 1:  # partial softmax state of this split, merged by _merge_sel_kernel
        part = ((b.to(tl.int64) * tl.num_programs(1) + kvh) * SPLITS + split) * GP + g
        tl.store(PART_M + part, m_i)
        tl.store(PART_L + part, l_i)
        tl.store(PART_ACC + part[:, None] * BDV + dv[None, :], acc)
    else:
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(OUT + b.to(tl.int64) * so_b + head[:, None] * so_h + dv[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & (dv < Dv)[None, :])


@triton.jit
def _merge_sel_kernel(PART_M, PART_L, PART_ACC, OUT, so_b, so_h, G, Dv,
                      GP: tl.constexpr, BDV: tl.constexpr, SPLITS: tl.constexpr):
    """The SPLITS partial (max, sum, acc) of (b, h) -> o_sel rows, 0 where nothing was visible."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.arange(0, SPLITS)
    g = tl.arange(0, GP)
    dv = tl.arange(0, BDV)
    base = (b.to(tl.int64) * tl.num_programs(1) + kvh) * SPLITS
    part = (base + sp)[:, None] * GP + g[None, :]  # (SPLITS, GP)
    m = tl.load(PART_M + part)
    l = tl.load(PART_L + part)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp(m - m_safe[None, :])  # exp(-inf) = 0 for splits that saw nothing
    l_all = tl.sum(w * l, 0)
    acc = tl.sum(tl.load(PART_ACC + part[:, :, None] * BDV + dv[None, None, :]) * w[:, :, None], 0)
    out = tl.where(l_all[:, None] > 0, acc / tl.where(l_all > 0, l_all, 1.0)[:, None], 0.0)
    head = kvh * G + g
    tl.store(OUT + b.to(tl.int64) * so_b + head[:, None] * so_h + dv[None, :], out.to(OUT.dtype.element_ty),
             mask=(g < G)[:, None] & (dv < Dv)[None, :])


def split_count(B: int, Hkv: int, n_sel: int, device: torch.device) -> int:
    """Programs per (sequence, KV head): a power of two bringing B * Hkv * splits to about two per SM
    on a GPU (``TUNING["split_programs"]`` overrides the target), at most n_sel / 2; 1 elsewhere."""
    return split_programs(B * Hkv, n_sel // 2, device, TUNING.get("split_programs"))


def refusal(q: torch.Tensor, raw: "PagedView") -> str | None:
    """Why ``decode_sel`` cannot take these inputs (None: it can)."""
    from nsa_ref.triton_kernels import unavailable_reason

    why = unavailable_reason(q)
    if why is not None:
        return why
    if q.dim() != 3:
        return f"q must be (B, Hq, Dk), got {tuple(q.shape)}"
    if max(q.shape[-1], raw.v_pages.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims {q.shape[-1]} / {raw.v_pages.shape[-1]}: wider than {MAX_HEAD_DIM}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {q.dtype}"
    if raw.k_pages.dtype != q.dtype or raw.k_pages.device != q.device:
        return f"raw pages {raw.k_pages.dtype} on {raw.k_pages.device}, q {q.dtype} on {q.device}"
    return None


@torch.no_grad()
def decode_sel(q: torch.Tensor, raw: "PagedView", seqlens: torch.Tensor, block_idx: torch.Tensor,
               cfg: "NSAConfig") -> torch.Tensor:
    """q (B, Hq, Dk), raw: the raw store (``NSAKVCache.views()[0]``), seqlens (B,) int32 (the query
    sits at seqlens - 1), block_idx (B, Hkv, n_sel) int32 (``selection.top_blocks``'s layout)
    -> o_sel (B, Hq, Dv) in q's dtype. One launch, grid (B, Hkv), no host read."""
    idx = block_idx if block_idx.stride(-1) == 1 else block_idx.contiguous()
    return _launch(q, raw, seqlens, cfg.softmax_scale(q.shape[-1]), idx, idx.shape[-1], cfg.sel_block, -1)


#: Tokens per tile of ``decode_win``.
WIN_TILE = 64


@torch.no_grad()
def decode_win(q: torch.Tensor, raw: "PagedView", seqlens: torch.Tensor, cfg: "NSAConfig") -> torch.Tensor:
    """The sliding-window branch: q (B, Hq, Dk) at t = seqlens - 1 sees tokens s in
    [max(t - w + 1, 0), t] (``masks.win_visible``) -> o_win (B, Hq, Dv) in q's dtype. The same kernel
    as ``decode_sel``, walking the ``WIN_TILE``-token tiles that hold the window instead of listed
    blocks: one launch, grid (B, Hkv[, splits]), the G query heads of a KV head in one program
    (FA-2's kvcache kernel gives each query head its own 64/128-row tile once a window is set)."""
    width = min(cfg.window, raw.capacity)
    tiles = min(-(-max(width - 1, 0) // WIN_TILE) + 1, -(-raw.capacity // WIN_TILE))
    return _launch(q, raw, seqlens, cfg.softmax_scale(q.shape[-1]), None, tiles, WIN_TILE, cfg.window - 1)


def _launch(q: torch.Tensor, raw: "PagedView", seqlens: torch.Tensor, scale: float, idx: torch.Tensor | None,
            n_sel: int, block: int, win_back: int) -> torch.Tensor:
    """One ``_decode_sel_kernel`` launch (+ merge): the listed blocks (idx) or, with idx None, the
    window of win_back + 1 tokens ending at t walked in n_sel tiles of ``block`` tokens."""
    B, Hq, Dk = q.shape
    Hkv, Dv = raw.k_pages.shape[2], raw.v_pages.shape[3]
    out = torch.empty(B, Hq, Dv, dtype=q.dtype, device=q.device)
    if B == 0 or Hkv == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    kp = raw.k_pages if raw.k_pages.stride(-1) == 1 else raw.k_pages.contiguous()
    vp = raw.v_pages if raw.v_pages.stride(-1) == 1 else raw.v_pages.contiguous()
    table = raw.block_table
    if table.shape[1] == 0:  # zero capacity: nothing visible (every block index -1)
        table = torch.zeros(B, 1, dtype=torch.int32, device=q.device)
    window = idx is None
    if window:
        idx = table  # never read
    GP, BDV = next_pow2(Hq // Hkv, 16), next_pow2(Dv, 16)
    splits = split_count(B, Hkv, n_sel, q.device)
    per_split = -(-n_sel // splits)
    if splits > 1:
        acc_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        pm = torch.empty(B, Hkv, splits, GP, dtype=acc_dt, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B, Hkv, splits, GP, BDV, dtype=acc_dt, device=q.device)
    else:
        pm = pl = pacc = out  # never written
    _decode_sel_kernel[(B, Hkv, splits)](
        q, kp, vp, table, seqlens, idx, out, pm, pl, pacc,
        q.stride(0), q.stride(1), kp.stride(0), kp.stride(1), kp.stride(2), vp.stride(0), vp.stride(1), vp.stride(2),
        table.stride(0), idx.stride(0), idx.stride(1) if idx.dim() > 2 else 0, out.stride(0), out.stride(1),
        Hq // Hkv, Dk, Dv, kp.shape[1], scale, n_sel, block, per_split, win_back,
        GP=GP, BD=next_pow2(Dk, 16), BDV=BDV, BL=next_pow2(block, 16), SPLITS=splits,
        PREC=dot_precision(q.dtype), ACC=tl_acc(q.dtype), WINDOW=window,
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"],
    )
    if splits > 1:
        _merge_sel_kernel[(B, Hkv)](pm, pl, pacc, out, out.stride(0), out.stride(1), Hq // Hkv, Dv,
                                    GP=GP, BDV=BDV, SPLITS=splits, num_warps=4)
    return out


__all__ = ["decode_sel", "decode_win", "refusal"]
