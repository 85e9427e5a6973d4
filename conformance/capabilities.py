"""What an implementation under test declares it supports, and why a test is not applicable to it.

An implementation is judged only inside the space it declares (array-api-tests' rule: out of
scope is "not applicable", never a failure, never a pass). It declares, next to its callable::

    def nsa_attention(q, k, v, gates, cfg, cu_seqlens=None): ...
    nsa_attention.capabilities = Capabilities(tied_blocks=True, n_init=(1,), n_local=(2,),
                                              min_group=16, group_power_of_two=True,
                                              compute_dtype="fp32")

(``capabilities`` may also be a callable ``device -> Capabilities`` when it depends on the
device), or on the command line: ``--nsa-capabilities=pkg.mod:OBJ`` and ``--nsa-cap KEY=VALUE``
for single fields (e.g. ``--nsa-cap backward=false --nsa-cap min_group=16``), and
``--nsa-compute-dtype=fp32``.

Each field defaults to "anything", so an implementation that declares nothing is tested on the
whole suite. ``Capabilities.not_supported_reasons(case, slot, features)`` returns every reason a
test does not apply, xformers-style: one short sentence per failed condition, quoting the value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

#: Config fields that matter to each slot: a slot is judged only on the knobs it uses
#: (selected attention takes block_idx as input, so it only needs l' and the scale).
SLOT_FIELDS: dict[str, frozenset[str]] = {
    "nsa": frozenset({"block_len", "block_stride", "sel_block", "n_sel", "n_init", "n_local", "window", "scale"}),
    "cmp": frozenset({"block_len", "block_stride", "scale"}),
    "sel": frozenset({"sel_block", "scale"}),
    "win": frozenset({"window", "scale"}),
    "select": frozenset({"block_len", "block_stride", "sel_block", "n_sel", "n_init", "n_local", "scale"}),
    "compress": frozenset({"block_len", "block_stride"}),
}
#: Which of (l, d, l') the ``tied_blocks`` condition compares, per slot.
_TIED_FIELDS = ("block_len", "block_stride", "sel_block")

#: Optional features a test may need beyond its shapes and config.
FEATURES = ("varlen", "empty_sequences", "backward", "decode", "lse", "causal_probe")

#: Skip reasons of tests outside the declared capabilities start with this.
NOT_APPLICABLE = "not applicable: "

_PRECISION = {"fp64": 3, "fp32": 2, "bf16": 1, "fp16": 1}


@dataclass(frozen=True)
class Capabilities:
    """The space an implementation supports. ``None`` / ``True`` fields mean "anything".

    Config (``cfg`` is an ``nsa_ref.NSAConfig``):
      tied_blocks        l == d == l' only (FLA, native-sparse-attention-triton); per slot only the
                         fields that slot uses are compared (cmp: l == d; select, nsa: all three)
      block_sizes        allowed values of l, d and l' (None: any)
      n_init, n_local    allowed forced-block counts (None: any)
      min_n_sel          smallest n the implementation accepts
      window             a sliding window is supported at all
      explicit_scale     cfg.scale may be set (False: only 1/sqrt(Dk))
    Shapes:
      min_group, max_group, group_power_of_two   allowed G = Hq / Hkv
      min_head_dim, max_head_dim, head_dim_multiple, equal_head_dims   Dk and Dv
    Precision:
      dtypes             input dtypes accepted (names: fp64, fp32, bf16, fp16)
      compute_dtype      precision it computes in internally (e.g. "fp32" when fp64 inputs are
                         computed in fp32); verdicts then use that precision's tolerance row
    Features: varlen, empty_sequences, backward, decode, lse (cmp returns its log-sum-exp).
    ``unavailable``: why the implementation cannot run here at all (third party not installed,
    needs CUDA); every test is then not applicable with that reason.
    ``note``: free text shown in the report (where the declaration comes from).
    """

    tied_blocks: bool = False
    block_sizes: tuple[int, ...] | None = None
    n_init: tuple[int, ...] | None = None
    n_local: tuple[int, ...] | None = None
    min_n_sel: int = 1
    window: bool = True
    explicit_scale: bool = True
    min_group: int = 1
    max_group: int | None = None
    group_power_of_two: bool = False
    max_head_dim: int | None = None
    min_head_dim: int = 1
    head_dim_multiple: int = 1
    equal_head_dims: bool = False
    dtypes: tuple[str, ...] = ("fp64", "fp32", "bf16", "fp16")
    compute_dtype: str | None = None
    varlen: bool = True
    empty_sequences: bool = True
    backward: bool = True
    decode: bool = True
    lse: bool = True
    unavailable: str | None = None
    note: str = field(default="", compare=False)

    # --- judging one test ----------------------------------------------------------------------

    def config_reasons(self, cfg: Any, slot: str = "nsa") -> list[str]:
        """Why ``cfg`` (NSAConfig or a dict of its fields) is outside this space for ``slot``."""
        values = cfg if isinstance(cfg, Mapping) else {f: getattr(cfg, f) for f in SLOT_FIELDS["nsa"]}
        used = SLOT_FIELDS.get(slot, SLOT_FIELDS["nsa"])
        reasons: list[str] = []
        tied = [f for f in _TIED_FIELDS if f in used]
        if self.tied_blocks and len({values[f] for f in tied}) > 1:
            shown = ", ".join(f"{f}={values[f]}" for f in tied)
            reasons.append(f"config has {shown}, the implementation supports only {' == '.join(tied)}")
        if self.block_sizes is not None:
            for f in (x for x in _TIED_FIELDS if x in used):
                if values[f] not in self.block_sizes:
                    reasons.append(f"{f}={values[f]} not in the supported block sizes {list(self.block_sizes)}")
        for name, allowed in (("n_init", self.n_init), ("n_local", self.n_local)):
            if allowed is not None and name in used and values[name] not in allowed:
                reasons.append(f"{name}={values[name]} not supported (supported: {list(allowed)})")
        if "n_sel" in used and values["n_sel"] < self.min_n_sel:
            reasons.append(f"n_sel={values['n_sel']} below the supported minimum {self.min_n_sel}")
        if "scale" in used and values.get("scale") is not None and not self.explicit_scale:
            reasons.append(f"explicit scale={values['scale']} not supported (only 1/sqrt(Dk))")
        if "window" in used and not self.window:
            reasons.append("no sliding-window branch")
        return reasons

    def shape_reasons(self, hq: int, hkv: int, dk: int, dv: int, slot: str = "nsa") -> list[str]:
        """Why the head layout ``(Hq, Hkv, Dk, Dv)`` is outside this space."""
        reasons: list[str] = []
        if hkv <= 0 or hq % hkv:
            return [f"Hq={hq} is not a multiple of Hkv={hkv}"]
        G = hq // hkv
        if G < self.min_group or (self.max_group is not None and G > self.max_group):
            top = "" if self.max_group is None else f"..{self.max_group}"
            reasons.append(f"G = Hq/Hkv = {G} outside the supported group sizes {self.min_group}{top or '+'}")
        if self.group_power_of_two and G & (G - 1):
            reasons.append(f"G = Hq/Hkv = {G} is not a power of two")
        dims = {"Dk": dk} if slot in ("select", "compress") else {"Dk": dk, "Dv": dv}
        for name, width in dims.items():
            if self.max_head_dim is not None and width > self.max_head_dim:
                reasons.append(f"{name}={width} above the widest supported head dim {self.max_head_dim}")
            if width < self.min_head_dim:
                reasons.append(f"{name}={width} below the narrowest supported head dim {self.min_head_dim}")
            if width % self.head_dim_multiple:
                reasons.append(f"{name}={width} is not a multiple of {self.head_dim_multiple}")
        if self.equal_head_dims and slot not in ("select", "compress") and dk != dv:
            reasons.append(f"Dk={dk} != Dv={dv}; the implementation needs equal head dims")
        return reasons

    def dtype_reasons(self, dtype_name: str) -> list[str]:
        if dtype_name not in self.dtypes:
            return [f"input dtype {dtype_name} not supported (supported: {', '.join(self.dtypes)})"]
        return []

    def feature_reasons(self, features: Iterable[str]) -> list[str]:
        reasons = []
        for feat in features:
            if feat not in FEATURES:
                raise ValueError(f"unknown feature {feat!r}; known: {', '.join(FEATURES)}")
            if feat != "causal_probe" and not getattr(self, feat):
                reasons.append(f"{feat.replace('_', ' ')} not supported")
        return reasons

    def not_supported_reasons(self, case=None, slot: str = "nsa", features: Iterable[str] = (),
                              dtype_name: str | None = None) -> list[str]:
        """Every reason a test of ``slot`` on ``case`` (a ``conformance.cases.Case``) needing
        ``features`` is outside this space; empty when it applies."""
        if self.unavailable:
            return [self.unavailable]
        reasons: list[str] = []
        features = list(features)
        if dtype_name is not None:
            reasons += self.dtype_reasons(dtype_name)
        if case is not None:
            reasons += self.config_reasons(dict(case.cfg_fields()), slot)
            reasons += self.shape_reasons(case.hq, case.hkv, case.dk, case.dv, slot)
            if case.varlen and "varlen" not in features:
                features.append("varlen")
            if case.varlen and any(n == 0 for n in case.lengths) and "empty_sequences" not in features:
                features.append("empty_sequences")
        reasons += self.feature_reasons(features)
        return reasons

    # --- precision ----------------------------------------------------------------------------

    def judged_dtype(self, input_dtype: str) -> str:
        """The precision a verdict is judged at: the input dtype, or the declared compute dtype
        when that is coarser (fp64 inputs computed in fp32 are judged by the fp32 row)."""
        if self.compute_dtype is None:
            return input_dtype
        if _PRECISION[self.compute_dtype] < _PRECISION[input_dtype]:
            return self.compute_dtype
        return input_dtype

    # --- construction -------------------------------------------------------------------------

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Capabilities":
        """A copy with fields replaced; values given as text (from ``--nsa-cap``) are parsed."""
        known = {f.name: f for f in dataclasses.fields(self)}
        parsed = {}
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"unknown capability {key!r}; known: {', '.join(sorted(known))}")
            parsed[key] = _parse(key, value, getattr(self, key)) if isinstance(value, str) else value
        out = dataclasses.replace(self, **parsed)
        out.validate()
        return out

    def validate(self) -> None:
        """Refuse declarations that cannot be meant (unknown dtype names, G bounds crossed)."""
        for name in self.dtypes:
            if name not in _PRECISION:
                raise ValueError(f"capabilities.dtypes has {name!r}; use fp64, fp32, bf16, fp16")
        if self.compute_dtype is not None and self.compute_dtype not in _PRECISION:
            raise ValueError(f"capabilities.compute_dtype={self.compute_dtype!r}; use fp64, fp32, bf16 or fp16")
        if self.max_group is not None and self.max_group < self.min_group:
            raise ValueError(f"capabilities.max_group={self.max_group} < min_group={self.min_group}")
        if self.head_dim_multiple < 1 or self.min_group < 1 or self.min_n_sel < 1 or self.min_head_dim < 1:
            raise ValueError("capabilities: head_dim_multiple, min_head_dim, min_group and min_n_sel must be >= 1")
        if self.max_head_dim is not None and self.max_head_dim < self.min_head_dim:
            raise ValueError(f"capabilities.max_head_dim={self.max_head_dim} < min_head_dim={self.min_head_dim}")

    def summary(self) -> list[str]:
        """Fields that differ from "anything", as ``key=value`` strings (report header)."""
        default = Capabilities()
        return [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                if f.compare and getattr(self, f.name) != getattr(default, f.name)]


#: An implementation that declares nothing: the whole suite applies.
ANYTHING = Capabilities()


def _parse(key: str, text: str, current: Any) -> Any:
    text = text.strip()
    low = text.lower()
    if key in ("compute_dtype", "max_group", "max_head_dim") and low in ("none", ""):
        return None
    if isinstance(current, bool) or key in ("tied_blocks", "window", "explicit_scale", "group_power_of_two",
                                            "equal_head_dims", "varlen", "empty_sequences", "backward",
                                            "decode", "lse"):
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--nsa-cap {key}={text!r}: expected true or false")
    if key in ("block_sizes", "n_init", "n_local"):
        if low in ("none", "any"):
            return None
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--nsa-cap {key}={text!r}: expected comma-separated integers, e.g. 1,2") from None
    if key == "dtypes":
        return tuple(x.strip() for x in text.split(",") if x.strip())
    if key in ("compute_dtype", "note", "unavailable"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--nsa-cap {key}={text!r}: expected an integer") from None


def parse_cap_flags(flags: Iterable[str]) -> dict[str, str]:
    """``["backward=false", "min_group=16"]`` -> ``{"backward": "false", "min_group": "16"}``."""
    out = {}
    for flag in flags:
        key, sep, value = flag.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--nsa-cap {flag!r}: expected KEY=VALUE, e.g. --nsa-cap backward=false")
        out[key.strip()] = value
    return out


def declared(fn: Any, device: str = "cpu") -> Capabilities | None:
    """The capabilities a callable declares (attribute ``capabilities``, an object or a callable
    ``device -> Capabilities``), or None."""
    caps = getattr(fn, "capabilities", None)
    if caps is None:
        return None
    if callable(caps) and not isinstance(caps, Capabilities):
        caps = caps(device)
    if not isinstance(caps, Capabilities):
        raise TypeError(f"{getattr(fn, '__qualname__', fn)}.capabilities is a {type(caps).__name__}; "
                        "expected conformance.capabilities.Capabilities (or a callable returning one)")
    caps.validate()
    return caps


def require(impl, slots, case=None, features=()) -> None:
    """Skip the running test as "not applicable: ..." when ``case`` / ``features`` are outside
    what ``impl`` (``conformance.impl.ImplUnderTest``) declares for any of ``slots``.

    For tests that build their case inside; parametrized ``case`` tests are judged at collection."""
    import pytest

    slots = [slots] if isinstance(slots, str) else list(slots)
    reasons = []
    for slot in slots:
        if impl.slots[slot].is_reference:
            continue
        reasons += [f"{slot}: {r}" for r in impl.not_applicable(slot, case, features)]
    if reasons:
        pytest.skip(NOT_APPLICABLE + "; ".join(dict.fromkeys(reasons)))
