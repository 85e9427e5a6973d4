"""NSA visibility rules, one small function per rule (nsa_spec.md is the source).

Positions ``t`` (query) and ``s`` (key token) are local to their sequence, 0-based. Each
predicate works on Python ints and on broadcastable integer tensors alike, so the reference,
the SDPA fallback, decode and the tests all build their masks from the same rules.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig


def num_cmp_blocks(seqlen: int, cfg: "NSAConfig") -> int:
    """Tc of one sequence (``NSAConfig.num_cmp_blocks``, where the geometry lives)."""
    return cfg.num_cmp_blocks(seqlen)


def num_sel_blocks(seqlen: int, cfg: "NSAConfig") -> int:
    """nb of one sequence (``NSAConfig.num_sel_blocks``, where the geometry lives)."""
    return cfg.num_sel_blocks(seqlen)


def cmp_block_end(i, cfg: "NSAConfig"):
    """Last token of compression block ``i``: i*d + l - 1."""
    return i * cfg.block_stride + cfg.block_len - 1


def cmp_block_visible(t, i, cfg: "NSAConfig"):
    """Query ``t`` sees compression block ``i`` iff the block has ended: i*d + l - 1 <= t."""
    return cmp_block_end(i, cfg) <= t


def num_visible_cmp_blocks(t, cfg: "NSAConfig"):
    """How many compression blocks query ``t`` sees (ignores the sequence's Tc cap)."""
    l, d = cfg.block_len, cfg.block_stride
    if isinstance(t, torch.Tensor):
        return torch.where(t >= l - 1, torch.div(t - (l - 1), d, rounding_mode="floor") + 1, 0)
    return 0 if t < l - 1 else (t - (l - 1)) // d + 1


def cmp_block_emitted_at(t, cfg: "NSAConfig") -> bool:
    """Decode rule: a new compression block ends exactly at token ``t`` (i*d + l - 1 == t)."""
    l, d = cfg.block_len, cfg.block_stride
    return t >= l - 1 and (t - (l - 1)) % d == 0


def current_sel_block(t, cfg: "NSAConfig"):
    """c = floor(t / l'): the selection block holding query ``t``."""
    if isinstance(t, torch.Tensor):
        return torch.div(t, cfg.sel_block, rounding_mode="floor")
    return t // cfg.sel_block


def sel_block_of_token(s, cfg: "NSAConfig"):
    """Selection block holding key token ``s``: floor(s / l')."""
    return current_sel_block(s, cfg)


def sel_block_candidate(t, j, cfg: "NSAConfig"):
    """Block ``j`` can be selected by query ``t`` iff j <= c (later blocks hold only future tokens)."""
    return j <= current_sel_block(t, cfg)


def sel_block_forced(t, j, cfg: "NSAConfig"):
    """Block ``j`` is always selected for query ``t``: one of the n_init initial blocks
    0..n_init-1 or the n_local blocks c-n_local+1..c ending at the current block c, clipped
    to 0..c."""
    c = current_sel_block(t, cfg)
    initial = j < cfg.n_init
    local = j > c - cfg.n_local
    return (initial | local) & (j <= c) & (j >= 0)


def causal_visible(t, s):
    """Key ``s`` is not in the future of query ``t``: s <= t."""
    return s <= t


def win_visible(t, s, cfg: "NSAConfig"):
    """Sliding window: s in [max(0, t - w + 1), t], w keys including the query itself."""
    return causal_visible(t, s) & (s > t - cfg.window)


def cmp_visible_mask(q_pos: torch.Tensor, num_blocks: int, cfg: "NSAConfig") -> torch.Tensor:
    """q_pos: (L,) int -> (L, num_blocks) bool, ``cmp_block_visible`` for every (t, i)."""
    i = torch.arange(num_blocks, device=q_pos.device)
    return cmp_block_visible(q_pos[:, None], i[None, :], cfg)


def win_visible_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, cfg: "NSAConfig") -> torch.Tensor:
    """q_pos: (L,), k_pos: (S,) int -> (L, S) bool, ``win_visible`` for every (t, s)."""
    return win_visible(q_pos[:, None], k_pos[None, :], cfg)


def selected_block_mask(block_idx: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """block_idx: (L, Hkv, n) int, -1 padded -> (L, Hkv, num_blocks) bool membership.

    A block listed twice counts once: selection is a set of blocks. Indices outside
    0..num_blocks-1 (the -1 padding) select nothing.
    """
    L, Hkv, _ = block_idx.shape
    # Out-of-range entries go to an extra trailing slot that is dropped.
    outside = (block_idx < 0) | (block_idx >= num_blocks)
    slots = torch.where(outside, num_blocks, block_idx.long())
    member = torch.zeros(L, Hkv, num_blocks + 1, dtype=torch.bool, device=block_idx.device)
    member.scatter_(2, slots, True)
    return member[..., :num_blocks]


def unique_blocks(block_idx: torch.Tensor) -> torch.Tensor:
    """block_idx: (..., n) int -> int32 (..., n): each list sorted ascending, repeats and negative
    entries turned into -1 and moved to the end. Selection is a set of blocks; every fast path
    walks lists in this form."""
    idx = block_idx.to(torch.int64)
    big = torch.iinfo(torch.int64).max
    idx = torch.where(idx < 0, big, idx).sort(dim=-1).values
    repeat = torch.zeros_like(idx, dtype=torch.bool)
    repeat[..., 1:] = idx[..., 1:] == idx[..., :-1]
    idx = torch.where(repeat, big, idx).sort(dim=-1).values
    return torch.where(idx == big, -1, idx).to(torch.int32).contiguous()


def sel_visible_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, block_idx: torch.Tensor, cfg: "NSAConfig",
    num_blocks: int | None = None,
) -> torch.Tensor:
    """q_pos: (L,), k_pos: (S,) int, block_idx: (L, Hkv, n) -> (Hkv, L, S) bool.

    Query t (KV head h) sees token s iff s's selection block is in block_idx[t, h] and s <= t.
    ``num_blocks``: selection blocks covering k_pos (k_pos = 0..S-1: ``cfg.num_sel_blocks(S)``);
    None reads max(k_pos) from the device.
    """
    k_block = sel_block_of_token(k_pos, cfg)
    if num_blocks is None:
        num_blocks = int(k_block.max().item()) + 1 if k_pos.numel() else 0
    member = selected_block_mask(block_idx, num_blocks)  # (L, Hkv, nb)
    in_selected = member[:, :, k_block].permute(1, 0, 2)  # (Hkv, L, S)
    return in_selected & causal_visible(q_pos[None, :, None], k_pos[None, None, :])


def selection_weights(num_cmp: int, num_sel: int, cfg: "NSAConfig", dtype=torch.float64, device=None) -> torch.Tensor:
    """-> (num_cmp, num_sel) w(j, i) = |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d, indexed [i, j].

    For l, d, l' = 32, 16, 64 the column of block j holds 1, 2, 2, 2, 1 on cmp blocks 4j-1..4j+3.
    """
    l, d, lp = cfg.block_len, cfg.block_stride, cfg.sel_block
    i = torch.arange(num_cmp, device=device)[:, None]
    j = torch.arange(num_sel, device=device)[None, :]
    lo = torch.maximum(i * d, j * lp)
    hi = torch.minimum(i * d + l, (j + 1) * lp)
    return (hi - lo).clamp(min=0).to(dtype) / d
