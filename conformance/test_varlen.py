"""Varlen: a packed batch (cu_seqlens, empty sequences included) equals each sequence run alone.

Pins (nsa_spec.md "Varlen and decode"): every rule applies per sequence, positions restart at
0, nothing crosses a boundary, empty sequences are legal. Each slot of the implementation under
test is run once packed and once per sequence (empty ones give no rows); the packed result must
be within the tolerance rule of the per-sequence one (x = packed, base = per-sequence, ref = fp64
brute force), and against the brute force itself.
"""
from __future__ import annotations

import pytest
import torch

from conformance import assertions as A
from conformance.capabilities import require
from conformance.cases import (
    DEFAULT_CFG, FAMILIES, SMALL_CFG, SMALL_TIED_CFG, SMALL_TIED_DIMS, make_inputs, on_device, problem, selection_free, varlen_case,
)

pytestmark = [pytest.mark.usefixtures("nsa_cpu_threads"), pytest.mark.nsa_rule("NSA-VARLEN"),
              pytest.mark.nsa_needs("varlen")]

CASES = [
    varlen_case(),  # lengths [0, 5, 40, 0, 97], small config
    varlen_case((0, 31, 32, 0, 97), hq=4, hkv=2, cfg=DEFAULT_CFG, dk=24, dv=16),  # default config
    varlen_case((0, 0), hq=16, hkv=1, cfg=SMALL_TIED_CFG, **SMALL_TIED_DIMS),  # nothing at all
    varlen_case((0, 5, 40, 0, 97), hq=16, hkv=1, cfg=SMALL_TIED_CFG, **SMALL_TIED_DIMS),  # tied, empty sequences
    varlen_case((31, 32, 33, 100), hq=32, hkv=2, cfg=SMALL_TIED_CFG, seed=2, **SMALL_TIED_DIMS),  # tied, none empty
    varlen_case((17, 100, 3), hq=16, hkv=1, cfg=SMALL_TIED_CFG, seed=3, **SMALL_TIED_DIMS),
    varlen_case((1, 33, 2, 65), hq=16, hkv=1, cfg=FAMILIES["tied32"].cfg, dk=32, dv=32, seed=1),
    varlen_case((97, 0, 5, 64), hq=32, hkv=2, cfg=FAMILIES["tied32"].cfg, dk=32, dv=32),
    varlen_case((63, 64, 130), hq=16, hkv=1, cfg=FAMILIES["tied64"].cfg, dk=32, dv=32),  # FLA's defaults
    varlen_case((0, 64, 0, 130), hq=16, hkv=1, cfg=FAMILIES["tied64"].cfg, dk=32, dv=32),
    varlen_case((1, 200), hq=16, hkv=1, cfg=FAMILIES["tied64-d128"].cfg, dk=128, dv=128),
]


def pieces(case):
    """[(start, end), ...] of the non-empty sequences."""
    out, s = [], 0
    for n in case.lengths:
        if n:
            out.append((s, s + n))
        s += n
    return out


def _run(slot, impl, case, dtype, device, judged=None):
    """Packed and per-sequence outputs of ``slot`` (all on the CPU)."""
    cfg = case.config()
    branch = {"compress": "cmp"}.get(slot, slot)
    p = problem(case, branch, dtype, judged)
    a = on_device(p.args, device)
    cu = a["cu_seqlens"]

    def call(sl, cmp_sl=None, cu_=None):
        if slot == "nsa":
            return impl.nsa(a["q"][sl], a["k"][sl], a["v"][sl], a["gates"][sl], cfg, cu_)
        if slot == "cmp":
            return impl.cmp(a["q"][sl], a["k_cmp"][cmp_sl], a["v_cmp"][cmp_sl], cfg, cu_)[0]
        if slot == "select":
            return impl.select(a["q"][sl], a["k_cmp"][cmp_sl], cfg, cu_)
        if slot == "sel":
            return impl.sel(a["q"][sl], a["k"][sl], a["v"][sl], a["block_idx"][sl], cfg, cu_)
        if slot == "win":
            return impl.win(a["q"][sl], a["k"][sl], a["v"][sl], cfg, cu_)
        raise ValueError(slot)

    packed = call(slice(None), slice(None), cu).detach().cpu()
    alone = []
    cmp_start = 0
    for s, e in pieces(case):
        tc = cfg.num_cmp_blocks(e - s)
        alone.append(call(slice(s, e), slice(cmp_start, cmp_start + tc)).detach().cpu())
        cmp_start += tc
    alone = torch.cat(alone) if alone else packed[:0]
    return packed, alone, p


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("slot", ["cmp", "select", "sel", "win", "nsa"])
def test_varlen_equals_per_sequence(slot, case, impl_under_test, nsa_device, nsa_dtype):
    """Packed == each sequence alone (rule-tolerance), and == the per-sequence brute force."""
    judged = impl_under_test.judged_dtype(slot)
    if slot == "nsa" and judged != torch.float64:
        case = selection_free(case)  # below fp64 a near-tie may flip; test_sel.py pins the selection
    packed, alone, p = _run(slot, impl_under_test, case, nsa_dtype, nsa_device, judged)
    where = f"{case} slot={slot} dtype={A.dtype_name(nsa_dtype)}"
    cu = p.args["cu_seqlens"]
    truth = p.truth[0] if isinstance(p.truth, tuple) else p.truth
    if slot == "select":
        if not torch.equal(packed.long(), alone.long()):
            bad = (packed.long() != alone.long()).any(-1).any(-1).nonzero()[0].item()
            raise AssertionError(f"{A.RULE_VARLEN}: {where}: packed row {bad} selects "
                                 f"{packed[bad].tolist()}, alone {alone[bad].tolist()}")
        if judged == torch.float64 and not torch.equal(packed.long(), truth.long()):
            bad = (packed.long() != truth.long()).any(-1).any(-1).nonzero()[0].item()
            raise AssertionError(f"{A.RULE_VARLEN}: {where}: packed row {bad} selects "
                                 f"{packed[bad].tolist()}, brute force {truth[bad].tolist()}")
        return
    A.assert_close(packed, truth, alone, rule=A.RULE_VARLEN, dtype=judged, where=where, cu_seqlens=cu,
                   what="packed - brute (base: each sequence alone)")


@pytest.mark.parametrize("case", [varlen_case((9, 0, 40, 21)),
                                  varlen_case((9, 0, 80, 40), hq=16, hkv=1, cfg=SMALL_TIED_CFG, **SMALL_TIED_DIMS),
                                  varlen_case((9, 80, 40), hq=16, hkv=1, cfg=SMALL_TIED_CFG, **SMALL_TIED_DIMS),
                                  varlen_case((33, 64, 0, 97), hq=32, hkv=2, cfg=FAMILIES["tied32"].cfg, dk=32, dv=32),
                                  varlen_case((70, 0, 130), hq=16, hkv=1, cfg=FAMILIES["tied64"].cfg, dk=32, dv=32),
                                  varlen_case((65, 130), hq=16, hkv=1, cfg=FAMILIES["tied64-d128"].cfg, dk=128,
                                              dv=128)], ids=str)
@pytest.mark.parametrize("slot", ["cmp", "sel", "win", "nsa"])
def test_varlen_sequences_do_not_leak(slot, case, impl_under_test, nsa_device, nsa_dtype):
    """Changing one sequence's tokens (by a lot) leaves every other sequence's rows unchanged."""
    cfg = case.config()
    uses = {"cmp": ("compress", "cmp"), "sel": ("compress", "select", "sel")}.get(slot, (slot,))
    require(impl_under_test, uses, case)
    x = make_inputs(case, nsa_dtype, nsa_device)
    y = x.clone()
    i = max(range(len(case.lengths)), key=lambda j: case.lengths[j])  # the longest sequence changes
    s = sum(case.lengths[:i])
    e = s + case.lengths[i]
    for t in (y.q, y.k, y.v):
        t[s:e] = t[s:e] * 3 + 5
    y.gates[s:e] = 1 - y.gates[s:e]
    outs = []
    for z in (x, y):
        if slot == "nsa":
            o = impl_under_test.nsa(z.q, z.k, z.v, z.gates, cfg, z.cu_seqlens)
        elif slot == "cmp":
            k_cmp = impl_under_test.compress(z.k, cfg, z.cu_seqlens)
            v_cmp = impl_under_test.compress(z.v, cfg, z.cu_seqlens)
            o = impl_under_test.cmp(z.q, k_cmp, v_cmp, cfg, z.cu_seqlens)[0]
        elif slot == "sel":
            k_cmp = impl_under_test.compress(x.k, cfg, x.cu_seqlens)  # same blocks for both runs
            idx = impl_under_test.select(x.q, k_cmp, cfg, x.cu_seqlens)
            o = impl_under_test.sel(z.q, z.k, z.v, idx, cfg, z.cu_seqlens)
        else:
            o = impl_under_test.win(z.q, z.k, z.v, cfg, z.cu_seqlens)
        outs.append(o.detach().cpu())
    after = outs[1].clone()
    after[s:e] = outs[0][s:e]  # the changed sequence may change; every other row must not
    A.assert_equal(after, outs[0], rule=A.RULE_VARLEN, where=f"{case} slot={slot}: sequence {i} changed",
                   name="rows of other sequences", cu_seqlens=x.cu_seqlens.cpu())
