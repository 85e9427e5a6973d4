"""KV cache for NSA decode: raw and compressed K/V of B sequences, preallocated or paged.

``NSAKVCache`` (nsa_cache.py) holds two ``PagedKV`` stores (paged.py: page pool + int32 block
table + lengths, FA-2 / vLLM layout); every refusal is a ``KVCacheError`` (errors.py) raised
before anything is written. The batched decode step over it: ``nsa_ref.decode_batched``.
"""
from nsa_ref.kv_cache.errors import (
    CacheCapacityError,
    CacheShapeError,
    KVCacheError,
    KVCacheTypeError,
    PageTableError,
)
from nsa_ref.kv_cache.nsa_cache import NSAKVCache
from nsa_ref.kv_cache.paged import NO_PAGE, PagedKV, PagedView

__all__ = [
    "NO_PAGE",
    "CacheCapacityError",
    "CacheShapeError",
    "KVCacheError",
    "KVCacheTypeError",
    "NSAKVCache",
    "PageTableError",
    "PagedKV",
    "PagedView",
]
