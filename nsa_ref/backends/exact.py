"""The backends that never refuse: the exact reference, the SDPA fallback, the torch selection.

``reference`` (``nsa_ref.reference``): naive masked softmax, any float dtype, fp64-capable; taken
only when asked for. ``sdpa`` (``nsa_ref.sdpa``): chunked masked SDPA, any device and float dtype;
where "auto" ends when no kernel can run. ``torch`` (``nsa_ref.selection``): the chunked torch block
selection, where ``select`` ends.
"""
from __future__ import annotations

from nsa_ref import reference, sdpa, selection
from nsa_ref.backends.base import BranchCall


class _NeverRefuses:
    dtypes = None
    max_head_dim = None

    def refusal(self, call: BranchCall, explicit: bool) -> str | None:
        return None

    def describe(self, call: BranchCall, explicit: bool) -> str | None:
        return "requested" if explicit else None

    def unavailable(self, branch: str, why: str) -> Exception:  # pragma: no cover - never refuses
        return RuntimeError(f"{self.name} refused {branch}: {why}")


class _AttentionModule(_NeverRefuses):
    """A backend whose three branches are one module's ``{branch}_attention`` functions."""

    branches = ("cmp", "sel", "win")
    functions: dict = {}

    def run(self, route, branch: str, args: tuple, cu_seqlens):
        return self.functions[branch](*args, cu_seqlens)


class ReferenceBackend(_AttentionModule):
    name, label = "reference", "reference"
    functions = {"cmp": reference.cmp_attention, "sel": reference.sel_attention, "win": reference.win_attention}


class SdpaBackend(_AttentionModule):
    name, label = "sdpa", "SDPA"
    functions = {"cmp": sdpa.cmp_attention, "sel": sdpa.sel_attention, "win": sdpa.win_attention}


class TorchSelection(_NeverRefuses):
    name, label = "torch", "torch"
    branches = ("select",)

    def run(self, route, branch: str, args: tuple, cu_seqlens):
        q, k_cmp, _lse, cfg = args  # the torch scoring recomputes p_cmp and ignores the lse
        return selection.select_blocks(q, k_cmp, cfg, cu_seqlens)
