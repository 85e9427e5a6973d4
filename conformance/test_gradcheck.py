"""Gradients of the implementation under test: fp64 ``torch.autograd.gradcheck``, no NaN, and
exactly zero gradient from rows that see nothing.

Pins: nsa_spec.md "rows with no visible block: output exactly 0, zero gradient, never NaN", and
that every branch is differentiable in q, k, v (and gates / compressed k, v).

Policy for implementations that are not differentiable (decided here, stated in the skip
message): when ``--nsa-*-impl`` names a user function whose output carries no autograd graph,
or which refuses fp64 inputs, these tests *skip* with the reason -- a forward-only kernel is a
legitimate thing to gate. nsa_ref itself is never allowed to skip: for it the same conditions
fail. Gradcheck always runs in fp64 (finite differences need it), whatever ``--nsa-dtype`` says.
"""
from __future__ import annotations

import pytest
import torch
# The class from its module: on torch 2.13 ``torch.autograd.gradcheck`` is the function, not the module.
from torch.autograd.gradcheck import GradcheckError

from conformance import assertions as A
from conformance import brute
from conformance.capabilities import NOT_APPLICABLE, require
from conformance.cases import FAMILIES, SMALL_TIED_CFG, SMALL_TIED_DIMS, lengths_to_cu, single, varlen_case

pytestmark = [pytest.mark.usefixtures("nsa_cpu_threads"), pytest.mark.nsa_rule("NSA-GRAD"),
              pytest.mark.nsa_needs("backward")]

# Tiny config: blocks of 4 with stride 2, selection blocks of 4, 2 picks (1 init + 1 local
# when there are 2+ candidates), window 3; T = 11 crosses every boundary.
TINY = dict(block_len=4, block_stride=2, sel_block=4, n_sel=2, n_init=1, n_local=1, window=3)
# Its tied twin (l = d = l' = 4, 1 init + 2 local forced, 3 picks) for tied-layout implementations.
TINY_TIED = dict(block_len=4, block_stride=4, sel_block=4, n_sel=3, n_init=1, n_local=2, window=3)
#: (T, Hq, Hkv) x config: G = 2 and 1 in the strided layout, the paper's G = 16 in the tied one.
CASES = [single(11, 2, 1, tuple(sorted(TINY.items())), dk=3, dv=2),
         single(11, 2, 2, tuple(sorted(TINY.items())), dk=3, dv=2),
         single(11, 16, 1, tuple(sorted(TINY_TIED.items())), dk=2, dv=2)]


def tiny_inputs(T=11, hq=2, hkv=1, dk=3, dv=2, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, hq, dk, generator=gen, dtype=torch.float64)
    k = torch.randn(T, hkv, dk, generator=gen, dtype=torch.float64)
    v = torch.randn(T, hkv, dv, generator=gen, dtype=torch.float64)
    # Gates away from 0 and 1 so finite differences stay inside [0, 1].
    gates = 0.2 + 0.6 * torch.rand(T, hq, 3, generator=gen, dtype=torch.float64)
    return [t.to(device).requires_grad_() for t in (q, k, v, gates)]


def _cfg():
    from nsa_ref import NSAConfig

    return NSAConfig(**TINY)


def _case_inputs(case, device, seed=0):
    """(cfg, [q, k, v, gates]) of a tiny gradcheck case, fp64 leaves on ``device``."""
    return case.config(), tiny_inputs(T=case.total, hq=case.hq, hkv=case.hkv, dk=case.dk, dv=case.dv,
                                      device=device, seed=seed)


def _differentiable_or_skip(impl_under_test, slot: str, fn, *inputs, need_fp64: bool = True):
    """Run once; skip (user impl) or fail (nsa_ref) when fp64 is refused or no graph comes back.

    ``need_fp64`` (gradcheck): an implementation that does not take fp64, or declares a compute
    precision coarser than fp64, is "not applicable": finite differences at eps = 1e-6 need fp64
    arithmetic. Backward in the dtype under test (``need_fp64=False``) needs neither."""
    user = not impl_under_test.slots[slot].is_reference
    caps = impl_under_test.capabilities(slot)
    if user and need_fp64 and "fp64" not in caps.dtypes:
        pytest.skip(f"{NOT_APPLICABLE}{slot}: gradcheck needs fp64 inputs; the implementation declares dtypes "
                    f"{', '.join(caps.dtypes)}")
    if user and need_fp64 and caps.judged_dtype("fp64") != "fp64":
        pytest.skip(f"{NOT_APPLICABLE}{slot}: gradcheck needs fp64 arithmetic; the implementation declares it "
                    f"computes in {caps.compute_dtype}")
    try:
        out = fn(*inputs)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        if user and need_fp64:
            pytest.skip(f"{slot} implementation under test refused fp64 inputs ({type(exc).__name__}: {exc}); "
                        "gradcheck needs fp64")
        raise
    out_t = out[0] if isinstance(out, tuple) else out
    if not out_t.requires_grad:
        msg = f"{slot} implementation under test returned an output with no autograd graph (not differentiable)"
        if user:
            pytest.skip(msg + "; gradient tests skipped")
        raise AssertionError(msg)
    return out


def _gradcheck(fn, inputs, where):
    """fp64 finite differences of the whole Jacobian vs autograd (tiny shapes keep it cheap)."""
    try:
        torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=False)
    except GradcheckError as exc:
        first = str(exc).strip().splitlines()[0]
        raise AssertionError(f"gradient (fp64 gradcheck): {where}: {first}") from None


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck_win(case, impl_under_test, nsa_device):
    """d(win)/d(q, k, v) by finite differences."""
    cfg, (q, k, v, _) = _case_inputs(case, nsa_device)
    _differentiable_or_skip(impl_under_test, "win", impl_under_test.win, q, k, v, cfg)
    _gradcheck(lambda q, k, v: impl_under_test.win(q, k, v, cfg, None), (q, k, v), f"win {case}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck_sel(case, impl_under_test, nsa_device):
    """d(sel)/d(q, k, v) for fixed block indices (the brute force's choice)."""
    cfg, (q, k, v, _) = _case_inputs(case, nsa_device)
    k_cmp, _ = brute.compress(k.detach().cpu(), cfg)
    idx = brute.select_blocks(q.detach().cpu(), k_cmp, cfg).to(nsa_device)
    _differentiable_or_skip(impl_under_test, "sel", impl_under_test.sel, q, k, v, idx, cfg)
    _gradcheck(lambda q, k, v: impl_under_test.sel(q, k, v, idx, cfg, None), (q, k, v), f"sel {case}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck_cmp(case, impl_under_test, nsa_device):
    """d(cmp out)/d(q, k_cmp, v_cmp); rows t < l - 1 included (their gradient must be 0)."""
    cfg, (q, k, v, _) = _case_inputs(case, nsa_device)
    k_cmp = brute.compress(k.detach(), cfg)[0].requires_grad_()
    v_cmp = brute.compress(v.detach(), cfg)[0].requires_grad_()
    _differentiable_or_skip(impl_under_test, "cmp", impl_under_test.cmp, q, k_cmp, v_cmp, cfg)
    _gradcheck(lambda q, kc, vc: impl_under_test.cmp(q, kc, vc, cfg, None)[0], (q, k_cmp, v_cmp), f"cmp {case}")


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=str)
def test_gradcheck_nsa(case, impl_under_test, nsa_device):
    """d(nsa)/d(q, k, v, gates), selection included (the inputs keep it away from ties)."""
    cfg, inputs = _case_inputs(case, nsa_device)
    _differentiable_or_skip(impl_under_test, "nsa", impl_under_test.nsa, *inputs, cfg)
    _gradcheck(lambda q, k, v, g: impl_under_test.nsa(q, k, v, g, cfg, None), tuple(inputs), f"nsa {case}")


@pytest.mark.nsa_rule("NSA-VARLEN")
@pytest.mark.parametrize("case", [varlen_case((0, 5, 0, 6), hq=2, hkv=1, cfg=tuple(sorted(TINY.items())), dk=3, dv=2)],
                         ids=str)
def test_gradcheck_nsa_varlen(case, impl_under_test, nsa_device):
    """Same through cu_seqlens with empty sequences: lengths [0, 5, 0, 6]."""
    cfg, inputs = _case_inputs(case, nsa_device, seed=1)
    cu = lengths_to_cu(case.lengths, device=nsa_device)
    _differentiable_or_skip(impl_under_test, "nsa", impl_under_test.nsa, *inputs, cfg, cu)
    _gradcheck(lambda q, k, v, g: impl_under_test.nsa(q, k, v, g, cfg, cu), tuple(inputs), "nsa varlen [0, 5, 0, 6]")


@pytest.mark.nsa_rule("NSA-FINITE", "NSA-CMP-EMPTY")
@pytest.mark.parametrize("case", [varlen_case((0, 5, 35, 0), hq=4, hkv=2, dk=16, dv=8),
                                  varlen_case((0, 5, 70, 0), hq=16, hkv=1, cfg=SMALL_TIED_CFG, **SMALL_TIED_DIMS),
                                  varlen_case((5, 70), hq=16, hkv=1, cfg=SMALL_TIED_CFG, **SMALL_TIED_DIMS),
                                  varlen_case((31, 0, 97), hq=32, hkv=2, cfg=FAMILIES["tied32"].cfg, dk=32, dv=32),
                                  varlen_case((0, 63, 130), hq=16, hkv=1, cfg=FAMILIES["tied64"].cfg, dk=32, dv=32),
                                  varlen_case((65, 130), hq=16, hkv=1, cfg=FAMILIES["tied64-d128"].cfg, dk=128,
                                              dv=128)], ids=str)
@pytest.mark.parametrize("slot", ["cmp", "sel", "win", "nsa"])
def test_grads_finite_and_empty_rows_zero(slot, case, impl_under_test, nsa_device, nsa_dtype):
    """Backward in the dtype under test: all gradients finite; for cmp, rows t < l - 1 (T=40,
    l=8) and whole sequences shorter than l give q-gradient exactly 0."""
    cfg = case.config()
    lengths = list(case.lengths)
    T = sum(lengths)
    if slot == "cmp":
        require(impl_under_test, ("compress", "cmp"), case, ("backward",))
    cu = lengths_to_cu(lengths, device=nsa_device)
    gen = torch.Generator().manual_seed(5)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(nsa_device, nsa_dtype).requires_grad_()

    q, k, v = leaf(T, case.hq, case.dk), leaf(T, case.hkv, case.dk), leaf(T, case.hkv, case.dv)
    gates = torch.rand(T, case.hq, 3, generator=gen, dtype=torch.float64).to(nsa_device, nsa_dtype).requires_grad_()
    if slot == "cmp":
        kc = impl_under_test.compress(k, cfg, cu)
        vc = impl_under_test.compress(v, cfg, cu)
        args, fn = (q, kc, vc, cfg, cu), (lambda *a: impl_under_test.cmp(*a)[0])
    elif slot == "sel":
        kc = brute.compress(k.detach().cpu().double(), cfg, cu.cpu())[0]
        idx = brute.select_blocks(q.detach().cpu().double(), kc, cfg, cu.cpu()).to(nsa_device)
        args, fn = (q, k, v, idx, cfg, cu), impl_under_test.sel
    elif slot == "win":
        args, fn = (q, k, v, cfg, cu), impl_under_test.win
    else:
        args, fn = (q, k, v, gates, cfg, cu), impl_under_test.nsa
    out = _differentiable_or_skip(impl_under_test, slot, fn, *args, need_fp64=False)
    out = out[0] if isinstance(out, tuple) else out
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(nsa_device, out.dtype)
    leaves = [q, k, v] + ([gates] if slot == "nsa" else [])
    grads = torch.autograd.grad(out, leaves, upstream, allow_unused=True)
    where = f"{slot} lengths={lengths} dtype={A.dtype_name(nsa_dtype)}"
    for name, grad in zip(("dq", "dk", "dv", "dgates"), grads):
        if grad is not None:
            A.assert_finite(grad, where=where, name=name, cu_seqlens=cu.cpu())
    if slot == "cmp":
        empty = torch.cat([torch.arange(n) < cfg.block_len - 1 for n in lengths])
        A.assert_zero_rows(out, empty, rule=A.RULE_CMP_EMPTY, where=where, cu_seqlens=cu.cpu())
        if grads[0] is None:
            raise AssertionError(f"{A.RULE_ZERO_GRAD}: {where}: dq is None (cmp output does not depend on q)")
        A.assert_zero_rows(grads[0], empty, rule=A.RULE_ZERO_GRAD, where=where, name="dq", cu_seqlens=cu.cpu())

