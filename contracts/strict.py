"""Strict mode: the rules that need index values (cu_seqlens, seqused_k, cache_seqlens, block_table).

Cost: the index tensors that passed the meta rules are flattened, concatenated on their device and
copied to the host with ONE ``.tolist()``: one device sync per call (plus a small concat kernel).
Meta tensors have no values; for them strict mode adds nothing to the meta rules.

One predicate per rule: ``fa2_<rule>(c, vals) -> str | None`` where ``vals`` maps argument names
to Python lists (``block_table``: list of rows).
"""
from __future__ import annotations

import torch

from .facts import CallFacts, Tensor
from .fa2_mask import normalised_window

# Meta rules whose failure makes an index tensor unreadable as (B+1,) / (B,) / (B, n) int32.
_BLOCKING = {"FA2-RANK", "FA2-DEVICE", "FA2-INDEX-DTYPE", "FA2-INDEX-SHAPE", "FA2-INDEX-CONTIGUOUS",
             "FA2-BATCH-EMPTY"}


def read_index_values(c: CallFacts, failed: set[str]) -> dict[str, list] | None:
    """Host copies of the index tensors of ``c`` in one transfer; None when nothing can be read."""
    if failed & _BLOCKING:
        return None
    if c.kind == "varlen":
        named = [("cu_seqlens_q", c.cu_q), ("cu_seqlens_k", c.cu_k), ("seqused_k", c.seqused_k)]
    else:
        named = [("cache_seqlens", c.cache_seqlens)]
    if c.paged:
        named.append(("block_table", c.block_table))
    named = [(n, t) for n, t in named if isinstance(t, Tensor)]
    if any(t.is_meta for _, t in named):
        return None
    values: dict[str, list] = {}
    if c.kind == "kvcache" and isinstance(c.cache_seqlens, int):
        values["cache_seqlens"] = [c.cache_seqlens] * c.b
    if not named:
        return values or None
    flat = torch.cat([t.reshape(-1) for _, t in named]).tolist()
    start = 0
    for name, t in named:
        n = t.numel()
        chunk = flat[start:start + n]
        start += n
        if name == "block_table":
            width = t.shape[1]
            chunk = [chunk[i:i + width] for i in range(0, n, width)]
        values[name] = chunk
    return values


def _lengths(cu: list[int]) -> list[int]:
    return [b - a for a, b in zip(cu, cu[1:])]


def _first_bad(items, limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def fa2_cu_seqlens_start(c: CallFacts, vals: dict) -> str | None:
    bad = [f"{name}[0] = {vals[name][0]}" for name in ("cu_seqlens_q", "cu_seqlens_k")
           if vals.get(name) and vals[name][0] != 0]
    return "; ".join(bad) + " (must be 0)" if bad else None


def fa2_cu_seqlens_decreasing(c: CallFacts, vals: dict) -> str | None:
    bad = []
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        cu = vals.get(name)
        if cu is None:
            continue
        drops = [f"{name}[{i}] = {a} > {name}[{i + 1}] = {b}" for i, (a, b) in enumerate(zip(cu, cu[1:])) if a > b]
        if drops:
            bad.append(_first_bad(drops))
    return "; ".join(bad) if bad else None


def fa2_cu_seqlens_overrun(c: CallFacts, vals: dict) -> str | None:
    bad = []
    cu_q = vals.get("cu_seqlens_q")
    if cu_q is not None and cu_q[-1] > c.total_q:
        bad.append(f"cu_seqlens_q[-1] = {cu_q[-1]} > q tokens {c.total_q}")
    cu_k = vals.get("cu_seqlens_k")
    if cu_k is not None and not c.paged and cu_k[-1] > c.total_k:
        bad.append(f"cu_seqlens_k[-1] = {cu_k[-1]} > k tokens {c.total_k}")
    return "; ".join(bad) if bad else None


def _true_max(lengths: list[int]) -> int:
    return max(lengths, default=0)


def fa2_max_seqlen_q_low(c: CallFacts, vals: dict) -> str | None:
    cu = vals.get("cu_seqlens_q")
    if cu is None:
        return None
    true_max = _true_max(_lengths(cu))
    if c.max_q >= true_max:
        return None
    return f"max_seqlen_q = {c.max_q} but the longest query sequence has {true_max} tokens"


def _k_lengths(c: CallFacts, vals: dict) -> list[int] | None:
    if "seqused_k" in vals:
        return vals["seqused_k"]
    cu = vals.get("cu_seqlens_k")
    return None if cu is None else _lengths(cu)


def fa2_max_seqlen_k_low(c: CallFacts, vals: dict) -> str | None:
    lengths = _k_lengths(c, vals)
    if lengths is None:
        return None
    true_max = _true_max(lengths)
    if c.max_k >= true_max:
        return None
    return f"max_seqlen_k = {c.max_k} but the longest key sequence has {true_max} tokens"


def _capacity(c: CallFacts) -> int | None:
    """Keys one sequence can hold: pages_per_seq * page for a paged cache, else the cache row."""
    if c.paged:
        return None if c.pages_per_seq is None else c.pages_per_seq * c.page_size
    return c.ks[1] if c.kind == "kvcache" else None


def fa2_seqused_k_overrun(c: CallFacts, vals: dict) -> str | None:
    used = vals.get("seqused_k")
    if used is None:
        return None
    if c.paged:
        cap = _capacity(c)
        room = [cap] * len(used)
    else:
        cu = vals.get("cu_seqlens_k")
        if cu is None:
            return None
        room = _lengths(cu)
    bad = [f"seqused_k[{i}] = {u} vs {r} keys" for i, (u, r) in enumerate(zip(used, room)) if not 0 <= u <= r]
    return _first_bad(bad) if bad else None


def _needed_keys(c: CallFacts, vals: dict) -> list[int] | None:
    """Keys each sequence needs in the cache: cache length plus new tokens."""
    if c.kind == "varlen":
        return _k_lengths(c, vals) if c.paged else None
    lengths = vals.get("cache_seqlens")
    if lengths is None:
        return None
    new = c.s_new or 0
    return [n + new for n in lengths]


def fa2_kv_cache_overflow(c: CallFacts, vals: dict) -> str | None:
    cap = _capacity(c)
    needed = _needed_keys(c, vals)
    if cap is None or needed is None:
        return None
    new = c.s_new or 0
    bad = [f"sequence {i} needs {n} keys" for i, n in enumerate(needed) if n > cap or n - new < 0]
    if not bad:
        return None
    what = f"{c.pages_per_seq} pages * {c.page_size}" if c.paged else "seqlen_cache"
    return f"{_first_bad(bad)} (cache lengths + {new} new); capacity is {what} = {cap}"


def fa2_block_table_range(c: CallFacts, vals: dict) -> str | None:
    table = vals.get("block_table")
    if table is None:
        return None
    needed = _needed_keys(c, vals)
    page, blocks = c.page_size, c.num_blocks
    bad = []
    for i, row in enumerate(table):
        # Only the pages a sequence uses are read; the rest of a row may hold padding.
        used = len(row) if needed is None else min(len(row), -(-max(needed[i], 0) // page))
        bad += [f"block_table[{i}][{j}] = {p}" for j, p in enumerate(row[:used]) if not 0 <= p < blocks]
    if not bad:
        return None
    return f"{_first_bad(bad)}; the cache has {blocks} pages"


def _rotary_query_rows(c: CallFacts) -> int:
    """Table rows past cache_seqlens[b] that the rotation of q reads: seqlen_q with a causal or local
    mask as FA-2 computes it (after flash_api.cpp's normalisation with seqlen_k = the cache
    capacity), else 1 (every query row reads the row at cache_seqlens[b])."""
    sq = c.sq
    if sq <= 1:
        return sq  # one query reads row cache_seqlens[b] either way (alibi keeps causal on: same row)
    _, window = normalised_window(c.causal, (c.wl, c.wr), sq, c.sk)
    return 1 if window == (-1, -1) else sq


def fa2_rotary_table_overrun(c: CallFacts, vals: dict) -> str | None:
    cos, lengths = c.rotary_cos, vals.get("cache_seqlens")
    if lengths is None or c.k_new is None or not isinstance(cos, Tensor) or cos.dim() != 2 or c.sk is None:
        return None  # no rotation (FA2-ROTARY-NEW-KV / FA2-ROTARY-TABLE name the arguments)
    # The kernel starts at binfo.seqlen_k_cache + leftpad_k = cache_seqlens[b] (block_info.h subtracts
    # leftpad_k from cache_seqlens), so cache_leftpad does not move the rows.
    seqlen_ro = cos.shape[0]
    q_rows = _rotary_query_rows(c)
    rows = max(q_rows, c.s_new or 0)
    if max(lengths, default=0) + rows <= seqlen_ro:
        return None
    how = "causal/local: one row per query" if q_rows == c.sq and c.sq > 1 else "no causal/local mask: one row"
    bad = [f"sequence {i}: cache_seqlens {n} + {rows} rows = {n + rows}" for i, n in enumerate(lengths)
           if n + rows > seqlen_ro]
    return (f"{_first_bad(bad)} > rotary_cos/rotary_sin rows {seqlen_ro} (seqlen_q {c.sq}, {how}; "
            f"{c.s_new} new keys); FA-2 reads cos/sin rows cache_seqlens[b] .. cache_seqlens[b] + {rows} - 1 "
            "without checking the table length")


STRICT_PREDICATES = {
    "FA2-CU-SEQLENS-START": fa2_cu_seqlens_start,
    "FA2-CU-SEQLENS-DECREASING": fa2_cu_seqlens_decreasing,
    "FA2-CU-SEQLENS-OVERRUN": fa2_cu_seqlens_overrun,
    "FA2-MAX-SEQLEN-Q-LOW": fa2_max_seqlen_q_low,
    "FA2-MAX-SEQLEN-K-LOW": fa2_max_seqlen_k_low,
    "FA2-SEQUSED-K-OVERRUN": fa2_seqused_k_overrun,
    "FA2-KV-CACHE-OVERFLOW": fa2_kv_cache_overflow,
    "FA2-BLOCK-TABLE-RANGE": fa2_block_table_range,
    "FA2-ROTARY-TABLE-OVERRUN": fa2_rotary_table_overrun,
}
