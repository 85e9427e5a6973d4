"""NSAKVCache: layout, in-place appends, compressed-block emission, refusals leave it unchanged."""
from __future__ import annotations

import pytest
import torch

from nsa_ref import NSAConfig, compress
from nsa_ref.kv_cache import (
    CacheCapacityError,
    CacheShapeError,
    KVCacheError,
    KVCacheTypeError,
    NSAKVCache,
    PageTableError,
    PagedKV,
)
from nsa_ref_testkit import SMALL

HKV, DK, DV = 2, 5, 3
LENGTHS = [0, 5, 13, 30]  # empty, shorter than l = 8, a few blocks, many blocks


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)


def _tokens(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, HKV, DK, generator=g, dtype=torch.float64),
            torch.randn(T, HKV, DV, generator=g, dtype=torch.float64))


def _paged_table(B: int, max_pages: int, seed: int = 0, spare: int = 3) -> tuple[torch.Tensor, int]:
    """-> (block_table (B, max_pages) int32 of shuffled distinct pages, num_pages incl. spares)."""
    num_pages = B * max_pages + spare
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))[: B * max_pages]
    return perm.to(torch.int32).reshape(B, max_pages), num_pages


def _cache(layout, B: int = len(LENGTHS), capacity: int = 48, cfg: NSAConfig = SMALL) -> NSAKVCache:
    """layout: "contiguous" or a page size."""
    if layout == "contiguous":
        return NSAKVCache.allocate(B, capacity, HKV, DK, cfg, v_head_dim=DV, dtype=torch.float64)
    max_pages = -(-capacity // layout)
    table, num_pages = _paged_table(B, max_pages)
    return NSAKVCache.allocate_paged(table, num_pages, layout, HKV, DK, cfg, v_head_dim=DV, dtype=torch.float64)


def _state(cache: NSAKVCache) -> list:
    """Everything a refused call must leave alone: pool bytes, tables, device and host lengths."""
    out = []
    for store in (cache.raw, cache.cmp):
        out += [store.k_pages.clone(), store.v_pages.clone(), store.block_table.clone(),
                store.cache_seqlens.clone(), list(store.lengths)]
    return out


def _assert_unchanged(cache: NSAKVCache, before: list) -> None:
    after = _state(cache)
    for i, (a, b) in enumerate(zip(before, after)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                               b.view(torch.uint8) if b.is_floating_point() else b), f"state item {i} changed"
        else:
            assert a == b, f"state item {i} changed: {a} -> {b}"


LAYOUTS = ["contiguous", 1, 3, 4, 5, 7, 16]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_prefill_fills_raw_and_compressed(layout):
    """Ragged prefill (lengths 0, < l, >= l): raw tokens read back exactly, compressed blocks equal
    ``nsa_ref.compress`` of each sequence, Tc = cfg.num_cmp_blocks(length)."""
    cache = _cache(layout)
    k, v = _tokens(sum(LENGTHS))
    cache.prefill(k, v, _cu(LENGTHS))
    assert cache.lengths == LENGTHS
    assert cache.cache_seqlens.tolist() == LENGTHS
    assert cache.num_cmp_blocks == [SMALL.num_cmp_blocks(n) for n in LENGTHS]
    for b, (a, e) in enumerate(zip(_cu(LENGTHS)[:-1].tolist(), _cu(LENGTHS)[1:].tolist())):
        kb, vb, kc, vc = cache.sequence(b)
        assert torch.equal(kb, k[a:e]) and torch.equal(vb, v[a:e]), f"raw tokens of sequence {b}"
        want_k, _ = compress(k[a:e], SMALL)
        want_v, _ = compress(v[a:e], SMALL)
        torch.testing.assert_close(kc, want_k, rtol=0, atol=1e-15)
        torch.testing.assert_close(vc, want_v, rtol=0, atol=1e-15)


@pytest.mark.parametrize("layout", ["contiguous", 3, 16], ids=str)
def test_append_emits_block_when_it_ends_and_writes_in_place(layout):
    """One token at a time from empty: block i appears exactly when token i*d + l - 1 arrives;
    no pool, table or seqlens tensor is ever reallocated."""
    cfg = SMALL
    B, T = 2, 40
    cache = _cache(layout, B=B)
    k, v = _tokens(B * T)
    k, v = k.reshape(B, T, HKV, DK), v.reshape(B, T, HKV, DV)
    stores = (cache.raw, cache.cmp)
    ptrs = [(s.k_pages.data_ptr(), s.v_pages.data_ptr(), s.block_table.data_ptr(), s.cache_seqlens.data_ptr())
            for s in stores]
    for t in range(T):
        cache.append(k[:, t], v[:, t])
        emitted = [(i * cfg.block_stride + cfg.block_len - 1 == t) for i in range(T)]
        assert cache.num_cmp_blocks == [cfg.num_cmp_blocks(t + 1)] * B
        assert any(emitted) == (cache.num_cmp_blocks[0] > cfg.num_cmp_blocks(t)), f"t={t}"
        assert [(s.k_pages.data_ptr(), s.v_pages.data_ptr(), s.block_table.data_ptr(), s.cache_seqlens.data_ptr())
                for s in stores] == ptrs, f"t={t}: a cache tensor was reallocated"
    for b in range(B):
        kb, vb, kc, vc = cache.sequence(b)
        assert torch.equal(kb, k[b]) and torch.equal(vb, v[b])
        torch.testing.assert_close(kc, compress(k[b], cfg)[0], rtol=0, atol=1e-15)


def test_multi_token_append_and_chunked_prefill_equal_one_prefill():
    """The same tokens through one prefill, ragged chunks (some empty) and n-token appends give
    the same cache contents."""
    lengths = [6, 6, 6]
    k, v = _tokens(sum(lengths), seed=3)
    one = _cache(5, B=3)
    one.prefill(k, v, _cu(lengths))
    chunked = _cache(5, B=3)
    kk, vv = k.reshape(3, 6, HKV, DK), v.reshape(3, 6, HKV, DV)
    done = [0, 0, 0]
    for counts in ([0, 2, 5], [4, 0, 1], [2, 4, 0]):
        rows = torch.cat([torch.arange(b * 6 + done[b], b * 6 + done[b] + c) for b, c in enumerate(counts)])
        chunked.prefill(k[rows], v[rows], _cu(counts))
        done = [d + c for d, c in zip(done, counts)]
    stepped = _cache("contiguous", B=3)
    stepped.append(kk[:, :4], vv[:, :4])
    stepped.append(kk[:, 4:], vv[:, 4:])
    for cache in (chunked, stepped):
        assert cache.lengths == lengths
        for b in range(3):
            for got, want in zip(cache.sequence(b), one.sequence(b)):
                assert torch.equal(got, want)


def test_unassigned_pages_then_set_block_table():
    """-1 slots are fine until a token needs them; set_block_table assigns pages in place."""
    table = torch.tensor([[0, -1], [1, -1]], dtype=torch.int32)
    cache = NSAKVCache.allocate_paged(table, 4, 4, HKV, DK, SMALL, v_head_dim=DV, dtype=torch.float64)
    k, v = _tokens(8)
    cache.prefill(k, v, _cu([4, 4]))
    before = _state(cache)
    with pytest.raises(PageTableError, match=r"sequence 0 .*block_table\[0, 1\] = -1"):
        cache.append(k[:2], v[:2])
    _assert_unchanged(cache, before)
    ptr = cache.raw.block_table.data_ptr()
    cache.raw.set_block_table(torch.tensor([[0, 3], [1, 2]], dtype=torch.int32))
    assert cache.raw.block_table.data_ptr() == ptr
    cache.append(k[:2], v[:2])
    assert cache.lengths == [5, 5]
    assert torch.equal(cache.sequence(1)[0][4], k[1])


# -- refusals: a clear error naming the sequence / value, and nothing written ---------------------

def _filled(layout=3):
    cache = _cache(layout, capacity=20)
    k, v = _tokens(sum([0, 5, 13, 19]))
    cache.prefill(k, v, _cu([0, 5, 13, 19]))
    return cache


def _new(B=4, n=None, hkv=HKV, dk=DK, dv=DV, dtype=torch.float64):
    lead = (B,) if n is None else (B, n)
    return torch.randn(*lead, hkv, dk, dtype=dtype), torch.randn(*lead, hkv, dv, dtype=dtype)


@pytest.mark.parametrize("layout", ["contiguous", 3], ids=str)
def test_append_past_capacity_is_refused_whole(layout):
    cache = _filled(layout)
    before = _state(cache)
    with pytest.raises(CacheCapacityError, match=r"sequence 3 holds 19 of 2[01] tokens.*would need 22"):
        cache.append(*_new(n=3))  # sequences 0..2 fit: nothing of them may be written either
    _assert_unchanged(cache, before)


def test_compressed_store_too_small_is_refused_before_the_raw_write():
    cmp_table = torch.tensor([[0], [1]], dtype=torch.int32)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    cache = NSAKVCache.allocate_paged(table, 6, 8, HKV, DK, SMALL, v_head_dim=DV, dtype=torch.float64,
                                      cmp_block_table=cmp_table, cmp_num_pages=2, cmp_page_size=2)
    k, v = _tokens(24)
    cache.prefill(k[:24], v[:24], _cu([12, 12]))  # Tc = 2 each: the compressed store is full
    before = _state(cache)
    with pytest.raises(CacheCapacityError, match=r"compressed cache: sequence 0 holds 2 of 2"):
        cache.append(*_new(B=2, n=4))
    _assert_unchanged(cache, before)


@pytest.mark.parametrize(
    "make, error, pattern",
    [
        (lambda: _new(B=3), CacheShapeError, r"k_new has 3.*B = 4"),
        (lambda: _new(hkv=1), CacheShapeError, r"\(Hkv, Dk\) = \(2, 5\).*got k \(1, 5\)"),
        (lambda: _new(dk=6), CacheShapeError, r"got k \(2, 6\)"),
        (lambda: _new(dv=4), CacheShapeError, r"v \(Hkv, Dv\) = \(2, 3\).*v \(2, 4\)"),
        (lambda: _new(dtype=torch.float32), KVCacheTypeError, r"holds torch.float64, got k torch.float32"),
        (lambda: tuple(x.to("meta") for x in _new()), CacheShapeError, r"lives on cpu, got k on meta"),
        (lambda: (_new()[0], _new(n=1)[1]), CacheShapeError, r"\(B, Hkv, D\) or \(B, n, Hkv, D\)"),
    ],
    ids=["B", "heads", "Dk", "Dv", "dtype", "device", "rank"],
)
def test_bad_new_tokens_are_refused_with_cache_unchanged(make, error, pattern):
    cache = _filled()
    before = _state(cache)
    with pytest.raises(error, match=pattern) as info:
        cache.append(*make())
    assert isinstance(info.value, KVCacheError) and isinstance(info.value, ValueError)
    _assert_unchanged(cache, before)


def test_dtype_errors_are_type_errors():
    cache = _filled()
    with pytest.raises(TypeError):
        cache.append(*_new(dtype=torch.float32))
    with pytest.raises(TypeError, match="int32"):
        cache.raw.set_block_table(cache.raw.block_table.long())


@pytest.mark.parametrize(
    "table, error, pattern",
    [
        ([[0, 1], [2, 9]], PageTableError, r"block_table\[1, 1\] = 9 points outside the pool of 6 pages"),
        ([[0, 1], [2, -2]], PageTableError, r"block_table\[1, 1\] = -2 points outside"),
        ([[0, 1], [1, 2]], PageTableError, r"page 1 is listed twice, block_table\[0, 1\] and block_table\[1, 0\]"),
        ([[0, 1, 2], [3, 4, 5]], CacheShapeError, r"keep its shape"),
        ([[0, 1], [-1, 3]], PageTableError, r"sequence 1 holds 4 tokens, so block_table\[1, 0\] .* needs a page"),
    ],
    ids=["past-pool", "negative", "shared-page", "shape", "unassign-filled"],
)
def test_bad_block_tables_are_refused(table, error, pattern):
    good = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    cache = NSAKVCache.allocate_paged(good, 6, 4, HKV, DK, SMALL, v_head_dim=DV, dtype=torch.float64)
    k, v = _tokens(6)
    cache.prefill(k, v, _cu([2, 4]))
    before = _state(cache)
    with pytest.raises(error, match=pattern):
        cache.raw.set_block_table(torch.tensor(table, dtype=torch.int32))
    _assert_unchanged(cache, before)
    if tuple(torch.tensor(table).shape) == (2, 2) and -1 not in table[1]:
        with pytest.raises(error, match=pattern):  # the same rules when a cache is built
            NSAKVCache.allocate_paged(torch.tensor(table, dtype=torch.int32), 6, 4, HKV, DK, SMALL,
                                      v_head_dim=DV, dtype=torch.float64)
    with pytest.raises(KVCacheTypeError, match="int32"):
        NSAKVCache.allocate_paged(good.long(), 6, 4, HKV, DK, SMALL, v_head_dim=DV, dtype=torch.float64)


@pytest.mark.parametrize(
    "cu, error, pattern",
    [
        ([0, 2, 6], CacheShapeError, r"describes 2 sequence\(s\), the cache holds B = 4"),
        ([0, 2, 1, 5, 6], KVCacheError, r"non-decreasing"),
        ([0, 2, 3, 5, 7], KVCacheError, r"must equal the number of packed tokens"),
    ],
    ids=["B", "decreasing", "total"],
)
def test_bad_prefill_is_refused_with_cache_unchanged(cu, error, pattern):
    cache = _filled()
    before = _state(cache)
    k, v = _tokens(6)
    with pytest.raises(error, match=pattern):
        cache.prefill(k, v, torch.tensor(cu, dtype=torch.int32))
    _assert_unchanged(cache, before)
    with pytest.raises(KVCacheTypeError, match="int32"):
        cache.prefill(k, v, torch.tensor([0, 1, 2, 3, 6]))
    _assert_unchanged(cache, before)


def test_mlp_config_needs_its_phi_and_phi_shape_is_checked():
    with pytest.raises(KVCacheError, match="needs its learned phi"):
        NSAKVCache.allocate(1, 8, HKV, DK, SMALL.model_copy(update={"compress": "mlp"}))
    with pytest.raises(CacheShapeError, match="phi_k maps a block"):
        NSAKVCache.allocate(1, 8, HKV, DK, SMALL, phi_k=lambda blocks: blocks.sum(dim=(1, 2)))


@pytest.mark.parametrize("strided", ["sliced", "permuted"])
def test_caller_owned_strided_pools(strided):
    """An inference stack's own pools: only the last dim needs stride 1; a pool whose leading
    dims do not merge is read through advanced indexing, with the same contents."""
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    if strided == "sliced":
        k_pages = torch.zeros(4, 4, HKV, DK + 3, dtype=torch.float64)[..., :DK]
        v_pages = torch.zeros(4, 4, HKV, DV + 1, dtype=torch.float64)[..., :DV]
    else:
        k_pages = torch.zeros(4, 4, HKV, DK, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
        v_pages = torch.zeros(4, 4, HKV, DV, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
    raw = PagedKV(k_pages, v_pages, table)
    cmp = PagedKV.contiguous(2, SMALL.num_cmp_blocks(8), HKV, DK, DV, torch.float64, "cpu", "compressed")
    cache = NSAKVCache(raw, cmp, SMALL)
    k, v = _tokens(14)
    cache.prefill(k, v, _cu([8, 6]))
    assert torch.equal(cache.sequence(0)[0], k[:8]) and torch.equal(cache.sequence(1)[1], v[8:])
    torch.testing.assert_close(cache.sequence(0)[2], compress(k[:8], SMALL)[0], rtol=0, atol=1e-15)
    assert cache.raw.k_pages.data_ptr() == k_pages.data_ptr()
    b, pos = torch.tensor([[0], [1]]), torch.tensor([[0, 5], [1, 3]])
    kh, vh = cache.raw.view().gather(b, pos, torch.tensor([[True, True], [True, False]]), torch.tensor(1))
    assert torch.equal(kh[0], k[[0, 5], 1]) and torch.equal(kh[1, 0], k[8 + 1, 1])
    assert torch.equal(vh[1, 1], torch.zeros(DV, dtype=torch.float64)), "an invalid entry reads as 0"


def test_learned_phi_compresses_the_cached_blocks():
    """cfg.compress = "mlp": the module's MLPCompressor as phi, applied to each block of l cached
    tokens as prefill applies it to gather_cmp_blocks."""
    from nsa_ref.compress import MLPCompressor, gather_cmp_blocks

    cfg = SMALL.model_copy(update={"compress": "mlp"})
    torch.manual_seed(0)
    phi_k, phi_v = MLPCompressor(cfg.block_len, DK).double(), MLPCompressor(cfg.block_len, DV).double()
    cache = NSAKVCache.allocate(2, 24, HKV, DK, cfg, v_head_dim=DV, dtype=torch.float64, phi_k=phi_k, phi_v=phi_v)
    k, v = _tokens(30)
    cache.prefill(k[:20], v[:20], _cu([12, 8]))
    cache.append(k[20:30].reshape(2, 5, HKV, DK), v[20:30].reshape(2, 5, HKV, DV))
    with torch.no_grad():
        for b, rows in enumerate((list(range(12)) + list(range(20, 25)), list(range(12, 20)) + list(range(25, 30)))):
            _, _, kc, vc = cache.sequence(b)
            torch.testing.assert_close(kc, phi_k(gather_cmp_blocks(k[rows], cfg)), rtol=0, atol=1e-14)
            torch.testing.assert_close(vc, phi_v(gather_cmp_blocks(v[rows], cfg)), rtol=0, atol=1e-14)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Records every read of a tensor's values to the host (each one a device sync on CUDA)."""

    READS = {"tolist", "item", "cpu", "numpy", "__int__", "__index__", "__bool__", "__float__", "__iter__", "__len__"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS and args and isinstance(args[0], torch.Tensor):
            self.reads.append(f"{name} of {tuple(args[0].shape)}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["contiguous", 3], ids=str)
def test_append_and_step_never_read_the_device(layout):
    """Appends (with and without emission) check host lengths and tables only; prefill reads
    cu_seqlens once (never with cu_seqlens_cpu); the decode step's only read is the gates'
    [0, 1] check of nsa_ref.inputs, and none with validate="shapes"."""
    from nsa_ref.decode_batched import decode_step_batched

    cache = _cache(layout)
    k, v = _tokens(sum(LENGTHS))
    cu = _cu(LENGTHS)
    with _HostReads() as mode:
        cache.prefill(k, v, cu)
    assert len(mode.reads) == 1, f"prefill reads cu_seqlens once: {mode.reads}"
    cache.reset(range(cache.batch_size))
    host = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    with _HostReads() as mode:
        cache.prefill(k, v, cu, cu_seqlens_cpu=host)
    assert mode.reads == [], f"prefill with cu_seqlens_cpu read the device: {mode.reads}"
    cache.reset(range(cache.batch_size))
    cache.prefill(k, v, cu)
    for n in (1, 3, 4):
        with _HostReads() as mode:
            cache.append(*_new(n=n))
        assert mode.reads == [], f"append of {n} token(s) read the device: {mode.reads}"
    q = torch.randn(4, 4, DK, dtype=torch.float64)
    gates = torch.rand(4, 4, 3, dtype=torch.float64)
    with _HostReads() as mode:
        decode_step_batched(q, *_new(), gates, cache, SMALL)
    assert all(r.startswith("__bool__") for r in mode.reads) and len(mode.reads) <= 1, mode.reads
    with _HostReads() as mode:
        decode_step_batched(q, *_new(), gates, cache, SMALL, validate="shapes")
    assert mode.reads == [], f"a step with validate='shapes' read the device: {mode.reads}"
