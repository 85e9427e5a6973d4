"""decode_step_batched over an NSAKVCache equals prefill at every position (fp64, ~1e-12).

Prefill is ``nsa_attention(..., backend="reference")`` over the whole sequences: by causality its
row at position t is the prefill of the prefix 0..t. Ragged batches (lengths 0, < l, several
blocks), contiguous and paged layouts whose page sizes do and do not divide l, d, l', w, the
paper config and a tied one (l = d = l'), one and several tokens per step.
"""
from __future__ import annotations

import pytest
import torch

from nsa_ref import NSAConfig, nsa_attention
from nsa_ref.decode_batched import decode_step_batched
from nsa_ref.kv_cache import CacheCapacityError, KVCacheError, NSAKVCache
from nsa_ref_testkit import ODD, SMALL, assert_close

TIED = NSAConfig(block_len=8, block_stride=8, sel_block=8, n_sel=3, n_init=1, n_local=1, window=6)
PAPER = NSAConfig()
CONFIGS = {"small": SMALL, "odd": ODD, "tied": TIED}
ATOL = 1e-10


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist(), dtype=torch.int32)


class Case:
    """B sequences of lengths ``full``, fp64, and their prefill output (T, Hq, Dv)."""

    def __init__(self, cfg, full, hq=4, hkv=2, dk=5, dv=3, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        T = sum(full)
        self.cfg, self.full, self.hkv, self.dk, self.dv = cfg, list(full), hkv, dk, dv
        self.q = torch.randn(T, hq, dk, generator=g, dtype=torch.float64)
        self.k = torch.randn(T, hkv, dk, generator=g, dtype=torch.float64)
        self.v = torch.randn(T, hkv, dv, generator=g, dtype=torch.float64)
        self.gates = torch.rand(T, hq, 3, generator=g, dtype=torch.float64)
        self.starts = _cu(full)[:-1].tolist()
        self.want = nsa_attention(self.q, self.k, self.v, self.gates, cfg, _cu(full), backend="reference")
        self.dtype = dtype

    def rows(self, positions) -> list[int]:
        """positions: per sequence -> packed row indices."""
        return [s + p for s, p in zip(self.starts, positions)]

    def cache(self, layout, capacity=None, poison=False) -> NSAKVCache:
        B, cap = len(self.full), capacity or max(self.full, default=1)
        kw = dict(v_head_dim=self.dv, dtype=self.dtype)
        if layout == "contiguous":
            cache = NSAKVCache.allocate(B, cap, self.hkv, self.dk, self.cfg, **kw)
        else:
            max_pages = -(-cap // layout)
            num_pages = B * max_pages + 2
            perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(7))[: B * max_pages]
            table = perm.to(torch.int32).reshape(B, max_pages)
            cache = NSAKVCache.allocate_paged(table, num_pages, layout, self.hkv, self.dk, self.cfg, **kw)
        if poison:  # what the pools hold outside the sequences must never be read
            for store in (cache.raw, cache.cmp):
                store.k_pages.fill_(float("nan"))
                store.v_pages.fill_(float("nan"))
        return cache

    def prefill(self, cache, pre) -> None:
        rows = torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, pre)])
        cache.prefill(self.k[rows].to(self.dtype), self.v[rows].to(self.dtype), _cu(pre))

    def step(self, cache, positions, n=1):
        """Decode tokens positions[b] .. positions[b] + n - 1 of every sequence -> (got, want)."""
        rows = torch.tensor([[r + i for i in range(n)] for r in self.rows(positions)])
        args = [x[rows].to(self.dtype) for x in (self.q, self.k, self.v, self.gates)]
        if n == 1:
            args = [x[:, 0] for x in args]
        got = decode_step_batched(*args, cache, self.cfg)
        want = self.want[rows]
        return got, (want[:, 0] if n == 1 else want)


def _decode(case: Case, cache, pre, steps, n=1) -> float:
    """Prefill ``pre`` tokens per sequence, then ``steps`` steps of n tokens; -> max error."""
    case.prefill(cache, pre)
    worst = 0.0
    for step in range(steps):
        positions = [p + step * n for p in pre]
        got, want = case.step(cache, positions, n)
        assert_close(got, want, f"decode vs prefill, step {step}, positions {positions}", atol=ATOL)
        worst = max(worst, (got - want).abs().max().item())
    assert cache.lengths == [p + steps * n for p in pre]
    return worst


@pytest.mark.parametrize("layout", ["contiguous", 3, 4, 5, 16], ids=lambda x: f"page{x}" if x != "contiguous" else x)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_ragged_decode_equals_prefill_every_step(name, layout):
    """Prefill lengths 0, 3 (< l), 13, 30, then 20 one-token steps for all four at once."""
    cfg, pre, steps = CONFIGS[name], [0, 3, 13, 30], 20
    case = Case(cfg, [p + steps for p in pre])
    _decode(case, case.cache(layout, poison=True), pre, steps)


@pytest.mark.parametrize("layout", ["contiguous", 7])
def test_paper_config_ragged_decode_equals_prefill(layout):
    """l, d, l', n, w = 32, 16, 64, 16, 512: selection has more than n blocks to choose from
    (> 1024 tokens) and the window is full; lengths 0 and 20 (< l) ride along."""
    pre, steps = [0, 20, 600, 1090], 4
    case = Case(PAPER, [p + steps for p in pre], hq=4, hkv=2, dk=8, dv=4, seed=1)
    _decode(case, case.cache(layout, poison=True), pre, steps)


@pytest.mark.parametrize("name", ["small", "odd"])
@pytest.mark.parametrize("n", [2, 3])
def test_multi_token_steps_equal_prefill(name, n):
    """n tokens per sequence per step (speculative decoding): causal among themselves."""
    cfg, pre, steps = CONFIGS[name], [0, 3, 13, 30], 7
    case = Case(cfg, [p + steps * n for p in pre], seed=2)
    _decode(case, case.cache(5), pre, steps, n=n)


@pytest.mark.parametrize("hq, hkv", [(2, 2), (6, 2)], ids=["G1", "G3"])
def test_decode_from_empty_cache_equals_prefill(hq, hkv):
    case = Case(SMALL, [26, 26], hq=hq, hkv=hkv, seed=3)
    _decode(case, case.cache(3), [0, 0], 26)


def test_prefill_then_decode_equals_decode_from_empty():
    """Same tokens: prefill 13 then decode, or decode all from position 0 -> same outputs at
    every decoded position and the same cache contents."""
    case = Case(ODD, [30, 30, 30], seed=4)
    a, b = case.cache(4), case.cache("contiguous")
    case.prefill(a, [13, 13, 13])
    for t in range(13):
        case.step(b, [t] * 3)
    for t in range(13, 30):
        got_a, want = case.step(a, [t] * 3)
        got_b, _ = case.step(b, [t] * 3)
        assert_close(got_a, got_b, f"prefill-then-decode vs decode-from-empty at t={t}", atol=1e-12)
        assert_close(got_a, want, f"vs prefill at t={t}", atol=ATOL)
    for s in range(3):
        for x, y in zip(a.sequence(s), b.sequence(s)):
            assert_close(x, y, f"cache contents of sequence {s}", atol=1e-15)


def test_no_future_or_cross_sequence_leak():
    """Changing a later token of a multi-token step, or another sequence's token, leaves the
    earlier queries' outputs bit for bit the same."""
    base = Case(SMALL, [24, 24], seed=5)
    changed = Case(SMALL, [24, 24], seed=5)
    # Last token of the 3-token step at positions 15..17 of sequence 0, and all of sequence 1 there.
    for x in (changed.q, changed.k, changed.v):
        x[17] += 3.0
        x[24 + 15: 24 + 18] -= 2.0
    outs = []
    for case in (base, changed):
        cache = case.cache(3)
        case.prefill(cache, [15, 15])
        outs.append(case.step(cache, [15, 15], n=3)[0])
    assert torch.equal(outs[0][0, :2], outs[1][0, :2]), "a later token of the step leaked into earlier ones"
    assert not torch.equal(outs[0][0, 2], outs[1][0, 2])
    assert not torch.equal(outs[0][1], outs[1][1])


def test_fp32_cache_within_fp32_tolerance():
    case = Case(SMALL, [0 + 12, 9 + 12, 25 + 12], dtype=torch.float32, seed=6)
    cache = case.cache(5)
    case.prefill(cache, [0, 9, 25])
    for step in range(12):
        got, want = case.step(cache, [0 + step, 9 + step, 25 + step])
        assert got.dtype == torch.float32
        assert_close(got, want, f"fp32 step {step}", atol=2e-5)


# -- refusals: nothing of the step happens --------------------------------------------------------

def _bytes(cache):
    return [t.clone() for s in (cache.raw, cache.cmp) for t in (s.k_pages, s.v_pages, s.cache_seqlens)] + [cache.lengths]


def _same(a, b):
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


#: (edit of (q, k_new, v_new, gates), error, message pattern, whether the message names the step
#: function) -- also the refusals of decode_step_fast (tests/nsa_ref/test_decode_fast.py).
REFUSALS = [
    (lambda a: [a[0][:2], *a[1:]], ValueError, r"same \(B, n\)", True),
    (lambda a: [a[0][:2], a[1][:2], a[2][:2], a[3][:2]], KVCacheError, r"has 2.*B = 3", False),
    (lambda a: [*a[:3], a[3][..., :2]], ValueError, r"gates must be", False),
    (lambda a: [*a[:3], a[3] + 1.5], ValueError, r"\[0, 1\]", False),
    (lambda a: [a[0], a[1][:, None], *a[2:]], ValueError, r"all be 3-D .* or all 4-D", True),
    (lambda a: [x.float() for x in a], TypeError, r"holds torch.float64", False),
]
REFUSAL_IDS = ["B-q", "B-cache", "gates-shape", "gates-range", "rank", "dtype"]


def refused_step_args(case: "Case", edit):
    """A cache prefilled to [4, 0, 9] (3 sequences), its bytes, and the edited step arguments."""
    cache = case.cache(3)
    case.prefill(cache, [4, 0, 9])
    rows = case.rows([4, 0, 9])
    return cache, _bytes(cache), edit([x[rows] for x in (case.q, case.k, case.v, case.gates)])


@pytest.mark.parametrize("edit, error, pattern, named", REFUSALS, ids=REFUSAL_IDS)
def test_refused_step_leaves_cache_unchanged(edit, error, pattern, named):
    cache, before, args = refused_step_args(Case(SMALL, [10, 10, 10]), edit)
    with pytest.raises(error, match=pattern) as caught:
        decode_step_batched(*args, cache, SMALL)
    assert not named or str(caught.value).startswith("decode_step_batched: ")
    assert _same(before, _bytes(cache)), "a refused step changed the cache"


def test_step_past_capacity_and_config_mismatch_are_refused():
    case = Case(SMALL, [10, 10])
    cache = case.cache("contiguous", capacity=10)
    case.prefill(cache, [9, 10])
    before = _bytes(cache)
    rows = case.rows([9, 9])
    args = [x[rows] for x in (case.q, case.k, case.v, case.gates)]
    with pytest.raises(CacheCapacityError, match="sequence 1 holds 10 of 10"):
        decode_step_batched(*args, cache, SMALL)
    with pytest.raises(KVCacheError, match="differs from the cache"):
        decode_step_batched(*args, cache, ODD)
    assert _same(before, _bytes(cache))


def test_reset_slot_starts_a_new_sequence_while_the_other_continues():
    """Continuous batching: slot 0 finishes sequence A and starts C from empty (reset), slot 1
    keeps decoding B; both equal prefill throughout, on poisoned pages."""
    case = Case(TIED, [12, 30, 16], seed=8)  # A, B, C
    table = torch.tensor([[4, 0, 7, 2, 9, 5, 11, 1, 3, 12], [6, 13, 8, 10, 14, 15, 16, 17, 18, 19]], dtype=torch.int32)
    two = NSAKVCache.allocate_paged(table, 20, 3, case.hkv, case.dk, TIED, v_head_dim=case.dv, dtype=torch.float64)
    for store in (two.raw, two.cmp):
        store.k_pages.fill_(float("nan"))
        store.v_pages.fill_(float("nan"))
    a, b, c = case.starts

    def step(rows):
        got = decode_step_batched(case.q[rows], case.k[rows], case.v[rows], case.gates[rows], two, TIED)
        assert_close(got, case.want[rows], f"rows {rows}", atol=ATOL)

    for t in range(12):
        step([a + t, b + t])
    two.reset([0])
    assert two.lengths == [0, 12] and two.num_cmp_blocks[0] == 0
    assert two.cache_seqlens.tolist() == [0, 12]
    for t in range(16):
        step([c + t, b + 12 + t])
    with pytest.raises(KVCacheError, match="sequence index 2 is outside 0..1"):
        two.reset([2])


def test_timing_script_runs_and_both_decoders_agree(capsys):
    """conformance/tools/device/decode_step_timing.py on tiny shapes: one table row per context, the
    reference (decode_step_batched) and the fast step agreeing to fp32 rounding."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "conformance" / "tools" / "device" / "decode_step_timing.py"
    spec = importlib.util.spec_from_file_location("decode_step_timing", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--contexts", "40", "70", "--steps", "2", "--batch", "2", "--hq", "4", "--hkv", "2",
                 "--dk", "8", "--dv", "8"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 40 ") or line.startswith("| 70 ")]
    assert len(rows) == 2, rows
    assert all(float(r.strip(" |").split("|")[-1]) < 1e-5 for r in rows), rows


def test_speculative_rollback_with_truncate():
    """Verify 4 draft tokens per sequence in one step, accept 1, 0 and 3 of them (truncate, which
    also drops compressed blocks that ended among the rejected ones), then decode on: every
    output equals prefill of the accepted sequence. The rejected drafts are random tokens; in
    sequence 0 one of them (position 7) ended compressed block 0, which must be recomputed."""
    cfg, pre, accepted = SMALL, [6, 0, 13], [1, 0, 3]
    after = 9
    case = Case(cfg, [p + a + after for p, a in zip(pre, accepted)], seed=9)
    cache = case.cache(5, capacity=40, poison=True)
    case.prefill(cache, pre)
    g = torch.Generator().manual_seed(10)
    rows = torch.tensor([[r + i for i in range(4)] for r in case.rows(pre)])
    q, k, v, gates = (x[rows].clone() for x in (case.q, case.k, case.v, case.gates))
    for b, a in enumerate(accepted):  # draft tokens past the accepted ones are wrong guesses
        for x in (q, k, v):
            x[b, a:] = torch.randn(x[b, a:].shape, generator=g, dtype=torch.float64)
    out = decode_step_batched(q, k, v, gates, cache, cfg)
    for b, a in enumerate(accepted):
        assert_close(out[b, :a], case.want[rows[b, :a]], f"accepted drafts of sequence {b}", atol=ATOL)
    cache.truncate([p + a for p, a in zip(pre, accepted)])
    assert cache.num_cmp_blocks == [cfg.num_cmp_blocks(p + a) for p, a in zip(pre, accepted)]
    for step in range(after):
        got, want = case.step(cache, [p + a + step for p, a in zip(pre, accepted)])
        assert_close(got, want, f"after rollback, step {step}", atol=ATOL)
    with pytest.raises(KVCacheError, match=r"sequence 1 holds 9 tokens, cannot keep 10"):
        cache.truncate([0, 10, 0])
