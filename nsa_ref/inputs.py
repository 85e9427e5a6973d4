"""Input checks of the public NSA API: each raises ValueError quoting the offending values.

Shared by ``nsa_ref.api`` (prefill) and the decode steps (``decode_batched.check_step_inputs``), so both refuse the
same bad inputs with the same messages before any state changes. cu_seqlens is checked once, by
building the call's ``Packing`` (``check_cu``); the later checks read that packing.

``validate`` levels of the value checks that need the device (gates in [0, 1], block_idx in
range, lse finite): "values" (the default: each costs one device sync and raises ValueError
quoting the bad value; inside a graph torch.compile traces, the gates check becomes one fused
device-side assert instead, no sync and no graph break) or "shapes" (shapes, dtypes and devices
only: no device read, for CUDA graphs and sync-free fast paths; out-of-range values are then the
caller's responsibility).
"""
from __future__ import annotations

import torch

from nsa_ref import masks, varlen
from nsa_ref.config import NSAConfig
from nsa_ref.packing import Packing

VALIDATE_LEVELS = ("values", "shapes")


def check_cfg(cfg) -> None:
    if not isinstance(cfg, NSAConfig):
        raise ValueError(f"cfg must be an nsa_ref.NSAConfig, got {type(cfg).__name__}")


def check_tensor(name: str, x, dims: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape={tuple(x.shape)}")


def check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_name: str = "k", v_name: str = "v") -> None:
    """q: (T, Hq, Dk), k: (S, Hkv, Dk), v: (S, Hkv, Dv) head, dim, dtype and device agreement."""
    for name, x in (("q", q), (k_name, k), (v_name, v)):
        check_tensor(name, x, 3)
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
    if q.shape[2] < 1 or v.shape[2] < 1:
        raise ValueError(f"head dims must be >= 1, got Dk={q.shape[2]}, Dv={v.shape[2]}")


def check_validate(validate: str) -> bool:
    """-> whether the device value checks run."""
    if validate not in VALIDATE_LEVELS:
        raise ValueError(f"validate must be one of {', '.join(VALIDATE_LEVELS)}, got {validate!r}")
    return validate == "values"


def check_tokens(q: torch.Tensor, k: torch.Tensor, cu_seqlens, cu_seqlens_cpu=None,
                 max_seqlen: int | None = None) -> Packing:
    """q and k agree on T; -> the call's validated packing (see ``check_cu``)."""
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k need the same number of tokens T, got {q.shape[0]} != {k.shape[0]}")
    return check_cu(cu_seqlens, q, cu_seqlens_cpu, max_seqlen)


def check_cu(cu_seqlens, q: torch.Tensor, cu_seqlens_cpu=None, max_seqlen: int | None = None) -> Packing:
    """cu_seqlens (B+1,) int32 on q's device (or a Packing, or None) -> the call's Packing, its
    values validated on one host copy (``cu_seqlens_cpu`` when given: then no device read)."""
    return Packing.of(cu_seqlens, q.shape[0], cu_seqlens_cpu=cu_seqlens_cpu, max_seqlen=max_seqlen,
                      device=q.device)


def check_cmp_len(q: torch.Tensor, k_cmp: torch.Tensor, cfg: NSAConfig, cu_seqlens) -> None:
    expected = varlen.as_packing(cu_seqlens, q.shape[0]).cmp_offsets(cfg)[-1]
    if k_cmp.shape[0] != expected:
        raise ValueError(
            f"k_cmp must hold the compressed blocks of every sequence packed (Tc_total={expected} for "
            f"block_len={cfg.block_len}, block_stride={cfg.block_stride}), got {k_cmp.shape[0]} rows"
        )


def check_gates(gates, q: torch.Tensor, values: bool = True) -> None:
    """gates: (T, Hq, 3) floating on q's device; with ``values`` also in [0, 1] (one device sync)."""
    check_tensor("gates", gates, 3)
    expected = (q.shape[0], q.shape[1], 3)
    if tuple(gates.shape) != expected:
        raise ValueError(f"gates must be (T, Hq, 3) = {expected} in order (cmp, sel, win), got {tuple(gates.shape)}")
    if gates.device != q.device:
        raise ValueError(f"gates must be on q's device, got {gates.device} vs {q.device}")
    if not gates.is_floating_point():
        raise ValueError(f"gates must be floating, got dtype={gates.dtype}")
    if not values:
        return
    inside = (gates >= 0) & (gates <= 1)
    if torch.compiler.is_compiling():
        # Inside a traced graph: one fused device-side assert (no sync, no graph break).
        torch._assert_async(inside.all(), "[nsa_ref] gates must lie in [0, 1] (e.g. a sigmoid)")
        return
    if not bool(inside.all()):
        bad = gates[~inside]
        raise ValueError(
            f"gates must lie in [0, 1] (e.g. a sigmoid), got {bad.numel()} value(s) outside, "
            f"min={gates.min().item():.4g}, max={gates.max().item():.4g}, first={bad[0].item():.4g}"
        )


def check_block_idx(block_idx, q: torch.Tensor, k: torch.Tensor, cfg: NSAConfig, cu_seqlens,
                    values: bool = True) -> None:
    """block_idx: (T, Hkv, n_sel) int32/int64 on q's device; with ``values`` also -1 or a block of
    the token's sequence (one device sync)."""
    check_tensor("block_idx", block_idx, 3)
    expected = (q.shape[0], k.shape[1], cfg.n_sel)
    if tuple(block_idx.shape) != expected:
        raise ValueError(f"block_idx must be (T, Hkv, n_sel) = {expected}, got {tuple(block_idx.shape)}")
    if block_idx.device != q.device:
        raise ValueError(f"block_idx must be on q's device, got {block_idx.device} vs {q.device}")
    if block_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_idx must be int32 (int64 accepted), got dtype={block_idx.dtype}")
    if block_idx.numel() == 0 or not values:
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


def check_lse(lse, q: torch.Tensor, cfg: NSAConfig, cu_seqlens, values: bool = True) -> None:
    """lse: (T, Hq) floating, on q's device; with ``values`` also no NaN and no +inf, and -inf
    only on rows that see no compressed block (t < l - 1): elsewhere it would make every
    probability infinite (one device sync)."""
    check_tensor("lse", lse, 2)
    if tuple(lse.shape) != tuple(q.shape[:2]):
        raise ValueError(f"lse must be (T, Hq) = {tuple(q.shape[:2])}, got {tuple(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"lse must be on q's device, got {lse.device} vs {q.device}")
    if not lse.is_floating_point():
        raise ValueError(f"lse must be floating (natural log-sum-exp), got dtype={lse.dtype}")
    if not values:
        return
    pos, _ = varlen.token_positions(cu_seqlens, q.shape[0], lse.device)
    sees_blocks = masks.num_visible_cmp_blocks(pos, cfg) > 0
    bad = torch.isnan(lse) | (lse == float("inf"))
    lost = sees_blocks[:, None] & (lse == float("-inf"))
    if not bool((bad | lost).any()):  # one device sync on the good path
        return
    if bool(bad.any()):
        t, h = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"lse must be finite or -inf (rows with no visible block), got lse[{t}, {h}]={lse[t, h].item()}; "
            "FA-2 reports +inf for empty rows: convert it (nsa_ref's cmp paths already do)"
        )
    t, h = (int(i) for i in lost.nonzero()[0])
    raise ValueError(
        f"lse[{t}, {h}] = -inf, but token {t} (position {int(pos[t])}) sees "
        f"{int(masks.num_visible_cmp_blocks(pos[t], cfg))} compressed block(s): -inf is only for rows "
        f"with none (position < block_len - 1 = {cfg.block_len - 1}); pass the lse of this q and k_cmp"
    )
