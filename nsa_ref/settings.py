"""The one settings object for every NSA_* environment flag, read in one place.

Flags (all optional):
    NSA_USE_FA2=1            master switch for the FA-2 fast paths
    NSA_USE_FA2_WIN=1        FA-2 for the sliding-window branch
    NSA_USE_FA2_CMP=1        FA-2 for the compressed branch
    NSA_USE_FA2_SEL=1        FA-2 varlen gather path for the selected branch (1.5x faster than
                             the SDPA gather on H100 from T=1K; see artifacts/2026-11-25/fa2_harden)
    NSA_USE_TRITON=1         Triton kernels for block selection and the selected branch (CUDA, sm80+;
                             19-32x faster than the FA-2 gather / torch scoring on H100 at 64K)
    NSA_FA2_MIN_LEN_WIN      shortest sequence (tokens) routed to FA-2 for win; unset = tuned default
    NSA_FA2_MIN_LEN_CMP      same for cmp
    NSA_FA2_PREF_FP16=0      fp32 inputs are cast to fp16 (1) or bf16 (0) for FA-2
    NSA_FA2_PROVIDER=auto    auto | flash_attn | torch
    NSA_FA2_CONTRACTS=meta   off | meta | strict (also read by contracts.guarded)
    NSA_DEBUG_TIMING=0       log path/shape/dtype (and CUDA-event time) per branch call
    NSA_SDPA_AUDIT=0         also run SDPA on a sample of each FA-2 call and record the difference
"""
from __future__ import annotations

import os
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class NSASettings(BaseSettings):
    """Environment flags of the NSA router; construct directly to override in code."""

    model_config = SettingsConfigDict(env_prefix="NSA_", frozen=True, extra="ignore")

    use_fa2: bool = True
    use_fa2_win: bool = True
    use_fa2_cmp: bool = True
    use_fa2_sel: bool = True
    use_triton: bool = True
    fa2_min_len_win: int | None = Field(default=None, ge=0)
    fa2_min_len_cmp: int | None = Field(default=None, ge=0)
    fa2_pref_fp16: bool = False
    fa2_provider: Literal["auto", "flash_attn", "torch"] = "auto"
    fa2_contracts: Literal["off", "meta", "strict"] = "meta"
    debug_timing: bool = False
    sdpa_audit: bool = False
    sdpa_audit_rows: int = Field(default=64, ge=1)


_cache: tuple[tuple[tuple[str, str], ...], NSASettings] | None = None


def _compiling() -> bool:
    import torch

    return torch.compiler.is_compiling()


def _nsa_environ() -> tuple:
    """The NSA_* variables of the environment as a comparable key. On POSIX through os.environ's
    raw bytes mapping: decoding every variable's name on each call cost more than the rest of a
    route decision (H200 host profile, artifacts/2026-12-04)."""
    raw = getattr(os.environ, "_data", None)
    if isinstance(raw, dict) and all(isinstance(k, bytes) for k in list(raw)[:1]):
        return tuple(sorted((k, v) for k, v in raw.items() if k.startswith(b"NSA_")))
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("NSA_")))


def current_settings() -> NSASettings:
    """Settings from the environment, re-read only when an NSA_* variable changed. Inside a graph
    torch.compile traces, the settings last read stand (the graph is specialised on them; pass
    ``settings=`` to the API to pin them explicitly)."""
    global _cache
    if _cache is not None and _compiling():
        return _cache[1]
    key = _nsa_environ()
    if _cache is None or _cache[0] != key:
        _cache = (key, NSASettings())
    return _cache[1]


try:  # read once at import, so a graph torch.compile traces finds the flags cached
    current_settings()
except ValueError:  # a bad NSA_* value: reported by the first call instead
    pass
