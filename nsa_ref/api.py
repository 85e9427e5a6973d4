"""Public functional NSA API: validate inputs, ask the router for a path, call that path.

All tensors use the FA-2 varlen layout (Documentation/Architecture/Design.md): ``q (T, Hq, Dk)``,
``k (T, Hkv, Dk)``, ``v (T, Hkv, Dv)``, optional ``cu_seqlens (B+1,) int32``. ``backend`` is
"auto" | "reference" | "sdpa" | "fa2" | "triton"; ``nsa_ref.router.choose`` alone decides which
backend (``nsa_ref/backends``) runs each branch call, and the returned route runs it.
"""
from __future__ import annotations

import torch

from nsa_ref import router, selection, telemetry
from nsa_ref.compress import compress as _mean_compress
from nsa_ref.compress import gather_cmp_blocks, mean_phi
from nsa_ref.config import NSAConfig
from nsa_ref.inputs import (
    check_block_idx, check_cfg, check_cmp_len, check_cu, check_gates, check_heads, check_lse, check_tensor,
    check_tokens, check_validate,
)
from nsa_ref.settings import NSASettings

__all__ = ["compress", "cmp_attention", "select_blocks", "sel_attention", "win_attention", "nsa_attention"]


# --- dispatch ----------------------------------------------------------------------------------

def _route_call(branch: str, backend: str, q, k, v, cfg, cu_seqlens, args: tuple,
                settings: NSASettings | None = None):
    """Ask the router where ``branch`` runs and run it there with ``args`` (q first, cfg last)."""
    route = router.choose(branch, backend, q=q, k=k, v=v, cfg=cfg, cu_seqlens=cu_seqlens, settings=settings)
    with telemetry.timed(branch, route.path, q, route.debug_timing):
        result = route.run(args, cu_seqlens)
    # Not inside a torch.compile trace (as telemetry): the audit reads a number back (.item()).
    if route.audit_rows and route.path != "sdpa" and branch != "select" and not torch.compiler.is_compiling():
        from nsa_ref.audit import audit_against_sdpa

        out = result[0] if isinstance(result, tuple) else result
        audit_against_sdpa(branch, route.path, args, cu_seqlens, out, route.audit_rows)
    return result


def _fused_combine(gates: torch.Tensor, o: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the gate combine runs as the fused Triton kernel (see ``combine_branches``): one
    gate triple per output row, three outputs of one shape and dtype (no broadcasting)."""
    if not o.is_cuda or o.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if gates.shape != (*o.shape[:-1], 3) or any(x.shape != o.shape or x.dtype != o.dtype for x in others):
        return False
    if torch.compiler.is_compiling():
        return False
    from nsa_ref import triton_kernels
    from nsa_ref.settings import current_settings

    return current_settings().use_triton and triton_kernels.unavailable_reason(o) is None


# --- public functions --------------------------------------------------------------------------

def compress(k: torch.Tensor, cfg: NSAConfig, cu_seqlens: torch.Tensor | None = None):
    """k: (T, H, D) keys or values -> (k_cmp (Tc_total, H, D), cu_seqlens_cmp (B+1,) int32).

    The "mean" phi: k_cmp[i] = mean of tokens [i*d, i*d + l) of each sequence, Tc_b =
    floor((T_b - l)/d) + 1 blocks (0 when T_b < l). Sequences too short or empty give no block.
    """
    check_cfg(cfg)
    check_tensor("k", k, 3)
    if not k.is_floating_point():
        raise ValueError(f"k must be a floating tensor to average, got dtype={k.dtype}")
    return _mean_compress(k, cfg, cu_seqlens)


def cmp_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cfg: NSAConfig,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    return_probs: bool = False,
    return_lse: bool = False,
):
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk), v_cmp: (Tc_total, Hkv, Dv) -> out (T, Hq, Dv),
    or (out, probs (T, Hq, Tc_max)) with ``return_probs``, or (out, lse (T, Hq) fp32) with
    ``return_lse`` (natural log, -inf for rows with no visible block; not both flags at once).

    Query t attends its sequence's compressed block i iff i*d + l - 1 <= t. Rows with no visible
    block (t < l - 1) are exactly 0 with zero gradient. ``probs`` is the cmp softmax over the
    sequence's blocks (0 for invisible blocks and padding up to the longest sequence's Tc),
    computed by ``selection.cmp_probabilities`` whatever the backend (fp32 for 16-bit inputs).
    """
    check_cfg(cfg)
    check_heads(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    cu_seqlens = check_cu(cu_seqlens, q)
    check_cmp_len(q, k_cmp, cfg, cu_seqlens)
    if return_probs and return_lse:
        raise ValueError("cmp_attention returns probs or lse, not both: pass one of return_probs / return_lse")
    out, lse = _route_call("cmp", backend, q, k_cmp, v_cmp, cfg, cu_seqlens, (q, k_cmp, v_cmp, cfg))
    if return_lse:
        return out, lse
    if not return_probs:
        return out
    return out, selection.cmp_probabilities(q, k_cmp, cfg, cu_seqlens)


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    cfg: NSAConfig,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    lse: torch.Tensor | None = None,
    validate: str = "values",
) -> torch.Tensor:
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk) -> block_idx (T, Hkv, n_sel) int32.

    p_slc[t, h, j] = sum_i w(j, i) p_cmp[t, h, i], w(j, i) = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d,
    summed over the G query heads of each KV head. Forced: blocks 0..n_init-1 and c-n_local+1..c
    (c = t // l'), clipped to 0..c; the other picks are the top scores among j <= c, ties to the
    lower index. Sorted ascending, -1 padded. Not differentiable (runs under no_grad).

    ``backend``: "triton" (fused scoring + top-n kernels), "auto" (Triton where it can run, else
    torch), anything else the chunked torch scoring. ``lse`` (T, Hq): the cmp branch's
    log-sum-exp (e.g. ``cmp_attention(..., return_lse=True)``), reused by the Triton kernels
    instead of being recomputed; the torch path ignores it. ``validate="shapes"`` skips the
    lse value check (one device sync; see ``nsa_ref.inputs``).
    """
    check_cfg(cfg)
    check_heads(q, k_cmp, k_cmp, "k_cmp", "k_cmp")
    cu_seqlens = check_cu(cu_seqlens, q)
    check_cmp_len(q, k_cmp, cfg, cu_seqlens)
    if lse is not None:
        check_lse(lse, q, cfg, cu_seqlens, check_validate(validate))
    return _select(q, k_cmp, cfg, cu_seqlens, backend, lse)


def _select(q, k_cmp, cfg, cu_seqlens, backend, lse, settings=None):
    return _route_call("select", backend, q, k_cmp, k_cmp, cfg, cu_seqlens, (q, k_cmp, lse, cfg), settings)


def sel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    cfg: NSAConfig,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    validate: str = "values",
) -> torch.Tensor:
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv), block_idx: (T, Hkv, n_sel) -> (T, Hq, Dv).

    Query t (head h, KV head h // G) attends tokens s of the blocks listed in block_idx[t, h // G]
    with s <= t; -1 entries are ignored, a repeated block counts once, nothing listed gives 0.
    ``validate="shapes"`` skips the block_idx range check (one device sync; see ``nsa_ref.inputs``).
    """
    check_cfg(cfg)
    check_heads(q, k, v)
    cu_seqlens = check_tokens(q, k, cu_seqlens)
    check_block_idx(block_idx, q, k, cfg, cu_seqlens, check_validate(validate))
    return _route_call("sel", backend, q, k, v, cfg, cu_seqlens, (q, k, v, block_idx, cfg))


def win_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: NSAConfig,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv) -> (T, Hq, Dv).

    Query t attends s in [max(0, t - w + 1), t]: w keys including itself (FA-2 window (w-1, 0)).
    """
    check_cfg(cfg)
    check_heads(q, k, v)
    cu_seqlens = check_tokens(q, k, cu_seqlens)
    return _route_call("win", backend, q, k, v, cfg, cu_seqlens, (q, k, v, cfg))


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    cfg: NSAConfig,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    cu_seqlens_cpu=None,
    max_seqlen: int | None = None,
    validate: str = "values",
    settings: NSASettings | None = None,
) -> torch.Tensor:
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv), gates: (T, Hq, 3) -> (T, Hq, Dv).

    o = g_cmp * cmp(q, mean-compressed k, v) + g_sel * sel(q, k, v, select_blocks(...))
    + g_win * win(q, k, v). Gates in [0, 1], order (cmp, sel, win). ``cfg.compress`` must be
    "mean": the "mlp" phi has weights (use ``NSAAttention``). ``backend`` goes to the router
    for each branch and for the selection as given (the cmp branch's log-sum-exp is handed to
    the Triton selection; backend="triton" runs Triton where it has kernels, "auto" elsewhere).
    ``cu_seqlens_cpu`` (a host copy of cu_seqlens: list or CPU tensor) and ``max_seqlen`` (the
    longest sequence) are host metadata the caller may already have, as FA-2 and FLA take them:
    with ``cu_seqlens_cpu`` the call reads nothing of cu_seqlens from the device (it is trusted to
    equal cu_seqlens); otherwise cu_seqlens is read once (one device sync) and every branch uses
    that copy. ``validate``: "values" (default; gates checked in [0, 1], one device sync) or
    "shapes" (no device read: CUDA graphs, torch.compile(fullgraph=True)); see ``nsa_ref.inputs``.
    ``settings``: the NSA_* flags for this call (e.g. a pinned FA-2 provider); None reads them
    from the environment. ``torch.compile(fullgraph=True)`` on CUDA: call once eagerly with the
    same shapes first; the trace takes the routes decided then (``nsa_ref.router.choose``).
    """
    check_cfg(cfg)
    if cfg.compress != "mean":
        raise ValueError(
            f"nsa_attention compresses with the parameter-free 'mean' phi, got cfg.compress={cfg.compress!r}; "
            "use NSAAttention for 'mlp' (or compress yourself and call the branch functions)"
        )
    check_heads(q, k, v)
    cu_seqlens = check_tokens(q, k, cu_seqlens, cu_seqlens_cpu, max_seqlen)  # the call's one Packing
    check_gates(gates, q, check_validate(validate))
    # The compressed keys only: cu_seqlens_cmp is not needed here (building it copies to the device).
    k_cmp = mean_phi(gather_cmp_blocks(k, cfg, cu_seqlens))
    v_cmp = mean_phi(gather_cmp_blocks(v, cfg, cu_seqlens))
    o_cmp, lse = _route_call("cmp", backend, q, k_cmp, v_cmp, cfg, cu_seqlens, (q, k_cmp, v_cmp, cfg), settings)
    block_idx = _select(q, k_cmp, cfg, cu_seqlens, backend, lse, settings)
    o_sel = _route_call("sel", backend, q, k, v, cfg, cu_seqlens, (q, k, v, block_idx, cfg), settings)
    o_win = _route_call("win", backend, q, k, v, cfg, cu_seqlens, (q, k, v, cfg), settings)
    return combine_branches(gates, o_cmp, o_sel, o_win)


def combine_branches(gates: torch.Tensor, o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """gates: (T, Hq, 3), o_*: (T, Hq, Dv) -> (T, Hq, Dv) = sum of gate * branch, order (cmp, sel, win).

    On CUDA in fp16/bf16/fp32 with Triton usable and NSA_USE_TRITON on: one fused Triton pass
    each way (``triton_kernels.combine``; sums in fp32). Elsewhere, and inside a torch.compile
    trace (inductor fuses the torch ops itself): the torch ops below."""
    if _fused_combine(gates, o_cmp, o_sel, o_win):
        from nsa_ref.triton_kernels.combine import combine_branches as fused

        return fused(gates, o_cmp, o_sel, o_win)
    g = gates.to(o_cmp.dtype)
    # One product and two in-place fused multiply-adds: three passes over (T, Hq, Dv) instead of
    # five (the sum is not saved for backward, so the in-place update is autograd-safe).
    out = g[..., 0:1] * o_cmp
    out.addcmul_(g[..., 1:2], o_sel)
    return out.addcmul_(g[..., 2:3], o_win)
