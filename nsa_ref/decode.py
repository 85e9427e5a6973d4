"""``decode_step``: one NSA decode step over an ``NSAKVCache``, by backend name.

The cache is ``nsa_ref.kv_cache.NSAKVCache`` (raw and compressed K/V of B sequences, paged or
preallocated; build it with ``NSAKVCache.allocate`` / ``allocate_paged`` or
``NSAAttention.allocate_cache``). The steps themselves live in ``nsa_ref.decode_batched``
(``decode_step_batched``: the exact plain-torch reference) and ``nsa_ref.decode_fast``
(``decode_step_fast``: static shapes, FA-2 kvcache / Triton decode kernels where they can run).
This module only picks one of them from ``backend`` and refuses, before the cache changes, a
backend that cannot run. Both steps equal prefill at the same positions (fp64: ~1e-12).
"""
from __future__ import annotations

import torch

from nsa_ref import router
from nsa_ref.config import NSAConfig
from nsa_ref.decode_batched import check_step_inputs, decode_step_batched
from nsa_ref.decode_fast import decode_step_fast, resolve_kvcache, select_path
from nsa_ref.kv_cache import NSAKVCache

#: backend names ``decode_step`` takes (the same names as prefill's ``backend=``).
DECODE_BACKENDS = ("auto", "reference", "sdpa", "fa2", "triton")


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    cache: NSAKVCache,
    cfg: NSAConfig,
    backend: str = "auto",
    *,
    validate: str = "values",
) -> torch.Tensor:
    """q: (B, Hq, Dk), k: (B, Hkv, Dk), v: (B, Hkv, Dv), gates: (B, Hq, 3) -> (B, Hq, Dv);
    or n tokens per sequence: q (B, n, Hq, Dk), k (B, n, Hkv, Dk), v (B, n, Hkv, Dv),
    gates (B, n, Hq, 3) -> (B, n, Hq, Dv).

    Row b is the next token(s) of cached sequence b (at its own length S_b): appended to
    ``cache`` (compressed blocks that end among them are emitted with the cache's phi), then
    cmp / select / sel / win for those queries, gated (cmp, sel, win) as ``nsa_attention``.
    The result equals prefill at positions S_b .. S_b + n - 1. Inference only (no autograd).

    ============  ==================================================  ==============================
    backend       runs                                                refuses (before any write)
    ============  ==================================================  ==============================
    "auto"        ``decode_step_fast(fa2="auto", select="auto",       none (falls back per branch)
                  win="auto")``: the Triton decode kernels (win,
                  select, sel) where they can run, FA-2 kvcache
                  for cmp (and win without Triton), torch otherwise;
                  telemetry records each branch's path and reason
    "reference"   ``decode_step_batched``: exact plain torch          none
    "sdpa"        ``decode_step_fast(fa2=None, select="torch",        none
                  win="torch")``: the fast step's torch path (no
                  FA-2, no Triton)
    "fa2"         ``decode_step_fast(fa2="auto", select="torch",      ``router.FA2Unavailable``: no
                  win="fa2")``: win, cmp and sel on FA-2 kvcache      FA-2 kvcache kernel resolves
                                                                      or q is not on CUDA
    "triton"      ``decode_step_fast(fa2="auto", select="triton",     ``router.TritonUnavailable``:
                  win="triton")``                                    the Triton decode kernels
                                                                      cannot run (CPU without
                                                                      TRITON_INTERPRET=1)
    ============  ==================================================  ==============================

    With "fa2", a single FA-2 call outside the kvcache contract (e.g. fp32/fp64 inputs) still
    runs on torch, with the reason in telemetry, as ``decode_step_fast`` does. Multi-token steps
    (n > 1) run the reference whatever the backend (``decode_step_fast``'s rule).

    ``validate``: "values" (gates checked in [0, 1]: one device read) or "shapes" (no device
    read in the step), as in ``nsa_attention``. Every refusal (unknown backend: ValueError; a
    cache that is not an ``NSAKVCache``: TypeError; an unavailable backend; bad inputs; a full
    cache: ``KVCacheError``) is raised before the cache changes.
    """
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"decode_step: unknown backend {backend!r}; use one of {', '.join(DECODE_BACKENDS)}")
    if not isinstance(cache, NSAKVCache):
        raise TypeError(
            f"decode_step: cache must be an nsa_ref.NSAKVCache, got {type(cache).__name__}; build one with "
            "NSAKVCache.allocate(...) (or allocate_paged) or NSAAttention.allocate_cache(...)"
        )
    if backend == "reference":
        return decode_step_batched(q, k, v, gates, cache, cfg, validate=validate)
    if backend == "sdpa":
        return decode_step_fast(q, k, v, gates, cache, cfg, fa2=None, validate=validate, select="torch", win="torch")
    if backend == "auto":
        return decode_step_fast(q, k, v, gates, cache, cfg, fa2="auto", validate=validate, select="auto")
    # An explicit fast backend: the inputs' shapes first (its checks need a well-formed q), then
    # whether it can run at all; both before the step appends anything.
    q4 = check_step_inputs(q, k, v, gates, cache, cfg, "shapes", who="decode_step")[0]
    if backend == "fa2":
        _require_fa2(q4)
        return decode_step_fast(q, k, v, gates, cache, cfg, fa2="auto", validate=validate, select="torch", win="fa2")
    _require_triton(q4[:, -1], cache)
    return decode_step_fast(q, k, v, gates, cache, cfg, fa2="auto", validate=validate, select="triton", win="triton")


def _require_fa2(q: torch.Tensor) -> None:
    """Raise ``router.FA2Unavailable`` unless an FA-2 kvcache kernel resolves and q is on CUDA."""
    if q.device.type != "cuda":
        raise router.FA2Unavailable(
            f"backend='fa2' requested for decode but FA-2 needs CUDA tensors, q is on {q.device}; "
            "use backend='auto' or 'sdpa' here"
        )
    kernel, why = resolve_kvcache("auto")
    if kernel is None:
        raise router.FA2Unavailable(f"backend='fa2' requested for decode but FA-2's kvcache kernel cannot run: {why}")


def _require_triton(q: torch.Tensor, cache: NSAKVCache) -> None:
    """q: (B, Hq, Dk). Raise ``router.TritonUnavailable`` unless the Triton decode kernels
    (selection over the compressed pages, sel and win over the raw pages) can take q and the cache."""
    raw, cmp = cache.views()
    for branch, store in (("select", cmp), ("sel", raw), ("win", raw)):
        try:
            select_path("triton", q, store, branch)
        except RuntimeError as e:
            raise router.TritonUnavailable(f"backend='triton' requested for decode but it cannot run: {e}") from e
