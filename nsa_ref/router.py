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
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def default_min_len(branch: str, device: torch.device, head_dim: int) -> int:
    """Tuned shortest T for FA-2 on this GPU and head dim, from fa2_thresholds.yaml."""
    global _THRESHOLDS
    if _THRESHOLDS is None:
        _THRESHOLDS = _load_thresholds()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    table = _THRESHOLDS.get("gpus", {})
    entry = next((v for k, v in table.items() if k.lower() in gpu.lower()), _THRESHOLDS.get("default", {}))
    per_branch = entry.get(branch, {})
    if isinstance(per_branch, int):
        return per_branch
    # head-dim keyed: the closest listed head dim at or above ours, else the largest listed.
    dims = sorted(int(d) for d in per_branch)
    if not dims:
        return 0
    pick = next((d for d in dims if d >= head_dim), dims[-1])
    return int(per_branch[pick])


def _min_len(branch: str, q: torch.Tensor, s: NSASettings) -> tuple[int, str]:
    flag = {"win": s.fa2_min_len_win, "cmp": s.fa2_min_len_cmp}.get(branch)
    if branch == "sel":
        # Measured on H100: the gather path beats SDPA's gather from T=1K; no per-T threshold yet.
        return 0, "no threshold for sel"
    if flag is not None:
        return flag, f"NSA_FA2_MIN_LEN_{branch.upper()}"
    return default_min_len(branch, q.device, q.shape[-1]), "fa2_thresholds.yaml"


def _contract_refusal(branch, q, k, v, cfg, cu_seqlens, provider, s: NSASettings) -> str | None:
    if s.fa2_contracts == "off":
        return None
    import contracts
    from nsa_ref.fa2.branches import planned_calls

    caps = contracts.DeviceCaps.from_device(q.device) if q.is_cuda else None
    # The stand-ins are meta tensors without autograd: say whether a backward will follow, so
    # the backward-only rules (int32 offsets, garbage-gradient archs) are checked too.
    training = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    for call in planned_calls(branch, q, k, v, cfg, cu_seqlens, s.fa2_pref_fp16):
        kind = call.pop("kind")
        check = contracts.dense_reasons if kind == "dense" else contracts.varlen_reasons
        reasons = check(**call, requires_grad=training, caps=caps, provider=provider.contract_provider)
        if reasons:
            return "contract: " + "; ".join(r.rule for r in reasons)
    return None


def _on_cuda(q: torch.Tensor) -> bool:
    return q.is_cuda


def fa2_refusal(branch, q, k, v, cfg, cu_seqlens=None, settings: NSASettings | None = None,
                explicit: bool = False):
    """(reason FA-2 is not taken or None, provider) for one branch call.

    The NSA_USE_FA2* switches and the minimum lengths steer ``auto``; an explicit
    backend='fa2' skips them and keeps only what FA-2 needs (CUDA, a provider, the contract).
    """
    from nsa_ref import fa2

    s = settings or current_settings()
    flag = {"win": s.use_fa2_win, "cmp": s.use_fa2_cmp, "sel": s.use_fa2_sel}[branch]
    if not explicit and not s.use_fa2:
        return "disabled by NSA_USE_FA2=0", None
    if not explicit and not flag:
        return f"disabled by NSA_USE_FA2_{branch.upper()}=0", None
    if not _on_cuda(q):
        return f"inputs on {q.device.type}, FA-2 needs CUDA", None
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} has no FA-2 path (fp16, bf16, fp32 via cast)", None
    provider = fa2.resolve_provider(s.fa2_provider)
    if provider is None:
        return f"no usable FA-2 provider for NSA_FA2_PROVIDER={s.fa2_provider}", None
    min_len, source = (0, "") if explicit else _min_len(branch, q, s)
    if q.shape[0] < min_len:
        return f"T below the FA-2 minimum length ({source})", provider
    refusal = _contract_refusal(branch, q, k, v, cfg, cu_seqlens, provider, s)
    return refusal, provider


def triton_refusal(branch, q, k, v, cfg, settings: NSASettings | None = None,
                   explicit: bool = False) -> str | None:
    """Why the Triton kernel for ``branch`` (sel | select) is not taken, or None.

    ``auto`` needs NSA_USE_TRITON and CUDA inputs; an explicit backend='triton' skips the switch
    and also runs on CPU tensors under TRITON_INTERPRET=1 (Triton's interpreter, for tests).
    """
    from nsa_ref import triton_kernels

    s = settings or current_settings()
    if branch not in TRITON_BRANCHES:
        return f"no Triton kernel for {branch} (Triton covers {', '.join(TRITON_BRANCHES)})"
    if not explicit and not s.use_triton:
        return "disabled by NSA_USE_TRITON=0"
    if not explicit and not _on_cuda(q):
        return f"inputs on {q.device.type}, the Triton kernels need CUDA"
    reason = triton_kernels.unavailable_reason(q)
    if reason is not None:
        return reason
    widths = {"Dk": q.shape[-1]} if branch == "select" else {"Dk": q.shape[-1], "Dv": v.shape[-1]}
    for name, width in widths.items():
        if width > TRITON_MAX_HEAD_DIM:
            return f"{name}={width} exceeds the Triton kernels' widest head dim {TRITON_MAX_HEAD_DIM}"
    return None


def _triton_route(branch, q, k, v, cfg, s, explicit: bool) -> tuple[Route | None, str | None]:
    refusal = triton_refusal(branch, q, k, v, cfg, s, explicit=explicit)
    if refusal is None:
        from nsa_ref import triton_kernels

        return Route(branch, "triton", f"triton {triton_kernels.triton_version()}"), None
    if explicit:
        raise TritonUnavailable(f"backend='triton' requested for {branch} but it cannot run: {refusal}")
    return None, refusal


def choose(branch: str, backend: str = "auto", *, q, k, v, cfg, cu_seqlens=None,
           settings: NSASettings | None = None) -> Route:
    """Route for one call of `branch` (cmp | sel | win | select) with `backend`
    (auto | reference | sdpa | fa2 | triton).

    q: (T, Hq, Dk), k: (T or Tc, Hkv, Dk), v: (T or Tc, Hkv, Dv) (for ``select``: k = v = k_cmp).
    Raises FA2Unavailable / TritonUnavailable when backend='fa2' / 'triton' is asked for and
    cannot run; 'auto' falls back (Triton -> FA-2 -> SDPA; select: Triton -> torch) and says why.
    backend='triton' on cmp or win (no Triton kernel) is routed as 'auto'.
    """
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; use one of {', '.join(BRANCHES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    s = settings or current_settings()
    if branch == "select":
        route = _choose_select(backend, q, k, v, cfg, s)
        telemetry.record(branch, route.path, route.reason)
        return route
    triton_reason = None
    if backend == "triton" and branch not in TRITON_BRANCHES:
        # cmp and win have no Triton kernel: backend="triton" means "Triton where it has kernels".
        backend = "auto"
    if backend in ("triton", "auto") and branch in TRITON_BRANCHES:
        route, triton_reason = _triton_route(branch, q, k, v, cfg, s, explicit=backend == "triton")
        if route is not None:
            telemetry.record(branch, route.path, route.reason)
            return route
    if backend in ("reference", "sdpa"):
        route = Route(branch, backend, "requested")
    else:
        refusal, provider = fa2_refusal(branch, q, k, v, cfg, cu_seqlens, s, explicit=backend == "fa2")
        if refusal is None:
            route = Route(branch, "fa2", f"{provider.name} {provider.version()}", provider, s.fa2_pref_fp16)
        elif backend == "fa2":
            raise FA2Unavailable(f"backend='fa2' requested for {branch} but FA-2 cannot run it: {refusal}")
        else:
            route = Route(branch, "sdpa", refusal if triton_reason is None else f"triton: {triton_reason}; fa2: {refusal}")
    telemetry.record(branch, route.path, route.reason)
    return route


def _choose_select(backend, q, k, v, cfg, s) -> Route:
    """Block selection has two paths: the Triton kernels, or the chunked torch scoring ("torch")."""
    if backend in ("triton", "auto"):
        route, reason = _triton_route("select", q, k, v, cfg, s, explicit=backend == "triton")
        if route is not None:
            return route
        return Route("select", "torch", f"triton: {reason}")
    return Route("select", "torch", f"backend={backend!r} has no selection kernel of its own")
