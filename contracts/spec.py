"""The limits of each FA-2 provider as data: one ``ProviderSpec`` per provider and version.

Rules read these fields; no limit is written twice in the code. Numbers come from
``fa2_contract.md`` (flash-attention v2.8.3 ``csrc/flash_attn/flash_api.cpp`` and launch templates,
PyTorch's vendored copy and ``sdp_utils.cpp``); versions other than the ones named there reuse the
2.8.3 numbers except where a switch is documented (2.7.3 for the arch rules).

Providers:
  - ``"flash_attn"`` / ``"flash_attn==2.8.3"``: the flash_attn package. Without a version, the
    installed one (read from package metadata, never by importing flash_attn), else 2.8.3.
  - ``"torch"`` / ``"torch==2.11"``: PyTorch's built-in FA-2 (``torch.ops.aten._flash_attention_forward``);
    without a version, the running torch.
"""
from __future__ import annotations

import importlib.metadata
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

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

    permanent_guards: tuple[str, ...] = _PERMANENT_GUARDS

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
    v = version_tuple(version)
    new_arch_rules = v >= (2, 7, 3)
    return ProviderSpec(
        provider="flash_attn",
        version=version,
        pads_head_dim=True,
        fixes_last_dim_stride=True,
        masks_return_softmax=True,
        allowed_archs=None if new_arch_rules else ((8, None), (9, 0)),
        bwd_garbage_archs=((8, 6), (8, 9), (12, 0)) if new_arch_rules else (),
    )


def _torch_spec(version: str) -> ProviderSpec:
    v = version_tuple(version)
    return ProviderSpec(
        provider="torch",
        version=version,
        pads_head_dim=False,
        fixes_last_dim_stride=False,
        masks_return_softmax=False,
        dense_empty_batch_ok=v >= (2, 10),
        aten_supports_block_table=v >= (2, 13),
        varlen_attn_supports_gqa=v >= (2, 13),
        varlen_attn_supports_seqused_k=v >= (2, 13),
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
