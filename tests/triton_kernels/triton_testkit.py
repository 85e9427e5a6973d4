"""Shared inputs and comparisons for the Triton kernel tests (no Triton import here)."""
from __future__ import annotations

import torch

from nsa_ref import NSAConfig
from nsa_ref.packing import cu_seqlens_from_lengths
from nsa_ref.compress import compress

#: Paper block sizes (l=32, d=16, l'=64) with few picks, so short sequences still have free picks.
DEFAULT4 = NSAConfig(n_sel=4)
#: l=16, d=8, l'=16: R = l'/d = 2 cells per selection block (the aligned fold), 9 blocks at T=130.
SMALL = NSAConfig(block_len=16, block_stride=8, sel_block=16, n_sel=4)
#: l=8, d=4, l'=8, 1 initial + 1 local + 1 free pick: selection matters from T=24 on.
TINY = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=8)
#: R = l'/d = 3 (not a power of two): the non-aligned fold, compression blocks spanning 2 cells.
ODD_R = NSAConfig(block_len=16, block_stride=8, sel_block=24, n_sel=3, n_init=1, n_local=1)
#: d=1, l=6, l'=3: R=3, each compression block touches 3 selection blocks, > 64 compression blocks
#: (several compression tiles) from T=70; no initial block.
STRIDE1 = NSAConfig(block_len=6, block_stride=1, sel_block=3, n_init=0, n_local=1, n_sel=2)

#: fp64 on a GPU: errors of 1e-8 to 3e-8 measured on the H100 (artifacts/2026-11-25/triton_sel,
#: tests_triton_kernels_gpu.log), as if exp2/log2 ran at fp32 precision; the interpreter is exact.
FP64_TOL = 1e-7 if torch.cuda.is_available() else 1e-10
#: Tolerances of the relative error (||got - want|| / ||want||) against fp64 references.
REL_TOL = {torch.float32: 1e-5, torch.float64: FP64_TOL}


def cu_of(lengths, device) -> torch.Tensor:
    """lengths: B ints -> cu_seqlens (B+1,) int32 on ``device``."""
    return cu_seqlens_from_lengths(lengths, device)


def qkv(T: int, hq: int, hkv: int, dk: int, dv: int, dtype, device, seed: int = 0):
    """-> q (T, hq, dk), k (T, hkv, dk), v (T, hkv, dv): standard normal, drawn in fp64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((T, hq, dk), (T, hkv, dk), (T, hkv, dv))
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes)


def q_and_kcmp(T: int, hq: int, hkv: int, dk: int, cfg: NSAConfig, dtype, device, cu=None, seed: int = 0):
    """-> q (T, hq, dk), k_cmp (Tc_total, hkv, dk): mean-compressed random keys."""
    q, k, _ = qkv(T, hq, hkv, dk, 1, dtype, device, seed)
    return q, compress(k, cfg, cu)[0]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64 (absolute error where want is all zero)."""
    diff = (got.double() - want.double()).norm()
    scale = want.double().norm()
    return float(diff / scale) if scale > 0 else float(diff)


def assert_same_blocks(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """block_idx (T, Hkv, n) equal entry for entry; else name the first differing row."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype, want.shape, want.dtype)
    bad = (got != want).any(-1).nonzero()
    if len(bad):
        t, h = (int(i) for i in bad[0])
        raise AssertionError(
            f"{what}: {len(bad)} (token, KV head) rows differ; first t={t} h={h}: "
            f"got {got[t, h].tolist()} want {want[t, h].tolist()}"
        )
