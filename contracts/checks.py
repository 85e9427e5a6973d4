"""Public checks: ``*_reasons`` return every failed rule, ``check_*`` raise FA2ContractError.

Meta mode (``strict=False``) reads only shape, dtype, stride and device, so it never syncs a device
and works on meta, CPU and CUDA tensors. ``strict=True`` also reads the index values (see
``strict.py``: one host copy, one device sync).

Arch rules need device capabilities: pass ``caps=DeviceCaps(8, 6)`` (or ``"sm86"``) to evaluate them
anywhere; with ``caps=None`` they are read from q's CUDA device, and for CPU/meta tensors they are
not evaluated.
"""
from __future__ import annotations

from typing import Any

from .caps import DeviceCaps
from .catalog import RULES
from .facts import CallFacts, dense_facts, kvcache_facts, settings_line, varlen_facts
from .reason import FA2ContractError, Reason
from .rules import PREDICATES
from .spec import ProviderSpec
from .strict import STRICT_PREDICATES, read_index_values

Caps = DeviceCaps | str | None
Provider = str | ProviderSpec


def _plan(kind: str):
    """(pre, post, strict) lists of (rule id, predicate) for one call kind, in catalog order."""
    pre, post, strict = [], [], []
    for rid, (fn, needs_shapes) in PREDICATES.items():
        if kind in RULES[rid].applies_to:
            (post if needs_shapes else pre).append((rid, fn))
    for rid, fn in STRICT_PREDICATES.items():
        if kind in RULES[rid].applies_to:
            strict.append((rid, fn))
    return tuple(pre), tuple(post), tuple(strict)


_PLANS = {kind: _plan(kind) for kind in ("dense", "varlen", "kvcache")}


def _reason(rid: str, message: str) -> Reason:
    rule = RULES[rid]
    return Reason(rule=rid, message=message, fix=rule.fix, kind=rule.kind)


def evaluate(c: CallFacts) -> list[Reason]:
    """Run every rule that applies to ``c``; the valid path builds no objects and formats nothing."""
    pre, post, strict = _PLANS[c.kind]
    found: list[tuple[str, str]] = []
    for rid, fn in pre:
        message = fn(c)
        if message is not None:
            found.append((rid, message))
    if c.rank_ok:
        for rid, fn in post:
            message = fn(c)
            if message is not None:
                found.append((rid, message))
    if c.strict:
        values = read_index_values(c, {rid for rid, _ in found})
        if values:
            for rid, fn in strict:
                message = fn(c, values)
                if message is not None:
                    found.append((rid, message))
    if not found:
        return []
    return [_reason(rid, message) for rid, message in found]


def dense_reasons(
    q, k, v, *, causal: bool = False, window_size: tuple[int, int] = (-1, -1),
    dropout_p: float = 0.0, softcap: float = 0.0, alibi_slopes=None,
    requires_grad: bool | None = None, return_softmax: bool = False, caps: Caps = None,
    provider: Provider = "flash_attn", strict: bool = False,
) -> list[Reason]:
    """q: (B, Sq, Hq, D), k: (B, Sk, Hkv, D), v: (B, Sk, Hkv, D) -> every failed rule ([] = legal).

    ``requires_grad=None`` infers it from q/k/v and grad mode (for the backward-only rules).
    ``return_softmax``: the caller asks for the attention probabilities (torch: return_debug_mask).
    Dense calls have no index values, so ``strict`` adds nothing.
    """
    # Positional: this call is on the hot path and keyword passing costs about a microsecond.
    c = dense_facts(
        q, k, v, causal, window_size, dropout_p, softcap, alibi_slopes, requires_grad,
        return_softmax, caps, provider, strict,
    )
    return evaluate(c)


def varlen_reasons(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
    seqused_k=None, block_table=None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0, softcap: float = 0.0,
    alibi_slopes=None, requires_grad: bool | None = None, return_softmax: bool = False,
    caps: Caps = None, provider: Provider = "flash_attn", strict: bool = False,
) -> list[Reason]:
    """q: (Tq, Hq, D), k/v: (Tk, Hkv, D) or paged (num_blocks, page, Hkv, D), cu_seqlens: (B+1,) int32 -> failed rules.

    ``seqused_k: (B,)`` int32 keys used per sequence; ``block_table: (B, pages_per_seq)`` int32
    makes k/v a paged cache. ``strict=True`` reads cu_seqlens / seqused_k / block_table values.
    """
    c = varlen_facts(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, block_table,
        causal, window_size, dropout_p, softcap, alibi_slopes, requires_grad, return_softmax,
        caps, provider, strict,
    )
    return evaluate(c)


def kvcache_reasons(
    q, k_cache, v_cache, *, k=None, v=None, cache_seqlens=None, block_table=None,
    cache_batch_idx=None, cache_leftpad=None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes=None,
    num_splits: int = 0, caps: Caps = None, provider: Provider = "flash_attn",
    strict: bool = False,
) -> list[Reason]:
    """q: (B, Sq, Hq, D), k_cache/v_cache: (B_c, S_c, Hkv, D) or paged (num_blocks, page, Hkv, D) -> failed rules.

    ``k, v: (B, S_new, Hkv, D)`` new tokens appended at ``cache_seqlens: (B,)`` int32 (or an int).
    ``strict=True`` reads cache_seqlens and block_table values (overflow, page range).
    """
    c = kvcache_facts(
        q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
        cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
        causal=causal, window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        num_splits=num_splits, caps=caps, provider=provider, strict=strict,
    )
    return evaluate(c)


def _raise(c: CallFacts, reasons: list[Reason], inputs: dict[str, Any]) -> None:
    raise FA2ContractError(
        reasons, call=f"FA-2 {c.kind} call", inputs=inputs, settings=settings_line(c)
    )


def check_dense(q, k, v, **kwargs) -> None:
    """Same arguments as ``dense_reasons``; raises FA2ContractError listing every reason."""
    reasons = dense_reasons(q, k, v, **kwargs)
    if reasons:
        c = dense_facts(q, k, v, **_facts_kwargs(dense_reasons, kwargs))
        _raise(c, reasons, {"q": q, "k": k, "v": v, "alibi_slopes": kwargs.get("alibi_slopes")})


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs) -> None:
    """Same arguments as ``varlen_reasons``; raises FA2ContractError listing every reason."""
    reasons = varlen_reasons(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)
    if reasons:
        c = varlen_facts(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            **_facts_kwargs(varlen_reasons, kwargs),
        )
        _raise(c, reasons, {
            "q": q, "k": k, "v": v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k,
            "seqused_k": kwargs.get("seqused_k"), "block_table": kwargs.get("block_table"),
            "alibi_slopes": kwargs.get("alibi_slopes"),
        })


def check_kvcache(q, k_cache, v_cache, **kwargs) -> None:
    """Same arguments as ``kvcache_reasons``; raises FA2ContractError listing every reason."""
    reasons = kvcache_reasons(q, k_cache, v_cache, **kwargs)
    if reasons:
        c = kvcache_facts(q, k_cache, v_cache, **_facts_kwargs(kvcache_reasons, kwargs))
        names = ("k", "v", "cache_seqlens", "block_table", "cache_batch_idx", "cache_leftpad", "alibi_slopes")
        _raise(c, reasons, {"q": q, "k_cache": k_cache, "v_cache": v_cache,
                            **{n: kwargs.get(n) for n in names}})


def _facts_kwargs(fn, kwargs: dict) -> dict:
    """The keyword defaults of ``fn`` updated by ``kwargs`` (for rebuilding facts on the error path)."""
    defaults = fn.__kwdefaults__ or {}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"{fn.__name__}() got unexpected keyword argument(s) {sorted(unknown)}")
    return {**defaults, **kwargs}
