"""Properties: generated valid calls give []; one mutation makes exactly that rule appear."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import dense_reasons, varlen_reasons

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
HALF = (torch.float16, torch.bfloat16)


@st.composite
def dense_calls(draw):
    """A legal dense call on meta tensors, for both providers."""
    b = draw(st.integers(1, 8))
    sq, sk = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    hk = draw(st.integers(1, 8))
    hq = hk * draw(st.integers(1, 4))
    d = 8 * draw(st.integers(1, 32))
    dtype = draw(st.sampled_from(HALF))
    causal = draw(st.booleans())
    wl = draw(st.one_of(st.just(-1), st.integers(0, 2 * sk)))
    # A right window >= sk is only a no-op when it covers every row; keep it inside sk.
    wr = draw(st.one_of(st.just(-1), st.integers(0, sk - 1)))
    if not causal and 0 <= wl < sk and wr < 0 and sq > sk + 1:
        wr = sk - 1  # a left-only window drops keys there (FA2-WINDOW-LEFT-ONLY); ask for all of them
    provider = draw(st.sampled_from(["flash_attn", "torch"]))
    caps = draw(st.sampled_from([None, "sm80", "sm90", "sm86"]))
    dropout = draw(st.sampled_from([0.0, 0.1]))
    if caps == "sm86" and d > 192:
        dropout = 0.0
    meta = lambda *shape: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    return {
        "q": meta(b, sq, hq, d), "k": meta(b, sk, hk, d), "v": meta(b, sk, hk, d),
        "causal": causal, "window_size": (wl, wr), "dropout_p": dropout, "provider": provider,
        "caps": caps, "requires_grad": draw(st.booleans()),
    }


@st.composite
def varlen_calls(draw):
    """A legal varlen call (CPU index tensors, so strict mode can read them)."""
    n = draw(st.integers(1, 6))
    lq = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    lk = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    hk = draw(st.integers(1, 4))
    hq = hk * draw(st.integers(1, 4))
    d = 8 * draw(st.integers(1, 16))
    dtype = draw(st.sampled_from(HALF))
    max_q = max(max(lq), 2)  # max_seqlen_q == 1 has its own rules; covered by the unit tests
    cu = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return {
        "q": torch.empty(sum(lq), hq, d, dtype=dtype), "k": torch.empty(sum(lk), hk, d, dtype=dtype),
        "v": torch.empty(sum(lk), hk, d, dtype=dtype), "cu_seqlens_q": cu(lq), "cu_seqlens_k": cu(lk),
        "max_seqlen_q": max_q, "max_seqlen_k": max(lk), "causal": draw(st.booleans()),
        "provider": draw(st.sampled_from(["flash_attn", "torch"])),
    }


def _ids(reasons):
    return [r.rule for r in reasons]


@SETTINGS
@given(dense_calls())
def test_generated_dense_calls_are_legal(call):
    assert _ids(dense_reasons(**call)) == []


@SETTINGS
@given(varlen_calls())
def test_generated_varlen_calls_are_legal_even_strict(call):
    assert _ids(varlen_reasons(**call, strict=True)) == []


def _meta_like(t, *shape, dtype=None):
    return torch.empty(shape or t.shape, dtype=dtype or t.dtype, device="meta")


DENSE_MUTATIONS = {
    "FA2-DTYPE": lambda c: {**c, **{n: _meta_like(c[n], dtype=torch.float32) for n in "qkv"}},
    "FA2-DTYPE-MATCH": lambda c: {**c, "v": _meta_like(c["v"], dtype=torch.float32)},
    "FA2-HEADS-KV-ZERO": lambda c: {**c, "k": _meta_like(c["k"], *c["k"].shape[:2], 0, c["k"].shape[3]),
                                    "v": _meta_like(c["v"], *c["v"].shape[:2], 0, c["v"].shape[3])},
    "FA2-HEAD-DIM-MAX": lambda c: {**c, **{n: _meta_like(c[n], *c[n].shape[:3], 264) for n in "qkv"}},
    "FA2-HEAD-DIM-V": lambda c: {**c, "v": _meta_like(c["v"], *c["v"].shape[:3], c["v"].shape[3] + 8)},
    "FA2-DROPOUT-RANGE": lambda c: {**c, "dropout_p": 1.0},
    "FA2-ARCH": lambda c: {**c, "caps": "sm75"},
    "FA2-DENSE-EMPTY-Q": lambda c: {**c, "q": _meta_like(c["q"], c["q"].shape[0], 0, *c["q"].shape[2:])},
    "FA2-GRID-LIMIT": lambda c: {**c, **{n: _meta_like(c[n], 70000, *c[n].shape[1:]) for n in "qkv"}},
}


@SETTINGS
@given(dense_calls(), st.sampled_from(sorted(DENSE_MUTATIONS)))
def test_one_dense_mutation_is_named(call, rule_id):
    assert rule_id in _ids(dense_reasons(**DENSE_MUTATIONS[rule_id](call)))


def _with_cu(call, name, values):
    return {**call, name: torch.tensor(values, dtype=torch.int32)}


VARLEN_MUTATIONS = {
    "FA2-INDEX-DTYPE": lambda c: {**c, "cu_seqlens_q": c["cu_seqlens_q"].long()},
    "FA2-INDEX-SHAPE": lambda c: _with_cu(c, "cu_seqlens_k", [*c["cu_seqlens_k"].tolist(), c["cu_seqlens_k"][-1].item()]),
    "FA2-CU-SEQLENS-START": lambda c: _with_cu(c, "cu_seqlens_q", [1, *c["cu_seqlens_q"].tolist()[1:]])
    if c["cu_seqlens_q"][1] >= 1 else _with_cu(c, "cu_seqlens_q", [-1, *c["cu_seqlens_q"].tolist()[1:]]),
    "FA2-CU-SEQLENS-OVERRUN": lambda c: _with_cu(c, "cu_seqlens_k", [*c["cu_seqlens_k"].tolist()[:-1], c["k"].shape[0] + 1]),
    "FA2-MAX-SEQLEN-Q-LOW": lambda c: {**c, "q": torch.empty(c["q"].shape[0] + c["max_seqlen_q"] + 1, *c["q"].shape[1:], dtype=c["q"].dtype),
                                       "cu_seqlens_q": torch.tensor([*c["cu_seqlens_q"].tolist(), c["cu_seqlens_q"][-1].item() + c["max_seqlen_q"] + 1], dtype=torch.int32),
                                       "cu_seqlens_k": torch.tensor([*c["cu_seqlens_k"].tolist(), c["cu_seqlens_k"][-1].item()], dtype=torch.int32)},
    "FA2-HEADS-DIVISIBLE": lambda c: {**c, "q": torch.empty(c["q"].shape[0], c["k"].shape[1] + 1, c["q"].shape[2], dtype=c["q"].dtype)}
    if c["k"].shape[1] > 1 else {**c, "k": torch.empty(c["k"].shape[0], 7, c["k"].shape[2], dtype=c["k"].dtype),
                                 "v": torch.empty(c["v"].shape[0], 7, c["v"].shape[2], dtype=c["v"].dtype),
                                 "q": torch.empty(c["q"].shape[0], 8, c["q"].shape[2], dtype=c["q"].dtype)},
}


@SETTINGS
@given(varlen_calls(), st.sampled_from(sorted(VARLEN_MUTATIONS)))
def test_one_varlen_mutation_is_named(call, rule_id):
    assert rule_id in _ids(varlen_reasons(**VARLEN_MUTATIONS[rule_id](call), strict=True))
