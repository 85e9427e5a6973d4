"""The Triton backend: block selection and the selected branch (``nsa_ref.triton_kernels``).

Its facts: the branches it has kernels for, the dtypes they take (fp32/fp64 run their dot
products in IEEE arithmetic, fp64 accumulates in fp64, there for gradcheck), the widest head dim
they tile (one power-of-two tile per row). The device verdict (Triton installed, CUDA sm80+, or
the CPU interpreter under TRITON_INTERPRET=1) is ``triton_kernels.unavailable_reason``.
On an H100 at 64K tokens they are 19.5x (sel forward, 23x forward+backward) and 32x (select)
faster than the next path (artifacts/2026-11-25/triton_sel).
"""
from __future__ import annotations

import torch

from nsa_ref import triton_kernels
from nsa_ref.backends.base import BranchCall, dtype_refusal, width_refusal


class TritonUnavailable(RuntimeError):
    """backend='triton' was asked for explicitly but the Triton kernels cannot run this call."""


class TritonBackend:
    name, label = "triton", "Triton"
    branches = ("sel", "select")
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    max_head_dim = 256

    def refusal(self, call: BranchCall, explicit: bool) -> str | None:
        """'auto' needs NSA_USE_TRITON and CUDA inputs; an explicit backend='triton' skips the
        switch and also runs on CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter)."""
        if not explicit and not call.settings.use_triton:
            return "disabled by NSA_USE_TRITON=0"
        if not explicit and call.device.device_type != "cuda":
            return f"inputs on {call.device.device_type}, the Triton kernels need CUDA"
        return (call.device.triton_verdict()
                or width_refusal(self, call.branch, call.q.shape[-1], call.v.shape[-1]))

    def describe(self, call: BranchCall, explicit: bool) -> str:
        return f"triton {triton_kernels.triton_version()}"

    def unavailable(self, branch: str, why: str) -> Exception:
        return TritonUnavailable(f"backend='triton' requested for {branch} but it cannot run: {why}")

    def device_reason(self, x) -> str | None:
        """The Triton kernels' verdict on ``x``'s device and dtype (anything with .device, .dtype)."""
        return dtype_refusal(self, x.dtype, "fp16, bf16, fp32, fp64") or triton_kernels.unavailable_reason(x)

    def run(self, route, branch: str, args: tuple, cu_seqlens):
        if branch == "select":
            q, k_cmp, lse, cfg = args
            return triton_kernels.select_blocks(q.detach(), k_cmp.detach(), cfg, cu_seqlens,
                                                lse=None if lse is None else lse.detach())
        return triton_kernels.sel_attention(*args, cu_seqlens)
