"""The torch pieces of the fast decode step (``nsa_ref.decode_fast``): the static-shape torch ops
the step falls back to where neither the FA-2 kvcache kernel nor a Triton decode kernel runs,
and the host-free glue around those kernels (widths, the scoring pass after FA-2's cmp call,
the gathered keys of sel's FA-2 call).

Like the whole step they are capturable in a CUDA graph: every width comes from the cache's
CAPACITY, the masks from the device ``cache_seqlens``, and nothing reads the device from the host.
Shapes: B sequences with one query each, Hq query heads, Hkv KV heads (G = Hq // Hkv), head
dims Dk / Dv; W = min(w, raw capacity) window slots, Tc = ``cmp_width`` compressed slots,
n_sel selection blocks of l' tokens, K = n_sel * l' gathered sel slots. 16-bit inputs
accumulate in fp32 (``_acc``).

    attend_fixed         q (B, Hq, Dk), k (B, Hkv, S, Dk), v (B, Hkv, S, Dv), valid -> (out (B, Hq, Dv),
                         p (B, Hq, S)): the masked softmax every torch branch ends in
    win_torch            the window: W raw slots ending at t, gathered from the paged cache
                         (replaced by Triton ``decode_win`` / ``decode_sel_win`` or FA-2 ``win_call``)
    cmp_width, cmp_keys, cmp_torch
                         the Tc compressed slots the step reads, gathered, attended -> (o_cmp, p_cmp)
                         (cmp_torch is replaced by FA-2 ``cmp_call`` with its lse)
    scores_fp32, cmp_probs_from_lse
                         the scoring pass after FA-2's cmp call: p_cmp (B, Hq, Tc) = exp(scale q.k - lse)
    selection_band, block_scores_banded
                         overlap-weighted block scores (B, Hkv, n_sel blocks) from p_cmp, the band of
                         ``masks.selection_weights`` as a gather (with ``selection.top_blocks``,
                         replaced by Triton ``decode_select``, which also replaces cmp_probs_from_lse)
    sel_gather, sel_call the K token slots of the selected blocks gathered from the paged raw cache,
                         and the FA-2 kvcache call over them (replaced by Triton ``decode_sel``,
                         which reads the blocks in place)
"""
from __future__ import annotations

import torch

from nsa_ref import selection
from nsa_ref.config import NSAConfig
from nsa_ref.kv_cache import PagedView


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit inputs, else the input's."""
    return selection.score_dtype(dtype)


def attend_fixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, Dk), k (B, Hkv, S, Dk), v (B, Hkv, S, Dv), valid (B, Hkv or 1, S) bool ->
    (out (B, Hq, Dv) in q's dtype, p (B, Hq, S) in the accumulation dtype). Masked entries of k
    and v must be finite (``PagedView.gather`` gives exact zeros). Rows with no visible key: 0."""
    B, Hq, Dk = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = _acc(q.dtype)
    qg = q.reshape(B, Hkv, Hq // Hkv, Dk).to(acc)
    scores = torch.matmul(qg, k.to(acc).transpose(-1, -2)) * scale  # (B, Hkv, G, S)
    hidden = ~valid[:, :, None, :]  # a row with nothing visible: softmax NaN -> masked to 0
    p = torch.softmax(scores.masked_fill(hidden, -torch.inf), dim=-1).masked_fill(hidden, 0.0)
    out = torch.matmul(p, v.to(acc))  # (B, Hkv, G, Dv)
    return out.reshape(B, Hq, v.shape[-1]).to(q.dtype), p.reshape(B, Hq, S)


def _arange_b(view: PagedView, dims: int) -> torch.Tensor:
    B = view.block_table.shape[0]
    return torch.arange(B, device=view.block_table.device).reshape(B, *([1] * dims))


def win_torch(q: torch.Tensor, t: torch.Tensor, raw: PagedView, cfg: NSAConfig) -> torch.Tensor:
    """q (B, Hq, Dk) at positions t (B,) int64 -> o_win (B, Hq, Dv): a fixed min(w, capacity)
    slots ending at t, those before position 0 masked (``masks.win_visible``)."""
    width = min(cfg.window, raw.capacity)
    s = t[:, None] - width + 1 + torch.arange(width, device=q.device)  # (B, W)
    valid = s >= 0
    k, v = raw.gather(_arange_b(raw, 1), s, valid)  # (B, W, Hkv, D)
    return attend_fixed(q, k.transpose(1, 2), v.transpose(1, 2), valid[:, None, :],
                        cfg.softmax_scale(q.shape[-1]))[0]


def cmp_width(raw: PagedView, cmp: PagedView, cfg: NSAConfig) -> int:
    """Compressed slots the step reads: what the capacity can ever emit (static)."""
    return min(cmp.capacity, cfg.num_cmp_blocks(raw.capacity))


def cmp_keys(cmp: PagedView, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (k (B, Hkv, Tc, Dk), v (B, Hkv, Tc, Dv), emitted (B, Tc) bool) over ``width`` slots;
    slots not emitted yet are exact zeros."""
    i = torch.arange(width, device=cmp.k_pages.device)
    emitted = i[None, :] < cmp.cache_seqlens[:, None]
    k, v = cmp.gather(_arange_b(cmp, 1), i[None, :], emitted)  # (B, Tc, Hkv, D)
    return k.transpose(1, 2), v.transpose(1, 2), emitted


def cmp_torch(q: torch.Tensor, cmp: PagedView, width: int, cfg: NSAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (o_cmp (B, Hq, Dv), p_cmp (B, Hq, Tc) fp32 for 16-bit inputs): with one query per
    sequence every emitted block is visible (``masks.cmp_block_visible`` at t = length - 1)."""
    k, v, emitted = cmp_keys(cmp, width)
    return attend_fixed(q, k, v, emitted[:, None, :], cfg.softmax_scale(q.shape[-1]))


_OUT_DTYPE_BMM = [True]  # torch.bmm(..., out_dtype=fp32) on CUDA 16-bit inputs; False once refused


def scores_fp32(qg: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """qg (B, Hkv, G, D), k (B, Tc, Hkv, D) (a page pool read in place) -> q.k (B, Hkv, G, Tc) in
    the accumulation dtype. On CUDA with 16-bit inputs: one bmm per KV head over k's strided
    view, accumulated and written in fp32 (``out_dtype``), so k is neither copied nor upcast;
    elsewhere (or where torch refuses ``out_dtype``) both are upcast first."""
    acc = _acc(qg.dtype)
    if acc != qg.dtype and qg.is_cuda and _OUT_DTYPE_BMM[0]:
        try:
            return torch.stack([torch.bmm(qg[:, h], k[:, :, h].transpose(1, 2), out_dtype=acc)
                                for h in range(k.shape[2])], dim=1)
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_BMM[0] = False
    return torch.matmul(qg.to(acc), k.to(acc).permute(0, 2, 3, 1))


def cmp_probs_from_lse(q: torch.Tensor, lse: torch.Tensor, cmp: PagedView, width: int, cfg: NSAConfig) -> torch.Tensor:
    """The scoring pass after an FA-2 cmp call: p = exp(scale * q.k_cmp - lse) over the emitted
    slots, 0 elsewhere (and where lse is FA-2's +inf of an empty row), in the accumulation dtype.
    q (B, Hq, Dk), lse (B, Hq) fp32 -> p (B, Hq, Tc). The elementwise steps run in place."""
    B, Hq, Dk = q.shape
    acc = _acc(q.dtype)
    if cmp.dense:  # the pool is (B, Tc_pool, Hkv, D): read it in place, mask afterwards
        i = torch.arange(width, device=q.device)
        emitted = i[None, :] < cmp.cache_seqlens[:, None]
        k = cmp.k_pages[:, :width]
    else:
        k, _, emitted = cmp_keys(cmp, width)
        k = k.transpose(1, 2)
    Hkv = k.shape[2]
    s = scores_fp32(q.reshape(B, Hkv, Hq // Hkv, Dk), k)  # (B, Hkv, G, Tc)
    s.mul_(cfg.softmax_scale(Dk)).sub_(lse.to(acc).reshape(B, Hkv, Hq // Hkv, 1)).exp_()
    return s.masked_fill_(~emitted[:, None, None, :], 0.0).reshape(B, Hq, width)  # also NaN of unwritten slots


_bands: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def selection_band(num_cmp: int, num_sel: int, cfg: NSAConfig, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The nonzero band of ``masks.selection_weights`` -> (idx (num_sel, taps) int64 into the
    compressed blocks, num_cmp for padding; w (num_sel, taps) the overlap weights, 0 for padding).
    Selection block j overlaps the compressed blocks i with i*d < (j+1)*l' and i*d + l > j*l'.
    Built on the host once per geometry and kept on the device (memoised)."""
    key = (num_cmp, num_sel, cfg.block_len, cfg.block_stride, cfg.sel_block, dtype, str(device))
    band = _bands.get(key)
    if band is None:
        l, d, lp = cfg.block_len, cfg.block_stride, cfg.sel_block
        j = torch.arange(num_sel)
        lo_i = torch.div(j * lp - l, d, rounding_mode="floor").add(1).clamp_min(0)
        hi_i = torch.div((j + 1) * lp - 1, d, rounding_mode="floor")
        taps = max((((jj + 1) * lp - 1) // d - max(0, (jj * lp - l) // d + 1) + 1 for jj in range(num_sel)), default=0)
        idx = lo_i[:, None] + torch.arange(taps)
        ok = (idx <= hi_i[:, None]) & (idx < num_cmp)
        lo = torch.maximum(idx * d, j[:, None] * lp)
        hi = torch.minimum(idx * d + l, (j[:, None] + 1) * lp)
        w = torch.where(ok, (hi - lo).clamp(min=0).to(dtype) / d, torch.zeros((), dtype=dtype))
        band = (torch.where(ok, idx, num_cmp).to(device), w.to(device))
        _bands[key] = band
    return band


def block_scores_banded(p_cmp: torch.Tensor, n_kv_heads: int, num_sel: int, cfg: NSAConfig) -> torch.Tensor:
    """p_cmp (B, Hq, Tc) -> p_slc (B, Hkv, num_sel): ``selection.block_scores`` (overlap weights,
    sum over the G query heads of a KV head) with only the band's few taps per block instead of a
    (Tc, num_sel) matmul."""
    B, Hq, Tc = p_cmp.shape
    idx, w = selection_band(Tc, num_sel, cfg, p_cmp.dtype, p_cmp.device)
    per_kv = p_cmp.reshape(B, n_kv_heads, Hq // n_kv_heads, Tc).sum(dim=2)
    padded = torch.nn.functional.pad(per_kv, (0, 1))  # column Tc: the padding taps read 0
    taps = padded[..., idx.reshape(-1)].reshape(B, n_kv_heads, *idx.shape)
    return (taps * w).sum(-1)


def sel_gather(t: torch.Tensor, block_idx: torch.Tensor, raw: PagedView, cfg: NSAConfig
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t (B,), block_idx (B, Hkv, n_sel) int32 -> (k (B, Hkv, K, Dk), v (B, Hkv, K, Dv), valid
    (B, Hkv, K) bool), K = n_sel * l': the token slots of the selected blocks read from the paged
    raw cache, -1 entries and s > t masked (``masks.causal_visible``), masked slots exact zeros.

    The visible slots are a prefix of the K: blocks are sorted with the -1 padding last
    (``selection.top_blocks``), and only the current block c = t // l', the largest candidate, holds
    tokens s > t."""
    B, Hkv, n_sel = block_idx.shape
    lp = cfg.sel_block
    dev = block_idx.device
    s = block_idx.long()[..., None] * lp + torch.arange(lp, device=dev)  # (B, Hkv, n_sel, l')
    valid = (block_idx >= 0)[..., None] & (s <= t[:, None, None, None])
    s, valid = s.reshape(B, Hkv, n_sel * lp), valid.reshape(B, Hkv, n_sel * lp)
    head = torch.arange(Hkv, device=dev)[None, :, None]
    k, v = raw.gather(_arange_b(raw, 2), s, valid, head)  # (B, Hkv, K, D)
    return k, v, valid


def sel_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, cfg: NSAConfig) -> dict:
    """The sel branch as one ``flash_attn_with_kvcache`` call over the gathered slots: batch =
    (sequence, KV head), its G query heads as one query row each, keys = the K gathered slots, of
    which the first ``valid.sum()`` are visible (a prefix, see ``sel_gather``) -> cache_seqlens.
    q (B, Hq, Dk), k (B, Hkv, K, Dk), v (B, Hkv, K, Dv), valid (B, Hkv, K) -> the call's kwargs."""
    B, Hq, Dk = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    return dict(q=q.reshape(B * Hkv, 1, Hq // Hkv, Dk), k_cache=k.reshape(B * Hkv, K, 1, Dk),
                v_cache=v.reshape(B * Hkv, K, 1, v.shape[-1]), cache_seqlens=valid.sum(-1, dtype=torch.int32).reshape(-1),
                block_table=None, softmax_scale=cfg.softmax_scale(Dk), causal=False, window_size=(-1, -1))
