"""Errors of the NSA KV cache: every refusal happens before anything is written.

All derive from ``KVCacheError`` (a ``ValueError``), so ``except KVCacheError`` catches every
refused cache operation; wrong dtypes (pages, new tokens, a non-int32 block table) are also a
``TypeError``. Messages name the sequence index and the offending value.
"""
from __future__ import annotations


class KVCacheError(ValueError):
    """A refused cache operation; the cache (pages, tables, lengths) is unchanged."""


class KVCacheTypeError(KVCacheError, TypeError):
    """A dtype the cache cannot take: new K/V vs. the pages, or a block table that is not int32."""


class CacheShapeError(KVCacheError):
    """Batch size, head count / head dims or device disagree with the cache."""


class CacheCapacityError(KVCacheError):
    """Appending would pass a sequence's capacity (max_pages * page_size tokens)."""


class PageTableError(KVCacheError):
    """A block table entry outside the pool, a page used twice, or no page where a token goes."""
