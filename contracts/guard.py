"""``guarded(fn, kind)``: run the contract before a FA-2 callable, and never call it on bad input.

Mode, read at every call by ``contract_mode()`` from ``NSA_FA2_CONTRACTS`` (an explicit
``mode=`` given to ``guarded`` wins):
  - ``off``: call through, no checks;
  - ``meta`` (default): the metadata rules (no device sync);
  - ``strict``: also read the index values (one host copy, one device sync per call).

Forward rules are checked before ``fn`` runs. Backward rules (``Rule.phase == "backward"``) are
checked too when autograd records the call; if one fails, the forward still runs and a pre-hook on
the output's ``grad_fn`` raises the FA2ContractError when backward starts, before the backward
kernel. A forward-only call is never refused for a backward rule.

Kinds and the signatures they map (positional and keyword arguments; the flash_attn kinds use the
positions of the provider's release, ``contracts.versions.signature``; shown here for 2.8):
  - ``dense``: flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
    alibi_slopes, deterministic, return_attn_probs)
  - ``varlen``: flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
    deterministic, return_attn_probs, block_table); a ``seqused_k=`` keyword is checked too
  - ``qkvpacked``: flash_attn_qkvpacked_func(qkv, dropout_p, softmax_scale, causal, window_size,
    softcap, alibi_slopes, deterministic, return_attn_probs)
  - ``kvpacked``: flash_attn_kvpacked_func(q, kv, dropout_p, ...) (the rest as qkvpacked)
  - ``varlen_qkvpacked``: flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p, ...)
  - ``varlen_kvpacked``: flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k, dropout_p, ...)
  - ``kvcache``: flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin,
    cache_seqlens, cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
    window_size, softcap, rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse)
  - ``aten``: torch.ops.aten._flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k,
    max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale, window_size_left,
    window_size_right, seqused_k, alibi_slopes, block_table, num_splits); dense when cum_seq_q
    and cum_seq_k are None, varlen otherwise; provider "torch".
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

from . import versions
from .caps import DeviceCaps
from .checks import evaluate, facts_inputs, raise_for, split_by_phase
from .facts import CallFacts, dense_facts, kvcache_facts, settings_line, varlen_facts
from .reason import FA2ContractError
from .spec import ProviderSpec, spec_for

ENV_VAR = "NSA_FA2_CONTRACTS"
MODES = ("off", "meta", "strict")
DEFAULT_MODE = "meta"
KINDS = (*versions.ENTRY_POINTS, "aten")


def _parse_mode(raw: str, origin: str) -> str:
    mode = raw.strip().lower()
    if mode not in MODES:
        raise ValueError(f"{origin} = {raw!r} is not a contract mode; allowed values: off, meta, strict")
    return mode


def contract_mode() -> str:
    """The mode from ``NSA_FA2_CONTRACTS`` (unset or empty: ``meta``); a bad value raises ValueError."""
    raw = os.environ.get(ENV_VAR)
    if raw is None or not raw.strip():
        return DEFAULT_MODE
    return _parse_mode(raw, ENV_VAR)


_ATEN_NAMES = ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
               "is_causal", "return_debug_mask")
_REQUIRED = {"dense": 3, "varlen": 7, "kvcache": 3, "qkvpacked": 1, "kvpacked": 2,
             "varlen_qkvpacked": 3, "varlen_kvpacked": 6, "aten": 10}
_NEWEST = {kind: versions.signature(versions.NEWEST, kind) for kind in versions.ENTRY_POINTS}


def positional_names(kind: str, spec: ProviderSpec | None = None) -> tuple[str, ...]:
    """The positional parameter names of ``kind`` for ``spec``'s release (newest flash_attn when None)."""
    if kind == "aten":
        return _ATEN_NAMES
    if spec is not None and spec.signatures:
        return spec.signatures.get(kind, _NEWEST[kind])
    return _NEWEST[kind]


def bind_arguments(kind: str, args: tuple, kwargs: dict, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Name every argument of a call to the ``kind`` signature (unknown keywords are kept as given)."""
    if names is None:
        names = positional_names(kind)
    if len(args) > len(names):
        raise TypeError(f"{kind} FA-2 call takes at most {len(names)} positional arguments ({len(args)} given)")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key in bound:
            raise TypeError(f"{kind} FA-2 call got multiple values for argument {key!r}")
        bound[key] = value
    missing = [name for name in names[: _REQUIRED[kind]] if name not in bound]
    if missing:
        raise TypeError(f"{kind} FA-2 call is missing required argument(s) {missing}")
    return bound


def _window(a: dict, left: str, right: str) -> tuple[int, int]:
    wl, wr = a.get(left), a.get(right)
    return (-1 if wl is None else wl, -1 if wr is None else wr)


def _given(a: dict, spec: ProviderSpec):
    """The bound names, when the release lacks an argument (FA2-ARG-UNSUPPORTED reads them)."""
    if spec.supports_all_arguments:
        return None
    return frozenset(a)


def call_facts(kind: str, a: dict[str, Any], *, strict: bool, spec: ProviderSpec, caps,
               backward: bool | None) -> CallFacts:
    """The facts of one bound call of ``kind`` (``a`` from ``bind_arguments``)."""
    g = a.get
    if kind == "dense" or kind == "qkvpacked" or kind == "kvpacked":
        if kind == "dense":
            q, k, v, packed = a["q"], a["k"], a["v"], None
        elif kind == "qkvpacked":
            q = k = v = a["qkv"]
            packed = "qkv"
        else:
            q, k, v, packed = a["q"], a["kv"], a["kv"], "kv"
        return dense_facts(
            q, k, v, g("causal", False), g("window_size", (-1, -1)), g("dropout_p", 0.0),
            g("softcap", 0.0), g("alibi_slopes"), backward, g("return_attn_probs", False), caps,
            spec, strict, g("softmax_scale"), packed, _given(a, spec),
        )
    if kind == "varlen" or kind == "varlen_qkvpacked" or kind == "varlen_kvpacked":
        if kind == "varlen_qkvpacked":
            q = k = v = a["qkv"]
            cu_q = cu_k = a["cu_seqlens"]
            max_q = max_k = a["max_seqlen"]
            packed = "qkv"
        else:
            q, cu_q, cu_k, max_q, max_k = a["q"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"]
            if kind == "varlen":
                k, v, packed = a["k"], a["v"], None
            else:
                k = v = a["kv"]
                packed = "kv"
        return varlen_facts(
            q, k, v, cu_q, cu_k, max_q, max_k, g("seqused_k"), g("block_table"), g("causal", False),
            g("window_size", (-1, -1)), g("dropout_p", 0.0), g("softcap", 0.0), g("alibi_slopes"),
            backward, g("return_attn_probs", False), caps, spec, strict, g("softmax_scale"), packed,
            _given(a, spec),
        )
    if kind == "kvcache":
        return kvcache_facts(
            a["q"], a["k_cache"], a["v_cache"], g("k"), g("v"), g("rotary_cos"), g("rotary_sin"),
            g("cache_seqlens"), g("cache_batch_idx"), g("cache_leftpad"), g("block_table"),
            g("softmax_scale"), g("causal", False), g("window_size", (-1, -1)), g("softcap", 0.0),
            g("alibi_slopes"), g("num_splits", 0) or 0, g("return_softmax_lse", False), caps, spec,
            strict, _given(a, spec),
        )
    window = _window(a, "window_size_left", "window_size_right")
    if a["cum_seq_q"] is None and a["cum_seq_k"] is None:
        return dense_facts(
            a["query"], a["key"], a["value"], a["is_causal"], window, a["dropout_p"], 0.0,
            g("alibi_slopes"), backward, a["return_debug_mask"], caps, spec, strict, g("scale"),
        )
    return varlen_facts(
        a["query"], a["key"], a["value"], a["cum_seq_q"], a["cum_seq_k"], a["max_q"], a["max_k"],
        g("seqused_k"), g("block_table"), a["is_causal"], window, a["dropout_p"], 0.0,
        g("alibi_slopes"), backward, a["return_debug_mask"], caps, spec, strict, g("scale"),
    )


def _spec(kind: str, provider) -> ProviderSpec:
    return spec_for(provider or ("torch" if kind == "aten" else "flash_attn"))


def check_call(kind: str, a: dict[str, Any], *, strict: bool, provider, caps, backward: bool | None = None) -> None:
    """Check one bound call of ``kind``, forward and backward rules alike (``backward`` as in
    ``dense_reasons``: None = whether autograd records it); raises FA2ContractError when a rule fails."""
    c = call_facts(kind, a, strict=strict, spec=_spec(kind, provider), caps=caps, backward=backward)
    raise_for(c, evaluate(c))


def gate_backward(out, error: FA2ContractError) -> bool:
    """Make the backward through ``out`` (a tensor or a tuple of them) raise ``error`` before any
    backward node of the call runs: a pre-hook on each output's ``grad_fn``. False when no
    output is recorded by autograd (nothing to gate)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    nodes = []
    for t in outs:
        node = getattr(t, "grad_fn", None)
        if node is not None and node not in nodes:
            nodes.append(node)

    def refuse(grad_outputs):
        raise error

    for node in nodes:
        node.register_prehook(refuse)
    return bool(nodes)


def guarded(
    fn: Callable,
    kind: str,
    *,
    mode: str | None = None,
    provider: str | ProviderSpec | None = None,
    caps: DeviceCaps | str | None = None,
) -> Callable:
    """Wrap a FA-2 callable so the contract runs first; on a broken forward contract it raises
    FA2ContractError and ``fn`` is not called; a broken backward rule raises when backward starts.

    ``kind``: one of ``KINDS`` (the flash_attn entry points, see the module doc) or "aten" (torch's op).
    ``mode``: "off" / "meta" / "strict"; None reads ``NSA_FA2_CONTRACTS`` at each call.
    ``provider``: default "flash_attn" (its installed release) for the package kinds, "torch" for "aten".
    """
    if kind not in KINDS:
        raise ValueError(f"unknown guard kind {kind!r}; allowed: {', '.join(KINDS)}")
    fixed_mode = None if mode is None else _parse_mode(mode, "mode")
    resolved: list = []  # the spec and positional names, resolved at the first checked call

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        current = fixed_mode or contract_mode()
        if current == "off":
            return fn(*args, **kwargs)
        if not resolved:
            spec = _spec(kind, provider)
            resolved[:] = [spec, positional_names(kind, spec)]
        spec, names = resolved
        bound = bind_arguments(kind, args, kwargs, names)
        c = call_facts(kind, bound, strict=current == "strict", spec=spec, caps=caps, backward=None)
        reasons = evaluate(c)
        if not reasons:
            return fn(*args, **kwargs)
        forward, backward = split_by_phase(reasons)
        if forward:
            raise_for(c, reasons)
        out = fn(*args, **kwargs)
        gate_backward(out, FA2ContractError(
            backward, call=f"FA-2 {kind} backward", inputs=facts_inputs(c), settings=settings_line(c)))
        return out

    wrapper.contract_kind = kind
    return wrapper
