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
from .fast import FAST
from .facts import CallFacts, dense_facts, kvcache_facts, settings_line, varlen_facts
from .reason import FA2ContractError, Reason
from .rules import PREDICATES
from .spec import ProviderSpec
from .strict import STRICT_PREDICATES, read_index_values

Caps = DeviceCaps | str | None
Provider = str | ProviderSpec


def _plan(kind: str):
    """(pre, post, backward, strict, fast, rest) for one call kind; lists of (rule id, predicate) in
    catalog order.

    pre: forward rules that read no shapes; post: forward rules that do (run when FA2-RANK holds);
    backward: phase-backward rules (need shapes); strict: the value rules. fast: the kind's fused
    test (``fast.py``) or None; rest: the forward meta rules it does not decide (run after a True).
    """
    pre, post, backward, strict = [], [], [], []
    for rid, (fn, needs_shapes) in PREDICATES.items():
        rule = RULES[rid]
        if kind not in rule.applies_to:
            continue
        if rule.phase == "backward":
            backward.append((rid, fn))
        else:
            (post if needs_shapes else pre).append((rid, fn))
    for rid, fn in STRICT_PREDICATES.items():
        if kind in RULES[rid].applies_to:
            strict.append((rid, fn))
    fast, covers = FAST.get(kind, (None, frozenset()))
    rest = tuple((rid, fn) for rid, fn in pre + post if rid not in covers)
    return tuple(pre), tuple(post), tuple(backward), tuple(strict), fast, rest


_PLANS = {kind: _plan(kind) for kind in ("dense", "varlen", "kvcache")}


def _reason(rid: str, message: str) -> Reason:
    rule = RULES[rid]
    return Reason(rule=rid, message=message, fix=rule.fix, kind=rule.kind)


def evaluate(c: CallFacts) -> list[Reason]:
    """Run every rule that applies to ``c`` (backward rules when ``c.backward``); the valid path
    builds no objects and formats nothing."""
    pre, post, backward, strict, fast, rest = _PLANS[c.kind]
    found: list[tuple[str, str]] = []
    if fast is not None and fast(c):  # every rule the fused test covers holds (rank_ok among them)
        for rid, fn in rest:
            message = fn(c)
            if message is not None:
                found.append((rid, message))
    else:
        for rid, fn in pre:
            message = fn(c)
            if message is not None:
                found.append((rid, message))
        if c.rank_ok:
            for rid, fn in post:
                message = fn(c)
                if message is not None:
                    found.append((rid, message))
    if c.rank_ok:
        if c.backward:
            for rid, fn in backward:
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


def split_by_phase(reasons: list[Reason]) -> tuple[list[Reason], list[Reason]]:
    """(forward reasons, backward reasons) of one evaluation."""
    forward = [r for r in reasons if RULES[r.rule].phase == "forward"]
    return forward, [r for r in reasons if RULES[r.rule].phase == "backward"]


def _backward_arg(backward, requires_grad):
    """``backward`` wins; ``requires_grad`` is its old name."""
    return requires_grad if backward is None else backward


def dense_reasons(
    q, k, v, *, causal: bool = False, window_size: tuple[int, int] = (-1, -1),
    dropout_p: float = 0.0, softmax_scale: float | None = None, softcap: float = 0.0,
    alibi_slopes=None, deterministic: bool = False, return_softmax: bool = False,
    backward: bool | None = None, requires_grad: bool | None = None, caps: Caps = None,
    provider: Provider = "flash_attn", strict: bool = False,
) -> list[Reason]:
    """q: (B, Sq, Hq, D), k: (B, Sk, Hkv, D), v: (B, Sk, Hkv, D) -> every failed rule ([] = legal).

    ``backward``: True checks the backward rules too (a training step), False only the forward
    ones, None (default) checks them when autograd will record the call (grad mode on and q, k
    or v requiring grad). ``requires_grad`` is the old name of ``backward``.
    ``return_softmax``: the caller asks for the attention probabilities (flash_attn's
    return_attn_probs, torch's return_debug_mask). ``deterministic`` changes only the backward's
    accumulation and has no rule. Dense calls have no index values, so ``strict`` adds nothing.
    """
    # Positional: this call is on the hot path and keyword passing costs about a microsecond.
    c = dense_facts(
        q, k, v, causal, window_size, dropout_p, softcap, alibi_slopes,
        requires_grad if backward is None else backward, return_softmax, caps, provider, strict,
        softmax_scale,
    )
    return evaluate(c)


def qkvpacked_reasons(
    qkv, *, causal: bool = False, window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
    softmax_scale: float | None = None, softcap: float = 0.0, alibi_slopes=None,
    deterministic: bool = False, return_softmax: bool = False, backward: bool | None = None,
    requires_grad: bool | None = None, caps: Caps = None, provider: Provider = "flash_attn",
    strict: bool = False,
) -> list[Reason]:
    """qkv: (B, S, 3, H, D) (flash_attn_qkvpacked_func) -> failed rules; keywords as ``dense_reasons``."""
    return evaluate(dense_facts(
        qkv, qkv, qkv, causal, window_size, dropout_p, softcap, alibi_slopes,
        requires_grad if backward is None else backward, return_softmax, caps, provider, strict,
        softmax_scale, "qkv",
    ))


def kvpacked_reasons(
    q, kv, *, causal: bool = False, window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
    softmax_scale: float | None = None, softcap: float = 0.0, alibi_slopes=None,
    deterministic: bool = False, return_softmax: bool = False, backward: bool | None = None,
    requires_grad: bool | None = None, caps: Caps = None, provider: Provider = "flash_attn",
    strict: bool = False,
) -> list[Reason]:
    """q: (B, Sq, H, D), kv: (B, Sk, 2, Hkv, D) (flash_attn_kvpacked_func) -> failed rules; keywords as ``dense_reasons``."""
    return evaluate(dense_facts(
        q, kv, kv, causal, window_size, dropout_p, softcap, alibi_slopes,
        requires_grad if backward is None else backward, return_softmax, caps, provider, strict,
        softmax_scale, "kv",
    ))


def _dense_packed_facts(first, kv, packed, kwargs) -> CallFacts:
    a = _facts_kwargs(qkvpacked_reasons, kwargs)
    k = first if kv is None else kv
    return dense_facts(
        first, k, k, a["causal"], a["window_size"], a["dropout_p"], a["softcap"], a["alibi_slopes"],
        _backward_arg(a["backward"], a["requires_grad"]), a["return_softmax"], a["caps"], a["provider"],
        a["strict"], a["softmax_scale"], packed,
    )


def varlen_reasons(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
    seqused_k=None, block_table=None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0,
    softmax_scale: float | None = None, softcap: float = 0.0, alibi_slopes=None,
    deterministic: bool = False, return_softmax: bool = False, backward: bool | None = None,
    requires_grad: bool | None = None, caps: Caps = None, provider: Provider = "flash_attn",
    strict: bool = False,
) -> list[Reason]:
    """q: (Tq, Hq, D), k/v: (Tk, Hkv, D) or paged (num_blocks, page, Hkv, D), cu_seqlens: (B+1,) int32 -> failed rules.

    ``seqused_k: (B,)`` int32 keys used per sequence; ``block_table: (B, pages_per_seq)`` int32
    makes k/v a paged cache. ``strict=True`` reads cu_seqlens / seqused_k / block_table values.
    ``backward``: as in ``dense_reasons``.
    """
    c = varlen_facts(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, block_table,
        causal, window_size, dropout_p, softcap, alibi_slopes,
        requires_grad if backward is None else backward, return_softmax, caps, provider, strict,
        softmax_scale,
    )
    return evaluate(c)


def varlen_qkvpacked_reasons(
    qkv, cu_seqlens, max_seqlen: int, *, causal: bool = False, window_size: tuple[int, int] = (-1, -1),
    dropout_p: float = 0.0, softmax_scale: float | None = None, softcap: float = 0.0, alibi_slopes=None,
    deterministic: bool = False, return_softmax: bool = False, backward: bool | None = None,
    requires_grad: bool | None = None, caps: Caps = None, provider: Provider = "flash_attn",
    strict: bool = False,
) -> list[Reason]:
    """qkv: (T, 3, H, D), cu_seqlens: (B+1,) int32 (flash_attn_varlen_qkvpacked_func) -> failed rules.

    Keywords as ``varlen_reasons`` (no seqused_k / block_table: the packed form has none).
    """
    return evaluate(varlen_facts(
        qkv, qkv, qkv, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, None, None, causal, window_size,
        dropout_p, softcap, alibi_slopes, requires_grad if backward is None else backward, return_softmax,
        caps, provider, strict, softmax_scale, "qkv",
    ))


def varlen_kvpacked_reasons(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0, softmax_scale: float | None = None,
    softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False, return_softmax: bool = False,
    backward: bool | None = None, requires_grad: bool | None = None, caps: Caps = None,
    provider: Provider = "flash_attn", strict: bool = False,
) -> list[Reason]:
    """q: (Tq, H, D), kv: (Tk, 2, Hkv, D) (flash_attn_varlen_kvpacked_func) -> failed rules; keywords as ``varlen_reasons``."""
    return evaluate(varlen_facts(
        q, kv, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, None, causal, window_size,
        dropout_p, softcap, alibi_slopes, requires_grad if backward is None else backward, return_softmax,
        caps, provider, strict, softmax_scale, "kv",
    ))


def _varlen_packed_facts(first, kv, cu_q, cu_k, max_q, max_k, packed, kwargs) -> CallFacts:
    a = _facts_kwargs(varlen_kvpacked_reasons, kwargs)
    k = first if kv is None else kv
    return varlen_facts(
        first, k, k, cu_q, cu_k, max_q, max_k, None, None, a["causal"],
        a["window_size"], a["dropout_p"], a["softcap"], a["alibi_slopes"],
        _backward_arg(a["backward"], a["requires_grad"]), a["return_softmax"], a["caps"],
        a["provider"], a["strict"], a["softmax_scale"], packed,
    )


def kvcache_reasons(
    q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, *, cache_seqlens=None,
    cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale: float | None = None,
    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
    rotary_interleaved: bool = True, alibi_slopes=None, num_splits: int = 0,
    return_softmax_lse: bool = False, caps: Caps = None, provider: Provider = "flash_attn",
    strict: bool = False,
) -> list[Reason]:
    """q: (B, Sq, Hq, D), k_cache/v_cache: (B_c, S_c, Hkv, D) or paged (num_blocks, page, Hkv, D) -> failed rules.

    ``k, v: (B, S_new, Hkv, D)`` new tokens appended at ``cache_seqlens: (B,)`` int32 (or an int),
    rotated by ``rotary_cos``/``rotary_sin: (seqlen_ro, rotary_dim / 2)`` (``rotary_interleaved``
    picks the pairs; no rule). Forward only: flash_attn_with_kvcache has no backward.
    ``strict=True`` reads cache_seqlens and block_table values (overflow, page range).
    """
    c = kvcache_facts(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
        cache_leftpad, block_table, softmax_scale, causal, window_size, softcap, alibi_slopes,
        num_splits, return_softmax_lse, caps, provider, strict,
    )
    return evaluate(c)


def _raise(c: CallFacts, reasons: list[Reason], inputs: dict[str, Any], call: str | None = None) -> None:
    raise FA2ContractError(
        reasons, call=call or f"FA-2 {c.kind} call", inputs=inputs, settings=settings_line(c)
    )


def facts_inputs(c: CallFacts) -> dict[str, Any]:
    """The main arguments (tensors or not) and every other tensor argument of ``c`` by name, for the error's table."""
    inputs = {c.q_name: c.q, c.k_name: c.k, c.v_name: c.v}
    inputs.update(c.tensors())
    return inputs


def raise_for(c: CallFacts, reasons: list[Reason], call: str | None = None) -> None:
    """Raise FA2ContractError for ``reasons`` of ``c`` when there are any."""
    if reasons:
        _raise(c, reasons, facts_inputs(c), call)


def check_dense(q, k, v, **kwargs) -> None:
    """Same arguments as ``dense_reasons``; raises FA2ContractError listing every reason."""
    reasons = dense_reasons(q, k, v, **kwargs)
    if reasons:
        a = _facts_kwargs(dense_reasons, kwargs)
        c = dense_facts(q, k, v, a["causal"], a["window_size"], a["dropout_p"], a["softcap"],
                        a["alibi_slopes"], _backward_arg(a["backward"], a["requires_grad"]),
                        a["return_softmax"], a["caps"], a["provider"], a["strict"], a["softmax_scale"])
        raise_for(c, reasons)


def check_qkvpacked(qkv, **kwargs) -> None:
    """Same arguments as ``qkvpacked_reasons``; raises FA2ContractError listing every reason."""
    c = _dense_packed_facts(qkv, None, "qkv", kwargs)
    raise_for(c, evaluate(c), "FA-2 qkvpacked call")


def check_kvpacked(q, kv, **kwargs) -> None:
    """Same arguments as ``kvpacked_reasons``; raises FA2ContractError listing every reason."""
    c = _dense_packed_facts(q, kv, "kv", kwargs)
    raise_for(c, evaluate(c), "FA-2 kvpacked call")


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs) -> None:
    """Same arguments as ``varlen_reasons``; raises FA2ContractError listing every reason."""
    reasons = varlen_reasons(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)
    if reasons:
        a = _facts_kwargs(varlen_reasons, kwargs)
        c = varlen_facts(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, a["seqused_k"],
            a["block_table"], a["causal"], a["window_size"], a["dropout_p"], a["softcap"],
            a["alibi_slopes"], _backward_arg(a["backward"], a["requires_grad"]), a["return_softmax"],
            a["caps"], a["provider"], a["strict"], a["softmax_scale"],
        )
        raise_for(c, reasons)


def check_varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, **kwargs) -> None:
    """Same arguments as ``varlen_qkvpacked_reasons``; raises FA2ContractError listing every reason."""
    c = _varlen_packed_facts(qkv, None, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, "qkv", kwargs)
    raise_for(c, evaluate(c), "FA-2 varlen qkvpacked call")


def check_varlen_kvpacked(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs) -> None:
    """Same arguments as ``varlen_kvpacked_reasons``; raises FA2ContractError listing every reason."""
    c = _varlen_packed_facts(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "kv", kwargs)
    raise_for(c, evaluate(c), "FA-2 varlen kvpacked call")


def check_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, **kwargs) -> None:
    """Same arguments as ``kvcache_reasons``; raises FA2ContractError listing every reason."""
    reasons = kvcache_reasons(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, **kwargs)
    if reasons:
        a = _facts_kwargs(kvcache_reasons, kwargs)
        c = kvcache_facts(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, a["cache_seqlens"], a["cache_batch_idx"],
            a["cache_leftpad"], a["block_table"], a["softmax_scale"], a["causal"], a["window_size"],
            a["softcap"], a["alibi_slopes"], a["num_splits"], a["return_softmax_lse"], a["caps"],
            a["provider"], a["strict"],
        )
        raise_for(c, reasons)


def _facts_kwargs(fn, kwargs: dict) -> dict:
    """The keyword defaults of ``fn`` updated by ``kwargs`` (for building facts from keywords)."""
    defaults = fn.__kwdefaults__ or {}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"{fn.__name__}() got unexpected keyword argument(s) {sorted(unknown)}")
    return {**defaults, **kwargs}
