"""What a backend is, and what it is asked: one branch call, the device it would run on.

A backend (``nsa_ref.backends.<name>``) states its facts as attributes and answers two questions,
after xformers' operators:

- ``refusal(call, explicit) -> str | None``: why it cannot run this call (None: it can), one
  sentence quoting the value. ``explicit``: the caller named this backend (backend="fa2"), so
  the switches and tuned minimum lengths meant for "auto" do not apply.
- ``run(route, branch, args, cu_seqlens)``: run the branch (args as the public branch function
  takes them, q first and cfg last) on the path the router chose.

Facts: ``name`` (what backend= says), ``label`` (what messages say); ``branches`` (of "cmp", "sel", "win", "select"); ``dtypes`` (None: any floating
dtype); ``max_head_dim`` (None: no limit). ``describe(call, explicit)`` is the reason a route
records when this backend is taken (None: the router records why the ones before it refused);
``unavailable(branch, why)`` the error an explicit request that it refuses raises.

``nsa_ref.router`` alone walks the backends in priority order; nothing else picks one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

BRANCHES = ("cmp", "sel", "win", "select")


class DeviceView(Protocol):
    """What a backend may ask of the device a call would run on: the real one behind the call's
    tensors (``nsa_ref.router``), or one described by plain facts (``router.DeviceFacts``)."""

    device_type: str

    def caps(self): ...  # contracts.DeviceCaps of the GPU, None off CUDA
    def gpu(self) -> str: ...  # torch.cuda.get_device_name, "cpu" off CUDA
    def fa2_provider_for(self, preference: str): ...  # (contract provider name, provider or None), None: no provider
    def triton_verdict(self) -> str | None: ...  # why the Triton kernels cannot run on this device and dtype


@dataclass
class BranchCall:
    """One branch call as the router sees it.

    q: (T, Hq, Dk), k: (S, Hkv, Dk), v: (S, Hkv, Dv) (real or meta: backends read shapes, dtype
    and requires_grad only; for ``select``: k = v = k_cmp); cu_seqlens: (B+1,) or None; settings:
    the NSA_* flags; device: a ``DeviceView``. ``memo``: what a backend worked out while deciding
    (the FA-2 plan and provider), so that the run uses what was checked.
    """

    branch: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cfg: Any
    cu_seqlens: Any
    settings: Any
    device: DeviceView
    memo: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def training(self) -> bool:
        """A backward will follow (what the backward-only FA-2 rules need to know)."""
        return torch.is_grad_enabled() and any(x.requires_grad for x in (self.q, self.k, self.v))


class Backend(Protocol):
    name: str
    label: str  # how messages name it ("FA-2", "Triton")
    branches: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None
    max_head_dim: int | None

    def refusal(self, call: BranchCall, explicit: bool) -> str | None: ...
    def describe(self, call: BranchCall, explicit: bool) -> str | None: ...
    def unavailable(self, branch: str, why: str) -> Exception: ...
    def run(self, route, branch: str, args: tuple, cu_seqlens): ...


def dtype_refusal(backend: Backend, dtype: torch.dtype, names: str) -> str | None:
    """The dtype rule shared by every backend: ``names`` spells its dtypes for the message."""
    if backend.dtypes is None or dtype in backend.dtypes:
        return None
    return f"dtype {dtype} has no {backend.label} path ({names})"


def width_refusal(backend: Backend, branch: str, dk: int, dv: int) -> str | None:
    """Head dims wider than ``backend.max_head_dim`` (``select`` reads only Dk)."""
    if backend.max_head_dim is None:
        return None
    widths = {"Dk": dk} if branch == "select" else {"Dk": dk, "Dv": dv}
    for name, width in widths.items():
        if width > backend.max_head_dim:
            return f"{name}={width} exceeds the {backend.label} kernels' widest head dim {backend.max_head_dim}"
    return None
