"""The fast batched NSA decode step: static shapes, no host read after the append, FA-2 kvcache
for win and cmp where a provider has it.

    decode_step_fast(q, k_new, v_new, gates, cache, cfg, fa2="auto", validate="values", select="auto")
        checks (those of ``decode_step_batched``), appends, then ``decode_attend_fast``
    decode_attend_fast(q, gates, cache, cfg, fa2="auto", select="auto")
        the branches for the last token of every sequence: the part a CUDA graph captures

It computes what ``nsa_ref.decode_batched.decode_step_batched`` (the plain-torch reference, itself
equal to prefill) computes, for one new token per sequence; a multi-token step (speculative
decoding) goes to that reference. What makes it capturable in a CUDA graph at fixed B:

- Every width comes from the cache's CAPACITY (``PagedView.capacity``: max_pages * page_size;
  the compressed store's capacity), never from the current lengths: the window gathers a fixed
  w slots ending at the current position, cmp scores every compressed slot, selection ranks
  every selection block the capacity has, sel gathers n_sel * l' slots. Masks come from the
  device ``cache_seqlens``. Nothing calls ``.item()`` / ``.tolist()`` / ``nonzero`` (a test
  makes those raise during the step).
- The addresses are fixed: the pools are written in place by the append.

Per branch (telemetry records the path, "fa2", "triton" or "torch", and the reason, once per step):

    win  FA-2 ``flash_attn_with_kvcache`` with ``decode_kvcache_calls.win_call`` (causal, window
         (w - 1, 0)); else w gathered slots and a masked softmax (fp32 for 16-bit inputs)
    cmp  FA-2 with ``cmp_call`` and ``return_softmax_lse=True``, then a scoring pass
         p = exp(scale * q.k_cmp - lse) in fp32; else the masked softmax over the compressed
         slots (which gives p directly)
    select  Triton (``select="auto"`` where ``triton_kernels.decode_select.refusal`` finds nothing:
         CUDA sm80+, or the CPU interpreter in fp32/fp64): ONE launch of
         ``decode_select`` per step, grid (B, Hkv), from cmp's lse (FA-2) or its own lse pass
         (torch cmp path), lengths read on the device. Else torch: overlap-weighted block scores
         (``block_scores_banded``: the 1,2,2,2,1 band of ``masks.selection_weights`` as a
         gather, equal to ``selection.block_scores``), then ``selection.top_blocks`` (forced
         initial / local blocks, ties to the lower index). Both give the same blocks up to
         near-ties of the scores (fp32 summation order).
    sel  Triton (the same ``select`` choice, ``triton_kernels.decode_sel``): one launch, grid
         (B, Hkv), the selected blocks read straight from the paged raw cache (no gather). Else:
         the selected blocks' n_sel * l' token slots gathered from the paged raw cache (-1 and
         s > t masked; the visible ones are a prefix), then FA-2 kvcache over them with batch =
         (sequence, KV head) and cache_seqlens = the visible count (``sel_call``); else the
         masked softmax (fp32 for 16-bit inputs)

The FA-2 kvcache kernel: ``fa2="auto"`` takes ``nsa_ref.fa2.resolve_provider("auto")`` and its
``kvcache`` entry if it has one, else ``flash_attn.flash_attn_with_kvcache`` when that provider
is the flash_attn package (torch's built-in FA-2 has no kvcache entry: the torch path runs).
``fa2=None`` forces the torch path; a callable with ``flash_attn_with_kvcache``'s signature is
used as the kernel (tests pass an emulation). A call runs only where ``contracts.kvcache_reasons``
(meta mode) accepts it; the verdict is memoised per call geometry, so it costs nothing per step.
The append itself (``NSAKVCache.append``) runs on the host lists of the cache and is outside
the capturable part (Documentation/Architecture/Decode.md).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from nsa_ref import selection, telemetry
from nsa_ref.api import combine_branches
from nsa_ref.config import NSAConfig
from nsa_ref.decode_batched import check_step_inputs, decode_step_batched
from nsa_ref.decode_kvcache_calls import cmp_call, win_call
from nsa_ref.kv_cache import NSAKVCache, PagedView

WHO = "decode_step_fast"


# -- the FA-2 kvcache kernel ----------------------------------------------------------------------

@dataclass(frozen=True)
class KVCacheKernel:
    """A ``flash_attn_with_kvcache``-like callable, the provider name its contract is checked
    against, whether it needs CUDA tensors (the real kernel) or runs anywhere (an emulation), and
    whether its calls are checked against the FA-2 contract (an emulation in fp64 is not FA-2)."""

    fn: Callable[..., Any]
    name: str
    contract_provider: str = "flash_attn"
    cuda_only: bool = True
    check_contract: bool = True


def resolve_kvcache(fa2: Any = "auto") -> tuple[KVCacheKernel | None, str]:
    """fa2: "auto", a provider name, an ``nsa_ref.fa2`` provider, a ``KVCacheKernel``, a callable
    with ``flash_attn_with_kvcache``'s signature, or None -> (kernel or None, why not)."""
    if fa2 is None:
        return None, "fa2=None"
    if isinstance(fa2, KVCacheKernel):
        return fa2, ""
    if callable(fa2) and not hasattr(fa2, "contract_provider"):
        return KVCacheKernel(fa2, getattr(fa2, "__name__", "callable"), cuda_only=False), ""
    if isinstance(fa2, str):
        from nsa_ref.fa2 import resolve_provider

        provider = resolve_provider(fa2)
        if provider is None:
            return None, f"no FA-2 provider usable here ({fa2})"
    else:
        provider = fa2
    fn = getattr(provider, "kvcache", None)
    if fn is None and provider.name == "flash_attn":
        try:
            from flash_attn import flash_attn_with_kvcache as fn
        except ImportError as e:  # pragma: no cover - depends on the install
            return None, f"flash_attn has no flash_attn_with_kvcache ({e})"
    if fn is None:
        return None, f"provider {provider.name} has no kvcache entry"
    return KVCacheKernel(fn, provider.name, provider.contract_provider), ""


_verdicts: dict[tuple, tuple[str, ...]] = {}
_verdicts_lock = threading.Lock()


def _meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return x


def contract_verdict(call: dict, kernel: KVCacheKernel) -> tuple[str, ...]:
    """The rules ``contracts.kvcache_reasons`` (meta mode) finds broken by ``call`` -> () when legal.

    Memoised on the call's geometry (shapes, strides, dtypes, layout, flags, provider): checked
    once per cache and batch size, not per step."""
    key = (kernel.contract_provider,) + tuple(
        (name, tuple(v.shape), v.stride(), v.dtype, v.device.type) if isinstance(v, torch.Tensor)
        else (name, v if v is None or isinstance(v, (bool, int, float, str, tuple)) else type(v).__name__)
        for name, v in sorted(call.items())
    )
    verdict = _verdicts.get(key)
    if verdict is None:
        try:
            import contracts

            reasons = contracts.kvcache_reasons(**{k: _meta(v) for k, v in call.items()},
                                                provider=kernel.contract_provider)
            verdict = tuple(r.rule for r in reasons)
        except ImportError as e:  # the contracts package needs pydantic
            verdict = (f"contracts unavailable: {e}",)
        with _verdicts_lock:
            _verdicts[key] = verdict
    return verdict


def _usable(kernel: KVCacheKernel | None, why: str, call: dict) -> tuple[bool, str]:
    """-> (run the kernel?, telemetry reason)."""
    if kernel is None:
        return False, why
    if kernel.cuda_only and call["q"].device.type != "cuda":
        return False, f"{kernel.name} kvcache needs CUDA, q on {call['q'].device.type}"
    broken = contract_verdict(call, kernel) if kernel.check_contract else ()
    if broken:
        return False, "contract: " + ",".join(broken)
    return True, f"{kernel.name} flash_attn_with_kvcache"


# -- torch pieces (static shapes, no host reads) --------------------------------------------------

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


def cmp_splits(kernel: KVCacheKernel | None, programs: int, device: torch.device) -> int:
    """``num_splits`` of the cmp call: 2 where B * Hkv fills the GPU's SMs (FA-2's heuristic then
    takes 1 split; H200, B 64 x Hkv 4 over 4K compressed keys: 210 -> 142 us, decode_tune.py),
    else 0 (FA-2's heuristic, which splits by itself there)."""
    if kernel is None or kernel.name != "flash_attn" or device.type != "cuda":
        return 0
    from nsa_ref.triton_kernels.layout import sm_count

    return 2 if programs >= sm_count(device.index if device.index is not None else torch.cuda.current_device()) else 0


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


# -- the selection path ---------------------------------------------------------------------------

SELECT_MODES = ("auto", "triton", "torch")


_TRITON_DECODE = {"select": "decode_select", "sel": "decode_sel", "win": "decode_sel"}
_TRITON_FN = {"select": "decode_select", "sel": "decode_sel", "win": "decode_win"}
_triton_verdicts: dict[tuple, str | None] = {}


def select_path(select: str, q: torch.Tensor, store: PagedView, branch: str = "select") -> tuple[bool, str]:
    """select: "auto" (Triton where it can run), "triton" (Triton or RuntimeError), "torch" ->
    (run the Triton decode kernel of ``branch``?, telemetry reason). branch "select": the block
    selection (``triton_kernels.decode_select``, store = the compressed view); "sel": sel attention
    over the paged raw cache (``triton_kernels.decode_sel``, store = the raw view); "win": the
    window over the same (``decode_sel.decode_win``)."""
    if select not in SELECT_MODES:
        raise ValueError(f"select={select!r}: one of {SELECT_MODES}")
    if select == "torch":
        return False, "select='torch'"
    from nsa_ref.triton_kernels import interpreting, unavailable_reason

    # Memoised per geometry (the eager step pays the checks once, not per step).
    key = (branch, q.device, q.dtype, q.dim(), q.shape[-1], store.k_pages.dtype, store.k_pages.device,
           store.v_pages.shape[-1], interpreting())
    if key in _triton_verdicts:
        why = _triton_verdicts[key]
    else:
        why = _triton_refusal(branch, q, store, unavailable_reason)
        _triton_verdicts[key] = why
    if why is None:
        return True, f"triton {_TRITON_FN[branch]}"
    if select == "triton":
        raise RuntimeError(f"{branch}='triton': the Triton decode kernel {_TRITON_FN[branch]} cannot run here: {why}")
    return False, why


def _triton_refusal(branch: str, q: torch.Tensor, store: PagedView, unavailable_reason) -> str | None:
    """Why the Triton decode kernel of ``branch`` cannot take q and store (None: it can)."""
    why = unavailable_reason(q)  # before importing Triton: a CPU run without the interpreter never does
    if why is None:
        try:
            import importlib

            module = importlib.import_module(f"nsa_ref.triton_kernels.{_TRITON_DECODE[branch]}")
        except ImportError as e:  # pragma: no cover - depends on the install
            why = f"Triton does not import ({e})"
        else:
            why = module.refusal(q, store)
    return why


WIN_MODES = ("auto", "triton", "fa2", "torch")


def win_branch_fast(q: torch.Tensor, q1: torch.Tensor, raw: PagedView, cfg: NSAConfig,
                    kernel: KVCacheKernel | None, why: str, win: str = "auto") -> tuple[torch.Tensor, str, str]:
    """The window branch -> (o_win (B, Hq, Dv), path, telemetry reason). ``win``: "auto" (Triton
    ``decode_win`` where it runs, else FA-2 kvcache where usable, else torch), "triton" (or
    RuntimeError), "fa2" (FA-2 where usable, else torch), "torch".

    Why Triton first: FA-2's kvcache kernel packs the G query heads of a KV head into one tile
    only without a window (flash_api.cpp: ``seqlenq_ngroups_swapped`` needs window_size_left < 0);
    with the window each query head gets its own 64/128-row tile holding one query, and the H200
    profile shows the win call as the step's largest kernel (Decode.md)."""
    if win not in WIN_MODES:
        raise ValueError(f"win={win!r}: one of {WIN_MODES}")
    if win in ("auto", "triton"):
        run, reason = select_path(win, q, raw, "win")
        if run:
            from nsa_ref.triton_kernels.decode_sel import decode_win

            return decode_win(q, raw, raw.cache_seqlens, cfg), "triton", reason
        why_not_triton = reason
    else:
        why_not_triton = f"win={win!r}"
    if win != "torch":
        call = win_call(q1, raw, cfg)
        run, reason = _usable(kernel, why, call)
        if run:
            return kernel.fn(**call)[:, 0], "fa2", reason
        why_not_triton = f"{why_not_triton}; {reason}"
    return win_torch(q, raw.cache_seqlens.long() - 1, raw, cfg), "torch", why_not_triton


# -- the step -------------------------------------------------------------------------------------

@torch.no_grad()
def decode_attend_fast(q: torch.Tensor, gates: torch.Tensor, cache: NSAKVCache, cfg: NSAConfig, *,
                       fa2: Any = "auto", select: str = "auto", win: str = "auto") -> torch.Tensor:
    """q (B, Hq, Dk), gates (B, Hq, 3) -> (B, Hq, Dv): NSA for the last token of every sequence of
    ``cache`` (position cache_seqlens - 1; append first). Inputs are assumed checked
    (``decode_step_fast`` does it). Static shapes, no host read: capturable in a CUDA graph once
    the FA-2 verdicts are memoised (run it eagerly once first). ``select``: see ``select_path``;
    ``win``: see ``win_path``."""
    raw, cmp = cache.views()
    B, Hq, Dk = q.shape
    Hkv = raw.k_pages.shape[2]
    kernel, why = resolve_kvcache(fa2)
    q1 = q[:, None]  # (B, 1, Hq, Dk): FA-2's layout

    if win not in WIN_MODES:
        raise ValueError(f"win={win!r}: one of {WIN_MODES}")
    triton_win, win_reason = select_path(win, q, raw, "win") if win in ("auto", "triton") else (False, "")
    if not triton_win:  # FA-2 or torch now; the Triton window runs with sel below
        o_win, path, win_reason = win_branch_fast(q, q1, raw, cfg, kernel, why, win)
        telemetry.record("win", path, win_reason)

    width = cmp_width(raw, cmp, cfg)
    call = dict(cmp_call(q1, cmp, cfg, num_splits=cmp_splits(kernel, B * Hkv, q.device)), return_softmax_lse=True)
    run_cmp, cmp_reason = _usable(kernel, why, call) if width else (False, "no compressed slot")
    triton_select, select_reason = select_path(select, q, cmp)
    lse = None
    if run_cmp:
        out, lse = kernel.fn(**call)[:2]
        o_cmp = out[:, 0]
        lse = lse[..., 0]  # (B, Hq)
        p_cmp = None if triton_select else cmp_probs_from_lse(q, lse, cmp, width, cfg)
    else:
        o_cmp, p_cmp = cmp_torch(q, cmp, width, cfg)
    telemetry.record("cmp", "fa2" if run_cmp else "torch", cmp_reason)

    if triton_select:  # one launch; the kernel rebuilds p from lse (or its own lse pass)
        from nsa_ref.triton_kernels.decode_select import decode_select

        block_idx = decode_select(q, cmp, raw.cache_seqlens, cfg, width=width, lse=lse,
                                  num_sel=cfg.num_sel_blocks(raw.capacity))
        telemetry.record("select", "triton", select_reason)
    else:
        scores = block_scores_banded(p_cmp, Hkv, cfg.num_sel_blocks(raw.capacity), cfg)
        block_idx = selection.top_blocks(scores, raw.cache_seqlens.long() - 1, cfg)  # (B, Hkv, n_sel)
        telemetry.record("select", "torch", f"banded scores + top_blocks ({select_reason})")
    triton_sel, triton_sel_reason = select_path(select, q, raw, "sel")
    if triton_win:
        telemetry.record("win", "triton", win_reason)
    if triton_sel and triton_win:  # sel + win in one launch, the merge applies the gates
        from nsa_ref.triton_kernels.decode_sel import decode_sel_win

        telemetry.record("sel", "triton", triton_sel_reason)
        return decode_sel_win(q, raw, raw.cache_seqlens, block_idx, o_cmp.to(q.dtype), gates, cfg)
    if triton_win:
        from nsa_ref.triton_kernels.decode_sel import decode_win

        o_win = decode_win(q, raw, raw.cache_seqlens, cfg)
    if triton_sel:  # straight from the paged raw cache: no gather
        from nsa_ref.triton_kernels.decode_sel import decode_sel

        o_sel = decode_sel(q, raw, raw.cache_seqlens, block_idx, cfg)
        telemetry.record("sel", "triton", triton_sel_reason)
        return combine_branches(gates, o_cmp.to(q.dtype), o_sel, o_win.to(q.dtype))
    k_sel, v_sel, valid = sel_gather(raw.cache_seqlens.long() - 1, block_idx, raw, cfg)
    call = sel_call(q, k_sel, v_sel, valid, cfg)
    run_sel, sel_reason = _usable(kernel, why, call)
    if run_sel:
        o_sel = kernel.fn(**call).reshape(B, Hq, v_sel.shape[-1])
    else:
        o_sel = attend_fixed(q, k_sel, v_sel, valid, cfg.softmax_scale(Dk))[0]
    telemetry.record("sel", "fa2" if run_sel else "torch", sel_reason)
    return combine_branches(gates, o_cmp.to(q.dtype), o_sel, o_win.to(q.dtype))


@torch.no_grad()
def decode_step_fast(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, gates: torch.Tensor,
    cache: NSAKVCache, cfg: NSAConfig, *, fa2: Any = "auto", validate: str = "values", select: str = "auto",
    win: str = "auto",
) -> torch.Tensor:
    """``decode_step_batched``'s step and result, fast: q (B, Hq, Dk), k_new (B, Hkv, Dk), v_new
    (B, Hkv, Dv), gates (B, Hq, 3) -> (B, Hq, Dv) (or with an n axis; n > 1 runs the reference).

    The same checks and errors as ``decode_step_batched`` (``check_step_inputs``), raised before
    the cache changes; then the append, then ``decode_attend_fast``. ``fa2``: see
    ``resolve_kvcache``; ``select``: see ``select_path``; ``win``: see ``win_branch_fast``. ``validate="shapes"`` reads nothing from the device in the whole step
    ("values" reads the gates once)."""
    q4, k4, v4, g4, single = check_step_inputs(q, k_new, v_new, gates, cache, cfg, validate, who=WHO)
    if q4.shape[1] != 1:
        return decode_step_batched(q, k_new, v_new, gates, cache, cfg, validate="shapes")
    cache.append(k4, v4)  # the cache's own checks first; raises before writing
    out = decode_attend_fast(q4[:, 0], g4[:, 0], cache, cfg, fa2=fa2, select=select, win=win)
    return out if single else out[:, None]


# -- the append on the device, and the whole step in a CUDA graph ---------------------------------

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
    l, d = cache.cfg.block_len, cache.cfg.block_stride  # cfg.num_cmp_blocks, inlined (once per step and sequence)
    cache.cmp.set_host_lengths([0 if x < l else (x - l) // d + 1 for x in lengths])


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
