"""nsa_ref's SDPA backend against its reference backend, under the tolerances.yaml rule.

For each branch and the full NSA, in fp32 and bf16 inputs: x = backend "sdpa" in the low dtype,
base = backend "reference" in the same dtype (same math, naive), ref = backend "reference" in fp64
from the same (rounded) inputs; pass iff max|x - ref| <= m * max|base - ref| + c
(``contracts.tolerances.lookup(dtype, quantity)``). Outputs, cmp lse, and gradients dq/dk/dv.

These check nsa_ref itself (marker ``nsa_ref_only``): skipped when a user implementation is under
test. Device from ``--nsa-device``.
"""
from __future__ import annotations

import pytest
import torch

from conformance import assertions as A
from conformance import brute
from conformance.cases import DEFAULT_CFG, SMALL_CFG, make_inputs, problem, single, varlen_case

pytestmark = [pytest.mark.nsa_ref_only, pytest.mark.usefixtures("nsa_cpu_threads")]

DTYPES = [torch.float32, torch.bfloat16]
CASES = [
    single(97, 4, 2, DEFAULT_CFG),
    single(45, 16, 1, SMALL_CFG, dk=16, dv=8),
    varlen_case(),  # lengths [0, 5, 40, 0, 97]
]


def _selection_free(case):
    g = brute.geometry(case.config())
    nb = max(brute.num_sel_blocks(T, g) for T in case.lengths)
    return case if g.n >= nb else case.with_cfg(n_sel=nb)


def _branch_call(branch, backend, case, x, block_idx):
    """Output (and for cmp the lse via the backend module) of nsa_ref for one backend."""
    import nsa_ref
    from nsa_ref import reference, sdpa

    cfg = case.config()
    cu = x.cu_seqlens
    if branch == "cmp":
        k_cmp, _ = nsa_ref.compress(x.k, cfg, cu)
        v_cmp, _ = nsa_ref.compress(x.v, cfg, cu)
        module = {"sdpa": sdpa, "reference": reference}[backend]
        return module.cmp_attention(x.q, k_cmp, v_cmp, cfg, cu)
    if branch == "sel":
        return nsa_ref.sel_attention(x.q, x.k, x.v, block_idx.to(x.q.device), cfg, cu, backend=backend), None
    if branch == "win":
        return nsa_ref.win_attention(x.q, x.k, x.v, cfg, cu, backend=backend), None
    return nsa_ref.nsa_attention(x.q, x.k, x.v, x.gates, cfg, cu, backend=backend), None


def _leaves(x):
    for t in (x.q, x.k, x.v):
        t.requires_grad_()
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=A.dtype_name)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("branch", ["cmp", "sel", "win", "nsa"])
def test_sdpa_within_rule_of_reference(branch, case, dtype, nsa_device):
    """out (and cmp lse) and dq/dk/dv: sdpa(low) vs reference(fp64), allowed m * |reference(low) - reference(fp64)| + c."""
    if branch == "nsa":
        case = _selection_free(case)
    block_idx = problem(case, "sel").args["block_idx"]
    low = make_inputs(case, dtype, nsa_device)
    runs = {}
    for name, backend, x in (("x", "sdpa", _leaves(low.clone())), ("base", "reference", _leaves(low.clone())),
                             ("ref", "reference", _leaves(low.to(torch.float64)))):
        out, lse = _branch_call(branch, backend, case, x, block_idx)
        gen = torch.Generator().manual_seed(11)
        # One upstream gradient for all three runs, rounded to the low dtype first.
        upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype).to(out.device, out.dtype)
        grads = torch.autograd.grad(out, (x.q, x.k, x.v), upstream, allow_unused=True)
        runs[name] = (out, lse, grads)
    where = f"{branch} {case} dtype={A.dtype_name(dtype)} (sdpa vs reference)"
    rule = f"sdpa backend within the {A.dtype_name(dtype)} tolerance rule of the reference"
    cu = low.cu_seqlens.cpu() if low.cu_seqlens is not None else None
    A.assert_close(runs["x"][0], runs["ref"][0], runs["base"][0], rule=rule, dtype=dtype, quantity="out",
                   where=where, cu_seqlens=cu, what="sdpa - reference64")
    if runs["x"][1] is not None:
        A.assert_close(runs["x"][1], runs["ref"][1], runs["base"][1], rule=rule, dtype=dtype, quantity="lse",
                       where=where, cu_seqlens=cu, what="sdpa - reference64")
    for i, q_name in enumerate(("dq", "dk", "dv")):
        gx, gb, gr = runs["x"][2][i], runs["base"][2][i], runs["ref"][2][i]
        if gr is None:
            continue
        if gx is None:
            raise AssertionError(f"{rule}: {where}: sdpa gives no {q_name} where the reference has one")
        A.assert_close(gx, gr, gb, rule=rule, dtype=dtype, quantity=q_name, where=where, cu_seqlens=cu,
                       what=f"{q_name} sdpa - reference64")
