"""Selection branch: block selection and sel attention against the brute force.

Pins (nsa_spec.md "Selection"): overlap weights w(j, i) = |cmp block i ∩ sel block j| / d;
scores summed over the G query heads of a KV head; forced blocks 0..n_init-1 and
c-n_local+1..c clipped to 0..c; top-n among j <= c with ties to the lower index; sorted,
-1 padded; query t attends tokens s of its selected blocks with s <= t.
Implementation under test: ``select_impl`` (block choice) and ``sel_impl`` (attention).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given

from conformance import assertions as A
from conformance import brute
from conformance.cases import (
    SMALL_CFG, as_params, case_strategy, default_cases, make_inputs, on_device, problem, property_settings, single,
    small_cases, tie_rtol, varlen_case,
)

pytestmark = [pytest.mark.usefixtures("nsa_cpu_threads")]

CASES = default_cases() + as_params(small_cases())


def check_select(case, select_impl, device, dtype) -> None:
    """Block indices of ``select_impl`` equal the brute force's (near-ties in ``dtype`` excepted)."""
    p = problem(case, "select", dtype)
    cfg = case.config()
    args = on_device(p.args, device)
    idx = select_impl(args["q"], args["k_cmp"], cfg, args["cu_seqlens"])
    where = f"{case} dtype={A.dtype_name(dtype)}"
    cu = p.args["cu_seqlens"]
    A.assert_selection_layout(idx, cfg, case.lengths, case.hkv, where=where, cu_seqlens=cu)
    scores = brute.selection_scores(p.args["q"].double(), p.args["k_cmp"].double(), cfg, cu)
    A.assert_block_idx(idx, p.truth, scores, cu_seqlens=cu, where=where,
                       tie_rtol=0.0 if dtype == torch.float64 else tie_rtol(dtype))


def check_sel(case, sel_impl, device, dtype, block_idx=None) -> None:
    """``sel_impl`` with the brute force's block indices (or the given ones) vs the brute force."""
    p = problem(case, "sel", dtype)
    cfg = case.config()
    args = on_device(p.args, device)
    truth, base = p.truth, p.base
    if block_idx is not None:
        args["block_idx"] = block_idx.to(device)
        x = make_inputs(case, dtype)
        truth = brute.sel_attention(x.q.double(), x.k.double(), x.v.double(), block_idx, cfg, x.cu_seqlens)
        base = None if dtype == torch.float64 else brute.sel_attention(x.q, x.k, x.v, block_idx, cfg, x.cu_seqlens)
    out = sel_impl(args["q"], args["k"], args["v"], args["block_idx"], cfg, args["cu_seqlens"])
    where = f"{case} dtype={A.dtype_name(dtype)}"
    A.assert_shape(out, (case.total, case.hq, case.dv), rule=A.RULE_SEL, where=where)
    A.assert_close(out, truth, base, rule=A.RULE_SEL, dtype=dtype, where=where, cu_seqlens=p.args["cu_seqlens"])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_select_matches_brute(case, select_impl, nsa_device, nsa_dtype):
    """Overlap weights, GQA sum, forced blocks, top-n with ties to the lower index, -1 padding."""
    check_select(case, select_impl, nsa_device, nsa_dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sel_matches_brute(case, sel_impl, nsa_device, nsa_dtype):
    """Tokens s of the selected blocks with s <= t, GQA h -> h // G."""
    check_sel(case, sel_impl, nsa_device, nsa_dtype)


def random_block_idx(case, gen: torch.Generator) -> torch.Tensor:
    """``(T, Hkv, n_sel) int32``: per row a random sorted subset of 0..nb-1 (future blocks
    included, sometimes nothing at all), -1 padded."""
    cfg = case.config()
    rows = []
    for T in case.lengths:
        nb = brute.num_sel_blocks(T, brute.geometry(cfg))
        idx = torch.full((T, case.hkv, cfg.n_sel), -1, dtype=torch.int32)
        for t in range(T):
            for kv in range(case.hkv):
                count = int(torch.randint(0, min(nb, cfg.n_sel) + 1, (1,), generator=gen))
                chosen = sorted(torch.randperm(nb, generator=gen)[:count].tolist())
                idx[t, kv, :count] = torch.tensor(chosen, dtype=torch.int32)
        rows.append(idx)
    return torch.cat(rows)


@pytest.mark.parametrize("case", [single(97, 4, 2), single(37, 4, 2, SMALL_CFG, dk=13, dv=7),
                                  varlen_case((5, 0, 30, 17), hq=6, hkv=2, dk=8, dv=5)], ids=str)
def test_sel_any_block_set(case, sel_impl, nsa_device, nsa_dtype):
    """Arbitrary valid block sets: blocks after t contribute nothing (s <= t), a row with no
    visible token is exactly 0 and not NaN."""
    idx = random_block_idx(case, torch.Generator().manual_seed(7))
    check_sel(case, sel_impl, nsa_device, nsa_dtype, block_idx=idx)


def test_select_ties_go_to_lower_index(select_impl, nsa_device, nsa_dtype):
    """Blocks 1 and 2 have bitwise-identical compressed keys, hence exactly equal scores, and
    beat block 3; one free pick (block 0 forced) -> block 1, never 2.

    l = d = l' = 4 makes w(j, i) the identity; q points along the duplicated key."""
    from nsa_ref import NSAConfig

    cfg = NSAConfig(block_len=4, block_stride=4, sel_block=4, n_sel=2, n_init=1, n_local=0, window=4)
    T, Dk = 16, 8
    u = torch.linspace(-1, 1, Dk, dtype=torch.float64)
    q = u.expand(T, 2, Dk).clone()  # G = 2 query heads, one KV head
    k_cmp = torch.stack([0.3 * u.flip(0), u, u, -u]).unsqueeze(1)  # (Tc=4, Hkv=1, Dk)
    idx = select_impl(q.to(nsa_device, nsa_dtype), k_cmp.to(nsa_device, nsa_dtype), cfg, None).cpu()
    where = "tie case (l=d=l'=4, n_sel=2, n_init=1)"
    # t=11 sees cmp blocks 0..2 (c=2): blocks 1 and 2 tie; t=15 sees 0..3 (c=3): same tie.
    for t in (11, 15):
        if idx[t, 0].tolist() != [0, 1]:
            raise AssertionError(f"{A.RULE_SELECT}: {where}: t={t}: picked {idx[t, 0].tolist()}, "
                                 "expected [0, 1] (blocks 1 and 2 tie exactly; the lower index wins)")


def test_select_no_visible_block_picks_lowest(select_impl, nsa_device, nsa_dtype):
    """t < l - 1: no cmp block is visible, every score is exactly 0 -> the lowest indices win."""
    from nsa_ref import NSAConfig

    cfg = NSAConfig(block_len=16, block_stride=4, sel_block=4, n_sel=2, n_init=0, n_local=0, window=4)
    T = 14
    q = torch.randn(T, 2, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    k_cmp = torch.zeros(0, 1, 8, dtype=torch.float64)
    idx = select_impl(q.to(nsa_device, nsa_dtype), k_cmp.to(nsa_device, nsa_dtype), cfg, None).cpu()
    for t in range(T):
        c = t // 4
        want = [0, 1] if c >= 1 else [0, -1]
        if idx[t, 0].tolist() != want:
            raise AssertionError(f"{A.RULE_SELECT}: all scores 0 (t < l - 1): t={t}: picked "
                                 f"{idx[t, 0].tolist()}, expected {want} (ties to the lower index)")


@given(case=case_strategy(max_len=40))
@property_settings(max_examples=20)
def test_select_random_shapes(case, select_impl, nsa_device, nsa_dtype):
    """Property: random small configs/shapes select the brute force's blocks."""
    check_select(case, select_impl, nsa_device, nsa_dtype)


@given(case=case_strategy(max_len=40))
@property_settings(max_examples=15)
def test_sel_random_shapes(case, sel_impl, nsa_device, nsa_dtype):
    """Property: random small configs/shapes match the brute-force sel attention."""
    check_sel(case, sel_impl, nsa_device, nsa_dtype)
