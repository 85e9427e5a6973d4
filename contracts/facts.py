"""What the contract knows about one call, read once from tensor metadata (never from values).

The builders read each shape, dtype and flag once, so the rules (``rules.py``) are plain
comparisons. Nothing here builds a Pydantic model or formats a string: that only happens when a
rule fails.
"""
from __future__ import annotations

import torch

from .caps import DeviceCaps, resolve_caps
from .spec import _SPECS, spec_for

Tensor = torch.Tensor


class CallFacts:
    """Metadata of one FA-2 call, in the names the rules use.

    Dense / kvcache: ``q: (B, Sq, Hq, D)``; dense ``k, v: (B, Sk, Hkv, D|Dv)``; kvcache caches
    ``(B_cache, S_cache, Hkv, D)`` or paged ``(num_blocks, page, Hkv, D)``.
    Varlen: ``q: (Tq, Hq, D)``, ``k, v: (Tk, Hkv, D|Dv)`` or paged like the kvcache.
    ``sq``/``sk`` are the dense lengths, varlen ``max_seqlen_*``, or kvcache q length / capacity.
    """

    # Class-level defaults: a builder sets only what its call kind has, which keeps the valid
    # path cheap (attribute writes are most of the cost of building the facts).
    kind = spec = caps = None
    strict = False
    q = k = v = k_new = v_new = alibi = None
    k_name, v_name = "k", "v"
    causal = False
    wl = wr = -1
    dropout_p = softcap = 0.0
    return_softmax = False
    requires_grad = None
    num_splits = 0
    cu_q = cu_k = seqused_k = block_table = cache_seqlens = cache_batch_idx = cache_leftpad = None
    rank_ok = False
    qs = ks = vs = b = sq = sk = hq = hk = d = dv = None
    total_q = total_k = max_q = max_k = None
    paged = False
    page_size = num_blocks = pages_per_seq = s_new = None
    # Head dims as the kernel sees them (padded when the provider pads).
    d_kernel = dv_kernel = None
    # Index arguments of the call kind, in a fixed order: varlen (cu_q, cu_k, seqused_k,
    # block_table); kvcache (cache_seqlens, cache_batch_idx, cache_leftpad, block_table).
    index = (None, None, None, None)
    # Other tensor arguments, None where not given (for the device rule).
    others = ()

    def tensors(self):
        """(name, tensor) for every tensor argument, q first."""
        pairs = (
            ("q", self.q), (self.k_name, self.k), (self.v_name, self.v),
            ("k", self.k_new), ("v", self.v_new),
            ("cu_seqlens_q", self.cu_q), ("cu_seqlens_k", self.cu_k),
            ("seqused_k", self.seqused_k), ("block_table", self.block_table),
            ("cache_seqlens", self.cache_seqlens), ("cache_batch_idx", self.cache_batch_idx),
            ("cache_leftpad", self.cache_leftpad), ("alibi_slopes", self.alibi),
        )
        return [(name, t) for name, t in pairs if isinstance(t, Tensor)]

    def index_args(self):
        """(name, value) for every index argument given (tensor or not)."""
        pairs = (
            ("cu_seqlens_q", self.cu_q), ("cu_seqlens_k", self.cu_k),
            ("seqused_k", self.seqused_k), ("block_table", self.block_table),
            ("cache_seqlens", self.cache_seqlens), ("cache_batch_idx", self.cache_batch_idx),
            ("cache_leftpad", self.cache_leftpad),
        )
        return [(name, t) for name, t in pairs if t is not None]

    def needs_backward(self) -> bool:
        """``requires_grad`` as given, else whether autograd will record this call."""
        if self.requires_grad is not None:
            return bool(self.requires_grad)
        return torch.is_grad_enabled() and (
            self.q.requires_grad or self.k.requires_grad or self.v.requires_grad
        )


def _common(c: CallFacts, kind, q, k, v, causal, window_size, caps, provider, strict) -> None:
    c.kind = kind
    c.spec = _SPECS.get(provider) if provider.__class__ is str else None
    if c.spec is None:
        c.spec = spec_for(provider)
    if caps is not None or (isinstance(q, Tensor) and q.is_cuda):
        c.caps = resolve_caps(caps, q)
    c.strict = strict
    c.q, c.k, c.v = q, k, v
    if causal:
        c.causal = True
    if window_size != (-1, -1):
        c.wl, c.wr = window_size


def _head_dims(c: CallFacts) -> None:
    spec = c.spec
    if spec.pads_head_dim:
        m = spec.head_dim_multiple
        c.d_kernel = (c.d + m - 1) // m * m
        c.dv_kernel = (c.dv + m - 1) // m * m
    else:
        c.d_kernel, c.dv_kernel = c.d, c.dv


def dense_facts(
    q, k, v, causal, window_size, dropout_p, softcap, alibi_slopes, requires_grad,
    return_softmax, caps, provider, strict,
) -> CallFacts:
    """Facts of a dense call: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv)."""
    c = CallFacts()
    _common(c, "dense", q, k, v, causal, window_size, caps, provider, strict)
    if alibi_slopes is not None:
        c.alibi = alibi_slopes
        c.others = (alibi_slopes,)
    c.dropout_p = dropout_p
    c.softcap = softcap
    c.return_softmax = return_softmax
    c.requires_grad = requires_grad
    c.rank_ok = (
        isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
        and q.dim() == 4 and k.dim() == 4 and v.dim() == 4
    )
    if c.rank_ok:
        c.qs = qs = q.shape
        c.ks = ks = k.shape
        c.vs = vs = v.shape
        c.b, c.sq, c.hq, c.d = qs
        c.sk, c.hk = ks[1], ks[2]
        c.dv = vs[3]
        _head_dims(c)
    return c


def varlen_facts(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, block_table,
    causal, window_size, dropout_p, softcap, alibi_slopes, requires_grad, return_softmax, caps,
    provider, strict,
) -> CallFacts:
    """Facts of a varlen call: q (Tq, Hq, D), k/v (Tk, Hkv, D) or paged (blocks, page, Hkv, D)."""
    c = CallFacts()
    _common(c, "varlen", q, k, v, causal, window_size, caps, provider, strict)
    c.cu_q, c.cu_k = cu_seqlens_q, cu_seqlens_k
    if seqused_k is not None:
        c.seqused_k = seqused_k
    c.alibi = alibi_slopes
    c.index = (cu_seqlens_q, cu_seqlens_k, seqused_k, block_table)
    c.others = (cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes)
    c.dropout_p = dropout_p
    c.softcap = softcap
    c.return_softmax = return_softmax
    c.requires_grad = requires_grad
    c.max_q, c.max_k = max_seqlen_q, max_seqlen_k
    c.sq, c.sk = max_seqlen_q, max_seqlen_k
    paged = block_table is not None
    if paged:
        c.block_table, c.paged = block_table, True
    kv_rank = 4 if paged else 3
    c.rank_ok = (
        isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
        and q.dim() == 3 and k.dim() == kv_rank and v.dim() == kv_rank
    )
    c.b = cu_seqlens_q.numel() - 1 if isinstance(cu_seqlens_q, Tensor) else None
    if c.rank_ok:
        c.qs = qs = q.shape
        c.ks = ks = k.shape
        c.vs = vs = v.shape
        c.total_q, c.hq, c.d = qs
        c.hk = ks[-2]
        c.dv = vs[-1]
        _head_dims(c)
        if paged:
            c.num_blocks, c.page_size = ks[0], ks[1]
            if isinstance(block_table, Tensor) and block_table.dim() == 2:
                c.pages_per_seq = block_table.shape[1]
        else:
            c.total_k = ks[0]
    return c


def kvcache_facts(
    q, k_cache, v_cache, *, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
    causal, window_size, softcap, alibi_slopes, num_splits, caps, provider, strict,
) -> CallFacts:
    """Facts of a kvcache call: q (B, Sq, Hq, D), caches (B_c, S_c, Hkv, D) or paged, new k/v (B, S_new, Hkv, D)."""
    c = CallFacts()
    _common(c, "kvcache", q, k_cache, v_cache, causal, window_size, caps, provider, strict)
    c.k_name, c.v_name = "k_cache", "v_cache"
    c.k_new, c.v_new = k, v
    c.cache_seqlens, c.cache_batch_idx, c.cache_leftpad = cache_seqlens, cache_batch_idx, cache_leftpad
    c.block_table = block_table
    c.alibi = alibi_slopes
    c.index = (cache_seqlens, cache_batch_idx, cache_leftpad, block_table)
    c.others = (k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, alibi_slopes)
    c.softcap = softcap
    c.requires_grad = False
    c.num_splits = num_splits or 0
    c.paged = block_table is not None
    c.rank_ok = (
        isinstance(q, Tensor) and isinstance(k_cache, Tensor) and isinstance(v_cache, Tensor)
        and q.dim() == 4 and k_cache.dim() == 4 and v_cache.dim() == 4
        and (k is None or (isinstance(k, Tensor) and k.dim() == 4))
        and (v is None or (isinstance(v, Tensor) and v.dim() == 4))
    )
    if c.rank_ok:
        c.qs = qs = q.shape
        c.ks = ks = k_cache.shape
        c.vs = vs = v_cache.shape
        c.b, c.sq, c.hq, c.d = qs
        c.hk = ks[2]
        c.dv = vs[3]
        _head_dims(c)
        if c.paged:
            c.num_blocks, c.page_size = ks[0], ks[1]
            if isinstance(block_table, Tensor) and block_table.dim() == 2:
                c.pages_per_seq = block_table.shape[1]
                c.sk = c.pages_per_seq * c.page_size
        else:
            c.sk = ks[1]
        if isinstance(k, Tensor):
            c.s_new = k.shape[1]
    return c


def caps_label(caps: DeviceCaps | None) -> str:
    return str(caps) if caps is not None else "not evaluated (no CUDA tensor, caps=None)"


def settings_line(c: CallFacts) -> str:
    """One line of the non-tensor settings, for error messages."""
    parts = [f"provider={c.spec.label}", f"caps={caps_label(c.caps)}", f"causal={c.causal}",
             f"window_size=({c.wl}, {c.wr})"]
    if c.kind != "kvcache":
        parts.append(f"dropout_p={c.dropout_p}")
    if c.kind == "varlen":
        parts.append(f"max_seqlen_q={c.max_q} max_seqlen_k={c.max_k}")
    if c.softcap:
        parts.append(f"softcap={c.softcap}")
    return " ".join(parts)


__all__ = ["CallFacts", "dense_facts", "varlen_facts", "kvcache_facts", "settings_line"]
