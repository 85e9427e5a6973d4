"""Shared inputs and assertions for the nsa_ref unit tests (fp64 CPU, small configs)."""
from __future__ import annotations

import torch

from nsa_ref import NSAConfig
from nsa_ref.packing import cu_seqlens_from_lengths

# Every rule shows up within a few dozen tokens: blocks of 8 with stride 4, selection blocks of
# 8, 3 picks (1 initial + 1 local + 1 by score), window 8.
SMALL = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=8)
# A second shape of the rules: l' = 2l, l = 3d, 2 initial blocks, window not a block multiple.
ODD = NSAConfig(block_len=12, block_stride=4, sel_block=24, n_sel=4, n_init=2, n_local=1, window=11)

# Packed lengths with empty sequences, one shorter than l, and one long enough for selection.
LENGTHS = (0, 5, 21, 0, 40)


def cu_of(lengths) -> torch.Tensor:
    return cu_seqlens_from_lengths(lengths)


def qkv(T: int, hq: int, hkv: int, dk: int = 5, dv: int = 3, seed: int = 0, dtype=torch.float64, grad=False):
    """-> q (T, hq, dk), k (T, hkv, dk), v (T, hkv, dv), gates (T, hq, 3) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, hq, dk, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(T, hkv, dk, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(T, hkv, dv, generator=g, dtype=torch.float64).to(dtype)
    gates = torch.rand(T, hq, 3, generator=g, dtype=torch.float64).to(dtype)
    if grad:
        for x in (q, k, v):
            x.requires_grad_()
    return q, k, v, gates


def assert_close(got: torch.Tensor, want: torch.Tensor, rule: str, atol: float = 1e-12) -> None:
    """Fails naming the rule, the worst error and where it is."""
    assert got.shape == want.shape, f"{rule}: shape {tuple(got.shape)} != expected {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{rule}: non-finite values at {torch.nonzero(~torch.isfinite(got))[:4].tolist()}"
    err = (got.double() - want.double()).abs()
    if err.numel():
        worst = int(err.argmax())
        where = list(torch.unravel_index(torch.tensor(worst), err.shape))
        assert err.max() <= atol, (
            f"{rule}: max|got - want| = {err.max().item():.3e} > {atol:.0e} at index {[int(i) for i in where]}"
        )
