"""Self-tests of ``conformance.brute`` on tiny cases computed by hand.

The brute force is the suite's ground truth, so it gets its own checks against numbers worked
out on paper from nsa_spec.md. Configs are plain namespaces: the brute force does not need nsa_ref.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conformance import brute

pytestmark = [pytest.mark.usefixtures("nsa_cpu_threads")]


def cfg(**kw):
    base = dict(block_len=32, block_stride=16, sel_block=64, n_sel=16, n_init=1, n_local=2,
                window=512, compress="mean", scale=None)
    base.update(kw)
    return SimpleNamespace(**base)


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


# --- compression --------------------------------------------------------------------------------

@pytest.mark.parametrize("T, l, d, Tc", [(0, 4, 2, 0), (3, 4, 2, 0), (4, 4, 2, 1), (5, 4, 2, 1),
                                         (6, 4, 2, 2), (9, 4, 2, 3), (31, 32, 16, 0), (32, 32, 16, 1),
                                         (47, 32, 16, 1), (48, 32, 16, 2), (97, 32, 16, 5), (1025, 32, 16, 63)])
def test_num_cmp_blocks(T, l, d, Tc):
    """Tc = floor((T - l) / d) + 1 for T >= l, else 0."""
    assert brute.num_cmp_blocks(T, brute.geometry(cfg(block_len=l, block_stride=d))) == Tc


def test_compress_mean_by_hand():
    """x = 0..8 (T=9), l=4, d=2: blocks [0,4), [2,6), [4,8) -> means 1.5, 3.5, 5.5."""
    x = torch.arange(9, dtype=torch.float64).view(9, 1, 1)
    k_cmp, cu = brute.compress(x, cfg(block_len=4, block_stride=2))
    assert k_cmp.flatten().tolist() == [1.5, 3.5, 5.5]
    assert cu.tolist() == [0, 3]


def test_compress_varlen_by_hand():
    """Two sequences 0..5 and 100..103 with l=4, d=2: [1.5, 3.5] and [101.5]; none crosses."""
    x = torch.tensor([0, 1, 2, 3, 4, 5, 100, 101, 102, 103], dtype=torch.float64).view(-1, 1, 1)
    cu = torch.tensor([0, 6, 6, 10], dtype=torch.int32)
    k_cmp, cu_cmp = brute.compress(x, cfg(block_len=4, block_stride=2), cu)
    assert k_cmp.flatten().tolist() == [1.5, 3.5, 101.5]
    assert cu_cmp.tolist() == [0, 2, 2, 3]


# --- cmp ----------------------------------------------------------------------------------------

def test_cmp_visibility_by_hand():
    """l=4, d=2, keys all 0 (uniform softmax), v_cmp[i] = i.

    Block i is visible iff 2i + 3 <= t: t=0..2 none (out 0, lse -inf); t=3,4 block 0 (out 0,
    lse 0); t=5,6 blocks 0,1 (out 0.5, lse log 2); t=7 blocks 0..2 (out 1, lse log 3)."""
    T = 8
    c = cfg(block_len=4, block_stride=2)
    q = torch.ones(T, 1, 1, dtype=torch.float64)
    k_cmp = torch.zeros(3, 1, 1, dtype=torch.float64)
    v_cmp = torch.arange(3, dtype=torch.float64).view(3, 1, 1)
    out, lse = brute.cmp_attention(q, k_cmp, v_cmp, c)
    assert out.flatten().tolist() == [0, 0, 0, 0, 0, 0.5, 0.5, 1.0]
    expected = [-math.inf] * 3 + [0.0, 0.0, math.log(2), math.log(2), math.log(3)]
    assert lse.flatten().tolist() == pytest.approx(expected)


def test_cmp_softmax_by_hand():
    """One visible block pair with logits 0 and log 3 -> weights 1/4, 3/4."""
    c = cfg(block_len=1, block_stride=1, scale=1.0)
    q = torch.full((2, 1, 1), math.log(3), dtype=torch.float64)
    k_cmp = f64([[[0.0]], [[1.0]]])
    v_cmp = f64([[[4.0]], [[8.0]]])
    out, lse = brute.cmp_attention(q, k_cmp, v_cmp, c)
    # t=0 sees block 0 only; t=1 sees both: 4/4 + 8*3/4 = 7.
    assert out.flatten().tolist() == pytest.approx([4.0, 7.0])
    assert lse[1, 0].item() == pytest.approx(math.log(1 + 3))


# --- selection ----------------------------------------------------------------------------------

def test_sel_weights_paper_defaults():
    """32/16/64: block j gets weights 1,2,2,2,1 from cmp blocks 4j-1 .. 4j+3 (j=0: 2,2,2,1)."""
    g = brute.geometry(cfg())
    assert [brute.sel_weight(1, i, g) for i in range(2, 9)] == [0, 1, 2, 2, 2, 1, 0]
    assert [brute.sel_weight(0, i, g) for i in range(0, 5)] == [2, 2, 2, 1, 0]


@pytest.mark.parametrize("t, n_init, n_local, forced", [
    (0, 1, 2, [0]), (63, 1, 2, [0]), (64, 1, 2, [0, 1]), (200, 1, 2, [0, 2, 3]),
    (200, 0, 0, []), (200, 2, 1, [0, 1, 3]), (200, 5, 0, [0, 1, 2, 3]), (130, 0, 4, [0, 1, 2]),
])
def test_forced_blocks(t, n_init, n_local, forced):
    """Initial 0..n_init-1 and local c-n_local+1..c, clipped to 0..c (c = t // 64)."""
    g = brute.geometry(cfg(n_init=n_init, n_local=n_local, n_sel=max(16, n_init + n_local)))
    assert brute.forced_blocks(t, g) == forced


def test_choose_blocks_top_n_and_ties():
    """Scores [.1, .5, .5, .2, .9], t in block 4, n=3 with block 0 and block 4 forced:
    the one free pick is block 1 or 2 (tied at .5) -> the lower index, 1."""
    g = brute.geometry(cfg(block_len=1, block_stride=1, sel_block=1, n_sel=3, n_init=1, n_local=1))
    assert brute.choose_blocks(f64([0.1, 0.5, 0.5, 0.2, 0.9]), 4, g) == [0, 1, 4]
    # Only blocks 0..c compete: at t=2 the higher score of block 4 is in the future.
    assert brute.choose_blocks(f64([0.1, 0.5, 0.5, 0.2, 0.9]), 2, g) == [0, 1, 2]
    # Fewer candidates than n: take all.
    assert brute.choose_blocks(f64([0.1, 0.5, 0.5, 0.2, 0.9]), 1, g) == [0, 1]


def test_select_blocks_all_zero_scores_pick_lowest():
    """No cmp block visible yet (t < l - 1) -> every score is 0 -> ties to the lowest indices."""
    c = cfg(block_len=16, block_stride=4, sel_block=4, n_sel=2, n_init=0, n_local=0)
    T = 12
    q = torch.randn(T, 2, 3, dtype=torch.float64)
    k_cmp = torch.zeros(0, 1, 3, dtype=torch.float64)
    idx = brute.select_blocks(q, k_cmp, c)
    assert idx[0, 0].tolist() == [0, -1]
    assert idx[5, 0].tolist() == [0, 1]
    assert idx[11, 0].tolist() == [0, 1]


def test_selection_scores_gqa_sum_by_hand():
    """l = d = l' = 2 (weights are the identity); two query heads share one KV head.

    At t=3 both cmp blocks are visible; head 0 has logits (0, log 3) -> p = (1/4, 3/4), head 1
    has logits (0, 0) -> p = (1/2, 1/2); GQA sum -> scores (3/4, 5/4)."""
    c = cfg(block_len=2, block_stride=2, sel_block=2, n_sel=1, n_init=0, n_local=0, scale=1.0)
    q = torch.zeros(4, 2, 1, dtype=torch.float64)
    q[:, 0, 0] = math.log(3)
    k_cmp = f64([[[0.0]], [[1.0]]])
    scores = brute.selection_scores(q, k_cmp, c)[0]
    assert scores.shape == (4, 1, 2)
    assert scores[3, 0].tolist() == pytest.approx([0.75, 1.25])
    # With n = 1 and nothing forced, t=3 picks block 1 (higher score); t=1 only has block 0.
    idx = brute.select_blocks(q, k_cmp, c)
    assert idx[3, 0].tolist() == [1]
    assert idx[1, 0].tolist() == [0]


# --- sel and win attention ----------------------------------------------------------------------

def test_sel_attention_by_hand():
    """l' = 2, keys 0 (uniform), v[s] = s. t=3 with block 0 -> keys {0,1} -> 0.5;
    t=2 with block 1 -> keys {2} (3 > t is cut) -> 2; t=0 with only block 1 (future) -> 0."""
    c = cfg(block_len=2, block_stride=2, sel_block=2, n_sel=1, n_init=0, n_local=0)
    T = 4
    q = torch.ones(T, 1, 1, dtype=torch.float64)
    k = torch.zeros(T, 1, 1, dtype=torch.float64)
    v = torch.arange(T, dtype=torch.float64).view(T, 1, 1)
    idx = torch.tensor([[[1]], [[0]], [[1]], [[0]]], dtype=torch.int32)
    out = brute.sel_attention(q, k, v, idx, c)
    assert out.flatten().tolist() == [0.0, 0.5, 2.0, 0.5]


@pytest.mark.parametrize("w, expected", [(1, [0, 1, 2, 3, 4]), (2, [0, 0.5, 1.5, 2.5, 3.5]),
                                         (3, [0, 0.5, 1, 2, 3]), (512, [0, 0.5, 1, 1.5, 2])])
def test_win_attention_by_hand(w, expected):
    """Keys 0 (uniform), v[s] = s: out[t] = mean of v over [max(0, t - w + 1), t]."""
    c = cfg(window=w)
    T = 5
    q = torch.ones(T, 1, 1, dtype=torch.float64)
    k = torch.zeros(T, 1, 1, dtype=torch.float64)
    v = torch.arange(T, dtype=torch.float64).view(T, 1, 1)
    assert brute.win_attention(q, k, v, c).flatten().tolist() == pytest.approx(expected)


def test_gqa_head_mapping():
    """Query head h uses KV head h // G: with G = 2, heads 0,1 read KV 0 and heads 2,3 read KV 1."""
    c = cfg(window=1)
    q = torch.ones(1, 4, 1, dtype=torch.float64)
    k = torch.zeros(1, 2, 1, dtype=torch.float64)
    v = f64([[[10.0], [20.0]]])
    assert brute.win_attention(q, k, v, c).flatten().tolist() == [10, 10, 20, 20]


# --- gating and varlen --------------------------------------------------------------------------

def test_gated_sum_of_parts():
    """o = g_cmp * o_cmp + g_sel * o_sel + g_win * o_win, per (t, head)."""
    c = cfg(block_len=4, block_stride=2, sel_block=4, n_sel=2, n_init=1, n_local=1, window=3)
    gen = torch.Generator().manual_seed(0)
    T, Hq, Hkv = 11, 2, 1
    q = torch.randn(T, Hq, 3, generator=gen, dtype=torch.float64)
    k = torch.randn(T, Hkv, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(T, Hkv, 2, generator=gen, dtype=torch.float64)
    gates = torch.rand(T, Hq, 3, generator=gen, dtype=torch.float64)
    out, parts = brute.nsa_attention(q, k, v, gates, c, return_parts=True)
    t, h = 9, 1
    want = gates[t, h, 0] * parts["cmp"][t, h] + gates[t, h, 1] * parts["sel"][t, h] + gates[t, h, 2] * parts["win"][t, h]
    assert torch.allclose(out[t, h], want, rtol=0, atol=1e-15)
    one_hot = torch.zeros_like(gates)
    one_hot[..., 2] = 1
    assert torch.equal(brute.nsa_attention(q, k, v, one_hot, c), parts["win"])


def test_varlen_is_per_sequence():
    """Packing [0, 3, 0, 7] tokens gives the same rows as running each sequence alone."""
    c = cfg(block_len=2, block_stride=1, sel_block=2, n_sel=2, n_init=1, n_local=1, window=2)
    gen = torch.Generator().manual_seed(1)
    T = 10
    q = torch.randn(T, 2, 3, generator=gen, dtype=torch.float64)
    k = torch.randn(T, 1, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(T, 1, 2, generator=gen, dtype=torch.float64)
    gates = torch.rand(T, 2, 3, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 0, 3, 3, 10], dtype=torch.int32)
    packed = brute.nsa_attention(q, k, v, gates, c, cu)
    alone = torch.cat([brute.nsa_attention(q[:3], k[:3], v[:3], gates[:3], c),
                       brute.nsa_attention(q[3:], k[3:], v[3:], gates[3:], c)])
    assert torch.equal(packed, alone)


def test_brute_refuses_what_the_spec_leaves_open():
    with pytest.raises(ValueError, match="n_init \\+ n_local"):
        brute.geometry(cfg(n_sel=2, n_init=2, n_local=1))
    with pytest.raises(NotImplementedError, match="mlp"):
        brute.geometry(cfg(compress="mlp"))
