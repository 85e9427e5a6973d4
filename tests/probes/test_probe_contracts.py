"""For every crash/corruption class: the contract rejects the exact probe input before any kernel runs,
and ``contracts.guarded`` raises FA2ContractError without calling the (fake) kernel; for the
backward-only classes the forward runs and the backward raises before the kernel's backward."""
from __future__ import annotations

import pytest
import torch

from contracts import RULES, FA2ContractError, guarded
from conformance.tools.probes import _common as C
from probes_testkit import PROBE_NAMES, probe_cases, probe_module

CASES = probe_cases()
IDS = [f"{m.NAME}-{p}-{v}" for m, p, v in CASES]

# Every class of fa2_contract.md's "do NOT check" table, with the probe that shows it.
TABLE_ROWS = {
    "num_heads_k == 0": "heads_kv_zero",
    "dense seqlen_q == 0": "dense_empty_q",
    "cu_seqlens[0] != 0": "cu_seqlens_start",
    "cu_seqlens decreasing": "cu_seqlens_decreasing",
    "cu_seqlens[-1] > total": "cu_seqlens_overrun",
    "max_seqlen_q < true max": "max_seqlen_q_low",
    "max_seqlen_q == 1 with causal": "causal_dropped",
    "window >= max_seqlen_k": "window_clamped",
    "varlen GQA max_q == 1, total_q != batch": "varlen_gqa_decode",
    "int32 offset overflow in backward": "int32_offset",
    "grid > 65535": "grid_limit",
    "sm86/89/120 d > 192 dropout backward": "bwd_garbage_grads",
    "paged KV cache overflow": "paged_kv_overflow",
    "dk != dv": "head_dim_v",
}


class _Recorded(torch.autograd.Function):
    """Identity on the first input whose backward counts its calls (a stand-in FA-2 backward)."""

    @staticmethod
    def forward(ctx, x, kernel):
        ctx.kernel = kernel
        return x.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.kernel.backward_calls += 1
        return grad, None


class FakeKernel:
    def __init__(self):
        self.calls = 0
        self.backward_calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        first = args[0] if args else next(iter(kwargs.values()))
        return _Recorded.apply(first, self)


def _backward_only(mod) -> bool:
    return all(RULES[r].phase == "backward" for r in mod.RULES)


def _needed_mode(mod) -> str:
    return "strict" if any(RULES[r].mode == "strict" for r in mod.RULES) else "meta"


def test_every_table_row_has_a_probe():
    assert set(TABLE_ROWS.values()) <= set(PROBE_NAMES)
    for name in PROBE_NAMES:
        mod = probe_module(name)
        assert mod.RULES and all(r in RULES for r in mod.RULES), name
        assert set(mod.PROVIDERS) <= {"flash_attn", "torch"} and mod.VARIANTS and mod.TITLE and mod.EXPECTED


@pytest.mark.parametrize("mod, provider, variant", CASES, ids=IDS)
def test_contract_rejects_the_probe_input(mod, provider, variant):
    setup = mod.build(provider, variant, "cpu")
    meta = {r.rule for r in C.contract_reasons(setup, strict=False)}
    strict = {r.rule for r in C.contract_reasons(setup, strict=True)}
    if provider in getattr(mod, "EXPLORATORY", {}):
        pytest.skip(f"{mod.NAME} is exploratory for {provider}: {mod.EXPLORATORY[provider]}")
    assert set(mod.RULES) <= strict, f"strict verdict {sorted(strict)} misses {set(mod.RULES) - strict}"
    meta_rules = {r for r in mod.RULES if RULES[r].mode == "meta"}
    assert meta_rules <= meta, f"meta verdict {sorted(meta)} misses {meta_rules - meta}"
    # Only the classes' own rules (and their strict companions) fire: the probe breaks one thing.
    assert strict <= set(mod.RULES) | {"FA2-MAX-SEQLEN-Q-LOW"}, strict


@pytest.mark.parametrize("mod, provider, variant", CASES, ids=IDS)
def test_guarded_refuses_and_never_calls_the_kernel(mod, provider, variant, monkeypatch):
    monkeypatch.delenv("NSA_FA2_CONTRACTS", raising=False)
    if provider in getattr(mod, "EXPLORATORY", {}):
        pytest.skip(f"{mod.NAME} is exploratory for {provider}")
    setup = mod.build(provider, variant, "cpu")
    fake = FakeKernel()
    wrapped = guarded(fake, setup.call.kind, mode=_needed_mode(mod), provider=provider, caps=setup.caps)
    if _backward_only(mod):
        out = wrapped(*setup.call.args, **setup.call.kwargs)
        assert fake.calls == 1, "a backward rule must not refuse the forward"
        with pytest.raises(FA2ContractError) as info:
            out.float().sum().backward()
        assert set(mod.RULES) <= set(info.value.rules) and fake.backward_calls == 0
        return
    with pytest.raises(FA2ContractError) as info:
        wrapped(*setup.call.args, **setup.call.kwargs)
    assert set(mod.RULES) <= set(info.value.rules)
    assert fake.calls == 0
    if _needed_mode(mod) == "meta":  # the default mode (NSA_FA2_CONTRACTS unset) is enough
        with pytest.raises(FA2ContractError):
            guarded(fake, setup.call.kind, provider=provider, caps=setup.caps)(*setup.call.args, **setup.call.kwargs)
        assert fake.calls == 0


def test_guard_kinds_match_the_raw_kernels():
    kinds = {(m.NAME, p): m.build(p, v, "cpu").call.kind for m, p, v in CASES if m.NAME in ("head_dim_v", "causal_dropped")}
    assert kinds[("head_dim_v", "flash_attn")] == "dense" and kinds[("head_dim_v", "torch")] == "aten"
    assert kinds[("causal_dropped", "flash_attn")] == "varlen" and kinds[("causal_dropped", "torch")] == "aten"
