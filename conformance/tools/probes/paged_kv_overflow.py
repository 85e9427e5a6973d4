"""Paged KV cache append past its pages: block_table is read out of bounds (issue #2709, <= 2.8.3).

    python conformance/tools/probes/paged_kv_overflow.py [--variant next_row|past_end] [--json]

Two sequences, one 256-token page each (block_table [[0], [2]] of 4 pages), 16 new tokens each.
Variant next_row: sequence 0 holds 250 tokens, so tokens 256-265 need a second page; the kernel
reads block_table[0][1], which is block_table[1][0]: sequence 1's page. Variant past_end: the last
sequence overflows, so the page index is read past the end of block_table.
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[3])

import torch  # noqa: E402

from conformance.tools.probes import _common as C  # noqa: E402

NAME = "paged_kv_overflow"
TITLE = "flash_attn_with_kvcache, paged (page 256, 1 page per sequence), cache_seqlens + 16 new > 256"
EXPECTED = "out-of-bounds block_table read: another sequence's page written, garbage or illegal access (#2709)"
RULES = ("FA2-KV-CACHE-OVERFLOW",)
PROVIDERS = C.BOTH
VARIANTS = ("next_row", "past_end")

PAGE, NUM_BLOCKS, NEW, HQ, HK, D = 256, 4, 16, 4, 2, 64
TABLE = [[0], [2]]


def not_applicable(provider, variant):
    if provider == "torch":
        return "torch's op has no KV-cache append; paged KV with appends is flash_attn_with_kvcache only"
    return None


def _logical(cache, b, length):
    """The first length cached tokens of sequence b, through its pages."""
    rows = [cache[TABLE[b][p // PAGE], p % PAGE] for p in range(length)]
    return torch.stack(rows) if rows else cache.new_zeros(0, *cache.shape[2:])


def build(provider, variant, device):
    lengths = [250, 100] if variant == "next_row" else [100, 250]
    q = C.rand(2, NEW, HQ, D, device=device)
    k_new, v_new = C.rand(2, NEW, HK, D, device=device), C.rand(2, NEW, HK, D, device=device)
    k_cache, v_cache = C.rand(NUM_BLOCKS, PAGE, HK, D, device=device), C.rand(NUM_BLOCKS, PAGE, HK, D, device=device)
    before = (k_cache.clone(), v_cache.clone())  # the kernel appends in place
    call = C.kvcache_call(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=C.int32(lengths, device),
                          block_table=C.int32([r[0] for r in TABLE], device).reshape(2, 1), causal=True)

    def ref(dtype):
        outs = []
        for b, n in enumerate(lengths):
            keys = torch.cat([_logical(before[0], b, n), k_new[b]])
            vals = torch.cat([_logical(before[1], b, n), v_new[b]])
            keep = C.intended_mask(NEW, n + NEW, True, device=q.device)
            outs.append(C.attend(q[b:b + 1], keys[None], vals[None], keep, D ** -0.5, dtype)[0])
        return torch.stack(outs)

    def judge(result):
        outcome, detail = C.judge_out(ref, q.dtype)(result)
        # Rows each sequence may write: its own appended positions that fit in its own page.
        allowed = {(TABLE[b][0], p) for b, n in enumerate(lengths) for p in range(n, min(n + NEW, PAGE))}
        changed = (k_cache != before[0]).flatten(2).any(dim=2)
        foreign = [(int(pg), int(r)) for pg, r in torch.nonzero(changed).tolist() if (pg, r) not in allowed]
        if foreign:
            outcome = "silent_corruption"
            pages = sorted({pg for pg, _ in foreign})
            detail += "; cache rows written outside the sequence's own pages: " + "; ".join(
                f"page {pg} rows {C.index_ranges(r for p, r in foreign if p == pg)}" for pg in pages)
        return outcome, detail

    return C.Setup(call, judge=judge,
                   notes=[f"cache_seqlens {lengths} + {NEW} new tokens; capacity 1 page * {PAGE} = {PAGE}",
                          f"block_table {TABLE} over {NUM_BLOCKS} pages"])


if __name__ == "__main__":
    sys.exit(C.main(sys.modules[__name__]))
