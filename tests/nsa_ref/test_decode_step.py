"""``nsa_ref.decode_step`` over ``NSAKVCache`` by backend, and ``NSAAttention`` with a cache (CPU, fp64)."""
import pytest
import torch

from nsa_ref import NSAAttention, NSAConfig, NSAKVCache, decode_step, nsa_attention, router

CFG = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=6)
PRE, STEPS = [0, 5, 13], 12  # ragged prompts (one empty), then STEPS tokens per sequence
ATOL = 1e-12


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _inputs(lengths, hq=4, hkv=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    return (torch.randn(T, hq, 6, generator=g, dtype=torch.float64), torch.randn(T, hkv, 6, generator=g, dtype=torch.float64),
            torch.randn(T, hkv, 4, generator=g, dtype=torch.float64), torch.rand(T, hq, 3, generator=g, dtype=torch.float64))


def _prefilled():
    """-> (cache holding PRE, the full inputs, their offsets)."""
    full = [n + STEPS for n in PRE]
    q, k, v, gates = _inputs(full)
    starts = _cu(full)[:-1].tolist()
    head = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, PRE)])
    cache = NSAKVCache.allocate(len(PRE), max(full), 2, 6, CFG, v_head_dim=4, dtype=torch.float64)
    cache.prefill(k[head], v[head], _cu(PRE))
    return cache, (q, k, v, gates), full, starts


@pytest.mark.parametrize("backend", ["reference", "sdpa", "auto"])
def test_decode_step_equals_prefill(backend):
    cache, (q, k, v, gates), full, starts = _prefilled()
    want = nsa_attention(q, k, v, gates, CFG, _cu(full), backend="reference")
    for step in range(STEPS):
        rows = [s + n + step for s, n in zip(starts, PRE)]
        got = decode_step(q[rows], k[rows], v[rows], gates[rows], cache, CFG, backend=backend)
        err = (got - want[rows]).abs().max().item()
        assert err <= ATOL, f"backend={backend} step {step}: max|decode - prefill| = {err:.2e}"
    assert cache.lengths == full


def _state(cache):
    return cache.lengths, cache.num_cmp_blocks, [p.clone() for p in (cache.raw.k_pages, cache.raw.v_pages,
                                                                     cache.cmp.k_pages, cache.cmp.v_pages)]


@pytest.mark.parametrize("backend, error, match", [
    ("fa2", router.FA2Unavailable, "FA-2 needs CUDA"),
    ("triton", router.TritonUnavailable, "backend='triton' requested for decode but it cannot run"),
    ("flash", ValueError, "unknown backend 'flash'; use one of auto, reference, sdpa, fa2, triton"),
])
def test_decode_step_refusals_leave_the_cache_unchanged(backend, error, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cache, (q, k, v, gates), _, starts = _prefilled()
    before = _state(cache)
    rows = [s + n for s, n in zip(starts, PRE)]
    with pytest.raises(error, match=match):
        decode_step(q[rows], k[rows], v[rows], gates[rows], cache, CFG, backend=backend)
    after = _state(cache)
    assert after[:2] == before[:2]
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2])), "a refused step wrote into the pages"


def test_decode_step_needs_an_nsakvcache():
    q, k, v, gates = _inputs([2])
    with pytest.raises(TypeError, match=r"NSAKVCache.allocate\(...\).*NSAAttention.allocate_cache"):
        decode_step(q, k, v, gates, object(), CFG)


def _module(compress, seed=0):
    torch.manual_seed(seed)
    cfg = NSAConfig(**{**CFG.model_dump(), "compress": compress})
    return NSAAttention(16, 4, 2, head_dim=6, v_head_dim=4, cfg=cfg, backend="auto").double()


@pytest.mark.parametrize("compress", ["mean", "mlp"])
def test_module_prefill_then_decode_equals_prefill(compress):
    """Ragged prompts (one empty) prefilled through the cache, then one token per sequence: every
    output equals the module's prefill of the full sequences (no cache)."""
    mod = _module(compress)
    full = [n + STEPS for n in PRE]
    cu = _cu(full)
    starts = cu[:-1].tolist()
    x = torch.randn(sum(full), 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    head = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, PRE)])
    with torch.no_grad():
        want = mod(x, cu)
        cache = mod.allocate_cache(len(PRE), max(full))
        got = [mod(x[head], _cu(PRE), cache=cache)]
        rows = [head]
        for step in range(STEPS):
            rows.append(torch.tensor([s + n + step for s, n in zip(starts, PRE)]))
            got.append(mod(x[rows[-1]], cache=cache))
    err = (torch.cat(got) - want[torch.cat(rows)]).abs().max().item()
    assert err <= ATOL, f"compress={compress}: max|cached - prefill| = {err:.2e}"
    assert cache.lengths == full


def test_module_refuses_a_cache_with_another_modules_compressors():
    mod, other = _module("mlp", seed=0), _module("mlp", seed=1)
    cache = other.allocate_cache(1, 16)
    with pytest.raises(ValueError, match=r"not this module's k_compressor.*module.allocate_cache"):
        mod(torch.zeros(4, 16, dtype=torch.float64), cache=cache)
    assert cache.lengths == [0]


def test_module_prefill_into_an_empty_batch_cache_needs_cu_seqlens():
    mod = _module("mean")
    cache = mod.allocate_cache(2, 16)
    with pytest.raises(ValueError, match=r"batch_size=2 needs cu_seqlens.*torch.arange\(2 \+ 1"):
        mod(torch.zeros(4, 16, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match=r"cu_seqlens describes 1 sequence\(s\), the cache holds batch_size=2"):
        mod(torch.zeros(4, 16, dtype=torch.float64), torch.tensor([0, 4], dtype=torch.int32), cache=cache)
    assert cache.lengths == [0, 0]
