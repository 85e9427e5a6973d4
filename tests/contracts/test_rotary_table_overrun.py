"""FA2-ROTARY-TABLE-OVERRUN: flash_attn_with_kvcache rotates q with cos/sin rows from cache_seqlens[b] on,
one row per query when the mask FA-2 computes is causal or local, and never checks the table length.

The four calls below are the shapes of the H200 contract fuzz (flash_attn 2.8.3) that the contract
accepted and the kernel crashed on ('device-side assert' / 'unspecified launch failure'); the
cache lengths are chosen here so the table is overrun (the fuzz drew them up to the cache capacity
minus the new tokens), and once just inside the bound.
"""
from __future__ import annotations

import pytest
import torch

from contracts import fa2_grid as G
from contracts import kvcache_reasons
from contracts.fa2_mask import normalised_window

F16, BF16, I32 = torch.float16, torch.bfloat16, torch.int32

# (label, dtype, hq, hk, d, b, sq, sk, s_new, rotary_dim, keywords): seqlen_ro = sk, the smallest
# table FA-2's own check (seqlen_ro >= seqlen_k) lets through.
FUZZ_CALLS = [
    ("bf16 d=224 softcap window (50, 75)", BF16, 4, 4, 224, 3, 16, 100, 1, 64,
     {"softcap": 30.0, "window_size": (50, 75)}),
    ("fp16 d=111 causal", F16, 6, 2, 111, 2, 16, 64, 1, 16, {"causal": True}),
    ("bf16 d=32 causal", BF16, 6, 3, 32, 3, 16, 64, 1, 32, {"causal": True}),
    ("fp16 d=80 num_splits=3 window (0, 32)", F16, 8, 4, 80, 3, 16, 64, 1, 16,
     {"num_splits": 3, "window_size": (0, 32)}),
]


def _call(dtype, hq, hk, d, b, sq, sk, s_new, rotary_dim, lengths, leftpad=None):
    args = {
        "q": torch.empty(b, sq, hq, d, dtype=dtype),
        "k_cache": torch.empty(b, sk, hk, d, dtype=dtype),
        "v_cache": torch.empty(b, sk, hk, d, dtype=dtype),
        "k": torch.empty(b, s_new, hk, d, dtype=dtype),
        "v": torch.empty(b, s_new, hk, d, dtype=dtype),
        "rotary_cos": torch.empty(sk, rotary_dim // 2, dtype=dtype),
        "rotary_sin": torch.empty(sk, rotary_dim // 2, dtype=dtype),
        "cache_seqlens": torch.tensor(lengths, dtype=I32),
    }
    if leftpad is not None:
        args["cache_leftpad"] = torch.tensor(leftpad, dtype=I32)
    return args


@pytest.mark.parametrize("call", FUZZ_CALLS, ids=lambda c: c[0])
def test_fuzz_crashes_are_refused_in_strict_mode(call):
    _, dtype, hq, hk, d, b, sq, sk, s_new, rotary_dim, kw = call
    # Last sequence ends its queries one row past the table; the others stay inside.
    lengths = [0] * (b - 1) + [sk - sq + 1]
    args = _call(dtype, hq, hk, d, b, sq, sk, s_new, rotary_dim, lengths)
    assert kvcache_reasons(**args, **kw) == []  # meta mode cannot see values
    reasons = kvcache_reasons(**args, **kw, strict=True)
    assert [r.rule for r in reasons] == ["FA2-ROTARY-TABLE-OVERRUN"]
    (reason,) = reasons
    assert reason.kind == "crash"
    message = reason.message
    assert f"sequence {b - 1}: cache_seqlens {sk - sq + 1} + {sq} rows = {sk + 1}" in message
    assert f"> rotary_cos/rotary_sin rows {sk}" in message and f"seqlen_q {sq}" in message
    assert "max(cache_seqlens) + seqlen_q rows" in reason.fix


@pytest.mark.parametrize("call", FUZZ_CALLS, ids=lambda c: c[0])
def test_just_inside_the_table_is_accepted(call):
    _, dtype, hq, hk, d, b, sq, sk, s_new, rotary_dim, kw = call
    lengths = [sk - sq] * b  # the last query reads row sk - 1
    args = _call(dtype, hq, hk, d, b, sq, sk, s_new, rotary_dim, lengths)
    assert kvcache_reasons(**args, **kw, strict=True) == []


@pytest.mark.parametrize("call", FUZZ_CALLS, ids=lambda c: c[0])
def test_without_a_mask_every_query_reads_one_row(call):
    """Same shapes without causal/local: q reads only row cache_seqlens[b], so the longest cache
    FA2-KV-CACHE-OVERFLOW allows (capacity - new tokens) is fine."""
    _, dtype, hq, hk, d, b, sq, sk, s_new, rotary_dim, kw = call
    kw = {k: v for k, v in kw.items() if k not in ("causal", "window_size")}
    args = _call(dtype, hq, hk, d, b, sq, sk, s_new, rotary_dim, [sk - s_new] * b)
    assert kvcache_reasons(**args, **kw, strict=True) == []


def test_leftpad_does_not_move_the_rows():
    """block_info.h sets seqlen_k_cache = cache_seqlens - leftpad_k, and the kernel adds leftpad_k
    back: the rows start at cache_seqlens[b] whatever the padding (FA-2's own test rotates with
    seqlen_offsets=cache_seqlens and draws leftpad below cache_seqlens)."""
    args = _call(F16, 6, 2, 64, 2, 16, 64, 1, 32, [48, 40], leftpad=[47, 30])
    assert kvcache_reasons(**args, causal=True, strict=True) == []
    args = _call(F16, 6, 2, 64, 2, 16, 64, 1, 32, [49, 40], leftpad=[0, 30])
    assert [r.rule for r in kvcache_reasons(**args, causal=True, strict=True)] == ["FA2-ROTARY-TABLE-OVERRUN"]


def test_causal_with_one_query_is_one_row_and_window_normalisation_counts():
    # seqlen_q == 1: causal is switched off (no alibi); one row either way.
    args = _call(F16, 4, 2, 64, 2, 1, 64, 1, 32, [63, 63])
    assert kvcache_reasons(**args, causal=True, strict=True) == []
    # A window whose sides are >= the capacity is no mask after FA-2's normalisation: one row.
    assert normalised_window(False, (64, 64), 16, 64)[1] == (-1, -1)
    args = _call(F16, 4, 2, 64, 2, 16, 64, 1, 32, [63, 60])
    assert kvcache_reasons(**args, window_size=(64, 64), strict=True) == []
    # ... but a window inside the capacity is local: one row per query.
    assert [r.rule for r in kvcache_reasons(**args, window_size=(63, 0), strict=True)] == ["FA2-ROTARY-TABLE-OVERRUN"]


def test_a_longer_table_fixes_it():
    args = _call(F16, 6, 2, 64, 2, 16, 64, 1, 32, [60, 60])
    assert [r.rule for r in kvcache_reasons(**args, causal=True, strict=True)] == ["FA2-ROTARY-TABLE-OVERRUN"]
    args["rotary_cos"] = torch.empty(76, 16, dtype=F16)
    args["rotary_sin"] = torch.empty(76, 16, dtype=F16)
    assert kvcache_reasons(**args, causal=True, strict=True) == []


def test_fa2_kvcache_grid_with_values_has_no_false_reject():
    """FA-2's own kvcache test (cache lengths up to seqlen_k - seqlen_q for causal/local rotary,
    leftpad below the cache length), built on the CPU with real index values, small caches only:
    the new rule never fires on a configuration the test runs. Counting cache_leftpad on top of
    cache_seqlens would reject some of them (the test passes on GPUs, so the kernel does not)."""
    from contracts.checks import evaluate
    from contracts.guard import call_facts
    from contracts.spec import spec_for

    spec = spec_for("flash_attn==2.8.3")
    checked = with_leftpad_past_table = 0
    for index in G.indices("test_flash_attn_kvcache", 3000, seed=7):
        params = G.params_at("test_flash_attn_kvcache", index)
        if params["seqlens"][1] > 2048 or params["rotary_fraction"] == 0.0 or not params["new_kv"]:
            continue
        call = G.build("test_flash_attn_kvcache", index, device="cpu")
        if call.skip_rule is not None:
            continue
        c = call_facts("kvcache", call.args, strict=True, spec=spec, caps=None, backward=False)
        rules = [r.rule for r in evaluate(c)]
        assert "FA2-ROTARY-TABLE-OVERRUN" not in rules, (params, rules)
        checked += 1
        a = call.args
        if a.get("cache_leftpad") is not None and (params["causal"] or params["local"]):
            sq, rows = a["q"].shape[1], a["rotary_cos"].shape[0]
            pairs = zip(a["cache_seqlens"].tolist(), a["cache_leftpad"].tolist())
            with_leftpad_past_table += any(n + pad + sq > rows for n, pad in pairs)
    assert checked > 50 and with_leftpad_past_table > 0, (checked, with_leftpad_past_table)
