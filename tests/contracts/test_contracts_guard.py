"""guarded(): argument mapping for each FA-2 signature, never calling the kernel on bad input, modes."""
from __future__ import annotations

import pytest
import torch

from contracts import FA2ContractError, contract_mode, guarded
from contracts_testkit import I32, dense_inputs, kvcache_inputs, varlen_inputs

ENV = "NSA_FA2_CONTRACTS"


class Recorder:
    """Fake kernels with the real signatures; each records its calls."""

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        self.calls.append(("dense", causal, window_size, dropout_p))
        return "out"

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               deterministic=False, return_attn_probs=False, block_table=None):
        self.calls.append(("varlen", causal, max_seqlen_q))
        return "out"

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
        self.calls.append(("kvcache", num_splits))
        return "out"

    def aten(self, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask,
             *, scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
             block_table=None, num_splits=None):
        self.calls.append(("aten", cum_seq_q is None, is_causal))
        return "out"


@pytest.fixture
def rec(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    return Recorder()


def test_dense_valid_calls_through_positional_and_keyword(rec):
    f = guarded(rec.flash_attn_func, "dense")
    a = dense_inputs()
    assert f(a["q"], a["k"], a["v"], 0.0, None, True, (8, 0)) == "out"
    assert f(q=a["q"], k=a["k"], v=a["v"], causal=True) == "out"
    assert rec.calls == [("dense", True, (8, 0), 0.0), ("dense", True, (-1, -1), 0.0)]
    assert f.__name__ == "flash_attn_func" and f.__wrapped__ == rec.flash_attn_func


def test_dense_invalid_never_calls_the_kernel(rec):
    f = guarded(rec.flash_attn_func, "dense")
    a = dense_inputs(hq=5, hk=2)
    with pytest.raises(FA2ContractError) as info:
        f(a["q"], a["k"], a["v"], 1.0)  # positional dropout_p
    assert info.value.rules == ["FA2-DROPOUT-RANGE", "FA2-HEADS-DIVISIBLE"]
    assert rec.calls == []


def test_dense_positional_window_is_mapped(rec):
    f = guarded(rec.flash_attn_func, "dense")
    a = dense_inputs(sq=10, sk=2)
    with pytest.raises(FA2ContractError, match="FA2-WINDOW-RIGHT-CLAMPED"):
        f(a["q"], a["k"], a["v"], 0.0, None, False, (-1, 2))
    assert rec.calls == []


def test_varlen_positional_causal_is_mapped(rec):
    f = guarded(rec.flash_attn_varlen_func, "varlen")
    a = varlen_inputs(hq=2, hk=2)
    args = (a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], 1, a["max_seqlen_k"])
    assert f(*args, 0.0, None, False) == "out"  # max_q=1 is a lie, but only meta rules run
    with pytest.raises(FA2ContractError, match="FA2-CAUSAL-DROPPED"):
        f(*args, 0.0, None, True)
    assert rec.calls == [("varlen", False, 1)]


def test_varlen_block_table_and_seqused_k_keywords(rec):
    f = guarded(rec.flash_attn_varlen_func, "varlen")
    a = varlen_inputs()
    with pytest.raises(FA2ContractError, match="FA2-INDEX-SHAPE"):
        f(**a, seqused_k=torch.tensor([1], dtype=I32))
    with pytest.raises(FA2ContractError, match="FA2-RANK"):
        f(**a, block_table=torch.zeros(2, 1, dtype=I32))  # 3-D k with a block table
    assert rec.calls == []


def test_kvcache_mapping(rec):
    f = guarded(rec.flash_attn_with_kvcache, "kvcache")
    a = kvcache_inputs()
    assert f(a["q"], a["k_cache"], a["v_cache"], cache_seqlens=a["cache_seqlens"]) == "out"
    with pytest.raises(FA2ContractError, match="FA2-NUM-SPLITS"):
        f(a["q"], a["k_cache"], a["v_cache"], None, None, None, None, a["cache_seqlens"],
          None, None, None, None, False, (-1, -1), 0.0, True, None, 999)
    assert rec.calls == [("kvcache", 0)]


def test_aten_dense_and_varlen(rec):
    f = guarded(rec.aten, "aten")
    d = dense_inputs()
    assert f(d["q"], d["k"], d["v"], None, None, 16, 16, 0.0, True, False, scale=None) == "out"
    bad = dense_inputs(d=60)  # torch's op does not pad
    with pytest.raises(FA2ContractError, match="FA2-HEAD-DIM-MULTIPLE"):
        f(bad["q"], bad["k"], bad["v"], None, None, 16, 16, 0.0, True, False)
    with pytest.raises(FA2ContractError, match="FA2-RETURN-SOFTMAX"):
        f(d["q"], d["k"], d["v"], None, None, 16, 16, 0.0, True, True)
    v = varlen_inputs()
    assert f(v["q"], v["k"], v["v"], v["cu_seqlens_q"], v["cu_seqlens_k"], 11, 11, 0.0, False, False) == "out"
    with pytest.raises(FA2ContractError, match="FA2-WINDOW-RIGHT-CLAMPED"):
        f(v["q"], v["k"], v["v"], v["cu_seqlens_q"], v["cu_seqlens_k"], 11, 3, 0.0, False, False,
          window_size_left=None, window_size_right=5)
    with pytest.raises(FA2ContractError, match="FA2-INDEX-DTYPE"):
        f(v["q"], v["k"], v["v"], v["cu_seqlens_q"], None, 11, 11, 0.0, False, False)
    assert rec.calls == [("aten", True, True), ("aten", False, False)]


def test_bad_bindings_raise_type_error_without_calling(rec):
    f = guarded(rec.flash_attn_func, "dense")
    a = dense_inputs()
    with pytest.raises(TypeError, match="missing"):
        f(a["q"], a["k"])
    with pytest.raises(TypeError, match="multiple values"):
        f(a["q"], a["k"], a["v"], q=a["q"])
    assert rec.calls == []


def test_unknown_kind_and_mode():
    with pytest.raises(ValueError, match="dense, varlen, qkvpacked, kvpacked, varlen_qkvpacked, varlen_kvpacked, kvcache, aten"):
        guarded(print, "paged")
    with pytest.raises(ValueError, match="off, meta, strict"):
        guarded(print, "dense", mode="loud")


@pytest.mark.parametrize("raw, mode", [(None, "meta"), ("", "meta"), ("off", "off"), ("META", "meta"), (" strict ", "strict")])
def test_contract_mode_from_env(monkeypatch, raw, mode):
    if raw is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, raw)
    assert contract_mode() == mode


def test_invalid_env_mode_names_allowed_values(monkeypatch, rec):
    monkeypatch.setenv(ENV, "on")
    with pytest.raises(ValueError, match=r"NSA_FA2_CONTRACTS.*'on'.*off, meta, strict"):
        contract_mode()
    f = guarded(rec.flash_attn_func, "dense")
    a = dense_inputs()
    with pytest.raises(ValueError, match="off, meta, strict"):
        f(a["q"], a["k"], a["v"])
    assert rec.calls == []


def test_modes_are_read_at_call_time(monkeypatch, rec):
    f = guarded(rec.flash_attn_varlen_func, "varlen")
    a = varlen_inputs()
    a["max_seqlen_q"] = 10  # true max is 11: only strict mode can see it
    monkeypatch.setenv(ENV, "meta")
    assert f(**a) == "out"
    monkeypatch.setenv(ENV, "strict")
    with pytest.raises(FA2ContractError, match="FA2-MAX-SEQLEN-Q-LOW"):
        f(**a)
    bad = varlen_inputs(hk=0)
    monkeypatch.setenv(ENV, "off")
    assert f(**bad) == "out"  # off means no checks at all
    assert len(rec.calls) == 2


def test_explicit_mode_overrides_env(monkeypatch, rec):
    monkeypatch.setenv(ENV, "off")
    f = guarded(rec.flash_attn_func, "dense", mode="meta")
    a = dense_inputs(hk=0)
    with pytest.raises(FA2ContractError, match="FA2-HEADS-KV-ZERO"):
        f(**a)
    monkeypatch.setenv(ENV, "strict")
    g = guarded(rec.flash_attn_varlen_func, "varlen", mode="off")
    assert g(**varlen_inputs(hk=0)) == "out"


def test_guard_provider_and_caps(rec):
    f = guarded(rec.flash_attn_func, "dense", provider="torch", caps="sm75")
    a = dense_inputs()
    with pytest.raises(FA2ContractError) as info:
        f(**a)
    assert info.value.rules == ["FA2-ARCH"] and "torch==" in str(info.value)
