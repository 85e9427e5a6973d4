"""Future-leak tests: changing everything after position t0 leaves every output at <= t0 unchanged.

Pins the causal half of every rule in nsa_spec.md: cmp sees only ended blocks (i*d + l - 1 <= t),
selection scores come from those blocks and candidates j <= t // l', sel keeps s <= t, the
window ends at t. The future is changed by a lot (x -> 3x + 5, gates -> 1 - gates), and the past
must stay *bitwise* equal: a masked-out key contributes an exact 0 in any correct
implementation, so any difference at all is a leak.
"""
from __future__ import annotations

import pytest
import torch

from conformance import assertions as A
from conformance import brute
from conformance.cases import DEFAULT_CFG, FAMILIES, SMALL_CFG, SMALL_TIED_CFG, SMALL_TIED_DIMS, make_inputs, single

pytestmark = [pytest.mark.usefixtures("nsa_cpu_threads"), pytest.mark.nsa_rule("NSA-CAUSAL")]

# (case, cut points t0): small strided config around l - 1 = 7 and l' = 16; default around 31 and
# 64; the tied configs around their block edges (31/32, 63/64, ...) and window edges (40, 48).
SETUPS = [
    (single(48, 4, 2, SMALL_CFG, dk=13, dv=7), (7, 8, 16)),
    (single(97, 4, 2, DEFAULT_CFG), (31, 47, 64)),
    (single(100, 16, 1, SMALL_TIED_CFG, **SMALL_TIED_DIMS), (0, 30, 31, 32, 40, 63, 64)),
    (single(130, 32, 2, FAMILIES["tied32"].cfg, dk=32, dv=32), (31, 32, 47, 48, 63, 64, 95, 96, 129)),
    (single(150, 16, 1, FAMILIES["tied64"].cfg, dk=32, dv=32), (0, 62, 63, 64, 127, 128)),
    (single(200, 16, 1, FAMILIES["tied64-d128"].cfg, dk=128, dv=128), (63, 64, 99, 100, 127, 128)),
]
PARAMS = [pytest.param(case, t0, id=f"{case}-t0={t0}") for case, cuts in SETUPS for t0 in cuts]


def change_after(x: torch.Tensor, t0: int) -> torch.Tensor:
    y = x.clone()
    y[t0 + 1 :] = y[t0 + 1 :] * 3 + 5
    return y


def assert_past_unchanged(before, after, t0, case, what):
    A.assert_equal(after.detach().cpu()[: t0 + 1], before.detach().cpu()[: t0 + 1], rule=A.RULE_CAUSAL,
                   where=f"{case} {what}, tokens after t0={t0} changed", name=f"{what} rows t <= {t0}")


@pytest.mark.parametrize("case, t0", PARAMS)
def test_nsa_no_future_leak(case, t0, nsa_impl, nsa_device, nsa_dtype):
    """Full NSA: q, k, v, gates after t0 changed -> out[:t0+1] bitwise equal."""
    cfg = case.config()
    x = make_inputs(case, nsa_dtype, nsa_device)
    gates2 = x.gates.clone()
    gates2[t0 + 1 :] = 1 - gates2[t0 + 1 :]
    before = nsa_impl(x.q, x.k, x.v, x.gates, cfg, None)
    after = nsa_impl(change_after(x.q, t0), change_after(x.k, t0), change_after(x.v, t0), gates2, cfg, None)
    assert_past_unchanged(before, after, t0, case, "nsa out")


def _cmp_inputs(case, t0, dtype, device):
    """q and compressed k/v, plus versions with the future (q after t0, blocks not yet ended at t0) changed."""
    cfg = case.config()
    x = make_inputs(case, dtype)
    k_cmp, _ = brute.compress(x.k.double(), cfg)
    v_cmp, _ = brute.compress(x.v.double(), cfg)
    g = brute.geometry(cfg)
    ended = sum(1 for i in range(k_cmp.shape[0]) if brute.cmp_block_visible(t0, i, g))
    k2, v2 = k_cmp.clone(), v_cmp.clone()
    k2[ended:] = k2[ended:] * 3 + 5
    v2[ended:] = v2[ended:] * 3 + 5
    def dev(t):
        return t.to(device, dtype)
    return cfg, dev(x.q), dev(k_cmp), dev(v_cmp), dev(change_after(x.q, t0)), dev(k2), dev(v2)


@pytest.mark.parametrize("case, t0", PARAMS)
def test_cmp_no_future_leak(case, t0, cmp_impl, nsa_device, nsa_dtype):
    """cmp: blocks that end after t0 (i*d + l - 1 > t0) and queries after t0 changed."""
    cfg, q, k, v, q2, k2, v2 = _cmp_inputs(case, t0, nsa_dtype, nsa_device)
    before, lse1 = cmp_impl(q, k, v, cfg, None)
    after, lse2 = cmp_impl(q2, k2, v2, cfg, None)
    assert_past_unchanged(before, after, t0, case, "cmp out")
    if lse1 is not None:
        assert_past_unchanged(lse1, lse2, t0, case, "cmp lse")


@pytest.mark.parametrize("case, t0", PARAMS)
def test_select_no_future_leak(case, t0, select_impl, nsa_device, nsa_dtype):
    """Block selection: blocks that end after t0 and queries after t0 changed -> same picks at <= t0."""
    cfg, q, k, _, q2, k2, _ = _cmp_inputs(case, t0, nsa_dtype, nsa_device)
    assert_past_unchanged(select_impl(q, k, cfg, None), select_impl(q2, k2, cfg, None), t0, case, "block_idx")


@pytest.mark.parametrize("case, t0", PARAMS)
def test_sel_no_future_leak(case, t0, sel_impl, nsa_device, nsa_dtype):
    """sel: tokens after t0 changed (block choice after t0 too; every row lists all blocks it may)."""
    cfg = case.config()
    x = make_inputs(case, nsa_dtype, nsa_device)
    g = brute.geometry(cfg)
    nb = brute.num_sel_blocks(case.total, g)
    # Each row lists the n highest-numbered blocks, future blocks included: s <= t must cut them.
    idx = torch.full((case.total, case.hkv, g.n), -1, dtype=torch.int32)
    last = list(range(max(0, nb - g.n), nb))
    idx[:, :, : len(last)] = torch.tensor(last, dtype=torch.int32)
    idx2 = idx.clone()
    idx2[t0 + 1 :, :, :] = -1
    idx2[t0 + 1 :, :, 0] = 0
    before = sel_impl(x.q, x.k, x.v, idx.to(nsa_device), cfg, None)
    after = sel_impl(change_after(x.q, t0), change_after(x.k, t0), change_after(x.v, t0), idx2.to(nsa_device), cfg, None)
    assert_past_unchanged(before, after, t0, case, "sel out")


@pytest.mark.parametrize("case, t0", PARAMS)
def test_win_no_future_leak(case, t0, win_impl, nsa_device, nsa_dtype):
    """win: tokens after t0 changed."""
    cfg = case.config()
    x = make_inputs(case, nsa_dtype, nsa_device)
    before = win_impl(x.q, x.k, x.v, cfg, None)
    after = win_impl(change_after(x.q, t0), change_after(x.k, t0), change_after(x.v, t0), cfg, None)
    assert_past_unchanged(before, after, t0, case, "win out")
