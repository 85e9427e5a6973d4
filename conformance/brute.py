"""Brute-force NSA, written from ``nsa_spec.md`` alone: readable per-query loops, no masks.

This module is the suite's ground truth. It deliberately imports nothing from ``nsa_ref`` so
that a bug in the reference cannot hide behind the same bug here. Every loop runs over query
positions ``t`` of one sequence; the per-query key set is spelled out as the spec states it.

Layout (FA-2 varlen, see Documentation/Architecture/Design.md):
``q: (T, Hq, Dk)``, ``k: (T, Hkv, Dk)``, ``v: (T, Hkv, Dv)``, ``gates: (T, Hq, 3)``,
``cu_seqlens: (B+1,) int`` or ``None`` (one sequence). Positions are local to their sequence.

Arithmetic happens in the dtype of the inputs (pass fp64 for the truth; pass bf16/fp32 for a
"same math in low precision" baseline). The configuration is read duck-typed from any object
with the ``NSAConfig`` attribute names, so these loops do not depend on nsa_ref either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "Geometry",
    "geometry",
    "num_cmp_blocks",
    "num_sel_blocks",
    "cmp_block_visible",
    "sel_weight",
    "forced_blocks",
    "choose_blocks",
    "window_keys",
    "split_sequences",
    "compress",
    "cmp_attention",
    "cmp_probs",
    "selection_scores",
    "select_blocks",
    "sel_attention",
    "win_attention",
    "nsa_attention",
]


@dataclass(frozen=True)
class Geometry:
    """The NSA hyper-parameters the brute force needs (names as in the spec)."""

    l: int  # compression block length
    d: int  # compression stride
    l_sel: int  # selection block length l'
    n: int  # selected blocks per (t, KV head), forced ones included
    n_init: int
    n_local: int
    w: int  # sliding window, keys including the query itself
    scale: float | None


def geometry(cfg: Any) -> Geometry:
    """Read an ``NSAConfig``-like object (attributes block_len, block_stride, ...).

    The spec leaves n_init + n_local > n_sel undefined, so the brute force refuses it."""
    compress_kind = getattr(cfg, "compress", "mean")
    if compress_kind != "mean":
        raise NotImplementedError(
            f"brute force covers compress='mean' only (got {compress_kind!r}); "
            "the learnable 'mlp' compressor has no parameter-free ground truth"
        )
    if int(cfg.n_init) + int(cfg.n_local) > int(cfg.n_sel):
        raise ValueError(
            f"n_init + n_local = {int(cfg.n_init) + int(cfg.n_local)} > n_sel = {int(cfg.n_sel)}: "
            "the spec does not say which forced block to drop"
        )
    return Geometry(
        l=int(cfg.block_len),
        d=int(cfg.block_stride),
        l_sel=int(cfg.sel_block),
        n=int(cfg.n_sel),
        n_init=int(cfg.n_init),
        n_local=int(cfg.n_local),
        w=int(cfg.window),
        scale=None if cfg.scale is None else float(cfg.scale),
    )


def _scale(g: Geometry, head_dim: int) -> float:
    return g.scale if g.scale is not None else 1.0 / math.sqrt(head_dim)


# --- the spec's rules, one small function each -------------------------------------------------

def num_cmp_blocks(T: int, g: Geometry) -> int:
    """Tc = floor((T - l) / d) + 1 if T >= l, else 0."""
    return (T - g.l) // g.d + 1 if T >= g.l else 0


def num_sel_blocks(T: int, g: Geometry) -> int:
    """nb = ceil(T / l')."""
    return -(-T // g.l_sel)


def cmp_block_visible(t: int, i: int, g: Geometry) -> bool:
    """Query t sees compression block i iff the block has ended: i*d + l - 1 <= t."""
    return i * g.d + g.l - 1 <= t


def sel_weight(j: int, i: int, g: Geometry) -> float:
    """w(j, i) = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d."""
    lo = max(i * g.d, j * g.l_sel)
    hi = min(i * g.d + g.l, (j + 1) * g.l_sel)
    return max(0, hi - lo) / g.d


def forced_blocks(t: int, g: Geometry) -> list[int]:
    """Initial blocks 0..n_init-1 and local blocks c-n_local+1..c, clipped to 0..c; sorted."""
    c = t // g.l_sel
    forced = {j for j in range(g.n_init) if j <= c}
    forced |= {j for j in range(c - g.n_local + 1, c + 1) if j >= 0}
    return sorted(forced)


def window_keys(t: int, g: Geometry) -> range:
    """Keys s in [max(0, t - w + 1), t]."""
    return range(max(0, t - g.w + 1), t + 1)


def split_sequences(cu_seqlens: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    """``cu_seqlens: (B+1,)`` -> [(start, end), ...] in token units; None -> [(0, total)]."""
    if cu_seqlens is None:
        return [(0, total)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(cu[b], cu[b + 1]) for b in range(len(cu) - 1)]


# --- single-sequence loops ---------------------------------------------------------------------

def _attend(qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """The G query heads of one KV head at one position attend one key set.

    ``qg: (G, Dk)``, ``keys: (S, Dk)``, ``values: (S, Dv)`` -> out (G, Dv), lse (G,), p (G, S).
    An empty key set gives out 0 and lse -inf (the project's convention), never NaN."""
    G = qg.shape[0]
    if keys.shape[0] == 0:
        return (qg.new_zeros((G, values.shape[-1])), qg.new_full((G,), float("-inf")),
                qg.new_zeros((G, 0)))
    logits = (qg @ keys.T) * scale
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse[:, None])
    return p @ values, lse, p


def _compress_one(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """``x: (T, H, D)`` -> ``(Tc, H, D)``: mean of tokens [i*d, i*d + l) for each block i."""
    T = x.shape[0]
    blocks = [x[i * g.d : i * g.d + g.l].mean(dim=0) for i in range(num_cmp_blocks(T, g))]
    if not blocks:
        return x.new_zeros((0, *x.shape[1:]))
    return torch.stack(blocks)


def _cmp_one(q, k_cmp, v_cmp, g: Geometry):
    """One sequence: ``q (T, Hq, Dk)``, ``k_cmp (Tc, Hkv, Dk)``, ``v_cmp (Tc, Hkv, Dv)``.

    Returns out (T, Hq, Dv), lse (T, Hq), probs (T, Hq, Tc) (zero where not visible)."""
    T, Hq, Dk = q.shape
    Tc, Hkv, Dv = v_cmp.shape
    G = Hq // Hkv
    scale = _scale(g, Dk)
    out = q.new_zeros((T, Hq, Dv))
    lse = q.new_full((T, Hq), float("-inf"))
    probs = q.new_zeros((T, Hq, Tc))
    for t in range(T):
        visible = [i for i in range(Tc) if cmp_block_visible(t, i, g)]
        for kv in range(Hkv):
            heads = slice(kv * G, (kv + 1) * G)  # query heads h with h // G == kv
            o, m, p = _attend(q[t, heads], k_cmp[visible, kv], v_cmp[visible, kv], scale)
            out[t, heads], lse[t, heads] = o, m
            probs[t, heads, visible] = p
    return out, lse, probs


def _selection_scores_one(probs: torch.Tensor, T: int, Hkv: int, g: Geometry) -> torch.Tensor:
    """``probs (T, Hq, Tc)`` -> GQA-summed scores ``(T, Hkv, nb)``."""
    Tc = probs.shape[-1]
    Hq = probs.shape[1]
    nb = num_sel_blocks(T, g)
    weight = probs.new_zeros((nb, Tc))
    for j in range(nb):
        for i in range(Tc):
            weight[j, i] = sel_weight(j, i, g)
    p_slc = probs @ weight.T  # (T, Hq, nb): sum_i w(j, i) * p_cmp[t, h, i]
    return p_slc.reshape(T, Hkv, Hq // Hkv, nb).sum(dim=2)


def choose_blocks(scores: torch.Tensor, t: int, g: Geometry) -> list[int]:
    """Blocks selected for query ``t`` of one KV head from its block scores ``(nb,)``.

    Forced blocks first; the other n - #forced picks are the highest scores among blocks
    j <= c = floor(t / l'), ties to the lower index; fewer candidates than picks: take all.
    Returns the sorted block indices (at most n, no padding)."""
    c = t // g.l_sel
    forced = forced_blocks(t, g)
    rest = [j for j in range(c + 1) if j not in forced]
    rest.sort(key=lambda j: (-float(scores[j]), j))
    return sorted(forced + rest[: g.n - len(forced)])


def _select_one(scores: torch.Tensor, g: Geometry) -> torch.Tensor:
    """``scores (T, Hkv, nb)`` -> ``block_idx (T, Hkv, n) int32``, sorted, -1 padded."""
    T, Hkv, _ = scores.shape
    idx = torch.full((T, Hkv, g.n), -1, dtype=torch.int32)
    for t in range(T):
        for kv in range(Hkv):
            chosen = choose_blocks(scores[t, kv], t, g)
            idx[t, kv, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return idx


def _sel_one(q, k, v, block_idx, g: Geometry) -> torch.Tensor:
    """One sequence: attend tokens s in the selected blocks with s <= t."""
    T, Hq, Dk = q.shape
    Hkv, Dv = v.shape[1], v.shape[2]
    G = Hq // Hkv
    scale = _scale(g, Dk)
    out = q.new_zeros((T, Hq, Dv))
    for t in range(T):
        for kv in range(Hkv):
            heads = slice(kv * G, (kv + 1) * G)
            blocks = sorted({int(j) for j in block_idx[t, kv].tolist() if j >= 0})
            keys = [s for j in blocks for s in range(j * g.l_sel, min((j + 1) * g.l_sel, t + 1))]
            out[t, heads] = _attend(q[t, heads], k[keys, kv], v[keys, kv], scale)[0]
    return out


def _win_one(q, k, v, g: Geometry) -> torch.Tensor:
    """One sequence: attend tokens s in [max(0, t - w + 1), t]."""
    T, Hq, Dk = q.shape
    Hkv, Dv = v.shape[1], v.shape[2]
    G = Hq // Hkv
    scale = _scale(g, Dk)
    out = q.new_zeros((T, Hq, Dv))
    for t in range(T):
        keys = list(window_keys(t, g))
        for kv in range(Hkv):
            heads = slice(kv * G, (kv + 1) * G)
            out[t, heads] = _attend(q[t, heads], k[keys, kv], v[keys, kv], scale)[0]
    return out


# --- packed (varlen) entry points: every rule applies per sequence ----------------------------

def _cmp_cu(cu_seqlens, total: int, g: Geometry) -> tuple[list[tuple[int, int]], torch.Tensor]:
    seqs = split_sequences(cu_seqlens, total)
    counts = [num_cmp_blocks(e - s, g) for s, e in seqs]
    cu_cmp = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    for b, n in enumerate(counts):
        cu_cmp[b + 1] = cu_cmp[b] + n
    return seqs, cu_cmp


def compress(x: torch.Tensor, cfg: Any, cu_seqlens: torch.Tensor | None = None):
    """``x: (T, H, D)`` -> ``(x_cmp (Tc_total, H, D), cu_seqlens_cmp (B+1,) int32)``, mean phi."""
    g = geometry(cfg)
    seqs, cu_cmp = _cmp_cu(cu_seqlens, x.shape[0], g)
    parts = [_compress_one(x[s:e], g) for s, e in seqs]
    out = torch.cat(parts) if parts else x.new_zeros((0, *x.shape[1:]))
    return out, cu_cmp


def cmp_attention(q, k_cmp, v_cmp, cfg, cu_seqlens=None):
    """``q (T, Hq, Dk)``, ``k_cmp (Tc, Hkv, Dk)``, ``v_cmp (Tc, Hkv, Dv)`` -> out (T, Hq, Dv), lse (T, Hq).

    ``k_cmp``/``v_cmp`` are packed per sequence like ``compress`` returns them."""
    out, lse, _ = cmp_probs(q, k_cmp, v_cmp, cfg, cu_seqlens)
    return out, lse


def cmp_probs(q, k_cmp, v_cmp, cfg, cu_seqlens=None):
    """As ``cmp_attention`` plus per-sequence probabilities: list of ``(T_b, Hq, Tc_b)``."""
    g = geometry(cfg)
    seqs, cu_cmp = _cmp_cu(cu_seqlens, q.shape[0], g)
    out = q.new_zeros((q.shape[0], q.shape[1], v_cmp.shape[-1]))
    lse = q.new_full(q.shape[:2], float("-inf"))
    probs = []
    for b, (s, e) in enumerate(seqs):
        cs, ce = int(cu_cmp[b]), int(cu_cmp[b + 1])
        o, m, p = _cmp_one(q[s:e], k_cmp[cs:ce], v_cmp[cs:ce], g)
        out[s:e], lse[s:e] = o, m
        probs.append(p)
    return out, lse, probs


def selection_scores(q, k_cmp, cfg, cu_seqlens=None) -> list[torch.Tensor]:
    """Per sequence, the GQA-summed block scores ``(T_b, Hkv, nb_b)`` used for top-n."""
    g = geometry(cfg)
    Hkv = k_cmp.shape[1]
    v_dummy = k_cmp[..., :1]
    _, _, probs = cmp_probs(q, k_cmp, v_dummy, cfg, cu_seqlens)
    seqs = split_sequences(cu_seqlens, q.shape[0])
    return [_selection_scores_one(p, e - s, Hkv, g) for p, (s, e) in zip(probs, seqs)]


def select_blocks(q, k_cmp, cfg, cu_seqlens=None) -> torch.Tensor:
    """``q (T, Hq, Dk)``, ``k_cmp (Tc, Hkv, Dk)`` -> ``block_idx (T, Hkv, n_sel) int32``."""
    g = geometry(cfg)
    parts = [_select_one(sc, g) for sc in selection_scores(q, k_cmp, cfg, cu_seqlens)]
    if not parts:
        return torch.full((0, k_cmp.shape[1], g.n), -1, dtype=torch.int32)
    return torch.cat(parts)


def sel_attention(q, k, v, block_idx, cfg, cu_seqlens=None) -> torch.Tensor:
    """``q (T, Hq, Dk)``, ``k (T, Hkv, Dk)``, ``v (T, Hkv, Dv)``, ``block_idx (T, Hkv, n)`` -> (T, Hq, Dv)."""
    g = geometry(cfg)
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))
    for s, e in split_sequences(cu_seqlens, q.shape[0]):
        out[s:e] = _sel_one(q[s:e], k[s:e], v[s:e], block_idx[s:e], g)
    return out


def win_attention(q, k, v, cfg, cu_seqlens=None) -> torch.Tensor:
    """``q (T, Hq, Dk)``, ``k (T, Hkv, Dk)``, ``v (T, Hkv, Dv)`` -> (T, Hq, Dv)."""
    g = geometry(cfg)
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))
    for s, e in split_sequences(cu_seqlens, q.shape[0]):
        out[s:e] = _win_one(q[s:e], k[s:e], v[s:e], g)
    return out


def nsa_attention(q, k, v, gates, cfg, cu_seqlens=None, *, return_parts: bool = False):
    """``q (T, Hq, Dk)``, ``k (T, Hkv, Dk)``, ``v (T, Hkv, Dv)``, ``gates (T, Hq, 3)`` -> (T, Hq, Dv).

    o = g_cmp * o_cmp + g_sel * o_sel + g_win * o_win, with the selection computed from the cmp
    probabilities. ``return_parts=True`` also returns a dict of the branch outputs and indices."""
    k_cmp, _ = compress(k, cfg, cu_seqlens)
    v_cmp, _ = compress(v, cfg, cu_seqlens)
    o_cmp, lse = cmp_attention(q, k_cmp, v_cmp, cfg, cu_seqlens)
    block_idx = select_blocks(q, k_cmp, cfg, cu_seqlens)
    o_sel = sel_attention(q, k, v, block_idx, cfg, cu_seqlens)
    o_win = win_attention(q, k, v, cfg, cu_seqlens)
    out = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_sel + gates[..., 2:3] * o_win
    if return_parts:
        parts = dict(cmp=o_cmp, lse=lse, sel=o_sel, win=o_win, block_idx=block_idx,
                     k_cmp=k_cmp, v_cmp=v_cmp)
        return out, parts
    return out
