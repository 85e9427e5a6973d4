"""What changed between flash_attn releases 2.5.0 and 2.8.3, as data the provider specs are built from.

Read from each release tag's ``flash_attn/flash_attn_interface.py`` (the public signatures) and
``csrc/flash_attn/flash_api.cpp`` (the checks), Dao-AILab/flash-attention v2.5.0 ... v2.8.3:

  - 2.5.7: ``flash_attn_varlen_func`` gains ``block_table`` (paged KV for varlen), as its last argument.
  - 2.6.0: ``softcap`` (after ``window_size``) in every entry point; ``return_softmax_lse`` last in
    ``flash_attn_with_kvcache``.
  - 2.6.1: ``cache_leftpad`` in ``flash_attn_with_kvcache`` (after ``cache_batch_idx``).
  - backward on GPUs other than sm80/sm90 (the api's ``is_sm80 || is_sm90`` check, a clean error):
    2.5.0-2.5.4 refuse head dim > 192; 2.5.5-2.6.1 refuse head dim in (192, 224] always and
    (224, 256] with dropout; 2.6.2-2.7.2 refuse head dim > 192 with dropout. 2.7.3 drops the
    check (and the 8.x / 9.0 allow-list of the forward: any major >= 8) and launches no backward
    kernel instead: garbage gradients (``FA2-BWD-GARBAGE-GRADS``).

Only positions move between releases: a keyword name never changes meaning. Versions outside
[``OLDEST``, ``NEWEST``] get the nearest modelled release and a warning (``nearest_release``).
"""
from __future__ import annotations

import warnings
from typing import Literal

Version = tuple[int, ...]

OLDEST: Version = (2, 5, 0)
NEWEST: Version = (2, 8, 3)

# argument -> first release that has it
ARGUMENT_SINCE: dict[str, Version] = {
    "varlen_block_table": (2, 5, 7),
    "softcap": (2, 6, 0),
    "return_softmax_lse": (2, 6, 0),
    "cache_leftpad": (2, 6, 1),
}

NEWEST_ARGUMENT: Version = max(ARGUMENT_SINCE.values())

# The pre-2.7.3 backward check on non-sm80/sm90 GPUs, by first release (None: no check).
BwdArchCheck = Literal["d>192", "d<=224 or dropout", "dropout"] | None
BWD_ARCH_CHECK_SINCE: tuple[tuple[Version, BwdArchCheck], ...] = (
    ((2, 5, 0), "d>192"),
    ((2, 5, 5), "d<=224 or dropout"),
    ((2, 6, 2), "dropout"),
    ((2, 7, 3), None),
)

# The public entry points, by guard kind.
ENTRY_POINTS: dict[str, str] = {
    "dense": "flash_attn_func",
    "varlen": "flash_attn_varlen_func",
    "qkvpacked": "flash_attn_qkvpacked_func",
    "kvpacked": "flash_attn_kvpacked_func",
    "varlen_qkvpacked": "flash_attn_varlen_qkvpacked_func",
    "varlen_kvpacked": "flash_attn_varlen_kvpacked_func",
    "kvcache": "flash_attn_with_kvcache",
}

_HEADS = {
    "dense": ("q", "k", "v"),
    "varlen": ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
    "qkvpacked": ("qkv",),
    "kvpacked": ("q", "kv"),
    "varlen_qkvpacked": ("qkv", "cu_seqlens", "max_seqlen"),
    "varlen_kvpacked": ("q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
}


def has(version: Version, argument: str) -> bool:
    """Whether release ``version`` has ``argument`` (a key of ``ARGUMENT_SINCE``)."""
    return version >= ARGUMENT_SINCE[argument]


def signature(version: Version, kind: str) -> tuple[str, ...]:
    """Positional parameter names of the entry point of ``kind`` in release ``version``."""
    if kind == "kvcache":
        names = ["q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin", "cache_seqlens",
                 "cache_batch_idx"]
        if has(version, "cache_leftpad"):
            names.append("cache_leftpad")
        names += ["block_table", "softmax_scale", "causal", "window_size"]
        if has(version, "softcap"):
            names.append("softcap")
        names += ["rotary_interleaved", "alibi_slopes", "num_splits"]
        if has(version, "return_softmax_lse"):
            names.append("return_softmax_lse")
        return tuple(names)
    names = list(_HEADS[kind]) + ["dropout_p", "softmax_scale", "causal", "window_size"]
    if has(version, "softcap"):
        names.append("softcap")
    names += ["alibi_slopes", "deterministic", "return_attn_probs"]
    if kind == "varlen" and has(version, "varlen_block_table"):
        names.append("block_table")
    return tuple(names)


def bwd_arch_check(version: Version) -> BwdArchCheck:
    """The backward's sm80/sm90-only check of release ``version`` (None from 2.7.3 on)."""
    found: BwdArchCheck = None
    for since, check in BWD_ARCH_CHECK_SINCE:
        if version >= since:
            found = check
    return found


def nearest_release(version: Version, text: str) -> Version:
    """``version`` when it lies in the modelled range, else the nearest end of it, with a warning."""
    release = version[:3] + (0,) * (3 - len(version[:3]))
    if OLDEST <= release <= NEWEST:
        return release
    nearest = NEWEST if release > NEWEST else OLDEST
    warnings.warn(
        f"flash_attn {text} is outside the versions the FA-2 contract models "
        f"({'.'.join(map(str, OLDEST))} to {'.'.join(map(str, NEWEST))}); checking it with the "
        f"{'.'.join(map(str, nearest))} rules",
        UserWarning,
        stacklevel=4,
    )
    return nearest
