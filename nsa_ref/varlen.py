"""Packing helpers for the FA-2 varlen layout: one token axis, ``cu_seqlens (B+1,) int32``.

``cu_seqlens=None`` always means one sequence holding all T tokens. Every helper takes a
``nsa_ref.packing.Packing`` (what the public functions pass down: its host offsets are read at
most once per call) or a plain tensor / None (wrapped by ``as_packing``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from nsa_ref import masks
from nsa_ref.packing import Packing, as_packing, check_cu_metadata, cu_seqlens_from_lengths

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig

__all__ = ["Packing", "cat_rows", "check_cu_seqlens", "cmp_block_token_index", "cmp_cu_seqlens", "cmp_seqlens",
           "cu_seqlens_from_lengths", "pack", "seq_bounds", "seq_lengths", "token_positions"]


def check_cu_seqlens(cu_seqlens, total: int, name: str = "cu_seqlens") -> None:
    """cu_seqlens: (B+1,) int32 (or a Packing) -> raises ValueError unless it starts at 0, never
    decreases and ends at ``total``. A Packing was validated when it was built."""
    if cu_seqlens is None or isinstance(cu_seqlens, Packing):
        return
    check_cu_metadata(cu_seqlens, name)
    Packing(cu_seqlens, total, name=name).offsets


def seq_bounds(cu_seqlens, total: int) -> list[tuple[int, int]]:
    """cu_seqlens: (B+1,) -> [(start, end)] per sequence; None -> [(0, total)]."""
    return as_packing(cu_seqlens, total).bounds


def seq_lengths(cu_seqlens, total: int) -> list[int]:
    """Host list of sequence lengths (the packing's one device read when cu_seqlens is on a GPU)."""
    return as_packing(cu_seqlens, total).lengths


def token_positions(cu_seqlens, total: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (local position (T,), first packed row of the token's sequence (T,)) int64, computed on
    ``device`` without a host sync."""
    return as_packing(cu_seqlens, total).token_positions(device)


def pack(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """seqs: B tensors (T_b, ...) -> (packed (sum T_b, ...), cu_seqlens (B+1,) int32)."""
    if not seqs:
        raise ValueError("pack needs at least one sequence (an empty one is fine)")
    cu = cu_seqlens_from_lengths([s.shape[0] for s in seqs], device=seqs[0].device)
    return torch.cat(list(seqs), dim=0), cu


def cmp_seqlens(cu_seqlens, total: int, cfg: "NSAConfig") -> list[int]:
    """-> [Tc_b]: number of compression blocks of every sequence."""
    return as_packing(cu_seqlens, total).cmp_lengths(cfg)


def cmp_cu_seqlens(cu_seqlens, total: int, cfg: "NSAConfig", device=None) -> torch.Tensor:
    """cu_seqlens: (B+1,) -> cu_seqlens_cmp (B+1,) int32 over the packed compressed blocks."""
    return as_packing(cu_seqlens, total).cmp_cu_seqlens(cfg, device)


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
