"""Full NSA (compress -> cmp -> select -> sel, win -> gated sum) against the brute force.

Pins (nsa_spec.md, all sections, and "Gating and output": o = g_cmp*o_cmp + g_sel*o_sel +
g_win*o_win). Implementation under test: ``nsa_impl``. Cases: every config family
(``conformance.families``) plus small strided and tied configs.

A failing full-NSA comparison isolates the deviating branch itself: it re-runs the
implementation with one-hot gates (its own cmp, sel and win slots through its own gates) and
names the branch(es) and rules that differ.

Below fp64 (``--nsa-dtype`` bf16/fp16/fp32, or a coarser declared compute precision) the
discrete block choice can legitimately flip on near-ties, which changes a row by O(1); those runs
raise ``n_sel`` to cover every block so the comparison measures arithmetic only. The selection
rule itself is pinned in test_sel.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conformance import assertions as A
from conformance import brute
from conformance.cases import (
    FAMILIES, SMALL_CFG, SMALL_TIED_CFG, SMALL_TIED_DIMS, as_params, case_strategy, default_cases, on_device, problem,
    property_settings, selection_free, single, small_cases,
)

pytestmark = [pytest.mark.usefixtures("nsa_cpu_threads"),
              pytest.mark.nsa_rule("NSA-FULL", "NSA-GATE", "NSA-CMP-VISIBLE", "NSA-SEL-SCORE", "NSA-SEL-FORCED",
                                   "NSA-SEL-ATTN", "NSA-WIN", "NSA-SCALE")]

CASES = default_cases() + as_params(small_cases())
BRANCHES = ("cmp", "sel", "win")
#: Rules a deviation of each branch points at (the slot tests of that branch tell them apart).
BRANCH_RULES = {"cmp": "[NSA-CMP-VISIBLE] / [NSA-CMP-EMPTY]",
                "sel": "[NSA-SEL-SCORE] / [NSA-SEL-FORCED] (selection) or [NSA-SEL-ATTN] (attention)",
                "win": "[NSA-WIN]"}


def one_hot(gates: torch.Tensor, branch: str) -> torch.Tensor:
    """``gates (T, Hq, 3)`` with 1 in the slot of ``branch`` and 0 elsewhere."""
    out = torch.zeros_like(gates)
    out[..., BRANCHES.index(branch)] = 1
    return out


def branch_deviations(case, nsa_impl, device, dtype, judged) -> list[str]:
    """Re-run ``nsa_impl`` with one-hot gates per branch; one line per branch that misses its
    brute-force output (empty: every branch alone is right, so the gated sum is what differs)."""
    cfg = case.config()
    p = problem(case, "nsa", dtype, judged)
    found = []
    for branch in BRANCHES:
        gates = one_hot(p.args["gates"], branch)
        args = on_device(p.args, device)
        try:
            out = nsa_impl(args["q"], args["k"], args["v"], gates.to(device), cfg, args["cu_seqlens"])
            x = {k: v.double() for k, v in p.args.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
            truth = brute.nsa_attention(x["q"], x["k"], x["v"], gates.double(), cfg, p.args["cu_seqlens"])
            base = None if judged == torch.float64 else brute.nsa_attention(
                *(p.args[n].to(judged) for n in ("q", "k", "v")), gates.to(judged), cfg, p.args["cu_seqlens"])
            A.assert_close(out, truth, base, rule=branch, dtype=judged, cu_seqlens=p.args["cu_seqlens"])
        except AssertionError as exc:
            detail = str(exc).split(": ", 1)[-1].split(" [", 1)[0]
            found.append(f"{branch} ({BRANCH_RULES[branch]}): {detail}")
        except Exception as exc:  # the implementation raised with one-hot gates
            found.append(f"{branch}: raised {type(exc).__name__}: {exc}")
    return found


def check_nsa(case, nsa_impl, device, dtype, judged=None, rule=A.RULE_NSA, isolate: bool = True) -> None:
    """Run ``nsa_impl`` on ``case`` and compare with the brute force; on a miss, say which branch
    deviates (one-hot gates) before failing."""
    judged = dtype if judged is None else judged
    if judged != torch.float64:
        case = selection_free(case)
    p = problem(case, "nsa", dtype, judged)
    args = on_device(p.args, device)
    out = nsa_impl(args["q"], args["k"], args["v"], args["gates"], case.config(), args["cu_seqlens"])
    where = f"{case} dtype={A.dtype_name(dtype)}" + ("" if judged == dtype else f" judged at {A.dtype_name(judged)}")
    A.assert_shape(out, (case.total, case.hq, case.dv), rule=rule, where=where)
    try:
        A.assert_close(out, p.truth, p.base, rule=rule, dtype=judged, where=where, cu_seqlens=p.args["cu_seqlens"])
    except AssertionError as exc:
        if not isolate:
            raise
        found = branch_deviations(case, nsa_impl, device, dtype, judged)
        verdict = ("deviating branch(es), found by re-running with one-hot gates: " + " | ".join(found)
                   if found else f"every branch alone matches: the gated sum deviates {A.RULE_GATE}")
        raise AssertionError(f"{exc}\n  {verdict}") from None


@pytest.mark.parametrize("case", CASES, ids=str)
def test_nsa_matches_brute(case, nsa_impl, impl_under_test, nsa_device, nsa_dtype):
    """Every branch and the gated sum at once, every config family."""
    check_nsa(case, nsa_impl, nsa_device, nsa_dtype, impl_under_test.judged_dtype("nsa"))


@pytest.mark.nsa_rule("NSA-GATE")
@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("case", [single(37, 16, 1, SMALL_CFG, dk=13, dv=7, seed=3),
                                  single(70, 16, 1, SMALL_TIED_CFG, seed=3, **SMALL_TIED_DIMS),
                                  single(33, 32, 2, SMALL_TIED_CFG, seed=3, **SMALL_TIED_DIMS),
                                  single(97, 32, 2, FAMILIES["tied32"].cfg, dk=32, dv=32, seed=3),
                                  single(130, 16, 1, FAMILIES["tied64"].cfg, dk=32, dv=32, seed=3),
                                  single(200, 16, 1, FAMILIES["tied64-d128"].cfg, dk=128, dv=128, seed=3)], ids=str)
def test_nsa_one_hot_gates_isolate_branch(branch, case, nsa_impl, impl_under_test, nsa_device, nsa_dtype):
    """gates = e_branch -> the output is exactly that branch's brute-force output (gate order)."""
    judged = impl_under_test.judged_dtype("nsa")
    if judged != torch.float64:
        case = selection_free(case)
    cfg = case.config()
    p = problem(case, "nsa", nsa_dtype, judged)
    gates = one_hot(p.args["gates"], branch)
    args = on_device(p.args, nsa_device)
    out = nsa_impl(args["q"], args["k"], args["v"], gates.to(nsa_device), cfg, None)
    x = {k: v.double() for k, v in p.args.items() if isinstance(v, torch.Tensor)}
    truth = brute.nsa_attention(x["q"], x["k"], x["v"], gates.double(), cfg)
    base = None if judged == torch.float64 else brute.nsa_attention(
        p.args["q"].to(judged), p.args["k"].to(judged), p.args["v"].to(judged), gates.to(judged), cfg)
    A.assert_close(out, truth, base, rule=f"{A.RULE_GATE} ({branch} only)", dtype=judged,
                   where=f"{case} gates={branch} only")


@pytest.mark.nsa_rule("NSA-CMP-EMPTY", "NSA-FINITE")
@pytest.mark.parametrize("case", [single(7, 4, 2, SMALL_CFG, dk=13, dv=7),
                                  single(7, 16, 1, SMALL_TIED_CFG, **SMALL_TIED_DIMS),
                                  single(31, 32, 2, SMALL_TIED_CFG, **SMALL_TIED_DIMS),
                                  single(1, 16, 1, FAMILIES["tied64"].cfg, dk=32, dv=32),
                                  single(63, 16, 1, FAMILIES["tied64"].cfg, dk=32, dv=32)], ids=str)
def test_nsa_empty_cmp_rows_finite(case, nsa_impl, impl_under_test, nsa_device, nsa_dtype):
    """T < l: the cmp branch is empty on every row (contributes exactly 0); output finite, equal to the brute force."""
    check_nsa(case, nsa_impl, nsa_device, nsa_dtype, impl_under_test.judged_dtype("nsa"))


@given(data=st.data())
@property_settings(max_examples=20)
def test_nsa_random_shapes(data, nsa_impl, impl_under_test, nsa_device, nsa_dtype):
    """Property: random small configs/shapes, drawn from the declared capabilities, match the brute force."""
    case = data.draw(case_strategy(max_len=40, caps=impl_under_test.capabilities("nsa")), label="case")
    check_nsa(case, nsa_impl, nsa_device, nsa_dtype, impl_under_test.judged_dtype("nsa"))


@pytest.mark.nsa_rule("NSA-VARLEN")
@pytest.mark.nsa_needs("varlen")
@given(data=st.data())
@property_settings(max_examples=10)
def test_nsa_random_varlen(data, nsa_impl, impl_under_test, nsa_device, nsa_dtype):
    """Property: random packed batches (empty sequences included where declared) match the brute force."""
    case = data.draw(case_strategy(max_len=30, varlen=True, caps=impl_under_test.capabilities("nsa")), label="case")
    check_nsa(case, nsa_impl, nsa_device, nsa_dtype, impl_under_test.judged_dtype("nsa"),
              rule=f"{A.RULE_VARLEN} / {A.RULE_NSA}")
