"""contracts/fast.py: a fused test says True only when no rule it covers fails.

Checked on every test input of contracts_testkit (each rule's breaking cases, the valid ones), on
samples of FA-2's own kvcache / varlen test grids, and on seeded random calls that vary one or
several arguments away from a legal call (dtypes, shapes, strides, index tensors, windows,
rotary tables, dropout, softcap, scale, splits, providers).
"""
from __future__ import annotations

import random

import pytest
import torch

import contracts.checks as checks
from contracts import fa2_grid as G
from contracts.fast import FAST
from contracts.guard import call_facts
from contracts.spec import spec_for
from contracts_testkit import BREAKING, VALID, Case

F16, BF16, F32, I32, I64 = torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64


def _facts(case: Case, **overrides):
    captured = []
    real = checks.evaluate
    checks.evaluate = lambda c: captured.append(c) or real(c)
    try:
        case.reasons(**overrides)
    finally:
        checks.evaluate = real
    return captured[-1]


def _covered_failures(c) -> list[str]:
    """Every rule the kind's fused test covers that fails for ``c`` (each predicate run)."""
    pre, post, *_ = checks._PLANS[c.kind]
    _, covers = FAST[c.kind]
    rules = list(pre) + (list(post) if c.rank_ok else [])
    return [rid for rid, fn in rules if rid in covers and fn(c) is not None]


def _check(c) -> bool:
    fast, _ = FAST[c.kind]
    ok = fast(c)
    failures = _covered_failures(c)
    assert not (ok and failures), f"fused {c.kind} test said True but {failures} fail"
    return ok


def test_each_fused_test_lists_only_rules_of_its_kind():
    for kind, (_, covers) in FAST.items():
        pre, post, *_ = checks._PLANS[kind]
        assert covers <= {rid for rid, _ in pre + post}, sorted(covers - {rid for rid, _ in pre + post})


def _random_dense(rng: random.Random) -> dict:
    b, sq, sk = rng.choice([0, 1, 2]), rng.choice([0, 1, 5, 16]), rng.choice([0, 1, 4, 16])
    hq, hk, d = rng.choice([4, 6, 8]), rng.choice([1, 2, 3, 0]), rng.choice([32, 59, 64, 264])
    dt = rng.choice([F16, F16, BF16, F32])
    a = {"q": torch.empty(b, sq, hq, d, dtype=dt), "k": torch.empty(rng.choice([b, b, b + 1]), sk, hk, d, dtype=dt),
         "v": torch.empty(b, sk, rng.choice([hk, hk, hk + 1]), rng.choice([d, d, d, 16]),
                          dtype=rng.choice([dt, dt, dt, F32]))}
    if rng.random() < 0.1:
        a["q"] = torch.empty(b, sq, d, hq, dtype=dt).transpose(-1, -2)
    a["causal"] = rng.random() < 0.5
    if rng.random() < 0.4:
        a["window_size"] = (rng.choice([-1, 0, 3, 20]), rng.choice([-1, 0, 3, 20]))
    if rng.random() < 0.3:
        a["dropout_p"] = rng.choice([0.0, 0.1, 1.0, -0.1])
    if rng.random() < 0.2:
        a["softcap"] = 30.0
    if rng.random() < 0.1:
        a["return_softmax"] = True
    if rng.random() < 0.2:
        a["softmax_scale"] = rng.choice([0.1, 0.0, float("inf")])
    if rng.random() < 0.1:
        a["alibi_slopes"] = torch.empty(rng.choice([hq, hq + 1]), dtype=rng.choice([F32, F16]))
    if rng.random() < 0.2:
        a["caps"] = rng.choice(["sm75", "sm80", "sm86", "sm100"])
    if rng.random() < 0.3:
        a["provider"] = rng.choice(["torch", "torch==2.9", "flash_attn==2.5.9", "flash_attn==2.8.3"])
    a["backward"] = False
    return a


def _cases():
    out = [case for cases in BREAKING.values() for case in cases] + VALID
    return [pytest.param(case, provider, id=f"{provider}: {case.label}")
            for case in out for provider in case.providers]


@pytest.mark.parametrize("case, provider", _cases())
def test_fused_test_agrees_with_the_rules_on_testkit_inputs(case, provider):
    overrides = {} if "provider" in case.extra else {"provider": provider}
    c = _facts(case, **overrides)
    if c.kind in FAST:
        _check(c)


def test_fused_test_takes_the_common_valid_calls():
    taken = [case.label for case in VALID if _facts(case).kind in FAST and FAST[_facts(case).kind][0](_facts(case))]
    assert {"valid: varlen", "valid: kvcache append", "valid: kvcache rotary append",
            "valid: varlen qkvpacked", "valid: dense GQA", "valid: qkvpacked"} <= set(taken), taken


def test_fused_test_sees_each_tensor_argument_on_another_device():
    """Every valid testkit call the fused test takes, with one tensor argument at a time on meta."""
    moved = 0
    for case in VALID:
        c = _facts(case)
        if c.kind not in FAST or not FAST[c.kind][0](c):
            continue
        args = {**case.args, "cache_leftpad": torch.zeros(c.b, dtype=I32)} if c.kind == "kvcache" \
            and "block_table" not in case.args and "cache_leftpad" not in case.args else case.args
        for name, value in args.items():
            if not isinstance(value, torch.Tensor) or value.is_meta:
                continue
            meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
            moved_case = Case(case.kind, {**args, name: meta}, extra=case.extra)
            c2 = _facts(moved_case)
            _check(c2)  # a True with FA2-DEVICE failing would raise here
            moved += "FA2-DEVICE" in _covered_failures(c2)
    assert moved > 30, moved


@pytest.mark.parametrize("test", ["test_flash_attn_kvcache", "test_flash_attn_varlen_output", "test_flash_attn_output",
                                  "test_flash_attn_qkvpacked", "test_flash_attn_causal",
                                  "test_flash_attn_varlen_causal", "test_flash_attn_varlen_qkvpacked"])
def test_fused_test_agrees_on_fa2_grids(test):
    spec = spec_for("flash_attn==2.8.3")
    taken = 0
    for index in G.indices(test, 1500, seed=3):
        call = G.build(test, index)
        for caps in (None, "sm86"):
            c = call_facts(call.kind, call.args, strict=False, spec=spec,
                           caps=None if caps is None else checks.DeviceCaps.parse(caps), backward=False)
            taken += _check(c)
    assert taken > 100


def _random_kvcache(rng: random.Random) -> dict:
    b, sq, hq, hk, d = rng.choice([1, 2, 3]), rng.choice([1, 2, 16]), rng.choice([4, 6, 8]), rng.choice([1, 2, 3, 0]), \
        rng.choice([32, 59, 64, 111, 264])
    sk, s_new = rng.choice([16, 64]), rng.choice([None, 1, 2])
    dt = rng.choice([F16, F16, BF16, F32])
    bc = b if rng.random() < 0.9 else b - 1

    def t(*shape, dtype=dt):
        return torch.empty(shape, dtype=dtype)

    a = {"q": t(b, sq, hq, d), "k_cache": t(bc, sk, hk, d), "v_cache": t(bc, sk, hk, rng.choice([d, d, d, 32]))}
    if rng.random() < 0.1:
        a["k_cache"] = torch.empty(bc, sk, d, hk, dtype=dt).transpose(-1, -2)
    if s_new is not None:
        kh = rng.choice([hk, hk, hk, hk + 1])
        a["k"] = t(b, s_new, kh, d, dtype=rng.choice([dt, dt, dt, F32]))
        a["v"] = t(rng.choice([b, b, b + 1]), s_new, rng.choice([kh, kh, kh + 1]), d)
        if rng.random() < 0.1:
            del a["v"]
    choice = rng.random()
    if choice < 0.7:
        a["cache_seqlens"] = torch.tensor([rng.randrange(sk)] * rng.choice([b, b, b, b + 1]),
                                          dtype=rng.choice([I32, I32, I32, I64]))
    elif choice < 0.85:
        a["cache_seqlens"] = rng.randrange(sk)
    if rng.random() < 0.2:
        a["cache_leftpad"] = torch.zeros(rng.choice([b, b + 1]), dtype=I32)
    if rng.random() < 0.15:
        a["cache_batch_idx"] = torch.arange(b, dtype=rng.choice([I32, I64]))
    if rng.random() < 0.5:
        rows, rd = rng.choice([sk, sk, sk - 1, sk + 7]), rng.choice([16, 32, 32, 24, 128])
        a["rotary_cos"] = t(rows, rd // 2, dtype=rng.choice([dt, dt, dt, F32]))
        a["rotary_sin"] = t(rows, rng.choice([rd // 2, rd // 2, rd // 2, 4]))
        if rng.random() < 0.1:
            a["rotary_cos"] = torch.empty(rd // 2, rows, dtype=dt).t()
        if rng.random() < 0.1:
            del a[rng.choice(["rotary_cos", "rotary_sin"])]
    a["causal"] = rng.random() < 0.5
    if rng.random() < 0.4:
        a["window_size"] = (rng.choice([-1, 0, 3, sk, sk + 3]), rng.choice([-1, 0, 3, sk, sk + 3]))
    if rng.random() < 0.2:
        a["softmax_scale"] = rng.choice([0.1, -1.0, float("nan")])
    if rng.random() < 0.2:
        a["num_splits"] = rng.choice([0, 1, 3, 200])
    if rng.random() < 0.1:
        a["alibi_slopes"] = torch.empty(hq, dtype=rng.choice([F32, F16]))
    if rng.random() < 0.1:
        a["softcap"] = 30.0
    if rng.random() < 0.2:
        a["caps"] = rng.choice(["sm75", "sm80", "sm86", "sm100"])
    if rng.random() < 0.3:
        a["provider"] = rng.choice(["torch", "flash_attn==2.5.9", "flash_attn==2.6.0", "flash_attn==2.8.3"])
    return a


def _random_varlen(rng: random.Random) -> dict:
    n = rng.choice([0, 1, 2, 3])
    lq = [rng.choice([0, 1, 1, 5, 9]) for _ in range(n)]
    lk = [rng.choice([0, 1, 4, 12]) for _ in range(n)]
    hq, hk, d = rng.choice([4, 6, 8]), rng.choice([1, 2, 3, 0]), rng.choice([32, 59, 64, 264])
    dt = rng.choice([F16, F16, BF16, F32])

    def cu(lengths, dtype=I32):
        out = [0]
        for x in lengths:
            out.append(out[-1] + x)
        return torch.tensor(out, dtype=dtype)

    a = {"q": torch.empty(sum(lq), hq, d, dtype=dt), "k": torch.empty(sum(lk), hk, d, dtype=dt),
         "v": torch.empty(sum(lk), hk, rng.choice([d, d, d, 16]), dtype=rng.choice([dt, dt, dt, F32])),
         "cu_seqlens_q": cu(lq, rng.choice([I32, I32, I32, I64])), "cu_seqlens_k": cu(lk + ([3] if rng.random() < 0.1 else [])),
         "max_seqlen_q": max(lq, default=0) + rng.choice([0, 0, 0, -1, 1]), "max_seqlen_k": max(lk, default=0)}
    if rng.random() < 0.1:
        a["q"] = torch.empty(sum(lq), d, hq, dtype=dt).transpose(-1, -2)
    if rng.random() < 0.2:
        a["seqused_k"] = torch.tensor(lk + ([1] if rng.random() < 0.2 else []), dtype=I32)
    a["causal"] = rng.random() < 0.5
    if rng.random() < 0.4:
        a["window_size"] = (rng.choice([-1, 0, 3, 20]), rng.choice([-1, 0, 3, 20]))
    if rng.random() < 0.3:
        a["dropout_p"] = rng.choice([0.0, 0.1, 1.0, -0.1])
    if rng.random() < 0.2:
        a["softcap"] = 30.0
    if rng.random() < 0.1:
        a["return_softmax"] = True
    if rng.random() < 0.2:
        a["softmax_scale"] = rng.choice([0.1, 0.0, float("inf")])
    if rng.random() < 0.1:
        a["alibi_slopes"] = torch.empty(hq, dtype=F32)
    if rng.random() < 0.2:
        a["caps"] = rng.choice(["sm75", "sm80", "sm86", "sm100"])
    if rng.random() < 0.3:
        a["provider"] = rng.choice(["torch", "torch==2.9", "flash_attn==2.5.9", "flash_attn==2.8.3"])
    a["backward"] = False
    return a


@pytest.mark.parametrize("kind, make", [("kvcache", _random_kvcache), ("varlen", _random_varlen),
                                        ("dense", _random_dense)])
def test_fused_test_agrees_on_random_calls(kind, make):
    rng = random.Random(f"fast-{kind}")
    taken = rejected = 0
    for _ in range(4000):
        args = make(rng)
        if rng.random() < 0.15:  # one tensor argument on another device (FA2-DEVICE)
            name = rng.choice(sorted(n for n, t in args.items() if isinstance(t, torch.Tensor)))
            args[name] = torch.empty_strided(args[name].shape, args[name].stride(), dtype=args[name].dtype,
                                             device="meta")
        extra = {k: args.pop(k) for k in ("provider",) if k in args}
        case = Case(kind, args, extra=extra)
        c = _facts(case)
        ok = _check(c)
        taken += ok
        rejected += not ok and bool(checks.evaluate(c))
    assert taken > 50 and rejected > 1000, (taken, rejected)
