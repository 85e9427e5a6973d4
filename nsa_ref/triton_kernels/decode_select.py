"""NSA decode selection in one Triton launch: the blocks every sequence's last token selects, read
from the compressed cache as ``nsa_ref.decode_fast`` holds it (a page pool and its int32 block
table; the preallocated layout is one page per sequence), with every length read ON THE DEVICE.

    decode_select(q, cmp, seqlens, cfg, width=, num_sel=, lse=None) -> block_idx (B, Hkv, n_sel) int32

One program per (sequence b, KV head h), grid (B, Hkv) (or (B, Hkv, splits) and a merge launch
when B * Hkv leaves SMs idle: ``split_count``). It reads

    q        (B, Hq, Dk)          the step's queries (last dim contiguous)
    cmp      PagedView            k_pages (pages, Pc, Hkv, Dk), block_table (B, max_pages) int32,
                                  cache_seqlens (B,) int32: the emitted compressed blocks n_c[b]
    seqlens  (B,) int32           raw tokens per sequence: the query sits at t = seqlens[b] - 1
    lse      (B, Hq) or None      the cmp branch's natural log-sum-exp (FA-2's; -inf or +inf where no
                                  block is emitted); None: a first pass over the compressed keys
                                  computes it (the torch cmp path returns p, not lse)

and computes what ``selection.block_scores`` + ``selection.top_blocks`` compute (the torch selection
of ``decode_fast``: ``decode_torch_path.cmp_probs_from_lse`` / ``block_scores_banded`` /
``selection.top_blocks``):

    p[g, i]  = exp(scale * q_g . k_cmp[i] - lse_g) on emitted blocks i < n_c (fp32 for 16-bit inputs,
               fp64 for fp64), 0 elsewhere
    p_slc[j] = sum_i w(j, i) * sum_g p[g, i]   (w: the overlap weights of ``masks.selection_weights``,
               in cells of d tokens: |[i, i + l/d) ∩ [j R, (j+1) R)|, R = l'/d)
    forced initial / local blocks, candidates j <= c = t // l', the n_sel largest keys with ties
    to the lower index, written sorted ascending, -1 padded at the end.

Selection blocks are visited in tiles of BJ = (BC - (l/d - 1)) // R blocks; a tile's scores need
the BC compressed blocks starting at j0 R - (l/d - 1) (one dot product (G, Dk) x (Dk, BC); tiles
overlap by l/d - 1 compressed blocks). Each tile's keys merge into a running top-n: fp32 scores
pack (score bits, lower index first) into one int64 key and merge with ``tl.topk`` (as
``scoring._topn_kernel``); fp64 scores merge by an exact iterative max (slow; CPU tests).

Nothing depends on the host lengths: the loops stop at bounds the program loads from ``seqlens``
and ``cmp.cache_seqlens`` (a launch recorded in a CUDA graph re-reads them at every replay); the
launch arguments depend on the cache's geometry (capacity, page size, strides) only. Summation
order differs from torch (a dot product, then the weights as a matrix), so scores agree to rounding
and blocks whose scores tie within rounding may be picked differently.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from nsa_ref.triton_kernels.dtypes import dot_precision, tl_acc
from nsa_ref.triton_kernels.layout import next_pow2, sm_count, split_programs

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig
    from nsa_ref.kv_cache import PagedView

#: Compressed blocks per tile (one dot product): the scores of (BC - l/d + 1) // R selection blocks.
CMP_TILE = 64
#: Widest head dim the kernel takes (``nsa_ref.backends.triton``'s limit).
MAX_HEAD_DIM = 256
#: split_programs: None = ``programs_per_sm`` programs per SM on a GPU, one program per (b, h)
#: elsewhere; an int forces that target (tests run the split path on the interpreter with it).
#: warps / stages: 2 / 3 measured fastest on the H200 at 64K (B 16: 43.5 us vs 53.0 at 4 / 2;
#: B 64: 131.5 vs 164.8; decode_tune.py, artifacts/2026-12-03/decode_h200_session4).
TUNING = {"num_warps": 2, "num_stages": 3, "split_programs": None, "programs_per_sm": 8}


@triton.jit
def _cmp_scores(q, KC, CT, b, kvh, i0, n_c, Pc, sk_p, sk_s, sk_h, sct_b, Dk, scale,
                BC: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """Compressed blocks i0..i0+BC-1 of sequence b (i0 may be negative): their indices, which are
    emitted (0 <= i < n_c), and scale * q . k (GP, BC) in the accumulation dtype."""
    i = i0 + tl.arange(0, BC)
    ok = (i >= 0) & (i < n_c)
    isafe = tl.where(ok, i, 0)
    page = tl.load(CT + b.to(tl.int64) * sct_b + isafe // Pc, mask=ok, other=0)
    row = page.to(tl.int64) * sk_p + (isafe % Pc).to(tl.int64) * sk_s + kvh * sk_h
    d = tl.arange(0, BD)
    k = tl.load(KC + row[:, None] + d[None, :], mask=ok[:, None] & (d < Dk)[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
    return i, ok, s


@triton.jit
def _decode_select_kernel(
    Q, KC, CT, NC, SEQ, LSE, IDX, PART,
    sq_b, sq_h, sk_p, sk_s, sk_h, sct_b, slse_b, slse_h, si_b, si_h,
    G, Dk, width, Pc, scale, n_sel, n_init, n_local, SEL_BLOCK, R, RW, BJ, split_blocks,
    GP: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, KP: tl.constexpr, NP: tl.constexpr,
    HAS_LSE: tl.constexpr, KEY32: tl.constexpr, SPLITS: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    big = 2147483647
    seqlen = tl.load(SEQ + b)
    t = seqlen - 1
    c = tl.where(t >= 0, t // SEL_BLOCK, -1)  # // truncates: t = -1 (empty) has no candidate
    n_c = tl.minimum(tl.load(NC + b), width)
    g = tl.arange(0, GP)
    row_ok = g < G
    head = kvh * G + g
    d = tl.arange(0, BD)
    q = tl.load(Q + b.to(tl.int64) * sq_b + head[:, None] * sq_h + d[None, :],
                mask=row_ok[:, None] & (d < Dk)[None, :], other=0.0)
    if HAS_LSE:
        lse = tl.load(LSE + b.to(tl.int64) * slse_b + head * slse_h, mask=row_ok, other=float("inf")).to(ACC)
    else:
        m_i = tl.full([GP], float("-inf"), ACC)
        l_i = tl.zeros([GP], ACC)
        for i0 in range(0, n_c, BC):
            i, ok, s = _cmp_scores(q, KC, CT, b, kvh, i0, n_c, Pc, sk_p, sk_s, sk_h, sct_b, Dk, scale,
                                   BC, BD, PREC, ACC)
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("inf"))
    jt = tl.arange(0, KP)
    slot = tl.arange(0, NP)
    if KEY32:
        run = tl.full([NP], -1, tl.int64)
    else:
        run_s = tl.full([NP], float("-inf"), ACC)
        run_j = tl.full([NP], big, tl.int32)
    halo = RW - 1
    # SPLITS > 1: this program ranks selection blocks [split * split_blocks, (split + 1) * split_blocks)
    # (split_blocks a multiple of BJ) and leaves its top NP keys in PART for _merge_splits_kernel.
    j_lo = split * split_blocks
    j_hi = c + 1
    if SPLITS > 1:  # the last split runs to c, whatever the capacity estimate was
        j_hi = tl.where(split < SPLITS - 1, tl.minimum(c + 1, j_lo + split_blocks), c + 1)
    for j0 in range(j_lo, j_hi, BJ):
        i, ok, s = _cmp_scores(q, KC, CT, b, kvh, j0 * R - halo, n_c, Pc, sk_p, sk_s, sk_h, sct_b, Dk, scale,
                               BC, BD, PREC, ACC)
        p = tl.where(row_ok[:, None] & ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        ps = tl.sum(p, 0)  # (BC,): summed over the G query heads of this KV head
        jj = j0 + jt
        lo = tl.maximum(i[None, :], (jj * R)[:, None])
        hi = tl.minimum(i[None, :] + RW, (jj * R + R)[:, None])
        w = tl.maximum(hi - lo, 0).to(ACC)  # (KP, BC) overlap in cells of d tokens
        sc = tl.sum(w * ps[None, :], 1)  # (KP,) p_slc of selection blocks j0..j0+KP-1
        cand = (jt < BJ) & (jj < j_hi)
        forced = (jj < n_init) | (jj > c - n_local)
        if KEY32:
            bits = (sc.to(tl.float32) + 0.0).to(tl.int32, bitcast=True).to(tl.int64)  # + 0.0: -0.0 -> +0.0
            bits = tl.where(forced, 0x7F800000, bits)
            key = (bits << 32) | (big - jj).to(tl.int64)
            key = tl.where(cand, key, -1)
            top = tl.topk(key, NP)
            run = tl.topk(tl.reshape(tl.join(run, top), (2 * NP,)), NP)
        else:
            ts = tl.where(cand, tl.where(forced, float("inf"), sc), float("-inf"))
            tj = tl.where(cand, jj, big)
            new_s = tl.full([NP], float("-inf"), ACC)
            new_j = tl.full([NP], big, tl.int32)
            for r in tl.static_range(NP):
                m = tl.maximum(tl.max(run_s, 0), tl.max(ts, 0))
                jm = tl.minimum(tl.min(tl.where(run_s == m, run_j, big), 0), tl.min(tl.where(ts == m, tj, big), 0))
                new_s = tl.where(slot == r, m, new_s)
                new_j = tl.where(slot == r, jm, new_j)
                run_s = tl.where(run_j == jm, float("-inf"), run_s)
                ts = tl.where(tj == jm, float("-inf"), ts)
            run_s, run_j = new_s, new_j
    if SPLITS > 1:
        tl.store(PART + ((b.to(tl.int64) * tl.num_programs(1) + kvh) * SPLITS + split) * NP + slot, run)
    else:
        if KEY32:
            keep = (run >= 0) & (slot < n_sel)
            jsel = (big - (run & 0xFFFFFFFF)).to(tl.int32)
        else:
            keep = (run_j != big) & (run_s > float("-inf")) & (slot < n_sel)
            jsel = run_j
        ordered = tl.sort(tl.where(keep, jsel, big))
        out = tl.where(ordered == big, -1, ordered).to(tl.int32)
        tl.store(IDX + b.to(tl.int64) * si_b + kvh * si_h + slot, out, mask=slot < n_sel)


@triton.jit
def _merge_splits_kernel(PART, IDX, si_b, si_h, n_sel, SPLITS: tl.constexpr, NP: tl.constexpr):
    """The n_sel largest of the SPLITS x NP partial keys of (b, h), decoded, sorted, -1 padded."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    big = 2147483647
    base = (b.to(tl.int64) * tl.num_programs(1) + kvh) * SPLITS * NP
    run = tl.topk(tl.load(PART + base + tl.arange(0, SPLITS * NP)), NP)
    slot = tl.arange(0, NP)
    keep = (run >= 0) & (slot < n_sel)
    jsel = (big - (run & 0xFFFFFFFF)).to(tl.int32)
    ordered = tl.sort(tl.where(keep, jsel, big))
    out = tl.where(ordered == big, -1, ordered).to(tl.int32)
    tl.store(IDX + b.to(tl.int64) * si_b + kvh * si_h + slot, out, mask=slot < n_sel)


def split_count(B: int, Hkv: int, num_tiles: int, device: torch.device) -> int:
    """Programs per (sequence, KV head): 1, or a power of two that brings B * Hkv * splits to about
    ``TUNING["programs_per_sm"]`` programs per SM of the GPU (8: H200, B 16 / 64 at 64K, 74 -> 53 and
    261 -> 163 us against 2 per SM, decode_tune.py; ``TUNING["split_programs"]`` overrides the
    target), at most one split per BJ-tile of the capacity."""
    target = TUNING.get("split_programs")
    if target is None and device.type == "cuda":
        target = TUNING["programs_per_sm"] * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return split_programs(B * Hkv, num_tiles, device, target)


def _tiles(cfg: "NSAConfig") -> tuple[int, int, int, int]:
    """-> (R, RW, BC, BJ): cells of d tokens per selection / compression block, compressed blocks
    per tile, selection blocks whose scores one tile completes."""
    R = cfg.sel_block // cfg.block_stride
    RW = cfg.block_len // cfg.block_stride
    BC = max(CMP_TILE, next_pow2(R + RW - 1))
    return R, RW, BC, (BC - (RW - 1)) // R


def refusal(q: torch.Tensor, cmp: "PagedView") -> str | None:
    """Why ``decode_select`` cannot take these inputs (None: it can). Device / Triton first
    (``nsa_ref.triton_kernels.unavailable_reason``), then the shapes and dtypes it handles."""
    from nsa_ref.triton_kernels import unavailable_reason

    why = unavailable_reason(q)
    if why is not None:
        return why
    if q.dim() != 3:
        return f"q must be (B, Hq, Dk), got {tuple(q.shape)}"
    Dk = q.shape[-1]
    if Dk > MAX_HEAD_DIM:
        return f"head dim {Dk} > {MAX_HEAD_DIM}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {q.dtype}"
    if cmp.k_pages.dtype != q.dtype:
        return f"compressed keys in {cmp.k_pages.dtype}, q in {q.dtype}"
    if cmp.k_pages.device != q.device:
        return f"compressed keys on {cmp.k_pages.device}, q on {q.device}"
    return None


@torch.no_grad()
def decode_select(q: torch.Tensor, cmp: "PagedView", seqlens: torch.Tensor, cfg: "NSAConfig", *,
                  width: int, lse: torch.Tensor | None = None, num_sel: int | None = None) -> torch.Tensor:
    """q (B, Hq, Dk); cmp: the compressed store (``NSAKVCache.views()[1]``); seqlens (B,) int32 raw
    tokens per sequence (the query sits at seqlens - 1); width: compressed slots the step may read
    (``decode_torch_path.cmp_width``, from the capacity); lse (B, Hq) the cmp branch's natural lse or
    None; num_sel: selection blocks of the raw capacity (``cfg.num_sel_blocks(raw.capacity)``; None:
    estimated from ``width``), which only sizes the splits -> block_idx (B, Hkv, n_sel) int32, as
    ``selection.top_blocks`` orders it.

    One launch, grid (B, Hkv), no host read: capturable in a CUDA graph. On a GPU with the lse
    given and fp32 keys, B * Hkv below two programs per SM: grid (B, Hkv, splits) over ranges of
    selection blocks, each leaving its top keys, then ``_merge_splits_kernel`` (grid (B, Hkv)) merges
    them (``split_count``; the splits depend on B and the capacity only). Inputs are assumed valid
    (``refusal`` says which are not handled)."""
    B, Hq, Dk = q.shape
    Hkv = cmp.k_pages.shape[2]
    out = torch.empty(B, Hkv, cfg.n_sel, dtype=torch.int32, device=q.device)
    if B == 0 or Hkv == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    kc = cmp.k_pages
    if kc.stride(-1) != 1:
        kc = kc.contiguous()  # not the decode cache's layout (its pools are contiguous)
    table = cmp.block_table
    if table.shape[1] == 0:  # a zero-capacity compressed store: nothing is ever emitted
        width = 0
        table = torch.zeros(B, 1, dtype=torch.int32, device=q.device)
    G = Hq // Hkv
    R, RW, BC, BJ = _tiles(cfg)
    NP = next_pow2(cfg.n_sel, 2)  # tl.topk cannot keep k = 1
    KP = max(NP, next_pow2(BJ))
    key32 = q.dtype != torch.float64
    if num_sel is None:
        num_sel = cfg.num_sel_blocks(width * cfg.block_stride + cfg.block_len)
    num_tiles = max(1, -(-num_sel // BJ))
    # Splits need the lse (else each split would redo the lse pass) and the int64 keys.
    splits = split_count(B, Hkv, num_tiles, q.device) if lse is not None and key32 else 1
    split_blocks = -(-num_tiles // splits) * BJ
    part = torch.empty(B, Hkv, splits, NP, dtype=torch.int64, device=q.device) if splits > 1 else out
    if lse is not None:
        lse_arg, slse = lse, (lse.stride(0), lse.stride(1))
    else:
        lse_arg, slse = out, (0, 0)  # never read
    _decode_select_kernel[(B, Hkv, splits)](
        q, kc, table, cmp.cache_seqlens, seqlens, lse_arg, out, part,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), table.stride(0), *slse,
        out.stride(0), out.stride(1),
        G, Dk, width, kc.shape[1], cfg.softmax_scale(Dk), cfg.n_sel, cfg.n_init, cfg.n_local,
        cfg.sel_block, R, RW, BJ, split_blocks,
        GP=next_pow2(G, 16), BD=next_pow2(Dk, 16), BC=BC, KP=KP, NP=NP,
        HAS_LSE=lse is not None, KEY32=key32, SPLITS=splits, PREC=dot_precision(q.dtype), ACC=tl_acc(q.dtype),
        num_warps=TUNING["num_warps"], num_stages=TUNING["num_stages"],
    )
    if splits > 1:
        _merge_splits_kernel[(B, Hkv)](part, out, out.stride(0), out.stride(1), cfg.n_sel, SPLITS=splits, NP=NP,
                                       num_warps=1)
    return out


__all__ = ["decode_select", "refusal"]
