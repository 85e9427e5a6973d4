"""Replay of FA-2 2.8.3's own test grids (``contracts.fa2_grid``) against the contract, on meta tensors.

For a sample of every test's grid (fixed seed; the small grids whole) and the archs sm80, sm90 and
sm86, with flash_attn 2.8.3's spec:
  - a configuration the test runs gives no reason (forward, plus backward where the test runs one
    on that arch): 0 false rejects. A window rule may fire only where FA-2's normalised mask
    (``contracts.fa2_mask``) differs from the asked one for a sequence of the call: a correct
    semantics reject (those configurations come from tests that check determinism, not values);
  - a configuration the test skips for an API reason is rejected with the rule that explains it;
  - where the test skips the backward (sm86, 192 < d, dropout) the forward passes and
    ``backward=True`` gives exactly FA2-BWD-GARBAGE-GRADS;
  - a sample goes through ``guarded()`` with a stand-in kernel, backward included on meta tensors.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from contracts import FA2ContractError, RULES, fa2_grid as G, guarded, spec_for
from contracts.caps import DeviceCaps
from contracts.checks import evaluate
from contracts.fa2_mask import fa2_mask, intended_mask
from contracts.guard import call_facts

SPEC = spec_for("flash_attn==2.8.3")
ARCHS = {name: DeviceCaps.parse(name) for name in ("sm80", "sm90", "sm86")}
PER_TEST = 5000  # configurations sampled per grid (grids up to this size are replayed whole)
WINDOW_RULES = {"FA2-WINDOW-RIGHT-CLAMPED", "FA2-WINDOW-LEFT-ONLY"}


def _rules(call: G.GridCall, caps: DeviceCaps, backward: bool, strict: bool = False) -> list[str]:
    c = call_facts(call.kind, call.args, strict=strict, spec=SPEC, caps=caps, backward=backward)
    return [r.rule for r in evaluate(c)]


def _sequences(call: G.GridCall):
    """(sq, sk) of every sequence of the call, and the (max_q, max_k) the kernel normalises with."""
    a = call.args
    if "lengths_q" in call.extra:
        pairs = list(zip(call.extra["lengths_q"], call.extra["lengths_k"]))
        return pairs, (a["max_seqlen_q"], a["max_seqlen_k"])
    if "lengths" in call.extra:
        n = call.extra["lengths"]
        return list(zip(n, n)), (a["max_seqlen"], a["max_seqlen"])
    q = a.get("q", a.get("qkv"))
    k = a.get("k", a.get("kv", q))
    sq, sk = q.shape[1], k.shape[1]
    return [(sq, sk)], (sq, sk)


def _mask_changes(call: G.GridCall) -> bool:
    """Whether FA-2's normalised mask differs from the asked one for some sequence of the call."""
    a = call.args
    causal, window = a.get("causal", False), a.get("window_size", (-1, -1))
    pairs, (max_q, max_k) = _sequences(call)
    for sq, sk in set(pairs):
        if not torch.equal(intended_mask(sq, sk, causal, window), fa2_mask(sq, sk, causal, window, max_q, max_k)):
            return True
    return False


def _replay():
    counts: Counter = Counter()
    false_rejects, missed_skips = [], []
    for test in G.GRIDS:
        for index in G.indices(test, PER_TEST):
            call = G.build(test, index)
            counts["configs"] += 1
            for name, caps in ARCHS.items():
                counts["checks"] += 1
                backward = call.backward_on(caps.arch)
                found = _rules(call, caps, backward)
                if call.skip_rule is not None:
                    counts["api skips"] += 1
                    if call.skip_rule not in found:
                        missed_skips.append(f"{call.label} on {name}: expected {call.skip_rule}, got {found}")
                    continue
                if found and set(found) <= WINDOW_RULES and _mask_changes(call):
                    counts["correct semantics rejects"] += 1
                elif found:
                    false_rejects.append(f"{call.label} on {name} (backward={backward}): {found}")
                else:
                    counts["accepted"] += 1
                skip = G.backward_skip_rule(call, caps.arch)
                if skip is not None:
                    counts["backward skips"] += 1
                    if _rules(call, caps, True) != [skip]:
                        missed_skips.append(f"{call.label} on {name}: backward=True should give [{skip}]")
    return counts, false_rejects, missed_skips


@pytest.fixture(scope="module")
def replay():
    return _replay()


def test_no_false_rejects(replay):
    counts, false_rejects, _ = replay
    print(f"\nFA-2 2.8.3 test grid replay: {dict(counts)}")
    assert counts["configs"] > 30000 and counts["accepted"] > 80000
    assert not false_rejects, f"{len(false_rejects)} false rejects, e.g.\n" + "\n".join(false_rejects[:10])


def test_every_api_skip_is_explained_by_its_rule(replay):
    counts, _, missed = replay
    assert counts["api skips"] > 3000 and counts["backward skips"] > 500
    assert not missed, f"{len(missed)} skipped configurations not explained, e.g.\n" + "\n".join(missed[:10])


def test_skip_rules_are_contract_rules():
    rules = set()
    for test in G.GRIDS:
        for index in G.indices(test, 400, seed=1):
            call = G.build(test, index)
            rules.add(call.skip_rule)
    assert rules - {None} == {"FA2-SOFTCAP-DROPOUT", "FA2-ROTARY-NEW-KV", "FA2-PAGED-COMBINATION"}
    assert rules <= set(RULES) | {None}


def test_grid_sizes_and_decoding():
    assert G.size("test_flash_attn_qkvpacked") == 2 * 2 * 2 * 2 * 2 * 12 * 8 * 2
    assert G.size("test_flash_attn_kvcache") == 304128
    assert G.all_configs("test_flash_attn_bwd_varlen_overflow")[5] == G.params_at("test_flash_attn_bwd_varlen_overflow", 5)
    a, b = G.build("test_flash_attn_varlen_output", 1234), G.build("test_flash_attn_varlen_output", 1234)
    assert a.args["max_seqlen_q"] == b.args["max_seqlen_q"] and a.args["window_size"] == b.args["window_size"]


def test_strict_mode_on_meta_adds_nothing():
    for test in G.GRIDS:
        for index in G.indices(test, 20, seed=2):
            call = G.build(test, index)
            caps = ARCHS["sm80"]
            assert _rules(call, caps, False, strict=True) == _rules(call, caps, False)


class _Kernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log):
        ctx.log = log
        return x.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append("backward")
        return grad, None


def _fake(log):
    def kernel(*args, **kwargs):
        log.append("forward")
        first = kwargs.get("q", kwargs.get("qkv")) if not args else args[0]
        return _Kernel.apply(first, log)
    return kernel


def test_guarded_replay_with_backward_on_meta():
    """sm86: the forward of every sampled configuration runs; its backward raises exactly where the
    test skips it, and runs elsewhere (the stand-in backward is called)."""
    seen = Counter()
    for test in ("test_flash_attn_output", "test_flash_attn_varlen_qkvpacked", "test_flash_attn_qkvpacked"):
        for index in G.indices(test, 60, seed=3):
            call = G.build(test, index)
            if call.skip_rule is not None:
                continue
            log: list = []
            out = guarded(_fake(log), call.kind, provider=SPEC, caps="sm86")(**call.args)
            assert log == ["forward"]
            if G.backward_skip_rule(call, (8, 6)):
                seen["refused"] += 1
                with pytest.raises(FA2ContractError) as info:
                    out.float().sum().backward()
                assert info.value.rules == ["FA2-BWD-GARBAGE-GRADS"] and log == ["forward"]
            else:
                seen["ran"] += 1
                out.float().sum().backward()
                assert log == ["forward", "backward"]
    assert seen["refused"] > 5 and seen["ran"] > 50
