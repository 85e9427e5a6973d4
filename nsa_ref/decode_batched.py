"""Batched NSA decode over an ``NSAKVCache``: B sequences (each at its own length) in one step.

``decode_step_batched`` appends the new tokens to the cache, then runs the three branches for
all B sequences at once, vectorised over B with masks (no Python loop over sequences in the
math), and gates them as ``nsa_attention`` does. It is the plain-torch reference of the batched
step (CPU, any dtype); in fp64 it equals prefill (``nsa_attention(..., backend="reference")``) at
the same positions to rounding.

Multi-token steps (speculative decoding): q (B, n, Hq, Dk) with n new tokens per sequence; the
queries sit at positions S_b .. S_b + n - 1 and are causal among themselves, since every rule
below reads only the query position t.

The branches take what the kernels of the fast path take, the cache's paged views
(``PagedView``: page pools, int32 block table, ``cache_seqlens``) and the query positions:

    cmp_branch(q, q_pos, cmp_view, cfg)             -> (o_cmp, p_cmp)  FA-2 kvcache over the compressed pages
    select_from_probs(p_cmp, q_pos, n_kv, nb, cfg)  -> block_idx       Triton batched selection
    sel_branch(q, q_pos, block_idx, raw_view, cfg)  -> o_sel           Triton selected attention (paged)
    win_branch(q, q_pos, raw_view, cfg)             -> o_win           FA-2 kvcache, window (w - 1, 0)

Here each gathers its keys from the pages (``PagedView.gather``) and runs the masked softmax of
``nsa_ref.reference``; the visibility rules are those of ``nsa_ref.masks`` and the selection is
``nsa_ref.selection.block_scores`` / ``top_blocks``, as in prefill.
"""
from __future__ import annotations

import torch

from nsa_ref import masks, selection, telemetry
from nsa_ref.api import combine_branches
from nsa_ref.config import NSAConfig
from nsa_ref.inputs import check_cfg, check_gates, check_heads, check_validate
from nsa_ref.kv_cache import KVCacheError, NSAKVCache, PagedView
from nsa_ref.reference import masked_softmax


def attend_gathered(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, n, Hq, Dk), k: (B, n, Hkv, S, Dk), v: (B, n, Hkv, S, Dv) (per-query keys; dims of
    size 1 broadcast), visible: (B, n, Hkv or 1, S) bool -> (out (B, n, Hq, Dv), p (B, n, Hq, S)).

    Query head h uses KV head h // G (p's heads in that order, as ``selection.cmp_block_probs``).
    Rows with no visible key: out exactly 0, p 0 (``reference.masked_softmax``).
    """
    B, n, Hq, Dk = q.shape
    Hkv, S = k.shape[2], k.shape[3]
    G = Hq // Hkv
    k = k.expand(B, n, Hkv, S, Dk)
    v = v.expand(B, n, Hkv, S, v.shape[-1])
    qg = q.reshape(B, n, Hkv, G, Dk)
    scores = torch.einsum("bnkgd,bnksd->bnkgs", qg, k) * scale
    p, _ = masked_softmax(scores, visible[:, :, :, None, :])
    out = torch.einsum("bnkgs,bnksd->bnkgd", p, v)
    return out.reshape(B, n, Hq, v.shape[-1]), p.reshape(B, n, Hq, S)


def _batch_index(view: PagedView, dims: int) -> torch.Tensor:
    """(B, 1, ..., 1) with ``dims`` trailing singleton dims: the sequence index of a gather."""
    B = view.block_table.shape[0]
    return torch.arange(B, device=view.block_table.device).reshape(B, *([1] * dims))


def cmp_branch(
    q: torch.Tensor, q_pos: torch.Tensor, cmp_view: PagedView, cfg: NSAConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (B, n, Hq, Dk), q_pos: (B, n) int64, cmp_view: the compressed pages
    -> (o_cmp (B, n, Hq, Dv), p_cmp (B, n, Hq, Tc_max) in ``selection.score_dtype``).

    Query t sees compressed block i iff it has ended (``masks.cmp_block_visible``); with one
    token per step that is every emitted block. p_cmp is the cmp softmax selection scores from,
    computed as prefill's ``selection.cmp_block_probs`` does (fp32 for 16-bit inputs).
    """
    tc = cmp_view.max_length
    i = torch.arange(tc, device=q.device)
    emitted = i[None, :] < cmp_view.cache_seqlens[:, None]  # (B, Tc)
    k, v = cmp_view.gather(_batch_index(cmp_view, 1), i[None, :], emitted)  # (B, Tc, Hkv, D)
    k, v = k.permute(0, 2, 1, 3)[:, None], v.permute(0, 2, 1, 3)[:, None]  # (B, 1, Hkv, Tc, D)
    visible = (masks.cmp_block_visible(q_pos[:, :, None], i, cfg) & emitted[:, None, :])[:, :, None, :]
    scale = cfg.softmax_scale(q.shape[-1])
    out, p = attend_gathered(q, k, v, visible, scale)
    dtype = selection.score_dtype(q.dtype)
    if dtype != q.dtype:
        _, p = attend_gathered(q.to(dtype), k.to(dtype), v.to(dtype), visible, scale)
    return out, p


def select_from_probs(
    p_cmp: torch.Tensor, q_pos: torch.Tensor, n_kv_heads: int, num_sel: int, cfg: NSAConfig
) -> torch.Tensor:
    """p_cmp: (B, n, Hq, Tc), q_pos: (B, n) -> block_idx (B, n, Hkv, n_sel) int32, -1 padded.

    prefill's rules on the B * n rows: ``selection.block_scores`` (overlap weights, sum over the
    G heads) and ``selection.top_blocks`` (forced initial / local blocks, candidates j <= t // l',
    ties to the lower index). ``num_sel``: selection blocks of the longest sequence; a shorter
    sequence's extra blocks are never candidates.
    """
    B, n, Hq, Tc = p_cmp.shape
    with torch.no_grad():
        scores = selection.block_scores(p_cmp.reshape(B * n, Hq, Tc), n_kv_heads, num_sel, cfg)
        block_idx = selection.top_blocks(scores, q_pos.reshape(B * n), cfg)
    return block_idx.reshape(B, n, n_kv_heads, cfg.n_sel)


def sel_branch(
    q: torch.Tensor, q_pos: torch.Tensor, block_idx: torch.Tensor, raw_view: PagedView, cfg: NSAConfig
) -> torch.Tensor:
    """q: (B, n, Hq, Dk), q_pos: (B, n), block_idx: (B, n, Hkv, n_sel) -> o_sel (B, n, Hq, Dv).

    Reads only the selected blocks' tokens s (at most n_sel * l' per query and KV head) and
    keeps s <= t (``masks.causal_visible``); -1 entries select nothing. Lists are sorted with the
    -1 padding last (``selection.top_blocks``), so only the first nb = (blocks of the longest
    sequence) columns can hold a block.
    """
    block_idx = block_idx[..., : cfg.num_sel_blocks(raw_view.max_length)]
    B, n, Hkv, n_sel = block_idx.shape
    lp = cfg.sel_block
    s = block_idx.long()[..., None] * lp + torch.arange(lp, device=q.device)  # (B, n, Hkv, n_sel, l')
    valid = (block_idx >= 0)[..., None] & masks.causal_visible(q_pos[:, :, None, None, None], s)
    s, valid = s.reshape(B, n, Hkv, n_sel * lp), valid.reshape(B, n, Hkv, n_sel * lp)
    head = torch.arange(Hkv, device=q.device)[None, None, :, None]
    k, v = raw_view.gather(_batch_index(raw_view, 3), s, valid, head)  # (B, n, Hkv, K, D)
    return attend_gathered(q, k, v, valid, cfg.softmax_scale(q.shape[-1]))[0]


def win_branch(q: torch.Tensor, q_pos: torch.Tensor, raw_view: PagedView, cfg: NSAConfig) -> torch.Tensor:
    """q: (B, n, Hq, Dk), q_pos: (B, n) -> o_win (B, n, Hq, Dv): keys s in [t - w + 1, t], s >= 0
    (``masks.win_visible``), read from the pages (at most min(w, longest sequence) per query)."""
    width = min(cfg.window, raw_view.max_length)
    s = q_pos[:, :, None] - width + 1 + torch.arange(width, device=q.device)  # (B, n, W)
    valid = masks.win_visible(q_pos[:, :, None], s, cfg) & (s >= 0)
    k, v = raw_view.gather(_batch_index(raw_view, 2), s, valid)  # (B, n, W, Hkv, D)
    k, v = k.transpose(2, 3), v.transpose(2, 3)
    return attend_gathered(q, k, v, valid[:, :, None, :], cfg.softmax_scale(q.shape[-1]))[0]


def check_step_inputs(
    q, k_new, v_new, gates, cache: NSAKVCache, cfg: NSAConfig, validate: str, who: str = "decode_step_batched",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The input checks of a decode step (``decode_step_batched``, ``decode_fast.decode_step_fast``),
    before anything is written -> (q, k_new, v_new, gates) each with the n axis (B, n, ...), and
    whether the inputs were 3-D (one token per sequence). The cache's own rules (capacity, pages,
    dtype of the new K/V) are checked by ``cache.append``, which raises before writing.
    ``validate`` "values" reads the gates once (one device sync); "shapes" reads nothing."""
    check_cfg(cfg)
    values = check_validate(validate)
    if cfg != cache.cfg:
        raise KVCacheError(f"{who}: cfg {cfg!r} differs from the cache's {cache.cfg!r}")
    single = isinstance(q, torch.Tensor) and q.dim() == 3
    q4, k4, v4, g4 = (x[:, None] if single and isinstance(x, torch.Tensor) else x for x in (q, k_new, v_new, gates))
    for name, x in (("q", q4), ("k_new", k4), ("v_new", v4), ("gates", g4)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(
                f"{who}: q, k_new, v_new, gates must all be 3-D (one token per sequence) or "
                f"all 4-D (B, n, ...); {name} has shape {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
    B, n = q4.shape[:2]
    if not (k4.shape[:2] == v4.shape[:2] == g4.shape[:2] == (B, n)):
        raise ValueError(
            f"{who}: q, k_new, v_new, gates need the same (B, n), got {tuple(q4.shape[:2])}, "
            f"{tuple(k4.shape[:2])}, {tuple(v4.shape[:2])}, {tuple(g4.shape[:2])}"
        )
    flat = [x.reshape(B * n, *x.shape[2:]) for x in (q4, k4, v4, g4)]
    check_heads(*flat[:3], k_name="k_new", v_name="v_new")
    check_gates(flat[3], flat[0], values=values)
    return q4, k4, v4, g4, single


@torch.no_grad()
def decode_step_batched(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, gates: torch.Tensor,
    cache: NSAKVCache, cfg: NSAConfig, *, validate: str = "values",
) -> torch.Tensor:
    """q: (B, Hq, Dk), k_new: (B, Hkv, Dk), v_new: (B, Hkv, Dv), gates: (B, Hq, 3) -> (B, Hq, Dv);
    or with n tokens per sequence: q (B, n, Hq, Dk), k_new (B, n, Hkv, Dk), v_new (B, n, Hkv, Dv),
    gates (B, n, Hq, 3) -> (B, n, Hq, Dv).

    Appends k_new / v_new to ``cache`` (sequence b at its own length S_b; compressed blocks that
    end among the new tokens are emitted), then cmp, selection, sel and win for the queries at
    positions S_b .. S_b + n - 1, gated (cmp, sel, win) as ``nsa_attention``. Every input and
    the append are checked before the cache changes: a refused step leaves it as it was.
    ``validate``: "values" (gates checked in [0, 1]: one device read) or "shapes" (no device
    read in the whole step), as in ``nsa_attention``. Inference only (runs under
    ``torch.no_grad()``). Telemetry: each branch counts path
    "reference", reason "decode_step_batched".
    """
    q4, k4, v4, g4, single = check_step_inputs(q, k_new, v_new, gates, cache, cfg, validate)
    n = q4.shape[1]
    cache.append(k4, v4)  # checks the cache's own rules first; raises before writing

    q_pos = cache.cache_seqlens.long()[:, None] - n + torch.arange(n, device=q4.device)  # (B, n)
    raw_view, cmp_view = cache.views()
    o_cmp, p_cmp = cmp_branch(q4, q_pos, cmp_view, cfg)
    block_idx = select_from_probs(p_cmp, q_pos, k4.shape[2], cfg.num_sel_blocks(raw_view.max_length), cfg)
    o_sel = sel_branch(q4, q_pos, block_idx, raw_view, cfg)
    o_win = win_branch(q4, q_pos, raw_view, cfg)
    out = combine_branches(g4, o_cmp, o_sel, o_win)
    for branch in ("cmp", "select", "sel", "win"):
        telemetry.record(branch, "reference", "decode_step_batched")
    return out[:, 0] if single else out
