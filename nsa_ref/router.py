"""The one place that decides which path runs an NSA branch: Triton, FA-2, SDPA or the reference.

``choose`` decides per branch call:
- ``sel`` (selected attention) and ``select`` (block scoring + top-n) take the Triton kernels
  (``nsa_ref.triton_kernels``) when they are enabled (NSA_USE_TRITON) and can run: inputs on a
  CUDA GPU of sm80+, fp16/bf16/fp32/fp64, head dims <= 256. On an H100 at 64K
  tokens they are 19.5x (sel forward, 23x forward+backward) and 32x (select) faster than the
  next path, measured in one sweep (artifacts/2026-11-25/triton_sel). Otherwise ``sel`` goes
  on to FA-2, and ``select`` runs the chunked torch scoring (path "torch").
- ``cmp``, ``win`` and ``sel`` take FA-2 only when it is enabled, a provider is usable, the inputs
  are legal for the FA-2 calls the branch would make (per ``contracts``), and the sequence is long
  enough; otherwise SDPA.
Every decision is counted in ``nsa_ref.telemetry`` with its reason.

The rules are small functions over plain values (``_fa2_gate``, ``_triton_gate``, ...) and the
order they are tried in is one function, ``_decide``. ``choose`` feeds them the facts of real
tensors; ``expected_path`` feeds them ``DeviceFacts`` (capability, provider, Triton's verdict)
and answers, without a GPU, which path ``choose`` takes there: tests derive route expectations
from it instead of hard-coding them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from nsa_ref import telemetry
from nsa_ref.settings import NSASettings, current_settings

BRANCHES = ("cmp", "sel", "win", "select")
BACKENDS = ("auto", "reference", "sdpa", "fa2", "triton")
#: Branches with a Triton kernel.
TRITON_BRANCHES = ("sel", "select")
#: Widest head dim the Triton kernels tile (one power-of-two tile per row).
TRITON_MAX_HEAD_DIM = 256
THRESHOLDS_FILE = Path(__file__).with_name("fa2_thresholds.yaml")


@dataclass(frozen=True)
class Route:
    """Where a branch call runs and why; ``provider`` is set for the fa2 path."""

    branch: str
    path: str
    reason: str
    provider: object | None = None
    pref_fp16: bool = False


class FA2Unavailable(RuntimeError):
    """backend='fa2' was asked for explicitly but FA-2 cannot run this call."""


class TritonUnavailable(RuntimeError):
    """backend='triton' was asked for explicitly but the Triton kernels cannot run this call."""


def _load_thresholds() -> dict:
    with THRESHOLDS_FILE.open() as fh:
        return yaml.safe_load(fh) or {}


_THRESHOLDS: dict | None = None


def _gpu_name(device: torch.device) -> str:
    """The GPU's name as torch reports it (what fa2_thresholds.yaml is keyed by); "cpu" off CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_min_len(branch: str, device: torch.device, head_dim: int) -> int:
    """Tuned shortest T for FA-2 on this GPU and head dim, from fa2_thresholds.yaml."""
    return threshold_min_len(branch, _gpu_name(device), head_dim)


def threshold_min_len(branch: str, gpu_name: str, head_dim: int) -> int:
    """Tuned shortest T for FA-2 on the GPU named ``gpu_name`` (a torch device name, or "cpu")."""
    global _THRESHOLDS
    if _THRESHOLDS is None:
        _THRESHOLDS = _load_thresholds()
    table = _THRESHOLDS.get("gpus", {})
    entry = next((v for k, v in table.items() if k.lower() in gpu_name.lower()), _THRESHOLDS.get("default", {}))
    per_branch = entry.get(branch, {})
    if isinstance(per_branch, int):
        return per_branch
    # head-dim keyed: the closest listed head dim at or above ours, else the largest listed.
    dims = sorted(int(d) for d in per_branch)
    if not dims:
        return 0
    pick = next((d for d in dims if d >= head_dim), dims[-1])
    return int(per_branch[pick])


# --- the rules, over plain values: shared by ``choose`` (real tensors) and ``expected_path`` (facts) ---

def _min_len(branch: str, head_dim: int, s: NSASettings, gpu_name: Callable[[], str]) -> tuple[int, str]:
    """(shortest T routed to FA-2 under 'auto', where that number comes from); ``gpu_name()`` is
    asked only when the thresholds file decides."""
    flag = {"win": s.fa2_min_len_win, "cmp": s.fa2_min_len_cmp}.get(branch)
    if branch == "sel":
        # Measured on H100: the gather path beats SDPA's gather from T=1K; no per-T threshold yet.
        return 0, "no threshold for sel"
    if flag is not None:
        return flag, f"NSA_FA2_MIN_LEN_{branch.upper()}"
    return threshold_min_len(branch, gpu_name(), head_dim), "fa2_thresholds.yaml"


def _contract_refusal(branch, q, k, v, cfg, cu_seqlens, contract_provider: str, s: NSASettings,
                      caps: Callable[[], object]) -> str | None:
    """First FA-2 contract the planned calls break ("contract: FA2-..."), or None. q, k, v may be
    meta tensors (only shapes, dtype and requires_grad are read); ``caps()`` -> DeviceCaps or None."""
    if s.fa2_contracts == "off":
        return None
    import contracts
    from nsa_ref.fa2.branches import planned_calls

    device_caps = caps()
    # The stand-ins are meta tensors without autograd: say whether a backward will follow, so
    # the backward-only rules (int32 offsets, garbage-gradient archs) are checked too.
    training = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    for call in planned_calls(branch, q, k, v, cfg, cu_seqlens, s.fa2_pref_fp16):
        kind = call.pop("kind")
        check = contracts.dense_reasons if kind == "dense" else contracts.varlen_reasons
        reasons = check(**call, requires_grad=training, caps=device_caps, provider=contract_provider)
        if reasons:
            return "contract: " + "; ".join(r.rule for r in reasons)
    return None


def _fa2_gate(branch: str, s: NSASettings, explicit: bool, device_type: str, dtype: torch.dtype) -> str | None:
    """The switches ('auto' only), the device and the dtype: why FA-2 is not even tried, or None."""
    flag = {"win": s.use_fa2_win, "cmp": s.use_fa2_cmp, "sel": s.use_fa2_sel}[branch]
    if not explicit and not s.use_fa2:
        return "disabled by NSA_USE_FA2=0"
    if not explicit and not flag:
        return f"disabled by NSA_USE_FA2_{branch.upper()}=0"
    if device_type != "cuda":
        return f"inputs on {device_type}, FA-2 needs CUDA"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} has no FA-2 path (fp16, bf16, fp32 via cast)"
    return None


def _no_provider(s: NSASettings) -> str:
    return f"no usable FA-2 provider for NSA_FA2_PROVIDER={s.fa2_provider}"


def _fa2_call_refusal(branch, q, k, v, cfg, cu_seqlens, s: NSASettings, explicit: bool, contract_provider: str,
                      gpu_name: Callable[[], str], caps: Callable[[], object]) -> str | None:
    """The rules that read the call's shapes: the minimum length ('auto' only), then the contracts."""
    min_len, source = (0, "") if explicit else _min_len(branch, q.shape[-1], s, gpu_name)
    if q.shape[0] < min_len:
        return f"T below the FA-2 minimum length ({source})"
    return _contract_refusal(branch, q, k, v, cfg, cu_seqlens, contract_provider, s, caps)


def _triton_gate(branch: str, s: NSASettings, explicit: bool, device_type: str) -> str | None:
    """The branch, the switch and the device ('auto' only): why Triton is not even tried, or None."""
    if branch not in TRITON_BRANCHES:
        return f"no Triton kernel for {branch} (Triton covers {', '.join(TRITON_BRANCHES)})"
    if not explicit and not s.use_triton:
        return "disabled by NSA_USE_TRITON=0"
    if not explicit and device_type != "cuda":
        return f"inputs on {device_type}, the Triton kernels need CUDA"
    return None


def _triton_width_refusal(branch: str, dk: int, dv: int) -> str | None:
    """Head dims the Triton kernels cannot tile (``select`` reads only Dk)."""
    widths = {"Dk": dk} if branch == "select" else {"Dk": dk, "Dv": dv}
    for name, width in widths.items():
        if width > TRITON_MAX_HEAD_DIM:
            return f"{name}={width} exceeds the Triton kernels' widest head dim {TRITON_MAX_HEAD_DIM}"
    return None


def _decide(branch: str, backend: str, triton: Callable[[bool], str | None],
            fa2: Callable[[bool], str | None]) -> tuple[str, str | None]:
    """The routing policy: (path, reason) for one call, given two probes.

    ``triton(explicit)`` / ``fa2(explicit)`` say why that kernel cannot run this call (None: it
    can); each is asked at most once, and only when the policy reaches it. ``reason`` is None when
    a kernel (triton, fa2) is taken (the caller names it), else why this path was taken.
    Raises FA2Unavailable / TritonUnavailable when an explicit backend cannot run.
    """
    if branch == "select":
        # Block selection has two paths: the Triton kernels, or the chunked torch scoring ("torch").
        if backend not in ("triton", "auto"):
            return "torch", f"backend={backend!r} has no selection kernel of its own"
        refusal = triton(backend == "triton")
        if refusal is None:
            return "triton", None
        if backend == "triton":
            raise TritonUnavailable(f"backend='triton' requested for select but it cannot run: {refusal}")
        return "torch", f"triton: {refusal}"
    triton_reason = None
    if backend == "triton" and branch not in TRITON_BRANCHES:
        # cmp and win have no Triton kernel: backend="triton" means "Triton where it has kernels".
        backend = "auto"
    if backend in ("triton", "auto") and branch in TRITON_BRANCHES:
        triton_reason = triton(backend == "triton")
        if triton_reason is None:
            return "triton", None
        if backend == "triton":
            raise TritonUnavailable(f"backend='triton' requested for {branch} but it cannot run: {triton_reason}")
    if backend in ("reference", "sdpa"):
        return backend, "requested"
    refusal = fa2(backend == "fa2")
    if refusal is None:
        return "fa2", None
    if backend == "fa2":
        raise FA2Unavailable(f"backend='fa2' requested for {branch} but FA-2 cannot run it: {refusal}")
    return "sdpa", refusal if triton_reason is None else f"triton: {triton_reason}; fa2: {refusal}"


def _check_names(branch: str, backend: str) -> None:
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; use one of {', '.join(BRANCHES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


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


def fa2_refusal(branch, q, k, v, cfg, cu_seqlens=None, settings: NSASettings | None = None,
                explicit: bool = False):
    """(reason FA-2 is not taken or None, provider) for one branch call.

    The NSA_USE_FA2* switches and the minimum lengths steer ``auto``; an explicit
    backend='fa2' skips them and keeps only what FA-2 needs (CUDA, a provider, the contract).
    """
    from nsa_ref import fa2

    s = settings or current_settings()
    refusal = _fa2_gate(branch, s, explicit, _device_type(q), q.dtype)
    if refusal is not None:
        return refusal, None
    provider = fa2.resolve_provider(s.fa2_provider)
    if provider is None:
        return _no_provider(s), None
    refusal = _fa2_call_refusal(branch, q, k, v, cfg, cu_seqlens, s, explicit, provider.contract_provider,
                                gpu_name=lambda: _gpu_name(q.device), caps=lambda: _device_caps(q))
    return refusal, provider


def triton_refusal(branch, q, k, v, cfg, settings: NSASettings | None = None,
                   explicit: bool = False) -> str | None:
    """Why the Triton kernel for ``branch`` (sel | select) is not taken, or None.

    ``auto`` needs NSA_USE_TRITON and CUDA inputs; an explicit backend='triton' skips the switch
    and also runs on CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter, for tests).
    """
    from nsa_ref import triton_kernels

    s = settings or current_settings()
    return (_triton_gate(branch, s, explicit, _device_type(q))
            or triton_kernels.unavailable_reason(q)
            or _triton_width_refusal(branch, q.shape[-1], v.shape[-1]))


def choose(branch: str, backend: str = "auto", *, q, k, v, cfg, cu_seqlens=None,
           settings: NSASettings | None = None) -> Route:
    """Route for one call of `branch` (cmp | sel | win | select) with `backend`
    (auto | reference | sdpa | fa2 | triton).

    q: (T, Hq, Dk), k: (T or Tc, Hkv, Dk), v: (T or Tc, Hkv, Dv) (for ``select``: k = v = k_cmp).
    Raises FA2Unavailable / TritonUnavailable when backend='fa2' / 'triton' is asked for and
    cannot run; 'auto' falls back (Triton -> FA-2 -> SDPA; select: Triton -> torch) and says why.
    backend='triton' on cmp or win (no Triton kernel) is routed as 'auto'.
    The policy itself is ``_decide``; ``expected_path`` evaluates it for a device that is not here.
    """
    _check_names(branch, backend)
    s = settings or current_settings()
    provider = None

    def fa2_probe(explicit: bool) -> str | None:
        nonlocal provider
        refusal, provider = fa2_refusal(branch, q, k, v, cfg, cu_seqlens, s, explicit=explicit)
        return refusal

    path, reason = _decide(branch, backend, lambda explicit: triton_refusal(branch, q, k, v, cfg, s, explicit),
                           fa2_probe)
    if path == "triton":
        from nsa_ref import triton_kernels

        route = Route(branch, "triton", f"triton {triton_kernels.triton_version()}")
    elif path == "fa2":
        route = Route(branch, "fa2", f"{provider.name} {provider.version()}", provider, s.fa2_pref_fp16)
    else:
        route = Route(branch, path, reason)
    telemetry.record(branch, route.path, route.reason)
    return route


# --- the same policy for a device described, not present -----------------------------------------

class _Placement(NamedTuple):
    """What ``triton_kernels.unavailable_reason`` reads of a tensor: its device and dtype."""

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
        from nsa_ref import fa2, triton_kernels

        device = torch.device(device)
        s = settings or current_settings()
        provider = fa2.resolve_provider(s.fa2_provider)
        return cls(
            device_type=device.type,
            capability=tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
            gpu_name=_gpu_name(device),
            fa2_provider=None if provider is None else provider.contract_provider,
            triton_reason=triton_kernels.unavailable_reason(_Placement(device, dtype)),
        )


def expected_path(branch: str, backend: str = "auto", *, device: DeviceFacts, dtype: torch.dtype,
                  head_dims: tuple[int, int], tokens: int, heads: tuple[int, int], cfg,
                  cu_seqlens=None, requires_grad: bool = False, settings: NSASettings | None = None) -> str:
    """The path ``choose`` takes for one call on a device with these facts, without that device.

    The call: q (tokens, Hq, Dk), k (tokens or Tc, Hkv, Dk), v (tokens or Tc, Hkv, Dv) in ``dtype``,
    with heads = (Hq, Hkv), head_dims = (Dk, Dv) (``select``: Dv = Dk, k = v = k_cmp), ``cfg``,
    ``cu_seqlens`` (any tensor of its shape and dtype, or None), ``requires_grad`` (a backward
    will follow). Same rules, same order, same policy (``_decide``) as ``choose``: the switches,
    the device type and dtype, Triton's verdict (``device.triton_reason``) and head-dim widths,
    the FA-2 provider, the minimum length and the FA-2 contracts (on meta stand-ins, against
    ``device.capability``). Records nothing; raises FA2Unavailable / TritonUnavailable (with the
    same message) where ``choose`` would.
    """
    _check_names(branch, backend)
    s = settings or current_settings()
    dk, dv = head_dims
    hq, hkv = heads

    def meta(h, d):
        return torch.empty(tokens, h, d, dtype=dtype, device="meta", requires_grad=requires_grad)

    q, k, v = meta(hq, dk), meta(hkv, dk), meta(hkv, dv)

    def triton_probe(explicit: bool) -> str | None:
        return (_triton_gate(branch, s, explicit, device.device_type)
                or device.triton_reason
                or _triton_width_refusal(branch, dk, dv))

    def fa2_probe(explicit: bool) -> str | None:
        refusal = _fa2_gate(branch, s, explicit, device.device_type, dtype)
        if refusal is not None:
            return refusal
        if device.fa2_provider is None:
            return _no_provider(s)
        return _fa2_call_refusal(branch, q, k, v, cfg, cu_seqlens, s, explicit, device.fa2_provider,
                                 gpu_name=lambda: device.gpu_name, caps=lambda: _caps_of(device))

    return _decide(branch, backend, triton_probe, fa2_probe)[0]


def _caps_of(device: DeviceFacts):
    """contracts.DeviceCaps for the facts' GPU, or None off CUDA (as ``_device_caps`` for a tensor)."""
    import contracts

    if device.device_type != "cuda" or device.capability is None:
        return None
    major, minor = device.capability
    return contracts.DeviceCaps(major=major, minor=minor)
