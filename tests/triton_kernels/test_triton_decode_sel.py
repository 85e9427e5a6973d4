"""Triton decode sel attention (nsa_ref.triton_kernels.decode_sel) against decode_fast's sel branch
(``decode_torch_path.sel_gather`` from the paged raw cache + ``attend_fixed``).

Pins: the same o_sel (fp64 to 1e-12, fp32 to 1e-5) for the blocks the torch selection picks on
ragged batches (one token, lengths inside the first block, crossing l' and the n_sel boundary),
-1 padding, the current block's future tokens masked, l' a power of two or not (24), preallocated
and paged raw caches (pages of 5 and 16 tokens), GQA G = 1, 4, 16, Dv != Dk; arbitrary block lists
(not sorted, a block listed twice is attended twice, as the gather does); rows with nothing
visible give 0.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from test_triton_decode_select import ODD, PAPER8, TINY, _cache, _torch_select

from nsa_ref.config import NSAConfig
from nsa_ref.decode_torch_path import attend_fixed, sel_gather

pytestmark = pytest.mark.usefixtures("interpret_env")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.fixture(scope="module")
def dsel():
    return importlib.import_module("nsa_ref.triton_kernels.decode_sel")


def _torch_sel(q, cache, block_idx, cfg):
    raw = cache.views()[0]
    t = cache.cache_seqlens.long() - 1
    k, v, valid = sel_gather(t, block_idx, raw, cfg)
    return attend_fixed(q, k, v, valid, cfg.softmax_scale(q.shape[-1]))[0]


def _check(dsel, cache, cfg, hq, dtype, device, what, block_idx=None, seed=1, dv_cache=None):
    B, Hkv, Dk = cache.batch_size, cache.raw.k_pages.shape[2], cache.raw.k_pages.shape[3]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, Dk, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if block_idx is None:
        block_idx = _torch_select(q, cache, cfg)
    raw = cache.views()[0]
    assert dsel.refusal(q, raw) is None
    got = dsel.decode_sel(q, raw, raw.cache_seqlens, block_idx, cfg)
    want = _torch_sel(q, cache, block_idx, cfg)
    assert got.dtype == q.dtype and got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOL[dtype], f"{what}: max|triton - torch| = {err:.3g}"
    return got


LAYOUTS = [pytest.param("contiguous", id="prealloc"), pytest.param(("paged", 5), id="page5"),
           pytest.param(("paged", 16), id="page16")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [pytest.param(TINY, id="tiny"), pytest.param(ODD, id="odd-l'24")])
def test_sel_matches_torch_on_ragged_batch(dsel, kdev, cfg, dtype, layout):
    l, lp, n = cfg.block_len, cfg.sel_block, cfg.n_sel
    lengths = [1, l - 1, lp + 1, n * lp - 1, n * lp + 1, 150]
    cache = _cache(lengths, 2, 8, cfg, layout, 160, dtype, kdev)
    _check(dsel, cache, cfg, 8, dtype, kdev, f"lengths {lengths}")


@pytest.mark.parametrize("G", [1, 4, 16])
def test_sel_gqa_groups(dsel, kdev, G):
    cache = _cache([1, 40, 100, 257], 2, 16, PAPER8, ("paged", 64), 512, torch.float32, kdev, seed=G)
    _check(dsel, cache, PAPER8, 2 * G, torch.float32, kdev, f"G={G}")


def test_sel_other_value_width_and_any_block_list(dsel, kdev):
    """Dv = 12 != Dk = 8; block lists in any order, with repeats and -1 anywhere: the kernel
    attends what is listed (as sel_gather does); all -1 gives zeros."""
    from nsa_ref.kv_cache import NSAKVCache

    lengths = [30, 75, 1]
    cache = NSAKVCache.allocate(3, 80, 2, 8, TINY, v_head_dim=12, dtype=torch.float64, device=kdev)
    g = torch.Generator().manual_seed(4)
    k = torch.randn(sum(lengths), 2, 8, generator=g, dtype=torch.float64).to(kdev)
    v = torch.randn(sum(lengths), 2, 12, generator=g, dtype=torch.float64).to(kdev)
    cache.prefill(k, v, torch.tensor([0, 30, 105, 106], dtype=torch.int32, device=kdev))
    idx = torch.tensor([[[3, -1, 0], [1, 1, -1]], [[9, 2, 4], [-1, 5, 8]], [[-1, -1, -1], [0, -1, -1]]],
                       dtype=torch.int32, device=kdev)
    got = _check(dsel, cache, TINY, 4, torch.float64, kdev, "any block list", block_idx=idx)
    assert got[2, :2].eq(0).all() and got[2, 2:].ne(0).any()


@pytest.mark.parametrize("programs", [8, 64])
def test_sel_split_launch_matches_torch(dsel, kdev, monkeypatch, programs):
    """The split launch (grid (B, Hkv, splits) over the n_sel entries + the merge kernel), forced
    through TUNING["split_programs"]: 2 or 4 splits of PAPER8's 8 entries, one sequence whose
    later splits see only -1 padding (a split with nothing visible), fp64."""
    monkeypatch.setitem(dsel.TUNING, "split_programs", programs)
    cache = _cache([70, 1000], 2, 16, PAPER8, ("paged", 64), 1024, torch.float64, kdev, seed=programs)
    assert dsel.split_count(2, 2, PAPER8.n_sel, torch.device(kdev)) == {8: 2, 64: 4}[programs]
    _check(dsel, cache, PAPER8, 8, torch.float64, kdev, f"split programs={programs}")


# -- the window (decode_win: the same kernel over the tiles holding [t - w + 1, t]) ----------------

def _torch_win(q, cache, cfg):
    from nsa_ref.decode_torch_path import win_torch

    raw = cache.views()[0]
    return win_torch(q, cache.cache_seqlens.long() - 1, raw, cfg)


WIN_CFGS = [pytest.param(TINY, id="w8"), pytest.param(ODD, id="w11"),
            pytest.param(NSAConfig(window=100), id="w100")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", WIN_CFGS)
def test_win_matches_torch_on_ragged_batch(dsel, kdev, cfg, layout):
    """Lengths 1, below / at / past w, across tile (64) and page boundaries, and an empty sequence
    (nothing visible: zeros): decode_win equals decode_fast's torch window to fp64 rounding."""
    w = cfg.window
    lengths = [1, w - 1, w, w + 1, 63, 64, 65, 150, 0]
    cache = _cache(lengths, 2, 8, cfg, layout, 160, torch.float64, kdev)
    g = torch.Generator().manual_seed(w)
    q = torch.randn(len(lengths), 8, 8, generator=g, dtype=torch.float64).to(kdev)
    raw = cache.views()[0]
    got = dsel.decode_win(q, raw, raw.cache_seqlens, cfg)
    want = _torch_win(q, cache, cfg)
    err = (got - want).abs().max().item()
    assert err <= 1e-12, f"max|triton - torch| = {err:.3g}"
    assert got[-1].eq(0).all() and got[:-1].ne(0).any(dim=-1).all()


@pytest.mark.parametrize("programs", [8, 64])
def test_win_split_launch_and_gqa(dsel, kdev, monkeypatch, programs):
    """The split launch over the window's tiles (w = 300: 6 tiles, 2 or 4 splits, a split past t
    for the short sequence), G = 16, fp32 within 1e-5."""
    monkeypatch.setitem(dsel.TUNING, "split_programs", programs)
    cfg = NSAConfig(window=300)
    cache = _cache([5, 299, 700], 2, 16, cfg, ("paged", 64), 768, torch.float32, kdev, seed=programs)
    g = torch.Generator().manual_seed(programs)
    q = torch.randn(3, 32, 16, generator=g).to(kdev)
    raw = cache.views()[0]
    got = dsel.decode_win(q, raw, raw.cache_seqlens, cfg)
    err = (got - _torch_win(q, cache, cfg)).abs().max().item()
    assert err <= 1e-5, f"split programs={programs}: max|triton - torch| = {err:.3g}"


# -- sel + win in one launch, gated (decode_sel_win) ------------------------------------------------

@pytest.mark.parametrize("programs", [None, 8, 64])
@pytest.mark.parametrize("layout", [pytest.param("contiguous", id="prealloc"), pytest.param(("paged", 5), id="page5")])
@pytest.mark.parametrize("cfg", [pytest.param(TINY, id="tiny"), pytest.param(ODD, id="odd-l'24")])
def test_sel_win_combined_equals_branches(dsel, kdev, monkeypatch, cfg, layout, programs):
    """decode_sel_win (one launch over sel's blocks and the window's l' tiles, one merge that
    applies the gates) equals combine_branches(gates, o_cmp, torch sel, torch win) to fp64
    rounding, with and without splits (split targets 8 and 64 force 2 and 4 splits per branch),
    on ragged batches with an empty sequence (output g_cmp * o_cmp there)."""
    from nsa_ref.api import combine_branches

    if programs is not None:
        monkeypatch.setitem(dsel.TUNING, "split_programs", programs)
    lengths = [1, cfg.window, cfg.n_sel * cfg.sel_block + 3, 150, 0]
    cache = _cache(lengths, 2, 8, cfg, layout, 160, torch.float64, kdev, seed=11)
    g = torch.Generator().manual_seed(12)
    B = len(lengths)
    q = torch.randn(B, 8, 8, generator=g, dtype=torch.float64).to(kdev)
    o_cmp = torch.randn(B, 8, 8, generator=g, dtype=torch.float64).to(kdev)
    gates = torch.rand(B, 8, 3, generator=g, dtype=torch.float64).to(kdev)
    block_idx = _torch_select(q, cache, cfg)
    raw = cache.views()[0]
    got = dsel.decode_sel_win(q, raw, raw.cache_seqlens, block_idx, o_cmp, gates, cfg)
    want = combine_branches(gates, o_cmp, _torch_sel(q, cache, block_idx, cfg), _torch_win(q, cache, cfg))
    err = (got - want).abs().max().item()
    assert err <= 1e-12, f"max|fused - branches| = {err:.3g}"
    assert torch.allclose(got[-1], gates[-1, :, :1] * o_cmp[-1], atol=1e-15, rtol=0)
