"""The FA-2 kvcache calls of the batched decode (nsa_ref.decode_kvcache_calls), checked on the CPU:
their arguments pass the contract (contracts.kvcache_reasons on meta copies), and the mask FA-2
computes for them (contracts.fa2_mask, with the call's max_seqlen) is the NSA rule of
nsa_ref.masks for every sequence of a ragged batch. This is the seed's off-by-one worry for
decode (one-query calls, FA-2's causal drop, the window clamp) pinned before any GPU run."""
from __future__ import annotations

import pytest
import torch

import contracts
from contracts.fa2_mask import fa2_mask
from nsa_ref import NSAConfig, masks
from nsa_ref.decode_kvcache_calls import cmp_call, win_call
from nsa_ref.kv_cache import NSAKVCache

PAPER = NSAConfig()
SMALL = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=8)
LENGTHS = [0, 5, 31, 300]


def _cache(cfg, page_size, lengths=LENGTHS, hkv=2, dk=64, dv=64, dtype=torch.bfloat16, capacity=512):
    B = len(lengths)
    if page_size is None:
        cache = NSAKVCache.allocate(B, capacity, hkv, dk, cfg, v_head_dim=dv, dtype=dtype)
    else:
        max_pages = -(-capacity // page_size)
        table = torch.randperm(B * max_pages, generator=torch.Generator().manual_seed(0))
        cache = NSAKVCache.allocate_paged(table.to(torch.int32).reshape(B, max_pages), B * max_pages, page_size,
                                          hkv, dk, cfg, v_head_dim=dv, dtype=dtype)
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cache.prefill(torch.randn(T, hkv, dk).to(dtype), torch.randn(T, hkv, dv).to(dtype), cu)
    return cache


def _meta(call: dict) -> dict:
    return {key: value.to("meta") if isinstance(value, torch.Tensor) else value for key, value in call.items()}


def _rules(call: dict) -> list[str]:
    return [r.rule for r in contracts.kvcache_reasons(**_meta(call))]


@pytest.mark.parametrize("page_size", [None, 256], ids=["preallocated", "page256"])
@pytest.mark.parametrize("n", [1, 3])
def test_win_and_cmp_calls_pass_the_contract(page_size, n):
    cache = _cache(PAPER, page_size)
    raw, cmp = cache.views()
    q = torch.empty(len(LENGTHS), n, 16, 64, dtype=torch.bfloat16)
    call = win_call(q, raw, PAPER)
    assert (call["block_table"] is None) == (page_size is None)
    assert _rules(call) == []
    if n == 1:
        assert _rules(cmp_call(q, cmp, PAPER)) == []
    else:
        with pytest.raises(ValueError, match="one query per sequence"):
            cmp_call(q, cmp, PAPER)


def test_contract_refuses_what_fa2_cannot_take():
    """Small pages (the reference takes any size), Dk != Dv (the paper's 192 / 128)."""
    q = torch.empty(4, 1, 16, 64, dtype=torch.bfloat16)
    assert "FA2-PAGED-BLOCK-SIZE" in _rules(win_call(q, _cache(PAPER, 64).views()[0], PAPER))
    uneven = _cache(PAPER, 256, dv=32).views()[0]
    assert "FA2-HEAD-DIM-V" in _rules(win_call(q, uneven, PAPER))


@pytest.mark.parametrize("cfg", [PAPER, SMALL], ids=["paper", "small"])
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("page_size, capacity", [(256, 512), (None, 300)], ids=["page256", "capacity300"])
def test_win_call_mask_is_the_nsa_window(cfg, n, page_size, capacity):
    """For each sequence (cache_seqlens[b] keys after the append, n queries at the end), FA-2's mask
    for win_call's arguments (max_seqlen_q = n, max_seqlen_k = the cache capacity) keeps exactly
    masks.win_visible(t, s). With capacity 300 < w - 1 = 511 FA-2 turns the paper window into no
    window (its clamp), which is still the NSA window: no key is further than w back."""
    cache = _cache(cfg, page_size, capacity=capacity)
    raw = cache.raw
    call = win_call(torch.empty(len(LENGTHS), n, 4, 64), raw.view(), cfg)
    for b, sk in enumerate(raw.lengths):
        if sk < n:
            continue  # these n queries would not all be in the cache
        got = fa2_mask(n, sk, call["causal"], call["window_size"], max_q=n, max_k=raw.capacity)
        t = torch.arange(sk - n, sk)[:, None]
        want = masks.win_visible(t, torch.arange(sk)[None, :], cfg)
        assert torch.equal(got, want), f"sequence {b}: FA-2 window mask != NSA window at length {sk}, n={n}"


@pytest.mark.parametrize("cfg", [PAPER, SMALL], ids=["paper", "small"])
def test_cmp_call_mask_is_every_emitted_block_causal_or_not(cfg):
    """One query at t = length - 1 sees every emitted block (masks.cmp_block_visible), and FA-2
    keeps the same set with causal=True or False (it drops causal for max_seqlen_q == 1 anyway).
    A sequence without blocks has nothing to see."""
    cache = _cache(cfg, None)
    cmp = cache.cmp
    call = cmp_call(torch.empty(len(LENGTHS), 1, 4, 64), cmp.view(), cfg)
    for b, (length, tc) in enumerate(zip(cache.lengths, cmp.lengths)):
        want = masks.cmp_block_visible(length - 1, torch.arange(tc), cfg)[None, :]
        assert bool(want.all()), f"sequence {b}: a cached block is not visible to the last token"
        for causal in (call["causal"], True):
            got = fa2_mask(1, tc, causal, call["window_size"], max_q=1, max_k=cmp.capacity)
            assert torch.equal(got, want), f"sequence {b}, causal={causal}: FA-2 keeps {got.sum()} of {tc} blocks"
