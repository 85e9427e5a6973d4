"""FA-2 (FlashAttention-2) input contracts: cheap checks over tensor metadata, before the kernel.

    reasons = varlen_reasons(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)   # [] = legal
    check_dense(q, k, v, dropout_p=0.1)            # raises FA2ContractError listing every reason
    attn = guarded(flash_attn_varlen_func, "varlen")  # checks first; NSA_FA2_CONTRACTS=off|meta|strict
    qkvpacked_reasons(qkv), kvcache_reasons(q, kc, vc, k, v, cos, sin, cache_seqlens=n)  # every entry point

Backward rules (int32 offsets, garbage-gradient archs) run when a backward does: ``backward=True``
in the ``*_reasons`` functions, at backward time under ``guarded``.

Knows FA-2 and nothing else: imports neither nsa_ref nor conformance, and touches no CUDA
device at import. Rules: ``RULES`` (also Documentation/contracts_rules.md). Tolerances:
``contracts.tolerances``.
"""
from . import tolerances
from .caps import DeviceCaps, caps_for_device
from .catalog import RULES, Rule, rules_markdown
from .checks import (
    check_dense,
    check_kvcache,
    check_kvpacked,
    check_qkvpacked,
    check_varlen,
    check_varlen_kvpacked,
    check_varlen_qkvpacked,
    dense_reasons,
    kvcache_reasons,
    kvpacked_reasons,
    qkvpacked_reasons,
    varlen_kvpacked_reasons,
    varlen_qkvpacked_reasons,
    varlen_reasons,
)
from .guard import contract_mode, guarded
from .reason import FA2ContractError, Reason
from .spec import ProviderSpec, spec_for

__all__ = [
    "DeviceCaps",
    "FA2ContractError",
    "ProviderSpec",
    "RULES",
    "Reason",
    "Rule",
    "caps_for_device",
    "check_dense",
    "check_kvcache",
    "check_kvpacked",
    "check_qkvpacked",
    "check_varlen",
    "check_varlen_kvpacked",
    "check_varlen_qkvpacked",
    "contract_mode",
    "dense_reasons",
    "guarded",
    "kvcache_reasons",
    "kvpacked_reasons",
    "qkvpacked_reasons",
    "rules_markdown",
    "spec_for",
    "tolerances",
    "varlen_kvpacked_reasons",
    "varlen_qkvpacked_reasons",
    "varlen_reasons",
]
