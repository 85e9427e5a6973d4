"""Public functional NSA API: validate inputs, ask the router for a path, call that path.

All tensors use the FA-2 varlen layout (Documentation/Architecture/Design.md): ``q (T, Hq, Dk)``,
``k (T, Hkv, Dk)``, ``v (T, Hkv, Dv)``, optional ``cu_seqlens (B+1,) int32``. ``backend`` is
"auto" | "reference" | "sdpa" | "fa2"; ``nsa_ref.router.choose`` alone decides what runs.
"""
from __future__ import annotations

import torch

from nsa_ref import masks, reference, router, sdpa, selection, telemetry, varlen
from nsa_ref.compress import compress as _mean_compress
from nsa_ref.config import NSAConfig
from nsa_ref.settings import current_settings

__all__ = ["compress", "cmp_attention", "select_blocks", "sel_attention", "win_attention", "nsa_attention"]


# --- input checks: each raises ValueError quoting the offending values -------------------------

def _check_cfg(cfg) -> None:
    if not isinstance(cfg, NSAConfig):
        raise ValueError(f"cfg must be an nsa_ref.NSAConfig, got {type(cfg).__name__}")


def _check_tensor(name: str, x, dims: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape={tuple(x.shape)}")


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_name: str = "k", v_name: str = "v") -> None:
    """q: (T, Hq, Dk), k: (S, Hkv, Dk), v: (S, Hkv, Dv) head, dim, dtype and device agreement."""
    for name, x in (("q", q), (k_name, k), (v_name, v)):
        _check_tensor(name, x, 3)
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype={x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, {k_name}, {v_name} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, {k_name}, {v_name} must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"{k_name} and {v_name} need the same length, got {k.shape[0]} != {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{k_name} and {v_name} need the same Hkv, got {k.shape[1]} != {v.shape[1]}")
    hq, hkv = q.shape[1], k.shape[1]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"Hq must be a positive multiple of Hkv (GQA), got Hq={hq}, Hkv={hkv}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and {k_name} need the same head dim Dk, got {q.shape[2]} != {k.shape[2]}")


def _check_tokens(q: torch.Tensor, k: torch.Tensor, cu_seqlens) -> None:
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k need the same number of tokens T, got {q.shape[0]} != {k.shape[0]}")
    _check_cu(cu_seqlens, q)


def _check_cu(cu_seqlens, q: torch.Tensor) -> None:
    varlen.check_cu_seqlens(cu_seqlens, q.shape[0])
    if cu_seqlens is not None and cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device, got {cu_seqlens.device} vs {q.device}")


def _check_cmp_len(q: torch.Tensor, k_cmp: torch.Tensor, cfg: NSAConfig, cu_seqlens) -> None:
    expected = sum(varlen.cmp_seqlens(cu_seqlens, q.shape[0], cfg))
    if k_cmp.shape[0] != expected:
        raise ValueError(
            f"k_cmp must hold the compressed blocks of every sequence packed (Tc_total={expected} for "
            f"block_len={cfg.block_len}, block_stride={cfg.block_stride}), got {k_cmp.shape[0]} rows"
        )


def _check_gates(gates, q: torch.Tensor) -> None:
    _check_tensor("gates", gates, 3)
    expected = (q.shape[0], q.shape[1], 3)
    if tuple(gates.shape) != expected:
        raise ValueError(f"gates must be (T, Hq, 3) = {expected} in order (cmp, sel, win), got {tuple(gates.shape)}")
    if not gates.is_floating_point():
        raise ValueError(f"gates must be floating, got dtype={gates.dtype}")
    inside = (gates >= 0) & (gates <= 1)
    if not bool(inside.all()):
        bad = gates[~inside]
        raise ValueError(
            f"gates must lie in [0, 1] (e.g. a sigmoid), got {bad.numel()} value(s) outside, "
            f"min={gates.min().item():.4g}, max={gates.max().item():.4g}, first={bad[0].item():.4g}"
        )


def _check_block_idx(block_idx, q: torch.Tensor, k: torch.Tensor, cfg: NSAConfig, cu_seqlens) -> None:
    _check_tensor("block_idx", block_idx, 3)
    expected = (q.shape[0], k.shape[1], cfg.n_sel)
    if tuple(block_idx.shape) != expected:
        raise ValueError(f"block_idx must be (T, Hkv, n_sel) = {expected}, got {tuple(block_idx.shape)}")
    if block_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_idx must be int32 (int64 accepted), got dtype={block_idx.dtype}")
    if block_idx.numel() == 0:
        return
    nb = torch.empty(q.shape[0], dtype=torch.long, device=block_idx.device)
    for a, b in varlen.seq_bounds(cu_seqlens, q.shape[0]):
        nb[a:b] = masks.num_sel_blocks(b - a, cfg)
    bad = (block_idx < -1) | (block_idx >= nb[:, None, None])
    if bool(bad.any()):
        t, h, m = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"block_idx entries must be -1 or a selection block of the token's sequence (0..nb-1), "
            f"got block_idx[{t}, {h}, {m}]={int(block_idx[t, h, m])} with nb={int(nb[t])}"
        )


# --- dispatch ----------------------------------------------------------------------------------

def _route_call(branch: str, backend: str, q, k, v, cfg, cu_seqlens, args: tuple):
    """Ask the router where ``branch`` runs and call that module's function with ``args``."""
    route = router.choose(branch, backend, q=q, k=k, v=v, cfg=cfg, cu_seqlens=cu_seqlens)
    name = f"{branch}_attention"
    if route.path == "reference":
        fn, extra = getattr(reference, name), {}
    elif route.path == "sdpa":
        fn, extra = getattr(sdpa, name), {}
    elif route.path == "fa2":
        from nsa_ref import fa2

        fn, extra = getattr(fa2, name), {"provider": route.provider, "pref_fp16": route.pref_fp16}
    else:
        raise ValueError(f"router chose path {route.path!r} for {branch}, which api.py does not know")
    settings = current_settings()
    with telemetry.timed(branch, route.path, q, settings.debug_timing):
        result = fn(*args, cu_seqlens, **extra)
    if settings.sdpa_audit and route.path != "sdpa":
        from nsa_ref.audit import audit_against_sdpa

        out = result[0] if isinstance(result, tuple) else result
        audit_against_sdpa(branch, route.path, args, cu_seqlens, out, settings.sdpa_audit_rows)
    return result


# --- public functions --------------------------------------------------------------------------

def compress(k: torch.Tensor, cfg: NSAConfig, cu_seqlens: torch.Tensor | None = None):
    """k: (T, H, D) keys or values -> (k_cmp (Tc_total, H, D), cu_seqlens_cmp (B+1,) int32).

    The "mean" phi: k_cmp[i] = mean of tokens [i*d, i*d + l) of each sequence, Tc_b =
    floor((T_b - l)/d) + 1 blocks (0 when T_b < l). Sequences too short or empty give no block.
    """
    _check_cfg(cfg)
    _check_tensor("k", k, 3)
    return _mean_compress(k, cfg, cu_seqlens)


def cmp_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    cfg: NSAConfig,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    return_probs: bool = False,
):
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk), v_cmp: (Tc_total, Hkv, Dv) -> out (T, Hq, Dv),
    or (out, probs (T, Hq, Tc_max)) with ``return_probs``.

    Query t attends its sequence's compressed block i iff i*d + l - 1 <= t. Rows with no visible
    block (t < l - 1) are exactly 0 with zero gradient. ``probs`` is the cmp softmax over the
    sequence's blocks (0 for invisible blocks and padding up to the longest sequence's Tc),
    computed by ``selection.cmp_probabilities`` whatever the backend (fp32 for 16-bit inputs).
    """
    _check_cfg(cfg)
    _check_heads(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    _check_cu(cu_seqlens, q)
    _check_cmp_len(q, k_cmp, cfg, cu_seqlens)
    out, _ = _route_call("cmp", backend, q, k_cmp, v_cmp, cfg, cu_seqlens, (q, k_cmp, v_cmp, cfg))
    if not return_probs:
        return out
    return out, selection.cmp_probabilities(q, k_cmp, cfg, cu_seqlens)


def select_blocks(
    q: torch.Tensor, k_cmp: torch.Tensor, cfg: NSAConfig, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk) -> block_idx (T, Hkv, n_sel) int32.

    p_slc[t, h, j] = sum_i w(j, i) p_cmp[t, h, i], w(j, i) = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d,
    summed over the G query heads of each KV head. Forced: blocks 0..n_init-1 and c-n_local+1..c
    (c = t // l'), clipped to 0..c; the other picks are the top scores among j <= c, ties to the
    lower index. Sorted ascending, -1 padded. Not differentiable (runs under no_grad).
    """
    _check_cfg(cfg)
    _check_tensor("q", q, 3)
    _check_tensor("k_cmp", k_cmp, 3)
    hq, hkv = q.shape[1], k_cmp.shape[1]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"Hq must be a positive multiple of Hkv (GQA), got Hq={hq}, Hkv={hkv}")
    if q.shape[2] != k_cmp.shape[2]:
        raise ValueError(f"q and k_cmp need the same head dim Dk, got {q.shape[2]} != {k_cmp.shape[2]}")
    _check_cu(cu_seqlens, q)
    _check_cmp_len(q, k_cmp, cfg, cu_seqlens)
    return selection.select_blocks(q, k_cmp, cfg, cu_seqlens)


def sel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    cfg: NSAConfig,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv), block_idx: (T, Hkv, n_sel) -> (T, Hq, Dv).

    Query t (head h, KV head h // G) attends tokens s of the blocks listed in block_idx[t, h // G]
    with s <= t; -1 entries are ignored, a repeated block counts once, nothing listed gives 0.
    """
    _check_cfg(cfg)
    _check_heads(q, k, v)
    _check_tokens(q, k, cu_seqlens)
    _check_block_idx(block_idx, q, k, cfg, cu_seqlens)
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
    _check_cfg(cfg)
    _check_heads(q, k, v)
    _check_tokens(q, k, cu_seqlens)
    return _route_call("win", backend, q, k, v, cfg, cu_seqlens, (q, k, v, cfg))


def nsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    cfg: NSAConfig,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv), gates: (T, Hq, 3) -> (T, Hq, Dv).

    o = g_cmp * cmp(q, mean-compressed k, v) + g_sel * sel(q, k, v, select_blocks(...))
    + g_win * win(q, k, v). Gates in [0, 1], order (cmp, sel, win). ``cfg.compress`` must be
    "mean": the "mlp" phi has weights (use ``NSAAttention``). ``backend`` goes to the router
    for each of the three branches as given.
    """
    _check_cfg(cfg)
    if cfg.compress != "mean":
        raise ValueError(
            f"nsa_attention compresses with the parameter-free 'mean' phi, got cfg.compress={cfg.compress!r}; "
            "use NSAAttention for 'mlp' (or compress yourself and call the branch functions)"
        )
    _check_heads(q, k, v)
    _check_tokens(q, k, cu_seqlens)
    _check_gates(gates, q)
    k_cmp, _ = _mean_compress(k, cfg, cu_seqlens)
    v_cmp, _ = _mean_compress(v, cfg, cu_seqlens)
    o_cmp, _ = _route_call("cmp", backend, q, k_cmp, v_cmp, cfg, cu_seqlens, (q, k_cmp, v_cmp, cfg))
    block_idx = selection.select_blocks(q, k_cmp, cfg, cu_seqlens)
    o_sel = _route_call("sel", backend, q, k, v, cfg, cu_seqlens, (q, k, v, block_idx, cfg))
    o_win = _route_call("win", backend, q, k, v, cfg, cu_seqlens, (q, k, v, cfg))
    return combine_branches(gates, o_cmp, o_sel, o_win)


def combine_branches(gates: torch.Tensor, o_cmp: torch.Tensor, o_sel: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """gates: (T, Hq, 3), o_*: (T, Hq, Dv) -> (T, Hq, Dv) = sum of gate * branch, order (cmp, sel, win)."""
    g = gates.to(o_cmp.dtype)
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_sel + g[..., 2:3] * o_win
