"""Every flash_attn entry point through guarded(): packed kinds, kvcache rotary, softmax_scale, and the
backward rules raised when backward starts (never at a forward-only call)."""
from __future__ import annotations

import pytest
import torch

from contracts import FA2ContractError, guarded, kvcache_reasons, qkvpacked_reasons, varlen_qkvpacked_reasons
from contracts.guard import gate_backward, positional_names
from contracts.versions import ENTRY_POINTS
from contracts_testkit import (
    F16,
    dense_inputs,
    kvcache_inputs,
    kvpacked_inputs,
    qkvpacked_inputs,
    rotary,
    varlen_kvpacked_inputs,
    varlen_qkvpacked_inputs,
)

ENV = "NSA_FA2_CONTRACTS"


class _Kernel(torch.autograd.Function):
    """Identity on the first input; its backward counts calls (a stand-in FA-2 backward)."""

    @staticmethod
    def forward(ctx, x, log):
        ctx.log = log
        return x.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append("backward")
        return grad, None


class Fake:
    """A FA-2 stand-in: records forward calls, returns a differentiable output of its first input."""

    def __init__(self):
        self.log = []

    def __call__(self, first, *args, **kwargs):
        self.log.append("forward")
        return _Kernel.apply(first, self.log)


@pytest.fixture(autouse=True)
def _default_mode(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_every_entry_point_has_a_guard_kind_with_its_2_8_signature():
    assert positional_names("qkvpacked")[:3] == ("qkv", "dropout_p", "softmax_scale")
    assert positional_names("varlen_kvpacked")[:7] == (
        "q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p")
    assert positional_names("kvcache")[5:11] == (
        "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table")
    for kind in ENTRY_POINTS:
        guarded(Fake(), kind)  # every kind is accepted


@pytest.mark.parametrize("kind, args", [
    ("qkvpacked", qkvpacked_inputs()),
    ("kvpacked", kvpacked_inputs()),
    ("varlen_qkvpacked", varlen_qkvpacked_inputs()),
    ("varlen_kvpacked", varlen_kvpacked_inputs()),
])
def test_packed_kinds_call_through_and_refuse(kind, args):
    fake = Fake()
    f = guarded(fake, kind)
    f(*args.values())
    assert fake.log == ["forward"]
    bad = {**args}
    packed = "qkv" if "qkv" in bad else "kv"
    shape = list(bad[packed].shape)
    shape[-3] = 1  # one entry on the packing dim
    bad[packed] = torch.empty(shape, dtype=F16)
    with pytest.raises(FA2ContractError) as info:
        f(*bad.values(), 0.0, -1.0)  # positional dropout_p, softmax_scale
    assert info.value.rules == ["FA2-SOFTMAX-SCALE", "FA2-PACKED-SHAPE"]
    assert f"{packed} has shape" in str(info.value) and fake.log == ["forward"]


def test_packed_rank_message_names_the_packed_layout():
    (reason,) = qkvpacked_reasons(torch.empty(2, 16, 4, 64, dtype=F16))
    assert reason.rule == "FA2-RANK" and "qkv (B, S, 3, H, D)" in reason.message
    (reason,) = varlen_qkvpacked_reasons(torch.empty(16, 4, 64, dtype=F16), torch.zeros(3, dtype=torch.int32), 8)
    assert reason.rule == "FA2-RANK" and "qkv (T, 3, H, D)" in reason.message


def test_packed_views_keep_gqa_and_head_rules():
    # kvpacked allows GQA; a head count that does not divide is caught on the unpacked view.
    assert [r.rule for r in guarded_reasons("kvpacked", kvpacked_inputs(hq=6, hk=4))] == ["FA2-HEADS-DIVISIBLE"]
    assert [r.rule for r in guarded_reasons("qkvpacked", qkvpacked_inputs(d=264))] == ["FA2-HEAD-DIM-MAX"]


def guarded_reasons(kind, args):
    try:
        guarded(Fake(), kind)(*args.values())
    except FA2ContractError as err:
        return err.reasons
    return []


def test_kvcache_rotary_positional_mapping():
    fake = Fake()
    f = guarded(fake, "kvcache")
    a = kvcache_inputs(s_new=1)
    cos = rotary()
    f(a["q"], a["k_cache"], a["v_cache"], a["k"], a["v"], cos["rotary_cos"], cos["rotary_sin"], a["cache_seqlens"])
    with pytest.raises(FA2ContractError) as info:  # no new k/v, a 24-wide rotary table
        f(a["q"], a["k_cache"], a["v_cache"], None, None, *rotary(rotary_dim=24).values(), a["cache_seqlens"])
    assert info.value.rules == ["FA2-ROTARY-NEW-KV", "FA2-ROTARY-DIM"]
    assert fake.log == ["forward"]


def test_kvcache_rotary_reasons_quote_values():
    a = kvcache_inputs(s_new=1, d=64)
    reasons = {r.rule: r.message for r in kvcache_reasons(**a, **rotary(seqlen_ro=10, rotary_dim=80))}
    assert set(reasons) == {"FA2-ROTARY-DIM", "FA2-ROTARY-TABLE"}
    assert "rotary_dim = 2 * rotary_cos.shape[1] = 80" in reasons["FA2-ROTARY-DIM"]
    assert "10 rows < the cache length 64" in reasons["FA2-ROTARY-TABLE"]


def test_int_cache_seqlens_must_match_the_cache_batch():
    a = kvcache_inputs(paged=True, num_blocks=4)  # int -> a (k_cache.shape[0] = 4,) tensor, batch 2
    (reason,) = kvcache_reasons(**{**a, "cache_seqlens": 7})
    assert reason.rule == "FA2-INDEX-SHAPE" and "k_cache.shape[0] = 4" in reason.message


@pytest.mark.parametrize("scale, ok", [(None, True), (0.125, True), (0.0, False), (-1.0, False),
                                       (float("nan"), False), (float("inf"), False)])
def test_softmax_scale(scale, ok):
    fake = Fake()
    a = dense_inputs()
    call = lambda: guarded(fake, "dense")(a["q"], a["k"], a["v"], softmax_scale=scale)  # noqa: E731
    if ok:
        call()
    else:
        with pytest.raises(FA2ContractError, match="FA2-SOFTMAX-SCALE"):
            call()


# --- backward rules at backward time ---------------------------------------------------------------


def _garbage_case(requires_grad=True):
    """d = 256, dropout, sm86: FA2-BWD-GARBAGE-GRADS if a backward runs."""
    a = dense_inputs(d=256)
    return {n: t.requires_grad_(requires_grad) for n, t in a.items()}


def test_forward_only_call_is_not_refused_for_a_backward_rule():
    fake = Fake()
    f = guarded(fake, "dense", caps="sm86")
    a = _garbage_case()
    with torch.no_grad():
        f(a["q"], a["k"], a["v"], 0.1)
    f(*[t.detach() for t in a.values()], 0.1)
    out = f(a["q"], a["k"], a["v"], 0.1)  # autograd records it: the forward still runs
    assert fake.log == ["forward"] * 3 and out.requires_grad


def test_backward_raises_before_the_backward_kernel():
    fake = Fake()
    out = guarded(fake, "dense", caps="sm86")(*_garbage_case().values(), 0.1)
    with pytest.raises(FA2ContractError) as info:
        out.float().sum().backward()
    assert info.value.rules == ["FA2-BWD-GARBAGE-GRADS"] and "dense backward" in str(info.value)
    assert fake.log == ["forward"], "the stand-in backward kernel must not run"


def test_backward_runs_when_the_rules_hold():
    fake = Fake()
    a = _garbage_case()
    out = guarded(fake, "dense", caps="sm80")(a["q"], a["k"], a["v"], 0.1)
    out.float().sum().backward()
    assert fake.log == ["forward", "backward"] and a["q"].grad is not None


def test_forward_rule_failure_lists_backward_rules_too():
    a = _garbage_case()
    with pytest.raises(FA2ContractError) as info:
        guarded(Fake(), "dense", caps="sm86")(a["q"], a["k"], a["v"], 0.1, -1.0)
    assert info.value.rules == ["FA2-SOFTMAX-SCALE", "FA2-BWD-GARBAGE-GRADS"]


def test_gate_backward_on_tuple_outputs_and_untracked_outputs():
    x = torch.randn(3, requires_grad=True)
    out = (x * 2, (x * 2).detach())
    assert gate_backward(out, FA2ContractError([], call="t")) is True
    with pytest.raises(FA2ContractError):
        out[0].sum().backward()
    assert gate_backward(torch.zeros(2), FA2ContractError([], call="t")) is False


def test_reasons_backward_argument():
    from contracts import dense_reasons

    a = _garbage_case()
    args = dict(dropout_p=0.1, caps="sm86")
    assert [r.rule for r in dense_reasons(**a, **args)] == ["FA2-BWD-GARBAGE-GRADS"]  # None: autograd records it
    assert dense_reasons(**a, **args, backward=False) == []
    with torch.no_grad():
        assert dense_reasons(**a, **args) == []
    plain = _garbage_case(requires_grad=False)
    assert [r.rule for r in dense_reasons(**plain, **args, backward=True)] == ["FA2-BWD-GARBAGE-GRADS"]
    assert [r.rule for r in dense_reasons(**plain, **args, requires_grad=True)] == ["FA2-BWD-GARBAGE-GRADS"]
