"""Sliding-window branch against the brute force.

Pins (nsa_spec.md "Sliding window"): query t attends s in [max(0, t - w + 1), t], i.e. w keys
including itself (FA-2 window (w - 1, 0)). Implementation under test: ``win_impl``.
"""
from __future__ import annotations

import pytest
from hypothesis import given

from conformance import assertions as A
from conformance.cases import (
    SMALL_CFG, as_params, case_strategy, default_cases, on_device, problem, property_settings, single, small_cases,
)

pytestmark = [pytest.mark.usefixtures("nsa_cpu_threads")]

# Window edges: w = 1 (only itself), w = T - 1, T and T + 1 (no cut), and the default 512 < 1025.
EDGE_CASES = [single(T, 4, 2, SMALL_CFG, dk=13, dv=7).with_cfg(window=w)
              for T, w in ((9, 1), (9, 2), (9, 8), (9, 9), (9, 10), (33, 5))]
CASES = default_cases() + as_params(small_cases() + EDGE_CASES)


def check_win(case, win_impl, device, dtype) -> None:
    p = problem(case, "win", dtype)
    args = on_device(p.args, device)
    out = win_impl(args["q"], args["k"], args["v"], case.config(), args["cu_seqlens"])
    where = f"{case} dtype={A.dtype_name(dtype)}"
    A.assert_shape(out, (case.total, case.hq, case.dv), rule=A.RULE_WIN, where=where)
    A.assert_close(out, p.truth, p.base, rule=A.RULE_WIN, dtype=dtype, where=where,
                   cu_seqlens=p.args["cu_seqlens"])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_win_matches_brute(case, win_impl, nsa_device, nsa_dtype):
    """s in [max(0, t - w + 1), t]: w keys, the query's own token included, GQA h -> h // G."""
    check_win(case, win_impl, nsa_device, nsa_dtype)


@given(case=case_strategy(max_len=40))
@property_settings(max_examples=20)
def test_win_random_shapes(case, win_impl, nsa_device, nsa_dtype):
    """Property: random windows, heads and dims match the brute force."""
    check_win(case, win_impl, nsa_device, nsa_dtype)
