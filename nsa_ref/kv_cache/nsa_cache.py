"""The NSA decode cache of B sequences: raw K/V and compressed K/V, each a ``PagedKV``.

::

    raw  PagedKV  pages (num_pages, P, Hkv, Dk|Dv)     token s of sequence b
    cmp  PagedKV  pages (num_cmp_pages, Pc, Hkv, Dk|Dv) compressed block i of sequence b

Compressed block i covers tokens [i*d, i*d + l) and is emitted when token i*d + l - 1 arrives
(``masks.cmp_block_emitted_at``; ``NSAConfig.num_cmp_blocks(S)`` blocks after S tokens), as
``phi`` of the block's l raw tokens read back from the pages: with the default ``mean_phi`` the
same numbers as ``nsa_ref.compress``. Both stores are written in place (``index_put_`` into
preallocated pools, no ``torch.cat``); their host lengths let every check run without a device
read. Every append is checked whole before the first write: a refused one changes nothing.

The cache stores values, not graphs: it is for inference (writes are detached).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from nsa_ref.compress import mean_phi
from nsa_ref.config import NSAConfig
from nsa_ref.kv_cache.errors import CacheShapeError, KVCacheError, KVCacheTypeError
from nsa_ref.kv_cache.paged import PagedKV, PagedView
from nsa_ref.packing import Packing

#: phi: blocks (Nb, l, H, D) -> (Nb, H, D_out); ``mean_phi`` or an ``MLPCompressor``.
Phi = Callable[[torch.Tensor], torch.Tensor]


class NSAKVCache:
    """Raw and compressed K/V of B sequences for NSA decode (see the module docstring).

    Build with ``allocate`` (preallocated: one page of ``capacity`` tokens per sequence),
    ``allocate_paged`` (a block table into a page pool) or from your own ``PagedKV`` stores.
    ``phi_k`` / ``phi_v`` compress a block's keys / values (``cfg.compress == "mlp"`` needs them).
    """

    def __init__(self, raw: PagedKV, cmp: PagedKV, cfg: NSAConfig, phi_k: Phi = mean_phi, phi_v: Phi = mean_phi):
        if not isinstance(cfg, NSAConfig):
            raise KVCacheError(f"cfg must be an nsa_ref.NSAConfig, got {type(cfg).__name__}")
        if cfg.compress != "mean" and (phi_k is mean_phi or phi_v is mean_phi):
            raise KVCacheError(
                f"cfg.compress={cfg.compress!r} needs its learned phi: pass phi_k and phi_v (e.g. the "
                "module's MLPCompressors); the default is the 'mean' phi"
            )
        if raw.batch_size != cmp.batch_size:
            raise CacheShapeError(f"raw and compressed stores need the same B, got {raw.batch_size} and {cmp.batch_size}")
        if raw.k_pages.shape[2] != cmp.k_pages.shape[2]:
            raise CacheShapeError(
                f"raw and compressed stores need the same Hkv, got {raw.k_pages.shape[2]} and {cmp.k_pages.shape[2]}"
            )
        if raw.k_pages.device != cmp.k_pages.device:
            raise CacheShapeError(f"raw and compressed stores need one device, got {raw.k_pages.device} and {cmp.k_pages.device}")
        if any(raw.lengths) or any(cmp.lengths):
            raise KVCacheError("an NSAKVCache starts from empty stores; fill it with prefill()")
        _check_phi(phi_k, phi_v, raw, cmp, cfg)
        self.raw, self.cmp, self.cfg = raw, cmp, cfg
        self.phi_k, self.phi_v = phi_k, phi_v

    @classmethod
    def allocate(
        cls, batch_size: int, capacity: int, n_kv_heads: int, head_dim: int, cfg: NSAConfig,
        v_head_dim: int | None = None, dtype: torch.dtype = torch.float32, device="cpu",
        phi_k: Phi = mean_phi, phi_v: Phi = mean_phi,
    ) -> "NSAKVCache":
        """Preallocated cache: raw pages (B, capacity, Hkv, D), compressed (B, Tc(capacity), Hkv, D)."""
        dv = head_dim if v_head_dim is None else v_head_dim
        raw = PagedKV.contiguous(batch_size, capacity, n_kv_heads, head_dim, dv, dtype, device, "raw")
        cmp = PagedKV.contiguous(batch_size, cfg.num_cmp_blocks(capacity), n_kv_heads, head_dim, dv, dtype,
                                 device, "compressed")
        return cls(raw, cmp, cfg, phi_k, phi_v)

    @classmethod
    def allocate_paged(
        cls, block_table: torch.Tensor, num_pages: int, page_size: int, n_kv_heads: int, head_dim: int,
        cfg: NSAConfig, v_head_dim: int | None = None, dtype: torch.dtype = torch.float32,
        cmp_block_table: torch.Tensor | None = None, cmp_num_pages: int | None = None,
        cmp_page_size: int | None = None, phi_k: Phi = mean_phi, phi_v: Phi = mean_phi,
    ) -> "NSAKVCache":
        """Paged cache: raw pool (num_pages, page_size, Hkv, D) addressed by ``block_table``
        (B, max_pages) int32 (-1: no page yet). The compressed blocks go to their own pool
        when ``cmp_block_table`` (with ``cmp_num_pages``, ``cmp_page_size``) is given, else to a
        preallocated (B, Tc(max_pages * page_size), Hkv, D) store (1/d of the raw tokens)."""
        dv = head_dim if v_head_dim is None else v_head_dim
        raw = PagedKV.allocate(block_table, num_pages, page_size, n_kv_heads, head_dim, dv, dtype, "raw")
        if cmp_block_table is None:
            cmp = PagedKV.contiguous(raw.batch_size, cfg.num_cmp_blocks(raw.capacity), n_kv_heads, head_dim, dv,
                                     dtype, block_table.device, "compressed")
        else:
            if cmp_num_pages is None or cmp_page_size is None:
                raise KVCacheError("a cmp_block_table needs cmp_num_pages and cmp_page_size")
            cmp = PagedKV.allocate(cmp_block_table, cmp_num_pages, cmp_page_size, n_kv_heads, head_dim, dv,
                                   dtype, "compressed")
        return cls(raw, cmp, cfg, phi_k, phi_v)

    # -- state ------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.raw.batch_size

    @property
    def lengths(self) -> list[int]:
        """Tokens per sequence (host copy)."""
        return list(self.raw.lengths)

    @property
    def cache_seqlens(self) -> torch.Tensor:
        """(B,) int32 on the cache's device: tokens per sequence (FA-2's ``cache_seqlens``)."""
        return self.raw.cache_seqlens

    @property
    def num_cmp_blocks(self) -> list[int]:
        """Compressed blocks per sequence (host copy); always cfg.num_cmp_blocks(length)."""
        return list(self.cmp.lengths)

    def views(self) -> tuple[PagedView, PagedView]:
        """-> (raw, compressed) paged views: what the attention branches read."""
        return self.raw.view(), self.cmp.view()

    def sequence(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequence b as new tensors: k (S, Hkv, Dk), v (S, Hkv, Dv), k_cmp (Tc, Hkv, Dk), v_cmp."""
        return (*self.raw.read(b), *self.cmp.read(b))

    # -- writes -----------------------------------------------------------------------------
    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """k_new: (B, Hkv, Dk) or (B, n, Hkv, Dk), v_new likewise with Dv -> n tokens appended to
        every sequence (emitting the compressed blocks that end among them). Checked whole first."""
        k4, v4 = self.check_append(k_new, v_new)
        B, n = k4.shape[:2]
        new_lengths = [x + n for x in self.raw.lengths]
        dev = self.raw.k_pages.device
        b = torch.arange(B, device=dev)[:, None].expand(B, n).reshape(B * n)
        pos = (self.raw.cache_seqlens.long()[:, None] + torch.arange(n, device=dev)).reshape(B * n)
        self.raw.write(b, pos, k4.reshape(B * n, *k4.shape[2:]).detach(), v4.reshape(B * n, *v4.shape[2:]).detach())
        old_lengths = self.raw.lengths
        self.raw.add_lengths(n)
        self._emit(old_lengths, new_lengths)

    def prefill(self, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *,
                cu_seqlens_cpu=None) -> None:
        """k: (T, Hkv, Dk), v: (T, Hkv, Dv) packed by cu_seqlens (B+1,) int32 (FA-2 varlen layout;
        None: one sequence; or an ``nsa_ref.packing.Packing``) -> sequence b's tokens appended
        after what it holds, in one call.

        On an empty cache this is the prompt's prefill; on a filled one, a chunk of a chunked
        prefill (ragged: a sequence may get 0 tokens). cu_seqlens is read to the host once, or
        not at all when ``cu_seqlens_cpu`` (its host copy, list or CPU tensor) is given.
        """
        if not isinstance(k, torch.Tensor) or k.dim() != 3 or not isinstance(v, torch.Tensor) or v.dim() != 3:
            raise CacheShapeError(
                f"prefill takes packed k (T, Hkv, Dk) and v (T, Hkv, Dv), got "
                f"{_shape(k)} and {_shape(v)}"
            )
        if k.shape[0] != v.shape[0]:
            raise CacheShapeError(f"prefill: k and v need the same T, got {k.shape[0]} and {v.shape[0]}")
        self._check_tokens(k, v, "prefill")
        if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dtype != torch.int32:
            raise KVCacheTypeError(f"prefill: cu_seqlens must be int32 (FA-2 layout), got dtype={cu_seqlens.dtype}")
        try:
            cu = list(Packing.of(cu_seqlens, k.shape[0], cu_seqlens_cpu=cu_seqlens_cpu, device=k.device).offsets)
        except ValueError as e:
            raise KVCacheError(f"prefill: {e}") from e
        if len(cu) - 1 != self.batch_size:
            raise CacheShapeError(
                f"prefill: cu_seqlens describes {len(cu) - 1} sequence(s), the cache holds B = {self.batch_size}"
            )
        counts = [b - a for a, b in zip(cu[:-1], cu[1:])]
        new_lengths = [x + c for x, c in zip(self.raw.lengths, counts)]
        self._check_room(new_lengths)
        dev = self.raw.k_pages.device
        b_tok = torch.repeat_interleave(torch.arange(self.batch_size), torch.tensor(counts, dtype=torch.long))
        pos = [x + i for x, c in zip(self.raw.lengths, counts) for i in range(c)]
        self.raw.write(b_tok.to(dev), torch.tensor(pos, dtype=torch.long, device=dev), k.detach(), v.detach())
        old_lengths = self.raw.lengths
        self.raw.set_lengths(new_lengths)
        self._emit(old_lengths, new_lengths)

    def truncate(self, lengths: Sequence[int]) -> None:
        """lengths: one per sequence, each <= what it holds -> sequence b keeps its first
        lengths[b] tokens and the compressed blocks that end among them. Speculative decoding
        rolls rejected draft tokens back this way; the next append overwrites them in place.
        Checked first (count and range, naming the sequence); pages stay assigned."""
        lengths = list(lengths)
        if len(lengths) != self.batch_size:
            raise CacheShapeError(f"truncate: got {len(lengths)} length(s), the cache holds B = {self.batch_size}")
        for b, (new, old) in enumerate(zip(lengths, self.raw.lengths)):
            if not (isinstance(new, int) and 0 <= new <= old):
                raise KVCacheError(f"truncate: sequence {b} holds {old} tokens, cannot keep {new!r} (0..{old})")
        self.raw.set_lengths(lengths)
        self.cmp.set_lengths([self.cfg.num_cmp_blocks(n) for n in lengths])

    def reset(self, seqs: Sequence[int]) -> None:
        """Sequences ``seqs`` (indices) become empty, the others keep their tokens: a finished
        slot of a continuous batch starts over (its pages stay assigned; their old content is
        never read again). Indices are checked first."""
        seqs = list(seqs)
        bad = [b for b in seqs if not (isinstance(b, int) and 0 <= b < self.batch_size)]
        if bad:
            raise CacheShapeError(f"reset: sequence index {bad[0]!r} is outside 0..{self.batch_size - 1}")
        self.truncate([0 if b in seqs else n for b, n in enumerate(self.raw.lengths)])

    # -- checks -----------------------------------------------------------------------------
    def check_append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (k (B, n, Hkv, Dk), v (B, n, Hkv, Dv)) after every check an append needs (shapes,
        dtype, device, capacity, pages of both stores); raises a ``KVCacheError`` otherwise."""
        if not isinstance(k_new, torch.Tensor) or not isinstance(v_new, torch.Tensor) or \
                k_new.dim() not in (3, 4) or v_new.dim() != k_new.dim():
            raise CacheShapeError(
                f"append takes k_new, v_new (B, Hkv, D) or (B, n, Hkv, D), got {_shape(k_new)} and {_shape(v_new)}"
            )
        k4, v4 = (k_new[:, None], v_new[:, None]) if k_new.dim() == 3 else (k_new, v_new)
        if k4.shape[0] != self.batch_size or v4.shape[0] != self.batch_size:
            raise CacheShapeError(
                f"append needs one row per cached sequence: k_new has {k4.shape[0]}, v_new {v4.shape[0]}, "
                f"the cache holds B = {self.batch_size}"
            )
        if k4.shape[1] != v4.shape[1]:
            raise CacheShapeError(f"append: k_new and v_new need the same n tokens, got {k4.shape[1]} and {v4.shape[1]}")
        self._check_tokens(k4, v4, "append")
        self._check_room([x + k4.shape[1] for x in self.raw.lengths])
        return k4, v4

    def _check_tokens(self, k: torch.Tensor, v: torch.Tensor, what: str) -> None:
        """k (..., Hkv, Dk), v (..., Hkv, Dv): heads, dims, dtype and device of the raw pages."""
        pages = self.raw.k_pages
        want_k, want_v = tuple(pages.shape[2:]), tuple(self.raw.v_pages.shape[2:])
        if tuple(k.shape[-2:]) != want_k or tuple(v.shape[-2:]) != want_v:
            raise CacheShapeError(
                f"{what}: the cache holds k (Hkv, Dk) = {want_k}, v (Hkv, Dv) = {want_v}, got k "
                f"{tuple(k.shape[-2:])} and v {tuple(v.shape[-2:])}"
            )
        if k.dtype != pages.dtype or v.dtype != pages.dtype:
            raise KVCacheTypeError(f"{what}: the cache holds {pages.dtype}, got k {k.dtype} and v {v.dtype}")
        if k.device != pages.device or v.device != pages.device:
            raise CacheShapeError(f"{what}: the cache lives on {pages.device}, got k on {k.device} and v on {v.device}")

    def steps_left(self) -> int:
        """One-token steps that every sequence can still take with the current tables: the largest h
        for which ``append`` of h tokens per sequence passes the capacity and page checks of both
        stores (compressed block counts included). O(B) on the host lists; nothing read from the device."""
        if not self.batch_size:
            return 0
        l, d = self.cfg.block_len, self.cfg.block_stride
        raw = [lim - n for lim, n in zip(self.raw.limits(), self.raw.lengths)]
        # the compressed store holds num_cmp_blocks(n) <= c blocks for every n < c * d + l
        cmp = [c * d + l - 1 - n for c, n in zip(self.cmp.limits(), self.raw.lengths)]
        return max(0, min(min(raw), min(cmp)))

    def _check_room(self, new_lengths: Sequence[int]) -> None:
        """Both stores can take the new lengths (capacity, assigned pages): else raise."""
        self.raw.check_extend(new_lengths)
        self.cmp.check_extend([self.cfg.num_cmp_blocks(n) for n in new_lengths])

    # -- compression ------------------------------------------------------------------------
    def _emit(self, old_lengths: Sequence[int], new_lengths: Sequence[int]) -> None:
        """Compress the blocks that ended among the new tokens into the compressed store."""
        cfg = self.cfg
        pairs = [
            (b, i)
            for b, (old, new) in enumerate(zip(old_lengths, new_lengths))
            for i in range(cfg.num_cmp_blocks(old), cfg.num_cmp_blocks(new))
        ]
        if not pairs:
            return
        dev = self.raw.k_pages.device
        b = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=dev)
        i = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=dev)
        tokens = i[:, None] * cfg.block_stride + torch.arange(cfg.block_len, device=dev)  # (Nb, l)
        k_blocks, v_blocks = self.raw.view().gather(b[:, None], tokens, torch.ones_like(tokens, dtype=torch.bool))
        with torch.no_grad():
            self.cmp.write(b, i, self.phi_k(k_blocks), self.phi_v(v_blocks))
        self.cmp.set_lengths([cfg.num_cmp_blocks(n) for n in new_lengths])


def _check_phi(phi_k: Phi, phi_v: Phi, raw: PagedKV, cmp: PagedKV, cfg: NSAConfig) -> None:
    """phi maps one block of raw pages (1, l, Hkv, D) to one compressed row (1, Hkv, D_cmp) of the
    compressed pages' dtype: checked once here, so no append can fail between its two writes."""
    for what, phi, raw_pages, cmp_pages in (("phi_k", phi_k, raw.k_pages, cmp.k_pages),
                                             ("phi_v", phi_v, raw.v_pages, cmp.v_pages)):
        block = raw_pages.new_zeros((1, cfg.block_len, *raw_pages.shape[2:]))
        with torch.no_grad():
            out = phi(block)
        want = (1, *cmp_pages.shape[2:])
        if tuple(out.shape) != want or out.dtype != cmp_pages.dtype:
            raise CacheShapeError(
                f"{what} maps a block (1, l={cfg.block_len}, Hkv, D) to {tuple(out.shape)} {out.dtype}, the "
                f"compressed pages hold {want[1:]} {cmp_pages.dtype} per block"
            )


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
