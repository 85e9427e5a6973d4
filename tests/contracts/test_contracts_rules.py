"""Each rule in the catalog: a case that breaks only it, valid inputs that break none, messages."""
from __future__ import annotations

import pytest
import torch

import contracts
from contracts import (
    RULES,
    DeviceCaps,
    FA2ContractError,
    check_dense,
    check_kvcache,
    check_varlen,
    dense_reasons,
    varlen_reasons,
)
from contracts_testkit import BREAKING, F16, I32, VALID, dense_inputs, kvcache_inputs, varlen_inputs


def _provider_kwargs(case, provider):
    return {} if "provider" in case.extra else {"provider": provider}


def test_every_rule_has_a_breaking_case():
    missing = sorted(set(RULES) - set(BREAKING))
    unknown = sorted(set(BREAKING) - set(RULES))
    assert not missing, f"rules without a breaking case in contracts_testkit.BREAKING: {missing}"
    assert not unknown, f"breaking cases for rules not in RULES: {unknown}"


@pytest.mark.parametrize("rule_id", sorted(RULES))
def test_rule_is_caught_alone(rule_id):
    cases = BREAKING.get(rule_id)
    assert cases, f"{rule_id} has no breaking case"
    for case in cases:
        for provider in case.providers:
            ids = case.rule_ids(**_provider_kwargs(case, provider))
            assert ids == [rule_id], f"{case.label} [{provider}]: expected only {rule_id}, got {ids}"


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.label)
def test_valid_inputs_give_no_reasons(case):
    for provider in case.providers:
        for strict in (False, True):
            reasons = case.reasons(strict=strict, **_provider_kwargs(case, provider))
            assert reasons == [], f"{case.label} [{provider}, strict={strict}]: " + "\n".join(map(str, reasons))


@pytest.mark.parametrize("case", [c for c in VALID if c.kind != "kvcache"], ids=lambda c: c.label)
def test_valid_inputs_on_meta_give_no_reasons(case):
    meta = {
        name: torch.empty(value.shape, dtype=value.dtype, device="meta") if isinstance(value, torch.Tensor) else value
        for name, value in case.args.items()
    }
    for provider in case.providers:
        assert case.reasons(**{**meta, **_provider_kwargs(case, provider)}) == []


def test_reasons_are_pydantic_and_quote_values():
    reasons = dense_reasons(**dense_inputs(hq=5, hk=2))
    (reason,) = reasons
    assert reason.rule == "FA2-HEADS-DIVISIBLE" and reason.kind == "clean-error"
    assert "Hq = 5" in reason.message and "Hkv = 2" in reason.message
    assert reason.fix == RULES["FA2-HEADS-DIVISIBLE"].fix
    with pytest.raises(Exception):
        reason.rule = "other"  # frozen


def test_several_violations_are_all_reported():
    args = dense_inputs(hq=5, hk=2, d=264, dtype=torch.float32)
    ids = [r.rule for r in dense_reasons(**args, dropout_p=1.0, caps="sm75")]
    assert ids == ["FA2-ARCH", "FA2-DTYPE", "FA2-DROPOUT-RANGE", "FA2-HEAD-DIM-MAX", "FA2-HEADS-DIVISIBLE"]


def test_rank_failure_still_reports_metadata_rules():
    args = dense_inputs(dtype=torch.float32)
    args["q"] = torch.empty(2, 16, 64)
    ids = [r.rule for r in dense_reasons(**args, dropout_p=2.0)]
    assert ids == ["FA2-RANK", "FA2-DTYPE", "FA2-DROPOUT-RANGE"]


def test_error_lists_inputs_table_and_every_fix():
    args = dense_inputs(hq=5, hk=2, dtype=torch.float32)
    with pytest.raises(FA2ContractError) as info:
        check_dense(**args, dropout_p=1.5)
    err = info.value
    assert isinstance(err, ValueError)
    text = str(err)
    assert err.rules == ["FA2-DTYPE", "FA2-DROPOUT-RANGE", "FA2-HEADS-DIVISIBLE"]
    for header in ("name", "shape", "dtype", "stride", "device"):
        assert header in text
    assert "(2, 16, 5, 64)" in text and "float32" in text and "(5120, 320, 64, 1)" in text
    for reason in err.reasons:
        assert f"[{reason.rule}]" in text and reason.fix in text
    assert "dropout_p=1.5" in text and "provider=flash_attn==" in text


def test_check_varlen_and_kvcache_raise_with_index_tensors_in_table():
    args = varlen_inputs()
    args["cu_seqlens_q"] = args["cu_seqlens_q"].long()
    with pytest.raises(FA2ContractError, match="cu_seqlens_q") as info:
        check_varlen(**args)
    assert info.value.rules == ["FA2-INDEX-DTYPE"]
    assert "int64" in str(info.value)
    with pytest.raises(FA2ContractError) as info:
        check_kvcache(**kvcache_inputs(), num_splits=500)
    assert info.value.rules == ["FA2-NUM-SPLITS"] and "k_cache" in str(info.value)
    assert check_varlen(**varlen_inputs()) is None
    with pytest.raises(TypeError):
        check_dense(**dense_inputs(), not_an_argument=1)


def test_provider_rules_differ():
    # flash_attn pads d to a multiple of 8 in Python; torch's op refuses d % 8 != 0.
    assert dense_reasons(**dense_inputs(d=59), provider="flash_attn") == []
    assert [r.rule for r in dense_reasons(**dense_inputs(d=59), provider="torch")] == ["FA2-HEAD-DIM-MULTIPLE"]
    # d=250 pads to 256: fine; 257 pads to 264: too large.
    assert dense_reasons(**dense_inputs(d=250)) == []
    # flash_attn makes q/k/v contiguous itself; torch's op does not.
    q = torch.empty(2, 16, 64, 4, dtype=F16).transpose(-1, -2)
    args = {**dense_inputs(), "q": q}
    assert dense_reasons(**args) == []
    assert [r.rule for r in dense_reasons(**args, provider="torch")] == ["FA2-LAST-DIM-STRIDE"]
    # torch >= 2.10 returns an empty output for dense b == 0.
    assert dense_reasons(**dense_inputs(b=0), provider="torch==2.10") == []
    assert [r.rule for r in dense_reasons(**dense_inputs(b=0), provider="torch==2.9")] == ["FA2-BATCH-EMPTY"]
    # flash_attn >= 2.7.3 runs on any sm >= 80; earlier builds only on 8.x and 9.0.
    assert dense_reasons(**dense_inputs(), caps="sm100") == []
    assert [r.rule for r in dense_reasons(**dense_inputs(), caps="sm100", provider="flash_attn==2.7.2")] == ["FA2-ARCH"]
    # The garbage-gradient gap is a flash_attn >= 2.7.3 fact; earlier releases refuse that backward.
    garbage = dict(caps="sm89", dropout_p=0.1, backward=True)
    assert [r.rule for r in dense_reasons(**dense_inputs(d=224), **garbage)] == ["FA2-BWD-GARBAGE-GRADS"]
    assert [r.rule for r in dense_reasons(**dense_inputs(d=224), **garbage, provider="flash_attn==2.7.2")] == [
        "FA2-BWD-ARCH"]


def test_arch_rules_need_caps_on_cpu():
    args = dense_inputs(d=224)
    # CPU tensors, caps=None: arch rules are not evaluated.
    assert dense_reasons(**args, dropout_p=0.1, requires_grad=True) == []
    assert dense_reasons(**args, dropout_p=0.1, requires_grad=True, caps=DeviceCaps(major=8, minor=6)) != []


def test_backward_rules_follow_autograd_when_requires_grad_is_none():
    args = dense_inputs(d=224)
    assert dense_reasons(**args, dropout_p=0.1, caps="sm86") == []
    args["q"].requires_grad_(True)
    assert [r.rule for r in dense_reasons(**args, dropout_p=0.1, caps="sm86")] == ["FA2-BWD-GARBAGE-GRADS"]
    with torch.no_grad():
        assert dense_reasons(**args, dropout_p=0.1, caps="sm86") == []


def test_int32_offset_boundary():
    # 2**31 / (16 * 128) = 2**20 query rows (rounded to 128) is the first failing size.
    below = dense_inputs(b=1, sq=2**20 - 128, sk=1, hq=16, hk=16, d=128, device="meta")
    at = dense_inputs(b=1, sq=2**20, sk=1, hq=16, hk=16, d=128, device="meta")
    assert dense_reasons(**below, requires_grad=True) == []
    (reason,) = dense_reasons(**at, requires_grad=True)
    assert reason.rule == "FA2-INT32-OFFSET" and "2147483648" in reason.message
    # d_rounded: d=136 rounds to 192 (to 64 above 128), so the bound comes earlier.
    at_136 = dense_inputs(b=1, sq=2**20 // 192 * 128 // 128 * 128 + 128 * 100, sk=1, hq=16, hk=16, d=136, device="meta")
    assert [r.rule for r in dense_reasons(**at_136, requires_grad=True)] == ["FA2-INT32-OFFSET"]


def test_window_and_causal_decisions():
    # A left window >= seqlen_k keeps the same keys as no window: not flagged.
    assert dense_reasons(**dense_inputs(sq=10, sk=2), window_size=(50, -1)) == []
    # A right window >= seqlen_k is a no-op when every row already sees every key.
    assert dense_reasons(**dense_inputs(sq=3, sk=2), window_size=(-1, 2)) == []
    # With a surviving left window the right side becomes seqlen_k: equal when wr == sk ...
    assert dense_reasons(**dense_inputs(sq=10, sk=2), window_size=(1, 2)) == []
    # ... and harmless when every row's right bound already covers the keys.
    assert dense_reasons(**dense_inputs(sq=3, sk=2), window_size=(0, 4)) == []
    # ... and causal=True overrides the right window anyway.
    assert dense_reasons(**dense_inputs(sq=10, sk=2), window_size=(-1, 2), causal=True) == []
    # max_seqlen_q == 1 with causal is fine when every sequence has at most one query.
    assert varlen_reasons(**varlen_inputs(lq=(1, 1), lk=(4, 9), hq=2, hk=2), causal=True) == []


def test_meta_mode_reads_no_values():
    # Meta tensors have no storage: any value read would raise.
    args = varlen_inputs(device="meta")
    assert varlen_reasons(**args) == []
    args["max_seqlen_q"] = 3  # caught by strict mode on a real device, not readable here
    assert varlen_reasons(**args, strict=True) == []


def test_strict_reads_each_index_tensor_once(monkeypatch):
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(tuple(self.shape))
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    args = varlen_inputs()
    args["seqused_k"] = torch.tensor([5, 11], dtype=I32)
    assert varlen_reasons(**args, strict=True) == []
    assert len(calls) == 1, f"expected one host copy, got {calls}"
    calls.clear()
    assert varlen_reasons(**args) == []
    assert calls == []


def test_strict_skips_index_tensors_that_failed_meta_rules():
    args = varlen_inputs()
    args["cu_seqlens_q"] = torch.tensor([1, 5, 16])  # int64 and a bad start
    assert [r.rule for r in varlen_reasons(**args, strict=True)] == ["FA2-INDEX-DTYPE"]


def test_caps_for_cuda_device_are_cached(monkeypatch):
    from contracts import caps as caps_module

    asked = []

    class Props:
        name = "Fake GPU"
        multi_processor_count = 84

    monkeypatch.setattr(caps_module, "_CAPS_BY_INDEX", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    first = contracts.caps_for_device(3)
    second = DeviceCaps.from_device("cuda:3")
    assert first is second and asked == [3]
    assert (first.major, first.minor, first.sm_count, str(first)) == (8, 6, 84, "sm86 (Fake GPU)")
    with pytest.raises(ValueError, match="not a CUDA device"):
        DeviceCaps.from_device("cpu")


@pytest.mark.parametrize("text, arch", [("sm86", (8, 6)), ("sm_120", (12, 0)), ("8.9", (8, 9)), ("90", (9, 0))])
def test_caps_parse(text, arch):
    assert DeviceCaps.parse(text).arch == arch


def test_caps_parse_rejects_garbage():
    with pytest.raises(ValueError, match="compute capability"):
        DeviceCaps.parse("ampere")


def test_fuzzer_false_rejects_fixed_on_the_h100():
    """Two over-strict cases the H100 fuzzer found (artifacts/2026-11-25/fa2_harden/fuzz/)."""
    from contracts import dense_reasons, varlen_reasons
    from contracts_testkit import dense_inputs, varlen_inputs

    # causal with max_seqlen_q = 1 but an explicit right window 0: still causal, not dropped
    var = varlen_inputs(lq=(5, 6), hq=2, hk=2)
    var["max_seqlen_q"] = 1
    ids = [r.rule for r in varlen_reasons(**var, causal=True, window_size=(3, 0))]
    assert "FA2-CAUSAL-DROPPED" not in ids
    assert "FA2-CAUSAL-DROPPED" in [r.rule for r in varlen_reasons(**var, causal=True)]
    # a right window over an empty key set changes nothing
    ids = [r.rule for r in dense_reasons(**dense_inputs(sq=9, sk=0), window_size=(5, 0))]
    assert "FA2-WINDOW-RIGHT-CLAMPED" not in ids and "FA2-DENSE-EMPTY-K" in ids


def test_strict_mode_on_empty_cu_seqlens_reports_instead_of_crashing():
    from contracts import varlen_reasons
    from contracts_testkit import varlen_inputs

    var = varlen_inputs()
    var["cu_seqlens_q"] = var["cu_seqlens_q"][:0]
    var["cu_seqlens_k"] = var["cu_seqlens_k"][:0]
    ids = [r.rule for r in varlen_reasons(**var, strict=True)]
    assert {"FA2-BATCH-EMPTY", "FA2-INDEX-SHAPE"} & set(ids), ids
