"""Triton decode selection (nsa_ref.triton_kernels.decode_select) against the torch selection of
nsa_ref.decode_fast (``decode_torch_path.cmp_probs_from_lse`` / ``block_scores_banded`` /
``selection.top_blocks``) and
against ``selection.block_scores`` + ``top_blocks``.

Pins: block_idx equal entry for entry on ragged batches (a sequence with 0 compressed blocks, fewer
than n selectable blocks, lengths crossing l, l' and the n_sel boundary, a long one of several
kernel tiles), preallocated, paged-raw and paged-compressed layouts (pages that do and do not divide
the tiles), GQA G = 1, 4, 16, the lse given (FA-2's, +inf on empty rows, or -inf) or computed by the
kernel, fp32 and fp64 (bf16 on a GPU); the launch reads no host length (the lengths change, the
launch arguments do not); ``decode_attend_fast`` with the Triton selection forced equals prefill.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from nsa_ref import NSAConfig, selection, telemetry
from nsa_ref.kv_cache import NSAKVCache
from triton_testkit import assert_same_blocks

sys.path.insert(0, str(Path(__file__).parents[1] / "nsa_ref"))  # Case, as tests/nsa_ref uses it
from test_decode_batched import Case  # noqa: E402

PAPER8 = NSAConfig(n_sel=8)
#: l=8, d=4, l'=8 (R = 2, l/d = 2): many selection blocks at small lengths.
TINY = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=8)
#: l=12, d=4, l'=24: R = 6 (not a power of two), compression blocks spanning 3 cells, 2 initial blocks.
ODD = NSAConfig(block_len=12, block_stride=4, sel_block=24, n_sel=4, n_init=2, n_local=1, window=11)
#: l = d = l' = 8: one compressed block per selection block, no overlap; no initial block.
TIED = NSAConfig(block_len=8, block_stride=8, sel_block=8, n_sel=3, n_init=0, n_local=1, window=6)
#: d = 1: each compression block touches up to 3 selection blocks (R = 3, l/d = 6).
STRIDE1 = NSAConfig(block_len=6, block_stride=1, sel_block=3, n_init=0, n_local=1, n_sel=2)

#: refusal() and decode_fast read TRITON_INTERPRET at call time: set it on the CPU.
pytestmark = pytest.mark.usefixtures("interpret_env")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


@pytest.fixture(scope="module")
def ds():
    return importlib.import_module("nsa_ref.triton_kernels.decode_select")


def _cache(lengths, hkv, dk, cfg, layout, capacity, dtype, device, seed=0):
    """A filled NSAKVCache: layout "contiguous", ("paged", P) (compressed store preallocated) or
    ("paged", P, Pc) (compressed store paged too); pools poisoned with NaN outside the sequences."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    if layout == "contiguous":
        cache = NSAKVCache.allocate(B, capacity, hkv, dk, cfg, dtype=dtype, device=device)
    else:
        P = layout[1]
        max_pages = -(-capacity // P)
        perm = torch.randperm(B * max_pages + 3, generator=g)[: B * max_pages]
        table = perm.to(torch.int32).reshape(B, max_pages).to(device)
        kw = {}
        if len(layout) == 3:
            Pc = layout[2]
            cmax = -(-cfg.num_cmp_blocks(max_pages * P) // Pc)
            cperm = torch.randperm(B * cmax + 2, generator=g)[: B * cmax]
            kw = dict(cmp_block_table=cperm.to(torch.int32).reshape(B, cmax).to(device),
                      cmp_num_pages=B * cmax + 2, cmp_page_size=Pc)
        cache = NSAKVCache.allocate_paged(table, B * max_pages + 3, P, hkv, dk, cfg, dtype=dtype, **kw)
    for store in (cache.raw, cache.cmp):
        store.k_pages.fill_(float("nan"))
        store.v_pages.fill_(float("nan"))
    T = sum(lengths)
    k = torch.randn(T, hkv, dk, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cache.prefill(k, k.clone(), cu)
    return cache


def _torch_lse(q, cache, cfg, empty=float("inf")):
    """The cmp branch's natural lse (B, Hq) in the accumulation dtype; ``empty`` where no block."""
    from nsa_ref.decode_torch_path import cmp_keys, cmp_width, scores_fp32

    raw, cmp = cache.views()
    width = cmp_width(raw, cmp, cfg)
    B, Hq, Dk = q.shape
    k, _, emitted = cmp_keys(cmp, width)
    Hkv = k.shape[1]
    s = scores_fp32(q.reshape(B, Hkv, Hq // Hkv, Dk), k.transpose(1, 2)) * cfg.softmax_scale(Dk)
    s = s.masked_fill(~emitted[:, None, None, :], float("-inf")).reshape(B, Hq, width)
    lse = torch.logsumexp(s, -1) if width else s.new_full((B, Hq), float("-inf"))
    return torch.where(torch.isinf(lse), empty, lse)


def _torch_select(q, cache, cfg, lse=None, banded=True):
    """decode_fast's torch selection: p_cmp (from lse like the FA-2 path, or the torch cmp softmax)
    -> banded (or matrix) block scores -> top_blocks."""
    from nsa_ref.decode_torch_path import block_scores_banded, cmp_probs_from_lse, cmp_torch, cmp_width

    raw, cmp = cache.views()
    width = cmp_width(raw, cmp, cfg)
    Hkv = raw.k_pages.shape[2]
    if lse is not None:
        p = cmp_probs_from_lse(q, lse, cmp, width, cfg)
    else:
        p = cmp_torch(q, cmp, width, cfg)[1]
    nb = cfg.num_sel_blocks(raw.capacity)
    scores = block_scores_banded(p, Hkv, nb, cfg) if banded else selection.block_scores(p, Hkv, nb, cfg)
    return selection.top_blocks(scores, cache.cache_seqlens.long() - 1, cfg)


def _kernel_select(ds, q, cache, cfg, lse=None):
    from nsa_ref.decode_torch_path import cmp_width

    raw, cmp = cache.views()
    assert ds.refusal(q, cmp) is None
    return ds.decode_select(q, cmp, raw.cache_seqlens, cfg, width=cmp_width(raw, cmp, cfg), lse=lse)


def _check(ds, cache, cfg, hq, dtype, device, what, seed=1, lse_mode="none"):
    B, Hkv, Dk = cache.batch_size, cache.raw.k_pages.shape[2], cache.raw.k_pages.shape[3]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, Dk, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    lse = None if lse_mode == "none" else _torch_lse(q, cache, cfg, float(lse_mode))
    got = _kernel_select(ds, q, cache, cfg, lse)
    want = _torch_select(q, cache, cfg, lse)
    assert_same_blocks(got, want, f"{what} (banded)")
    assert_same_blocks(got, _torch_select(q, cache, cfg, lse, banded=False), f"{what} (block_scores)")
    listed = got >= 0
    assert (listed[..., :-1] | ~listed[..., 1:]).all(), f"{what}: -1 before a listed block"
    assert (got[..., 1:] > got[..., :-1])[listed[..., 1:]].all(), f"{what}: not strictly ascending"
    return got


LAYOUTS = [pytest.param("contiguous", id="prealloc"), pytest.param(("paged", 5), id="page5"),
           pytest.param(("paged", 16, 3), id="page16-cmp3")]


def _ragged_cases():
    """Every layout and dtype on TINY; each other configuration on two (layout, dtype) pairs (the
    interpreter takes ~2 s a case)."""
    for layout in LAYOUTS:
        for dtype in DTYPES:
            yield pytest.param(TINY, dtype.values[0], layout.values[0], id=f"tiny-{dtype.id}-{layout.id}")
    for i, (name, cfg) in enumerate((("odd", ODD), ("tied", TIED), ("stride1", STRIDE1))):
        for k in range(2):
            layout, dtype = LAYOUTS[(i + k) % 3], DTYPES[(i + k) % 2]
            yield pytest.param(cfg, dtype.values[0], layout.values[0], id=f"{name}-{dtype.id}-{layout.id}")


@pytest.mark.parametrize("cfg, dtype, layout", list(_ragged_cases()))
def test_ragged_batch_matches_torch(ds, kdev, cfg, dtype, layout):
    """Lengths 1 (no compressed block), l - 1, l, l', n_sel l' +- 1 and one of several tiles, G = 4;
    the kernel computes the lse itself (decode_fast's torch cmp path)."""
    l, lp, n = cfg.block_len, cfg.sel_block, cfg.n_sel
    lengths = [1, l - 1, l, lp + 1, n * lp - 1, n * lp + 1, 300]
    cache = _cache(lengths, 2, 8, cfg, layout, 320, dtype, kdev)
    _check(ds, cache, cfg, 8, dtype, kdev, f"lengths {lengths}")


@pytest.mark.parametrize("lse_mode", ["inf", "-inf"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_given_lse_matches_torch(ds, kdev, layout, lse_mode):
    """The FA-2 path: lse from the cmp branch (+inf or -inf on rows without a block)."""
    lengths = [1, 7, 8, 30, 64, 130]
    cache = _cache(lengths, 2, 8, TINY, layout, 160, torch.float32, kdev, seed=2)
    _check(ds, cache, TINY, 8, torch.float32, kdev, "given lse", lse_mode=lse_mode)


@pytest.mark.parametrize("G", [1, 4, 16])
def test_gqa_groups(ds, kdev, G):
    """Hkv = 2, G query heads per KV head (G = 16 fills the 16-row dot tile)."""
    lengths = [0 + 1, 40, 100, 257]
    cache = _cache(lengths, 2, 16, PAPER8, ("paged", 64), 512, torch.float32, kdev, seed=G)
    _check(ds, cache, PAPER8, 2 * G, torch.float32, kdev, f"G={G}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_paper_config_scaled_down(ds, kdev, dtype):
    """Paper block sizes (l, d, l', n = 32, 16, 64, 16), capacity 4096 (64 selection blocks, 256
    compressed slots: 5 kernel tiles of 15 selection blocks), ragged lengths up to the capacity,
    G = 16 as in Hq 64 / Hkv 4, head dim 32."""
    cfg = NSAConfig()
    lengths = [1, 31, 32, 1023, 1025, 2900, 4096]
    cache = _cache(lengths, 2, 32, cfg, ("paged", 256), 4096, dtype, kdev, seed=5)
    got = _check(ds, cache, cfg, 32, dtype, kdev, "paper sizes", lse_mode="inf")
    assert got[-1, :, 2:-2].ne(-1).all() and len(set(got[-1, 0].tolist())) == 16


@pytest.mark.parametrize("cfg", [pytest.param(TINY, id="tiny"), pytest.param(PAPER8, id="paper-n8")])
def test_split_launch_matches_torch(ds, kdev, monkeypatch, cfg, programs=16):
    """The split launch (grid (B, Hkv, splits) + the merge kernel), forced through
    TUNING["split_programs"] = 16: B * Hkv = 4 or 6 programs become 4 or 2 splits each (the last
    one open-ended), same blocks as torch; forced blocks in one split, free picks in others."""
    monkeypatch.setitem(ds.TUNING, "split_programs", programs)
    lengths = [1, 3 * cfg.sel_block + 1, 300] if cfg is not PAPER8 else [1, 3000]
    cap = 320 if cfg is not PAPER8 else 3072
    cache = _cache(lengths, 2, 8, cfg, ("paged", 16), cap, torch.float32, kdev, seed=programs)
    raw, cmp = cache.views()
    from nsa_ref.decode_torch_path import cmp_width

    width = cmp_width(raw, cmp, cfg)
    R, RW, BC, BJ = ds._tiles(cfg)
    num_sel = cfg.num_sel_blocks(raw.capacity)
    assert ds.split_count(len(lengths), 2, -(-num_sel // BJ), torch.device(kdev)) > 1
    q = torch.randn(len(lengths), 8, 8, generator=torch.Generator().manual_seed(1)).to(kdev)
    lse = _torch_lse(q, cache, cfg)
    got = ds.decode_select(q, cmp, raw.cache_seqlens, cfg, width=width, lse=lse, num_sel=num_sel)
    assert_same_blocks(got, _torch_select(q, cache, cfg, lse), f"split programs={programs}")
    # an underestimated num_sel (2 tiles: 2 splits): the last split still runs to the current block
    assert ds.split_count(len(lengths), 2, 2, torch.device(kdev)) == 2
    got = ds.decode_select(q, cmp, raw.cache_seqlens, cfg, width=width, lse=lse, num_sel=2 * BJ)
    assert_same_blocks(got, _torch_select(q, cache, cfg, lse), "num_sel=2 BJ")


def test_launch_does_not_depend_on_host_lengths(ds, kdev, monkeypatch):
    """The lengths the kernel uses are the device ones: with the host lengths replaced by
    nonsense (and .tolist / .item banned), the result follows cache_seqlens."""
    lengths = [9, 40, 77]
    cache = _cache(lengths, 2, 8, TINY, ("paged", 5), 96, torch.float32, kdev, seed=7)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 8, generator=g).to(kdev)
    want = _torch_select(q, cache, TINY)
    raw, cmp = cache.views()
    from dataclasses import replace

    from nsa_ref.decode_torch_path import cmp_width

    width = cmp_width(raw, cmp, TINY)
    cmp = replace(cmp, lengths=(0, 0, 0))

    def banned(*_a, **_k):
        raise AssertionError("host read")

    monkeypatch.setattr(torch.Tensor, "tolist", banned)
    monkeypatch.setattr(torch.Tensor, "item", banned)
    got = ds.decode_select(q, cmp, raw.cache_seqlens, TINY, width=width)
    monkeypatch.undo()
    assert_same_blocks(got, want, "device lengths")


def test_tie_goes_to_the_lower_block(ds, kdev):
    """All compressed keys equal: every candidate block scores the same except at the ends, and
    the free picks are the lowest non-forced indices, as top_blocks' stable sort gives."""
    cache = _cache([200], 1, 8, TINY, "contiguous", 200, torch.float64, kdev)
    cache.cmp.k_pages.zero_()
    q = torch.ones(1, 2, 8, dtype=torch.float64, device=kdev)
    got = _kernel_select(ds, q, cache, TINY)
    assert_same_blocks(got, _torch_select(q, cache, TINY), "ties")


# -- decode_attend_fast with the Triton selection ------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", 5])
def test_decode_fast_with_triton_selection_equals_prefill(kdev, layout):
    """decode_step_fast with select="triton" (fp64 through the interpreter on the CPU, fp32 on a
    GPU): equal to prefill step after step, lengths crossing l, l' and the n_sel boundary;
    telemetry records the Triton selection and sel kernels and no other path for them."""
    from nsa_ref.decode_fast import decode_step_fast

    dtype = torch.float64 if kdev == "cpu" else torch.float32
    pre, steps = [0, 3, 13, 30], 10
    case = Case(TINY, [p + steps for p in pre], hq=8, hkv=2, seed=3)
    case.dtype = dtype
    cache = case.cache(layout, capacity=48, poison=True)
    if kdev == "cuda":
        cache = _cache_to(cache, kdev)
    case.prefill(cache, pre)
    telemetry.reset()
    for step in range(steps):
        rows = case.rows([p + step for p in pre])
        args = [x[rows].to(device=kdev, dtype=dtype) for x in (case.q, case.k, case.v, case.gates)]
        got = decode_step_fast(*args, cache, TINY, fa2=None, select="triton")
        err = (got.double().cpu() - case.want[rows]).abs().max().item()
        assert err <= (1e-10 if dtype == torch.float64 else 1e-4), f"step {step}: max|fast - prefill| = {err:.3g}"
    paths = {(b, p) for b, p, _ in telemetry.snapshot()["counts"]}
    assert {("select", "triton"), ("sel", "triton")} <= paths, paths
    assert not {("select", "torch"), ("sel", "torch"), ("sel", "fa2")} & paths, paths


def test_decode_fast_select_auto_and_torch(kdev):
    """select="torch" keeps the torch selection; "auto" takes Triton where ``refusal`` is None
    (here: the interpreter on the CPU, or the GPU); a refused "triton" raises with the reason."""
    from nsa_ref.decode_fast import decode_attend_fast, select_path

    cache = _cache([5, 40], 2, 8, TINY, ("paged", 5), 48, torch.float32, kdev, seed=9)
    q = torch.randn(2, 4, 8, device=kdev)
    gates = torch.rand(2, 4, 3, device=kdev)
    telemetry.reset()
    a = decode_attend_fast(q, gates, cache, TINY, fa2=None, select="torch")
    b = decode_attend_fast(q, gates, cache, TINY, fa2=None, select="auto")
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    paths = {(br, p) for br, p, _ in telemetry.snapshot()["counts"] if br in ("select", "sel")}
    assert paths == {("select", "torch"), ("select", "triton"), ("sel", "torch"), ("sel", "triton")}, paths
    assert select_path("torch", q, cache.views()[1]) == (False, "select='torch'")
    with pytest.raises(ValueError, match="select="):
        select_path("bogus", q, cache.views()[1])
    if kdev == "cpu":
        q16 = q.to(torch.bfloat16)
        assert select_path("auto", q16, cache.views()[1])[0] is False
        with pytest.raises(RuntimeError, match="Triton decode kernel decode_select"):
            select_path("triton", q16, cache.views()[1])


def _cache_to(cache, device):  # pragma: no cover - GPU only
    pytest.skip("Case builds CPU caches; on a GPU test_gpu_* cover decode_fast with the kernel")


# -- GPU -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_paper_config_matches_torch(ds, dtype):
    """CUDA, paper config, Hq 64 / Hkv 4 / D 128, page 256, lengths up to 8K: the kernel's blocks
    equal decode_fast's torch selection except where two scores tie within fp32 rounding (at most
    2 of the 128 (sequence, KV head) rows may differ)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = NSAConfig()
    lengths = [1, 31, 32, 700, 1025, 4096, 6000, 8192] * 4
    cache = _cache(lengths, 4, 128, cfg, ("paged", 256), 8192, dtype, "cuda", seed=11)
    g = torch.Generator().manual_seed(12)
    for mode in ("none", "inf"):
        q = torch.randn(len(lengths), 64, 128, generator=g).to(device="cuda", dtype=dtype)
        lse = None if mode == "none" else _torch_lse(q, cache, cfg).float()
        got = _kernel_select(ds, q, cache, cfg, lse)
        want = _torch_select(q, cache, cfg, lse)
        rows = (got != want).any(-1)
        assert rows.sum().item() <= 2, (mode, rows.sum().item(), got[rows][:2], want[rows][:2])
