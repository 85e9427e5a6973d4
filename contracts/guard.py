"""``guarded(fn, kind)``: run the contract before a FA-2 callable, and never call it on bad input.

Mode, read at every call by ``contract_mode()`` from ``NSA_FA2_CONTRACTS`` (an explicit
``mode=`` given to ``guarded`` wins):
  - ``off``: call through, no checks;
  - ``meta`` (default): the metadata rules (no device sync);
  - ``strict``: also read the index values (one host copy, one device sync per call).

Kinds and the signatures they map (positional and keyword arguments):
  - ``dense``: flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
    alibi_slopes, deterministic, return_attn_probs)
  - ``varlen``: flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
    deterministic, return_attn_probs, block_table); a ``seqused_k=`` keyword is checked too
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

from .caps import DeviceCaps
from .checks import check_dense, check_kvcache, check_varlen
from .spec import ProviderSpec

ENV_VAR = "NSA_FA2_CONTRACTS"
MODES = ("off", "meta", "strict")
DEFAULT_MODE = "meta"
KINDS = ("dense", "varlen", "kvcache", "aten")


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


_POSITIONAL = {
    "dense": ("q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap",
              "alibi_slopes", "deterministic", "return_attn_probs"),
    "varlen": ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
               "dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
               "deterministic", "return_attn_probs", "block_table"),
    "kvcache": ("q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens",
                "cache_batch_idx", "cache_leftpad", "block_table", "softmax_scale", "causal",
                "window_size", "softcap", "rotary_interleaved", "alibi_slopes", "num_splits",
                "return_softmax_lse"),
    "aten": ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
             "is_causal", "return_debug_mask"),
}
_REQUIRED = {"dense": 3, "varlen": 7, "kvcache": 3, "aten": 10}


def bind_arguments(kind: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Name every argument of a call to the ``kind`` signature (unknown keywords are kept as given)."""
    names = _POSITIONAL[kind]
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


def check_call(kind: str, a: dict[str, Any], *, strict: bool, provider, caps) -> None:
    """Check one bound call of ``kind``; raises FA2ContractError when a rule fails."""
    if kind == "dense":
        check_dense(
            a["q"], a["k"], a["v"], causal=a.get("causal", False),
            window_size=a.get("window_size", (-1, -1)), dropout_p=a.get("dropout_p", 0.0),
            softcap=a.get("softcap", 0.0), alibi_slopes=a.get("alibi_slopes"),
            return_softmax=a.get("return_attn_probs", False),
            caps=caps, provider=provider or "flash_attn", strict=strict,
        )
    elif kind == "varlen":
        check_varlen(
            a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
            a["max_seqlen_k"], seqused_k=a.get("seqused_k"), block_table=a.get("block_table"),
            causal=a.get("causal", False), window_size=a.get("window_size", (-1, -1)),
            dropout_p=a.get("dropout_p", 0.0), softcap=a.get("softcap", 0.0),
            alibi_slopes=a.get("alibi_slopes"), return_softmax=a.get("return_attn_probs", False),
            caps=caps, provider=provider or "flash_attn", strict=strict,
        )
    elif kind == "kvcache":
        check_kvcache(
            a["q"], a["k_cache"], a["v_cache"], k=a.get("k"), v=a.get("v"),
            cache_seqlens=a.get("cache_seqlens"), block_table=a.get("block_table"),
            cache_batch_idx=a.get("cache_batch_idx"), cache_leftpad=a.get("cache_leftpad"),
            causal=a.get("causal", False), window_size=a.get("window_size", (-1, -1)),
            softcap=a.get("softcap", 0.0), alibi_slopes=a.get("alibi_slopes"),
            num_splits=a.get("num_splits", 0) or 0,
            caps=caps, provider=provider or "flash_attn", strict=strict,
        )
    elif a["cum_seq_q"] is None and a["cum_seq_k"] is None:
        check_dense(
            a["query"], a["key"], a["value"], causal=a["is_causal"],
            window_size=_window(a, "window_size_left", "window_size_right"),
            dropout_p=a["dropout_p"], alibi_slopes=a.get("alibi_slopes"),
            return_softmax=a["return_debug_mask"], caps=caps, provider=provider or "torch",
            strict=strict,
        )
    else:
        check_varlen(
            a["query"], a["key"], a["value"], a["cum_seq_q"], a["cum_seq_k"], a["max_q"],
            a["max_k"], seqused_k=a.get("seqused_k"), block_table=a.get("block_table"),
            causal=a["is_causal"], window_size=_window(a, "window_size_left", "window_size_right"),
            dropout_p=a["dropout_p"], alibi_slopes=a.get("alibi_slopes"),
            return_softmax=a["return_debug_mask"], caps=caps, provider=provider or "torch",
            strict=strict,
        )


def guarded(
    fn: Callable,
    kind: str,
    *,
    mode: str | None = None,
    provider: str | ProviderSpec | None = None,
    caps: DeviceCaps | str | None = None,
) -> Callable:
    """Wrap a FA-2 callable so the contract runs first; on a broken contract it raises
    FA2ContractError and ``fn`` is not called.

    ``kind``: "dense", "varlen", "kvcache" (flash_attn package signatures) or "aten" (torch's op).
    ``mode``: "off" / "meta" / "strict"; None reads ``NSA_FA2_CONTRACTS`` at each call.
    ``provider``: default "flash_attn" for the package kinds, "torch" for "aten".
    """
    if kind not in KINDS:
        raise ValueError(f"unknown guard kind {kind!r}; allowed: {', '.join(KINDS)}")
    fixed_mode = None if mode is None else _parse_mode(mode, "mode")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        current = fixed_mode or contract_mode()
        if current != "off":
            bound = bind_arguments(kind, args, kwargs)
            check_call(kind, bound, strict=current == "strict", provider=provider, caps=caps)
        return fn(*args, **kwargs)

    wrapper.contract_kind = kind
    return wrapper
