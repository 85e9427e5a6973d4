"""One fused test per call kind for the common legal call: True only when every forward meta rule
it covers holds, so ``checks.evaluate`` can skip calling those predicates one by one.

Why: a valid kvcache call went through 30 predicates (a Python call, a loop step and a few tensor
attribute reads each); most of the meta-mode cost was that overhead, not the comparisons. Here the
comparisons run inline on the facts ``facts.py`` already read; rare arguments (a softmax_scale, a
window, ALiBi, caps on a CUDA device, an older release) call their rule's predicate.

Contract with ``rules.py``: ``COVERS[kind]`` names the rules a fused test decides. A fused test may
say False for a legal call (``evaluate`` then runs every predicate, which finds no reason); it must
never say True when a covered rule would fail. Anything unusual (paged caches, packed inputs,
non-tensor arguments) says False. A rule added to the catalog and not listed here keeps running as
a predicate after a True (``checks._plan``), so nothing is skipped silently; changing a covered
predicate's condition means changing its line here too (``tests/contracts/test_fast_path.py``
compares both on every test input and FA-2's grids).
"""
from __future__ import annotations

import torch

from .facts import CallFacts, Tensor
from .rules import (
    _HALF_TYPES,
    _PACK_N,
    fa2_alibi,
    fa2_arch,
    fa2_arg_unsupported,
    fa2_causal_dropped,
    fa2_device,
    fa2_softmax_scale,
    fa2_varlen_gqa_decode,
    fa2_window_left_only,
    fa2_window_right_clamped,
)

_I32 = torch.int32


def _common_ok(c: CallFacts, on_cpu: bool) -> bool:
    """FA2-DEVICE (unless ``on_cpu``: the caller saw every tensor argument on the CPU), FA2-ARCH,
    FA2-SOFTMAX-SCALE, FA2-ARG-UNSUPPORTED, FA2-ALIBI, FA2-WINDOW-RIGHT-CLAMPED, FA2-WINDOW-LEFT-ONLY:
    each predicate runs only when its argument is given."""
    if not on_cpu and fa2_device(c) is not None:
        return False
    if c.caps is not None and fa2_arch(c) is not None:
        return False
    if c.softmax_scale is not None and fa2_softmax_scale(c) is not None:
        return False
    if not c.spec.supports_all_arguments and fa2_arg_unsupported(c) is not None:
        return False
    if c.alibi is not None and fa2_alibi(c) is not None:
        return False
    if not c.causal:
        if c.wr >= 0:
            if fa2_window_right_clamped(c) is not None:
                return False
        elif c.wl >= 0 and fa2_window_left_only(c) is not None:
            return False
    return True


def _head_dims_ok(c: CallFacts, spec) -> bool:
    """FA2-HEAD-DIM-MAX, FA2-HEAD-DIM-MULTIPLE, FA2-HEAD-DIM-V, FA2-HEADS-KV-ZERO, FA2-HEADS-DIVISIBLE,
    FA2-GRID-LIMIT (without split-KV)."""
    dk, dvk, limit, m = c.d_kernel, c.dv_kernel, spec.max_head_dim, spec.head_dim_multiple
    hq, hk, b, grid = c.hq, c.hk, c.b, spec.grid_limit
    return (dk <= limit and dvk <= limit and dk % m == 0 and dvk % m == 0 and c.dv == c.d
            and hk != 0 and hq % hk == 0 and b <= grid and hq <= grid)


def _index_ok(t, b: int) -> bool:
    """An optional (B,) index tensor: None, or int32, contiguous, of shape (B,)."""
    return t is None or (isinstance(t, Tensor) and t.dtype is _I32 and t.is_contiguous() and t.dim() == 1
                         and t.shape[0] == b)


def kvcache_ok(c: CallFacts) -> bool:
    if not c.rank_ok or c.paged:
        return False
    spec = c.spec
    q, k, v, kn, vn = c.q, c.k, c.v, c.k_new, c.v_new
    # FA2-DTYPE, FA2-DTYPE-MATCH (rank_ok: q, caches tensors; new k/v tensors or None)
    qd = q.dtype
    if qd not in _HALF_TYPES or k.dtype != qd or v.dtype != qd:
        return False
    # FA2-KVCACHE-APPEND, FA2-QK-SHAPE and FA2-KV-SHAPE for the new tokens
    b, ks, d = c.b, c.ks, c.d
    if kn is not None or vn is not None:
        if kn is None or vn is None or kn.dtype != qd or vn.dtype != qd or c.cache_seqlens is None:
            return False
        kns, vns = c.kns, c.vns
        if (kns[0] != b or kns[3] != d or kns[0] != vns[0] or kns[1] != vns[1] or kns[2] != vns[2]
                or kns[2] != c.hk or (c.sk is not None and c.sq > c.sk)):
            return False
    # FA2-INDEX-DTYPE, FA2-INDEX-CONTIGUOUS, FA2-INDEX-SHAPE (not paged: no block_table)
    lengths = c.cache_seqlens
    if lengths.__class__ is int:
        if ks[0] != b:
            return False
    elif lengths is not None and not (isinstance(lengths, Tensor) and lengths.dtype is _I32
                                      and lengths.is_contiguous() and lengths.shape == (b,)):
        return False
    batch_idx, leftpad = c.cache_batch_idx, c.cache_leftpad
    if (batch_idx is not None and not _index_ok(batch_idx, b)) or (leftpad is not None and not _index_ok(leftpad, b)):
        return False
    # FA2-NUM-SPLITS, FA2-GRID-LIMIT with split-KV
    splits = c.num_splits
    if splits > spec.max_num_splits or (splits > 1 and b * c.hq > spec.grid_limit):
        return False
    # FA2-LAST-DIM-STRIDE
    if k.stride()[-1] != 1 or v.stride()[-1] != 1:
        return False
    if not spec.fixes_last_dim_stride and (
            q.stride()[-1] != 1 or (kn is not None and kn.stride()[-1] != 1) or (vn is not None and vn.stride()[-1] != 1)):
        return False
    # FA2-QK-SHAPE, FA2-KV-SHAPE for the caches; FA2-BATCH-EMPTY
    vs = c.vs
    if ks[3] != d or ks[0] != vs[0] or ks[1] != vs[1] or ks[2] != vs[2] or b <= 0:
        return False
    if batch_idx is None and ks[0] < b:
        return False
    # FA2-ROTARY-NEW-KV, FA2-ROTARY-DIM, FA2-ROTARY-TABLE
    cos, sin = c.rotary_cos, c.rotary_sin
    if cos is not None or sin is not None:
        if kn is None or not isinstance(cos, Tensor) or not isinstance(sin, Tensor):
            return False
        cs = cos.shape
        if len(cs) != 2 or sin.shape != cs:
            return False
        rotary_dim = 2 * cs[1]
        if rotary_dim > c.d_kernel or rotary_dim % 16 != 0 or (c.sk is not None and cs[0] < c.sk):
            return False
        if cos.dtype != qd or sin.dtype != qd or not cos.is_contiguous() or not sin.is_contiguous():
            return False
    # FA2-DEVICE on the CPU: the tensor arguments are known by now (block_table is None, cos/sin are
    # tensors or None, the index arguments tensors, ints or None); ALiBi goes through the predicate.
    on_cpu = (q.is_cpu and k.is_cpu and v.is_cpu and (kn is None or kn.is_cpu) and (vn is None or vn.is_cpu)
              and (cos is None or cos.is_cpu) and (sin is None or sin.is_cpu)
              and (not isinstance(lengths, Tensor) or lengths.is_cpu) and (batch_idx is None or batch_idx.is_cpu)
              and (leftpad is None or leftpad.is_cpu) and c.alibi is None)
    return _head_dims_ok(c, spec) and _common_ok(c, on_cpu)


def varlen_ok(c: CallFacts) -> bool:
    if not c.rank_ok or c.paged:
        return False
    spec = c.spec
    q, k, v = c.q, c.k, c.v
    qd = q.dtype
    # FA2-DTYPE, FA2-DTYPE-MATCH
    if qd not in _HALF_TYPES or k.dtype != qd or v.dtype != qd:
        return False
    # FA2-INDEX-DTYPE, FA2-INDEX-CONTIGUOUS, FA2-INDEX-SHAPE (not paged: no block_table)
    cu_q, cu_k, b = c.cu_q, c.cu_k, c.b
    if not (isinstance(cu_q, Tensor) and isinstance(cu_k, Tensor) and cu_q.dtype is _I32 and cu_k.dtype is _I32
            and cu_q.is_contiguous() and cu_k.is_contiguous() and cu_q.dim() == 1 and cu_k.dim() == 1
            and cu_k.shape[0] == cu_q.shape[0] and (c.seqused_k is None or _index_ok(c.seqused_k, b))):
        return False
    # FA2-DROPOUT-RANGE, FA2-RETURN-SOFTMAX, FA2-SOFTCAP-DROPOUT
    p = c.dropout_p
    if not 0.0 <= p < 1.0 or (c.return_softmax and p <= 0.0 and not spec.masks_return_softmax) or (
            c.softcap > 0.0 and p > 0.0):
        return False
    # FA2-LAST-DIM-STRIDE
    if not spec.fixes_last_dim_stride and (q.stride()[-1] != 1 or k.stride()[-1] != 1 or v.stride()[-1] != 1):
        return False
    # FA2-QK-SHAPE, FA2-KV-SHAPE, FA2-BATCH-EMPTY, FA2-PACKED-SHAPE, FA2-VARLEN-EMPTY-Q
    ks, vs = c.ks, c.vs
    if ks[-1] != c.d or (ks != vs and ks[:-1] != vs[:-1]) or b <= 0:
        return False
    if c.packed is not None and c.pack_n != _PACK_N[c.packed]:
        return False
    max_q = c.max_q
    if max_q is None or max_q < 1:
        return False
    # FA2-VARLEN-GQA-DECODE, FA2-CAUSAL-DROPPED: only max_seqlen_q == 1 can fail them.
    if max_q == 1 and (fa2_varlen_gqa_decode(c) is not None or fa2_causal_dropped(c) is not None):
        return False
    used = c.seqused_k
    on_cpu = (q.is_cpu and k.is_cpu and v.is_cpu and cu_q.is_cpu and cu_k.is_cpu and (used is None or used.is_cpu)
              and c.alibi is None)
    return _head_dims_ok(c, spec) and _common_ok(c, on_cpu)


def dense_ok(c: CallFacts) -> bool:
    if not c.rank_ok:
        return False
    spec = c.spec
    q, k, v = c.q, c.k, c.v
    qd = q.dtype
    # FA2-DTYPE, FA2-DTYPE-MATCH
    if qd not in _HALF_TYPES or k.dtype != qd or v.dtype != qd:
        return False
    # FA2-DROPOUT-RANGE, FA2-RETURN-SOFTMAX, FA2-SOFTCAP-DROPOUT
    p = c.dropout_p
    if not 0.0 <= p < 1.0 or (c.return_softmax and p <= 0.0 and not spec.masks_return_softmax) or (
            c.softcap > 0.0 and p > 0.0):
        return False
    # FA2-LAST-DIM-STRIDE
    if not spec.fixes_last_dim_stride and (q.stride()[-1] != 1 or k.stride()[-1] != 1 or v.stride()[-1] != 1):
        return False
    # FA2-QK-SHAPE, FA2-KV-SHAPE, FA2-BATCH-EMPTY, FA2-DENSE-EMPTY-Q/K (b == 0 goes the long way:
    # torch >= 2.10 accepts it), FA2-PACKED-SHAPE
    ks, vs = c.ks, c.vs
    if ks[-1] != c.d or ks[0] != c.b or (ks != vs and ks[:-1] != vs[:-1]) or c.b <= 0 or c.sq == 0 or c.sk == 0:
        return False
    if c.packed is not None and c.pack_n != _PACK_N[c.packed]:
        return False
    on_cpu = q.is_cpu and k.is_cpu and v.is_cpu and c.alibi is None
    return _head_dims_ok(c, spec) and _common_ok(c, on_cpu)


_COMMON = ("FA2-RANK", "FA2-DEVICE", "FA2-ARCH", "FA2-DTYPE", "FA2-DTYPE-MATCH", "FA2-SOFTMAX-SCALE",
           "FA2-ARG-UNSUPPORTED", "FA2-LAST-DIM-STRIDE", "FA2-HEAD-DIM-MAX", "FA2-HEAD-DIM-MULTIPLE",
           "FA2-HEAD-DIM-V", "FA2-QK-SHAPE", "FA2-KV-SHAPE", "FA2-HEADS-KV-ZERO", "FA2-HEADS-DIVISIBLE",
           "FA2-BATCH-EMPTY", "FA2-ALIBI", "FA2-GRID-LIMIT", "FA2-WINDOW-RIGHT-CLAMPED", "FA2-WINDOW-LEFT-ONLY")
_INDEX = ("FA2-INDEX-DTYPE", "FA2-INDEX-CONTIGUOUS", "FA2-INDEX-SHAPE", "FA2-PAGED-BLOCK-SIZE")

# kind -> (fused test, the forward meta rules it decides).
FAST = {
    "dense": (dense_ok, frozenset(_COMMON + (
        "FA2-DROPOUT-RANGE", "FA2-RETURN-SOFTMAX", "FA2-SOFTCAP-DROPOUT", "FA2-PACKED-SHAPE", "FA2-DENSE-EMPTY-Q",
        "FA2-DENSE-EMPTY-K"))),
    "kvcache": (kvcache_ok, frozenset(_COMMON + _INDEX + (
        "FA2-NUM-SPLITS", "FA2-PAGED-COMBINATION", "FA2-KVCACHE-APPEND", "FA2-ROTARY-NEW-KV", "FA2-ROTARY-DIM",
        "FA2-ROTARY-TABLE"))),
    "varlen": (varlen_ok, frozenset(_COMMON + _INDEX + (
        "FA2-DROPOUT-RANGE", "FA2-RETURN-SOFTMAX", "FA2-SOFTCAP-DROPOUT", "FA2-PACKED-SHAPE",
        "FA2-VARLEN-GQA-DECODE", "FA2-CAUSAL-DROPPED", "FA2-VARLEN-EMPTY-Q"))),
}
