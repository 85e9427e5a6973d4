"""The fused gate combine (nsa_ref.triton_kernels.combine) against the torch ops of the formula.

Pins: the output and all four gradients (gates and the three branch outputs) equal the torch
formula computed in fp64 from the same values, to fp32 rounding, on shapes with ragged row counts
(not a multiple of the kernel's row tile), head dims that are not powers of two, zero rows, and
non-contiguous branch outputs; and where ``nsa_ref.api.combine_branches`` sends a call (CUDA
16-bit/fp32 with matching shapes: fused; broadcast gates, fp64 or the CPU: torch).
"""
from __future__ import annotations

import pytest
import torch

from nsa_ref import api

pytestmark = pytest.mark.usefixtures("interpret_env")


def _formula(g, a, b, c):
    return g[..., 0:1] * a + g[..., 1:2] * b + g[..., 2:3] * c


@pytest.mark.parametrize("shape", [(37, 5, 48), (16, 4, 128), (1, 1, 16), (0, 3, 32)])
def test_fused_combine_equals_formula(kdev, shape):
    from nsa_ref.triton_kernels.combine import combine_branches

    T, H, D = shape
    gen = torch.Generator().manual_seed(sum(shape))
    g = torch.rand(T, H, 3, generator=gen)
    outs = [torch.randn(T, H, D, generator=gen) for _ in range(3)]
    outs[1] = torch.randn(T, D, H, generator=gen).transpose(1, 2)  # a strided branch output
    do = torch.randn(T, H, D, generator=gen)
    leaves = [x.to(kdev).requires_grad_() for x in (g, *outs)]
    got = combine_branches(*leaves)
    grads = torch.autograd.grad(got, leaves, do.to(kdev)) if T else [torch.zeros_like(x) for x in leaves]
    ref_leaves = [x.double().requires_grad_() for x in (g, *outs)]
    ref = _formula(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double()) if T else [torch.zeros_like(x) for x in ref_leaves]
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double().cpu(), ref.detach(), rtol=1e-6, atol=1e-6)
    for name, a, b in zip(("gates", "o_cmp", "o_sel", "o_win"), grads, ref_grads):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_api_sends_only_matching_cuda_calls_to_the_kernel(monkeypatch):
    t = torch.empty(4, 2, 8)
    g = torch.empty(4, 2, 3)
    assert not api._fused_combine(g, t, t, t)  # CPU tensors: the torch ops
    meta = lambda *s, dt=torch.bfloat16: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
    assert not api._fused_combine(meta(4, 2, 3), meta(4, 2, 8), meta(4, 2, 8), meta(4, 2, 8))  # not CUDA
    if torch.cuda.is_available():
        cuda = lambda *s, dt=torch.bfloat16: torch.empty(*s, dtype=dt, device="cuda")  # noqa: E731
        o = cuda(4, 2, 8)
        assert api._fused_combine(cuda(4, 2, 3), o, o, o)
        assert not api._fused_combine(cuda(4, 1, 3), o, o, o)  # broadcast gates
        assert not api._fused_combine(cuda(4, 2, 3), o, cuda(4, 2, 8, dt=torch.float16), o)  # mixed dtypes
        o64 = cuda(4, 2, 8, dt=torch.float64)
        assert not api._fused_combine(cuda(4, 2, 3), o64, o64, o64)  # fp64: exact torch ops
        monkeypatch.setenv("NSA_USE_TRITON", "0")
        assert not api._fused_combine(cuda(4, 2, 3), o, o, o)
