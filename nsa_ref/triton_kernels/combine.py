"""NSA's gate combine in one pass each way (nsa_spec.md, "Gating").

Forward: o = g_cmp * o_cmp + g_sel * o_sel + g_win * o_win for gates (T, Hq, 3) and branch
outputs (T, Hq, Dv): each branch output is read once and o written once, with the sum in fp32
(the torch path makes three passes, rounding to the output dtype after each). Backward: one pass
reads do and the three branch outputs and writes d o_x = g_x * do and d g_x = sum_Dv(do * o_x)
(fp32 sums). One program holds ``ROWS`` (t, h) rows of the flattened (T * Hq, Dv) view.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa_ref.triton_kernels.layout import next_pow2

#: (t, h) rows per program; a 16 x 128 tile of each of four tensors is 16 KB in bf16.
ROWS = 16


@triton.jit
def _combine_fwd_kernel(G, A, B, C, O, n_rows, Dv, sg, BD: tl.constexpr, R: tl.constexpr):
    r = tl.program_id(0) * R + tl.arange(0, R)
    rm = r < n_rows
    d = tl.arange(0, BD)
    m = rm[:, None] & (d < Dv)[None, :]
    off = r[:, None].to(tl.int64) * Dv + d[None, :]
    g0 = tl.load(G + r.to(tl.int64) * sg + 0, mask=rm, other=0.0).to(tl.float32)
    g1 = tl.load(G + r.to(tl.int64) * sg + 1, mask=rm, other=0.0).to(tl.float32)
    g2 = tl.load(G + r.to(tl.int64) * sg + 2, mask=rm, other=0.0).to(tl.float32)
    o = g0[:, None] * tl.load(A + off, mask=m, other=0.0).to(tl.float32)
    o += g1[:, None] * tl.load(B + off, mask=m, other=0.0).to(tl.float32)
    o += g2[:, None] * tl.load(C + off, mask=m, other=0.0).to(tl.float32)
    tl.store(O + off, o.to(O.dtype.element_ty), mask=m)


@triton.jit
def _branch_grads(G, X, DX, DG, i: tl.constexpr, do, r, rm, m, off, sg):
    """d o_x = g_x * do and d g_x = sum over Dv of do * o_x, for branch i of the rows r."""
    g = tl.load(G + r.to(tl.int64) * sg + i, mask=rm, other=0.0).to(tl.float32)
    tl.store(DX + off, (g[:, None] * do).to(DX.dtype.element_ty), mask=m)
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    tl.store(DG + r.to(tl.int64) * 3 + i, tl.sum(do * x, 1), mask=rm)


@triton.jit
def _combine_bwd_kernel(G, A, B, C, DO, DA, DB, DC, DG, n_rows, Dv, sg,
                        BD: tl.constexpr, R: tl.constexpr):
    r = tl.program_id(0) * R + tl.arange(0, R)
    rm = r < n_rows
    d = tl.arange(0, BD)
    m = rm[:, None] & (d < Dv)[None, :]
    off = r[:, None].to(tl.int64) * Dv + d[None, :]
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    _branch_grads(G, A, DA, DG, 0, do, r, rm, m, off, sg)
    _branch_grads(G, B, DB, DG, 1, do, r, rm, m, off, sg)
    _branch_grads(G, C, DC, DG, 2, do, r, rm, m, off, sg)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.is_contiguous() else x.contiguous().reshape(-1, x.shape[-1])


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, a, b, c):
        g = gates.reshape(-1, 3).contiguous()
        a2, b2, c2 = _flat(a), _flat(b), _flat(c)
        n, Dv = a2.shape
        out = torch.empty_like(a2)
        if n:
            _combine_fwd_kernel[(triton.cdiv(n, ROWS),)](g, a2, b2, c2, out, n, Dv, g.stride(0),
                                                          BD=next_pow2(Dv, 16), R=ROWS, num_warps=4)
        ctx.save_for_backward(g, a2, b2, c2)
        ctx.shapes = (gates.shape, gates.dtype, a.shape)
        return out.view(a.shape)

    @staticmethod
    def backward(ctx, do):
        g, a2, b2, c2 = ctx.saved_tensors
        gshape, gdtype, oshape = ctx.shapes
        do2 = _flat(do)
        n, Dv = do2.shape
        da, db, dc = (torch.empty_like(x) for x in (a2, b2, c2))
        dg = torch.empty(n, 3, dtype=torch.float32, device=do.device)
        if n:
            _combine_bwd_kernel[(triton.cdiv(n, ROWS),)](g, a2, b2, c2, do2, da, db, dc, dg, n, Dv, g.stride(0),
                                                          BD=next_pow2(Dv, 16), R=ROWS, num_warps=4)
        return dg.to(gdtype).view(gshape), da.view(oshape), db.view(oshape), dc.view(oshape)


def combine_branches(gates: torch.Tensor, o_cmp: torch.Tensor, o_sel: torch.Tensor,
                     o_win: torch.Tensor) -> torch.Tensor:
    """gates: (T, Hq, 3), o_*: (T, Hq, Dv), one dtype -> (T, Hq, Dv) in that dtype, order (cmp,
    sel, win). Differentiable in all four inputs."""
    return _Combine.apply(gates, o_cmp, o_sel, o_win)


__all__ = ["ROWS", "combine_branches"]
