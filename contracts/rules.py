"""One predicate per meta rule: ``fa2_<rule>(c: CallFacts) -> str | None``.

A predicate returns None when its rule holds, else a message that quotes the actual values.
Predicates read only metadata (shape, dtype, stride, device) and the provider spec; they never read
tensor values, so they never sync a device. ``needs_shapes`` predicates run only when the inputs
have the layout's rank (FA2-RANK holds), so they can index shapes freely.
"""
from __future__ import annotations

import torch

from .facts import CallFacts, Tensor
from .fa2_mask import first_differing_row, normalised_window

_HALF_TYPES = (torch.float16, torch.bfloat16)
_INT32 = torch.int32
_FLOAT32 = torch.float32
_LAYOUT = {
    "dense": "(B, S, H, D)",
    "varlen": "(T, H, D), paged k/v (num_blocks, page, Hkv, D)",
    "kvcache": "(B, S, H, D)",
}


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# --- rules that need no shapes -------------------------------------------------------------------


_PACKED_LAYOUT = {
    ("dense", "qkv"): "qkv (B, S, 3, H, D)",
    ("dense", "kv"): "q (B, Sq, H, D), kv (B, Sk, 2, Hkv, D)",
    ("varlen", "qkv"): "qkv (T, 3, H, D)",
    ("varlen", "kv"): "q (Tq, H, D), kv (Tk, 2, Hkv, D)",
}


def _packed_rank(c: CallFacts) -> str:
    ranks = {("dense", "qkv"): (5, None), ("dense", "kv"): (4, 5),
             ("varlen", "qkv"): (4, None), ("varlen", "kv"): (3, 4)}[(c.kind, c.packed)]
    named = [(c.q_name, c.q, ranks[0])] + ([(c.k_name, c.k, ranks[1])] if ranks[1] else [])
    problems = []
    for name, t, rank in named:
        if not isinstance(t, Tensor):
            problems.append(f"{name} is {type(t).__name__}, not a torch.Tensor")
        elif t.dim() != rank:
            problems.append(f"{name} has {t.dim()} dims {tuple(t.shape)}, expected {rank}")
    return f"{'; '.join(problems)}; packed {c.kind} layout is {_PACKED_LAYOUT[(c.kind, c.packed)]}"


def fa2_rank(c: CallFacts) -> str | None:
    if c.rank_ok:
        return None
    if c.packed is not None:
        return _packed_rank(c)
    wanted = {"dense": 4, "kvcache": 4}.get(c.kind, 3)
    problems = []
    named = [("q", c.q, wanted), (c.k_name, c.k, None), (c.v_name, c.v, None)]
    if c.kind == "kvcache":
        named += [("k", c.k_new, 4), ("v", c.v_new, 4)]
    for name, t, rank in named:
        if rank is None:
            rank = 4 if (c.kind != "varlen" or c.paged) else 3
        if name in ("k", "v") and c.kind == "kvcache" and t is None:
            continue
        if not isinstance(t, Tensor):
            problems.append(f"{name} is {type(t).__name__}, not a torch.Tensor")
        elif t.dim() != rank:
            problems.append(f"{name} has {t.dim()} dims {tuple(t.shape)}, expected {rank}")
    return f"{'; '.join(problems)}; {c.kind} layout is {_LAYOUT[c.kind]}"


def fa2_device(c: CallFacts) -> str | None:
    q = c.q
    if not isinstance(q, Tensor):
        return None
    k, v = c.k, c.v
    if q.is_cpu:  # the common CPU case: a bool property, no torch.device objects
        if (not isinstance(k, Tensor) or k.is_cpu) and (not isinstance(v, Tensor) or v.is_cpu):
            for t in c.others:
                if t is not None and isinstance(t, Tensor) and not t.is_cpu:
                    break
            else:
                return None
    dq = q.device
    if (not isinstance(k, Tensor) or k.device == dq) and (not isinstance(v, Tensor) or v.device == dq):
        for t in c.others:
            if t is not None and isinstance(t, Tensor) and t.device != dq:
                break
        else:
            return None
    others = [f"{name} on {t.device}" for name, t in c.tensors()[1:] if t.device != dq]
    return f"q is on {dq} but " + ", ".join(others)


def fa2_arch(c: CallFacts) -> str | None:
    caps, spec = c.caps, c.spec
    if caps is None:
        return None
    if caps.major >= spec.min_compute_major and (
        spec.allowed_archs is None
        or any(
            caps.major == major and (minor is None or caps.minor == minor)
            for major, minor in spec.allowed_archs
        )
    ):
        return None
    if spec.allowed_archs is None:
        wanted = f"major >= {spec.min_compute_major}"
    else:
        wanted = ", ".join(f"{a}.{'x' if b is None else b}" for a, b in spec.allowed_archs)
    return f"device {caps} has compute capability {caps.major}.{caps.minor}; {spec.label} needs {wanted}"


def fa2_dtype(c: CallFacts) -> str | None:
    q = c.q
    if not isinstance(q, Tensor) or q.dtype in _HALF_TYPES:
        return None
    return f"{c.q_name}.dtype is {q.dtype}; FA-2 computes only in float16 or bfloat16"


def fa2_dtype_match(c: CallFacts) -> str | None:
    q = c.q
    if not isinstance(q, Tensor):
        return None
    qd = q.dtype
    k, v = c.k, c.v
    kn, vn = c.k_new, c.v_new
    if (
        (not isinstance(k, Tensor) or k.dtype == qd)
        and (not isinstance(v, Tensor) or v.dtype == qd)
        and (kn is None or (isinstance(kn, Tensor) and kn.dtype == qd))
        and (vn is None or (isinstance(vn, Tensor) and vn.dtype == qd))
    ):
        return None
    named = ((c.k_name, k), (c.v_name, v), ("k", c.k_new), ("v", c.v_new))
    bad = [f"{name}.dtype is {t.dtype}" for name, t in named if isinstance(t, Tensor) and t.dtype != qd]
    if not bad:
        return None
    return f"{', '.join(bad)} but q.dtype is {qd}"


def fa2_index_dtype(c: CallFacts) -> str | None:
    for t in c.index:
        if t is not None and not (isinstance(t, Tensor) and t.dtype is _INT32):
            break
    else:
        if c.kind != "varlen" or (c.cu_q is not None and c.cu_k is not None):
            return None
    bad = [f"{name} is missing" for name, t in (("cu_seqlens_q", c.cu_q), ("cu_seqlens_k", c.cu_k))
           if c.kind == "varlen" and t is None]
    for name, t in c.index_args():
        if isinstance(t, Tensor):
            if t.dtype is not _INT32:
                bad.append(f"{name}.dtype is {t.dtype}")
        elif not (name == "cache_seqlens" and isinstance(t, int)):
            bad.append(f"{name} is {type(t).__name__}, not a tensor")
    if not bad:
        return None
    return "; ".join(bad) + "; FA-2 reads index tensors as int32"


def fa2_dropout_range(c: CallFacts) -> str | None:
    p = c.dropout_p
    if 0.0 <= p < 1.0:
        return None
    return f"dropout_p = {p}; FA-2 needs 0 <= dropout_p < 1"


def fa2_return_softmax(c: CallFacts) -> str | None:
    if not c.return_softmax or c.dropout_p > 0.0 or c.spec.masks_return_softmax:
        return None
    return f"the softmax is requested with dropout_p = {c.dropout_p}; {c.spec.label} returns it only when dropout_p > 0"


def fa2_softcap_dropout(c: CallFacts) -> str | None:
    if not (c.softcap > 0.0 and c.dropout_p > 0.0):
        return None
    return f"softcap = {c.softcap} with dropout_p = {c.dropout_p}; FA-2 has no softcap kernel with dropout"


def fa2_num_splits(c: CallFacts) -> str | None:
    if c.num_splits <= c.spec.max_num_splits:
        return None
    return f"num_splits = {c.num_splits} > {c.spec.max_num_splits}"


# --- rules that read shapes (run only when FA2-RANK holds) ---------------------------------------


def fa2_index_contiguous(c: CallFacts) -> str | None:
    first, second, third, table = c.index
    for t in (first, second, third):
        if t is not None and isinstance(t, Tensor) and not t.is_contiguous():
            break
    else:
        if table is None or not isinstance(table, Tensor) or table.dim() < 1 or table.stride(-1) == 1:
            return None
    bad = []
    for name, t in c.index_args():
        if not isinstance(t, Tensor):
            continue
        if name == "block_table":
            if t.dim() >= 1 and t.stride(-1) != 1:
                bad.append(f"block_table.stride() is {t.stride()}")
        elif not t.is_contiguous():
            bad.append(f"{name}.stride() is {t.stride()} for shape {tuple(t.shape)}")
    if not bad:
        return None
    return "; ".join(bad) + "; FA-2 reads index tensors as contiguous int32 arrays"


def _expected_index_shapes(c: CallFacts):
    b = c.b
    if c.kind == "varlen":
        if b is None:
            return ()
        rows = [("cu_seqlens_q", c.cu_q, (b + 1,)), ("cu_seqlens_k", c.cu_k, (b + 1,)),
                ("seqused_k", c.seqused_k, (b,))]
    else:
        rows = [("cache_seqlens", c.cache_seqlens, (b,)), ("cache_batch_idx", c.cache_batch_idx, (b,)),
                ("cache_leftpad", c.cache_leftpad, (b,))]
    rows.append(("block_table", c.block_table, None))
    return rows


def _index_shapes_ok(c: CallFacts) -> bool:
    b = c.b
    table = c.block_table
    if isinstance(table, Tensor) and (table.dim() != 2 or table.shape[0] != b):
        return False
    if c.kind == "varlen":
        cu_q, cu_k, used = c.cu_q, c.cu_k, c.seqused_k
        if not isinstance(cu_q, Tensor):
            return not isinstance(used, Tensor)  # b is unknown; FA2-INDEX-DTYPE names cu_q
        # cu_q is 1-D with b + 1 entries, so its shape is the one cu_k needs.
        return (
            cu_q.dim() == 1
            and (not isinstance(cu_k, Tensor) or cu_k.shape == cu_q.shape)
            and (used is None or not isinstance(used, Tensor) or used.shape == (b,))
        )
    shape = (b,)
    lengths = c.cache_seqlens
    if lengths.__class__ is int:
        if c.ks[0] != b:
            return False
    elif isinstance(lengths, Tensor) and lengths.shape != shape:
        return False
    # Explicit tests, no generator: this runs on every kvcache call.
    t = c.cache_batch_idx
    if t is not None and isinstance(t, Tensor) and t.shape != shape:
        return False
    t = c.cache_leftpad
    return t is None or not isinstance(t, Tensor) or t.shape == shape


def fa2_index_shape(c: CallFacts) -> str | None:
    if _index_shapes_ok(c):
        return None
    bad = []
    if c.kind == "varlen" and isinstance(c.cu_q, Tensor) and c.cu_q.dim() != 1:
        bad.append(f"cu_seqlens_q has shape {tuple(c.cu_q.shape)}, expected (B+1,)")
    if c.kind == "kvcache" and isinstance(c.cache_seqlens, int) and c.ks[0] != c.b:
        bad.append(f"cache_seqlens = {c.cache_seqlens} (an int) becomes a tensor of k_cache.shape[0] = {c.ks[0]} "
                   f"entries, but the batch is {c.b}")
    for name, t, shape in _expected_index_shapes(c):
        if not isinstance(t, Tensor):
            continue
        if shape is None:
            if t.dim() != 2 or t.shape[0] != c.b:
                bad.append(f"block_table has shape {tuple(t.shape)}, expected (B={c.b}, pages_per_seq)")
        elif t.shape != shape:
            bad.append(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if not bad:
        return None
    return "; ".join(bad)


def fa2_last_dim_stride(c: CallFacts) -> str | None:
    if c.spec.fixes_last_dim_stride:
        # The Python layer makes q/k/v (and new k/v) contiguous, but asserts on the caches.
        if c.kind != "kvcache":
            return None
        named = ((c.k_name, c.k), (c.v_name, c.v))
    else:
        named = (("q", c.q), (c.k_name, c.k), (c.v_name, c.v), ("k", c.k_new), ("v", c.v_new))
    for _, t in named:
        if t is not None and t.stride()[-1] != 1:
            break
    else:
        return None
    bad = [f"{name}.stride() is {t.stride()}" for name, t in named if t is not None and t.stride()[-1] != 1]
    return "; ".join(bad) + f"; {c.spec.label} needs stride(-1) == 1"


def fa2_head_dim_max(c: CallFacts) -> str | None:
    spec = c.spec
    limit = spec.max_head_dim
    if c.d_kernel <= limit and c.dv_kernel <= limit:
        return None
    padded = " (after padding to a multiple of 8)" if spec.pads_head_dim else ""
    return f"head dim q/k = {c.d}, v = {c.dv}{padded}; {spec.label} supports at most {limit}"


def fa2_head_dim_multiple(c: CallFacts) -> str | None:
    spec = c.spec
    m = spec.head_dim_multiple
    if c.d_kernel % m == 0 and c.dv_kernel % m == 0:
        return None
    return f"head dim q/k = {c.d}, v = {c.dv}; {spec.label} does not pad and needs a multiple of {m}"


def fa2_head_dim_v(c: CallFacts) -> str | None:
    if c.dv == c.d:
        return None
    return f"v head dim {c.dv} != q/k head dim {c.d}; FA-2 needs one head dim for q, k and v"


def fa2_qk_shape(c: CallFacts) -> str | None:
    bad = []
    ks, d = c.ks, c.d
    if ks[-1] != d:
        bad.append(f"{c.k_name} head dim {ks[-1]} != q head dim {d}")
    if c.kind == "dense" and ks[0] != c.b:
        bad.append(f"k batch {ks[0]} != q batch {c.b}")
    if c.k_new is not None:
        kn = c.k_new.shape
        if kn[0] != c.b or kn[3] != d:
            bad.append(f"new k has shape {tuple(kn)}; expected (B={c.b}, S_new, Hkv, D={d})")
    if not bad:
        return None
    return "; ".join(bad)


def fa2_kv_shape(c: CallFacts) -> str | None:
    ks, vs = c.ks, c.vs
    if c.kind != "kvcache":
        if ks == vs or ks[:-1] == vs[:-1]:
            return None
    elif ks[0] == vs[0] and ks[1] == vs[1] and ks[2] == vs[2] and (
            c.paged or c.cache_batch_idx is not None or ks[0] >= c.b):
        kns, vns = c.kns, c.vns
        if kns is None and vns is None:
            return None
        if kns is not None and vns is not None and kns[0] == vns[0] and kns[1] == vns[1] \
                and kns[2] == vns[2] and kns[2] == c.hk:
            return None
    bad = []
    if ks[:-1] != vs[:-1]:
        bad.append(f"{c.k_name} shape {tuple(ks)} and {c.v_name} shape {tuple(vs)} differ before the last dim")
    if c.kind == "kvcache":
        kn, vn = c.k_new, c.v_new
        if kn is not None and vn is not None:
            if kn.shape[:-1] != vn.shape[:-1]:
                bad.append(f"new k shape {tuple(kn.shape)} and new v shape {tuple(vn.shape)} differ before the last dim")
            if kn.shape[2] != c.hk:
                bad.append(f"new k has {kn.shape[2]} heads but the cache has {c.hk}")
        if not c.paged and c.cache_batch_idx is None and ks[0] < c.b:
            bad.append(f"k_cache batch {ks[0]} < q batch {c.b} and no cache_batch_idx")
    if not bad:
        return None
    return "; ".join(bad)


def fa2_heads_kv_zero(c: CallFacts) -> str | None:
    if c.hk != 0:
        return None
    return f"{c.k_name} has 0 heads (shape {tuple(c.ks)}); FA-2 divides by num_heads_k on the host"


def fa2_heads_divisible(c: CallFacts) -> str | None:
    if c.hk == 0 or c.hq % c.hk == 0:
        return None
    return f"Hq = {c.hq} is not a multiple of Hkv = {c.hk}"


def fa2_batch_empty(c: CallFacts) -> str | None:
    b = c.b
    if b is None or b > 0 or (c.kind == "dense" and c.spec.dense_empty_batch_ok):
        return None
    if c.kind == "varlen":
        return f"cu_seqlens_q has {c.cu_q.numel()} entries, so batch = {b}; FA-2 needs batch > 0"
    return f"q batch is {b} (shape {tuple(c.qs)}); FA-2 needs batch > 0"


def fa2_dense_empty_q(c: CallFacts) -> str | None:
    if c.sq != 0 or c.b == 0:
        return None
    return f"seqlen_q = 0 (q shape {tuple(c.qs)}); FA-2 launches an empty grid"


def fa2_dense_empty_k(c: CallFacts) -> str | None:
    if c.sk != 0 or c.b == 0:
        return None
    return f"seqlen_k = 0 (k shape {tuple(c.ks)}); FA-2 skips the kernel and returns out = 0, lse = +inf"


def fa2_paged_block_size(c: CallFacts) -> str | None:
    m = c.spec.paged_block_multiple
    if not c.paged or c.page_size % m == 0:
        return None
    return f"paged {c.k_name} has page size {c.page_size} (shape {tuple(c.ks)}); FA-2 needs a multiple of {m}"


def fa2_paged_combination(c: CallFacts) -> str | None:
    if not c.paged:
        return None
    given = [n for n, t in (("cache_leftpad", c.cache_leftpad), ("cache_batch_idx", c.cache_batch_idx)) if t is not None]
    if not given:
        return None
    return f"paged KV (block_table given) together with {' and '.join(given)}"


def fa2_kvcache_append(c: CallFacts) -> str | None:
    kn, vn = c.k_new, c.v_new
    if kn is None and vn is None:
        return None
    bad = []
    if (kn is None) != (vn is None):
        bad.append(f"only {'k' if vn is None else 'v'} of the new tokens is given")
    if c.cache_seqlens is None:
        bad.append("new k/v are given without cache_seqlens")
    if c.sk is not None and c.sq > c.sk:
        bad.append(f"seqlen_q = {c.sq} > cache capacity {c.sk}")
    if not bad:
        return None
    return "; ".join(bad)


def fa2_alibi(c: CallFacts) -> str | None:
    a = c.alibi
    if a is None:
        return None
    if not isinstance(a, Tensor):
        return f"alibi_slopes is {type(a).__name__}, not a tensor"
    bad = []
    if a.dtype is not _FLOAT32:
        bad.append(f"alibi_slopes.dtype is {a.dtype}, expected torch.float32")
    shape = tuple(a.shape)
    if shape != (c.hq,) and (c.b is None or shape != (c.b, c.hq)):
        bad.append(f"alibi_slopes has shape {shape}, expected (Hq={c.hq},) or (B={c.b}, Hq={c.hq})")
    elif a.stride(-1) != 1:
        bad.append(f"alibi_slopes.stride() is {a.stride()}, needs stride(-1) == 1")
    if not bad:
        return None
    return "; ".join(bad)


def fa2_grid_limit(c: CallFacts) -> str | None:
    limit = c.spec.grid_limit
    b, hq = c.b, c.hq
    if b is None:
        return None
    split = c.kind == "kvcache" and c.num_splits > 1
    if b <= limit and hq <= limit and (not split or b * hq <= limit):
        return None
    if split and b * hq > limit:
        return f"num_splits = {c.num_splits} puts B * Hq = {b} * {hq} = {b * hq} blocks in one grid dim (limit {limit})"
    return f"B = {b}, Hq = {hq}; a CUDA grid dim holds at most {limit}"


def _d_rounded(c: CallFacts) -> int:
    spec, d = c.spec, c.d_kernel
    m = spec.head_dim_round_small if d <= spec.head_dim_round_threshold else spec.head_dim_round_large
    return (d + m - 1) // m * m


def _dq_accum_elements(c: CallFacts, d_rounded: int) -> int:
    spec = c.spec
    if c.kind == "varlen":
        return (c.total_q + spec.varlen_row_pad * c.b) * c.hq * d_rounded
    return c.b * _round_up(c.sq, spec.seqlen_q_round) * c.hq * d_rounded


def fa2_int32_offset(c: CallFacts) -> str | None:
    spec = c.spec
    if not spec.bwd_int32_offsets or c.b is None:
        return None
    if c.b * c.hq * (c.d_kernel + 64) * (
        (c.total_q + spec.varlen_row_pad) if c.kind == "varlen" else (c.sq + spec.seqlen_q_round)
    ) < spec.int32_offset_limit:
        return None  # cheap upper bound: d_rounded < d + 64, rows < Sq + 128 per sequence
    d_rounded = _d_rounded(c)
    n = _dq_accum_elements(c, d_rounded)
    if n < spec.int32_offset_limit:
        return None
    if c.kind == "varlen":
        how = f"(total_q {c.total_q} + {spec.varlen_row_pad} * B {c.b}) * Hq {c.hq} * d_rounded {d_rounded}"
    else:
        how = f"B {c.b} * round_up(Sq {c.sq}, {spec.seqlen_q_round}) * Hq {c.hq} * d_rounded {d_rounded}"
    return f"backward dq_accum offsets reach {how} = {n} >= {spec.int32_offset_limit} (2**31)"


def fa2_bwd_garbage_grads(c: CallFacts) -> str | None:
    caps, spec = c.caps, c.spec
    if caps is None or c.dropout_p <= 0.0 or caps.arch not in spec.bwd_garbage_archs:
        return None
    lo, hi = spec.bwd_garbage_head_dim_range
    d = max(c.d_kernel, c.dv_kernel)
    if not (lo < d <= hi):
        return None
    return (
        f"backward on {caps} with head dim {d} (in ({lo}, {hi}]) and dropout_p = {c.dropout_p}: "
        f"{spec.label} launches no backward kernel there"
    )


def fa2_varlen_gqa_decode(c: CallFacts) -> str | None:
    # Mirrors mha_varlen_fwd's seqlenq_ngroups_swapped condition (causal is already off here).
    if not (
        c.max_q == 1 and c.hq > c.hk > 0 and c.wl < 0 and c.wr < 0 and c.dropout_p == 0.0
        and c.alibi is None and c.b is not None and c.total_q != c.b
    ):
        return None
    return (
        f"max_seqlen_q = 1 with GQA (Hq {c.hq} > Hkv {c.hk}) makes FA-2 reshape q to one query per "
        f"sequence, but total_q = {c.total_q} != batch {c.b}"
    )


def fa2_causal_dropped(c: CallFacts) -> str | None:
    if not (c.causal and c.max_q is not None and c.alibi is None and c.b is not None and c.total_q > c.b):
        return None
    still_causal, (_, wr) = normalised_window(True, (c.wl, c.wr), c.max_q, c.max_k)
    if still_causal or c.wr == 0:
        # An explicit right window of 0 survives the switch and keeps the mask causal (a fuzzer
        # false reject on the H100: window (15, 0) with max_seqlen_q = 1 matched the reference).
        return None
    return (
        f"causal=True with max_seqlen_q = 1 switches causal off, but total_q = {c.total_q} > batch "
        f"{c.b}, so some sequence has more than one query"
    )


def fa2_window_right_clamped(c: CallFacts) -> str | None:
    # FA-2 sets a side >= seqlen_k to -1 (fa2_mask.normalised_window). Flag only when that
    # changes which keys some row sees.
    wr, sk, sq = c.wr, c.sk, c.sq
    if c.causal or wr < 0 or sk is None or wr < sk or sk == 0:  # no keys: nothing to clamp
        return None
    _, computed = normalised_window(False, (c.wl, wr), sq, sk)
    if first_differing_row(sq, sk, (c.wl, wr), computed) is None:
        return None
    if computed == (-1, -1):
        became = "no window at all"
    else:
        became = f"right = seqlen_k = {sk} (the left window {c.wl} stays)"
    return (
        f"window_size right = {wr} >= seqlen_k {sk} becomes {became}; with seqlen_q = {sq} "
        "some rows then see other keys than asked"
    )


def fa2_varlen_empty_q(c: CallFacts) -> str | None:
    if c.kind != "varlen" or c.max_q is None or c.max_q >= 1 or c.b == 0:  # b == 0: FA2-BATCH-EMPTY
        return None
    return (
        f"max_seqlen_q = {c.max_q} (total_q = {c.total_q}): the kernel grid has no query tiles and "
        "the launch fails with CUDA 'invalid argument' (both providers, H100 fuzzing)"
    )


def fa2_window_left_only(c: CallFacts) -> str | None:
    # With a left window and window_right = -1, FA-2 sets right = seqlen_k (varlen: max_seqlen_k),
    # not "unbounded" (fa2_mask.normalised_window): rows i < Sq - Sk - 1 lose their last keys. Per
    # varlen sequence the bound uses max_seqlen_k, so max_q <= max_k + 1 is safe for all.
    if c.causal or c.wl < 0 or c.wr >= 0 or c.sk is None or c.sq is None or c.wl >= c.sk:
        return None
    _, computed = normalised_window(False, (c.wl, c.wr), c.sq, c.sk)
    if first_differing_row(c.sq, c.sk, (c.wl, c.wr), computed) is None:
        return None
    return (
        f"window_size = ({c.wl}, -1) with seqlen_q {c.sq} > seqlen_k {c.sk} + 1: FA-2 turns the right "
        f"side into {c.sk}, not unbounded, so the first {c.sq - c.sk - 1} row(s) lose keys"
    )


# --- arguments: scale, packing, rotary, versions -------------------------------------------------


def fa2_softmax_scale(c: CallFacts) -> str | None:
    scale = c.softmax_scale
    if scale is None:
        return None
    try:
        value = float(scale)
    except (TypeError, ValueError):
        return f"softmax_scale is {type(scale).__name__}, not a float"
    if value > 0.0 and value != _INF:  # NaN fails value > 0
        return None
    return f"softmax_scale = {scale}; FA-2 does not check it and needs a finite value > 0"


_INF = float("inf")
_PACK_N = {"qkv": 3, "kv": 2}


def fa2_packed_shape(c: CallFacts) -> str | None:
    if c.packed is None or c.pack_n == _PACK_N[c.packed]:
        return None
    want = _PACK_N[c.packed]
    at = 2 if c.kind == "dense" else 1
    shape = tuple((c.q if c.packed == "qkv" else c.k).shape)
    what = "FA-2 indexes past it (IndexError)" if c.pack_n < want else f"entries past {want} are silently ignored"
    return f"{c.packed} has shape {shape}: {c.pack_n} entries on dim {at}, expected {want}; {what}"


def fa2_rotary_new_kv(c: CallFacts) -> str | None:
    if c.rotary_cos is None or c.k_new is not None:
        return None
    return "rotary_cos/rotary_sin are given but no new k/v: FA-2 rotates only the tokens it appends"


def fa2_rotary_dim(c: CallFacts) -> str | None:
    cos = c.rotary_cos
    if not isinstance(cos, Tensor) or cos.dim() != 2:
        return None  # FA2-ROTARY-TABLE names the shape
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim <= c.d_kernel and rotary_dim % 16 == 0:
        return None
    return (f"rotary_dim = 2 * rotary_cos.shape[1] = {rotary_dim}; FA-2 needs it <= head dim {c.d_kernel} "
            "and a multiple of 16")


def fa2_rotary_table(c: CallFacts) -> str | None:
    cos, sin = c.rotary_cos, c.rotary_sin
    if cos is None and sin is None:
        return None
    if cos is None:
        return "rotary_sin is given without rotary_cos: FA-2 ignores it and rotates nothing"
    if isinstance(cos, Tensor) and isinstance(sin, Tensor):
        cs, qd = cos.shape, c.q.dtype
        if (len(cs) == 2 and sin.shape == cs and (c.sk is None or cs[0] >= c.sk) and cos.dtype == qd
                and sin.dtype == qd and cos.is_contiguous() and sin.is_contiguous()):
            return None
    bad = []
    if not isinstance(cos, Tensor) or cos.dim() != 2:
        bad.append(f"rotary_cos has shape {tuple(getattr(cos, 'shape', ()))}, expected (seqlen_ro, rotary_dim / 2)")
    else:
        if sin is None:
            bad.append("rotary_sin is missing")
        elif not isinstance(sin, Tensor) or sin.shape != cos.shape:
            bad.append(f"rotary_sin shape {tuple(getattr(sin, 'shape', ()))} != rotary_cos shape {tuple(cos.shape)}")
        if c.sk is not None and cos.shape[0] < c.sk:
            bad.append(f"cos/sin have {cos.shape[0]} rows < the cache length {c.sk}")
        for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
            if isinstance(t, Tensor):
                if t.dtype != c.q.dtype:
                    bad.append(f"{name}.dtype is {t.dtype}, q.dtype is {c.q.dtype}")
                if not t.is_contiguous():
                    bad.append(f"{name} is not contiguous (stride {t.stride()})")
    if not bad:
        return None
    return "; ".join(bad)


def _unsupported(c: CallFacts) -> list[str]:
    spec, given = c.spec, c.given
    bad = []
    if not spec.supports_softcap and (c.softcap or "softcap" in given):
        bad.append("softcap")
    if not spec.supports_alibi and c.alibi is not None:
        bad.append("alibi_slopes")
    if c.kind == "varlen" and not spec.supports_varlen_block_table and c.block_table is not None:
        bad.append("block_table")
    if c.kind == "kvcache":
        if not spec.supports_cache_leftpad and (c.cache_leftpad is not None or "cache_leftpad" in given):
            bad.append("cache_leftpad")
        if not spec.supports_return_softmax_lse and (c.return_lse or "return_softmax_lse" in given):
            bad.append("return_softmax_lse")
    return bad


def fa2_arg_unsupported(c: CallFacts) -> str | None:
    if c.spec.supports_all_arguments:
        return None
    bad = _unsupported(c)
    if not bad:
        return None
    return f"{', '.join(bad)} given, but {c.spec.label} has no such argument"


def fa2_inference_only(c: CallFacts) -> str | None:
    torch_seqused = c.seqused_k is not None and c.spec.provider == "torch"
    if not c.paged and not torch_seqused:
        return None
    what = "a paged k/v (block_table)" if c.paged else "seqused_k"
    return f"backward through {what}: {c.spec.label} has no backward for it"


def fa2_bwd_arch(c: CallFacts) -> str | None:
    check, caps = c.spec.bwd_arch_check, c.caps
    if check is None or caps is None or caps.arch in ((8, 0), (9, 0)):
        return None
    d = max(c.d_kernel, c.dv_kernel)
    if d <= 192:
        return None
    dropout = c.dropout_p > 0.0
    if (check == "dropout" and not dropout) or (check == "d<=224 or dropout" and d > 224 and not dropout):
        return None
    return (f"backward on {caps} with head dim {d} and dropout_p = {c.dropout_p}: {c.spec.label} "
            "runs that backward only on sm80/sm90 and raises")


# id -> (predicate, needs_shapes). Order = report order.
PREDICATES = {
    "FA2-RANK": (fa2_rank, False),
    "FA2-DEVICE": (fa2_device, False),
    "FA2-ARCH": (fa2_arch, False),
    "FA2-DTYPE": (fa2_dtype, False),
    "FA2-DTYPE-MATCH": (fa2_dtype_match, False),
    "FA2-INDEX-DTYPE": (fa2_index_dtype, False),
    "FA2-DROPOUT-RANGE": (fa2_dropout_range, False),
    "FA2-RETURN-SOFTMAX": (fa2_return_softmax, False),
    "FA2-SOFTCAP-DROPOUT": (fa2_softcap_dropout, False),
    "FA2-NUM-SPLITS": (fa2_num_splits, False),
    "FA2-SOFTMAX-SCALE": (fa2_softmax_scale, False),
    "FA2-ARG-UNSUPPORTED": (fa2_arg_unsupported, False),
    "FA2-INDEX-CONTIGUOUS": (fa2_index_contiguous, True),
    "FA2-INDEX-SHAPE": (fa2_index_shape, True),
    "FA2-LAST-DIM-STRIDE": (fa2_last_dim_stride, True),
    "FA2-HEAD-DIM-MAX": (fa2_head_dim_max, True),
    "FA2-HEAD-DIM-MULTIPLE": (fa2_head_dim_multiple, True),
    "FA2-HEAD-DIM-V": (fa2_head_dim_v, True),
    "FA2-QK-SHAPE": (fa2_qk_shape, True),
    "FA2-KV-SHAPE": (fa2_kv_shape, True),
    "FA2-HEADS-KV-ZERO": (fa2_heads_kv_zero, True),
    "FA2-HEADS-DIVISIBLE": (fa2_heads_divisible, True),
    "FA2-BATCH-EMPTY": (fa2_batch_empty, True),
    "FA2-DENSE-EMPTY-Q": (fa2_dense_empty_q, True),
    "FA2-DENSE-EMPTY-K": (fa2_dense_empty_k, True),
    "FA2-PAGED-BLOCK-SIZE": (fa2_paged_block_size, True),
    "FA2-PAGED-COMBINATION": (fa2_paged_combination, True),
    "FA2-KVCACHE-APPEND": (fa2_kvcache_append, True),
    "FA2-ALIBI": (fa2_alibi, True),
    "FA2-PACKED-SHAPE": (fa2_packed_shape, True),
    "FA2-ROTARY-NEW-KV": (fa2_rotary_new_kv, True),
    "FA2-ROTARY-DIM": (fa2_rotary_dim, True),
    "FA2-ROTARY-TABLE": (fa2_rotary_table, True),
    "FA2-GRID-LIMIT": (fa2_grid_limit, True),
    "FA2-INT32-OFFSET": (fa2_int32_offset, True),
    "FA2-BWD-GARBAGE-GRADS": (fa2_bwd_garbage_grads, True),
    "FA2-BWD-ARCH": (fa2_bwd_arch, True),
    "FA2-INFERENCE-ONLY": (fa2_inference_only, True),
    "FA2-VARLEN-GQA-DECODE": (fa2_varlen_gqa_decode, True),
    "FA2-CAUSAL-DROPPED": (fa2_causal_dropped, True),
    "FA2-WINDOW-RIGHT-CLAMPED": (fa2_window_right_clamped, True),
    "FA2-VARLEN-EMPTY-Q": (fa2_varlen_empty_q, True),
    "FA2-WINDOW-LEFT-ONLY": (fa2_window_left_only, True),
}
