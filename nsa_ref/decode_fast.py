"""The fast batched NSA decode step: static shapes, no host read after the append, FA-2 kvcache
for win and cmp where a provider has it, Triton decode kernels where they run. This module holds
the step and its path choices; the torch ops it falls back to are in ``nsa_ref.decode_torch_path``,
the device-side append and the whole step as one CUDA graph in ``nsa_ref.decode_graph``.

    decode_step_fast(q, k_new, v_new, gates, cache, cfg, fa2="auto", validate="values", select="auto",
                     win="auto")
        checks (those of ``decode_step_batched``), appends, then ``decode_attend_fast``
    decode_attend_fast(q, gates, cache, cfg, fa2="auto", select="auto", win="auto")
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

    win  (``win_branch_fast``; ``win="auto"``) Triton ``decode_sel.decode_win`` where it runs
         (one launch with sel, ``decode_sel_win``, when sel runs on Triton too); else FA-2
         ``flash_attn_with_kvcache`` with ``decode_kvcache_calls.win_call`` (causal, window
         (w - 1, 0)); else w gathered slots and a masked softmax (fp32 for 16-bit inputs,
         ``decode_torch_path.win_torch``)
    cmp  FA-2 with ``cmp_call`` and ``return_softmax_lse=True``, then a scoring pass
         p = exp(scale * q.k_cmp - lse) in fp32; else the masked softmax over the compressed
         slots (which gives p directly; ``decode_torch_path.cmp_torch``)
    select  Triton (``select="auto"`` where ``triton_kernels.decode_select.refusal`` finds nothing:
         CUDA sm80+, or the CPU interpreter in fp32/fp64): ONE launch of
         ``decode_select`` per step, grid (B, Hkv), from cmp's lse (FA-2) or its own lse pass
         (torch cmp path), lengths read on the device. Else torch: overlap-weighted block scores
         (``decode_torch_path.block_scores_banded``: the 1,2,2,2,1 band of
         ``masks.selection_weights`` as a gather, equal to ``selection.block_scores``), then
         ``selection.top_blocks`` (forced initial / local blocks, ties to the lower index). Both
         give the same blocks up to near-ties of the scores (fp32 summation order).
    sel  Triton (the same ``select`` choice, ``triton_kernels.decode_sel``): one launch, grid
         (B, Hkv), the selected blocks read straight from the paged raw cache (no gather). Else:
         the selected blocks' n_sel * l' token slots gathered from the paged raw cache (-1 and
         s > t masked; the visible ones are a prefix; ``decode_torch_path.sel_gather``), then
         FA-2 kvcache over them with batch = (sequence, KV head) and cache_seqlens = the visible
         count (``sel_call``); else the masked softmax (fp32 for 16-bit inputs)

The FA-2 kvcache kernel: ``fa2="auto"`` takes ``nsa_ref.fa2.resolve_provider("auto")`` and its
``kvcache`` entry if it has one, else ``flash_attn.flash_attn_with_kvcache`` when that provider
is the flash_attn package (torch's built-in FA-2 has no kvcache entry: the torch path runs).
``fa2=None`` forces the torch path; a callable with ``flash_attn_with_kvcache``'s signature is
used as the kernel (tests pass an emulation). A call runs only where ``contracts.kvcache_reasons``
(meta mode) accepts it; the verdict is memoised per call geometry, so it costs nothing per step.
The append of ``decode_step_fast`` (``NSAKVCache.append``) runs on the host lists of the cache
and is outside the capturable part; ``nsa_ref.decode_graph`` appends on the device
(``append_static``) and captures append + ``decode_attend_fast`` as one CUDA graph
(``CapturedDecodeStep``; Documentation/Architecture/Decode.md).
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
from nsa_ref.decode_torch_path import (
    attend_fixed,
    block_scores_banded,
    cmp_probs_from_lse,
    cmp_torch,
    cmp_width,
    sel_call,
    sel_gather,
    win_torch,
)
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


def cmp_splits(kernel: KVCacheKernel | None, programs: int, device: torch.device) -> int:
    """``num_splits`` of the cmp call: 2 where B * Hkv fills the GPU's SMs (FA-2's heuristic then
    takes 1 split; H200, B 64 x Hkv 4 over 4K compressed keys: 210 -> 142 us, decode_tune.py),
    else 0 (FA-2's heuristic, which splits by itself there)."""
    if kernel is None or kernel.name != "flash_attn" or device.type != "cuda":
        return 0
    from nsa_ref.triton_kernels.layout import sm_count

    return 2 if programs >= sm_count(device.index if device.index is not None else torch.cuda.current_device()) else 0


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
                    kernel: KVCacheKernel | None, why: str, win: str, triton_refused: str) -> tuple[torch.Tensor, str, str]:
    """The window branch where the Triton window does not run (``decode_attend_fast`` chose
    first, ``triton_refused`` says why) -> (o_win (B, Hq, Dv), path, telemetry reason): FA-2
    kvcache where usable (``win`` "auto" or "fa2"), else torch (``win="torch"`` goes straight there).

    ``win`` modes: "auto" (Triton ``decode_sel.decode_win`` where it runs, then FA-2, then torch),
    "triton" (or RuntimeError), "fa2", "torch". Why Triton first: FA-2's kvcache kernel packs the G
    query heads of a KV head into one tile only without a window (flash_api.cpp:
    ``seqlenq_ngroups_swapped`` needs window_size_left < 0); with the window each query head gets
    its own 64/128-row tile holding one query, and the H200 profile shows the win call as the
    step's largest kernel (Decode.md)."""
    reason = triton_refused
    if win != "torch":
        call = win_call(q1, raw, cfg)
        run, fa2_reason = _usable(kernel, why, call)
        if run:
            return kernel.fn(**call)[:, 0], "fa2", fa2_reason
        reason = f"{reason}; {fa2_reason}"
    return win_torch(q, raw.cache_seqlens.long() - 1, raw, cfg), "torch", reason


# -- the step -------------------------------------------------------------------------------------

@torch.no_grad()
def decode_attend_fast(q: torch.Tensor, gates: torch.Tensor, cache: NSAKVCache, cfg: NSAConfig, *,
                       fa2: Any = "auto", select: str = "auto", win: str = "auto") -> torch.Tensor:
    """q (B, Hq, Dk), gates (B, Hq, 3) -> (B, Hq, Dv): NSA for the last token of every sequence of
    ``cache`` (position cache_seqlens - 1; append first). Inputs are assumed checked
    (``decode_step_fast`` does it). Static shapes, no host read: capturable in a CUDA graph once
    the FA-2 verdicts are memoised (run it eagerly once first). ``select``: see ``select_path``;
    ``win``: see ``win_branch_fast``."""
    raw, cmp = cache.views()
    B, Hq, Dk = q.shape
    Hkv = raw.k_pages.shape[2]
    kernel, why = resolve_kvcache(fa2)
    q1 = q[:, None]  # (B, 1, Hq, Dk): FA-2's layout

    if win not in WIN_MODES:
        raise ValueError(f"win={win!r}: one of {WIN_MODES}")
    triton_win, win_reason = select_path(win, q, raw, "win") if win in ("auto", "triton") else (False, f"win={win!r}")
    if not triton_win:  # FA-2 or torch now; the Triton window runs with sel below
        o_win, path, win_reason = win_branch_fast(q, q1, raw, cfg, kernel, why, win, win_reason)
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
