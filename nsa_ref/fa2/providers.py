"""The two FA-2 providers behind one small interface.

- ``flash_attn``: the flash-attn package (``flash_attn_func`` / ``flash_attn_varlen_func``).
- ``torch``: torch's built-in kernels, ``torch.ops.aten._flash_attention_forward`` (autograd and
  native GQA; no head-dim padding, so d % 8 != 0 is padded here).

Both take q: (B, Sq, Hq, D), k/v: (B, Sk, Hkv, D) dense, or (T, H, D) packed with int32
cu_seqlens, and return ``(out, lse)`` with lse fp32 (B, Hq, Sq) dense / (Hq, T) varlen.
Nothing here touches CUDA at import.
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch

from nsa_ref import packages


class FA2Provider(Protocol):
    name: str
    contract_provider: str

    def version(self) -> str: ...
    def is_available(self) -> bool: ...
    def dense(self, q, k, v, *, causal: bool, window: tuple[int, int], scale: float): ...
    def varlen(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, causal: bool,
               window: tuple[int, int], scale: float): ...


class FlashAttnPackage:
    """The ``flash_attn`` package (imported lazily on first use)."""

    name = "flash_attn"
    contract_provider = "flash_attn"

    def version(self) -> str:
        return packages.version("flash_attn") or "not installed"

    def is_available(self) -> bool:
        return packages.installed("flash_attn") and torch.cuda.is_available()

    def dense(self, q, k, v, *, causal, window, scale):
        from flash_attn import flash_attn_func

        out, lse, _ = flash_attn_func(
            q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal,
            window_size=window, return_attn_probs=True,
        )
        return out, lse

    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, *, causal, window, scale):
        from flash_attn import flash_attn_varlen_func

        out, lse, _ = flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale,
            causal=causal, window_size=window, return_attn_probs=True,
        )
        return out, lse


class TorchBuiltin:
    """torch's vendored FA-2: ``torch.ops.aten._flash_attention_forward``."""

    name = "torch"
    contract_provider = "torch"

    def version(self) -> str:
        return torch.__version__

    def is_available(self) -> bool:
        return torch.cuda.is_available() and hasattr(torch.ops.aten, "_flash_attention_forward")

    @staticmethod
    def _call(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, scale):
        wl, wr = window
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale,
            window_size_left=None if wl < 0 else wl, window_size_right=None if wr < 0 else wr,
        )
        return out, lse

    def dense(self, q, k, v, *, causal, window, scale):
        return self._call(q, k, v, None, None, q.shape[1], k.shape[1], causal, window, scale)

    def varlen(self, q, k, v, cu_q, cu_k, max_q, max_k, *, causal, window, scale):
        return self._call(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, scale)


PROVIDERS: dict[str, FA2Provider] = {"flash_attn": FlashAttnPackage(), "torch": TorchBuiltin()}


@functools.lru_cache(maxsize=None)
def _available(name: str) -> bool:
    return PROVIDERS[name].is_available()


def available_providers() -> list[str]:
    """Names of the providers usable here, preferred first (the package, then torch)."""
    return [name for name in PROVIDERS if _available(name)]


def resolve_provider(preference: str = "auto") -> FA2Provider | None:
    """The provider for NSA_FA2_PROVIDER=auto|flash_attn|torch, or None when it is not usable."""
    if preference == "auto":
        names = available_providers()
        return PROVIDERS[names[0]] if names else None
    if preference not in PROVIDERS:
        raise ValueError(f"unknown FA-2 provider {preference!r}; use one of auto, {', '.join(PROVIDERS)}")
    return PROVIDERS[preference] if _available(preference) else None


def get_provider(name: str) -> FA2Provider:
    """Provider object by name, usable or not."""
    if name not in PROVIDERS:
        raise ValueError(f"unknown FA-2 provider {name!r}; use one of {', '.join(PROVIDERS)}")
    return PROVIDERS[name]
