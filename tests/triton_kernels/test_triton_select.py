"""Triton block selection (nsa_ref.triton_kernels.scoring) against the exact torch selection.

Pins: ``select_blocks`` returns the same block_idx as ``nsa_ref.selection.select_blocks``, entry for
entry, in fp32 (the int64-key top-n kernel) and fp64 (torch top-n on the kernel's fp64 scores), for
short and block-boundary lengths, GQA group sizes 1/3/4, varlen packs with an empty sequence,
non-power-of-two cells per selection block (the non-aligned fold) and head dims 16/24;
``cmp_lse`` is the cmp branch's log-sum-exp (-inf rows identical); ``block_scores`` is the
overlap-weighted score of the reference, 0 past the current block; a caller's ``lse`` selects the
same blocks; exact ties go to the lower block index.
"""
from __future__ import annotations

import pytest
import torch
from triton_testkit import DEFAULT4, FP64_TOL, ODD_R, SMALL, STRIDE1, TINY, assert_same_blocks, cu_of, q_and_kcmp

from nsa_ref import NSAConfig, masks, reference, selection

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


def _check_select(scoring, q, k_cmp, cfg, cu=None, what=""):
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk) -> the Triton block_idx, after asserting it equals
    the reference's (T, Hkv, n_sel) and is well formed (strictly ascending, -1 only at the end)."""
    got = scoring.select_blocks(q, k_cmp, cfg, cu)
    want = selection.select_blocks(q, k_cmp, cfg, cu)
    assert_same_blocks(got, want, what)
    listed = got >= 0
    assert (listed[..., :-1] | ~listed[..., 1:]).all(), f"{what}: -1 before a listed block"
    assert (got[..., 1:] > got[..., :-1])[listed[..., 1:]].all(), f"{what}: not strictly ascending"
    return got


def _local_pos(T, cu, device) -> torch.Tensor:
    """(T,) position of each packed token inside its sequence."""
    if cu is None:
        return torch.arange(T, device=device)
    starts = torch.repeat_interleave(cu[:-1].long(), cu.diff().long(), output_size=T)
    return torch.arange(T, device=device) - starts


def _nb_max(T, cu, cfg) -> int:
    lengths = [T] if cu is None else cu.diff().tolist()
    return max(masks.num_sel_blocks(n, cfg) for n in lengths)


# --- select_blocks == reference -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "cfg", [pytest.param(DEFAULT4, id="l32-d16-l'64-n4"), pytest.param(SMALL, id="l16-d8-l'16-n4")]
)
@pytest.mark.parametrize("T", [1, 31, 32, 97, 130])
def test_select_matches_reference_across_lengths(scoring, kdev, T, cfg, dtype):
    """q (T, 2, 16), k_cmp (Tc, 1, 16): T below l, at l, between and across selection blocks."""
    q, kc = q_and_kcmp(T, 2, 1, 16, cfg, dtype, kdev, seed=T)
    got = _check_select(scoring, q, kc, cfg, what=f"T={T}")
    if T == 1:
        # one candidate (block 0), forced: the rest is padding
        assert got.flatten().tolist() == [0] + [-1] * (cfg.n_sel - 1)


# 700 rows of the fp32 top-n kernel take ~20 s in the interpreter: slow there, always on a GPU.
_LONG_FP32_MARKS = () if torch.cuda.is_available() else (pytest.mark.slow,)


@pytest.mark.parametrize(
    "dtype", [pytest.param(torch.float32, id="fp32", marks=_LONG_FP32_MARKS), pytest.param(torch.float64, id="fp64")]
)
def test_select_matches_reference_long_default_sizes(scoring, kdev, dtype):
    """q (700, 2, 16), k_cmp (42, 1, 16), paper block sizes: n=4 of up to 11 blocks, free picks by score."""
    q, kc = q_and_kcmp(700, 2, 1, 16, DEFAULT4, dtype, kdev, seed=7)
    got = _check_select(scoring, q, kc, DEFAULT4, what="T=700 default sizes")
    free = got[:, 0, 1]  # the one free pick (1 initial, 2 local): varies with the scores
    assert len(set(free[64 * 4:].tolist())) > 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 3, 4])
def test_select_matches_reference_for_gqa_groups(scoring, kdev, G, dtype):
    """q (48, 2G, 24), k_cmp (11, 2, 24): the G heads of each of 2 KV heads summed; Dk=24 pads to 32."""
    q, kc = q_and_kcmp(48, 2 * G, 2, 24, TINY, dtype, kdev, seed=G)
    got = _check_select(scoring, q, kc, TINY, what=f"G={G}")
    # the two KV heads score differently somewhere: the kernel does not mix them up
    assert (got[:, 0] != got[:, 1]).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_matches_reference_varlen_with_empty_sequence(scoring, kdev, dtype):
    """lengths [33, 0, 70] packed: T=103, q (103, 2, 24), k_cmp (3 + 8, 1, 24); positions restart per sequence."""
    cu = cu_of([33, 0, 70], kdev)
    q, kc = q_and_kcmp(103, 2, 1, 24, SMALL, dtype, kdev, cu=cu, seed=24)
    got = _check_select(scoring, q, kc, SMALL, cu, what="varlen [33, 0, 70]")
    # the second sequence starts over: its first token sees block 0 only
    assert got[33, 0].tolist() == [0, -1, -1, -1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "cfg,T",
    [pytest.param(ODD_R, 97, id="l'24-d8-R3"), pytest.param(STRIDE1, 80, id="l6-d1-l'3-R3-tc75")],
)
def test_select_matches_reference_non_aligned_cells(scoring, kdev, cfg, T, dtype):
    """R = l'/d = 3 is not a power of two: the per-block fold. q (T, 2, 16), k_cmp (Tc, 1, 16)."""
    assert not scoring._aligned(cfg.sel_block // cfg.block_stride)
    q, kc = q_and_kcmp(T, 2, 1, 16, cfg, dtype, kdev, seed=T)
    _check_select(scoring, q, kc, cfg, what=f"non-aligned {cfg}")


# --- the pieces: lse, scores, caller's lse, ties --------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [None, [33, 0, 70]], ids=["one-seq", "varlen"])
def test_cmp_lse_is_the_cmp_branch_lse(scoring, kdev, lengths, dtype):
    """q (T, 6, 24), k_cmp (Tc, 2, 24) -> lse (T, 6): -inf exactly where no block is visible (t < l-1)."""
    T = 130 if lengths is None else sum(lengths)
    cu = None if lengths is None else cu_of(lengths, kdev)
    q, kc = q_and_kcmp(T, 6, 2, 24, SMALL, dtype, kdev, cu=cu, seed=3)
    got = scoring.cmp_lse(q, kc, SMALL, cu)
    want = reference.cmp_attention(q, kc, kc, SMALL, cu)[1]  # fp32
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    empty = torch.isneginf(want)
    assert empty.any() and not empty.all()
    assert torch.equal(torch.isneginf(got), empty) and not torch.isnan(got).any() and not torch.isposinf(got).any()
    torch.testing.assert_close(got[~empty].double(), want[~empty].double(), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "cfg,lengths",
    [pytest.param(SMALL, None, id="aligned"), pytest.param(STRIDE1, None, id="non-aligned"),
     pytest.param(SMALL, [33, 0, 70], id="aligned-varlen")],
)
def test_block_scores_match_reference_on_candidates(scoring, kdev, cfg, lengths, dtype):
    """p_slc (T, 2, nb_max) = selection.block_scores(p_cmp) on blocks j <= t // l', exactly 0 after."""
    T = 100 if lengths is None else sum(lengths)
    cu = None if lengths is None else cu_of(lengths, kdev)
    q, kc = q_and_kcmp(T, 6, 2, 16, cfg, dtype, kdev, cu=cu, seed=11)
    nb = _nb_max(T, cu, cfg)
    got = scoring.block_scores(q, kc, cfg, cu)
    p_cmp = selection.cmp_probabilities(q, kc, cfg, cu)  # (T, 6, Tc_max)
    want = selection.block_scores(p_cmp, 2, nb, cfg)  # (T, 2, nb)
    pos = _local_pos(T, cu, kdev)
    candidate = masks.sel_block_candidate(pos[:, None], torch.arange(nb, device=kdev)[None, :], cfg)[:, None, :]
    want = want.masked_fill(~candidate, 0.0)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got[~candidate.expand_as(got)] == 0).all(), "scores past the current block"
    assert want.abs().max() > 0
    tol = 1e-5 if dtype == torch.float32 else (1e-12 if kdev == "cpu" else FP64_TOL)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_callers_lse_selects_the_same_blocks(scoring, kdev, dtype):
    """lse (40, 4) from reference.cmp_attention handed in: same block_idx as computing it, and as the reference."""
    q, kc = q_and_kcmp(40, 4, 1, 16, TINY, dtype, kdev, seed=5)
    lse = reference.cmp_attention(q, kc, kc, TINY)[1]
    with_lse = scoring.select_blocks(q, kc, TINY, lse=lse)
    assert_same_blocks(with_lse, scoring.select_blocks(q, kc, TINY), "lse passed vs computed")
    assert_same_blocks(with_lse, selection.select_blocks(q, kc, TINY), "lse passed vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_go_to_the_lower_block(scoring, kdev, dtype):
    """q = 0 and identical k_cmp rows: every visible compression block has the same probability, so
    fully covered selection blocks tie exactly; the free picks must be the lowest such blocks.
    q (70, 2, 16), k_cmp (8, 1, 16), SMALL (l'=16, 1 initial + 2 local + 1 free pick)."""
    T = 70
    q = torch.zeros(T, 2, 16, dtype=dtype, device=kdev)
    row = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kc = row.to(device=kdev, dtype=dtype).expand(SMALL.num_cmp_blocks(T), 1, 16).contiguous()
    got = _check_select(scoring, q, kc, SMALL, what="ties")
    scores = scoring.block_scores(q, kc, SMALL)  # (T, 1, nb): the kernel's own scores
    ties_seen = 0
    for t in range(T):
        c = t // SMALL.sel_block
        forced = set(range(SMALL.n_init)) | set(range(max(0, c - SMALL.n_local + 1), c + 1))
        picked = set(got[t, 0].tolist()) - {-1}
        for j in picked - forced:
            for other in set(range(c + 1)) - picked:
                if scores[t, 0, other] == scores[t, 0, j]:
                    ties_seen += 1
                    assert j < other, f"t={t}: picked block {j} over tied lower block {other}"
                else:
                    assert scores[t, 0, other] < scores[t, 0, j], f"t={t}: picked {j} over better {other}"
    assert ties_seen > 0, "the construction produced no tie"


# --- paths the short cases above do not reach -----------------------------------------------------


def _topn(scoring, scores: torch.Tensor, pos: torch.Tensor, cfg) -> torch.Tensor:
    """scores (rows, Hkv, nb) fp32, pos (rows,) -> block_idx (rows, Hkv, n_sel) from ``_topn_kernel``,
    launched as ``select_blocks`` does (one program per row and KV head, BN-wide tiles of blocks)."""
    from nsa_ref.triton_kernels.layout import next_pow2

    rows, hkv, nb = scores.shape
    out = torch.full((rows, hkv, cfg.n_sel), -1, dtype=torch.int32, device=scores.device)
    NP = next_pow2(cfg.n_sel, 2)
    BN = max(NP, min(256, next_pow2(nb)))
    scoring._topn_kernel[(rows, hkv)](
        scores, out, pos.to(torch.int32), 0, scores.stride(0), scores.stride(1), 0, out.stride(0), out.stride(1),
        cfg.n_sel, cfg.n_init, cfg.n_local, cfg.sel_block, NP=NP, BN=BN, PLANES=1,
    )
    return out


def test_topn_kernel_over_several_block_tiles_with_ties(scoring, kdev):
    """scores (5, 2, 683) with few distinct values (ties inside and across the 256-wide tiles of the
    running top-k), +0.0 and -0.0, positions up to c = 682: same picks as ``selection.top_blocks``."""
    cfg = NSAConfig(block_len=6, block_stride=1, sel_block=3, n_init=2, n_local=2, n_sel=8)
    pos = torch.tensor([0, 5, 700, 1000, 2047], device=kdev)
    g = torch.Generator().manual_seed(0)
    scores = (torch.randint(0, 40, (5, 2, 683), generator=g).float() / 64).to(kdev)
    scores[3, 0, 10:600:7] = scores[3, 0].max()  # one top value repeated across all three tiles
    scores[4, 1] = 0.0
    scores[4, 1, 1::2] = -0.0  # -0.0 ties with +0.0
    got = _topn(scoring, scores, pos, cfg)
    want = selection.top_blocks(scores, pos, cfg)
    assert_same_blocks(got, want, "top-n over 3 tiles")
    assert got[3, 0, 2:6].tolist() == [10, 17, 24, 31]  # ties to the lowest indices: 4 free picks
    assert got[4, 1, 2:6].tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_in_several_chunks(scoring, kdev, monkeypatch, dtype):
    """A score budget of two tiles: lengths [20, 0, 45], q (65, 4, 16), k_cmp (2 + 4, 1, 16), 32-row tiles
    -> chunks [seq 0 + first tile of seq 2] and [second tile of seq 2] (row_base 52, mid-sequence)."""
    cu = cu_of([20, 0, 45], kdev)
    q, kc = q_and_kcmp(65, 4, 1, 16, SMALL, dtype, kdev, cu=cu, seed=65)
    per_row = 1 * _nb_max(65, cu, SMALL) * scoring.score_planes(SMALL, dtype)
    monkeypatch.setattr(scoring, "SCORE_BUDGET", 64 * per_row)
    seen = []
    chunks = scoring._chunks
    monkeypatch.setattr(scoring, "_chunks", lambda *a: [seen.append(c) or c for c in chunks(*a)])
    _check_select(scoring, q, kc, SMALL, cu, what="chunked")
    assert seen == [(0, 2), (2, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_init,n_local", [(1, 0), (0, 1), (0, 0)])
def test_select_one_block(scoring, kdev, n_init, n_local, dtype):
    """n_sel = 1 (a top-1): q (50, 2, 16), k_cmp (5, 1, 16), l'=8."""
    cfg = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=1, n_init=n_init, n_local=n_local)
    q, kc = q_and_kcmp(50, 2, 1, 16, cfg, dtype, kdev, seed=1)
    got = _check_select(scoring, q, kc, cfg, what=f"n_sel=1 init={n_init} local={n_local}")
    assert (got >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_strided_inputs(scoring, kdev, dtype):
    """q (60, 4, 16) and k_cmp (Tc, 1, 16) as head slices of wider tensors (row strides 96 and 32)."""
    q_wide, k_wide = q_and_kcmp(60, 6, 2, 16, TINY, dtype, kdev, seed=60)
    q, kc = q_wide[:, 1:5], k_wide[:, 1:]
    assert not q.is_contiguous() and not kc.is_contiguous()
    _check_select(scoring, q, kc, TINY, what="strided q, k_cmp")


def test_select_no_tokens(scoring, kdev):
    """T = 0 (one empty sequence, or cu_seqlens [0, 0]): block_idx (0, 2, n_sel), lse (0, 4)."""
    q = torch.zeros(0, 4, 16, device=kdev)
    kc = torch.zeros(0, 2, 16, device=kdev)
    for cu in (None, cu_of([0], kdev)):
        assert scoring.select_blocks(q, kc, TINY, cu).shape == (0, 2, TINY.n_sel)
        assert scoring.cmp_lse(q, kc, TINY, cu).shape == (0, 4)
