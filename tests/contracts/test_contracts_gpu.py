"""The contract against the real kernels (GPU only): what it calls legal runs, and what it calls a
clean error is refused by the kernel too. Crash, corruption and semantics cases are never run.

Providers tried: torch's built-in op (always) and the flash_attn package (when installed).
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from contracts import RULES
from contracts_testkit import BREAKING, VALID, Case

pytestmark = pytest.mark.gpu

# Clean-error cases the kernels do not refuse: the contract is stricter on purpose.
NOT_REFUSED_BY_KERNEL = {
    "FA2-DROPOUT-RANGE: p<0": "a negative dropout_p is not checked by FA-2",
    "FA2-RANK: kvcache cache not a tensor": "the Python layer fails first; not a kernel check",
    # Never run: the kernel does not check it and reads past the cache (the reason for the rule).
    "FA2-KV-SHAPE: cache batch 1 < 2": "cache batch < q batch is read out of bounds",
    "FA2-ROTARY-TABLE: sin without cos": "FA-2 ignores rotary_sin without rotary_cos (the reason for the rule)",
}
# Version-specific rules: the installed release decides (backward-phase rules are left out below: the
# forward these thunks make runs).
NOT_ON_THIS_GPU_RUN = ("FA2-ARG-UNSUPPORTED",)
SKIP_ON_GPU = ("FA2-DEVICE", "FA2-ARCH")  # the case builds meta tensors / needs another GPU


def _cuda(value):
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_meta:
        value = torch.zeros(value.shape, dtype=value.dtype)
    # Keep the strides (some cases are about them; .to() would make gapped views contiguous).
    out = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cuda")
    if value.is_floating_point():
        return out.normal_() if out.numel() else out
    return out.copy_(value)


def _torch_call(case: Case):
    """A thunk that calls torch's op with the case's arguments (built here, outside the call)."""
    a = {name: _cuda(v) for name, v in {**case.args, **case.extra}.items()}
    wl, wr = a.get("window_size", (-1, -1))
    if case.kind not in ("dense", "varlen") or a.get("softcap"):
        pytest.skip("no torch op for this call kind / argument")
    common = dict(scale=a.get("softmax_scale"), window_size_left=wl, window_size_right=wr, alibi_slopes=a.get("alibi_slopes"))
    op = torch.ops.aten._flash_attention_forward
    if case.kind == "dense":
        q = a["q"]
        return lambda: op(
            q, a["k"], a["v"], None, None, q.shape[1] if q.dim() == 4 else 1, a["k"].shape[1],
            a.get("dropout_p", 0.0), a.get("causal", False), a.get("return_softmax", False), **common)
    if case.kind == "varlen" and "block_table" not in a:
        return lambda: op(
            a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"],
            a.get("dropout_p", 0.0), a.get("causal", False), a.get("return_softmax", False),
            seqused_k=a.get("seqused_k"), **common)
    pytest.skip("no torch op for this call kind")


def _flash_attn_call(case: Case):
    """A thunk that calls the flash_attn package with the case's arguments."""
    fa = pytest.importorskip("flash_attn")
    a = {name: _cuda(v) for name, v in {**case.args, **case.extra}.items()}
    kw = dict(causal=a.get("causal", False), window_size=a.get("window_size", (-1, -1)),
              alibi_slopes=a.get("alibi_slopes"), softmax_scale=a.get("softmax_scale"))
    grad = dict(dropout_p=a.get("dropout_p", 0.0), softcap=a.get("softcap", 0.0),
                deterministic=a.get("deterministic", False), return_attn_probs=a.get("return_softmax", False))
    if case.kind == "qkvpacked":
        return lambda: fa.flash_attn_qkvpacked_func(a["qkv"], **grad, **kw)
    if case.kind == "kvpacked":
        return lambda: fa.flash_attn_kvpacked_func(a["q"], a["kv"], **grad, **kw)
    if case.kind == "varlen_qkvpacked":
        return lambda: fa.flash_attn_varlen_qkvpacked_func(a["qkv"], a["cu_seqlens"], a["max_seqlen"], **grad, **kw)
    if case.kind == "varlen_kvpacked":
        return lambda: fa.flash_attn_varlen_kvpacked_func(
            a["q"], a["kv"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"], **grad, **kw)
    if case.kind == "dense":
        return lambda: fa.flash_attn_func(a["q"], a["k"], a["v"], a.get("dropout_p", 0.0), softcap=a.get("softcap", 0.0), **kw)
    if case.kind == "varlen":
        if "seqused_k" in a:
            pytest.skip("flash_attn_varlen_func has no seqused_k")
        return lambda: fa.flash_attn_varlen_func(
            a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"],
            a.get("dropout_p", 0.0), softcap=a.get("softcap", 0.0), block_table=a.get("block_table"), **kw)
    return lambda: fa.flash_attn_with_kvcache(
        a["q"], a["k_cache"], a["v_cache"], k=a.get("k"), v=a.get("v"), cache_seqlens=a.get("cache_seqlens"),
        cache_batch_idx=a.get("cache_batch_idx"), cache_leftpad=a.get("cache_leftpad"),
        block_table=a.get("block_table"), num_splits=a.get("num_splits", 0), rotary_cos=a.get("rotary_cos"),
        rotary_sin=a.get("rotary_sin"), rotary_interleaved=a.get("rotary_interleaved", True),
        return_softmax_lse=a.get("return_softmax_lse", False), **kw)


CALLERS = {"torch": _torch_call, "flash_attn": _flash_attn_call}


def _provider_params(cases):
    return [
        pytest.param(case, provider, id=f"{provider}: {case.label}")
        for case in cases for provider in case.providers
    ]


@pytest.mark.parametrize("case, provider", _provider_params(VALID))
def test_legal_calls_run(case, provider):
    if provider == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn not installed")
    call = CALLERS[provider](case)  # skips where the provider has no entry point for this call
    cuda_args = {n: _cuda(v) for n, v in case.args.items()}
    assert Case(case.kind, cuda_args, extra=case.extra).reasons(provider=provider) == [], "contract must agree first"
    call()
    torch.cuda.synchronize()


def _clean_error_cases():
    out = []
    for rid, cases in BREAKING.items():
        rule = RULES[rid]
        if rule.kind != "clean-error" or rule.mode != "meta" or rule.phase == "backward" or \
                rid in SKIP_ON_GPU + NOT_ON_THIS_GPU_RUN:
            continue
        out += [c for c in cases if c.label not in NOT_REFUSED_BY_KERNEL and not any(
            isinstance(v, torch.Tensor) and v.is_meta for v in c.args.values())]
    return out


@pytest.mark.parametrize("case, provider", _provider_params(_clean_error_cases()))
def test_clean_errors_are_refused_by_the_kernel(case, provider):
    if provider == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn not installed")
    call = CALLERS[provider](case)
    with pytest.raises((RuntimeError, AssertionError, IndexError, TypeError, ValueError)):
        call()
        torch.cuda.synchronize()
