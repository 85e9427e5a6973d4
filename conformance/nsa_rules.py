"""The NSA rules the conformance suite pins, each with a stable id (the implementer's checklist).

Every conformance test names the rule(s) it checks with ``@pytest.mark.nsa_rule("NSA-...")`` and
every failure message starts with ``[NSA-...]``, so a failure says which rule broke and the
per-rule report (``nsa-fa2 check --impl`` / ``pytest --nsa-report``) groups results by rule.
``Documentation/nsa_conformance_rules.md`` is generated from this table (``conformance.tools.docs``).

The rules restate ``nsa_spec.md`` (the reading this project pins) in one line each, plus the
conventions an implementation must follow to be compared at all (layouts, lse convention).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NSARule:
    """One pinned rule: ``id`` (stable), ``title`` (short), ``statement`` (what must hold),
    ``slots`` (implementation slots whose tests check it: nsa, cmp, sel, win, select, compress)."""

    id: str
    title: str
    statement: str
    slots: tuple[str, ...]

    def tag(self) -> str:
        """``"[NSA-CMP-VISIBLE] cmp visibility (i*d + l - 1 <= t)"``: how failures start."""
        return f"[{self.id}] {self.title}"


_RULES = (
    NSARule("NSA-CMP-COUNT", "compressed-block count (Tc = floor((T - l)/d) + 1 if T >= l, else 0)",
            "Per sequence, compression emits Tc = floor((T - l) / d) + 1 blocks when T >= l and none when "
            "T < l; block i covers tokens [i*d, i*d + l). A trailing partial block is never a compressed block. "
            "With cu_seqlens, compressed blocks are packed per sequence in the same order.",
            ("compress",)),
    NSARule("NSA-CMP-MEAN", "cmp compression phi = mean (k_cmp[i] = mean k[i*d : i*d + l])",
            "The parameter-free compressor is the arithmetic mean of the l keys (values) of the block.",
            ("compress",)),
    NSARule("NSA-CMP-VISIBLE", "cmp visibility (i*d + l - 1 <= t)",
            "Query t attends compressed block i iff the block has ended: i*d + l - 1 <= t; softmax over the "
            "visible blocks only, scaled by the softmax scale; query head h uses KV head h // G.",
            ("cmp", "nsa")),
    NSARule("NSA-CMP-EMPTY", "cmp empty rows (t < l - 1: output exactly 0, lse -inf, zero gradient)",
            "A row that sees no compressed block outputs exactly 0 (never NaN), has log-sum-exp -inf in this "
            "project's convention (FA-2 reports +inf: convert), and passes no gradient.",
            ("cmp", "nsa")),
    NSARule("NSA-CMP-LSE", "cmp log-sum-exp (natural log over visible blocks; -inf on empty rows)",
            "If the cmp implementation returns its log-sum-exp it is (T, Hq), natural log, over the visible "
            "blocks with the softmax scale applied.",
            ("cmp",)),
    NSARule("NSA-SEL-SCORE", "selection scores (overlap weights, GQA sum over the G heads)",
            "p_slc[t, h, j] = sum_i w(j, i) * p_cmp[t, h, i] with w(j, i) = |[i*d, i*d+l) & [j*l', (j+1)*l')| / d; "
            "one selection per (t, KV head): p_slc summed over the G query heads of that KV head (a mean "
            "ranks the same). The top n - #forced blocks among j <= t // l' are taken.",
            ("select", "nsa")),
    NSARule("NSA-SEL-FORCED", "forced blocks (n_init initial + n_local local, clipped to 0..c)",
            "Blocks 0..n_init-1 and c-n_local+1..c (c = t // l') are always selected, clipped to 0..c; they "
            "count towards n. Fewer candidates than n: all blocks 0..c are taken.",
            ("select", "nsa")),
    NSARule("NSA-SEL-TIES", "top-n ties go to the lower block index",
            "Among equal scores the lower block index wins (all-zero scores pick the lowest blocks).",
            ("select",)),
    NSARule("NSA-SEL-LAYOUT", "block_idx layout (int, (T, Hkv, n_sel), ascending, -1 padded)",
            "Selected blocks per (t, KV head): an integer tensor (T, Hkv, n_sel), valid entries first in "
            "ascending order inside 0..c, then -1 padding. Order is a convention: the full NSA output does not "
            "depend on it.",
            ("select",)),
    NSARule("NSA-SEL-ATTN", "sel attention (keys s in the selected blocks with s <= t)",
            "Query t attends the tokens s of its selected blocks (per KV head, shared by the G query heads) "
            "with s <= t; -1 entries and repeated blocks add nothing; a block is [j*l', (j+1)*l') clipped "
            "to the sequence.",
            ("sel", "nsa")),
    NSARule("NSA-WIN", "sliding window (s in [max(0, t - w + 1), t]: w keys including t)",
            "Query t attends the w most recent tokens including itself (FA-2 window_size = (w - 1, 0)).",
            ("win", "nsa")),
    NSARule("NSA-SCALE", "softmax scale (1/sqrt(Dk) unless cfg.scale is given; every branch)",
            "Every branch scales q . k by cfg.softmax_scale: 1/sqrt(Dk) by default, the explicit "
            "cfg.scale when set.",
            ("cmp", "sel", "win", "nsa")),
    NSARule("NSA-GATE", "gated sum (o = g_cmp*o_cmp + g_sel*o_sel + g_win*o_win; gates[..., 0:3] in that order)",
            "The output is the gate-weighted sum of the three branch outputs; gates (T, Hq, 3) hold "
            "(g_cmp, g_sel, g_win) in that order.",
            ("nsa",)),
    NSARule("NSA-FULL", "full NSA (compress -> cmp -> select -> sel, win, gated sum)",
            "End to end: the composition of the rules above on the same inputs.",
            ("nsa",)),
    NSARule("NSA-VARLEN", "varlen (every rule per sequence; nothing crosses cu_seqlens; empty sequences legal)",
            "With cu_seqlens (B+1,) int32, packed sequences are independent: positions, blocks and windows "
            "restart at each sequence start; a sequence of length 0 is legal and produces no rows.",
            ("cmp", "sel", "win", "select", "compress", "nsa")),
    NSARule("NSA-CAUSAL", "causality (outputs at t do not depend on tokens after t)",
            "Changing any input at positions > t leaves every output at positions <= t bitwise unchanged.",
            ("cmp", "sel", "win", "select", "nsa")),
    NSARule("NSA-FINITE", "no NaN/inf anywhere (outputs and gradients)",
            "No output or gradient is NaN or infinite (lse may be -inf on empty rows).",
            ("cmp", "sel", "win", "nsa")),
    NSARule("NSA-GRAD", "gradients (fp64 gradcheck in q, k, v, gates, compressed k/v)",
            "Every branch is differentiable in its inputs and its gradients pass an fp64 gradcheck.",
            ("cmp", "sel", "win", "nsa")),
    NSARule("NSA-DECODE", "decode = prefill (one token at a time equals the prefill at that position)",
            "A decode step with a cache of raw and compressed k/v returns the prefill output at the same "
            "position (same tolerance rule); compressed blocks are emitted as soon as they end.",
            ("nsa",)),
)

RULES: dict[str, NSARule] = {r.id: r for r in _RULES}


def rule(rule_id: str) -> NSARule:
    """The rule with ``rule_id``; KeyError names the known ids."""
    try:
        return RULES[rule_id]
    except KeyError:
        raise KeyError(f"unknown NSA rule id {rule_id!r}; known: {', '.join(RULES)}") from None


def tag(rule_id: str) -> str:
    """``"[ID] title"`` of one rule (what assertion messages start with)."""
    return rule(rule_id).tag()


def ids_in(text: str) -> list[str]:
    """Rule ids quoted as ``[NSA-...]`` in a message, in order, without repeats."""
    import re

    seen: list[str] = []
    for found in re.findall(r"\[(NSA-[A-Z-]+)\]", text):
        if found in RULES and found not in seen:
            seen.append(found)
    return seen
