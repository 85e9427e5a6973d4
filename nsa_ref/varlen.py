"""Packing helpers for the FA-2 varlen layout: one token axis, ``cu_seqlens (B+1,) int32``.

``cu_seqlens=None`` always means one sequence holding all T tokens.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from nsa_ref import masks

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, total: int, name: str = "cu_seqlens") -> None:
    """cu_seqlens: (B+1,) int32 -> raises ValueError unless it starts at 0, never decreases
    and ends at ``total``."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 (FA-2 varlen layout), got dtype={cu_seqlens.dtype}; use .to(torch.int32)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D with B+1 >= 1 entries, got shape={tuple(cu_seqlens.shape)}")
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    drops = [b for b in range(len(values) - 1) if values[b + 1] < values[b]]
    if drops:
        b = drops[0]
        raise ValueError(
            f"{name} must be non-decreasing, got {name}[{b}]={values[b]} > {name}[{b + 1}]={values[b + 1]}"
        )
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens, got {values[-1]} != T={total}")


def seq_bounds(cu_seqlens: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    """cu_seqlens: (B+1,) -> [(start, end)] per sequence; None -> [(0, total)]."""
    if cu_seqlens is None:
        return [(0, total)]
    values = cu_seqlens.tolist()
    return list(zip(values[:-1], values[1:]))


def seq_lengths(cu_seqlens: torch.Tensor | None, total: int) -> list[int]:
    """Host list of sequence lengths (one device sync when cu_seqlens lives on a GPU)."""
    return [b - a for a, b in seq_bounds(cu_seqlens, total)]


def token_positions(cu_seqlens: torch.Tensor | None, total: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (local position (T,), first packed row of the token's sequence (T,)) int64, computed on
    ``device`` without a host sync."""
    idx = torch.arange(total, device=device)
    if cu_seqlens is None:
        return idx, torch.zeros_like(idx)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    start = cu[torch.searchsorted(cu[1:], idx, right=True)]
    return idx - start, start


def cu_seqlens_from_lengths(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """lengths: B ints -> cu_seqlens (B+1,) int32."""
    cu = [0]
    for n in lengths:
        if n < 0:
            raise ValueError(f"sequence lengths must be >= 0, got {list(lengths)}")
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def pack(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """seqs: B tensors (T_b, ...) -> (packed (sum T_b, ...), cu_seqlens (B+1,) int32)."""
    if not seqs:
        raise ValueError("pack needs at least one sequence (an empty one is fine)")
    cu = cu_seqlens_from_lengths([s.shape[0] for s in seqs], device=seqs[0].device)
    return torch.cat(list(seqs), dim=0), cu


def cmp_seqlens(cu_seqlens: torch.Tensor | None, total: int, cfg: "NSAConfig") -> list[int]:
    """-> [Tc_b]: number of compression blocks of every sequence."""
    return [masks.num_cmp_blocks(b - a, cfg) for a, b in seq_bounds(cu_seqlens, total)]


def cmp_cu_seqlens(cu_seqlens: torch.Tensor | None, total: int, cfg: "NSAConfig", device=None) -> torch.Tensor:
    """cu_seqlens: (B+1,) -> cu_seqlens_cmp (B+1,) int32 over the packed compressed blocks."""
    if device is None and cu_seqlens is not None:
        device = cu_seqlens.device
    return cu_seqlens_from_lengths(cmp_seqlens(cu_seqlens, total, cfg), device=device)


def cmp_block_token_index(cu_seqlens: torch.Tensor | None, total: int, cfg: "NSAConfig", device=None) -> torch.Tensor:
    """-> (Tc_total, l) int64: packed token index of every token of every compression block,
    block i of a sequence starting at ``start`` covering start + [i*d, i*d + l)."""
    l, d = cfg.block_len, cfg.block_stride
    offsets = torch.arange(l, device=device)
    rows = []
    for a, b in seq_bounds(cu_seqlens, total):
        tc = masks.num_cmp_blocks(b - a, cfg)
        starts = a + d * torch.arange(tc, device=device)
        rows.append(starts[:, None] + offsets[None, :])
    return torch.cat(rows, dim=0) if rows else offsets.new_zeros((0, l))


def cat_rows(parts: list[torch.Tensor], like: torch.Tensor, tail: tuple[int, ...]) -> torch.Tensor:
    """Concatenate per-sequence (or per-chunk) rows along dim 0; no rows at all gives (0, *tail),
    still attached to ``like`` (then itself empty) so that backward works on an all-empty batch."""
    return torch.cat(parts, dim=0) if parts else like.new_zeros((0, *tail)) + like.sum() * 0
