"""Numerical tolerances from ``tolerances.yaml``: ``max|X - ref| <= max(m * max|X_base - ref| + c, floor)``.

``ref`` is the high-precision truth, ``X_base`` the same math in X's low precision; the bound is
``m`` times what rounding alone costs, plus ``c``, never below ``floor``. The YAML file says where
each constant comes from.

    rule = lookup(torch.bfloat16, "out")
    verdict = rule.check(out, ref, base)   # all compared in fp64 on their device
    assert verdict, str(verdict)

The default file is ``contracts/tolerances.yaml`` (the repository root's ``tolerances.yaml`` links to it), or
the path in ``NSA_TOLERANCES``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_VAR = "NSA_TOLERANCES"
DTYPES = ("fp16", "bf16", "fp32", "fp64")
QUANTITIES = ("out", "lse", "dq", "dk", "dv")

DtypeName = Literal["fp16", "bf16", "fp32", "fp64"]
Quantity = Literal["out", "lse", "dq", "dk", "dv"]

_DTYPE_ALIASES = {
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "fp64": "fp64", "float64": "fp64", "double": "fp64", "torch.float64": "fp64",
}
_TORCH_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


class ToleranceFileError(ValueError):
    """The tolerance file is missing, not YAML, or has a wrong field (the message names both)."""


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` / ``"bfloat16"`` / ``"bf16"`` -> ``"bf16"``; unknown -> ValueError."""
    if isinstance(dtype, torch.dtype):
        name = _TORCH_DTYPES.get(dtype)
    else:
        name = _DTYPE_ALIASES.get(str(dtype).strip().lower())
    if name is None:
        raise ValueError(
            f"no tolerance for dtype {dtype!r}; known: fp16/float16/half, bf16/bfloat16, "
            "fp32/float32/float, fp64/float64/double (or the torch dtypes)"
        )
    return name


def _fmt(x: float) -> str:
    return f"{x:.1e}"


class Verdict(BaseModel):
    """Outcome of one tolerance check; truthy when it passed; ``str()`` is one readable line."""

    model_config = ConfigDict(frozen=True)

    passed: bool
    err: float
    base_err: float
    allowed: float
    m: float
    c: float
    floor: float
    dtype: str
    quantity: str
    n_nonfinite: int = 0

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        bound = f"{self.m:g} * {_fmt(self.base_err)} + {self.c:g}"
        if self.floor > self.m * self.base_err + self.c:
            bound = f"max({bound}, floor {self.floor:g})"
        op = "<=" if self.err <= self.allowed else ">"
        line = f"{self.quantity} {self.dtype}: max|x-ref| = {_fmt(self.err)} {op} {bound} = {_fmt(self.allowed)}"
        if self.n_nonfinite:
            line += f", {self.n_nonfinite} non-finite value(s) where ref is finite"
        return line + (" (pass)" if self.passed else " (FAIL)")


class ToleranceRule(BaseModel):
    """``max|X - ref| <= max(m * base_err + c, floor)`` for one dtype and quantity."""

    model_config = ConfigDict(frozen=True)

    dtype: DtypeName
    quantity: Quantity
    m: float = Field(ge=0)
    c: float = Field(ge=0)
    floor: float = Field(ge=0)
    source: str

    def allowed(self, base_err: float) -> float:
        """The largest error allowed when the same-precision baseline is off by ``base_err``."""
        return max(self.m * base_err + self.c, self.floor)

    def check(self, x: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> Verdict:
        """x, ref, base: same shape -> Verdict (compared in fp64 on x's device).

        Non-finite values: where ref is finite, any non-finite x fails; where ref is not finite, x
        must match it (same infinity, or NaN for NaN). ``base_err`` is taken where ref and base are
        both finite.
        """
        if x.shape != ref.shape or base.shape != ref.shape:
            raise ValueError(
                f"shapes differ: x {tuple(x.shape)}, ref {tuple(ref.shape)}, base {tuple(base.shape)}"
            )
        device = x.device
        x64 = x.detach().to(device=device, dtype=torch.float64)
        r64 = ref.detach().to(device=device, dtype=torch.float64)
        b64 = base.detach().to(device=device, dtype=torch.float64)
        ref_ok = torch.isfinite(r64)
        x_ok = torch.isfinite(x64)
        same_special = (x64 == r64) | (torch.isnan(x64) & torch.isnan(r64))
        n_bad = int(((ref_ok & ~x_ok) | (~ref_ok & ~same_special)).sum())
        err = _max_abs_diff(x64, r64, ref_ok & x_ok)
        base_err = _max_abs_diff(b64, r64, ref_ok & torch.isfinite(b64))
        allowed = self.allowed(base_err)
        return Verdict(
            passed=n_bad == 0 and err <= allowed, err=err, base_err=base_err, allowed=allowed,
            m=self.m, c=self.c, floor=self.floor, dtype=self.dtype, quantity=self.quantity,
            n_nonfinite=n_bad,
        )


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = torch.where(where, (a - b).abs(), torch.zeros((), dtype=a.dtype, device=a.device))
    return float(diff.max())


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    m: float = Field(ge=0)
    c: float = Field(ge=0)
    floor: float = Field(ge=0)
    source: str = Field(min_length=1)


class _HeadDimEntry(_Entry):
    max_head_dim: int = Field(ge=1)


class _FileEntry(_Entry):
    by_head_dim: list[_HeadDimEntry] = []


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    rules: dict[DtypeName, dict[Quantity, _FileEntry]]


class ToleranceTable(BaseModel):
    """Every (dtype, quantity) rule of one tolerance file, with its optional head-dim overrides."""

    model_config = ConfigDict(frozen=True)

    path: str | None = None
    rules: dict[str, dict[str, ToleranceRule]]
    head_dim_overrides: dict[str, dict[str, tuple[tuple[int, ToleranceRule], ...]]] = {}

    def lookup(self, dtype: torch.dtype | str, quantity: str, head_dim: int | None = None) -> ToleranceRule:
        """The rule for ``dtype`` and ``quantity`` (and ``head_dim`` where an override exists)."""
        name = dtype_name(dtype)
        if quantity not in QUANTITIES:
            raise ValueError(f"no tolerance for quantity {quantity!r}; known: {', '.join(QUANTITIES)}")
        if head_dim is not None:
            for max_head_dim, rule in self.head_dim_overrides.get(name, {}).get(quantity, ()):
                if head_dim <= max_head_dim:
                    return rule
        return self.rules[name][quantity]


def default_path() -> Path:
    """``NSA_TOLERANCES`` if set, else the package's tolerances.yaml (the repository root's
    tolerances.yaml is a link to it, so both names edit the same file)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().with_name("tolerances.yaml")


def _error_location(loc: tuple) -> str:
    parts = [str(part) for part in loc if part != "[key]"]
    where = ".".join(parts) or "<top level>"
    return f"{where} (as a key)" if "[key]" in loc else where


def load(path: str | os.PathLike | None = None) -> ToleranceTable:
    """Read and validate a tolerance file (default: ``default_path()``)."""
    file = Path(path) if path is not None else default_path()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ToleranceFileError(f"{file}: cannot read tolerance file ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ToleranceFileError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ToleranceFileError(
            f"{file}: field '<top level>': expected a mapping with 'version' and 'rules', "
            f"got {type(data).__name__}"
        )
    try:
        parsed = _File.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{_error_location(err['loc'])}': {err['msg']}" for err in exc.errors()
        )
        raise ToleranceFileError(f"{file}: {problems}") from exc
    missing = [f"rules.{d}.{q}" for d in DTYPES for q in QUANTITIES if q not in parsed.rules.get(d, {})]
    if missing:
        raise ToleranceFileError(f"{file}: missing field(s) {', '.join(missing)}")
    rules: dict[str, dict[str, ToleranceRule]] = {}
    overrides: dict[str, dict[str, tuple]] = {}
    for d, by_quantity in parsed.rules.items():
        for q, entry in by_quantity.items():
            rules.setdefault(d, {})[q] = ToleranceRule(
                dtype=d, quantity=q, m=entry.m, c=entry.c, floor=entry.floor, source=entry.source
            )
            if entry.by_head_dim:
                overrides.setdefault(d, {})[q] = tuple(
                    (o.max_head_dim, ToleranceRule(dtype=d, quantity=q, m=o.m, c=o.c, floor=o.floor, source=o.source))
                    for o in entry.by_head_dim
                )
    return ToleranceTable(path=str(file), rules=rules, head_dim_overrides=overrides)


_DEFAULT: dict[tuple[str, int], ToleranceTable] = {}


def _default_table() -> ToleranceTable:
    path = default_path()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = -1
    key = (str(path), stamp)
    table = _DEFAULT.get(key)
    if table is None:
        table = load(path)
        _DEFAULT.clear()
        _DEFAULT[key] = table
    return table


def lookup(
    dtype: torch.dtype | str, quantity: str, head_dim: int | None = None,
    table: ToleranceTable | None = None,
) -> ToleranceRule:
    """The ToleranceRule for ``dtype`` ("bf16", torch.bfloat16, ...) and quantity (out/lse/dq/dk/dv)."""
    return (table or _default_table()).lookup(dtype, quantity, head_dim)


__all__ = [
    "ToleranceFileError", "ToleranceRule", "ToleranceTable", "Verdict", "load", "lookup",
    "dtype_name", "default_path", "DTYPES", "QUANTITIES",
]
