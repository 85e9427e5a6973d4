"""Decode conformance: one token at a time through NSAKVCache equals prefill at that position.

Rule (nsa_spec.md, "Varlen and decode"): the decode result must equal the prefill result at the
same position. Everything runs in fp64 on the CPU with a small config, so the two agree to
rounding: max|decode - prefill| <= 1e-12. Prefill is ``nsa_ref.nsa_attention`` (reference
backend) or ``NSAAttention`` without a cache; for the functional path it is also checked
against the suite's brute force (``conformance.brute``).
"""
from __future__ import annotations

import pytest
import torch

from conformance import brute
from conformance.nsa_rules import tag

RULE_DECODE = tag("NSA-DECODE") + " (fp64: max abs error <= 1e-12)"
RULE_EMIT = tag("NSA-DECODE") + " (compressed block i is emitted when it ends: i*d + l - 1 == t)"
ATOL = 1e-12
# Blocks of 8 with stride 4, selection blocks of 8, 3 picks (1 init + 1 local + 1 by score),
# window 8: selection, window eviction and block emission all happen within 40 tokens.
SMALL = dict(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=8)


pytestmark = [pytest.mark.usefixtures("nsa_cpu_threads"),  # tiny tensors: one intra-op thread
              pytest.mark.nsa_rule("NSA-DECODE")]


def _cfg(**over):
    from nsa_ref import NSAConfig

    return NSAConfig(**{**SMALL, **over})


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _check(got, want, what):
    err = (got - want).abs()
    worst = err.max().item() if err.numel() else 0.0
    assert torch.isfinite(got).all(), f"{RULE_DECODE}: {what}: non-finite decode output"
    assert worst <= ATOL, f"{RULE_DECODE}: {what}: max|decode - prefill| = {worst:.3e} > {ATOL:.0e}"


@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2)], ids=["G1", "G2"])
def test_functional_decode_from_empty_cache(hq, hkv):
    """B sequences decoded from position 0; every step equals prefill of the whole sequences."""
    from nsa_ref import NSAKVCache, decode_step, nsa_attention

    cfg, B, T = _cfg(), 2, 40
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B * T, hq, 6, generator=g, dtype=torch.float64)
    k = torch.randn(B * T, hkv, 6, generator=g, dtype=torch.float64)
    v = torch.randn(B * T, hkv, 4, generator=g, dtype=torch.float64)
    gates = torch.rand(B * T, hq, 3, generator=g, dtype=torch.float64)
    cu = _cu([T] * B)
    prefill = nsa_attention(q, k, v, gates, cfg, cu, backend="reference")
    truth = brute.nsa_attention(q, k, v, gates, cfg, cu)
    _check(prefill, truth, "prefill vs brute force")
    cache = NSAKVCache.allocate(B, T, hkv, 6, cfg, v_head_dim=4, dtype=torch.float64)
    for t in range(T):
        rows = [b * T + t for b in range(B)]
        out = decode_step(q[rows], k[rows], v[rows], gates[rows], cache, cfg)
        _check(out, prefill[rows], f"G={hq // hkv} t={t}")
        for b in range(B):
            tc = cache.sequence(b)[2].shape[0]
            assert tc == cfg.num_cmp_blocks(t + 1), f"{RULE_EMIT}: t={t} seq {b}: {tc} cached blocks"


@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2)], ids=["G1", "G2"])
def test_functional_decode_after_varlen_prefill(hq, hkv):
    """Prefill sequences of different lengths (one empty) into a cache, then decode 20 more."""
    from nsa_ref import NSAKVCache, compress, decode_step, nsa_attention

    cfg, pre, steps = _cfg(window=5), [0, 7, 19], 20
    full = [n + steps for n in pre]
    cu_full = _cu(full)
    g = torch.Generator().manual_seed(1)
    T = sum(full)
    q = torch.randn(T, hq, 6, generator=g, dtype=torch.float64)
    k = torch.randn(T, hkv, 6, generator=g, dtype=torch.float64)
    v = torch.randn(T, hkv, 4, generator=g, dtype=torch.float64)
    gates = torch.rand(T, hq, 3, generator=g, dtype=torch.float64)
    prefill = nsa_attention(q, k, v, gates, cfg, cu_full, backend="reference")
    starts = cu_full[:-1].tolist()
    head = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, pre)])
    cache = NSAKVCache.allocate(len(pre), max(full), hkv, 6, cfg, v_head_dim=4, dtype=torch.float64)
    cache.prefill(k[head], v[head], _cu(pre))
    assert cache.lengths == pre, f"prefill fills the cache: lengths {cache.lengths} != {pre}"
    for step in range(steps):
        rows = [s + n + step for s, n in zip(starts, pre)]
        out = decode_step(q[rows], k[rows], v[rows], gates[rows], cache, cfg)
        _check(out, prefill[rows], f"G={hq // hkv} step {step} positions {[n + step for n in pre]}")
    for b, (s, n) in enumerate(zip(starts, full)):
        want, _ = compress(k[s : s + n], cfg)
        _check(cache.sequence(b)[2], want, f"{RULE_EMIT}: cached k_cmp of seq {b} vs compress()")


@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2)], ids=["G1", "G2"])
@pytest.mark.parametrize("compress", ["mean", "mlp"])
def test_module_decode_equals_prefill(compress, hq, hkv):
    """NSAAttention: prefill a prefix through the cache, then one token per sequence."""
    from nsa_ref import NSAAttention

    torch.manual_seed(0)
    cfg = _cfg(compress=compress)
    mod = NSAAttention(16, hq, hkv, head_dim=6, v_head_dim=4, cfg=cfg, backend="reference").double()
    lengths, pre = [36, 30], [9, 0]
    cu = _cu(lengths)
    x = torch.randn(sum(lengths), 16, dtype=torch.float64)
    starts = cu[:-1].tolist()
    with torch.no_grad():
        want = mod(x, cu)
        cache = mod.allocate_cache(len(lengths), max(lengths))
        head = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, pre)])
        got_head = mod(x[head], _cu(pre), cache=cache)
        _check(got_head, want[head], f"{compress} G={hq // hkv}: prefill with a cache")
        for step in range(min(n - p for n, p in zip(lengths, pre))):
            rows = [s + p + step for s, p in zip(starts, pre)]
            _check(mod(x[rows], cache=cache), want[rows], f"{compress} G={hq // hkv} step {step}")


def test_decode_needs_one_token_per_sequence():
    from nsa_ref import NSAKVCache, decode_step

    cfg = _cfg()
    cache = NSAKVCache.allocate(2, 8, 2, 4, cfg, dtype=torch.float64)
    z = torch.zeros(3, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"one row per cached sequence: k_new has 3.*B = 2"):
        decode_step(z, z, z, torch.zeros(3, 2, 3, dtype=torch.float64), cache, cfg)
    assert cache.lengths == [0, 0]


@pytest.mark.parametrize("hq, hkv", [(4, 2), (16, 1)], ids=["G2", "G16"])
def test_decode_on_suite_backend(impl_under_test, nsa_device, nsa_dtype, hq, hkv):
    """nsa_ref's decode_step with the suite's --nsa-backend (e.g. triton, which runs select and sel
    on its kernels) on --nsa-device / --nsa-dtype: every step within tolerances.yaml of the fp64
    prefill (rounding baseline: the reference prefill in the same dtype)."""
    from conformance import assertions as A
    from nsa_ref import NSAKVCache, decode_step, nsa_attention

    if not impl_under_test.slots["nsa"].is_reference:
        from conformance.capabilities import NOT_APPLICABLE

        pytest.skip(NOT_APPLICABLE + "the decode test drives nsa_ref.decode_step; the suite has no decode slot "
                    "for another implementation yet (--nsa-impl names one)")
    backend = impl_under_test.slots["sel"].backend
    cfg, B, T = _cfg(), 2, 24
    g = torch.Generator().manual_seed(1)
    x64 = [torch.randn(B * T, h, d, generator=g, dtype=torch.float64) for h, d in ((hq, 8), (hkv, 8), (hkv, 8))]
    gates = torch.rand(B * T, hq, 3, generator=g, dtype=torch.float64)
    cu = _cu([T] * B)
    lo = [x.to(nsa_dtype) for x in (*x64, gates)]
    truth = nsa_attention(*[x.to(nsa_dtype).double() for x in x64], gates.to(nsa_dtype).double(), cfg, cu,
                          backend="reference")
    base = None if nsa_dtype == torch.float64 else nsa_attention(*lo, cfg, cu, backend="reference")
    cache = NSAKVCache.allocate(B, T, hkv, 8, cfg, dtype=nsa_dtype, device=nsa_device)
    dev = [x.to(nsa_device) for x in lo]
    out = torch.empty_like(truth, dtype=nsa_dtype)
    with torch.no_grad():
        for t in range(T):
            rows = [b * T + t for b in range(B)]
            out[rows] = decode_step(*[x[rows] for x in dev], cache, cfg, backend=backend).cpu()
    # One verdict over every decoded position, as the other conformance tests judge whole outputs.
    A.assert_close(out, truth, base, rule=RULE_DECODE, dtype=nsa_dtype, where=f"backend={backend} G={hq // hkv}",
                   cu_seqlens=cu)
