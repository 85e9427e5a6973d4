"""Triton kernels for NSA's selection: fused block scoring + top-n, and group-centric selected
attention (forward and backward); the fused gate combine (``combine``, used by
``nsa_ref.api.combine_branches``); the decode kernels. Imported lazily: nothing here loads Triton
until used.

``unavailable_reason(x)`` says why these kernels cannot run on tensor ``x``'s device (None when
they can): Triton must import, and ``x`` must live on a CUDA GPU of compute capability >= 8.0, or
on the CPU with ``TRITON_INTERPRET=1`` (Triton's interpreter; slow, meant for tests, fp32/fp64
only). The backend's other facts (branches, dtypes, widest head dim) are in
``nsa_ref.backends.triton``.
"""
from __future__ import annotations

import os

import torch

from nsa_ref import packages


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run on ``x``'s device (and, under the interpreter, in its
    dtype), or None if they can."""
    if not packages.installed("triton"):
        return "Triton is not installed (pip install triton; it ships with CUDA builds of torch)"
    if x.device.type == "cpu":
        if interpreting():
            if x.dtype in (torch.float16, torch.bfloat16):
                # Measured with Triton 3.9's interpreter: bf16 selected attention off by ~8e8.
                return (f"dtype {x.dtype} under TRITON_INTERPRET=1: Triton's CPU interpreter computes 16-bit "
                        "kernels wrongly; use fp32 or fp64 on the CPU, or run on a GPU")
            return None
        return "inputs on cpu: the Triton kernels need CUDA (or TRITON_INTERPRET=1 for the slow interpreter)"
    if x.device.type != "cuda":
        return f"inputs on {x.device.type}: the Triton kernels need CUDA"
    if interpreting():
        return "TRITON_INTERPRET=1 runs kernels on the CPU only; unset it to use the GPU"
    major, _ = torch.cuda.get_device_capability(x.device)
    if major < 8:
        return f"compute capability {major}.x: the Triton kernels need sm80 or newer"
    return None


def triton_version() -> str:
    """Installed Triton version, or "missing"."""
    return packages.version("triton") or "missing"


def select_blocks(*args, **kwargs):
    """See ``nsa_ref.triton_kernels.scoring.select_blocks``."""
    from nsa_ref.triton_kernels.scoring import select_blocks as impl

    return impl(*args, **kwargs)


def sel_attention(*args, **kwargs):
    """See ``nsa_ref.triton_kernels.selected.sel_attention``."""
    from nsa_ref.triton_kernels.selected import sel_attention as impl

    return impl(*args, **kwargs)


__all__ = ["interpreting", "sel_attention", "select_blocks", "triton_version",
           "unavailable_reason"]
