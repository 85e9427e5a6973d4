"""Full NSA (compress -> cmp -> select -> sel, win -> gated sum) against the brute force.

Pins (nsa_spec.md, all sections, and "Gating and output": o = g_cmp*o_cmp + g_sel*o_sel +
g_win*o_win). Implementation under test: ``nsa_impl``.

Below fp64 (``--nsa-dtype`` bf16/fp16/fp32) the discrete block choice can legitimately flip on
near-ties, which changes a row by O(1); those runs raise ``n_sel`` to cover every block so the
comparison measures arithmetic only. The selection rule itself is pinned in test_sel.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given

from conformance import assertions as A
from conformance import brute
from conformance.cases import (
    SMALL_CFG, as_params, case_strategy, default_cases, on_device, problem, property_settings, single, small_cases,
)

pytestmark = [pytest.mark.usefixtures("nsa_cpu_threads")]

CASES = default_cases() + as_params(small_cases())


def selection_free(case):
    """The case with n_sel >= number of selection blocks of its longest sequence."""
    g = brute.geometry(case.config())
    nb = max([brute.num_sel_blocks(T, g) for T in case.lengths] + [1])
    return case if g.n >= nb else case.with_cfg(n_sel=nb)


def check_nsa(case, nsa_impl, device, dtype, rule=A.RULE_NSA) -> None:
    if dtype != torch.float64:
        case = selection_free(case)
    p = problem(case, "nsa", dtype)
    args = on_device(p.args, device)
    out = nsa_impl(args["q"], args["k"], args["v"], args["gates"], case.config(), args["cu_seqlens"])
    where = f"{case} dtype={A.dtype_name(dtype)}"
    A.assert_shape(out, (case.total, case.hq, case.dv), rule=rule, where=where)
    A.assert_close(out, p.truth, p.base, rule=rule, dtype=dtype, where=where, cu_seqlens=p.args["cu_seqlens"])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_nsa_matches_brute(case, nsa_impl, nsa_device, nsa_dtype):
    """Every branch and the gated sum at once, default and small configs."""
    check_nsa(case, nsa_impl, nsa_device, nsa_dtype)


@pytest.mark.parametrize("branch", [0, 1, 2], ids=["cmp", "sel", "win"])
@pytest.mark.parametrize("T", [9, 37])
def test_nsa_one_hot_gates_isolate_branch(branch, T, nsa_impl, nsa_device, nsa_dtype):
    """gates = e_branch -> the output is exactly that branch's brute-force output."""
    case = single(T, 4, 2, SMALL_CFG, dk=13, dv=7, seed=3)
    if nsa_dtype != torch.float64:
        case = selection_free(case)
    cfg = case.config()
    p = problem(case, "nsa", nsa_dtype)
    gates = torch.zeros_like(p.args["gates"])
    gates[..., branch] = 1
    args = on_device(p.args, nsa_device)
    out = nsa_impl(args["q"], args["k"], args["v"], gates.to(nsa_device), cfg, None)
    x = {k: v.double() for k, v in p.args.items() if isinstance(v, torch.Tensor)}
    truth = brute.nsa_attention(x["q"], x["k"], x["v"], gates.double(), cfg)
    base = None if nsa_dtype == torch.float64 else brute.nsa_attention(
        p.args["q"], p.args["k"], p.args["v"], gates, cfg)
    name = ("cmp", "sel", "win")[branch]
    A.assert_close(out, truth, base, rule=A.RULE_GATE, dtype=nsa_dtype, where=f"{case} gates={name} only")


def test_nsa_empty_cmp_rows_finite(nsa_impl, nsa_device, nsa_dtype):
    """T < l: the cmp branch is empty on every row (contributes exactly 0); output finite, equal to the brute force."""
    check_nsa(single(7, 4, 2, SMALL_CFG, dk=13, dv=7), nsa_impl, nsa_device, nsa_dtype)


@given(case=case_strategy(max_len=40))
@property_settings(max_examples=20)
def test_nsa_random_shapes(case, nsa_impl, nsa_device, nsa_dtype):
    """Property: random small configs/shapes match the brute force end to end."""
    check_nsa(case, nsa_impl, nsa_device, nsa_dtype)


@given(case=case_strategy(max_len=30, varlen=True))
@property_settings(max_examples=10)
def test_nsa_random_varlen(case, nsa_impl, nsa_device, nsa_dtype):
    """Property: random packed batches (empty sequences included) match the brute force."""
    check_nsa(case, nsa_impl, nsa_device, nsa_dtype, rule=f"{A.RULE_VARLEN} / {A.RULE_NSA}")
