"""Sliding-window branch against the brute force.

Pins (nsa_spec.md "Sliding window"): query t attends s in [max(0, t - w + 1), t], i.e. w keys
including itself (FA-2 window (w - 1, 0)). Implementation under test: ``win_impl``.
"""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import assertions as A
from conformance.cases import (
    SMALL_CFG, as_params, case_strategy, default_cases, on_device, problem, property_settings, single, small_cases,
)

pytestmark = [pytest.mark.usefixtures("nsa_cpu_threads"), pytest.mark.nsa_rule("NSA-WIN", "NSA-SCALE")]

# Window edges: w = 1 (only itself), w = T - 1, T and T + 1 (no cut), and the default 512 < 1025.
EDGE_CASES = [single(T, hq, hkv, SMALL_CFG, dk=16, dv=16).with_cfg(window=w)
              for T, w, hq, hkv in ((9, 1, 4, 2), (9, 2, 16, 1), (9, 8, 4, 2), (9, 9, 16, 1), (9, 10, 16, 1),
                                    (33, 5, 32, 2))]
CASES = default_cases() + as_params(small_cases() + EDGE_CASES)


def check_win(case, win_impl, device, dtype, judged=None) -> None:
    """``win_impl`` on ``case`` vs the brute force, judged at ``judged`` (default ``dtype``)."""
    judged = dtype if judged is None else judged
    p = problem(case, "win", dtype, judged)
    args = on_device(p.args, device)
    out = win_impl(args["q"], args["k"], args["v"], case.config(), args["cu_seqlens"])
    where = f"{case} dtype={A.dtype_name(dtype)}"
    A.assert_shape(out, (case.total, case.hq, case.dv), rule=A.RULE_WIN, where=where)
    A.assert_close(out, p.truth, p.base, rule=A.RULE_WIN, dtype=judged, where=where,
                   cu_seqlens=p.args["cu_seqlens"])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_win_matches_brute(case, win_impl, impl_under_test, nsa_device, nsa_dtype):
    """s in [max(0, t - w + 1), t]: w keys, the query's own token included, GQA h -> h // G."""
    check_win(case, win_impl, nsa_device, nsa_dtype, impl_under_test.judged_dtype("win"))


@given(data=st.data())
@property_settings(max_examples=20)
def test_win_random_shapes(data, win_impl, impl_under_test, nsa_device, nsa_dtype):
    """Property: random windows, heads and dims (from the declared space) match the brute force."""
    case = data.draw(case_strategy(max_len=40, caps=impl_under_test.capabilities("win"), slot="win"), label="case")
    check_win(case, win_impl, nsa_device, nsa_dtype, impl_under_test.judged_dtype("win"))
