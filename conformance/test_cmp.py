"""Compression branch: compress (mean phi) and cmp attention against the brute force.

Pins (nsa_spec.md "Compression"): Tc = floor((T - l)/d) + 1; k_cmp[i] = mean k[i*d : i*d + l];
query t sees block i iff i*d + l - 1 <= t; rows with no visible block are exactly 0, lse -inf,
zero gradient, never NaN. Implementation under test: ``compress_impl`` and ``cmp_impl``.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import assertions as A
from conformance import brute
from conformance.cases import (
    FAMILIES, SMALL_CFG, SMALL_TIED_CFG, SMALL_TIED_DIMS, as_params, case_strategy, default_cases, make_inputs, on_device,
    problem, property_settings, single,
    small_cases, varlen_case,
)

pytestmark = [pytest.mark.usefixtures("nsa_cpu_threads")]

CASES = default_cases() + as_params(small_cases())


def check_cmp(case, cmp_impl, device, dtype, judged=None) -> None:
    """Run ``cmp_impl`` on the case's compressed keys and compare out (and lse if returned),
    judged at ``judged`` (default ``dtype``)."""
    judged = dtype if judged is None else judged
    p = problem(case, "cmp", dtype, judged)
    cfg = case.config()
    args = on_device(p.args, device)
    out, lse = cmp_impl(args["q"], args["k_cmp"], args["v_cmp"], cfg, args["cu_seqlens"])
    where = f"{case} dtype={A.dtype_name(dtype)}"
    A.assert_shape(out, (case.total, case.hq, case.dv), rule=A.RULE_CMP, where=where)
    truth_out, truth_lse = p.truth
    base_out, base_lse = p.base if p.base is not None else (None, None)
    cu = p.args["cu_seqlens"]
    A.assert_close(out, truth_out, base_out, rule=A.RULE_CMP, dtype=judged, where=where, cu_seqlens=cu)
    if lse is not None:
        A.assert_shape(lse, (case.total, case.hq), rule=A.RULE_CMP_LSE, where=where, name="lse")
        # An fp32 lse from fp64 inputs is judged against the truth rounded to the lse's dtype.
        lse_base = (truth_lse if base_lse is None else base_lse).to(lse.dtype)
        A.assert_close(lse, truth_lse, lse_base, rule=A.RULE_CMP_LSE, dtype=judged, quantity="lse",
                       where=where, cu_seqlens=cu)


@pytest.mark.nsa_rule("NSA-CMP-VISIBLE", "NSA-CMP-EMPTY", "NSA-CMP-LSE", "NSA-SCALE")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cmp_matches_brute(case, cmp_impl, impl_under_test, nsa_device, nsa_dtype):
    """cmp visibility i*d + l - 1 <= t, softmax over visible blocks, GQA h -> h // G."""
    check_cmp(case, cmp_impl, nsa_device, nsa_dtype, impl_under_test.judged_dtype("cmp"))


@pytest.mark.nsa_rule("NSA-CMP-COUNT", "NSA-CMP-MEAN")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_compress_matches_brute(case, compress_impl, impl_under_test, nsa_device, nsa_dtype):
    """k_cmp[i] = mean(k[i*d : i*d + l]) per sequence, Tc = floor((T - l)/d) + 1 rows."""
    judged = impl_under_test.judged_dtype("compress")
    x = make_inputs(case, nsa_dtype)
    cfg = case.config()
    where = f"{case} dtype={A.dtype_name(nsa_dtype)}"
    for name, t in (("k", x.k), ("v", x.v)):
        got = compress_impl(t.to(nsa_device), cfg, None if x.cu_seqlens is None else x.cu_seqlens.to(nsa_device))
        want, _ = brute.compress(t.double(), cfg, x.cu_seqlens)
        base = None if judged == torch.float64 else brute.compress(t.to(judged), cfg, x.cu_seqlens)[0]
        A.assert_shape(got, tuple(want.shape), rule=A.RULE_COMPRESS, where=where, name=f"{name}_cmp")
        A.assert_close(got, want, base, rule=A.RULE_COMPRESS, dtype=judged, where=f"{where} {name}_cmp")


@pytest.mark.nsa_rule("NSA-CMP-EMPTY", "NSA-FINITE")
@pytest.mark.parametrize("case", [single(T, 4, 2, SMALL_CFG, dk=13, dv=7) for T in (7, 8)]
                         + [single(T, 16, 1, SMALL_TIED_CFG, **SMALL_TIED_DIMS) for T in (1, 30, 31, 32, 50)]
                         + [single(T, 16, 1, FAMILIES["tied64"].cfg, dk=32, dv=32) for T in (1, 63, 64, 100)],
                         ids=str)
def test_cmp_empty_rows_exactly_zero(case, cmp_impl, nsa_device, nsa_dtype):
    """Rows t < l - 1 (l = 8 strided, 32 and 64 tied) see no block: output exactly 0, lse -inf, nothing NaN."""
    T = case.total
    p = problem(case, "cmp", nsa_dtype)
    args = on_device(p.args, nsa_device)
    cfg = case.config()
    out, lse = cmp_impl(args["q"], args["k_cmp"], args["v_cmp"], cfg, None)
    where = f"{case}"
    empty = torch.arange(T) < cfg.block_len - 1
    A.assert_finite(out, where=where)
    A.assert_zero_rows(out, empty, rule=A.RULE_CMP_EMPTY, where=where)
    if lse is not None:
        A.assert_finite(lse, where=where, name="lse", allow_neg_inf=True)
        lse = lse.detach().cpu()
        if not bool(torch.isneginf(lse[empty]).all()):
            t = int((~torch.isneginf(lse[empty].amax(-1))).nonzero()[0])
            raise AssertionError(f"{A.RULE_CMP_EMPTY}: {where}: lse at t={t} is {lse[t].tolist()}, must be -inf")
        if bool(torch.isinf(lse[~empty]).any()):
            raise AssertionError(f"{A.RULE_CMP_LSE}: {where}: lse is infinite on a row that sees a block")


@pytest.mark.nsa_ref_only
@pytest.mark.parametrize("case", [single(97, 4, 2), single(30, 16, 1), varlen_case()], ids=str)
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_nsa_ref_backend_lse_matches_brute(backend, case, nsa_device):
    """nsa_ref's public cmp_attention returns out only; its backend modules return (out, lse):
    lse (T, Hq) fp32 = log-sum-exp over visible blocks, -inf on empty rows."""
    import importlib

    from conformance.impl import split_out_lse

    module = importlib.import_module(f"nsa_ref.{backend}")
    check_cmp(case, lambda *a: split_out_lse(module.cmp_attention(*a)), nsa_device, torch.float64)


@pytest.mark.nsa_rule("NSA-CMP-VISIBLE", "NSA-CMP-EMPTY", "NSA-CMP-LSE", "NSA-SCALE")
@given(data=st.data())
@property_settings(max_examples=20)
def test_cmp_random_shapes(data, cmp_impl, impl_under_test, nsa_device, nsa_dtype):
    """Property: random small configs/shapes (from the declared space) match the brute force."""
    case = data.draw(case_strategy(max_len=40, caps=impl_under_test.capabilities("cmp"), slot="cmp"), label="case")
    check_cmp(case, cmp_impl, nsa_device, nsa_dtype, impl_under_test.judged_dtype("cmp"))


@pytest.mark.nsa_rule("NSA-VARLEN", "NSA-CMP-VISIBLE")
@pytest.mark.nsa_needs("varlen")
@given(data=st.data())
@property_settings(max_examples=10)
def test_cmp_random_varlen(data, cmp_impl, impl_under_test, nsa_device, nsa_dtype):
    """Property: random packed batches (empty sequences where declared) match the per-sequence brute force."""
    case = data.draw(case_strategy(max_len=30, varlen=True, caps=impl_under_test.capabilities("cmp"), slot="cmp"),
                     label="case")
    check_cmp(case, cmp_impl, nsa_device, nsa_dtype, impl_under_test.judged_dtype("cmp"))
