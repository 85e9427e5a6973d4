"""FA-2 fast paths for NSA branches, over either provider (flash_attn package or torch built-in)."""
from nsa_ref.fa2.branches import cmp_attention, win_attention
from nsa_ref.fa2.calls import FA2Plan, compute_dtype, padded_head_dim
from nsa_ref.fa2.selected import sel_attention
from nsa_ref.fa2.providers import (
    PROVIDERS,
    FA2Provider,
    available_providers,
    get_provider,
    resolve_provider,
)

__all__ = [
    "PROVIDERS", "FA2Plan", "FA2Provider", "available_providers", "cmp_attention", "compute_dtype",
    "get_provider", "padded_head_dim", "resolve_provider", "sel_attention", "win_attention",
]
