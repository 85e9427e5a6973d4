"""The fast decode step with its append on the device, and the whole step as one CUDA graph.

    check_static_append(cache)          the host check before: a page for every sequence's
                                        compressed slot 0, room for one more token
    append_static(cache, k_new, v_new)  one token per sequence appended with device ops only
                                        (Triton ``decode_append`` where it runs, else torch ops);
                                        the host lengths are not touched
    advance_host_lengths(cache, n)      the host lengths of both stores after n such appends
    CapturedDecodeStep(cache, cfg, q, k_new, v_new, gates)
                                        ``append_static`` + ``decode_fast.decode_attend_fast`` for a
                                        fixed batch, captured as one CUDA graph (eager with graph=False)

Shapes: q (B, Hq, Dk), k_new (B, Hkv, Dk), v_new (B, Hkv, Dv), gates (B, Hq, 3) -> (B, Hq, Dv).
``decode_step_fast`` appends with ``NSAKVCache.append``, which updates the cache's host lists and
so stays outside a graph; here a replayed graph runs no Python, and ``CapturedDecodeStep`` advances
the host lengths after each replay (Documentation/Architecture/Decode.md).
"""
from __future__ import annotations

from typing import Any

import torch

from nsa_ref.config import NSAConfig
from nsa_ref.decode_batched import check_step_inputs
from nsa_ref.decode_fast import decode_attend_fast
from nsa_ref.kv_cache import NSAKVCache


def check_static_append(cache: NSAKVCache) -> None:
    """Refuse (``KVCacheError``, nothing written) a cache ``append_static`` cannot serve: one
    without a page for compressed slot 0 of some sequence (the slot a sequence with no block yet
    rewrites), or whose next token has no room (``NSAKVCache.check_append``'s capacity and page
    rules, on the host lengths)."""
    from nsa_ref.kv_cache import NO_PAGE, KVCacheError

    cmp, cfg = cache.cmp, cache.cfg
    if cfg.num_cmp_blocks(cache.raw.capacity) and cmp.max_pages and any(row[0] == NO_PAGE for row in cmp._table):
        raise KVCacheError("append_static: every sequence needs a page for compressed slot 0 (a sequence "
                           "with no block yet rewrites it); assign one with set_block_table")
    cache._check_room([x + 1 for x in cache.raw.lengths])


def append_static(cache: NSAKVCache, k_new: torch.Tensor, v_new: torch.Tensor, fused: str = "auto") -> None:
    """k_new (B, Hkv, Dk), v_new (B, Hkv, Dv) -> one token appended to every sequence with device
    ops only (capturable: fixed shapes, no host read or copy). ``fused="auto"``: one Triton launch
    (``triton_kernels.decode_append``) where it runs (CUDA sm80+ or the interpreter, the mean phi);
    else, or with ``fused="torch"``, the torch ops below. The raw token goes to position
    cache_seqlens[b]; then the LAST compressed block of every sequence is recomputed from the raw
    pages and written unconditionally (rewriting an emitted block gives the same bytes; a sequence
    with no block yet writes an unemitted slot 0, which nothing reads); the compressed
    ``cache_seqlens`` becomes ``cfg.num_cmp_blocks`` of the new lengths, on the device.

    The host lengths are NOT advanced (a replayed graph runs no Python): call
    ``advance_host_lengths(cache, 1)`` after it, and ``check_static_append`` before it (inputs
    are not checked here)."""
    if fused not in ("auto", "torch"):
        raise ValueError(f"fused={fused!r}: 'auto' or 'torch'")
    if fused == "auto" and _fused_append_refusal(cache, k_new) is None:
        from nsa_ref.triton_kernels.decode_append import decode_append

        decode_append(cache, k_new.detach(), v_new.detach())
        return
    raw, cmp, cfg = cache.raw, cache.cmp, cache.cfg
    B = raw.batch_size
    dev = raw.k_pages.device
    b = torch.arange(B, device=dev)
    pos = raw.cache_seqlens.long()
    raw.write(b, pos, k_new.detach(), v_new.detach())
    raw.cache_seqlens.add_(1)
    tc = cfg.num_cmp_blocks(pos + 1)  # (B,) blocks after the append
    if cfg.num_cmp_blocks(raw.capacity) and cmp.max_pages:
        last = (tc - 1).clamp_min(0)
        tokens = last[:, None] * cfg.block_stride + torch.arange(cfg.block_len, device=dev)  # (B, l)
        has = (tc > 0)[:, None].expand(B, cfg.block_len)
        k_blk, v_blk = raw.view().gather(b[:, None], tokens, has)  # zeros for a sequence with no block
        cmp.write(b, last, cache.phi_k(k_blk), cache.phi_v(v_blk))
    cmp.cache_seqlens.copy_(tc)


def _fused_append_refusal(cache: NSAKVCache, k_new: torch.Tensor) -> str | None:
    """Why ``append_static`` keeps its torch ops for this cache (None: the Triton append runs)."""
    from nsa_ref.triton_kernels import unavailable_reason

    why = unavailable_reason(k_new)  # before importing Triton
    if why is None:
        from nsa_ref.triton_kernels.decode_append import refusal

        why = refusal(cache, k_new)
    return why


def advance_host_lengths(cache: NSAKVCache, n: int = 1) -> None:
    """The host lengths of both stores after ``append_static`` (n times) ran on the device."""
    lengths = [x + n for x in cache.raw.lengths]
    cache.raw.set_host_lengths(lengths)
    cache.cmp.set_host_lengths([cache.cfg.num_cmp_blocks(x) for x in lengths])


class CapturedDecodeStep:
    """A whole decode step for a fixed batch, append included, as one CUDA graph.

        step = CapturedDecodeStep(cache, cfg, q, k_new, v_new, gates)   # example inputs: shapes
        out = step(q, k_new, v_new, gates)   # copy into the static inputs, replay, advance host lengths

    ``__call__`` checks the shapes and the room for one more token on the host (no device read),
    copies the inputs into the static buffers, runs ``append_static`` + ``decode_attend_fast``
    (replayed on CUDA; eagerly elsewhere, the same code) and returns the static output (overwritten
    by the next call: copy it to keep it). Gates are not range-checked. Building it on CUDA runs
    one warm-up step on a side stream (memos, kernels), rolls that token back (``truncate``) and
    captures; ``graph=False`` runs the same code eagerly (CPU, tests). ``fa2``, ``select`` and ``win``
    as in ``decode_step_fast``. Tables must not change while it is in use (``set_block_table`` copies
    in place, so a table change keeps the addresses, but the FA-2 verdict was taken for the old
    layout)."""

    def __init__(self, cache: NSAKVCache, cfg: NSAConfig, q: torch.Tensor, k_new: torch.Tensor,
                 v_new: torch.Tensor, gates: torch.Tensor, *, fa2: Any = "auto", select: str = "auto",
                 win: str = "auto", graph: bool | None = None):
        q4, k4, v4, g4, _ = check_step_inputs(q, k_new, v_new, gates, cache, cfg, "shapes", who="CapturedDecodeStep")
        if q4.shape[1] != 1:
            raise ValueError(f"CapturedDecodeStep: one token per sequence, got n={q4.shape[1]}")
        cache.check_append(k4, v4)
        check_static_append(cache)
        self.cache, self.cfg, self.fa2, self.select, self.win = cache, cfg, fa2, select, win
        self._room, self._seen = 0, ()
        self.q, self.k, self.v, self.g = (x[:, 0].clone() for x in (q4, k4, v4, g4))
        self.graph, self.out = None, None
        if q.is_cuda if graph is None else graph:
            # Warm-up on a side stream (memos, kernels, workspaces), then roll the token back.
            lengths = cache.lengths
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._run()
            torch.cuda.current_stream().wait_stream(stream)
            cache.truncate(lengths)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._run()

    @torch.no_grad()
    def _run(self) -> torch.Tensor:
        append_static(self.cache, self.k, self.v)
        return decode_attend_fast(self.q, self.g, self.cache, self.cfg, fa2=self.fa2, select=self.select, win=self.win)

    def __call__(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        for name, x, buf in (("q", q, self.q), ("k_new", k_new, self.k), ("v_new", v_new, self.v), ("gates", gates, self.g)):
            if not isinstance(x, torch.Tensor) or (tuple(x.shape), x.dtype, x.device) != (tuple(buf.shape), buf.dtype, buf.device):
                got = (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"CapturedDecodeStep: {name} must be {tuple(buf.shape)} {buf.dtype} on {buf.device} "
                                 f"as captured, got {got}")
        self._check_room()
        for x, buf in ((q, self.q), (k_new, self.k), (v_new, self.v), (gates, self.g)):
            buf.copy_(x)
        if self.graph is not None:
            self.graph.replay()
            out = self.out
        else:
            out = self._run()
        advance_host_lengths(self.cache, 1)
        self._room -= 1
        self._seen = self._host_state()
        return out

    def _host_state(self) -> tuple:
        """The host lists the room depends on; any cache call that changes them replaces them."""
        cache = self.cache
        return cache.raw.lengths, cache.raw._table, cache.cmp._table

    def _check_room(self) -> None:
        """``check_static_append`` (O(B) on the host), run only when the steps counted at the last
        check are used up or the cache's host lists were replaced since (truncate, reset, prefill,
        append, set_block_table): a step in a long decode loop costs O(1) on the host here."""
        state = self._host_state()
        if self._room > 0 and len(state) == len(self._seen) and all(a is b for a, b in zip(state, self._seen)):
            return
        check_static_append(self.cache)  # raises with the rule and the sequence when there is no room
        self._room, self._seen = self.cache.steps_left(), state
