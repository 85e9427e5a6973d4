"""The limits of each FA-2 provider as data: one ``ProviderSpec`` per provider and version.

Rules read these fields; no limit is written twice in the code. Numbers come from
``fa2_contract.md`` (flash-attention v2.8.3 ``csrc/flash_attn/flash_api.cpp`` and launch templates,
PyTorch's vendored copy and ``sdp_utils.cpp``); versions other than the ones named there reuse the
2.8.3 numbers except where a switch is documented (2.7.3 for the arch rules).

Providers:
  - ``"flash_attn"`` / ``"flash_attn==2.8.3"``: the flash_attn package. Without a version, the
    installed one (read from package metadata, the same string as ``flash_attn.__version__``,
    never by importing flash_attn), else 2.8.3. Releases 2.5.0 to 2.8.3 are modelled one by one
    (``versions.py``: signatures, arguments, the backward arch check); a version outside that
    range gets the nearest modelled release and a UserWarning (once per provider string).
  - ``"torch"`` / ``"torch==2.11"``: PyTorch's built-in FA-2 (``torch.ops.aten._flash_attention_forward``);
    without a version, the running torch.
"""
from __future__ import annotations

import importlib.metadata
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from . import versions

DEFAULT_FLASH_ATTN_VERSION = "2.8.3"

# Rule ids whose failure is silent or kills the process; cheap to keep on in production.
_PERMANENT_GUARDS = (
    "FA2-HEADS-KV-ZERO",
    "FA2-DENSE-EMPTY-Q",
    "FA2-VARLEN-GQA-DECODE",
    "FA2-INT32-OFFSET",
    "FA2-GRID-LIMIT",
    "FA2-BWD-GARBAGE-GRADS",
    "FA2-CAUSAL-DROPPED",
)


class ProviderSpec(BaseModel):
    """What one FA-2 provider/version accepts; every number a rule compares against."""

    model_config = ConfigDict(frozen=True)

    provider: Literal["flash_attn", "torch"]
    version: str

    max_head_dim: int = 256
    head_dim_multiple: int = 8
    # flash_attn's Python layer pads q/k/v to a multiple of 8; torch's op refuses d % 8 != 0.
    pads_head_dim: bool
    # flash_attn's Python layer calls .contiguous() when the last stride is not 1 (not the cache).
    fixes_last_dim_stride: bool
    # flash_attn passes return_softmax only when dropout_p > 0; torch's op raises instead.
    masks_return_softmax: bool

    min_compute_major: int = 8
    # None: any arch with major >= min_compute_major. Else (major, minor) pairs; minor None = any.
    allowed_archs: tuple[tuple[int, int | None], ...] | None = None

    grid_limit: int = 65535
    int32_offset_limit: int = 2**31
    seqlen_q_round: int = 128
    # d_rounded in the backward accumulator: round to 32 up to this head dim, else to 64.
    head_dim_round_small: int = 32
    head_dim_round_large: int = 64
    head_dim_round_threshold: int = 128
    # Varlen backward pads each sequence by this many rows in dq_accum.
    varlen_row_pad: int = 128
    # int32 offsets in the backward are unfixed up to 2.8.3 (fixed on main, PR #2260).
    bwd_int32_offsets: bool = True

    paged_block_multiple: int = 256
    max_num_splits: int = 128

    bwd_garbage_archs: tuple[tuple[int, int], ...] = ()
    # Open below, closed above: 192 < d <= 256.
    bwd_garbage_head_dim_range: tuple[int, int] = (192, 256)

    dense_empty_batch_ok: bool = False
    aten_supports_block_table: bool = False
    varlen_attn_supports_gqa: bool = False
    varlen_attn_supports_seqused_k: bool = False

    # Arguments this release has (flash_attn: versions.ARGUMENT_SINCE; torch's op: no softcap).
    supports_softcap: bool = True
    supports_varlen_block_table: bool = True
    supports_return_softmax_lse: bool = True
    supports_cache_leftpad: bool = True
    # torch's vendored FA-2 is built without ALiBi (refuses alibi_slopes: "This flash attention build
    # does not support alibi.", measured with torch 2.11 on the H200, contract fuzz 2026-12-03).
    supports_alibi: bool = True
    # All four of the above (one attribute read on the hot path); set by the spec builders.
    supports_all_arguments: bool = True
    # flash_attn < 2.7.3 refuses some backwards off sm80/sm90 (versions.BWD_ARCH_CHECK_SINCE).
    bwd_arch_check: versions.BwdArchCheck = None
    # Positional parameter names per guard kind (flash_attn: versions.signature).
    signatures: dict[str, tuple[str, ...]] = {}
    # The flash_attn release whose rules are used ((2, 8, 3) for 2.8.3.post1 and for 2.9).
    release: tuple[int, ...] = ()

    permanent_guards: tuple[str, ...] = _PERMANENT_GUARDS
    # Which rules to keep on in production for this provider/version, what to do when one fires,
    # and the evidence (filled by guard_recommendations_for; see GuardRecommendation below).
    guard_recommendations: tuple["GuardRecommendation", ...] = ()

    @property
    def label(self) -> str:
        return f"{self.provider}=={self.version}"

    def round_head_dim(self, d: int) -> int:
        """Head dim as the kernel sees it: padded to ``head_dim_multiple`` when the provider pads."""
        if self.pads_head_dim:
            m = self.head_dim_multiple
            return (d + m - 1) // m * m
        return d

    def head_dim_rounded(self, d: int) -> int:
        """``d_rounded`` of the backward accumulator (to 32 if d <= 128 else to 64, in 2.8.3)."""
        d = self.round_head_dim(d)
        m = self.head_dim_round_small if d <= self.head_dim_round_threshold else self.head_dim_round_large
        return (d + m - 1) // m * m


def version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release of a version string: '2.8.3.post2' -> (2, 8, 3), '2.13.0+cpu' -> (2, 13, 0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    if not parts:
        raise ValueError(f"cannot read a version number from {version!r}")
    return tuple(parts)


def installed_flash_attn_version() -> str | None:
    """The installed flash_attn distribution's version, from metadata (flash_attn is never imported)."""
    for dist in ("flash_attn", "flash-attn"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _flash_attn_spec(version: str) -> ProviderSpec:
    v = versions.nearest_release(version_tuple(version), version)
    new_arch_rules = v >= (2, 7, 3)
    return ProviderSpec(
        provider="flash_attn",
        version=version,
        release=v,
        pads_head_dim=True,
        fixes_last_dim_stride=True,
        masks_return_softmax=True,
        allowed_archs=None if new_arch_rules else ((8, None), (9, 0)),
        bwd_garbage_archs=((8, 6), (8, 9), (12, 0)) if new_arch_rules else (),
        bwd_arch_check=versions.bwd_arch_check(v),
        supports_softcap=versions.has(v, "softcap"),
        supports_varlen_block_table=versions.has(v, "varlen_block_table"),
        supports_return_softmax_lse=versions.has(v, "return_softmax_lse"),
        supports_cache_leftpad=versions.has(v, "cache_leftpad"),
        supports_all_arguments=v >= versions.NEWEST_ARGUMENT,
        signatures={kind: versions.signature(v, kind) for kind in versions.ENTRY_POINTS},
        guard_recommendations=guard_recommendations_for("flash_attn", ".".join(map(str, v))),
    )


def _torch_spec(version: str) -> ProviderSpec:
    v = version_tuple(version)
    return ProviderSpec(
        provider="torch",
        version=version,
        pads_head_dim=False,
        fixes_last_dim_stride=False,
        masks_return_softmax=False,
        supports_softcap=False,
        supports_alibi=False,
        supports_varlen_block_table=v >= (2, 13),
        supports_all_arguments=False,
        dense_empty_batch_ok=v >= (2, 10),
        aten_supports_block_table=v >= (2, 13),
        varlen_attn_supports_gqa=v >= (2, 13),
        varlen_attn_supports_seqused_k=v >= (2, 13),
        guard_recommendations=guard_recommendations_for("torch", version),
    )


_SPECS: dict[str, ProviderSpec] = {}
_PROVIDER_TEXT = re.compile(r"^\s*(flash_attn|flash-attn|torch)\s*(?:==\s*([0-9][^\s]*))?\s*$")


def spec_for(provider: str | ProviderSpec = "flash_attn") -> ProviderSpec:
    """The spec for ``"flash_attn"``, ``"flash_attn==2.8.3"``, ``"torch"``, ``"torch==2.11"`` (cached)."""
    if isinstance(provider, ProviderSpec):
        return provider
    spec = _SPECS.get(provider)
    if spec is not None:
        return spec
    match = _PROVIDER_TEXT.match(provider) if isinstance(provider, str) else None
    if match is None:
        raise ValueError(
            f"unknown FA-2 provider {provider!r}; use 'flash_attn', 'flash_attn==X.Y.Z', "
            "'torch' or 'torch==X.Y'"
        )
    name, version = match.groups()
    if name == "torch":
        if version is None:
            import torch

            version = torch.__version__
        spec = _torch_spec(version)
    else:
        spec = _flash_attn_spec(version or installed_flash_attn_version() or DEFAULT_FLASH_ATTN_VERSION)
    _SPECS[provider] = spec
    return spec


# --- permanent guard recommendations (data) -------------------------------------------------------


class GuardRecommendation(BaseModel):
    """One rule worth keeping on permanently for some providers/versions/archs, and why.

    ``action``: "refuse" (raise before the kernel) or "warn" (log and run: semantics the caller may
    have meant). ``mode``: the contract mode that sees it; "meta" costs no device sync, "strict"
    needs one host copy of the index tensors per call. ``versions``: comma-separated bounds on the
    provider's version ("all", ">=2.7.3", "<=2.8.3", ">=2.13"). ``archs``: "sm86"-style names where
    the class exists; empty = every arch. ``evidence``: where the crash/corruption was seen and the
    probe that reproduces it (``conformance/tools/probes/<name>.py``).
    """

    model_config = ConfigDict(frozen=True)

    rule: str
    action: Literal["refuse", "warn"]
    mode: Literal["meta", "strict"] = "meta"
    condition: str
    providers: tuple[Literal["flash_attn", "torch"], ...] = ("flash_attn", "torch")
    versions: str = "all"
    archs: tuple[str, ...] = ()
    evidence: str

    def covers_version(self, version: str) -> bool:
        """Whether ``version`` lies within ``versions``."""
        v = version_tuple(version)
        for bound in (b.strip() for b in self.versions.split(",")):
            if bound in ("", "all"):
                continue
            op, number = bound[:2], bound[2:].strip()
            want = version_tuple(number)
            n = max(len(v), len(want))
            lhs, rhs = v + (0,) * (n - len(v)), want + (0,) * (n - len(want))
            if (op == ">=" and lhs < rhs) or (op == "<=" and lhs > rhs):
                return False
            if op not in (">=", "<="):
                raise ValueError(f"{self.rule}: version bound {bound!r} must start with >= or <=")
        return True

    def covers_arch(self, caps) -> bool:
        """Whether the class exists on ``caps`` (a DeviceCaps, "sm86"-style text, or None = unknown)."""
        if not self.archs or caps is None:
            return True
        sm = caps if isinstance(caps, str) else getattr(caps, "sm", str(caps))
        return sm.lower().replace("_", "") in self.archs


_STRICT_COST = "strict mode: one host copy of the index tensors per call"
GUARD_RECOMMENDATIONS: tuple[GuardRecommendation, ...] = (
    GuardRecommendation(
        rule="FA2-HEADS-KV-ZERO", action="refuse", condition="k/v have 0 heads",
        evidence="[H100] SIGFPE kills the process on both providers; probe heads_kv_zero"),
    GuardRecommendation(
        rule="FA2-DENSE-EMPTY-Q", action="refuse", condition="dense seqlen_q == 0",
        evidence="[H100] CUDA 'invalid argument', context may be poisoned; probe dense_empty_q"),
    GuardRecommendation(
        rule="FA2-VARLEN-GQA-DECODE", action="refuse",
        condition="varlen, Hq > Hkv, max_seqlen_q == 1 and total_q != batch (e.g. empty query sequences)",
        evidence="[H100] RuntimeError from an internal reshape (issues #1537, #1619); probe varlen_gqa_decode"),
    GuardRecommendation(
        rule="FA2-INT32-OFFSET", action="refuse",
        condition="a backward with b * round_up(seqlen_q, 128) * Hq * d_rounded >= 2**31",
        evidence="issue #1311: int32 dq_accum offsets, illegal memory access; fixed only on main (PR #2260), "
                 "torch's vendored copy not shown fixed; probe int32_offset"),
    GuardRecommendation(
        rule="FA2-GRID-LIMIT", action="refuse", condition="batch or heads > 65535 (b * h with split-KV)",
        evidence="src launch templates: CUDA 'invalid configuration argument'; probe grid_limit"),
    GuardRecommendation(
        rule="FA2-BWD-GARBAGE-GRADS", action="refuse", providers=("flash_attn",), versions=">=2.7.3",
        archs=("sm86", "sm89", "sm120"), condition="backward with dropout_p > 0 and 192 < head dim <= 256",
        evidence="src flash_bwd_launch_template.h launches no kernel: garbage gradients, no error; "
                 "probe bwd_garbage_grads (runs only on those archs)"),
    GuardRecommendation(
        rule="FA2-CAUSAL-DROPPED", action="refuse",
        condition="causal=True with max_seqlen_q == 1 while total_q > batch",
        evidence="[H100] / api: causal silently switched off; probe causal_dropped"),
    GuardRecommendation(
        rule="FA2-CU-SEQLENS-START", action="refuse", mode="strict", condition=f"cu_seqlens[0] != 0 ({_STRICT_COST})",
        evidence="[H100] out-of-bounds reads, garbage without error; probe cu_seqlens_start"),
    GuardRecommendation(
        rule="FA2-CU-SEQLENS-DECREASING", action="refuse", mode="strict",
        condition=f"cu_seqlens decreasing anywhere ({_STRICT_COST})",
        evidence="[H100] negative lengths, garbage without error; probe cu_seqlens_decreasing"),
    GuardRecommendation(
        rule="FA2-CU-SEQLENS-OVERRUN", action="refuse", mode="strict",
        condition=f"cu_seqlens[-1] > the tokens given ({_STRICT_COST})",
        evidence="[H100] reads past q/k/v, writes past out; probe cu_seqlens_overrun"),
    GuardRecommendation(
        rule="FA2-MAX-SEQLEN-Q-LOW", action="refuse", mode="strict",
        condition=f"max_seqlen_q < the longest query sequence ({_STRICT_COST})",
        evidence="[H100] rows past ceil(max_seqlen_q / kBlockM) tiles never written; probe max_seqlen_q_low"),
    GuardRecommendation(
        rule="FA2-SEQUSED-K-OVERRUN", action="refuse", mode="strict",
        condition=f"seqused_k outside [0, keys of the sequence] ({_STRICT_COST})",
        evidence="src block_info.h reads the next sequence's keys; no probe yet"),
    GuardRecommendation(
        rule="FA2-KV-CACHE-OVERFLOW", action="refuse", mode="strict", providers=("flash_attn",), versions="<=2.8.3",
        condition=f"cache_seqlens + new tokens > pages_per_seq * page_size ({_STRICT_COST})",
        evidence="issue #2709: block_table read out of bounds; probe paged_kv_overflow"),
    GuardRecommendation(
        rule="FA2-BLOCK-TABLE-RANGE", action="refuse", mode="strict", providers=("flash_attn",),
        condition=f"a used block_table entry outside [0, num_blocks) ({_STRICT_COST})",
        evidence="src: page index from block_table is not checked; no probe yet"),
    GuardRecommendation(
        rule="FA2-ROTARY-TABLE-OVERRUN", action="refuse", mode="strict", providers=("flash_attn",),
        condition=f"kvcache with rotary_cos/sin and new k/v: cache_seqlens + seqlen_q (causal/local) or + new tokens "
                  f"> rotary table rows ({_STRICT_COST})",
        evidence="[H200] contract fuzz, flash_attn 2.8.3: 4 accepted calls died with 'device-side assert' / "
                 "'unspecified launch failure' (seqlen_q 16, causal or local, s_new 1); no probe yet"),
    GuardRecommendation(
        rule="FA2-WINDOW-RIGHT-CLAMPED", action="warn",
        condition="window_size right >= seqlen_k where that changes which keys a row sees",
        evidence="[H100] / api: the side becomes -1 (no window); probe window_clamped"),
    GuardRecommendation(
        rule="FA2-DENSE-EMPTY-K", action="warn", condition="dense seqlen_k == 0",
        evidence="[H100] no kernel runs: out = 0 and lse = +inf (not -inf)"),
    GuardRecommendation(
        rule="FA2-MAX-SEQLEN-K-LOW", action="warn", mode="strict",
        condition=f"max_seqlen_k < the longest key sequence ({_STRICT_COST})",
        evidence="api: windows >= max_seqlen_k become -1; no corruption without a window"),
)


def guard_recommendations_for(provider: str, version: str) -> tuple[GuardRecommendation, ...]:
    """The recommendations that hold for ``provider`` ("flash_attn" / "torch") at ``version``."""
    return tuple(r for r in GUARD_RECOMMENDATIONS if provider in r.providers and r.covers_version(version))


def recommended_guards(provider: str | ProviderSpec = "flash_attn", caps=None, action: str | None = None,
                       mode: str | None = None) -> tuple[GuardRecommendation, ...]:
    """The spec's recommendations that exist on ``caps`` (None: every arch), optionally one action/mode."""
    spec = spec_for(provider)
    return tuple(
        r for r in spec.guard_recommendations
        if r.covers_arch(caps) and (action is None or r.action == action) and (mode is None or r.mode == mode)
    )


ProviderSpec.model_rebuild()
