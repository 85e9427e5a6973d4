"""The one place that decides which backend runs an NSA branch call, and records why.

``choose(branch, backend, q=, k=, v=, cfg=, cu_seqlens=)`` walks ``nsa_ref.backends.PRIORITY``
(Triton, FA-2, SDPA, reference, torch selection) and takes the first backend that covers the
branch and does not refuse the call; every backend's facts (branches, dtypes, head-dim limits,
switches, thresholds, contracts) and refusals live in its own module under ``nsa_ref/backends``.
backend="auto" walks the whole list (sdpa and torch never refuse, so it ends there); a named
backend that covers the branch is the only one tried and its refusal raises (FA2Unavailable,
TritonUnavailable); a named backend without a kernel for the branch lets the walk go on after it
(backend="triton" on cmp: as "auto"; backend="sdpa" on select: the torch selection).
Every decision is counted in ``nsa_ref.telemetry`` with its reason.

``expected_path`` walks the same list for a device described by ``DeviceFacts`` (capability,
provider, Triton's verdict), without that device: tests derive route expectations from it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from nsa_ref import telemetry
from nsa_ref.backends import BY_NAME, PRIORITY, FA2Unavailable, TritonUnavailable
from nsa_ref.backends.base import BRANCHES, BranchCall
from nsa_ref.fa2.thresholds import gpu_name as _device_name
from nsa_ref.settings import NSASettings, current_settings

BACKENDS = ("auto", "reference", "sdpa", "fa2", "triton")
#: How a reason names a branch's kernel ("backend='sdpa' has no selection kernel of its own").
_KERNEL_WORD = {"cmp": "cmp", "sel": "sel", "win": "win", "select": "selection"}


@dataclass(frozen=True)
class Route:
    """Where a branch call runs and why; ``provider``, ``pref_fp16`` and ``plan`` (the checked
    ``nsa_ref.fa2.calls.FA2Plan``) are set for the fa2 path. ``debug_timing`` and ``audit_rows``
    (0: no SDPA audit) are the settings' instructions for watching the run, copied here so that the
    caller reads no settings object after the decision."""

    branch: str
    path: str
    reason: str
    provider: object | None = None
    pref_fp16: bool = False
    plan: Any = None
    debug_timing: bool = False
    audit_rows: int = 0

    def run(self, args: tuple, cu_seqlens):
        """Run the branch on this route: args as the public branch function takes them."""
        return BY_NAME[self.path].run(self, self.branch, args, cu_seqlens)


def check_backend(backend: str) -> str:
    """backend if it is one of ``BACKENDS``, else ValueError naming them (modules call this when
    built, so a typo fails there rather than at the first forward)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return backend


def _check_names(branch: str, backend: str) -> None:
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; use one of {', '.join(BRANCHES)}")
    check_backend(backend)


def _reason(refusals: list[tuple[str, str]], taken_after: str | None) -> str:
    """Why the taken backend ran: each refusal named by its backend, in the order tried; a lone
    refusal of the backend right before the taken one in ``PRIORITY`` is the whole story and
    stands bare (FA-2's "contract: FA2-..." when SDPA runs cmp)."""
    if len(refusals) == 1 and refusals[0][0] == taken_after:
        return refusals[0][1]
    return "; ".join(f"{name}: {why}" for name, why in refusals)


def _walk(call: BranchCall, backend: str):
    """The routing policy: -> (the backend taken, the reason it records).

    Each backend's ``refusal`` is asked at most once, and only when the walk reaches it.
    """
    branch = call.branch
    start, passed_over = 0, None
    if backend != "auto":
        named = BY_NAME[backend]
        if branch in named.branches:
            why = named.refusal(call, True)
            if why is not None:
                raise named.unavailable(branch, why)
            return named, named.describe(call, True)
        start, passed_over = PRIORITY.index(named) + 1, backend
    refusals: list[tuple[str, str]] = []
    for i, candidate in enumerate(PRIORITY[start:], start):
        if branch not in candidate.branches:
            continue
        why = candidate.refusal(call, False)
        if why is None:
            reason = candidate.describe(call, False)
            if reason is None:
                reason = (_reason(refusals, PRIORITY[i - 1].name if i else None) if refusals else
                          f"backend={passed_over!r} has no {_KERNEL_WORD[branch]} kernel of its own")
            return candidate, reason
        refusals.append((candidate.name, why))
    raise RuntimeError(f"no backend covers {branch}")  # pragma: no cover - sdpa and torch never refuse


# --- the router on real tensors -------------------------------------------------------------------

def _on_cuda(q: torch.Tensor) -> bool:
    """Whether q counts as on CUDA (tests replace this to reach the GPU rules on CPU tensors)."""
    return q.is_cuda


def _device_type(q: torch.Tensor) -> str:
    return "cuda" if _on_cuda(q) else q.device.type


def _device_caps(q: torch.Tensor):
    """contracts.DeviceCaps of q's GPU, or None off CUDA (what the FA-2 contracts check against)."""
    import contracts

    return contracts.DeviceCaps.from_device(q.device) if q.is_cuda else None


def _gpu_name(device: torch.device) -> str:
    """The GPU's name as torch reports it (what fa2_thresholds.yaml is keyed by); "cpu" off CUDA."""
    return _device_name(device)


class _TensorDevice:
    """The device behind a call's q, asked lazily (each fact only when a backend needs it)."""

    def __init__(self, q: torch.Tensor) -> None:
        self.q = q
        self.device_type = _device_type(q)

    def caps(self):
        return _device_caps(self.q)

    def gpu(self) -> str:
        return _gpu_name(self.q.device)

    def fa2_provider_for(self, preference: str):
        from nsa_ref import fa2

        provider = fa2.resolve_provider(preference)
        return None if provider is None else (provider.contract_provider, provider)

    def triton_verdict(self) -> str | None:
        return BY_NAME["triton"].device_reason(self.q)


def decide(branch: str, backend: str = "auto", *, q, k, v, cfg, cu_seqlens=None,
           settings: NSASettings | None = None) -> Route:
    """``choose`` without the telemetry record (for a caller that records what it then runs)."""
    _check_names(branch, backend)
    s = current_settings() if settings is None else settings
    call = BranchCall(branch, q, k, v, cfg, cu_seqlens, s, _TensorDevice(q))
    taken, reason = _walk(call, backend)
    watch = {"debug_timing": s.debug_timing, "audit_rows": s.sdpa_audit_rows if s.sdpa_audit else 0}
    if taken.name == "fa2":
        return Route(branch, "fa2", reason, call.memo["provider"], s.fa2_pref_fp16, call.memo["plan"], **watch)
    return Route(branch, taken.name, reason, **watch)


def choose(branch: str, backend: str = "auto", *, q, k, v, cfg, cu_seqlens=None,
           settings: NSASettings | None = None) -> Route:
    """Route for one call of `branch` (cmp | sel | win | select) with `backend`
    (auto | reference | sdpa | fa2 | triton).

    q: (T, Hq, Dk), k: (T or Tc, Hkv, Dk), v: (T or Tc, Hkv, Dv) (for ``select``: k = v = k_cmp).
    Raises FA2Unavailable / TritonUnavailable when backend='fa2' / 'triton' is asked for and
    cannot run; 'auto' falls back (Triton -> FA-2 -> SDPA; select: Triton -> torch) and says why.
    """
    s = current_settings() if settings is None else settings
    key = _call_key(branch, backend, q, k, v, cfg, cu_seqlens, s)
    if _compiling():
        # Inside a graph torch.compile traces: take the decision made eagerly for this very call
        # (the backends' checks build pydantic models and meta tensors, which dynamo cannot trace
        # on the CUDA path); without one, decide in the trace (what the CPU paths can do).
        known = _decided.get(key)
        if known is not None and known[0] is cfg and known[1] is s:
            return known[2]
        return decide(branch, backend, q=q, k=k, v=v, cfg=cfg, cu_seqlens=cu_seqlens, settings=s)
    route = decide(branch, backend, q=q, k=k, v=v, cfg=cfg, cu_seqlens=cu_seqlens, settings=s)
    if len(_decided) >= _DECIDED_MAX:
        _decided.clear()
    _decided[key] = (cfg, s, route)  # cfg and s kept alive: their ids in the key stay theirs
    telemetry.record(branch, route.path, route.reason)
    return route


# --- decisions remembered for torch.compile -------------------------------------------------------

#: call key -> (cfg, settings, Route) of the last eager decision for that call (bounded).
_decided: dict[tuple, tuple] = {}
_DECIDED_MAX = 1024


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _call_key(branch, backend, q, k, v, cfg, cu_seqlens, settings) -> tuple:
    """Everything a decision reads, as plain values: names, the config and settings objects (by
    identity: both are frozen), shapes, strides, dtypes, device, whether a backward follows, and
    the packing's host offsets. Reads nothing from the device."""
    packed = cu_seqlens is not None and getattr(cu_seqlens, "is_packed", True)
    packing = (tuple(cu_seqlens.offsets), cu_seqlens.max_seqlen) if packed and hasattr(cu_seqlens, "offsets") else (
        (tuple(cu_seqlens.shape), cu_seqlens.dtype) if packed else None)
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (branch, backend, id(cfg), id(settings), q.device, q.dtype, k.dtype, v.dtype,
            tuple(q.shape), tuple(k.shape), tuple(v.shape), q.stride(), k.stride(), v.stride(), training,
            packing)


def forget_decisions() -> None:
    """Drop the remembered decisions (tests that change what the backends see mid-process)."""
    _decided.clear()


# --- the same policy for a device described, not present -----------------------------------------

class _Placement(NamedTuple):
    """What the Triton device verdict reads of a tensor: its device and dtype."""

    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class DeviceFacts:
    """What the router asks of the device, as plain values, so that its policy can be evaluated
    for a device that is not here (``expected_path``; a CPU test fakes an H200 with these).

    device_type: "cuda", "cpu", ... (the inputs' device type).
    capability: (major, minor) of the GPU (the FA-2 contracts' arch rules), None off CUDA.
    gpu_name: torch.cuda.get_device_name of the GPU (picks the fa2_thresholds.yaml row), "cpu" off CUDA.
    fa2_provider: ``contract_provider`` ("flash_attn" | "torch") of the provider
        ``nsa_ref.fa2.resolve_provider(NSA_FA2_PROVIDER)`` returns; None when none is usable.
    triton_reason: what ``nsa_ref.triton_kernels.unavailable_reason`` says against inputs on this
        device in the call's dtype (Triton missing, below sm80, dtype, TRITON_INTERPRET); None: nothing.
    """

    device_type: str
    capability: tuple[int, int] | None
    gpu_name: str
    fa2_provider: str | None
    triton_reason: str | None

    @property
    def triton_usable(self) -> bool:
        """The Triton kernels can run on this device in this dtype."""
        return self.triton_reason is None

    @classmethod
    def of(cls, device, dtype: torch.dtype, settings: NSASettings | None = None) -> "DeviceFacts":
        """The facts of a real ``device`` for inputs of ``dtype``, asked through the same functions
        ``choose`` asks (nothing is allocated on the device)."""
        from nsa_ref import fa2

        device = torch.device(device)
        s = current_settings() if settings is None else settings
        provider = fa2.resolve_provider(s.fa2_provider)
        return cls(
            device_type=device.type,
            capability=tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
            gpu_name=_gpu_name(device),
            fa2_provider=None if provider is None else provider.contract_provider,
            triton_reason=BY_NAME["triton"].device_reason(_Placement(device, dtype)),
        )

    # --- the DeviceView a backend asks (nsa_ref.backends.base) ---

    def caps(self):
        """contracts.DeviceCaps for the facts' GPU, or None off CUDA."""
        import contracts

        if self.device_type != "cuda" or self.capability is None:
            return None
        major, minor = self.capability
        return contracts.DeviceCaps(major=major, minor=minor)

    def gpu(self) -> str:
        return self.gpu_name

    def fa2_provider_for(self, preference: str):
        return None if self.fa2_provider is None else (self.fa2_provider, None)

    def triton_verdict(self) -> str | None:
        return self.triton_reason


def expected_path(branch: str, backend: str = "auto", *, device: DeviceFacts, dtype: torch.dtype,
                  head_dims: tuple[int, int], tokens: int, heads: tuple[int, int], cfg,
                  cu_seqlens=None, requires_grad: bool = False, settings: NSASettings | None = None) -> str:
    """The path ``choose`` takes for one call on a device with these facts, without that device.

    The call: q (tokens, Hq, Dk), k (tokens or Tc, Hkv, Dk), v (tokens or Tc, Hkv, Dv) in ``dtype``,
    with heads = (Hq, Hkv), head_dims = (Dk, Dv) (``select``: Dv = Dk, k = v = k_cmp), ``cfg``,
    ``cu_seqlens`` (any tensor of its shape and dtype, or None), ``requires_grad`` (a backward
    will follow). The same walk over the same backends as ``choose``, on meta stand-ins, with
    ``device`` answering what the backends ask of the device. Records nothing; raises
    FA2Unavailable / TritonUnavailable (with the same message) where ``choose`` would.
    """
    _check_names(branch, backend)
    s = current_settings() if settings is None else settings
    dk, dv = head_dims
    hq, hkv = heads

    def meta(h, d):
        return torch.empty(tokens, h, d, dtype=dtype, device="meta", requires_grad=requires_grad)

    call = BranchCall(branch, meta(hq, dk), meta(hkv, dk), meta(hkv, dv), cfg, cu_seqlens, s, device)
    return _walk(call, backend)[0].name
