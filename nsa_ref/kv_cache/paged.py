"""One paged K/V store: a page pool, a block table and the lengths of B sequences.

Layout (FA-2's ``flash_attn_with_kvcache(k_cache, v_cache, cache_seqlens=, block_table=)``, vLLM)::

    k_pages      (num_pages, page_size, H, Dk)   the pool, any dtype; only the last dim needs stride 1
    v_pages      (num_pages, page_size, H, Dv)
    block_table  (B, max_pages) int32            page of sequence b's tokens [m*P, (m+1)*P); -1 = none yet
    cache_seqlens (B,) int32, on the pages' device  tokens held per sequence (FA-2's cache_seqlens)
    lengths      list[int] on the host           the same numbers, so appends never read the device

Token s of sequence b lives at ``k_pages[block_table[b, s // P], s % P]``. A sequence holds at
most ``capacity = max_pages * page_size`` tokens. The preallocated (non-paged) layout is the
special case of one page per sequence: ``k_pages`` (B, capacity, H, D) is then FA-2's dense
``k_cache`` and ``block_table[b, 0] = b``.

Rules checked whenever a table is set (``PageTableError``): int32 (``KVCacheTypeError``), entries
in -1..num_pages-1, no page listed twice (two sequences writing one page would overwrite each
other). The device table is written only through ``set_block_table`` so the host copy, which the
append checks read, stays equal to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nsa_ref.kv_cache.errors import (
    CacheCapacityError,
    CacheShapeError,
    KVCacheTypeError,
    PageTableError,
)

#: Block table entry of a page slot with no page assigned yet.
NO_PAGE = -1


@dataclass(frozen=True)
class PagedView:
    """What an attention kernel reads of one store (no mutation): pools, table, lengths.

    ``k_pages`` (num_pages, P, H, Dk), ``v_pages`` (num_pages, P, H, Dv), ``block_table``
    (B, max_pages) int32, ``cache_seqlens`` (B,) int32 on the pages' device, ``lengths`` the
    same on the host (for shapes: ``max_length``). The arguments of FA-2's paged kvcache call.
    """

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    lengths: tuple[int, ...]
    #: The preallocated layout: one page per sequence, block_table[b, 0] = b (then k_pages is
    #: FA-2's dense k_cache (B, capacity, H, D)). Known from the host copy of the table.
    dense: bool = False

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    @property
    def max_length(self) -> int:
        """Longest sequence (host value): the padded width of a dense gather. It changes from
        step to step; a width that must not (CUDA graphs, no recompiles) is ``capacity``."""
        return max(self.lengths, default=0)

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold, max_pages * page_size: fixed for the cache's life (static
        shapes), read from the table's shape only."""
        return self.block_table.shape[1] * self.page_size

    def locate(self, b: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """b, pos: broadcastable int tensors of valid (sequence, position) -> (page, offset) int64."""
        P = self.page_size
        page = self.block_table[b, torch.div(pos, P, rounding_mode="floor")].long()
        return page, pos % P

    def gather(
        self, b: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, head: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """b, pos, valid (bool) and head: broadcastable to one shape S -> (k, v).

        Without ``head``: k (*S, H, Dk), v (*S, H, Dv); with it: k (*S, Dk), v (*S, Dv), head h of
        each entry. Entries with ``valid`` False read nothing of the sequence and are exactly 0
        (whatever the pool holds there, so masked keys can never turn into NaN).
        """
        shape = torch.broadcast_shapes(b.shape, pos.shape, valid.shape, *(() if head is None else (head.shape,)))
        valid = valid.expand(shape)
        page, offset = self.locate(b, torch.where(valid, pos, torch.zeros_like(pos)))
        row = page.clamp_min(0) * self.page_size + offset  # invalid entries: some row of the pool
        if head is not None:
            row = row * self.k_pages.shape[2] + head
        hidden = ~valid[(...,) + (None,) * (1 if head is not None else 2)]
        return tuple(_take(pages, row, head is None).masked_fill_(hidden, 0) for pages in (self.k_pages, self.v_pages))


def _take(pages: torch.Tensor, row: torch.Tensor, whole_token: bool) -> torch.Tensor:
    """pages (num_pages, P, H, D), row: int64 of any shape, a flat token index (page * P + offset)
    or, per head, (page * P + offset) * H + h -> (*row.shape, H, D) or (*row.shape, D), a new tensor."""
    n, P, H, D = pages.shape
    try:  # one index_select on the merged leading dims (any pool whose dims merge: no copy)
        flat = pages.view(n * P, H, D) if whole_token else pages.view(n * P * H, D)
    except RuntimeError:  # dims that do not merge: the same entries through advanced indexing
        if whole_token:
            return pages[torch.div(row, P, rounding_mode="floor"), row % P]
        token = torch.div(row, H, rounding_mode="floor")
        return pages[torch.div(token, P, rounding_mode="floor"), token % P, row % H]
    return flat.index_select(0, row.reshape(-1)).reshape(*row.shape, *flat.shape[1:])


class PagedKV:
    """Pages, block table and lengths of B sequences; appends write in place.

    ``k_pages`` (num_pages, P, H, Dk), ``v_pages`` (num_pages, P, H, Dv), ``block_table``
    (B, max_pages) int32 on their device (see the module docstring). Every sequence starts empty.
    ``name`` ("raw", "compressed") goes into error messages.
    """

    def __init__(self, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor, name: str = "raw"):
        self.name = name
        _check_pools(k_pages, v_pages, name)
        self.k_pages, self.v_pages = k_pages, v_pages
        host = _checked_table(block_table, k_pages, name, batch_size=None)
        self.block_table = block_table
        self._table = host
        self.lengths: list[int] = [0] * block_table.shape[0]
        self.cache_seqlens = torch.zeros(block_table.shape[0], dtype=torch.int32, device=k_pages.device)

    @classmethod
    def contiguous(cls, batch_size: int, capacity: int, n_heads: int, k_dim: int, v_dim: int,
                   dtype: torch.dtype, device, name: str = "raw") -> "PagedKV":
        """Preallocated layout: one page of ``capacity`` tokens per sequence -> pages (B, capacity, H, D)."""
        if batch_size < 0 or capacity < 0:
            raise CacheShapeError(f"{name} cache: batch_size and capacity must be >= 0, got {batch_size}, {capacity}")
        # A zero-capacity page still needs size >= 1 to be a pool; its capacity stays 0 via max_pages.
        k = torch.zeros(batch_size, max(capacity, 1), n_heads, k_dim, dtype=dtype, device=device)
        v = torch.zeros(batch_size, max(capacity, 1), n_heads, v_dim, dtype=dtype, device=device)
        table = torch.arange(batch_size, dtype=torch.int32, device=device)[:, None]
        if capacity == 0:
            table = table[:, :0]
        return cls(k, v, table.contiguous(), name)

    @classmethod
    def allocate(cls, block_table: torch.Tensor, num_pages: int, page_size: int, n_heads: int, k_dim: int,
                 v_dim: int, dtype: torch.dtype, name: str = "raw") -> "PagedKV":
        """Zeroed pools (num_pages, page_size, H, D) on block_table's device, addressed by it."""
        if num_pages < 1 or page_size < 1:
            raise CacheShapeError(f"{name} cache: num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        dev = block_table.device
        k = torch.zeros(num_pages, page_size, n_heads, k_dim, dtype=dtype, device=dev)
        v = torch.zeros(num_pages, page_size, n_heads, v_dim, dtype=dtype, device=dev)
        return cls(k, v, block_table, name)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.block_table.shape[0]

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[0]

    @property
    def max_pages(self) -> int:
        return self.block_table.shape[1]

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold: max_pages * page_size."""
        return self.max_pages * self.page_size

    def view(self) -> PagedView:
        dense = self.max_pages == 1 and self.num_pages == self.batch_size and \
            all(row[0] == b for b, row in enumerate(self._table))
        return PagedView(self.k_pages, self.v_pages, self.block_table, self.cache_seqlens, tuple(self.lengths), dense)

    # -- table ------------------------------------------------------------------------------
    def set_block_table(self, block_table: torch.Tensor) -> None:
        """block_table: (B, max_pages) int32 -> copied into this store's table (same address).

        Checked first (``PageTableError`` / ``KVCacheTypeError``), nothing changes on refusal; a
        slot that holds tokens cannot lose its page.
        Moving a page that holds tokens moves those tokens: the caller copies the page's content.
        """
        if tuple(block_table.shape) != tuple(self.block_table.shape):
            raise CacheShapeError(
                f"{self.name} cache: block_table must keep its shape (B, max_pages) = "
                f"{tuple(self.block_table.shape)}, got {tuple(block_table.shape)}"
            )
        host = _checked_table(block_table, self.k_pages, self.name, batch_size=self.batch_size)
        P = self.page_size
        for b, n in enumerate(self.lengths):
            for slot in range(-(-n // P)):
                if host[b][slot] == NO_PAGE:
                    raise PageTableError(
                        f"{self.name} cache: sequence {b} holds {n} tokens, so block_table[{b}, {slot}] (positions "
                        f"{slot * P}..{slot * P + P - 1}) needs a page, got {NO_PAGE}; reset the sequence first"
                    )
        self.block_table.copy_(block_table)
        self._table = host

    # -- appends ----------------------------------------------------------------------------
    def check_extend(self, new_lengths: Sequence[int]) -> None:
        """Refuse (before anything is written) lengths past capacity or into unassigned pages."""
        P = self.page_size
        for b, (old, new) in enumerate(zip(self.lengths, new_lengths)):
            if new > self.capacity:
                raise CacheCapacityError(
                    f"{self.name} cache: sequence {b} holds {old} of {self.capacity} tokens "
                    f"(max_pages={self.max_pages} x page_size={P}); appending {new - old} would need {new}; "
                    "nothing was written"
                )
            for slot in range(old // P, -(-new // P)):
                if self._table[b][slot] == NO_PAGE:
                    raise PageTableError(
                        f"{self.name} cache: sequence {b} needs a page for positions "
                        f"{slot * P}..{slot * P + P - 1} but block_table[{b}, {slot}] = {NO_PAGE} (no page "
                        "assigned); assign one with set_block_table; nothing was written"
                    )

    def limits(self) -> list[int]:
        """Per sequence: the length ``check_extend`` accepts at most now (capacity, and the first slot
        from the current one on without a page)."""
        P, out = self.page_size, []
        for old, row in zip(self.lengths, self._table):
            slot = old // P
            while slot < len(row) and row[slot] != NO_PAGE:
                slot += 1
            out.append(min(self.capacity, max(slot * P, old)))
        return out

    def write(self, b: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """b, pos: (N,) int, k: (N, H, Dk), v: (N, H, Dv) -> stored in place at (b, pos).

        Assumes ``check_extend`` passed for the lengths these positions imply."""
        page, offset = self.view().locate(b, pos)
        self.k_pages.index_put_((page, offset), k)
        self.v_pages.index_put_((page, offset), v)

    def set_lengths(self, new_lengths: Sequence[int]) -> None:
        """Host lengths and ``cache_seqlens`` (in place) -> ``new_lengths``."""
        self.lengths = list(new_lengths)
        self.cache_seqlens.copy_(torch.tensor(self.lengths, dtype=torch.int32))

    def add_lengths(self, n: int) -> None:
        """Every sequence grew by ``n`` tokens (a decode step): no host-to-device copy."""
        self.lengths = [x + n for x in self.lengths]
        self.cache_seqlens.add_(n)

    def set_host_lengths(self, new_lengths: Sequence[int]) -> None:
        """Host lengths only -> ``new_lengths``: after a device-side append (a replayed CUDA graph)
        already advanced ``cache_seqlens`` to the same numbers."""
        self.lengths = list(new_lengths)

    def read(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence b's tokens as new tensors: k (S_b, H, Dk), v (S_b, H, Dv) (inspection, tests)."""
        n = self.lengths[b]
        pos = torch.arange(n, device=self.k_pages.device)
        bb = torch.full_like(pos, b)
        return self.view().gather(bb, pos, torch.ones_like(pos, dtype=torch.bool))


def _check_pools(k_pages: torch.Tensor, v_pages: torch.Tensor, name: str) -> None:
    for what, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CacheShapeError(f"{name} cache: {what} must be (num_pages, page_size, H, D), got {shape}")
        if not x.is_floating_point():
            raise KVCacheTypeError(f"{name} cache: {what} must be floating, got dtype={x.dtype}")
    if k_pages.shape[:3] != v_pages.shape[:3]:
        raise CacheShapeError(
            f"{name} cache: k_pages and v_pages need the same (num_pages, page_size, H), "
            f"got {tuple(k_pages.shape[:3])} and {tuple(v_pages.shape[:3])}"
        )
    if k_pages.dtype != v_pages.dtype:
        raise KVCacheTypeError(f"{name} cache: k_pages and v_pages need one dtype, got {k_pages.dtype}, {v_pages.dtype}")
    if k_pages.device != v_pages.device:
        raise CacheShapeError(f"{name} cache: k_pages and v_pages need one device, got {k_pages.device}, {v_pages.device}")


def _checked_table(block_table, pages: torch.Tensor, name: str, batch_size: int | None) -> list[list[int]]:
    """-> the table's host copy, after checking dtype, shape, device, range and distinct pages."""
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        shape = tuple(block_table.shape) if isinstance(block_table, torch.Tensor) else type(block_table).__name__
        raise CacheShapeError(f"{name} cache: block_table must be (B, max_pages), got {shape}")
    if block_table.dtype != torch.int32:
        raise KVCacheTypeError(
            f"{name} cache: block_table must be int32 (FA-2 / vLLM layout), got dtype={block_table.dtype}"
        )
    if block_table.device != pages.device:
        raise CacheShapeError(
            f"{name} cache: block_table must be on the pages' device {pages.device}, got {block_table.device}"
        )
    if batch_size is not None and block_table.shape[0] != batch_size:
        raise CacheShapeError(f"{name} cache: block_table has {block_table.shape[0]} rows, the cache holds B = {batch_size}")
    host = block_table.tolist()  # one read, when a table is set; appends use this copy
    num_pages = pages.shape[0]
    owner: dict[int, tuple[int, int]] = {}
    for b, row in enumerate(host):
        for slot, page in enumerate(row):
            if page == NO_PAGE:
                continue
            if not 0 <= page < num_pages:
                raise PageTableError(
                    f"{name} cache: block_table[{b}, {slot}] = {page} points outside the pool of {num_pages} "
                    f"pages (valid: 0..{num_pages - 1}, or {NO_PAGE} for no page yet)"
                )
            if page in owner:
                ob, oslot = owner[page]
                raise PageTableError(
                    f"{name} cache: page {page} is listed twice, block_table[{ob}, {oslot}] and "
                    f"block_table[{b}, {slot}]: two sequences (or slots) would overwrite each other"
                )
            owner[page] = (b, slot)
    return host
