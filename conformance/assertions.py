"""Assertions whose failure messages name the violated NSA rule and quote the numbers.

Every check raises ``AssertionError`` with one line of the form::

    cmp visibility (i*d + l - 1 <= t): T=97-G=2-...: max|impl - brute| = 0.51 at t=45 head 3 dim 5 > allowed 1e-07 [fp64 out: ...]

Tolerances come from ``contracts.tolerances.lookup(dtype, quantity)`` (``tolerances.yaml``):
``max|x - ref| <= max(m * max|base - ref| + c, floor)`` with ``ref`` the fp64 brute force and
``base`` the same brute force in the low precision (for fp64 inputs the brute force is its own
baseline, so only the fp64 floor, 1e-7, is allowed). Exact checks (causality, zero rows, block
indices) allow nothing.
"""
from __future__ import annotations

from typing import Iterable

import torch

from conformance.nsa_rules import tag

# The spec's rules (``conformance.nsa_rules``), as the "[ID] title" tags failures start with;
# tests pass these as ``rule=``.
RULE_COMPRESS = f"{tag('NSA-CMP-COUNT')} / {tag('NSA-CMP-MEAN')}"
RULE_CMP = tag("NSA-CMP-VISIBLE")
RULE_CMP_EMPTY = tag("NSA-CMP-EMPTY")
RULE_CMP_LSE = tag("NSA-CMP-LSE")
RULE_SELECT = f"{tag('NSA-SEL-SCORE')} / {tag('NSA-SEL-FORCED')} / {tag('NSA-SEL-TIES')}"
RULE_SELECT_FORCED = tag("NSA-SEL-FORCED")
RULE_SELECT_LAYOUT = tag("NSA-SEL-LAYOUT")
RULE_SEL = tag("NSA-SEL-ATTN")
RULE_WIN = tag("NSA-WIN")
RULE_SCALE = tag("NSA-SCALE")
RULE_GATE = tag("NSA-GATE")
RULE_NSA = tag("NSA-FULL")
RULE_VARLEN = tag("NSA-VARLEN")
RULE_CAUSAL = tag("NSA-CAUSAL")
RULE_FINITE = tag("NSA-FINITE")
RULE_ZERO_GRAD = tag("NSA-CMP-EMPTY") + " (zero gradient)"
RULE_GRAD = tag("NSA-GRAD")
RULE_DECODE = tag("NSA-DECODE")

DTYPE_NAMES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


def dtype_name(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else DTYPE_NAMES[dtype]


def _locate(flat_index: int, shape: tuple[int, ...], cu_seqlens: torch.Tensor | None,
            dims: tuple[str, ...] = ("t", "head", "dim")) -> str:
    """Flat index into a (T, H, ...) tensor -> "seq 2 t=45 head 3 dim 0" (t local to its sequence)."""
    coords = []
    rest = flat_index
    for size in reversed(shape):
        coords.append(rest % size if size else 0)
        rest //= size if size else 1
    coords.reverse()
    parts = []
    if coords:
        t = coords[0]
        if cu_seqlens is not None:
            cu = [int(x) for x in cu_seqlens.tolist()]
            b = max(i for i in range(len(cu) - 1) if cu[i] <= t and (cu[i + 1] > t))
            parts.append(f"seq {b} t={t - cu[b]}")
        else:
            parts.append(f"t={t}")
    for name, value in zip(dims[1:], coords[1:]):
        parts.append(f"{name} {value}")
    return " ".join(parts)


def _fail(rule: str, where: str, detail: str) -> AssertionError:
    prefix = f"{rule}: {where}: " if where else f"{rule}: "
    return AssertionError(prefix + detail)


def _host64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float64)


def assert_shape(x: torch.Tensor, shape: Iterable[int], *, rule: str, where: str = "", name: str = "out") -> None:
    shape = tuple(shape)
    if tuple(x.shape) != shape:
        raise _fail(rule, where, f"{name} has shape {tuple(x.shape)}, expected {shape}")


def assert_finite(x: torch.Tensor, *, rule: str = RULE_FINITE, where: str = "", name: str = "out",
                  cu_seqlens: torch.Tensor | None = None, allow_neg_inf: bool = False) -> None:
    """No NaN (and no inf, unless ``allow_neg_inf`` for lse) in ``x: (T, H, ...)``."""
    x = x.detach()
    bad = torch.isnan(x) | torch.isposinf(x)
    if not allow_neg_inf:
        bad |= torch.isneginf(x)
    if bool(bad.any()):
        n = int(bad.sum())
        first = int(bad.flatten().nonzero()[0])
        value = float(x.flatten()[first])
        raise _fail(rule, where,
                    f"{name} has {n} non-finite value(s); first {value} at {_locate(first, tuple(x.shape), cu_seqlens)}")


def assert_zero_rows(x: torch.Tensor, rows: torch.Tensor, *, rule: str, where: str = "", name: str = "out",
                     cu_seqlens: torch.Tensor | None = None) -> None:
    """``x: (T, ...)``; every row where ``rows: (T,) bool`` is set must be exactly 0."""
    x = x.detach().cpu()
    rows = rows.cpu()
    picked = x[rows]
    if picked.numel() and bool((picked != 0).any()):
        masked = torch.where(rows.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros_like(x))
        flat = int((masked != 0).flatten().nonzero()[0])
        value = float(x.flatten()[flat])
        raise _fail(rule, where, f"{name} = {value:.3g} (must be exactly 0) at {_locate(flat, tuple(x.shape), cu_seqlens)}")


#: What the reader of a tolerance failure can change, printed with every failure.
TOLERANCE_FLAGS = ("the row follows the precision the implementation is judged at: the input dtype "
                   "(--nsa-dtype) or, when coarser, its declared compute precision "
                   "(capabilities.compute_dtype / --nsa-compute-dtype)")


def lookup_rule(dtype: torch.dtype | str, quantity: str, head_dim: int | None = None):
    """``contracts.tolerances.lookup`` (imported here, not at module import)."""
    from contracts.tolerances import lookup

    return lookup(dtype_name(dtype), quantity, head_dim=head_dim)


def assert_close(x: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None = None, *, rule: str,
                 dtype: torch.dtype | str, quantity: str = "out", where: str = "",
                 cu_seqlens: torch.Tensor | None = None, head_dim: int | None = None,
                 what: str = "impl - brute") -> None:
    """The tolerance rule of ``tolerances.yaml`` for ``(dtype, quantity)``.

    ``x``: implementation (any device/dtype); ``ref``: fp64 truth; ``base``: the same math in
    ``dtype`` (``None`` -> ``ref``, i.e. only the rule's constant/floor is allowed). Shapes
    ``(T, H, ...)``. ``-inf`` entries (empty-row lse) must sit at the same places in ``x`` and
    ``ref`` and are then left out of the numbers."""
    if tuple(x.shape) != tuple(ref.shape):
        raise _fail(rule, where, f"shape {tuple(x.shape)} != expected {tuple(ref.shape)}")
    xs, rs = _host64(x), _host64(ref)
    bs = rs if base is None else _host64(base)
    if bool(torch.isnan(xs).any()):
        assert_finite(x, rule=f"{rule} / {RULE_FINITE}", where=where, name=quantity,
                      cu_seqlens=cu_seqlens, allow_neg_inf=True)
    x_inf, r_inf = torch.isinf(xs), torch.isinf(rs)
    if not torch.equal(x_inf, r_inf) or not torch.equal(xs[x_inf], rs[r_inf]):
        flat = int((x_inf != r_inf).flatten().nonzero()[0]) if not torch.equal(x_inf, r_inf) else \
            int((x_inf & (xs != rs)).flatten().nonzero()[0])
        raise _fail(rule, where, f"{quantity} = {float(xs.flatten()[flat])} but expected "
                    f"{float(rs.flatten()[flat])} at {_locate(flat, tuple(xs.shape), cu_seqlens)}")
    finite = ~r_inf
    xs, rs, bs = (torch.where(finite, a, torch.zeros_like(a)) for a in (xs, rs, bs))
    bs = torch.where(torch.isinf(bs), rs, bs)
    verdict = lookup_rule(dtype, quantity, head_dim).check(xs, rs, bs)
    if not bool(verdict):
        diff = (xs - rs).abs()
        flat = int(diff.flatten().argmax()) if diff.numel() else 0
        err = float(diff.max()) if diff.numel() else 0.0
        allowed = getattr(verdict, "allowed", float("nan"))
        row = lookup_rule(dtype, quantity, head_dim)
        raise _fail(rule, where, f"max|{what}| = {err:.3g} at {_locate(flat, tuple(xs.shape), cu_seqlens)} "
                    f"> allowed {allowed:.3g} [{dtype_name(dtype)} {quantity}: {verdict}] "
                    f"[tolerance row tolerances.yaml rules.{row.dtype}.{row.quantity}: m={row.m:g} c={row.c:g} "
                    f"floor={row.floor:g}; {TOLERANCE_FLAGS}]")


def assert_equal(x: torch.Tensor, ref: torch.Tensor, *, rule: str, where: str = "", name: str = "out",
                 cu_seqlens: torch.Tensor | None = None, what: str = "after - before") -> None:
    """Bitwise equality (used for causality: changing the future must not move the past at all)."""
    if tuple(x.shape) != tuple(ref.shape):
        raise _fail(rule, where, f"{name} shape {tuple(x.shape)} != {tuple(ref.shape)}")
    a, b = x.detach().cpu(), ref.detach().cpu()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if not bool(same.all()):
        diff = (a.double() - b.double()).abs().nan_to_num(float("inf"))
        diff = torch.where(same, torch.zeros_like(diff), diff)
        flat = int(diff.flatten().argmax())
        raise _fail(rule, where, f"{name}: {int((~same).sum())} value(s) changed; max|{what}| = "
                    f"{float(diff.max()):.3g} at {_locate(flat, tuple(a.shape), cu_seqlens)} (must be 0)")


def assert_block_idx(idx: torch.Tensor, ref: torch.Tensor, scores: list[torch.Tensor], *,
                     cu_seqlens: torch.Tensor | None = None, where: str = "", tie_rtol: float = 0.0) -> None:
    """Selected blocks ``idx (T, Hkv, n)`` equal the brute force's ``ref`` exactly.

    ``scores``: per sequence the brute-force scores ``(T_b, Hkv, nb_b)``. Where the two choose
    different blocks, the mismatch is accepted only if it is a genuine near-tie: both choices
    have the same multiset of scores within ``tie_rtol`` (0 = exact ties only)."""
    idx = idx.detach().cpu()
    if tuple(idx.shape) != tuple(ref.shape):
        raise _fail(RULE_SELECT_LAYOUT, where, f"block_idx shape {tuple(idx.shape)} != expected {tuple(ref.shape)}")
    if idx.dtype.is_floating_point:
        raise _fail(RULE_SELECT_LAYOUT, where, f"block_idx dtype {idx.dtype} is not an integer type")
    idx = idx.to(torch.int64)
    ref = ref.to(torch.int64)
    bounds = [(0, idx.shape[0])] if cu_seqlens is None else list(zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:]))
    for b, (s, e) in enumerate(bounds):
        for t in range(e - s):
            for kv in range(idx.shape[1]):
                got, want = idx[s + t, kv].tolist(), ref[s + t, kv].tolist()
                if got == want:
                    continue
                loc = (f"seq {b} " if cu_seqlens is not None else "") + f"t={t} kv head {kv}"
                sc = scores[b][t, kv]
                g_real, w_real = [j for j in got if j >= 0], [j for j in want if j >= 0]
                ok = (
                    len(g_real) == len(w_real)
                    and all(0 <= j < sc.shape[0] for j in g_real)
                    and g_real == sorted(set(g_real))
                    and got[len(g_real):] == [-1] * (len(got) - len(g_real))
                )
                if ok:
                    gs = sorted(float(sc[j]) for j in g_real)
                    ws = sorted(float(sc[j]) for j in w_real)
                    ok = all(abs(a - c) <= tie_rtol * max(abs(a), abs(c)) for a, c in zip(gs, ws))
                if not ok:
                    detail = ", ".join(f"{j}:{float(sc[j]):.6g}" for j in sorted(set(g_real) ^ set(w_real))
                                       if 0 <= j < sc.shape[0])
                    raise _fail(RULE_SELECT, where, f"{loc}: impl picked {got}, brute picked {want} "
                                f"(scores of the differing blocks {detail or 'n/a'})")


def assert_selection_layout(idx: torch.Tensor, cfg, lengths: Iterable[int], hkv: int, *, where: str = "",
                            cu_seqlens: torch.Tensor | None = None) -> None:
    """``idx (T, Hkv, n_sel)``: integer, per row the valid entries come first, strictly ascending,
    inside 0..c (c = t // l'), then -1 padding; min(n_sel, c + 1) of them; forced blocks present."""
    from conformance import brute

    g = brute.geometry(cfg)
    lengths = list(lengths)
    assert_shape(idx, (sum(lengths), hkv, g.n), rule=RULE_SELECT_LAYOUT, where=where, name="block_idx")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise _fail(RULE_SELECT_LAYOUT, where, f"block_idx dtype is {idx.dtype}, expected an integer type (int32)")
    idx = idx.detach().cpu().to(torch.int64)
    start = 0
    for b, T in enumerate(lengths):
        for t in range(T):
            c = t // g.l_sel
            forced = brute.forced_blocks(t, g)
            for kv in range(hkv):
                row = idx[start + t, kv].tolist()
                real = [j for j in row if j != -1]
                loc = (f"seq {b} " if cu_seqlens is not None else "") + f"t={t} kv head {kv}: block_idx {row}"
                if row[: len(real)] != real:
                    raise _fail(RULE_SELECT_LAYOUT, where, f"{loc}: -1 padding must come last")
                if real != sorted(set(real)):
                    raise _fail(RULE_SELECT_LAYOUT, where, f"{loc}: not strictly ascending")
                if real and (real[0] < 0 or real[-1] > c):
                    raise _fail(RULE_SELECT_LAYOUT, where, f"{loc}: entries must lie in 0..c = 0..{c}")
                if len(real) != min(g.n, c + 1):
                    raise _fail(RULE_SELECT, where, f"{loc}: {len(real)} blocks, expected min(n_sel, c + 1) = {min(g.n, c + 1)}")
                missing = [j for j in forced if j not in real]
                if missing:
                    raise _fail(RULE_SELECT, where, f"{loc}: forced block(s) {missing} missing "
                                f"(init 0..{g.n_init - 1}, local {c - g.n_local + 1}..{c})")
        start += T
