"""Shape cases and seeded inputs for the conformance tests.

A ``Case`` is plain, hashable data (no tensors), so pytest ids are readable and the brute-force
truth can be cached per case. ``make_inputs`` builds the tensors: always drawn in fp64 on the CPU
from a fixed seed, then cast to the dtype under test and moved to the device under test. The
truth is computed from the *cast* values (``Inputs.double()``), so the only difference between
implementation and truth is the implementation's own arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch

from conformance.families import (  # noqa: F401 (re-exported)
    FAMILIES, SMALL_CFG, SMALL_TIED_CFG, SMALL_TIED_DIMS, family_of,
)

# Default config: paper §4.1 (l=32, d=16, l'=64, n=16 with 1 init + 2 local, w=512).
DEFAULT_CFG: tuple[tuple[str, Any], ...] = ()
#: NSAConfig's defaults for the fields a case may override (kept equal to nsa_ref.NSAConfig:
#: tests/conformance checks it), so capabilities can be judged without importing nsa_ref.
CFG_DEFAULTS: dict[str, Any] = dict(block_len=32, block_stride=16, sel_block=64, n_sel=16, n_init=1,
                                    n_local=2, window=512, scale=None)

# Dk != Dv as in the paper (192 / 128), kept small; multiples of 8 so a GPU kernel can run them.
DK, DV = 24, 16

VARLEN_LENGTHS = (0, 5, 40, 0, 97)


@dataclass(frozen=True)
class Case:
    """One shape: sequence lengths (packed with cu_seqlens when ``varlen``), heads, dims, config."""

    lengths: tuple[int, ...]
    hq: int
    hkv: int
    dk: int = DK
    dv: int = DV
    cfg: tuple[tuple[str, Any], ...] = DEFAULT_CFG
    varlen: bool = False
    seed: int = 0
    label: str = field(default="", compare=False)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def G(self) -> int:
        return self.hq // self.hkv

    def cfg_fields(self) -> dict[str, Any]:
        """Every config field of this case (defaults filled in), as a plain dict."""
        out = dict(CFG_DEFAULTS)
        out.update(dict(self.cfg))
        return out

    @property
    def family(self) -> str:
        return family_of(self.cfg)

    def config(self):
        """The ``nsa_ref.NSAConfig`` of this case (imported lazily: nsa_ref is CPU-safe)."""
        from nsa_ref import NSAConfig

        return NSAConfig(**dict(self.cfg))

    def with_cfg(self, **overrides) -> "Case":
        merged = dict(self.cfg)
        merged.update(overrides)
        return replace(self, cfg=tuple(sorted(merged.items())))

    @property
    def id(self) -> str:
        if self.label:
            return self.label
        shape = ("L=" + ",".join(map(str, self.lengths))) if self.varlen else f"T={self.total}"
        fam = self.family
        cfg = fam if fam != "custom" else "cfg(" + ",".join(f"{k}={v}" for k, v in self.cfg) + ")"
        return f"{cfg}-{shape}-G={self.G}-Hq={self.hq}-Dk={self.dk}-Dv={self.dv}"

    def __str__(self) -> str:
        return self.id


def single(T: int, hq: int, hkv: int, cfg=DEFAULT_CFG, **kw) -> Case:
    return Case(lengths=(T,), hq=hq, hkv=hkv, cfg=tuple(cfg), **kw)


def family_cases(dk: int = DK, dv: int = DV, families=None, slow: bool = True) -> list:
    """Every config family (``conformance.families``) x its shapes, as pytest params; ``dk``/``dv``
    for families that do not fix their own head dims.

    Shapes whose brute force takes seconds on a CPU are marked ``slow`` (run with ``-m slow``);
    ``slow=False`` leaves them out."""
    import pytest

    params = []
    for fam in (FAMILIES.values() if families is None else (FAMILIES[f] for f in families)):
        for shapes, marks in ((fam.shapes, []), (fam.slow if slow else (), [pytest.mark.slow])):
            fdk, fdv = fam.dims or (dk, dv)
            for T, hq, hkv in shapes:
                case = single(T, hq, hkv, fam.cfg, dk=fdk, dv=fdv)
                params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def default_cases():
    """The family grid with Dk != Dv (24 / 16): the case list of the branch and full-NSA tests."""
    return family_cases()


def as_params(cases) -> list:
    """Cases -> pytest params with readable ids (pytest params pass through)."""
    import pytest

    return [c if not isinstance(c, Case) else pytest.param(c, id=c.id) for c in cases]


def small_cases() -> list[Case]:
    """Small configs (strided and tied), lengths at the block boundaries of interest; odd head
    dims (13 / 7) in the strided layout."""
    strided = [single(T, hq, hkv, SMALL_CFG, dk=13, dv=7) for T, hq, hkv in ((9, 16, 1), (37, 4, 2))]
    tied = [single(T, hq, hkv, SMALL_TIED_CFG, **SMALL_TIED_DIMS) for T, hq, hkv in
            ((1, 16, 1), (31, 16, 1), (33, 16, 1), (80, 32, 2), (100, 16, 1))]
    return strided + tied


def varlen_case(lengths=VARLEN_LENGTHS, hq: int = 4, hkv: int = 2, cfg=SMALL_CFG, **kw) -> Case:
    return Case(lengths=tuple(lengths), hq=hq, hkv=hkv, cfg=tuple(cfg), varlen=True, **kw)


@dataclass
class Inputs:
    """``q (T, Hq, Dk)``, ``k (T, Hkv, Dk)``, ``v (T, Hkv, Dv)``, ``gates (T, Hq, 3)``, ``cu_seqlens (B+1,) int32 | None``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gates: torch.Tensor
    cu_seqlens: torch.Tensor | None

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Inputs":
        def cast(x):
            return x.to(device=device, dtype=dtype)

        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device=device)
        return Inputs(cast(self.q), cast(self.k), cast(self.v), cast(self.gates), cu)

    def double(self) -> "Inputs":
        """fp64 on the CPU: what the brute force takes."""
        return self.to(torch.float64, "cpu")

    def clone(self) -> "Inputs":
        cu = None if self.cu_seqlens is None else self.cu_seqlens.clone()
        return Inputs(self.q.clone(), self.k.clone(), self.v.clone(), self.gates.clone(), cu)


def make_inputs(case: Case, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Inputs:
    """Seeded inputs for ``case``; drawn in fp64 on the CPU, then cast and moved."""
    gen = torch.Generator().manual_seed(1000 + case.seed)
    T = case.total
    q = torch.randn(T, case.hq, case.dk, generator=gen, dtype=torch.float64)
    k = torch.randn(T, case.hkv, case.dk, generator=gen, dtype=torch.float64)
    v = torch.randn(T, case.hkv, case.dv, generator=gen, dtype=torch.float64)
    gates = torch.rand(T, case.hq, 3, generator=gen, dtype=torch.float64)
    cu = None
    if case.varlen:
        from nsa_ref.packing import cu_seqlens_from_lengths

        cu = cu_seqlens_from_lengths(case.lengths)
    return Inputs(q, k, v, gates, cu).to(dtype, device)


@lru_cache(maxsize=64)
def brute_truth(case: Case) -> tuple[torch.Tensor, dict]:
    """Brute-force full NSA of ``case`` in fp64 and its parts (``brute.nsa_attention``).

    Cached: the branch tests of one case share one (slow) brute-force run."""
    from conformance import brute

    x = make_inputs(case, torch.float64)
    return brute.nsa_attention(x.q, x.k, x.v, x.gates, case.config(), x.cu_seqlens, return_parts=True)


@dataclass(frozen=True)
class Problem:
    """What one branch test feeds the implementation and what it compares against.

    ``args``: tensors for the implementation in the dtype under test (CPU; the test moves them);
    ``truth``: brute force in fp64 from exactly those (cast) values;
    ``base``: the same brute force computed in the dtype under test (``None`` for fp64: the
    truth is its own baseline). ``truth``/``base`` are a tensor or a tuple (out, lse)."""

    args: dict
    truth: Any
    base: Any


@lru_cache(maxsize=128)
def problem(case: Case, branch: str, dtype: torch.dtype = torch.float64,
            judged: torch.dtype | None = None) -> Problem:
    """Inputs and brute-force truth for ``branch`` in {"cmp", "select", "sel", "win", "nsa"}.

    ``dtype``: what the implementation gets; ``judged``: the precision it is judged at (its
    declared compute precision when coarser than ``dtype``, see ``ImplUnderTest.judged_dtype``;
    default ``dtype``). The baseline is the brute force computed in ``judged`` from the very
    values handed over. The discrete inputs (compressed keys, block indices) come from the fp64
    truth and are fed to the implementation, the truth and the baseline alike, so a branch is
    judged on its own."""
    from conformance import brute

    judged = dtype if judged is None else judged
    cfg = case.config()
    x_lp = make_inputs(case, dtype)
    x = x_lp.double()
    _, parts = brute_truth(case)
    same = dtype == torch.float64 and judged == torch.float64

    def both(fn, *tensors):
        """(fn on fp64 copies: the truth, fn on the copies in the judged precision: the base)."""
        return fn(*(t.double() for t in tensors)), fn(*(t.to(judged) for t in tensors))

    cu = x.cu_seqlens
    if branch == "cmp":
        k_cmp, v_cmp = parts["k_cmp"].to(dtype), parts["v_cmp"].to(dtype)
        args = dict(q=x_lp.q, k_cmp=k_cmp, v_cmp=v_cmp, cu_seqlens=cu)
        if same:
            truth, base = (parts["cmp"], parts["lse"]), None
        else:
            truth, base = both(lambda q, kc, vc: brute.cmp_attention(q, kc, vc, cfg, cu), x_lp.q, k_cmp, v_cmp)
        return Problem(args, truth, base)
    if branch == "select":
        k_cmp = parts["k_cmp"].to(dtype)
        args = dict(q=x_lp.q, k_cmp=k_cmp, cu_seqlens=cu)
        truth = parts["block_idx"] if dtype == torch.float64 else brute.select_blocks(x.q, k_cmp.double(), cfg, cu)
        return Problem(args, truth, None)
    if branch == "sel":
        block_idx = parts["block_idx"]
        args = dict(q=x_lp.q, k=x_lp.k, v=x_lp.v, block_idx=block_idx, cu_seqlens=cu)
        if same:
            truth, base = parts["sel"], None
        else:
            truth, base = both(lambda q, k, v: brute.sel_attention(q, k, v, block_idx, cfg, cu), x_lp.q, x_lp.k, x_lp.v)
        return Problem(args, truth, base)
    if branch == "win":
        args = dict(q=x_lp.q, k=x_lp.k, v=x_lp.v, cu_seqlens=cu)
        if same:
            truth, base = parts["win"], None
        else:
            truth, base = both(lambda q, k, v: brute.win_attention(q, k, v, cfg, cu), x_lp.q, x_lp.k, x_lp.v)
        return Problem(args, truth, base)
    if branch == "nsa":
        args = dict(q=x_lp.q, k=x_lp.k, v=x_lp.v, gates=x_lp.gates, cu_seqlens=cu)
        if same:
            return Problem(args, brute_truth(case)[0], None)
        truth, base = both(lambda q, k, v, gt: brute.nsa_attention(q, k, v, gt, cfg, cu),
                           x_lp.q, x_lp.k, x_lp.v, x_lp.gates)
        return Problem(args, truth, base)
    raise ValueError(f"unknown branch {branch!r}; expected cmp, select, sel, win or nsa")


def selection_free(case: Case) -> Case:
    """The case with n_sel >= the number of selection blocks of its longest sequence: every block
    is selected, so a near-tie flipped by rounding (below fp64) cannot change the output."""
    from conformance import brute

    g = brute.geometry(case.config())
    nb = max([brute.num_sel_blocks(T, g) for T in case.lengths] + [1])
    return case if g.n >= nb else case.with_cfg(n_sel=nb)


def lengths_to_cu(lengths, device=None) -> torch.Tensor:
    """B lengths -> ``cu_seqlens (B+1,) int32``."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def on_device(args: dict, device) -> dict:
    """Copy every tensor of ``args`` to ``device`` (dtype unchanged). Always a copy, so an
    implementation that writes into its inputs cannot corrupt the cached problem."""
    return {k: (v.to(device, copy=True) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def tie_rtol(dtype: torch.dtype) -> float:
    """Relative score difference below which two selection blocks count as tied in ``dtype``."""
    return 16 * torch.finfo(dtype).eps


def property_settings(max_examples: int = 15):
    """Hypothesis settings for CI: bounded, no deadline, derandomized (same examples every run)."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def config_strategy(caps=None, slot: str = "nsa"):
    """Hypothesis strategy of small valid NSAConfig keyword dicts (l multiple of d, l' multiple of
    d), drawn only from what ``caps`` (``conformance.capabilities.Capabilities``) declares."""
    from hypothesis import strategies as st

    from conformance.capabilities import ANYTHING, SLOT_FIELDS

    caps = caps or ANYTHING
    used = SLOT_FIELDS.get(slot, SLOT_FIELDS["nsa"])

    def pick(allowed, default):
        return st.sampled_from(list(allowed)) if allowed is not None else default

    @st.composite
    def build(draw):
        if caps.tied_blocks:
            size = draw(pick(caps.block_sizes, st.sampled_from([2, 4, 8])))
            d = l = l_sel = size
        else:
            d = draw(st.sampled_from([1, 2, 4]))
            l = d * draw(st.integers(1, 3))
            l_sel = d * draw(st.integers(1, 4))
            if caps.block_sizes is not None:
                d = l = l_sel = draw(st.sampled_from(list(caps.block_sizes)))
        n_init = draw(pick(caps.n_init, st.integers(0, 2)))
        n_local = draw(pick(caps.n_local, st.integers(0, 2)))
        n_sel = max(n_init + n_local + draw(st.integers(0, 3)), caps.min_n_sel, 1)
        window = draw(st.integers(1, 20))
        scale = draw(st.sampled_from([None, 0.3] if caps.explicit_scale or "scale" not in used else [None]))
        return dict(block_len=l, block_stride=d, sel_block=l_sel, n_sel=n_sel, n_init=n_init,
                    n_local=n_local, window=window, scale=scale)

    return build()


def case_strategy(max_len: int = 40, varlen: bool = False, caps=None, slot: str = "nsa"):
    """Hypothesis strategy of small ``Case``s (random config, heads, dims, lengths, seed) inside
    the space ``caps`` declares for ``slot`` (group sizes, head dims, empty sequences, and any
    further rule ``caps.not_supported_reasons`` applies)."""
    from hypothesis import strategies as st

    from conformance.capabilities import ANYTHING

    caps = caps or ANYTHING
    groups = [g for g in (1, 2, 3, 4, 16, 32) if caps.min_group <= g and (caps.max_group is None or g <= caps.max_group)
              and not (caps.group_power_of_two and g & (g - 1))][:3] or [caps.min_group]
    step = caps.head_dim_multiple
    low = -(-max(caps.min_head_dim, step) // step) * step  # smallest allowed multiple of step
    top = max(low, min(caps.max_head_dim or low + 8 * step, low + 8 * step) // step * step)

    @st.composite
    def build(draw):
        cfg = draw(config_strategy(caps, slot))
        G = draw(st.sampled_from(groups))
        hkv = draw(st.integers(1, 2)) if G < 16 else 1
        dk = draw(st.integers(low // step, top // step)) * step
        dv = dk if caps.equal_head_dims else draw(st.integers(low // step, top // step)) * step
        if varlen:
            lo = 0 if caps.empty_sequences else 1
            lengths = tuple(draw(st.lists(st.integers(lo, max_len // 2), min_size=1, max_size=4)))
        else:
            lengths = (draw(st.integers(1, max_len)),)
        seed = draw(st.integers(0, 2**16))
        return Case(lengths=lengths, hq=hkv * G, hkv=hkv, dk=dk, dv=dv,
                    cfg=tuple(sorted(cfg.items())), varlen=varlen, seed=seed)

    # The draws above follow the plain fields; a declaration may say more (a Capabilities subclass
    # with its own config rules): keep only cases it accepts, so a property never leaves the space.
    return build().filter(lambda case: not caps.not_supported_reasons(case, slot))
