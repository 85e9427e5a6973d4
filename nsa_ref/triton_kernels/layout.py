"""Row tiles and block sizes shared by the Triton wrappers (plain Python, no Triton).

Tokens are packed as in FA-2 varlen: sequence b holds rows cu_seqlens[b]..cu_seqlens[b+1]-1.
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import torch

_TABLES: OrderedDict = OrderedDict()
_TABLES_KEPT = 64


def device_table(rows, device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Host ints (a list of ints or of equal-length tuples) -> a tensor on ``device``, kept for the
    next call with the same values: the host-to-device copy (a sync point on CUDA from pageable
    memory, and not allowed inside CUDA-graph capture) happens once per layout, at warm-up.
    Inside a graph torch.compile traces, the values become a constant of the graph instead."""
    if torch.compiler.is_compiling():
        return torch.tensor(rows, dtype=dtype, device=device)
    key = (tuple(rows), str(device), dtype)
    table = _TABLES.get(key)
    if table is None:
        table = torch.tensor(rows, dtype=dtype, device=device)
        _TABLES[key] = table
        if len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def next_pow2(x: int, floor: int = 1) -> int:
    """Smallest power of two >= max(x, floor)."""
    x = max(int(x), floor)
    return 1 << (x - 1).bit_length()


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


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (asked once per device)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_programs(programs: int, max_splits: int, device: torch.device, target: int | None = None) -> int:
    """How many ways to split each of ``programs`` decode programs: the largest power of two s with
    programs * s * 2 <= target and s * 2 <= max_splits (1 when none), where target defaults to
    two programs per SM of ``device``'s GPU; 1 off CUDA unless a target is given."""
    if target is None:
        if device.type != "cuda":
            return 1
        target = 2 * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    splits = 1
    while programs * splits * 2 <= target and splits * 2 <= max_splits:
        splits *= 2
    return splits
