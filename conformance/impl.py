"""The implementation under test: our ``nsa_ref`` by default, or callables named on the command line.

A user points the suite at their code with ``module:function`` specs (see ``conformance.plugin``):

==========  ==========================================================================  =========
slot        signature the callable must have                                             returns
==========  ==========================================================================  =========
nsa         ``f(q, k, v, gates, cfg, cu_seqlens=None)``                                  out
cmp         ``f(q, k_cmp, v_cmp, cfg, cu_seqlens=None)``                                 out or (out, lse)
sel         ``f(q, k, v, block_idx, cfg, cu_seqlens=None)``                              out
win         ``f(q, k, v, cfg, cu_seqlens=None)``                                         out
select      ``f(q, k_cmp, cfg, cu_seqlens=None)``                                        block_idx
compress    ``f(x, cfg, cu_seqlens=None)``                                               x_cmp or (x_cmp, cu_seqlens_cmp)
==========  ==========================================================================  =========

Shapes follow the FA-2 varlen layout (Design.md): ``q (T, Hq, Dk)``, ``k (T, Hkv, Dk)``,
``v (T, Hkv, Dv)``, ``gates (T, Hq, 3)``, ``k_cmp (Tc, Hkv, Dk)``, ``block_idx (T, Hkv, n_sel)``,
``out (T, Hq, Dv)``, ``lse (T, Hq)``; ``cfg`` is an ``nsa_ref.NSAConfig``.

Slots without a spec run ``nsa_ref``'s public function with ``backend=<--nsa-backend>``. Nothing
here imports ``nsa_ref`` or a user module at import time.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from conformance.capabilities import ANYTHING, Capabilities, declared

SLOTS = ("nsa", "cmp", "sel", "win", "select", "compress")

# Public function of nsa_ref behind each slot, and whether it takes ``backend=``.
_REFERENCE_FUNCS = {
    "nsa": ("nsa_attention", True),
    "cmp": ("cmp_attention", True),
    "sel": ("sel_attention", True),
    "win": ("win_attention", True),
    "select": ("select_blocks", True),
    "compress": ("compress", False),
}

#: slot -> command-line flag and what the callable must be (the plugin's options, the report's repros).
IMPL_OPTIONS = (
    ("nsa", "--nsa-impl", "full NSA: fn(q, k, v, gates, cfg, cu_seqlens=None) -> out (T, Hq, Dv)"),
    ("cmp", "--nsa-cmp-impl", "cmp branch: fn(q, k_cmp, v_cmp, cfg, cu_seqlens=None) -> out or (out, lse)"),
    ("sel", "--nsa-sel-impl", "sel branch: fn(q, k, v, block_idx, cfg, cu_seqlens=None) -> out"),
    ("win", "--nsa-win-impl", "win branch: fn(q, k, v, cfg, cu_seqlens=None) -> out"),
    ("select", "--nsa-select-impl", "block selection: fn(q, k_cmp, cfg, cu_seqlens=None) -> block_idx (T, Hkv, n_sel)"),
    ("compress", "--nsa-compress-impl", "compression: fn(x, cfg, cu_seqlens=None) -> x_cmp or (x_cmp, cu_seqlens_cmp)"),
)

# Environment fallbacks, read in this one place (the command line wins).
ENV_VARS = {
    "nsa": "NSA_CONFORMANCE_IMPL",
    "cmp": "NSA_CONFORMANCE_CMP_IMPL",
    "sel": "NSA_CONFORMANCE_SEL_IMPL",
    "win": "NSA_CONFORMANCE_WIN_IMPL",
    "select": "NSA_CONFORMANCE_SELECT_IMPL",
    "compress": "NSA_CONFORMANCE_COMPRESS_IMPL",
    "backend": "NSA_CONFORMANCE_BACKEND",
    "device": "NSA_CONFORMANCE_DEVICE",
    "dtype": "NSA_CONFORMANCE_DTYPE",
    "compute_dtype": "NSA_CONFORMANCE_COMPUTE_DTYPE",
    "capabilities": "NSA_CONFORMANCE_CAPABILITIES",
    "known_deviations": "NSA_CONFORMANCE_KNOWN_DEVIATIONS",
}

DTYPES: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

_SPEC = re.compile(r"^(?P<module>[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*):(?P<attr>[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*)$")


class ImplLoadError(Exception):
    """A ``module:function`` spec could not be turned into a callable; the message says why."""


def env_defaults(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The NSA_CONFORMANCE_* fallbacks: slot/option name -> value or None."""
    environ = os.environ if environ is None else environ
    return {name: (environ.get(var) or None) for name, var in ENV_VARS.items()}


def parse_spec(spec: str, option: str = "--nsa-impl") -> tuple[str, str]:
    """``"pkg.module:function"`` -> ``("pkg.module", "function")``; dotted attributes allowed
    (``pkg.mod:Class.method``)."""
    text = spec.strip() if isinstance(spec, str) else spec
    if not isinstance(text, str) or not _SPEC.match(text):
        raise ImplLoadError(
            f"{option}={spec!r}: expected 'package.module:function' "
            "(a dotted module path, one colon, then the attribute), e.g. "
            f"{option}=my_nsa.api:nsa_attention"
        )
    module, attr = text.split(":")
    return module, attr


def load_callable(spec: str, option: str = "--nsa-impl") -> Callable:
    """Import ``module`` of ``"module:attr"`` and return ``attr``; ImplLoadError says what failed."""
    module_name, attr = parse_spec(spec, option)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        hint = (
            f"module {module_name!r} not found" if missing == module_name
            else f"importing {module_name!r} failed: its dependency {missing!r} is not installed"
        )
        raise ImplLoadError(
            f"{option}={spec!r}: {hint}. Is it installed (pip install -e .) or on PYTHONPATH "
            f"(sys.path is searched from the directory pytest runs in)?"
        ) from exc
    except Exception as exc:  # the user's module raised while importing
        raise ImplLoadError(
            f"{option}={spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    walked = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            shown = ", ".join(public[:12]) + (" ..." if len(public) > 12 else "")
            raise ImplLoadError(
                f"{option}={spec!r}: {walked!r} has no attribute {part!r} (it has: {shown or 'nothing public'})"
            )
        obj = getattr(obj, part)
        walked = f"{walked}.{part}"
    if not callable(obj):
        raise ImplLoadError(
            f"{option}={spec!r}: {walked} is a {type(obj).__name__}, not callable; name a function"
        )
    return obj


# --- uniform calling conventions ---------------------------------------------------------------

def split_out_lse(result: Any, slot: str = "cmp") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out`` or ``(out, lse, ...)`` -> ``(out, lse or None)``."""
    if isinstance(result, torch.Tensor):
        return result, None
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        lse = result[1] if len(result) > 1 and isinstance(result[1], torch.Tensor) else None
        return result[0], lse
    raise TypeError(
        f"{slot} implementation returned {type(result).__name__}; expected a tensor out (T, Hq, Dv) "
        "or a tuple (out, lse)"
    )


def first_tensor(result: Any, slot: str) -> torch.Tensor:
    """``x`` or ``(x, ...)`` -> ``x``."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return result[0]
    raise TypeError(f"{slot} implementation returned {type(result).__name__}; expected a tensor")


@dataclass(frozen=True)
class Slot:
    """One replaceable function: where it comes from and how to call it uniformly."""

    name: str
    spec: str | None  # "module:function" or None for nsa_ref
    backend: str
    _fn: Callable | None = field(default=None, compare=False, repr=False)

    @property
    def is_reference(self) -> bool:
        return self.spec is None

    def describe(self) -> str:
        if self.spec is not None:
            return self.spec
        func, takes_backend = _REFERENCE_FUNCS[self.name]
        return f"nsa_ref.{func}" + (f"(backend={self.backend!r})" if takes_backend else "")

    def resolve(self) -> Callable:
        """The raw callable (user's, or nsa_ref's with the backend bound)."""
        if self._fn is not None:
            return self._fn
        if self.spec is not None:
            fn = load_callable(self.spec, f"--nsa-{self.name}-impl" if self.name != "nsa" else "--nsa-impl")
        else:
            fn = _reference(self.name, self.backend)
        object.__setattr__(self, "_fn", fn)
        return fn


def _reference(slot: str, backend: str) -> Callable:
    import nsa_ref

    func, takes_backend = _REFERENCE_FUNCS[slot]
    fn = getattr(nsa_ref, func)
    if not takes_backend:
        return fn

    def call(*args, **kwargs):
        return fn(*args, backend=backend, **kwargs)

    call.__name__ = call.__qualname__ = f"{func}[{backend}]"
    return call


@dataclass(frozen=True)
class ImplUnderTest:
    """Everything the tests call, with uniform return conventions.

    ``nsa(q, k, v, gates, cfg, cu) -> out``; ``cmp(...) -> (out, lse|None)``;
    ``sel(...) -> out``; ``win(...) -> out``; ``select(...) -> block_idx``;
    ``compress(x, cfg, cu) -> x_cmp``. Plus where the tensors live: ``device``, ``dtype``."""

    slots: dict
    device: str = "cpu"
    dtype_name: str = "fp64"
    caps: dict = field(default_factory=dict)  # slot -> Capabilities (ANYTHING where none declared)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def capabilities(self, slot: str) -> Capabilities:
        """What the implementation behind ``slot`` declares it supports."""
        return self.caps.get(slot, ANYTHING)

    def judged_dtype(self, slot: str) -> torch.dtype:
        """The precision verdicts of ``slot`` are judged at (tolerance row and baseline): the
        input dtype, or the declared compute precision when that is coarser."""
        return DTYPES[self.capabilities(slot).judged_dtype(self.dtype_name)]

    def not_applicable(self, slot: str, case=None, features=()) -> list[str]:
        """Every reason a test of ``slot`` on ``case`` needing ``features`` is outside the
        declared space (empty: the test applies)."""
        return self.capabilities(slot).not_supported_reasons(case, slot, features, self.dtype_name)

    @property
    def user_given(self) -> list[str]:
        return [name for name, slot in self.slots.items() if not slot.is_reference]

    def nsa(self, q, k, v, gates, cfg, cu_seqlens=None) -> torch.Tensor:
        return first_tensor(self.slots["nsa"].resolve()(q, k, v, gates, cfg, cu_seqlens), "nsa")

    def cmp(self, q, k_cmp, v_cmp, cfg, cu_seqlens=None):
        return split_out_lse(self.slots["cmp"].resolve()(q, k_cmp, v_cmp, cfg, cu_seqlens), "cmp")

    def sel(self, q, k, v, block_idx, cfg, cu_seqlens=None) -> torch.Tensor:
        return first_tensor(self.slots["sel"].resolve()(q, k, v, block_idx, cfg, cu_seqlens), "sel")

    def win(self, q, k, v, cfg, cu_seqlens=None) -> torch.Tensor:
        return first_tensor(self.slots["win"].resolve()(q, k, v, cfg, cu_seqlens), "win")

    def select(self, q, k_cmp, cfg, cu_seqlens=None) -> torch.Tensor:
        return first_tensor(self.slots["select"].resolve()(q, k_cmp, cfg, cu_seqlens), "select")

    def compress(self, x, cfg, cu_seqlens=None) -> torch.Tensor:
        return first_tensor(self.slots["compress"].resolve()(x, cfg, cu_seqlens), "compress")

    def describe(self) -> list[str]:
        """Report-header lines."""
        who = "user implementation" if self.user_given else "nsa_ref (this project's reference)"
        lines = [f"nsa-conformance: implementation under test: {who}; device={self.device} dtype={self.dtype_name}"]
        width = max(len(n) for n in self.slots)
        for name, slot in self.slots.items():
            caps = self.capabilities(name).summary()
            lines.append(f"  {name:<{width}} -> {slot.describe()}" + (f"  [declares {', '.join(caps)}]" if caps else ""))
        return lines


def build(specs: Mapping[str, str | None], backend: str = "auto", device: str = "cpu",
          dtype: str = "fp64", validate: bool = True, capabilities: str | None = None,
          cap_overrides: Mapping[str, str] | None = None, compute_dtype: str | None = None) -> ImplUnderTest:
    """``specs``: slot -> "module:function" or None. ``validate`` loads user specs now so a typo
    fails at start-up with one clear message instead of erroring every test.

    Capabilities of a user slot: ``capabilities`` ("module:OBJ", a Capabilities object) when
    given, else what its callable declares (``fn.capabilities``), else anything; then ``cap_overrides``
    (``--nsa-cap KEY=VALUE``) and ``compute_dtype`` (``--nsa-compute-dtype``) on top. nsa_ref's
    own slots support everything."""
    unknown = set(specs) - set(SLOTS)
    if unknown:
        raise ImplLoadError(f"unknown slot(s) {sorted(unknown)}; known: {', '.join(SLOTS)}")
    if dtype not in DTYPES:
        raise ImplLoadError(f"--nsa-dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if compute_dtype is not None and compute_dtype not in DTYPES:
        raise ImplLoadError(f"--nsa-compute-dtype={compute_dtype!r}: expected one of {', '.join(DTYPES)}")
    slots = {name: Slot(name, specs.get(name) or None, backend) for name in SLOTS}
    base = None
    if capabilities:
        base = _load_object(capabilities)
    caps: dict[str, Capabilities] = {}
    for name, slot in slots.items():
        if slot.is_reference:
            continue
        if validate:
            fn = slot.resolve()
            try:
                own = declared(fn, device)
            except (TypeError, ValueError) as exc:
                raise ImplLoadError(f"{slot.spec}: {exc}") from None
        else:
            own = None
        chosen = base or own or ANYTHING  # the command line wins over the callable's own declaration
        try:
            if cap_overrides:
                chosen = chosen.with_overrides(cap_overrides)
            if compute_dtype is not None:
                chosen = chosen.with_overrides({"compute_dtype": compute_dtype})
        except ValueError as exc:
            raise ImplLoadError(str(exc)) from None
        caps[name] = chosen
    return ImplUnderTest(slots=slots, device=device, dtype_name=dtype, caps=caps)


def _load_object(spec: str) -> Capabilities:
    """``"pkg.mod:OBJ"`` -> a Capabilities object (``OBJ`` may be a callable returning one)."""
    module_name, attr = parse_spec(spec, "--nsa-capabilities")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ImplLoadError(f"--nsa-capabilities={spec!r}: {type(exc).__name__}: {exc}") from None
    if callable(obj) and not isinstance(obj, Capabilities):
        obj = obj()
    if not isinstance(obj, Capabilities):
        raise ImplLoadError(f"--nsa-capabilities={spec!r} is a {type(obj).__name__}, expected "
                            "conformance.capabilities.Capabilities")
    try:
        obj.validate()
    except ValueError as exc:
        raise ImplLoadError(f"--nsa-capabilities={spec!r}: {exc}") from None
    return obj
