"""Dtype policy shared by the Triton wrappers: how dot products run and what accumulates."""
from __future__ import annotations

import torch
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of tl.dot: IEEE for fp32/fp64 inputs (no TF32), tensor-core default else."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators, scores and log-sum-exps: fp64 for fp64 inputs (so gradcheck can run on the
    kernels), fp32 otherwise (as ``nsa_ref.selection`` does for 16-bit inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    """``acc_dtype`` as a Triton type, for the kernels' ACC constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32
