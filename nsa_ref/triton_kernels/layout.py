"""Varlen bookkeeping shared by the Triton wrappers (plain torch, no Triton).

Tokens are packed as in FA-2 varlen: sequence b holds rows cu_seqlens[b]..cu_seqlens[b+1]-1.
"""
from __future__ import annotations

import torch


def next_pow2(x: int, floor: int = 1) -> int:
    """Smallest power of two >= max(x, floor)."""
    x = max(int(x), floor)
    return 1 << (x - 1).bit_length()


def seq_lengths(cu_seqlens: torch.Tensor | None, T: int) -> list[int]:
    """Host list of sequence lengths (one device sync when cu_seqlens lives on a GPU)."""
    if cu_seqlens is None:
        return [T]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def token_position(cu_seqlens: torch.Tensor | None, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (local position (T,), first row of the token's sequence (T,)) int32, on ``device``."""
    idx = torch.arange(T, device=device, dtype=torch.int64)
    if cu_seqlens is None:
        return idx.to(torch.int32), torch.zeros(T, dtype=torch.int32, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    seq = torch.searchsorted(cu[1:], idx, right=True)
    start = cu[seq]
    return (idx - start).to(torch.int32), start.to(torch.int32)


def row_tiles(lengths: list[int], tile: int, cmp_counts: list[int]) -> list[tuple[int, int, int, int, int]]:
    """Tiles of at most ``tile`` rows that never cross a sequence boundary.

    -> rows (first packed row, first local position, sequence length, first cmp row, Tc).
    """
    tiles = []
    row = crow = 0
    for length, tc in zip(lengths, cmp_counts):
        for p in range(0, length, tile):
            tiles.append((row + p, p, length, crow, tc))
        row += length
        crow += tc
    return tiles
