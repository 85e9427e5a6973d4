"""Top-n block selection from the compressed-attention probabilities (nsa_spec.md, "Selection").

p_slc[t, h, j] = sum_i w(j, i) * p_cmp[t, h, i], summed over the G query heads of each KV head;
forced initial/local blocks first, then the highest scores among j <= c, ties to the lower index.

Readings of nsa_spec.md pinned here (where the words leave room):
- p_cmp uses the cmp branch's softmax (same scale, visible blocks only); a row with no visible
  block has p_cmp = 0, so all its scores are 0 and the free picks fall to the lowest indices.
- The GQA reduction is a sum over the G heads (a mean would rank identically).
- Candidates are blocks 0..c (c = t // l'), including the partly future block c; the tokens
  s > t inside it are masked by the sel branch, not here.
- Forced blocks are the union of 0..n_init-1 and c-n_local+1..c, clipped to 0..c; overlaps are
  not refilled by extra forced blocks. Free picks = n_sel - |forced| from the other candidates.
- Exact ties go to the lower block index (stable sort on the score).
Scores are computed in fp32 for fp16/bf16 inputs (fewer spurious ties) and in the input dtype
otherwise. Queries are processed in chunks of at most ``CHUNK_ELEMENTS`` score entries, so
selection never holds the full (T, Hq, Tc) probability tensor.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nsa_ref import masks, varlen
from nsa_ref.reference import masked_softmax

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig

#: Upper bound on the score entries (query chunk * Hq * Tc) held at once by selection, on the CPU.
CHUNK_ELEMENTS = 1 << 24
#: The same bound on a GPU (fp32 entries: ~1 GiB per temporary). Small chunks there are launch-bound:
#: with 1 << 24 a 64K-token selection runs 1024 chunks, and a 64K NSA forward on an H100 spent
#: ~1.3 s outside its three attention branches (artifacts/2026-11-25/fa2_harden/bench.csv).
CUDA_CHUNK_ELEMENTS = 1 << 28


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype used for selection probabilities: fp32 for 16-bit floats, else unchanged."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _query_chunks(length: int, per_query: int, device: torch.device | None = None) -> list[tuple[int, int]]:
    budget = CUDA_CHUNK_ELEMENTS if device is not None and device.type == "cuda" else CHUNK_ELEMENTS
    step = max(1, budget // max(1, per_query))
    return [(s, min(length, s + step)) for s in range(0, length, step)]


def cmp_block_probs(q: torch.Tensor, k_cmp: torch.Tensor, q_pos: torch.Tensor, cfg: "NSAConfig") -> torch.Tensor:
    """q: (L, Hq, Dk) of one sequence at positions q_pos: (L,), k_cmp: (Tc, Hkv, Dk)
    -> p_cmp (L, Hq, Tc) in ``score_dtype``: softmax over visible blocks, 0 elsewhere."""
    L, Hq, Dk = q.shape
    Tc, Hkv, _ = k_cmp.shape
    dtype = score_dtype(q.dtype)
    qg = q.to(dtype).reshape(L, Hkv, Hq // Hkv, Dk)
    scores = torch.einsum("lkgd,ikd->kgli", qg, k_cmp.to(dtype)) * cfg.softmax_scale(Dk)
    visible = masks.cmp_visible_mask(q_pos, Tc, cfg)
    p, _ = masked_softmax(scores, visible)
    return p.permute(2, 0, 1, 3).reshape(L, Hq, Tc)


def cmp_probabilities(
    q: torch.Tensor, k_cmp: torch.Tensor, cfg: "NSAConfig", cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk) -> p_cmp (T, Hq, Tc_max) in ``score_dtype``.

    Row t holds the cmp softmax over its own sequence's blocks; invisible blocks and the padding
    up to Tc_max (the longest sequence's Tc) are 0. Differentiable.
    """
    T, Hq, _ = q.shape
    tc_list = varlen.cmp_seqlens(cu_seqlens, T, cfg)
    tc_max = max([0, *tc_list])
    rows = []
    ca = 0
    for (a, b), tc in zip(varlen.seq_bounds(cu_seqlens, T), tc_list):
        pos = torch.arange(b - a, device=q.device)
        p = cmp_block_probs(q[a:b], k_cmp[ca : ca + tc], pos, cfg)
        rows.append(torch.nn.functional.pad(p, (0, tc_max - tc)))
        ca += tc
    return torch.cat(rows, dim=0) if rows else q.new_zeros((0, Hq, 0), dtype=score_dtype(q.dtype))


def block_scores(p_cmp: torch.Tensor, n_kv_heads: int, num_sel: int, cfg: "NSAConfig") -> torch.Tensor:
    """p_cmp: (L, Hq, Tc) -> p_slc (L, Hkv, num_sel): overlap-weighted block scores, summed over
    the G query heads of each KV head (``masks.selection_weights``)."""
    L, Hq, Tc = p_cmp.shape
    weights = masks.selection_weights(Tc, num_sel, cfg, dtype=p_cmp.dtype, device=p_cmp.device)
    per_kv = p_cmp.reshape(L, n_kv_heads, Hq // n_kv_heads, Tc).sum(dim=2)
    return per_kv @ weights


def top_blocks(scores: torch.Tensor, q_pos: torch.Tensor, cfg: "NSAConfig") -> torch.Tensor:
    """scores: (L, Hkv, nb) p_slc, q_pos: (L,) -> block_idx (L, Hkv, n_sel) int32.

    Forced blocks (``masks.sel_block_forced``) always; the rest by descending score among
    candidates j <= c (``masks.sel_block_candidate``), equal scores to the lower index (stable
    sort). Fewer candidates than n_sel: all of them. Sorted ascending, -1 padded at the end.
    """
    L, Hkv, nb = scores.shape
    n = cfg.n_sel
    j = torch.arange(nb, device=scores.device)
    candidate = masks.sel_block_candidate(q_pos[:, None], j[None, :], cfg)[:, None, :]
    forced = masks.sel_block_forced(q_pos[:, None], j[None, :], cfg)[:, None, :]
    key = scores.masked_fill(~candidate, float("-inf")).masked_fill(forced, float("inf"))
    if nb < n:
        key = torch.nn.functional.pad(key, (0, n - nb), value=float("-inf"))
    ranked = torch.sort(key, dim=-1, descending=True, stable=True)
    picked = ranked.indices[..., :n]
    taken = ranked.values[..., :n] > float("-inf")
    # Untaken slots sort to the end via a sentinel, then become -1.
    sentinel = key.shape[-1]
    ordered = torch.sort(torch.where(taken, picked, sentinel), dim=-1).values
    return torch.where(ordered == sentinel, -1, ordered).to(torch.int32)


@torch.no_grad()
def select_blocks(
    q: torch.Tensor, k_cmp: torch.Tensor, cfg: "NSAConfig", cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """q: (T, Hq, Dk), k_cmp: (Tc_total, Hkv, Dk) -> block_idx (T, Hkv, n_sel) int32.

    Per sequence and query chunk: p_cmp -> p_slc (``block_scores``) -> ``top_blocks``. No
    gradient flows through selection. Inputs are assumed valid (``nsa_ref.api`` checks them).
    """
    T, Hq, _ = q.shape
    Hkv = k_cmp.shape[1]
    out = torch.full((T, Hkv, cfg.n_sel), -1, dtype=torch.int32, device=q.device)
    ca = 0
    for (a, b), tc in zip(varlen.seq_bounds(cu_seqlens, T), varlen.cmp_seqlens(cu_seqlens, T, cfg)):
        kc = k_cmp[ca : ca + tc]
        ca += tc
        nb = masks.num_sel_blocks(b - a, cfg)
        for s, e in _query_chunks(b - a, Hq * max(tc, 1), q.device):
            pos = torch.arange(s, e, device=q.device)
            p_cmp = cmp_block_probs(q[a + s : a + e], kc, pos, cfg)
            out[a + s : a + e] = top_blocks(block_scores(p_cmp, Hkv, nb, cfg), pos, cfg)
    return out
