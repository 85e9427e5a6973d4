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

# Default config: paper §4.1 (l=32, d=16, l'=64, n=16 with 1 init + 2 local, w=512).
DEFAULT_CFG: tuple[tuple[str, Any], ...] = ()
# Small config with the same structure, for varlen, causality, gradcheck and property tests:
# blocks of 8 with stride 4, selection blocks of 16, 3 picks (1 init + 1 local + 1 by score),
# window 16. Every rule is exercised at a few dozen tokens.
SMALL_CFG: tuple[tuple[str, Any], ...] = (
    ("block_len", 8), ("block_stride", 4), ("sel_block", 16),
    ("n_sel", 3), ("n_init", 1), ("n_local", 1), ("window", 16),
)

# Odd sizes around the default block length l = 32: empty, all-empty-cmp, first visible block,
# one block past it, an odd length and one past a power of two (window 512 and 17 sel blocks).
DEFAULT_T = (1, 30, 31, 32, 97, 1025)
# (Hq, Hkv): G = 1, 2 and the paper's 16.
HEADS = ((2, 2), (4, 2), (16, 1))
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
        cfg = "default" if not self.cfg else "cfg(" + ",".join(f"{k}={v}" for k, v in self.cfg) + ")"
        return f"{shape}-G={self.G}-Hq={self.hq}-Dk={self.dk}-Dv={self.dv}-{cfg}"

    def __str__(self) -> str:
        return self.id


def single(T: int, hq: int, hkv: int, cfg=DEFAULT_CFG, **kw) -> Case:
    return Case(lengths=(T,), hq=hq, hkv=hkv, cfg=tuple(cfg), **kw)


def default_cases():
    """Default config, T in DEFAULT_T x G in {1, 2, 16}, Dk != Dv, as pytest params.

    T = 1025 with G = 16 is marked ``slow`` (10-20 s for sel/nsa through nsa_ref's CPU SDPA
    path); T = 1025 with G = 1 and 2 stays in the default run, so the 512-token window and the
    17th selection block are always covered."""
    import pytest

    params = []
    for T in DEFAULT_T:
        for hq, hkv in HEADS:
            case = single(T, hq, hkv)
            marks = [pytest.mark.slow] if T >= 1025 and hq // hkv >= 16 else []
            params.append(pytest.param(case, id=case.id, marks=marks))
    return params


def as_params(cases) -> list:
    """Cases -> pytest params with readable ids (pytest params pass through)."""
    import pytest

    return [c if not isinstance(c, Case) else pytest.param(c, id=c.id) for c in cases]


def small_cases() -> list[Case]:
    """Small config, odd lengths crossing every block boundary of interest."""
    return [single(T, hq, hkv, SMALL_CFG, dk=13, dv=7) for T in (1, 7, 8, 9, 37) for hq, hkv in HEADS[:2]]


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
        cu = torch.tensor([0, *torch.tensor(case.lengths).cumsum(0).tolist()], dtype=torch.int32)
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
def problem(case: Case, branch: str, dtype: torch.dtype = torch.float64) -> Problem:
    """Inputs and brute-force truth for ``branch`` in {"cmp", "select", "sel", "win", "nsa"}.

    The discrete inputs (compressed keys, block indices) come from the fp64 truth and are fed to
    the implementation, the truth and the baseline alike, so a branch is judged on its own."""
    from conformance import brute

    cfg = case.config()
    x_lp = make_inputs(case, dtype)
    x = x_lp.double()
    _, parts = brute_truth(case)
    same = dtype == torch.float64

    def both(fn, *tensors):
        """(fn on the fp64 copies: the truth, fn on the low-precision tensors themselves: the base)."""
        return fn(*(t.double() for t in tensors)), fn(*tensors)

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
        truth = parts["block_idx"] if same else brute.select_blocks(x.q, k_cmp.double(), cfg, cu)
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


def config_strategy():
    """Hypothesis strategy of small valid NSAConfig keyword dicts (l multiple of d, l' multiple of d)."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        d = draw(st.sampled_from([1, 2, 4]))
        l = d * draw(st.integers(1, 3))
        l_sel = d * draw(st.integers(1, 4))
        n_init = draw(st.integers(0, 2))
        n_local = draw(st.integers(0, 2))
        n_sel = n_init + n_local + draw(st.integers(0, 3))
        if n_sel == 0:
            n_sel = 1
        window = draw(st.integers(1, 20))
        scale = draw(st.sampled_from([None, 0.3]))
        return dict(block_len=l, block_stride=d, sel_block=l_sel, n_sel=n_sel, n_init=n_init,
                    n_local=n_local, window=window, scale=scale)

    return build()


def case_strategy(max_len: int = 40, varlen: bool = False):
    """Hypothesis strategy of small ``Case``s (random config, heads, dims, lengths, seed)."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        cfg = draw(config_strategy())
        hkv = draw(st.integers(1, 2))
        G = draw(st.sampled_from([1, 2, 3]))
        dk = draw(st.integers(1, 9))
        dv = draw(st.integers(1, 9))
        if varlen:
            lengths = tuple(draw(st.lists(st.integers(0, max_len // 2), min_size=1, max_size=4)))
        else:
            lengths = (draw(st.integers(1, max_len)),)
        seed = draw(st.integers(0, 2**16))
        return Case(lengths=lengths, hq=hkv * G, hkv=hkv, dk=dk, dv=dv,
                    cfg=tuple(sorted(cfg.items())), varlen=varlen, seed=seed)

    return build()
