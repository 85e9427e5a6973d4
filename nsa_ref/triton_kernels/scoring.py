"""NSA block selection in Triton: fused block scoring and top-n (nsa_spec.md, "Selection").

None of the kernels materialises the cmp probabilities p_cmp (T, Hq, Tc):

1. ``_cmp_lse_kernel`` (only when the caller has no log-sum-exp from its cmp branch): the natural
   log-sum-exp of the cmp scores per (t, h) over visible blocks, -inf where none is visible.
2. ``_slc_scores_kernel``: one program per (tile of query positions, KV head) holds the G query
   heads of the tile as the rows of one matrix, recomputes q . k_cmp tile by tile, turns it into
   p = exp(s - lse) on visible blocks, sums the G heads, and maps compression blocks to selection
   blocks with the overlap weights, writing p_slc (rows, Hkv, nb) in fp32.
   Cells of d tokens make the mapping exact: compression block i covers cells i..i+l/d-1,
   selection block j covers cells j*R..j*R+R-1 (R = l'/d), and w(j, i) is the number of shared
   cells. With tiles of compression blocks aligned to R, block i = j*R + m adds
   w_s[m] = |[m, m + l/d) ∩ [s*R, (s+1)*R)| times its probability to selection block j + s.
   Each shift s goes to its own plane of the scores with plain stores (a program owns its rows,
   and its tiles cover disjoint selection blocks per shift); top-n sums the planes. The unaligned
   fold (and ``TUNING["score_split"] = False``) adds atomically into one plane instead.
3. ``_topn_kernel``: per (t, KV head) packs (score, lower index first) into one int64 key, forces
   the initial and local blocks (key of +inf), drops blocks after the current one, keeps the n
   largest keys with a running bitonic top-k, and writes the block indices sorted, -1 padded.

Scores are fp32 (fp64 for fp64 inputs, whose top-n then runs through ``nsa_ref.selection.top_blocks``:
the int64 key has room for a 32-bit score only); fp32 and fp64 inputs use IEEE dot products.
Summation order differs from the torch path (tiles, atomics), so scores agree to rounding, and
blocks whose scores tie within rounding may be picked differently.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from nsa_ref import masks
from nsa_ref.varlen import seq_lengths, token_positions
from nsa_ref.selection import top_blocks
from nsa_ref.triton_kernels.dtypes import acc_dtype, dot_precision, tl_acc
from nsa_ref.triton_kernels.layout import device_table, next_pow2, row_tiles

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig

LOG2E = 1.4426950408889634
#: Rows of the (query position x query head) matrix one scoring program holds.
SCORE_ROWS = 128
#: Compression blocks per inner step of the scoring kernels.
CMP_TILE = 64
#: Upper bound on p_slc entries (rows x Hkv x nb) held at once; queries are chunked beyond it.
SCORE_BUDGET = 1 << 28


@triton.jit
def _tile(TILES, BT: tl.constexpr, BLOCK_LEN, STRIDE):
    """This program's row tile (a row of ``layout.row_tiles``): first packed row, first local
    position, sequence length, first compressed row, and how many compressed blocks its last
    row sees."""
    T_ = TILES + tl.program_id(0) * 5
    row0 = tl.load(T_ + 0)
    pos0 = tl.load(T_ + 1)
    seqlen = tl.load(T_ + 2)
    cbase = tl.load(T_ + 3)
    tc = tl.load(T_ + 4)
    last = tl.minimum(pos0 + BT, seqlen) - 1
    n_vis = tl.minimum(tl.maximum(last - BLOCK_LEN + 1 + STRIDE, 0) // STRIDE, tc)
    return row0, pos0, seqlen, cbase, n_vis


@triton.jit
def _rows_and_q(Q, row0, pos0, seqlen, kvh, sq_t, sq_h, Hq, G, Dk,
                GP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """Rows r = t * GP + g of one tile: q (BT*GP, BD), local position, validity and lse offset per row."""
    r = tl.arange(0, BT * GP)
    tt = r // GP
    gg = r % GP
    pos = pos0 + tt
    valid = (pos < seqlen) & (gg < G)
    head = kvh * G + gg
    d = tl.arange(0, BD)
    q = tl.load(Q + (row0 + tt)[:, None].to(tl.int64) * sq_t + head[:, None] * sq_h + d[None, :],
                mask=valid[:, None] & (d < Dk)[None, :], other=0.0)
    return q, pos, valid, (row0 + tt).to(tl.int64) * Hq + head


@triton.jit
def _cmp_tile_scores(q, KC, cbase, i0, n_vis, kvh, pos, sk_t, sk_h, Dk, scale_log2, BLOCK_LEN, STRIDE,
                     BC: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """Compressed blocks i0..i0+BC-1: their indices, the scores q . k_cmp (rows, BC) in log2 units,
    and which (row, block) pairs are visible (the block ended at or before the row's position)."""
    d = tl.arange(0, BD)
    ci = i0 + tl.arange(0, BC)
    kc = tl.load(KC + (cbase + ci)[:, None].to(tl.int64) * sk_t + kvh * sk_h + d[None, :],
                 mask=(ci < n_vis)[:, None] & (d < Dk)[None, :], other=0.0)
    s = (tl.dot(q, tl.trans(kc), input_precision=PREC, out_dtype=ACC) * scale_log2).to(ACC)
    vis = (ci[None, :] * STRIDE + BLOCK_LEN - 1 <= pos[:, None]) & (ci < n_vis)[None, :]
    return ci, s, vis


@triton.jit
def _cmp_lse_kernel(Q, KC, LSE, TILES, sq_t, sq_h, sk_t, sk_h, Hq, G, Dk, scale_log2,
                    BLOCK_LEN, STRIDE,
                    GP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                    PREC: tl.constexpr, ACC: tl.constexpr):
    kvh = tl.program_id(1)
    row0, pos0, seqlen, cbase, n_vis = _tile(TILES, BT, BLOCK_LEN, STRIDE)
    q, pos, valid, lse_off = _rows_and_q(Q, row0, pos0, seqlen, kvh, sq_t, sq_h, Hq, G, Dk, GP, BT, BD)
    m_i = tl.full([BT * GP], float("-inf"), ACC)
    l_i = tl.zeros([BT * GP], ACC)
    for i0 in range(0, n_vis, BC):
        ci, s, vis = _cmp_tile_scores(q, KC, cbase, i0, n_vis, kvh, pos, sk_t, sk_h, Dk, scale_log2,
                                      BLOCK_LEN, STRIDE, BC, BD, PREC, ACC)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) / 1.4426950408889634, float("-inf"))
    tl.store(LSE + lse_off, lse, mask=valid)


@triton.jit
def _slc_scores_kernel(Q, KC, LSE, OUT, TILES, sq_t, sq_h, sk_t, sk_h, so_t, so_h, so_s, row_base,
                       Hq, G, Dk, scale_log2, BLOCK_LEN, STRIDE, SEL_BLOCK,
                       GP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
                       R: tl.constexpr, RW: tl.constexpr, S: tl.constexpr, ALIGNED: tl.constexpr,
                       SPLIT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    kvh = tl.program_id(1)
    row0, pos0, seqlen, cbase, n_vis = _tile(TILES, BT, BLOCK_LEN, STRIDE)
    q, pos, valid, lse_off = _rows_and_q(Q, row0, pos0, seqlen, kvh, sq_t, sq_h, Hq, G, Dk, GP, BT, BD)
    # Rows outside the tile get lse = +inf, so their p is exactly 0.
    lse2 = tl.load(LSE + lse_off, mask=valid, other=float("inf")) * 1.4426950408889634
    t_loc = tl.arange(0, BT)
    t_pos = pos0 + t_loc
    t_ok = t_pos < seqlen
    out_rows = OUT + (row0 - row_base + t_loc)[:, None].to(tl.int64) * so_t + kvh * so_h
    m = tl.arange(0, R if ALIGNED else 1)
    for i0 in range(0, n_vis, BC):
        ci, s, vis = _cmp_tile_scores(q, KC, cbase, i0, n_vis, kvh, pos, sk_t, sk_h, Dk, scale_log2,
                                      BLOCK_LEN, STRIDE, BC, BD, PREC, ACC)
        p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
        ps = tl.sum(tl.reshape(p, (BT, GP, BC)), 1)  # sum over the G heads of this KV head
        if ALIGNED:
            # R a power of two dividing BC: fold the R blocks starting in each selection block.
            pr = tl.reshape(ps, (BT, BC // R, R))
            j_first = i0 // R + tl.arange(0, BC // R)
            for sh in tl.static_range(S):
                w = tl.maximum(tl.minimum(m + RW, (sh + 1) * R) - tl.maximum(m, sh * R), 0).to(ACC)
                part = tl.sum(pr * w[None, None, :], 2)
                j = j_first + sh
                ok = t_ok[:, None] & (j[None, :] * SEL_BLOCK <= t_pos[:, None])
                if SPLIT:
                    # Plane sh of OUT: each (row, j) of it is written by one tile of this program only.
                    tl.store(out_rows + sh * so_s + j[None, :], part, mask=ok)
                else:
                    tl.atomic_add(out_rows + j[None, :], part, mask=ok)
        else:
            # Any R: every compression block adds to its own selection blocks (R-way address conflicts).
            j0 = ci // R
            for sh in tl.static_range(S):
                j = j0 + sh
                w = tl.maximum(tl.minimum(ci + RW, (j + 1) * R) - tl.maximum(ci, j * R), 0).to(ACC)
                ok = t_ok[:, None] & (j[None, :] * SEL_BLOCK <= t_pos[:, None]) & (ci < n_vis)[None, :] & (w > 0)[None, :]
                tl.atomic_add(out_rows + j[None, :], ps * w[None, :], mask=ok)


@triton.jit
def _topn_kernel(SC, IDX, POS, row_base, so_t, so_h, so_s, si_t, si_h, n_sel, n_init, n_local, SEL_BLOCK,
                 NP: tl.constexpr, BN: tl.constexpr, PLANES: tl.constexpr):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    row = row_base + r
    pos = tl.load(POS + row)
    c = pos // SEL_BLOCK
    big = 2147483647
    run = tl.full([NP], -1, tl.int64)
    sc_row = SC + r.to(tl.int64) * so_t + kvh * so_h
    for j0 in range(0, c + 1, BN):
        j = j0 + tl.arange(0, BN)
        cand = j <= c
        sc = tl.load(sc_row + j, mask=cand, other=0.0)
        for pl in tl.static_range(1, PLANES):  # the scoring kernel's planes (SPLIT), summed in order
            sc += tl.load(sc_row + pl * so_s + j, mask=cand, other=0.0)
        sc = sc + 0.0  # + 0.0 turns a -0.0 into +0.0
        bits = sc.to(tl.int32, bitcast=True).to(tl.int64)
        forced = (j < n_init) | (j > c - n_local)
        bits = tl.where(forced, 0x7F800000, bits)
        key = (bits << 32) | (big - j).to(tl.int64)
        key = tl.where(cand, key, -1)
        top = tl.topk(key, NP)
        run = tl.topk(tl.reshape(tl.join(run, top), (2 * NP,)), NP)
    slot = tl.arange(0, NP)
    keep = (run >= 0) & (slot < n_sel)
    jsel = big - (run & 0xFFFFFFFF)
    ordered = tl.sort(tl.where(keep, jsel, big))
    out = tl.where(ordered == big, -1, ordered).to(tl.int32)
    tl.store(IDX + row.to(tl.int64) * si_t + kvh * si_h + slot, out, mask=slot < n_sel)


def _cells(cfg: "NSAConfig") -> tuple[int, int, int]:
    """-> (R, RW, S): cells of d tokens per selection block and per compression block, and how
    many selection blocks one compression block can touch."""
    R = cfg.sel_block // cfg.block_stride
    RW = cfg.block_len // cfg.block_stride
    return R, RW, 1 + -(-(RW - 1) // R)


def _aligned(R: int) -> bool:
    """The fast fold: R a power of two dividing the compression tile."""
    return R & (R - 1) == 0 and R <= CMP_TILE


def score_planes(cfg: "NSAConfig", dtype: torch.dtype) -> int:
    """Planes of the selection scores ``_select`` holds: S (one per shift, plain stores) where the
    fold is aligned and top-n runs in Triton, else 1 (atomic adds; fp64 scores take torch's sort,
    which reads one plane)."""
    R, _, S = _cells(cfg)
    return S if TUNING["score_split"] and _aligned(R) and acc_dtype(dtype) != torch.float64 else 1


def _geometry(q: torch.Tensor, Hkv: int) -> tuple[int, int, int]:
    G = q.shape[1] // Hkv
    GP = next_pow2(G)
    rows = SCORE_ROWS if q.shape[-1] <= 128 else SCORE_ROWS // 2  # a 128 x 256 q tile overflows smem
    BT = max(1, rows // GP)
    return G, GP, BT


#: Launch parameters (H100 sweep in artifacts/2026-11-25/triton_sel/triton_variants.csv).
#: score_split: the aligned fold stores each of its S shifts into its own plane of the scores
#: (plain stores, summed by top-n) instead of atomic adds into one.
TUNING = {"score_warps": 8, "score_stages": 2, "topn_chunk": 256, "topn_warps": 1, "score_split": True}


def _launch_opts(Dk: int) -> dict:
    """Pipelining depth and warps by head dim (192/256-wide tiles leave room for 2 stages)."""
    return dict(num_warps=TUNING["score_warps"], num_stages=TUNING["score_stages"] if Dk <= 128 else 2)


def cmp_lse(q: torch.Tensor, k_cmp: torch.Tensor, cfg: "NSAConfig",
            cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk) -> lse (T, Hq) fp32 (fp64 for fp64 q), natural
    log, -inf where no compression block is visible. The same quantity the cmp branch returns."""
    T = q.shape[0]
    lengths = seq_lengths(cu_seqlens, T)
    _, _, BT = _geometry(q, k_cmp.shape[1])
    return _lse_for_tiles(q, k_cmp, cfg, row_tiles(lengths, BT, [masks.num_cmp_blocks(n, cfg) for n in lengths]))


def _lse_for_tiles(q, k_cmp, cfg, tiles) -> torch.Tensor:
    T, Hq, Dk = q.shape
    Hkv = k_cmp.shape[1]
    lse = torch.full((T, Hq), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    if T == 0 or not tiles:
        return lse
    q, k_cmp = _inner_contiguous(q), _inner_contiguous(k_cmp)
    G, GP, BT = _geometry(q, Hkv)
    table = device_table(tiles, q.device)
    _cmp_lse_kernel[(len(tiles), Hkv)](
        q, k_cmp, lse, table, q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1),
        Hq, G, Dk, cfg.softmax_scale(Dk) * LOG2E, cfg.block_len, cfg.block_stride,
        GP=GP, BT=BT, BC=CMP_TILE, BD=next_pow2(Dk, 16), PREC=dot_precision(q.dtype), ACC=tl_acc(q.dtype), **_launch_opts(Dk),
    )
    return lse


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _chunks(tiles, BT: int, per_row: int):
    """Consecutive runs of tiles whose rows x per_row stay within SCORE_BUDGET."""
    budget_rows = max(BT, SCORE_BUDGET // max(1, per_row))
    start = 0
    while start < len(tiles):
        end = start
        first_row = tiles[start][0]
        while end < len(tiles) and tiles[end][0] + BT - first_row <= budget_rows:
            end += 1
        end = max(end, start + 1)
        yield start, end
        start = end


@torch.no_grad()
def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, cfg: "NSAConfig",
                  cu_seqlens: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk) -> block_idx (T, Hkv, n_sel) int32.

    ``lse`` (T, Hq): the cmp branch's log-sum-exp (natural log, -inf for rows with no visible
    block), e.g. the second output of ``nsa_ref.fa2.cmp_attention``; computed here when None.
    Same rules as ``nsa_ref.selection.select_blocks``; inputs are assumed valid.
    """
    T = q.shape[0]
    lengths = seq_lengths(cu_seqlens, T)
    _, _, BT = _geometry(q, k_cmp.shape[1])
    tiles = row_tiles(lengths, BT, [masks.num_cmp_blocks(n, cfg) for n in lengths])
    pos = token_positions(cu_seqlens, T, q.device)[0].to(torch.int32)
    # max([0, ...]), not max(..., default=0): torch 2.11's dynamo breaks the graph on default=.
    nb_max = max([0, *(masks.num_sel_blocks(n, cfg) for n in lengths)])
    return _select(q, k_cmp, cfg, tiles, pos, nb_max, lse)


@torch.no_grad()
def select_blocks_decode(q: torch.Tensor, k_cmp: torch.Tensor, cfg: "NSAConfig", pos: list[int],
                         cmp_start: list[int], cmp_count: list[int]) -> torch.Tensor:
    """Decode: q: (B, Hq, Dk), one query per sequence at local position pos[b]; k_cmp:
    (Tc_total, Hkv, Dk) holds sequence b's cmp_count[b] compressed blocks from row cmp_start[b]
    -> block_idx (B, Hkv, n_sel) int32, the blocks prefill would select at that position."""
    tiles = [(b, p, p + 1, cs, tc) for b, (p, cs, tc) in enumerate(zip(pos, cmp_start, cmp_count))]
    nb_max = max([0, *(masks.num_sel_blocks(p + 1, cfg) for p in pos)])
    pos_t = torch.tensor(pos, dtype=torch.int32, device=q.device)
    return _select(q, k_cmp, cfg, tiles, pos_t, nb_max, None)


def _select(q, k_cmp, cfg, tiles, pos, nb_max, lse) -> torch.Tensor:
    """Scores then top-n for the query rows described by ``tiles`` (see ``layout.row_tiles``);
    pos: (T,) int32 local position of every row of q."""
    T, Hq, Dk = q.shape
    Hkv = k_cmp.shape[1]
    R, RW, S = _cells(cfg)
    out = torch.full((T, Hkv, cfg.n_sel), -1, dtype=torch.int32, device=q.device)
    if T == 0 or not tiles:
        return out
    q, k_cmp = _inner_contiguous(q), _inner_contiguous(k_cmp)
    if lse is None:
        lse = _lse_for_tiles(q, k_cmp, cfg, tiles)
    lse = lse.to(acc_dtype(q.dtype)).contiguous()
    G, GP, BT = _geometry(q, Hkv)
    table = device_table(tiles, q.device)
    NP = next_pow2(cfg.n_sel, 2)  # tl.topk cannot keep k = 1 (Triton 3.6 fails to compile it)
    BN = max(NP, min(TUNING["topn_chunk"], next_pow2(nb_max)))
    planes = score_planes(cfg, q.dtype)
    split = planes > 1
    for a, b in _chunks(tiles, BT, Hkv * nb_max * planes):
        row_base = tiles[a][0]
        last = tiles[b - 1]
        rows = last[0] + min(BT, last[2] - last[1]) - row_base
        scores = torch.zeros(planes, rows, Hkv, nb_max, dtype=acc_dtype(q.dtype), device=q.device)
        _slc_scores_kernel[(b - a, Hkv)](
            q, k_cmp, lse, scores, table[a:b], q.stride(0), q.stride(1), k_cmp.stride(0),
            k_cmp.stride(1), scores.stride(1), scores.stride(2), scores.stride(0), row_base, Hq, G, Dk,
            cfg.softmax_scale(Dk) * LOG2E, cfg.block_len, cfg.block_stride, cfg.sel_block,
            GP=GP, BT=BT, BC=CMP_TILE, BD=next_pow2(Dk, 16), R=R, RW=RW, S=S, ALIGNED=_aligned(R),
            SPLIT=split, PREC=dot_precision(q.dtype), ACC=tl_acc(q.dtype), **_launch_opts(Dk),
        )
        if scores.dtype == torch.float64:
            # The int64 key packs a 32-bit score: fp64 scores take torch's stable sort instead.
            out[row_base:row_base + rows] = top_blocks(scores[0], pos[row_base:row_base + rows].long(), cfg)
            continue
        _topn_kernel[(rows, Hkv)](
            scores, out, pos, row_base, scores.stride(1), scores.stride(2), scores.stride(0), out.stride(0),
            out.stride(1), cfg.n_sel, cfg.n_init, cfg.n_local, cfg.sel_block, NP=NP, BN=BN, PLANES=planes,
            num_warps=TUNING["topn_warps"],
        )
    return out


def block_scores(q: torch.Tensor, k_cmp: torch.Tensor, cfg: "NSAConfig",
                 cu_seqlens: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk) -> p_slc (T, Hkv, nb_max) (``dtypes.acc_dtype``), candidates only
    (entries j > t // l' are 0). For tests and diagnostics: holds every score at once."""
    T, Hq, Dk = q.shape
    Hkv = k_cmp.shape[1]
    R, RW, S = _cells(cfg)
    q, k_cmp = _inner_contiguous(q), _inner_contiguous(k_cmp)
    if lse is None:
        lse = cmp_lse(q, k_cmp, cfg, cu_seqlens)
    lengths = seq_lengths(cu_seqlens, T)
    nb_max = max([0, *(masks.num_sel_blocks(n, cfg) for n in lengths)])
    scores = torch.zeros(T, Hkv, nb_max, dtype=acc_dtype(q.dtype), device=q.device)
    if T == 0:
        return scores
    G, GP, BT = _geometry(q, Hkv)
    tiles = row_tiles(lengths, BT, [masks.num_cmp_blocks(n, cfg) for n in lengths])
    table = device_table(tiles, q.device)
    _slc_scores_kernel[(len(tiles), Hkv)](
        q, k_cmp, lse.to(acc_dtype(q.dtype)).contiguous(), scores, table, q.stride(0), q.stride(1),
        k_cmp.stride(0), k_cmp.stride(1), scores.stride(0), scores.stride(1), 0, 0, Hq, G, Dk,
        cfg.softmax_scale(Dk) * LOG2E, cfg.block_len, cfg.block_stride, cfg.sel_block,
        GP=GP, BT=BT, BC=CMP_TILE, BD=next_pow2(Dk, 16), R=R, RW=RW, S=S, ALIGNED=_aligned(R), SPLIT=False,
        PREC=dot_precision(q.dtype), ACC=tl_acc(q.dtype),
            **_launch_opts(Dk),
    )
    return scores


__all__ = ["block_scores", "cmp_lse", "select_blocks", "select_blocks_decode"]
