"""NSA decode sel and win attention in Triton, straight from the paged raw cache: no gather.

    decode_sel(q, raw, seqlens, block_idx, cfg) -> o_sel (B, Hq, Dv) in q's dtype
    decode_win(q, raw, seqlens, cfg)            -> o_win (B, Hq, Dv): the same kernel over the window
    decode_sel_win(q, raw, seqlens, block_idx, o_cmp, gates, cfg) -> the gated output (B, Hq, Dv):
        sel and win in one launch, then one merge launch that applies the gates

One program per (sequence b, KV head h), grid (B, Hkv) (on a GPU where B * Hkv leaves SMs idle:
(B, Hkv, splits) over the n_sel entries and a merge launch, ``split_count``): its G query heads are the rows of one
(G, Dk) matrix (padded to 16 rows for the dot products); for each of the n_sel entries of
block_idx[b, h] (-1: skipped) it reads the l' tokens of that selection block through the block
table (token s at k_pages[block_table[b, s // P], s % P, h]), masks s > t (t = seqlens[b] - 1, read on
the device) and runs an online softmax, accumulating in fp32 (fp64 for fp64 inputs). A row with
no visible key gives 0, as ``decode_torch_path.attend_fixed``. What ``decode_fast``'s sel branch
computes (``decode_torch_path.sel_gather`` + ``attend_fixed`` or the FA-2 call over the
gathered slots), to rounding.
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
#: forces that target (tests run the split path on the interpreter with it). 3 stages: the fused
#: sel + win at 64K on the H200, B 64: 72.4 us vs 81.9 at 2 (B 16: 33.0 vs 31.9; decode_tune.py).
TUNING = {"num_warps": 4, "num_stages": 3, "split_programs": None}


@triton.jit
def _decode_sel_kernel(
    Q, KP_, VP_, BT, SEQ, IDX, OUT, PART_M, PART_L, PART_ACC,
    sq_b, sq_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, sbt_b, si_b, si_h, so_b, so_h,
    G, Dk, Dv, P, scale, n_sel, n_win, per_sel, per_win, s_sel, BLOCK, win_back,
    GP: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BL: tl.constexpr, DIRECT: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    """Program z of (b, h): z < s_sel: sel split z, the entries [z per_sel, (z+1) per_sel) of the
    n_sel blocks listed in IDX; else win split z - s_sel, tiles [.. per_win ..) of the n_win tiles
    of BLOCK tokens from the one holding lo = max(t - win_back, 0), tokens s in [lo, t]. DIRECT (one
    program per (b, h), one branch): the normalised rows to OUT; else (max, sum, acc) to PART[z]."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    z = tl.program_id(2)
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
    is_win = z >= s_sel
    lo = tl.where(is_win, tl.maximum(t - win_back, 0), 0)
    r_lo = tl.where(is_win, (z - s_sel) * per_win, z * per_sel)
    r_hi = tl.where(is_win, tl.minimum(n_win, r_lo + per_win), tl.minimum(n_sel, r_lo + per_sel))
    for r in range(r_lo, r_hi):
        listed = tl.load(idx_row + r, mask=(r < n_sel) & (z < s_sel), other=0)
        j = tl.where(is_win, lo // BLOCK + r, listed)
        s_tok = j * BLOCK + u
        ok = (u < BLOCK) & (s_tok >= lo) & (s_tok <= t)  # j = -1: every s_tok < 0
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
    if DIRECT:
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(OUT + b.to(tl.int64) * so_b + head[:, None] * so_h + dv[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & (dv < Dv)[None, :])
    else:  # partial softmax state of this program, merged by _merge_kernel
        part = ((b.to(tl.int64) * tl.num_programs(1) + kvh) * tl.num_programs(2) + z) * GP + g
        tl.store(PART_M + part, m_i)
        tl.store(PART_L + part, l_i)
        tl.store(PART_ACC + part[:, None] * BDV + dv[None, :], acc)


@triton.jit
def _merged(PART_M, PART_L, PART_ACC, base, first, count, GP: tl.constexpr, BDV: tl.constexpr, ACC: tl.constexpr):
    """Partials first .. first + count - 1 of one (b, h) (base: its first partial) -> (GP, BDV)
    rows, 0 where nothing was visible. One partial at a time (an online merge): a (splits, GP, BDV)
    block in registers spills once there are 8 splits."""
    g = tl.arange(0, GP)
    dv = tl.arange(0, BDV)
    m_all = tl.full([GP], float("-inf"), ACC)
    l_all = tl.zeros([GP], ACC)
    acc = tl.zeros([GP, BDV], ACC)
    for sp in range(count):
        part = (base + first + sp) * GP + g
        m = tl.load(PART_M + part)
        m_new = tl.maximum(m_all, m)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a_old = tl.exp(m_all - m_safe)  # exp(-inf) = 0: nothing seen yet / by this partial
        a_new = tl.exp(m - m_safe)
        l_all = l_all * a_old + tl.load(PART_L + part) * a_new
        acc = acc * a_old[:, None] + tl.load(PART_ACC + part[:, None] * BDV + dv[None, :]) * a_new[:, None]
        m_all = m_new
    return tl.where(l_all[:, None] > 0, acc / tl.where(l_all > 0, l_all, 1.0)[:, None], 0.0)


@triton.jit
def _merge_kernel(PART_M, PART_L, PART_ACC, OCMP, GATES, OUT, so_b, so_h, sc_b, sc_h, sg_b, sg_h, G, Dv,
                  s_sel, s_win, GP: tl.constexpr, BDV: tl.constexpr, ACC: tl.constexpr, COMBINE: tl.constexpr):
    """(b, h): COMBINE: out = g_cmp * o_cmp + g_sel * merge(sel partials) + g_win * merge(win
    partials), in the accumulation dtype, rounded once; else out = merge of all s_sel + s_win partials
    (one branch)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    g = tl.arange(0, GP)
    dv = tl.arange(0, BDV)
    base = (b.to(tl.int64) * tl.num_programs(1) + kvh) * (s_sel + s_win)
    head = kvh * G + g
    mask = (g < G)[:, None] & (dv < Dv)[None, :]
    if COMBINE:
        o_sel = _merged(PART_M, PART_L, PART_ACC, base, 0, s_sel, GP, BDV, ACC)
        o_win = _merged(PART_M, PART_L, PART_ACC, base, s_sel, s_win, GP, BDV, ACC)
        o_cmp = tl.load(OCMP + b.to(tl.int64) * sc_b + head[:, None] * sc_h + dv[None, :], mask=mask, other=0.0)
        gate = GATES + b.to(tl.int64) * sg_b + head * sg_h
        g_cmp = tl.load(gate, mask=g < G, other=0.0).to(o_sel.dtype)
        g_sel = tl.load(gate + 1, mask=g < G, other=0.0).to(o_sel.dtype)
        g_win = tl.load(gate + 2, mask=g < G, other=0.0).to(o_sel.dtype)
        out = g_cmp[:, None] * o_cmp.to(o_sel.dtype) + g_sel[:, None] * o_sel + g_win[:, None] * o_win
    else:
        out = _merged(PART_M, PART_L, PART_ACC, base, 0, s_sel + s_win, GP, BDV, ACC)
    tl.store(OUT + b.to(tl.int64) * so_b + head[:, None] * so_h + dv[None, :], out.to(OUT.dtype.element_ty), mask=mask)


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
    -> o_sel (B, Hq, Dv) in q's dtype. One launch, grid (B, Hkv[, splits]), no host read."""
    return _launch(q, raw, seqlens, cfg, block_idx, window=False)


#: Tokens per tile of ``decode_win`` alone (``decode_sel_win`` walks the window in l' tiles).
WIN_TILE = 64


@torch.no_grad()
def decode_win(q: torch.Tensor, raw: "PagedView", seqlens: torch.Tensor, cfg: "NSAConfig") -> torch.Tensor:
    """The sliding-window branch: q (B, Hq, Dk) at t = seqlens - 1 sees tokens s in
    [max(t - w + 1, 0), t] (``masks.win_visible``) -> o_win (B, Hq, Dv) in q's dtype. The same kernel
    as ``decode_sel``, walking the ``WIN_TILE``-token tiles that hold the window instead of listed
    blocks: one launch, grid (B, Hkv[, splits]), the G query heads of a KV head in one program
    (FA-2's kvcache kernel gives each query head its own 64/128-row tile once a window is set)."""
    return _launch(q, raw, seqlens, cfg, None, window=True)


@torch.no_grad()
def decode_sel_win(q: torch.Tensor, raw: "PagedView", seqlens: torch.Tensor, block_idx: torch.Tensor,
                   o_cmp: torch.Tensor, gates: torch.Tensor, cfg: "NSAConfig") -> torch.Tensor:
    """sel and win in ONE launch, then the gated sum: q (B, Hq, Dk), block_idx (B, Hkv, n_sel),
    o_cmp (B, Hq, Dv), gates (B, Hq, 3) (cmp, sel, win) -> out (B, Hq, Dv) in q's dtype =
    g_cmp o_cmp + g_sel o_sel + g_win o_win (``api.combine_branches``, summed in fp32 and rounded
    once). Grid (B, Hkv, sel splits + win splits) writing partial softmax states, then one merge
    launch (B, Hkv) that also applies the gates: two launches where ``decode_sel`` + ``decode_win``
    + the torch combine take five or more."""
    return _launch(q, raw, seqlens, cfg, block_idx, window=True, o_cmp=o_cmp, gates=gates)


def _tiles(cfg: "NSAConfig", capacity: int, tile: int) -> int:
    """Tiles of ``tile`` tokens that hold a window of min(w, capacity) tokens ending anywhere."""
    width = min(cfg.window, capacity)
    return min(-(-max(width - 1, 0) // tile) + 1, -(-capacity // tile))


def _launch(q: torch.Tensor, raw: "PagedView", seqlens: torch.Tensor, cfg: "NSAConfig", block_idx: torch.Tensor | None,
            window: bool, o_cmp: torch.Tensor | None = None, gates: torch.Tensor | None = None) -> torch.Tensor:
    """``_decode_sel_kernel`` over the listed blocks (block_idx), the window (window=True), or both
    (then o_cmp and gates: combined), plus ``_merge_kernel`` where the work was split."""
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
    combine = block_idx is not None and window
    if combine:
        o_cmp = o_cmp if o_cmp.stride(-1) == 1 else o_cmp.contiguous()
        gates = gates if gates.stride(-1) == 1 else gates.contiguous()
    block = cfg.sel_block if block_idx is not None else WIN_TILE
    if block_idx is not None:
        idx = block_idx if block_idx.stride(-1) == 1 else block_idx.contiguous()
        n_sel = idx.shape[-1]
        s_sel = split_count(B, Hkv, n_sel, q.device)
    else:
        idx, n_sel, s_sel = table, 0, 0  # idx never read
    n_win = _tiles(cfg, raw.capacity, block) if window else 0
    s_win = split_count(B, Hkv, n_win, q.device) if window else 0
    programs = s_sel + s_win
    direct = programs == 1 and not combine
    GP, BDV = next_pow2(Hq // Hkv, 16), next_pow2(Dv, 16)
    if direct:
        pm = pl = pacc = out  # never written
    else:
        acc_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        pm = torch.empty(B, Hkv, programs, GP, dtype=acc_dt, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B, Hkv, programs, GP, BDV, dtype=acc_dt, device=q.device)
    _decode_sel_kernel[(B, Hkv, programs)](
        q, kp, vp, table, seqlens, idx, out, pm, pl, pacc,
        q.stride(0), q.stride(1), kp.stride(0), kp.stride(1), kp.stride(2), vp.stride(0), vp.stride(1), vp.stride(2),
        table.stride(0), idx.stride(0), idx.stride(1) if idx.dim() > 2 else 0, out.stride(0), out.stride(1),
        Hq // Hkv, Dk, Dv, kp.shape[1], cfg.softmax_scale(Dk), n_sel, n_win,
        -(-n_sel // max(s_sel, 1)), -(-n_win // max(s_win, 1)), s_sel, block, cfg.window - 1,
        GP=GP, BD=next_pow2(Dk, 16), BDV=BDV, BL=next_pow2(block, 16), DIRECT=direct,
        PREC=dot_precision(q.dtype), ACC=tl_acc(q.dtype),
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"],
    )
    if not direct:
        oc = o_cmp if combine else out  # never read without combine
        gt = gates if combine else out
        _merge_kernel[(B, Hkv)](pm, pl, pacc, oc, gt, out, out.stride(0), out.stride(1), oc.stride(0), oc.stride(1),
                                gt.stride(0), gt.stride(1), Hq // Hkv, Dv, s_sel if combine else programs,
                                s_win if combine else 0, GP=GP, BDV=BDV, ACC=tl_acc(q.dtype), COMBINE=combine, num_warps=4)
    return out


__all__ = ["decode_sel", "decode_sel_win", "decode_win", "refusal"]
