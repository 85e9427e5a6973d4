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
    Packed (``packed`` = "qkv" / "kv"): dense ``qkv: (B, S, 3, H, D)``, ``kv: (B, Sk, 2, Hkv, D)``;
    varlen ``qkv: (T, 3, H, D)``, ``kv: (Tk, 2, Hkv, D)``; ``qs``/``ks``/``vs`` are then the shapes
    of the unpacked views FA-2 makes, and q/k/v name the packed tensor(s).
    ``sq``/``sk`` are the dense lengths, varlen ``max_seqlen_*``, or kvcache q length / capacity.
    """

    # Class-level defaults: a builder sets only what its call kind has, which keeps the valid
    # path cheap (attribute writes are most of the cost of building the facts).
    kind = spec = caps = None
    strict = False
    backward = False
    q = k = v = k_new = v_new = alibi = None
    q_name, k_name, v_name = "q", "k", "v"
    packed = None
    pack_n = None
    causal = False
    wl = wr = -1
    dropout_p = softcap = 0.0
    softmax_scale = None
    return_softmax = False
    return_lse = False
    rotary_cos = rotary_sin = None
    # Argument names the caller passed explicitly (guarded(): every bound name), for FA2-ARG-UNSUPPORTED.
    given = frozenset()
    num_splits = 0
    cu_q = cu_k = seqused_k = block_table = cache_seqlens = cache_batch_idx = cache_leftpad = None
    rank_ok = False
    qs = ks = vs = b = sq = sk = hq = hk = d = dv = None
    # kvcache: shapes of the new k / v (None when not given).
    kns = vns = None
    total_q = total_k = max_q = max_k = None
    paged = False
    page_size = num_blocks = pages_per_seq = s_new = None
    # Head dims as the kernel sees them (padded when the provider pads).
    d_kernel = dv_kernel = None
    @property
    def index(self) -> tuple:
        """Index arguments of the call kind, in a fixed order: varlen (cu_q, cu_k, seqused_k,
        block_table); kvcache (cache_seqlens, cache_batch_idx, cache_leftpad, block_table).
        Built when a rule asks (the fused tests in fast.py read the attributes)."""
        if self.kind == "varlen":
            return (self.cu_q, self.cu_k, self.seqused_k, self.block_table)
        if self.kind == "kvcache":
            return (self.cache_seqlens, self.cache_batch_idx, self.cache_leftpad, self.block_table)
        return (None, None, None, None)

    @property
    def others(self) -> tuple:
        """Tensor arguments besides q, k, v, None where not given (for the device rule)."""
        if self.kind == "varlen":
            return (self.cu_q, self.cu_k, self.seqused_k, self.block_table, self.alibi)
        if self.kind == "kvcache":
            return (self.k_new, self.v_new, self.cache_seqlens, self.cache_batch_idx, self.cache_leftpad,
                    self.block_table, self.alibi, self.rotary_cos, self.rotary_sin)
        return () if self.alibi is None else (self.alibi,)

    def tensors(self):
        """(name, tensor) for every tensor argument, q first."""
        pairs = (
            (self.q_name, self.q), (self.k_name, self.k), (self.v_name, self.v),
            ("k", self.k_new), ("v", self.v_new),
            ("cu_seqlens_q", self.cu_q), ("cu_seqlens_k", self.cu_k),
            ("seqused_k", self.seqused_k), ("block_table", self.block_table),
            ("cache_seqlens", self.cache_seqlens), ("cache_batch_idx", self.cache_batch_idx),
            ("cache_leftpad", self.cache_leftpad), ("alibi_slopes", self.alibi),
            ("rotary_cos", self.rotary_cos), ("rotary_sin", self.rotary_sin),
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


def _will_record(q, k, v) -> bool:
    """Whether autograd records a call on q, k, v: grad mode on and one of them requires grad."""
    for t in (q, k, v):
        if isinstance(t, Tensor) and t.requires_grad:
            return torch.is_grad_enabled()
    return False


def _common(c: CallFacts, kind, q, k, v, causal, window_size, softmax_scale, caps, provider, strict) -> None:
    c.kind = kind
    spec = _SPECS.get(provider) if provider.__class__ is str else None
    c.spec = spec_for(provider) if spec is None else spec
    if caps is not None or (isinstance(q, Tensor) and q.is_cuda):
        c.caps = resolve_caps(caps, q)
    if strict:
        c.strict = True
    c.q, c.k, c.v = q, k, v
    if causal:
        c.causal = True
    if window_size != (-1, -1):
        c.wl, c.wr = window_size
    if softmax_scale is not None:
        c.softmax_scale = softmax_scale


def _head_dims(c: CallFacts) -> None:
    spec = c.spec
    if spec.pads_head_dim:
        m = spec.head_dim_multiple
        c.d_kernel = (c.d + m - 1) // m * m
        c.dv_kernel = (c.dv + m - 1) // m * m
    else:
        c.d_kernel, c.dv_kernel = c.d, c.dv


def _unpack(shape, at: int):
    """(entries on the packing dim, the view's shape without it) of a packed tensor's shape."""
    return shape[at], shape[:at] + shape[at + 1:]


def _dense_shapes(c: CallFacts, q, k, v, packed) -> None:
    """Shapes of a dense call; ``packed``: None, "qkv" (q is qkv) or "kv" (k is kv)."""
    if packed is None:
        if isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor):
            qs, ks, vs = q.shape, k.shape, v.shape  # read once; the length is the rank
            c.rank_ok = len(qs) == 4 and len(ks) == 4 and len(vs) == 4
        if not c.rank_ok:
            return
        c.qs, c.ks, c.vs = qs, ks, vs
    elif packed == "qkv":
        c.rank_ok = isinstance(q, Tensor) and q.dim() == 5
        if not c.rank_ok:
            return
        c.pack_n, qs = _unpack(q.shape, 2)
        c.qs = c.ks = c.vs = ks = vs = qs
    else:
        c.rank_ok = isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() == 4 and k.dim() == 5
        if not c.rank_ok:
            return
        c.qs = qs = q.shape
        c.pack_n, ks = _unpack(k.shape, 2)
        c.ks = c.vs = vs = ks
    c.b, c.sq, c.hq, c.d = qs
    c.sk, c.hk = ks[1], ks[2]
    c.dv = vs[3]
    _head_dims(c)


def _name_packed(c: CallFacts, packed) -> None:
    c.packed = packed
    if packed == "qkv":
        c.q_name = c.k_name = c.v_name = "qkv"
    else:
        c.k_name = c.v_name = "kv"


def dense_facts(
    q, k, v, causal, window_size, dropout_p, softcap, alibi_slopes, backward,
    return_softmax, caps, provider, strict, softmax_scale=None, packed=None, given=None,
) -> CallFacts:
    """Facts of a dense call: q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv).

    ``packed="qkv"``: q = k = v = qkv (B, S, 3, H, D); ``packed="kv"``: k = v = kv (B, Sk, 2, Hkv, D).
    ``backward``: True / False, or None = whether autograd records the call.
    """
    c = CallFacts()
    _common(c, "dense", q, k, v, causal, window_size, softmax_scale, caps, provider, strict)
    if packed is not None:
        _name_packed(c, packed)
    if alibi_slopes is not None:
        c.alibi = alibi_slopes
    c.dropout_p = dropout_p
    c.softcap = softcap
    c.return_softmax = return_softmax
    c.backward = _will_record(q, k, v) if backward is None else backward
    if given:
        c.given = given
    _dense_shapes(c, q, k, v, packed)
    return c


def varlen_facts(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, block_table,
    causal, window_size, dropout_p, softcap, alibi_slopes, backward, return_softmax, caps,
    provider, strict, softmax_scale=None, packed=None, given=None,
) -> CallFacts:
    """Facts of a varlen call: q (Tq, Hq, D), k/v (Tk, Hkv, D) or paged (blocks, page, Hkv, D).

    ``packed="qkv"``: q = k = v = qkv (T, 3, H, D); ``packed="kv"``: k = v = kv (Tk, 2, Hkv, D).
    """
    c = CallFacts()
    _common(c, "varlen", q, k, v, causal, window_size, softmax_scale, caps, provider, strict)
    if packed is not None:
        _name_packed(c, packed)
    c.cu_q, c.cu_k = cu_seqlens_q, cu_seqlens_k
    if seqused_k is not None:
        c.seqused_k = seqused_k
    c.alibi = alibi_slopes
    c.dropout_p = dropout_p
    c.softcap = softcap
    c.return_softmax = return_softmax
    c.backward = _will_record(q, k, v) if backward is None else backward
    if given:
        c.given = given
    c.max_q, c.max_k = max_seqlen_q, max_seqlen_k
    c.sq, c.sk = max_seqlen_q, max_seqlen_k
    paged = block_table is not None
    if paged:
        c.block_table, c.paged = block_table, True
    c.b = cu_seqlens_q.numel() - 1 if isinstance(cu_seqlens_q, Tensor) else None
    if packed is None:
        kv_rank = 4 if paged else 3
        if isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor):
            qs, ks, vs = q.shape, k.shape, v.shape  # read once; the length is the rank
            c.rank_ok = len(qs) == 3 and len(ks) == kv_rank and len(vs) == kv_rank
        if not c.rank_ok:
            return c
        c.qs, c.ks, c.vs = qs, ks, vs
    elif packed == "qkv":
        c.rank_ok = isinstance(q, Tensor) and q.dim() == 4
        if not c.rank_ok:
            return c
        c.pack_n, qs = _unpack(q.shape, 1)
        c.qs = c.ks = c.vs = ks = vs = qs
    else:
        c.rank_ok = isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() == 3 and k.dim() == 4
        if not c.rank_ok:
            return c
        c.qs = qs = q.shape
        c.pack_n, ks = _unpack(k.shape, 1)
        c.ks = c.vs = vs = ks
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
    q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
    cache_leftpad, block_table, softmax_scale, causal, window_size, softcap, alibi_slopes,
    num_splits, return_softmax_lse, caps, provider, strict, given=None,
) -> CallFacts:
    """Facts of a kvcache call: q (B, Sq, Hq, D), caches (B_c, S_c, Hkv, D) or paged, new k/v (B, S_new, Hkv, D).

    ``rotary_cos``/``rotary_sin``: (seqlen_ro, rotary_dim / 2). Forward only (no autograd).
    """
    c = CallFacts()
    _common(c, "kvcache", q, k_cache, v_cache, causal, window_size, softmax_scale, caps, provider, strict)
    c.k_name, c.v_name = "k_cache", "v_cache"
    c.k_new, c.v_new = k, v
    c.cache_seqlens, c.cache_batch_idx, c.cache_leftpad = cache_seqlens, cache_batch_idx, cache_leftpad
    c.block_table = block_table
    c.alibi = alibi_slopes
    if rotary_cos is not None or rotary_sin is not None:
        c.rotary_cos, c.rotary_sin = rotary_cos, rotary_sin
    if return_softmax_lse:
        c.return_lse = True
    if given:
        c.given = given
    c.softcap = softcap
    c.num_splits = num_splits or 0
    if block_table is not None:
        c.paged = True
    # Each shape is read once (a torch.Size per read); its length is the rank.
    if isinstance(q, Tensor) and isinstance(k_cache, Tensor) and isinstance(v_cache, Tensor):
        qs, ks, vs = q.shape, k_cache.shape, v_cache.shape
        kns = k.shape if isinstance(k, Tensor) else None
        vns = v.shape if isinstance(v, Tensor) else None
        c.rank_ok = (
            len(qs) == 4 and len(ks) == 4 and len(vs) == 4
            and (k is None or (kns is not None and len(kns) == 4))
            and (v is None or (vns is not None and len(vns) == 4))
        )
    if c.rank_ok:
        c.qs, c.ks, c.vs = qs, ks, vs
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
        if kns is not None:
            c.kns = kns
            c.s_new = kns[1]
        if vns is not None:
            c.vns = vns
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
    if c.softmax_scale is not None:
        parts.append(f"softmax_scale={c.softmax_scale}")
    if c.kind != "kvcache":
        parts.append(f"backward={c.backward}")
    return " ".join(parts)


__all__ = ["CallFacts", "dense_facts", "varlen_facts", "kvcache_facts", "settings_line"]
