"""Reference vs SDPA fallback, empty rows, selection rules and fp64 gradcheck of the branches."""
from __future__ import annotations

import pytest
import torch

from nsa_ref import (
    cmp_attention,
    compress,
    nsa_attention,
    reference,
    sdpa,
    sel_attention,
    select_blocks,
    win_attention,
)
from nsa_ref_testkit import LENGTHS, ODD, SMALL, assert_close, cu_of, qkv

CASES = [
    pytest.param(SMALL, 2, 2, None, id="small-G1"),
    pytest.param(SMALL, 4, 2, LENGTHS, id="small-G2-varlen"),
    pytest.param(ODD, 3, 1, None, id="odd-G3"),
    pytest.param(ODD, 4, 2, LENGTHS, id="odd-G2-varlen"),
]


def _inputs(cfg, hq, hkv, lengths, seed=0, grad=False):
    T = 45 if lengths is None else sum(lengths)
    cu = None if lengths is None else cu_of(lengths)
    q, k, v, gates = qkv(T, hq, hkv, seed=seed, grad=grad)
    return q, k, v, gates, cu


@pytest.mark.parametrize("budget", [None, 64], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("cfg, hq, hkv, lengths", CASES)
def test_sdpa_matches_reference(cfg, hq, hkv, lengths, budget):
    q, k, v, gates, cu = _inputs(cfg, hq, hkv, lengths)
    k_cmp, _ = compress(k, cfg, cu)
    v_cmp, _ = compress(v, cfg, cu)
    block_idx = select_blocks(q, k_cmp, cfg, cu)
    budget = budget or sdpa.MASK_BUDGET_BYTES
    with sdpa.mask_budget(budget):
        o_ref, lse_ref = reference.cmp_attention(q, k_cmp, v_cmp, cfg, cu)
        o_sdpa, lse_sdpa = sdpa.cmp_attention(q, k_cmp, v_cmp, cfg, cu)
        assert_close(o_sdpa, o_ref, f"cmp out sdpa vs reference (budget {budget} B)")
        empty = torch.isinf(lse_ref)
        assert torch.equal(empty, torch.isinf(lse_sdpa)), "cmp lse: -inf exactly on rows with no visible block"
        assert_close(lse_sdpa[~empty], lse_ref[~empty], "cmp lse sdpa vs reference", atol=1e-6)
        assert_close(sdpa.sel_attention(q, k, v, block_idx, cfg, cu),
                     reference.sel_attention(q, k, v, block_idx, cfg, cu), "sel sdpa vs reference")
        assert_close(sdpa.win_attention(q, k, v, cfg, cu),
                     reference.win_attention(q, k, v, cfg, cu), "win sdpa vs reference")
        assert_close(nsa_attention(q, k, v, gates, cfg, cu, backend="sdpa"),
                     nsa_attention(q, k, v, gates, cfg, cu, backend="reference"), "nsa sdpa vs reference")


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("T", [5, 7, 30])
def test_empty_cmp_rows_are_zero_with_zero_grad(backend, T):
    cfg = SMALL  # rows t < l - 1 = 7 see no block
    q, k, v, _ = qkv(T, 4, 2, grad=True)
    k_cmp, _ = compress(k, cfg)
    v_cmp, _ = compress(v, cfg)
    out = cmp_attention(q, k_cmp, v_cmp, cfg, backend=backend)
    empty = slice(0, min(T, cfg.block_len - 1))
    assert (out[empty] == 0).all(), f"cmp empty rows (t < l - 1): must be exactly 0, got max {out[empty].abs().max()}"
    (out * torch.randn_like(out)).sum().backward()
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert x.grad is not None and torch.isfinite(x.grad).all(), f"no NaN/inf in d{name} ({backend}, T={T})"
    assert (q.grad[empty] == 0).all(), f"cmp empty rows must have zero dq ({backend}, T={T})"


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_sel_with_nothing_selected_is_zero(backend):
    q, k, v, _ = qkv(20, 2, 1, grad=True)
    block_idx = torch.full((20, 1, SMALL.n_sel), -1, dtype=torch.int32)
    block_idx[10:, 0, 0] = 1  # only rows 10.. list a block (tokens 8..15)
    out = sel_attention(q, k, v, block_idx, SMALL, backend=backend)
    assert (out[:10] == 0).all(), "sel: a row with no selected block gives exactly 0"
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:10] == 0).all(), "sel: empty rows have zero, finite dq"


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_sel_repeated_block_counts_once(backend):
    q, k, v, _ = qkv(24, 2, 2)
    once = torch.tensor([0, 2, -1], dtype=torch.int32).expand(24, 2, 3).contiguous()
    twice = torch.tensor([2, 0, 2], dtype=torch.int32).expand(24, 2, 3).contiguous()
    assert_close(sel_attention(q, k, v, twice, SMALL, backend=backend),
                 sel_attention(q, k, v, once, SMALL, backend=backend), "sel: block_idx is a set (repeats count once)")


def _select_by_the_words(probs, t, G, cfg):
    """One (t, KV head): p_slc from p_cmp by overlap weights, summed over G heads, forced, top-n."""
    c = t // cfg.sel_block
    out = []
    for kv in range(probs.shape[0] // G):
        score = [0.0] * (c + 1)
        for j in range(c + 1):
            for i in range(probs.shape[1]):
                lo, hi = max(i * cfg.block_stride, j * cfg.sel_block), min(i * cfg.block_stride + cfg.block_len, (j + 1) * cfg.sel_block)
                score[j] += max(0, hi - lo) / cfg.block_stride * float(probs[kv * G : (kv + 1) * G, i].sum())
        forced = {j for j in range(c + 1) if j < cfg.n_init or j > c - cfg.n_local}
        rest = sorted((j for j in range(c + 1) if j not in forced), key=lambda j: (-score[j], j))
        picked = sorted(forced | set(rest[: max(0, cfg.n_sel - len(forced))]))
        out.append(picked + [-1] * (cfg.n_sel - len(picked)))
    return out


@pytest.mark.parametrize("cfg, hq, hkv, lengths", CASES)
def test_select_blocks_follows_the_spec_words(cfg, hq, hkv, lengths):
    q, k, _, _, cu = _inputs(cfg, hq, hkv, lengths, seed=3)
    k_cmp, _ = compress(k, cfg, cu)
    block_idx = select_blocks(q, k_cmp, cfg, cu)
    assert block_idx.dtype == torch.int32 and block_idx.shape == (q.shape[0], hkv, cfg.n_sel)
    _, probs = cmp_attention(q, k_cmp, k_cmp, cfg, cu, backend="reference", return_probs=True)
    bounds = [(0, q.shape[0])] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    for a, b in bounds:
        for t in range(b - a):
            want = _select_by_the_words(probs[a + t], t, hq // hkv, cfg)
            got = block_idx[a + t].tolist()
            assert got == want, f"selection rule at seq start {a}, t={t}: got {got}, want {want}"


def test_select_ties_go_to_the_lower_index():
    # q = 0 makes every visible cmp block equally likely; with l, d, l' = 8, 4, 8 at t = 39 the
    # scores are 3/9, 4/9, 4/9, 4/9, 3/9: forced 0 and 4, the one free pick ties 1, 2, 3 -> 1.
    q, k, _, _ = qkv(40, 2, 1)
    k_cmp, _ = compress(k, SMALL)
    block_idx = select_blocks(torch.zeros_like(q), k_cmp, SMALL)
    assert block_idx[39, 0].tolist() == [0, 1, 4], f"ties to the lower index: got {block_idx[39, 0].tolist()}"


def test_select_takes_all_when_few_candidates_and_has_no_grad():
    q, k, _, _ = qkv(24, 2, 2, grad=True)
    k_cmp, _ = compress(k, SMALL)
    block_idx = select_blocks(q, k_cmp, SMALL)
    assert not block_idx.requires_grad, "selection is not differentiable"
    for t in range(24):
        c = t // SMALL.sel_block
        want = list(range(c + 1)) + [-1] * (SMALL.n_sel - c - 1)
        assert block_idx[t, 0].tolist() == want, f"c + 1 <= n candidates: take all 0..c at t={t}"


def test_cmp_probs_are_a_softmax_over_visible_blocks():
    q, k, v, _ = qkv(sum(LENGTHS), 2, 1)
    cu = cu_of(LENGTHS)
    k_cmp, _ = compress(k, SMALL, cu)
    v_cmp, _ = compress(v, SMALL, cu)
    _, probs = cmp_attention(q, k_cmp, v_cmp, SMALL, cu, return_probs=True)
    assert probs.shape == (q.shape[0], 2, max(SMALL.num_cmp_blocks(n) for n in LENGTHS))
    a = 0
    for n in LENGTHS:
        for t in range(n):
            visible = SMALL.num_cmp_blocks(t + 1)
            row = probs[a + t, 0]
            assert (row[visible:] == 0).all(), f"probs: invisible/padded blocks are 0 (t={t}, {visible} visible)"
            want = 1.0 if visible else 0.0
            assert abs(row.sum().item() - want) < 1e-12, f"probs sum to {want} at t={t}, got {row.sum().item()}"
        a += n


GRAD_CFG = SMALL  # l=8, d=4, l'=8, n=3, w=8


def _gradcheck(fn, *inputs, what, fast=False):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast), what


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("lengths", [None, (0, 18, 22)], ids=["one-seq", "varlen"])
def test_gradcheck_branches(backend, lengths):
    # Full Jacobians for the reference (the ground truth); the fallback gets gradcheck's fast
    # mode (random projections), as it is also compared with the reference value by value.
    fast = backend == "sdpa"
    T = 40 if lengths is None else sum(lengths)
    cu = None if lengths is None else cu_of(lengths)
    q, k, v, gates = qkv(T, 2, 1, dk=3, dv=2, grad=True)
    k_cmp = compress(k.detach(), GRAD_CFG, cu)[0].requires_grad_()
    v_cmp = compress(v.detach(), GRAD_CFG, cu)[0].requires_grad_()
    block_idx = select_blocks(q, k_cmp, GRAD_CFG, cu)
    _gradcheck(lambda a, b, c: cmp_attention(a, b, c, GRAD_CFG, cu, backend=backend), q, k_cmp, v_cmp,
               what=f"gradcheck cmp ({backend})", fast=fast)
    _gradcheck(lambda a, b, c: sel_attention(a, b, c, block_idx, GRAD_CFG, cu, backend=backend), q, k, v,
               what=f"gradcheck sel ({backend})", fast=fast)
    _gradcheck(lambda a, b, c: win_attention(a, b, c, GRAD_CFG, cu, backend=backend), q, k, v,
               what=f"gradcheck win ({backend})", fast=fast)


def test_gradcheck_nsa_reference():
    # T = 32 still has 4 selection candidates for n = 3 at the end, so top-n really picks.
    q, k, v, gates = qkv(32, 2, 1, dk=3, dv=2, grad=True)
    gates.requires_grad_()
    # Selection is piecewise constant; finite differences of 1e-6 do not cross a decision here.
    _gradcheck(lambda a, b, c, g: nsa_attention(a, b, c, g, GRAD_CFG, backend="reference"), q, k, v, gates,
               what="gradcheck nsa_attention (reference)")


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("cu", [None, [0], [0, 0, 0]], ids=["T0", "B0", "all-empty"])
def test_no_tokens_at_all(backend, cu):
    q, k, v, gates = qkv(0, 2, 1, grad=True)
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    out = nsa_attention(q, k, v, gates, SMALL, cu, backend=backend)
    assert out.shape == (0, 2, 3), f"empty batch: (0, Hq, Dv), got {tuple(out.shape)}"
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape, "empty batch: backward still runs"
