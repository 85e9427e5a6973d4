"""FA-2's mask model, in one place: what the arguments ask for, and what the kernel computes.

Per sequence, query row i (0..sq-1) and key column j (0..sk-1), bottom-right aligned:
row i keeps j iff ``i + sk - sq - wl <= j <= i + sk - sq + wr``, where a negative side is
unbounded and causal means a right window of 0 (``intended_mask``).

FA-2 first normalises its arguments (flash_api.cpp; Documentation/contracts_rules.md, "Mask
semantics"), with ``max_q`` / ``max_k`` the call's max_seqlen (the dense lengths for a dense call):
- a side >= max_k becomes -1 (the max_k clamp);
- max_q == 1 switches causal off (the decode shortcut; an explicit right window 0 survives it);
- causal sets the right side to 0;
- if both sides are then negative there is no mask at all; otherwise a negative side becomes max_k.
``normalised_window`` is that rule; ``fa2_mask`` the (sq, sk) mask the kernel then applies.
``first_differing_row`` compares two windows on host ints only (no tensor the size of the mask),
so contract rules can ask "does the normalisation change which keys some row sees" cheaply.

The emulator (nsa_ref.fa2.emulate), the probes (conformance/tools/probes/_common.py) and the contract
rules (contracts/rules.py) all use this module.
"""
from __future__ import annotations

import torch

Window = tuple[int, int]


def normalised_window(causal: bool, window: Window, max_q: int, max_k: int) -> tuple[bool, Window]:
    """(causal, (wl, wr)) as asked -> (causal, (wl, wr)) FA-2 computes with; (-1, -1) = no mask."""
    wl, wr = window
    if wl >= max_k:
        wl = -1
    if wr >= max_k:
        wr = -1
    if max_q == 1:
        causal = False
    if causal:
        wr = 0
    if wl < 0 and wr < 0:
        return causal, (-1, -1)
    return causal, (max_k if wl < 0 else wl, max_k if wr < 0 else wr)


def intended_mask(sq: int, sk: int, causal: bool, window: Window = (-1, -1), device=None) -> torch.Tensor:
    """(sq, sk) bool: what the arguments say. Bottom-right aligned; -1 = unbounded on that side;
    causal = right window 0. Row i sees key j iff i + sk - sq - wl <= j <= i + sk - sq + wr."""
    wl, wr = window
    if causal:
        wr = 0
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if wr >= 0:
        keep &= j <= i + (sk - sq) + wr
    if wl >= 0:
        keep &= j >= i + (sk - sq) - wl
    return keep


def fa2_mask(sq: int, sk: int, causal: bool, window: Window, max_q: int | None = None,
             max_k: int | None = None, device=None) -> torch.Tensor:
    """(sq, sk) bool: what FA-2 computes for one sequence of a call whose max_seqlen are
    (max_q, max_k) (default: this sequence's own lengths, as in a dense call)."""
    max_q = sq if max_q is None else max_q
    max_k = sk if max_k is None else max_k
    _, (wl, wr) = normalised_window(causal, window, max_q, max_k)
    if (wl, wr) == (-1, -1):
        return torch.ones(sq, sk, dtype=torch.bool, device=device)
    return intended_mask(sq, sk, False, (wl, wr), device=device)


def _row_keys(i: int, sq: int, sk: int, window: Window) -> tuple[int, int] | None:
    """Keys [lo, hi] row i keeps under a (right-resolved) window, or None when it keeps none."""
    wl, wr = window
    shift = i + sk - sq
    lo = 0 if wl < 0 else max(0, shift - wl)
    hi = sk - 1 if wr < 0 else min(sk - 1, shift + wr)
    return (lo, hi) if lo <= hi else None


def first_differing_row(sq: int, sk: int, asked: Window, computed: Window) -> int | None:
    """First row whose kept keys differ between two (causal already folded into wr) windows, or None.

    Host ints only: both bounds are clipped lines of slope 1 in i, so they can only start or
    stop differing at the rows where a clip starts or ends; those rows, their neighbours and the
    two ends are checked.
    """
    if sq <= 0:
        return None
    rows = {0, sq - 1}
    for wl, wr in (asked, computed):
        edges = []
        if wr >= 0:  # the right bound reaches the last key / falls below the first one
            edges += [sq - 1 - wr, sq - sk - 1 - wr]
        if wl >= 0:  # the left bound leaves the first key / passes the last one
            edges += [sq - sk + wl, sq + wl]
        for edge in edges:
            rows.update((edge - 1, edge, edge + 1))
    for i in sorted(r for r in rows if 0 <= r < sq):
        if _row_keys(i, sq, sk, asked) != _row_keys(i, sq, sk, computed):
            return i
    return None
