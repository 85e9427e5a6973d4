"""conformance/test_gradcheck.py's ``_gradcheck`` turns a real gradient failure into its message.

Pins: a wrong backward fails with AssertionError "gradient (fp64 gradcheck): <where>: Jacobian
mismatch ..." (the first line of torch's GradcheckError, nothing chained), not an AttributeError
from looking the class up as ``torch.autograd.gradcheck.GradcheckError`` (on torch 2.13
``torch.autograd.gradcheck`` is the function); a right backward passes.
"""
from __future__ import annotations

import pytest
import torch

from conformance.test_gradcheck import _gradcheck


class _Square(torch.autograd.Function):
    """x -> x * x with backward ``factor`` * x * grad (right for factor 2)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(x)
        ctx.factor = factor
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ctx.factor * x * grad, None


def _x():
    """(3, 2) fp64 leaf."""
    return torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_()


def test_wrong_backward_fails_with_the_gradcheck_message():
    with pytest.raises(AssertionError) as info:
        _gradcheck(lambda x: _Square.apply(x, 3.0), (_x(),), "square with a wrong backward")
    message = str(info.value)
    assert message.startswith("gradient (fp64 gradcheck): square with a wrong backward: Jacobian mismatch"), message
    assert info.value.__cause__ is None and info.value.__suppress_context__, "the GradcheckError is not chained"


def test_right_backward_passes():
    _gradcheck(lambda x: _Square.apply(x, 2.0), (_x(),), "square")
