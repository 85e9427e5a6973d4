"""Per-release flash_attn specs: signatures, arguments, the backward arch check, unknown versions."""
from __future__ import annotations

import warnings

import pytest
import torch

from contracts import FA2ContractError, dense_reasons, guarded, kvcache_reasons, spec, spec_for, varlen_reasons
from contracts import versions as V
from contracts_testkit import dense_inputs, kvcache_inputs, paged_varlen_inputs, varlen_inputs


@pytest.fixture
def fresh_specs(monkeypatch):
    monkeypatch.setattr(spec, "_SPECS", {})


@pytest.mark.parametrize("version, softcap, lse, leftpad, varlen_table", [
    ("2.5.0", False, False, False, False),
    ("2.5.6", False, False, False, False),
    ("2.5.7", False, False, False, True),
    ("2.6.0", True, True, False, True),
    ("2.6.1", True, True, True, True),
    ("2.7.4", True, True, True, True),
    ("2.8.3.post1", True, True, True, True),
])
def test_arguments_by_release(version, softcap, lse, leftpad, varlen_table):
    s = spec_for(f"flash_attn=={version}")
    assert (s.supports_softcap, s.supports_return_softmax_lse, s.supports_cache_leftpad,
            s.supports_varlen_block_table) == (softcap, lse, leftpad, varlen_table)
    assert ("softcap" in s.signatures["dense"]) is softcap
    assert ("cache_leftpad" in s.signatures["kvcache"]) is leftpad
    assert (s.signatures["varlen"][-1] == "block_table") is varlen_table


def test_signatures_2_5_vs_2_8():
    old, new = V.signature((2, 5, 0), "dense"), V.signature((2, 8, 3), "dense")
    assert old[7] == "alibi_slopes" and new[7] == "softcap"
    assert V.signature((2, 5, 0), "kvcache")[9] == "block_table"
    assert V.signature((2, 8, 3), "kvcache")[9] == "cache_leftpad"
    assert V.signature((2, 8, 3), "kvcache")[-1] == "return_softmax_lse"
    assert V.signature((2, 8, 3), "varlen_qkvpacked")[:4] == ("qkv", "cu_seqlens", "max_seqlen", "dropout_p")


def test_guard_binds_positions_of_the_release():
    """2.5's 8th positional argument of flash_attn_func is alibi_slopes; 2.8's is softcap."""
    a = dense_inputs()
    slopes = torch.empty(3, dtype=torch.float32)  # wrong shape: FA2-ALIBI when bound as alibi_slopes
    calls = []
    kernel = lambda *args, **kw: calls.append(len(args))  # noqa: E731
    with pytest.raises(FA2ContractError, match="FA2-ALIBI"):
        guarded(kernel, "dense", provider="flash_attn==2.5.9")(a["q"], a["k"], a["v"], 0.0, None, False, (-1, -1), slopes)
    with pytest.raises(FA2ContractError, match="FA2-ALIBI"):
        guarded(kernel, "dense", provider="flash_attn==2.8.3")(a["q"], a["k"], a["v"], 0.0, None, False, (-1, -1), 0.0,
                                                              slopes)
    assert calls == []


def test_unsupported_arguments():
    a = dense_inputs()
    assert [r.rule for r in dense_reasons(**a, softcap=30.0, provider="flash_attn==2.5.9")] == ["FA2-ARG-UNSUPPORTED"]
    assert dense_reasons(**a, softcap=30.0, provider="flash_attn==2.6.0") == []
    p = paged_varlen_inputs()
    assert [r.rule for r in varlen_reasons(**p, provider="flash_attn==2.5.6")] == ["FA2-ARG-UNSUPPORTED"]
    assert varlen_reasons(**p, provider="flash_attn==2.5.7") == []
    k = kvcache_inputs()
    assert [r.rule for r in kvcache_reasons(**k, return_softmax_lse=True, provider="flash_attn==2.5.9")] == [
        "FA2-ARG-UNSUPPORTED"]
    # An explicit softcap=0.0 keyword is a TypeError on 2.5 too; guarded() sees the name.
    with pytest.raises(FA2ContractError, match="softcap given"):
        guarded(lambda *x, **y: None, "dense", provider="flash_attn==2.5.9")(a["q"], a["k"], a["v"], softcap=0.0)
    guarded(lambda *x, **y: None, "dense", provider="flash_attn==2.6.0")(a["q"], a["k"], a["v"], softcap=0.0)


def test_torch_refuses_alibi():
    """torch's FA-2 build refuses alibi_slopes (H200 2026-12-03, torch 2.11: 'This flash attention
    build does not support alibi.'); the flash_attn package takes them."""
    a = dense_inputs()
    slopes = torch.ones(a["q"].shape[2], dtype=torch.float32, device=a["q"].device)
    torch_reasons = dense_reasons(**a, alibi_slopes=slopes, provider="torch==2.11.0")
    assert [r.rule for r in torch_reasons] == ["FA2-ARG-UNSUPPORTED"], torch_reasons
    assert "alibi_slopes given" in torch_reasons[0].message
    assert dense_reasons(**a, alibi_slopes=slopes, provider="flash_attn==2.8.3") == []
    assert dense_reasons(**a, provider="torch==2.11.0") == []


@pytest.mark.parametrize("version, d, dropout, refused", [
    ("2.5.0", 200, 0.0, True),   # d > 192 always
    ("2.5.5", 224, 0.0, True),   # (192, 224] always
    ("2.5.5", 256, 0.0, False),  # (224, 256] only with dropout
    ("2.5.5", 256, 0.1, True),
    ("2.6.2", 224, 0.0, False),  # only with dropout from 2.6.2
    ("2.6.2", 224, 0.1, True),
    ("2.7.2", 256, 0.1, True),
    ("2.7.3", 256, 0.1, False),  # the check is gone: FA2-BWD-GARBAGE-GRADS instead
    ("2.5.0", 192, 0.1, False),
])
def test_bwd_arch_check_by_release(version, d, dropout, refused):
    a = dense_inputs(d=d)
    found = [r.rule for r in dense_reasons(**a, dropout_p=dropout, caps="sm86", backward=True,
                                           provider=f"flash_attn=={version}")]
    assert ("FA2-BWD-ARCH" in found) is refused
    assert dense_reasons(**a, dropout_p=dropout, caps="sm86", backward=False, provider=f"flash_attn=={version}") == []
    assert dense_reasons(**a, dropout_p=dropout, caps="sm80", backward=True, provider=f"flash_attn=={version}") == []
    if version == "2.7.3":
        assert found == ["FA2-BWD-GARBAGE-GRADS"]


def test_future_version_gets_newest_rules_and_a_warning(fresh_specs):
    with pytest.warns(UserWarning, match=r"flash_attn 2\.9\.1 is outside .* 2\.8\.3 rules"):
        s = spec_for("flash_attn==2.9.1")
    assert s.version == "2.9.1" and s.release == (2, 8, 3)
    assert s.signatures == spec_for("flash_attn==2.8.3").signatures
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spec_for("flash_attn==2.9.1") is s  # cached: warned once


def test_old_version_gets_oldest_rules_and_a_warning(fresh_specs):
    with pytest.warns(UserWarning, match="2.5.0 rules"):
        s = spec_for("flash_attn==2.4.2")
    assert s.release == (2, 5, 0) and not s.supports_softcap


def test_modelled_versions_do_not_warn(fresh_specs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for v in ("2.5.0", "2.6.3", "2.7.4.post1", "2.8.3", "2.8.3.post2"):
            spec_for(f"flash_attn=={v}")


def test_installed_version_is_read_from_metadata(fresh_specs, monkeypatch):
    monkeypatch.setattr(spec.importlib.metadata, "version", lambda name: "2.6.0")
    s = spec_for("flash_attn")
    assert s.version == "2.6.0" and not s.supports_cache_leftpad
    monkeypatch.setattr(spec, "_SPECS", {})
    monkeypatch.setattr(spec.importlib.metadata, "version", lambda name: "3.0.0b1")
    with pytest.warns(UserWarning, match="outside"):
        assert spec_for("flash_attn").release == V.NEWEST


def test_torch_provider_has_no_softcap():
    a = dense_inputs()
    assert [r.rule for r in dense_reasons(**a, softcap=5.0, provider="torch")] == ["FA2-ARG-UNSUPPORTED"]
    assert varlen_reasons(**paged_varlen_inputs(), provider="torch==2.13") == []
    assert [r.rule for r in varlen_reasons(**paged_varlen_inputs(), provider="torch==2.12")] == ["FA2-ARG-UNSUPPORTED"]
    assert varlen_reasons(**varlen_inputs(), provider="torch==2.11") == []
