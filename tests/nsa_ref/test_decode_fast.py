"""decode_step_fast (nsa_ref.decode_fast) equals decode_step_batched, and so prefill, step after step.

CPU: fp64 parity over ragged batches (empty prompt, lengths < l, lengths crossing l, d, l', w and
the n_sel boundary), preallocated and paged caches with page sizes that do and do not divide
l, d, l', w, GQA; the FA-2 branch plumbing with an emulated ``flash_attn_with_kvcache`` (lse ->
selection probabilities); bf16 within tolerances.yaml; no host read during the step; the same
refusals as decode_step_batched. GPU (``-m gpu``): CUDA bf16 against the reference step, with and
without flash_attn, and one step captured in a CUDA graph and replayed.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from nsa_ref import NSAConfig, selection, telemetry
from nsa_ref.decode_batched import decode_step_batched
from nsa_ref.decode_fast import (
    KVCacheKernel,
    contract_verdict,
    decode_attend_fast,
    decode_step_fast,
)
from nsa_ref.decode_graph import CapturedDecodeStep
from nsa_ref.decode_torch_path import block_scores_banded
from nsa_ref.kv_cache import CacheCapacityError, KVCacheError, NSAKVCache
from nsa_ref_testkit import ODD, SMALL, assert_close
from test_decode_batched import REFUSAL_IDS, REFUSALS, TIED, Case, _bytes, _same, refused_step_args

PAPER = NSAConfig()
CONFIGS = {"small": SMALL, "odd": ODD, "tied": TIED}
ATOL = 1e-10


def _steps(case: Case, layout, pre, steps, *, fa2=None, capacity=None, dtype_check=True, win="auto") -> None:
    """Prefill ``pre``; then per step the fast step on one cache and the reference on another,
    both against prefill (fp64)."""
    fast, ref = case.cache(layout, capacity=capacity, poison=True), case.cache(layout, capacity=capacity, poison=True)
    case.prefill(fast, pre)
    case.prefill(ref, pre)
    pool = fast.raw.k_pages.data_ptr()
    for step in range(steps):
        rows = case.rows([p + step for p in pre])
        args = [x[rows] for x in (case.q, case.k, case.v, case.gates)]
        got = decode_step_fast(*args, fast, case.cfg, fa2=fa2, win=win)
        want = decode_step_batched(*args, ref, case.cfg)
        assert_close(got, want, f"fast vs decode_step_batched, step {step}", atol=ATOL)
        assert_close(got, case.want[rows], f"fast vs prefill, step {step}", atol=ATOL)
    assert fast.lengths == ref.lengths == [p + steps for p in pre]
    assert fast.raw.k_pages.data_ptr() == pool


@pytest.mark.parametrize("layout", ["contiguous", 3, 5, 16], ids=lambda x: f"page{x}" if x != "contiguous" else x)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_equals_reference_and_prefill(name, layout):
    """Prompts 0, 3 (< l), 13, 30, then 20 steps: lengths cross l, l', w on the way."""
    pre, steps = [0, 3, 13, 30], 20
    case = Case(CONFIGS[name], [p + steps for p in pre], hq=8, hkv=2)  # GQA, G = 4
    _steps(case, layout, pre, steps, capacity=64)


@pytest.mark.parametrize("layout", ["contiguous", 7, 256])
def test_paper_config_crossing_boundaries(layout):
    """l, d, l', n, w = 32, 16, 64, 16, 512: steps cross l (31 -> 32), l' (63 -> 64), w (511 ->
    512) and nb = n_sel (1023 -> 1024 -> 1025 tokens: more blocks than n to choose from)."""
    pre, steps = [0, 29, 61, 509, 1021], 5
    case = Case(PAPER, [p + steps for p in pre], hq=8, hkv=2, dk=8, dv=4, seed=1)
    _steps(case, layout, pre, steps, capacity=1100)


def test_multi_token_step_goes_to_the_reference():
    pre, n = [0, 3, 13], 3
    case = Case(SMALL, [p + 2 * n for p in pre], seed=2)
    cache = case.cache(5)
    case.prefill(cache, pre)
    for step in range(2):
        rows = torch.tensor([[r + i for i in range(n)] for r in case.rows([p + step * n for p in pre])])
        got = decode_step_fast(*[x[rows] for x in (case.q, case.k, case.v, case.gates)], cache, SMALL)
        assert_close(got, case.want[rows], f"n=3 step {step}", atol=ATOL)


def test_4d_single_token_keeps_the_n_axis():
    case = Case(SMALL, [5, 9])
    cache = case.cache(4)
    case.prefill(cache, [4, 8])
    rows = case.rows([4, 8])
    got = decode_step_fast(*[x[rows][:, None] for x in (case.q, case.k, case.v, case.gates)], cache, SMALL)
    assert got.shape == (2, 1, 4, 3)
    assert_close(got[:, 0], case.want[rows], "4-D one-token step", atol=ATOL)


# -- selection pieces against selection.block_scores / top_blocks ---------------------------------

@pytest.mark.parametrize("cfg", [SMALL, ODD, TIED, PAPER], ids=["small", "odd", "tied", "paper"])
def test_banded_scores_equal_block_scores(cfg):
    g = torch.Generator().manual_seed(3)
    for tc, nb in ((0, 1), (1, 1), (7, 5), (63, 17), (200, 90)):
        p = torch.rand(3, 8, tc, generator=g, dtype=torch.float64)
        assert_close(block_scores_banded(p, 2, nb, cfg), selection.block_scores(p.reshape(3, 8, tc), 2, nb, cfg),
                     f"banded scores Tc={tc} nb={nb}", atol=1e-12)


# -- the FA-2 branches' plumbing, with an emulated kvcache kernel ---------------------------------

def emulated_kvcache(q, k_cache, v_cache, cache_seqlens=None, block_table=None, softmax_scale=None,
                     causal=False, window_size=(-1, -1), return_softmax_lse=False, **_):
    """flash_attn_with_kvcache's semantics in plain torch (fp64-able): paged or dense cache, mask of
    ``contracts.fa2_mask`` with max_seqlen_k = the cache's capacity, lse +inf for an empty row."""
    from contracts.fa2_mask import fa2_mask

    B, sq, hq, _ = q.shape
    P = k_cache.shape[1]
    cap = P * (1 if block_table is None else block_table.shape[1])
    outs, lses = [], []
    for b in range(B):
        n = int(cache_seqlens[b])
        pos = torch.arange(n)
        if block_table is None:
            k, v = k_cache[b, :n], v_cache[b, :n]
        else:
            page = block_table[b, pos // P].long()
            k, v = k_cache[page, pos % P], v_cache[page, pos % P]
        g = hq // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[b], k) * softmax_scale
        s = s.masked_fill(~fa2_mask(sq, n, causal, window_size, sq, cap), -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        outs.append(torch.einsum("hqk,khd->qhd", p, v))
        lses.append(torch.where(torch.isinf(lse), math.inf, lse))
    out, lse = torch.stack(outs), torch.stack(lses)
    return (out, lse) if return_softmax_lse else out


EMULATED = KVCacheKernel(emulated_kvcache, "emulated", cuda_only=False, check_contract=False)


@pytest.mark.parametrize("layout", ["contiguous", 5])
@pytest.mark.parametrize("name", ["small", "odd"])
def test_fa2_branches_with_emulated_kernel(name, layout):
    """win and cmp through the kvcache calls (win_call / cmp_call), cmp's selection
    probabilities rebuilt from FA-2's lse: still equal to the reference and prefill."""
    telemetry.reset()
    pre, steps = [0, 3, 13, 30], 12
    case = Case(CONFIGS[name], [p + steps for p in pre], hq=8, hkv=2, seed=4)
    _steps(case, layout, pre, steps, fa2=EMULATED, capacity=64, win="fa2")
    paths = _paths()
    assert paths["win"] == paths["cmp"] == {("fa2", "emulated flash_attn_with_kvcache")}, paths
    assert paths["sel"] == {("fa2", "emulated flash_attn_with_kvcache")}, paths


def _paths() -> dict[str, set[tuple[str, str]]]:
    """telemetry -> {branch: {(path, reason), ...}} of the fast step (the reference's "reference"
    path, which the parity checks also run, left out)."""
    out: dict[str, set] = {}
    for branch, path, reason in telemetry.snapshot()["counts"]:
        if path != "reference":
            out.setdefault(branch, set()).add((path, reason))
    return out


def test_contract_refusal_falls_back_and_is_memoised(monkeypatch):
    """bf16 raw pages of 64 tokens: FA-2 refuses win (FA2-PAGED-BLOCK-SIZE), the torch path runs
    with the reason in telemetry; cmp's store is preallocated (dense) and sel's keys are gathered
    (dense), so their calls are legal and run. The contract is evaluated once per branch for all
    the steps."""
    import contracts
    from nsa_ref import decode_fast

    monkeypatch.setattr(decode_fast, "_verdicts", {})
    calls = []
    real = contracts.kvcache_reasons
    monkeypatch.setattr(contracts, "kvcache_reasons", lambda *a, **k: calls.append(1) or real(*a, **k))
    kernel = KVCacheKernel(emulated_kvcache, "strict-emulated", cuda_only=False)
    telemetry.reset()
    pre = [10, 70, 0]
    case = Case(SMALL, [p + 4 for p in pre], hq=8, hkv=2, dk=16, dv=16, seed=5, dtype=torch.bfloat16)
    cache = case.cache(64, capacity=128)
    case.prefill(cache, pre)
    for step in range(4):
        rows = case.rows([p + step for p in pre])
        decode_step_fast(*[x[rows].to(torch.bfloat16) for x in (case.q, case.k, case.v, case.gates)],
                         cache, SMALL, fa2=kernel)
    assert len(calls) == 3, "one verdict per call geometry (win, cmp, sel), not per step"
    paths = _paths()
    # win="auto": Triton first (refused here: no CUDA, no interpreter), then FA-2 (refused by the contract)
    ((path, reason),) = paths["win"]
    assert path == "torch" and reason.endswith("; contract: FA2-PAGED-BLOCK-SIZE"), paths
    assert paths["cmp"] == paths["sel"] == {("fa2", "strict-emulated flash_attn_with_kvcache")}, paths


def test_resolve_kvcache():
    """Which kernel a step would use: fa2=None and torch's built-in FA-2 (no kvcache entry) give
    none, with the reason telemetry records; a callable is used as given; on a machine without
    CUDA "auto" finds no provider."""
    from nsa_ref.decode_fast import resolve_kvcache
    from nsa_ref.fa2 import get_provider

    assert resolve_kvcache(None) == (None, "fa2=None")
    assert resolve_kvcache(get_provider("torch")) == (None, "provider torch has no kvcache entry")
    kernel, why = resolve_kvcache(emulated_kvcache)
    assert kernel.fn is emulated_kvcache and not kernel.cuda_only and why == ""
    assert resolve_kvcache(EMULATED) == (EMULATED, "")
    if not torch.cuda.is_available():
        assert resolve_kvcache("auto")[0] is None


def test_verdict_of_a_legal_call_is_empty():
    cache = NSAKVCache.allocate(2, 512, 2, 64, PAPER, dtype=torch.bfloat16)
    from nsa_ref.decode_kvcache_calls import win_call

    call = win_call(torch.empty(2, 1, 8, 64, dtype=torch.bfloat16), cache.views()[0], PAPER)
    assert contract_verdict(call, KVCacheKernel(emulated_kvcache, "x")) == ()


# -- bf16 ----------------------------------------------------------------------------------------

def test_bf16_within_tolerance():
    """bf16 cache and inputs: max|fast - truth| within tolerances.yaml's bf16 out rule, truth = the
    fp64 reference on the bf16-rounded inputs, rounding baseline = decode_step_batched in bf16."""
    from conformance import assertions as A

    pre, steps = [0, 3, 13, 30], 8
    case = Case(SMALL, [p + steps for p in pre], hq=8, hkv=2, dk=16, dv=16, seed=6)
    for x in (case.q, case.k, case.v, case.gates):
        x.copy_(x.to(torch.bfloat16).double())
    lo = copy.copy(case)
    lo.dtype = torch.bfloat16
    fast, base, truth = lo.cache(5, capacity=64), lo.cache(5, capacity=64), case.cache(5, capacity=64)
    for c, who in ((fast, lo), (base, lo), (truth, case)):
        who.prefill(c, pre)
    got, want, rounded = [], [], []
    for step in range(steps):
        rows = case.rows([p + step for p in pre])
        args = [x[rows] for x in (case.q, case.k, case.v, case.gates)]
        args16 = [x.to(torch.bfloat16) for x in args]
        got.append(decode_step_fast(*args16, fast, SMALL))
        rounded.append(decode_step_batched(*args16, base, SMALL))
        want.append(decode_step_batched(*args, truth, SMALL))
    got, want, rounded = (torch.cat(x) for x in (got, want, rounded))
    assert got.dtype == torch.bfloat16
    A.assert_close(got, want, rounded, rule="DECODE-FAST-BF16", dtype=torch.bfloat16)


# -- no host read during the step ----------------------------------------------------------------

class _NoHostRead(torch.utils._python_dispatch.TorchDispatchMode):
    """Raises on the ops that read a tensor's value to the host or give a value-dependent shape."""

    BANNED = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
              "unique_consecutive", "unique_dim", "item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.BANNED:
            raise AssertionError(f"host read / data-dependent shape in the step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fa2", [None, KVCacheKernel(lambda *a, **k: None, "cuda-only")], ids=["torch", "fa2-on-cpu"])
@pytest.mark.parametrize("layout", ["contiguous", 5])
def test_step_reads_nothing_from_the_device(monkeypatch, layout, fa2):
    """After one eager step (memoised band and verdicts), a whole step with validate="shapes"
    (append included) calls no .item() / .tolist() / bool() / nonzero: the torch path is sync-free."""
    pre = [0, 3, 13, 30]
    case = Case(SMALL, [p + 3 for p in pre], hq=8, hkv=2)
    cache = case.cache(layout, capacity=64)
    case.prefill(cache, pre)

    def step(i):
        rows = case.rows([p + i for p in pre])
        return decode_step_fast(*[x[rows] for x in (case.q, case.k, case.v, case.gates)], cache, SMALL,
                                fa2=fa2, validate="shapes")

    step(0)

    def banned(*_a, **_k):
        raise AssertionError("host read in the step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, banned)
    with _NoHostRead():
        out = step(1)
    monkeypatch.undo()
    rows = case.rows([p + 1 for p in pre])
    assert_close(out, case.want[rows], "sync-free step", atol=ATOL)


def test_attend_shapes_do_not_depend_on_lengths():
    """decode_attend_fast over the same cache geometry at lengths 1 (nothing compressed yet),
    9, 25 and 39 runs the same ops on the same shapes (what a CUDA graph needs)."""
    seen = []

    class Shapes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            seen[-1].append((str(func), shapes))
            return out

    case = Case(SMALL, [40, 40], hq=8, hkv=2)
    cache = case.cache(5, capacity=40)
    case.prefill(cache, [0, 0])
    for t in range(40):
        rows = case.rows([t, t])
        cache.append(case.k[rows], case.v[rows])
        if t == 0:  # eager warm-up: memoises the selection band (as before a graph capture)
            decode_attend_fast(case.q[rows], case.gates[rows], cache, SMALL, fa2=None)
        if t in (1, 9, 25, 39):
            seen.append([])
            with Shapes():
                decode_attend_fast(case.q[rows], case.gates[rows], cache, SMALL, fa2=None)
    assert all(s == seen[0] for s in seen[1:])


# -- the step with the device-side append (CapturedDecodeStep; eager on the CPU) -----------------

@pytest.mark.parametrize("layout", ["contiguous", 3, 5], ids=lambda x: f"page{x}" if x != "contiguous" else x)
@pytest.mark.parametrize("name", ["small", "odd"])
def test_captured_step_equals_prefill(name, layout):
    """append_static (the raw token and the last compressed block of every sequence rewritten on
    the device) + decode_attend_fast, run as CapturedDecodeStep (graph=False): equal to prefill for
    20 steps from prompts 0, 3, 13, 30, host and device lengths and the cache contents as after
    the eager append."""
    pre, steps = [0, 3, 13, 30], 20
    case = Case(CONFIGS[name], [p + steps for p in pre], hq=8, hkv=2, seed=11)
    cache, eager = case.cache(layout, capacity=64, poison=True), case.cache(layout, capacity=64, poison=True)
    case.prefill(cache, pre)
    case.prefill(eager, pre)
    step = None
    for i in range(steps):
        rows = case.rows([p + i for p in pre])
        args = [x[rows] for x in (case.q, case.k, case.v, case.gates)]
        step = step or CapturedDecodeStep(cache, case.cfg, *args, fa2=None, graph=False)
        got = step(*args)
        eager.append(args[1], args[2])
        assert_close(got, case.want[rows], f"captured step {i}", atol=ATOL)
        assert cache.lengths == eager.lengths and cache.num_cmp_blocks == eager.num_cmp_blocks
        assert torch.equal(cache.cache_seqlens, eager.cache_seqlens)
        assert torch.equal(cache.cmp.cache_seqlens, eager.cmp.cache_seqlens)
    for b in range(len(pre)):
        for x, y in zip(cache.sequence(b), eager.sequence(b)):
            assert torch.equal(x, y), f"cache contents of sequence {b}"


def test_captured_step_refusals():
    case = Case(SMALL, [10, 10])
    cache = case.cache("contiguous", capacity=10)
    case.prefill(cache, [8, 9])
    args = [x[case.rows([8, 9])] for x in (case.q, case.k, case.v, case.gates)]
    step = CapturedDecodeStep(cache, SMALL, *args, fa2=None, graph=False)
    step(*args)
    before = _bytes(cache)
    with pytest.raises(CacheCapacityError, match="sequence 1 holds 10 of 10"):
        step(*args)
    with pytest.raises(ValueError, match=r"q must be \(2, 4, 5\) torch.float64 on cpu as captured"):
        step(args[0][:1], *args[1:])
    with pytest.raises(ValueError, match=r"gates must be .* as captured, got .*torch.float32"):
        step(*args[:3], args[3].float())
    assert _same(before, _bytes(cache))
    with pytest.raises(ValueError, match="one token per sequence"):
        CapturedDecodeStep(cache, SMALL, *[x[:, None].expand(2, 2, *x.shape[1:]) for x in args], graph=False)
    table = torch.tensor([[0, 1], [-1, 2]], dtype=torch.int32)  # sequence 1: no page for compressed slot 0
    paged = NSAKVCache.allocate_paged(torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), 4, 5, 2, 5, SMALL,
                                      v_head_dim=3, dtype=torch.float64, cmp_block_table=table,
                                      cmp_num_pages=3, cmp_page_size=2)
    with pytest.raises(KVCacheError, match="compressed slot 0"):
        CapturedDecodeStep(paged, SMALL, *args, graph=False)


def test_captured_step_reads_nothing_from_the_device(monkeypatch):
    pre = [0, 3, 13, 30]
    case = Case(SMALL, [p + 3 for p in pre], hq=8, hkv=2)
    cache = case.cache(5, capacity=64)
    case.prefill(cache, pre)
    args = [[x[case.rows([p + i for p in pre])] for x in (case.q, case.k, case.v, case.gates)] for i in range(3)]
    step = CapturedDecodeStep(cache, SMALL, *args[0], fa2=None, graph=False)
    step(*args[0])
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError("host read")))
    with _NoHostRead():
        out = step(*args[1])
    monkeypatch.undo()
    assert_close(out, case.want[case.rows([p + 1 for p in pre])], "sync-free captured step", atol=ATOL)


# -- refusals: those of decode_step_batched, nothing written --------------------------------------

@pytest.mark.parametrize("edit, error, pattern, named", REFUSALS, ids=REFUSAL_IDS)
def test_refusals_are_those_of_the_reference(edit, error, pattern, named):
    """The reference's refusals (test_decode_batched.REFUSALS), named after this step, nothing written."""
    cache, before, args = refused_step_args(Case(SMALL, [10, 10, 10]), edit)
    with pytest.raises(error, match=pattern) as caught:
        decode_step_fast(*args, cache, SMALL)
    assert not named or str(caught.value).startswith("decode_step_fast: ")
    assert _same(before, _bytes(cache)), "a refused step changed the cache"


def test_capacity_and_config_refusals():
    case = Case(SMALL, [10, 10])
    cache = case.cache("contiguous", capacity=10)
    case.prefill(cache, [9, 10])
    before = _bytes(cache)
    args = [x[case.rows([9, 9])] for x in (case.q, case.k, case.v, case.gates)]
    with pytest.raises(CacheCapacityError, match="sequence 1 holds 10 of 10"):
        decode_step_fast(*args, cache, SMALL)
    with pytest.raises(KVCacheError, match="decode_step_fast: cfg .* differs from the cache"):
        decode_step_fast(*args, cache, ODD)
    with pytest.raises(ValueError, match="validate must be one of"):
        decode_step_fast(*args, cache, SMALL, validate="none")
    assert _same(before, _bytes(cache))


# -- the device benchmark's CPU smoke mode -------------------------------------------------------

def _bench_script():
    path = Path(__file__).resolve().parents[2] / "conformance" / "tools" / "device" / "decode_bench.py"
    spec = importlib.util.spec_from_file_location("decode_bench", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_decode_bench_fill_equals_prefill():
    """The benchmark's direct page fill (random tokens, compressed blocks = their means) holds what
    prefill of the same tokens would hold."""
    script = _bench_script()
    cfg = script.TINY_CFG
    filled = NSAKVCache.allocate(3, 200, 2, 16, cfg, dtype=torch.float64)
    script.fill_cache(filled, 150, torch.Generator().manual_seed(0))
    seqs = [filled.sequence(b) for b in range(3)]
    prefilled = NSAKVCache.allocate(3, 200, 2, 16, cfg, dtype=torch.float64)
    prefilled.prefill(torch.cat([s[0] for s in seqs]), torch.cat([s[1] for s in seqs]),
                      torch.arange(0, 451, 150, dtype=torch.int32))
    assert filled.lengths == prefilled.lengths and filled.num_cmp_blocks == prefilled.num_cmp_blocks == [36] * 3
    for b in range(3):
        for x, y in zip(seqs[b], prefilled.sequence(b)):
            assert torch.equal(x, y)


def test_decode_bench_tiny_cpu(tmp_path, capsys):
    script = _bench_script()
    script.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--plot"])
    rows = json.loads((tmp_path / "decode_bench.json").read_text())["rows"]
    assert rows and all(r["status"] == "ok" for r in rows), rows
    assert (tmp_path / "decode_bench.csv").exists()
    assert all(r["max_abs_diff_vs_reference"] < 1e-4 for r in rows), rows
    assert "tokens/s" in capsys.readouterr().out


# -- GPU ---------------------------------------------------------------------------------------

def _gpu_case(B=4, pre=(0, 300, 1030, 2000), hq=16, hkv=4, d=128, page_size=256, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    cap = 2304
    max_pages = cap // page_size
    table = torch.randperm(B * max_pages, device="cuda", generator=g).to(torch.int32).reshape(B, max_pages)
    caches = [NSAKVCache.allocate_paged(table.clone(), B * max_pages, page_size, hkv, d, PAPER,
                                        dtype=torch.bfloat16) for _ in range(2)]
    T = sum(pre)
    k = torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0, *torch.tensor(pre).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    for c in caches:
        c.prefill(k, v, cu)

    def inputs(step):
        gs = torch.Generator(device="cuda").manual_seed(1000 + step)
        return (torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16, generator=gs),
                torch.randn(B, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gs),
                torch.randn(B, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gs),
                torch.rand(B, hq, 3, device="cuda", dtype=torch.bfloat16, generator=gs))
    return caches, inputs


def _bf16_close(got, want, what):
    """bf16 fast (fp32 accumulation) vs the bf16 reference (bf16 einsums): within 2e-2 except
    where a near-tie in the selection scores (fp32, summed in another order: FA-2's lse vs the
    reference softmax) picks another block for one (sequence, KV head): at most 1 in 1000
    entries, and none off by more than 0.5."""
    err = (got.float() - want.float()).abs()
    bad = (err > 2e-2).float().mean().item()
    assert bad <= 1e-3 and err.max().item() < 0.5, \
        f"{what}: max|fast - reference| = {err.max().item():.3g}, {bad:.2%} of entries above 2e-2"


@pytest.mark.gpu
@pytest.mark.parametrize("fa2", ["auto", None], ids=["flash_attn-if-importable", "torch-path"])
def test_gpu_fast_equals_reference(fa2):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    telemetry.reset()
    (fast, ref), inputs = _gpu_case()
    for step in range(6):
        args = inputs(step)
        got = decode_step_fast(*args, fast, PAPER, fa2=fa2)
        want = decode_step_batched(*args, ref, PAPER)
        _bf16_close(got, want, f"step {step}")
    paths = _paths()
    # win="auto": the Triton window kernel on an sm80+ GPU (FA-2's windowed kvcache call: win="fa2")
    assert paths["win"] == {("triton", "triton decode_win")}, paths
    if importlib.util.find_spec("flash_attn") is not None and fa2 is not None:
        assert paths["cmp"] == {("fa2", "flash_attn flash_attn_with_kvcache")}, paths
    # select="auto": the Triton decode kernels take the selection and sel on an sm80+ GPU
    assert paths["select"] == {("triton", "triton decode_select")}, paths
    assert paths["sel"] == {("triton", "triton decode_sel")}, paths


@pytest.mark.gpu
@pytest.mark.parametrize("win", ["fa2", "torch"])
def test_gpu_window_paths_equal_reference(win):
    """The window through FA-2's windowed kvcache call (win="fa2", where flash_attn is importable)
    or the torch gather (win="torch") instead of the Triton kernel: the step still equals the
    reference, and telemetry names the path taken."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    telemetry.reset()
    (fast, ref), inputs = _gpu_case(seed=3)
    for step in range(6):
        args = inputs(step)
        _bf16_close(decode_step_fast(*args, fast, PAPER, win=win), decode_step_batched(*args, ref, PAPER), f"step {step}")
    want = "fa2" if win == "fa2" and importlib.util.find_spec("flash_attn") is not None else "torch"
    assert {p for p, _ in _paths()["win"]} == {want}, _paths()


@pytest.mark.gpu
@pytest.mark.parametrize("fa2", ["auto", None], ids=["flash_attn-if-importable", "torch-path"])
def test_gpu_captured_whole_step_equals_reference(fa2):
    """CapturedDecodeStep (append included in the graph) for 40 steps (compressed blocks emitted on
    the way) against decode_step_batched on a twin cache; lengths and block counts agree."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    (graphed, ref), inputs = _gpu_case(seed=2)
    step = CapturedDecodeStep(graphed, PAPER, *inputs(0), fa2=fa2)
    assert step.graph is not None
    for i in range(40):
        args = inputs(i)
        got = step(*args).clone()
        want = decode_step_batched(*args, ref, PAPER)
        _bf16_close(got, want, f"step {i}")
        assert graphed.lengths == ref.lengths and graphed.num_cmp_blocks == ref.num_cmp_blocks
    assert torch.equal(graphed.cache_seqlens, ref.cache_seqlens)
    assert torch.equal(graphed.cmp.cache_seqlens, ref.cmp.cache_seqlens)


@pytest.mark.gpu
@pytest.mark.parametrize("fa2", ["auto", None], ids=["flash_attn-if-importable", "torch-path"])
def test_gpu_cuda_graph_replay_equals_eager(fa2):
    """Capture decode_attend_fast once; per step: copy the new q / gates into the static inputs,
    append k / v eagerly (in place), replay; the output equals the eager step on a twin cache."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    (graphed, eager), inputs = _gpu_case(seed=1)
    q0, k0, v0, g0 = inputs(0)
    static_q, static_g = q0.clone(), g0.clone()
    for c in (graphed, eager):
        c.append(k0, v0)
    decode_attend_fast(static_q, static_g, graphed, PAPER, fa2=fa2)  # warm-up: memos, kernels
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attend_fast(static_q, static_g, graphed, PAPER, fa2=fa2)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = decode_attend_fast(static_q, static_g, graphed, PAPER, fa2=fa2)
    for step in range(1, 6):
        q, k, v, g = inputs(step)
        graphed.append(k, v)
        static_q.copy_(q)
        static_g.copy_(g)
        graph.replay()
        want = decode_step_fast(q, k, v, g, eager, PAPER, fa2=fa2, validate="shapes")
        torch.cuda.synchronize()
        assert torch.allclose(static_out.float(), want.float(), atol=1e-2, rtol=0), f"step {step}"


# -- GPU: the Triton decode selection (nsa_ref.triton_kernels.decode_select) ----------------------

def _gpu_selection_pair(cache, q, cfg, lse):
    """(Triton block_idx, torch block_idx) for the last token of every sequence of ``cache``."""
    from nsa_ref.decode_torch_path import cmp_probs_from_lse, cmp_torch, cmp_width
    from nsa_ref.triton_kernels.decode_select import decode_select

    raw, cmp = cache.views()
    width = cmp_width(raw, cmp, cfg)
    got = decode_select(q, cmp, raw.cache_seqlens, cfg, width=width, lse=lse)
    p = cmp_probs_from_lse(q, lse, cmp, width, cfg) if lse is not None else cmp_torch(q, cmp, width, cfg)[1]
    scores = block_scores_banded(p, raw.k_pages.shape[2], cfg.num_sel_blocks(raw.capacity), cfg)
    return got, selection.top_blocks(scores, cache.cache_seqlens.long() - 1, cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("lse_from", ["kernel", "torch-lse"])
def test_gpu_triton_selection_equals_torch_selection(lse_from):
    """bf16, Hq 64 / Hkv 4 / D 128, paper config, paged raw pages of 256, 32 sequences of 1..16K
    tokens: decode_select's block_idx equals decode_fast's torch selection except in rows where
    two scores tie within fp32 rounding (summation order differs; at most 2 of the 128 (sequence,
    KV head) rows may differ); every row strictly ascending, -1 padding last, min(n, c + 1) blocks."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(21)
    B, hq, hkv, d, P, cap = 32, 64, 4, 128, 256, 16384
    lengths = [1, 31, 32, 63, 64, 1023, 1024, 1025, 4096, 16384] + [int(x) for x in torch.randint(
        1, cap + 1, (B - 10,), generator=torch.Generator().manual_seed(3))]
    table = torch.randperm(B * (cap // P), device="cuda", generator=g).to(torch.int32).reshape(B, cap // P)
    cache = NSAKVCache.allocate_paged(table, B * (cap // P), P, hkv, d, PAPER, dtype=torch.bfloat16)
    T = sum(lengths)
    k = torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    cache.prefill(k, k, torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda"))
    q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    lse = None
    if lse_from == "torch-lse":
        from nsa_ref.decode_torch_path import cmp_keys, cmp_width, scores_fp32

        raw, cmp = cache.views()
        kk, _, emitted = cmp_keys(cmp, cmp_width(raw, cmp, PAPER))
        s = scores_fp32(q.reshape(B, hkv, hq // hkv, d), kk.transpose(1, 2)) * PAPER.softmax_scale(d)
        lse = torch.logsumexp(s.masked_fill(~emitted[:, None, None, :], -math.inf), -1).reshape(B, hq).float()
    got, want = _gpu_selection_pair(cache, q, PAPER, lse)
    differ = (got != want).any(-1)
    assert differ.sum().item() <= 2, (differ.sum().item(), got[differ][:2].tolist(), want[differ][:2].tolist())
    listed = got >= 0
    assert (listed[..., :-1] | ~listed[..., 1:]).all() and (got[..., 1:] > got[..., :-1])[listed[..., 1:]].all()
    assert (listed.sum(-1) == torch.tensor([min(PAPER.n_sel, (n - 1) // 64 + 1) for n in lengths],
                                           device="cuda")[:, None]).all()
    # the Triton sel kernel over the paged raw cache vs sel_gather + attend_fixed, same blocks
    from nsa_ref.decode_torch_path import attend_fixed, sel_gather
    from nsa_ref.triton_kernels.decode_sel import decode_sel

    raw = cache.views()[0]
    o = decode_sel(q, raw, raw.cache_seqlens, want, PAPER)
    kk, vv, valid = sel_gather(cache.cache_seqlens.long() - 1, want, raw, PAPER)
    _bf16_close(o, attend_fixed(q, kk, vv, valid, PAPER.softmax_scale(d))[0], "decode_sel vs torch sel")


@pytest.mark.gpu
def test_gpu_triton_selection_step_and_graph():
    """decode_step_fast with select="triton" vs select="torch" on twin caches (6 steps, bf16
    closeness as the other GPU tests), then CapturedDecodeStep with select="triton" (the decode
    selection and sel kernels inside the CUDA graph) for 20 steps against decode_step_batched;
    telemetry names the kernels."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    telemetry.reset()
    (a, b), inputs = _gpu_case(seed=5)
    for i in range(6):
        args = inputs(i)
        got = decode_step_fast(*args, a, PAPER, select="triton")
        want = decode_step_fast(*args, b, PAPER, select="torch")
        _bf16_close(got, want, f"step {i}")
    assert ("triton", "triton decode_select") in _paths()["select"], _paths()
    assert ("triton", "triton decode_sel") in _paths()["sel"], _paths()
    (graphed, ref), inputs = _gpu_case(seed=6)
    step = CapturedDecodeStep(graphed, PAPER, *inputs(0), select="triton")
    assert step.graph is not None
    for i in range(20):
        args = inputs(i)
        got = step(*args).clone()
        _bf16_close(got, decode_step_batched(*args, ref, PAPER), f"graph step {i}")


def test_steps_left_is_what_the_append_checks_allow():
    """NSAKVCache.steps_left() = the largest h such that h more tokens per sequence pass the
    capacity and page checks of both stores (raw and compressed), over random paged tables with
    unassigned pages (-1) and ragged lengths; 0 when some sequence has no room."""
    from nsa_ref.kv_cache import KVCacheError

    g = torch.Generator().manual_seed(0)
    checked = []
    for trial in range(40):
        P, Pc, max_pages, B = 5, 2, 6, 3
        raw = torch.randperm(B * max_pages + 2, generator=g)[: B * max_pages].to(torch.int32).reshape(B, max_pages)
        cut = torch.randint(1, max_pages + 1, (B,), generator=g)
        raw[torch.arange(max_pages)[None, :] >= cut[:, None]] = -1
        cmp = torch.randperm(B * 6 + 1, generator=g)[: B * 6].to(torch.int32).reshape(B, 6)
        ccut = torch.randint(1, 7, (B,), generator=g)
        cmp[torch.arange(6)[None, :] >= ccut[:, None]] = -1
        cache = NSAKVCache.allocate_paged(raw, B * max_pages + 2, P, 1, 2, SMALL, dtype=torch.float64,
                                          cmp_block_table=cmp, cmp_num_pages=B * 6 + 1, cmp_page_size=Pc)
        limit = [min(int(c) * P, (int(cc) * Pc - 1) * SMALL.block_stride + SMALL.block_len) for c, cc in zip(cut, ccut)]
        lengths = [int(torch.randint(0, max(lim, 1), (1,), generator=g)) for lim in limit]
        lengths = [min(n, lim) for n, lim in zip(lengths, limit)]
        if trial % 4 == 0:  # one sequence exactly at its limit: no room at all
            lengths[trial % B] = limit[trial % B]
        try:
            cache._check_room(lengths)
        except KVCacheError:
            continue
        cache.raw.set_lengths(lengths)
        cache.cmp.set_lengths([SMALL.num_cmp_blocks(n) for n in lengths])
        h = cache.steps_left()
        checked.append(h)
        cache._check_room([n + h for n in lengths])  # h more tokens fit
        with pytest.raises(KVCacheError):
            cache._check_room([n + h + 1 for n in lengths])
    assert len(checked) >= 20 and 0 in checked and max(checked) >= 5, checked


def test_captured_step_checks_room_once_per_span(monkeypatch):
    """CapturedDecodeStep runs the O(B) room check once, then counts steps: 5 steps on a cache
    with room for 6 check once; a truncate (new host lists) makes the next step check again; the
    seventh token still raises the capacity error."""
    from nsa_ref import decode_graph

    checks = []
    real = decode_graph.check_static_append
    monkeypatch.setattr(decode_graph, "check_static_append", lambda c: checks.append(1) or real(c))
    case = Case(SMALL, [20, 20])
    cache = case.cache("contiguous", capacity=14)
    case.prefill(cache, [8, 8])
    args = [x[case.rows([8, 9])] for x in (case.q, case.k, case.v, case.gates)]
    step = CapturedDecodeStep(cache, SMALL, *args, fa2=None, graph=False)
    checks.clear()
    for _ in range(5):
        step(*args)
    assert len(checks) == 1 and cache.lengths == [13, 13]
    cache.truncate([12, 12])
    step(*args)
    step(*args)
    assert len(checks) == 2 and cache.lengths == [14, 14]
    with pytest.raises(CacheCapacityError, match="holds 14 of 14"):
        step(*args)
