"""What every probe shares: the call, its description, the contract verdict, the reference, the outcome.

A probe module defines ``NAME``, ``TITLE``, ``EXPECTED`` (what fa2_contract.md says happens),
``RULES`` (the rule ids that must reject it), ``PROVIDERS``, ``VARIANTS`` and
``build(provider, variant, device) -> Setup``; optionally ``not_applicable(provider, variant)``
(e.g. no such API in that provider; checked first), ``EXPLORATORY = {provider: why}`` (the class
is not a known fact there, so the contract is not expected to reject it yet) and ``arch_not_applicable(provider, variant,
caps)`` (e.g. "sm90": the class exists only on other GPUs; checked before the kernel runs).
``main(module)`` does the rest:

1. print the environment (``conformance.tools.envinfo.collect()``), the inputs (shape, dtype, stride,
   device, index values) and the exact call;
2. print the contract verdict, meta and strict (``contracts.*_reasons`` through the same argument
   mapping ``contracts.guarded`` uses), with rule ids;
3. only with ``--run-kernel`` (default: on when CUDA is present) call the raw kernel and classify:
   ``ok``, ``clean_error``, ``cuda_error``, ``silent_corruption``, ``skipped``, ``not_applicable``.
   A process killed by a signal cannot report itself: the runner sees it (``killed_by_signal``).

With ``--json`` a probe also prints one JSON line after the contract verdict (``"stage":
"contract"``) and one at the end (``"stage": "result"``); the runner reads the last one it got.
Nothing here touches CUDA at import.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from contracts.fa2_mask import fa2_mask, intended_mask
from contracts.fa2_mask import normalised_window as fa2_window

BOTH = ("flash_attn", "torch")
OUTCOMES = (
    "ok", "clean_error", "cuda_error", "silent_corruption", "killed_by_signal", "timeout",
    "probe_error", "not_applicable", "skipped",
)
# Outcomes that mean "the kernel did not do what the arguments say" (the contract must reject).
#: Outcomes in which the kernel failed the caller (shared by the probes, the runner and the fuzzer).
KERNEL_FAILURES = ("clean_error", "cuda_error", "silent_corruption", "killed_by_signal", "timeout")

FLASH_ATTN_FN = {"dense": "flash_attn_func", "varlen": "flash_attn_varlen_func", "kvcache": "flash_attn_with_kvcache"}
ATEN_FN = "torch.ops.aten._flash_attention_forward"
GiB = 2**30

# Text of errors that come from the CUDA runtime rather than an argument check.
CUDA_ERROR_PATTERNS = (
    "cuda error", "cudaerror", "illegal memory access", "invalid configuration argument",
    "device-side assert", "unspecified launch failure", "misaligned address", "illegal instruction",
    "cuda driver error", "launch failure", "an illegal memory", "cublas_status",
)


# --- tensors ---------------------------------------------------------------------------------------


# Off the GPU only the contract reads the tensors, so they stay uninitialised (fast); tests of the
# judges set this to get values on the CPU too.
FILL_ON_CPU = False


def rand(*shape: int, dtype=torch.float16, device="cpu", requires_grad: bool = False) -> torch.Tensor:
    """Random values on CUDA (or anywhere with FILL_ON_CPU); uninitialised memory elsewhere."""
    if str(device).startswith("cuda") or (FILL_ON_CPU and str(device) != "meta"):
        t = torch.randn(*shape, dtype=dtype, device=device)
    else:
        t = torch.empty(*shape, dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def int32(values, device="cpu") -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int32, device=device)


def cumulative(lengths) -> list[int]:
    """lengths: B ints -> host offsets (B+1 ints), ``nsa_ref.packing.offsets_from_lengths``."""
    from nsa_ref.packing import offsets_from_lengths

    return offsets_from_lengths(lengths)


def describe_value(value: Any) -> dict:
    """JSON-able description: tensors by shape/dtype/stride/device (+ values when small and integer)."""
    if isinstance(value, torch.Tensor):
        d = {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""),
             "stride": list(value.stride()), "device": str(value.device),
             "requires_grad": bool(value.requires_grad)}
        if not value.is_floating_point() and not value.is_meta and value.numel() <= 64:
            d["values"] = value.detach().cpu().reshape(-1).tolist()
            if value.dim() > 1:
                d["values"] = value.detach().cpu().tolist()
        return d
    if isinstance(value, (int, float, bool, str)) or value is None:
        return {"value": value}
    if isinstance(value, (tuple, list)):
        return {"value": list(value)}
    return {"value": repr(value)}


def tensor_line(name: str, t: torch.Tensor) -> str:
    d = describe_value(t)
    line = (f"  {name:<14} shape {tuple(d['shape'])!s:<22} {d['dtype']:<9} stride {tuple(d['stride'])!s:<24} "
            f"{d['device']}")
    if d["requires_grad"]:
        line += " requires_grad"
    if "values" in d:
        line += f" values {d['values']}"
    return line


# --- the call --------------------------------------------------------------------------------------


@dataclass
class Call:
    """One raw FA-2 call: provider, guard kind (dense/varlen/kvcache/aten), its arguments."""

    provider: str
    kind: str
    layout: str
    args: tuple
    kwargs: dict

    @property
    def fn_name(self) -> str:
        if self.kind == "aten":
            return ATEN_FN
        return f"flash_attn.{FLASH_ATTN_FN[self.kind]}"

    def bound(self) -> dict:
        from contracts.guard import bind_arguments

        return bind_arguments(self.kind, self.args, self.kwargs)

    def kernel(self) -> Callable:
        if self.kind == "aten":
            return torch.ops.aten._flash_attention_forward
        import flash_attn

        return getattr(flash_attn, FLASH_ATTN_FN[self.kind])

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, v) for n, v in self.bound().items() if isinstance(v, torch.Tensor)]

    def text(self) -> str:
        names = [n for n, _ in zip(self.bound(), self.args)]
        parts = []
        for n, v in zip(names, self.args):
            parts.append(n if isinstance(v, torch.Tensor) else f"{n}={v!r}")
        for n, v in self.kwargs.items():
            parts.append(n if isinstance(v, torch.Tensor) else f"{n}={v!r}")
        return f"{self.fn_name}({', '.join(parts)})"

    def describe(self) -> dict:
        return {n: describe_value(v) for n, v in self.bound().items()}


def _window_kwargs(window):
    wl, wr = window
    return {"window_size_left": None if wl < 0 else wl, "window_size_right": None if wr < 0 else wr}


def dense_call(provider, q, k, v, *, causal=False, window=(-1, -1), dropout_p=0.0, scale=None) -> Call:
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D|Dv): flash_attn_func or torch's op in dense layout."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if provider == "flash_attn":
        return Call(provider, "dense", "dense", (q, k, v),
                    dict(dropout_p=dropout_p, softmax_scale=scale, causal=causal, window_size=tuple(window)))
    sq = q.shape[1] if q.dim() == 4 else 0
    sk = k.shape[1] if k.dim() == 4 else 0
    return Call(provider, "aten", "dense", (q, k, v, None, None, sq, sk, dropout_p, causal, False),
                dict(scale=scale, **_window_kwargs(window)))


def varlen_call(provider, q, k, v, cu_q, cu_k, max_q, max_k, *, causal=False, window=(-1, -1),
                dropout_p=0.0, scale=None) -> Call:
    """q (Tq, Hq, D), k/v (Tk, Hkv, D), cu_seqlens int32 (B+1,): flash_attn_varlen_func or torch's op."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if provider == "flash_attn":
        return Call(provider, "varlen", "varlen", (q, k, v, cu_q, cu_k, max_q, max_k),
                    dict(dropout_p=dropout_p, softmax_scale=scale, causal=causal, window_size=tuple(window)))
    return Call(provider, "aten", "varlen", (q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, False),
                dict(scale=scale, **_window_kwargs(window)))


def kvcache_call(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens=None, block_table=None,
                 causal=False, scale=None, rotary_cos=None, rotary_sin=None, rotary_interleaved=None) -> Call:
    """flash_attn_with_kvcache (flash_attn package only)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kwargs = dict(k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_seqlens=cache_seqlens,
                  block_table=block_table, softmax_scale=scale, causal=causal, rotary_interleaved=rotary_interleaved)
    return Call("flash_attn", "kvcache", "kvcache", (q, k_cache, v_cache),
                {n: x for n, x in kwargs.items() if x is not None})


def first_tensor(result) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    return next(x for x in result if isinstance(x, torch.Tensor))


# --- reference attention ---------------------------------------------------------------------------


def attend(q, k, v, keep, scale, dtype=torch.float64) -> torch.Tensor:
    """q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), keep (Sq, Sk) -> (B, Sq, Hq, Dv) in
    ``dtype``. Query head h uses KV head h // (Hq // Hkv); rows with no visible key give 0."""
    b, sq, hq, _ = q.shape
    sk, hk, dv = v.shape[1:]
    if b == 0 or sq == 0 or sk == 0 or hk == 0:
        return torch.zeros(b, sq, hq, dv, dtype=dtype, device=q.device)
    g = hq // hk
    kx = k.to(dtype).repeat_interleave(g, dim=2)
    vx = v.to(dtype).repeat_interleave(g, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), kx) * scale
    s = s.masked_fill(~keep.to(s.device)[None, None], -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vx)


def reference_dense(q, k, v, *, causal=False, window=(-1, -1), scale=None, dtype=torch.float64,
                    mask_fn=None) -> torch.Tensor:
    """(B, Sq, Hq, D) dense attention with the intended mask (or ``mask_fn(sq, sk)``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sq, sk = q.shape[1], k.shape[1]
    keep = mask_fn(sq, sk) if mask_fn else intended_mask(sq, sk, causal, window, device=q.device)
    return attend(q, k, v, keep, scale, dtype)


def reference_varlen(q, k, v, cu_q, cu_k, *, causal=False, window=(-1, -1), scale=None,
                     dtype=torch.float64, mask_fn=None) -> torch.Tensor:
    """(Tq, Hq, Dv) packed attention per sequence of the (intended) cu_seqlens lists; rows outside
    every sequence are 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=dtype, device=q.device)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        sq, sk = q1 - q0, k1 - k0
        keep = mask_fn(sq, sk) if mask_fn else intended_mask(sq, sk, causal, window, device=q.device)
        out[q0:q1] = attend(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], keep, scale, dtype)[0]
    return out


# --- comparing -------------------------------------------------------------------------------------


def index_ranges(indices) -> str:
    """[0, 1, 2, 7, 9, 10] -> '0-2, 7, 9-10'."""
    idx = sorted(set(int(i) for i in indices))
    parts, start = [], None
    for a, b in zip(idx, idx[1:] + [None]):
        start = a if start is None else start
        if b is None or b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ", ".join(parts)


def compare(x: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, dtype, quantity: str = "out",
            what: str = "out") -> tuple[str, str]:
    """``ok`` when ``x`` is within contracts.tolerances of ``ref`` (ref: float64 truth, base: the same
    math in the input dtype), else ``silent_corruption`` naming the bad rows (first dim)."""
    from contracts.tolerances import lookup

    if tuple(x.shape) != tuple(ref.shape):
        return "silent_corruption", f"{what} has shape {tuple(x.shape)}, expected {tuple(ref.shape)}"
    verdict = lookup(dtype, quantity).check(x, ref, base)
    if verdict:
        return "ok", str(verdict)
    x64, r64 = x.detach().double(), ref.detach().double().to(x.device)
    bad = ~torch.isfinite(x64) | ((x64 - r64).abs() > verdict.allowed)
    return "silent_corruption", f"{verdict}; bad rows of {what}: {bad_rows(bad)}"


def bad_rows(bad: torch.Tensor) -> str:
    """Token rows with any bad entry: packed (T, H, D) -> '3-7'; dense (B, S, H, D) -> 'batch 0: 0-7'."""
    if bad.dim() == 4:
        rows = bad.flatten(2).any(dim=2)
        parts = [f"batch {b}: {index_ranges(torch.nonzero(rows[b]).flatten().tolist())}"
                 for b in range(rows.shape[0]) if rows[b].any()]
        return "; ".join(parts[:8]) + (f" (+{len(parts) - 8} batches)" if len(parts) > 8 else "")
    rows = bad.reshape(bad.shape[0], -1).any(dim=1) if bad.dim() > 1 else bad
    return index_ranges(torch.nonzero(rows).flatten().tolist())


def matches(x: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, dtype) -> bool:
    from contracts.tolerances import lookup

    return tuple(x.shape) == tuple(ref.shape) and bool(lookup(dtype, "out").check(x, ref, base))


def judge_out(reference: Callable[[torch.dtype], torch.Tensor], dtype, *,
              alternatives: dict[str, Callable[[torch.dtype], torch.Tensor]] | None = None,
              select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable:
    """A judge for a forward call: compare the output with ``reference(dtype)`` (float64 truth and
    input-dtype baseline). When it differs, say which ``alternatives`` (e.g. "no causal mask") it
    matches instead. ``select`` picks the compared part of the output."""

    def judge(result) -> tuple[str, str]:
        out = first_tensor(result)
        if select is not None:
            out = select(out)
        outcome, detail = compare(out, reference(torch.float64), reference(dtype), dtype)
        if outcome != "ok":
            nonfinite = int((~torch.isfinite(out.float())).sum())
            if nonfinite:
                detail += f"; {nonfinite} non-finite value(s) in the output"
            for label, alt in (alternatives or {}).items():
                if matches(out, alt(torch.float64), alt(dtype), dtype):
                    detail += f"; the output matches {label} instead"
        return outcome, detail

    return judge


class ProbeSetupError(Exception):
    """The probe itself could not set up its call (reported as ``probe_error``, never blamed on the kernel)."""


def forward_backward(call: Call, dout: torch.Tensor, poison_grads: bool = True) -> Callable:
    """A ``Setup.run``: forward, then (after poisoning blocks of the gradients' sizes) backward
    with ``dout``; the gradients land in the leaves' ``.grad``."""

    def run(fn):
        result = fn(*call.args, **call.kwargs)
        out = first_tensor(result)
        if not out.requires_grad:
            raise ProbeSetupError("the output does not require grad (no autograd for this call)")
        if poison_grads:
            poison_allocator([(t.shape, t.dtype) for _, t in call.tensors() if t.requires_grad])
        out.backward(dout)
        return result

    return run


def judge_grads(leaves: dict[str, torch.Tensor], reference: Callable, dout: torch.Tensor, dtype) -> Callable:
    """Compare the leaves' gradients (named dq/dk/dv) with ``reference(q, k, v, dtype)`` under
    autograd: float64 truth and an input-dtype baseline."""

    def grads(dt):
        xs = [x.detach().to(dt).requires_grad_() for x in leaves.values()]
        reference(*xs, dtype=dt).backward(dout.to(dt))
        return [x.grad for x in xs]

    def judge(result) -> tuple[str, str]:
        truth, base = grads(torch.float64), grads(dtype)
        details, outcome = [], "ok"
        for (name, x), r, b in zip(leaves.items(), truth, base):
            if x.grad is None:
                return "silent_corruption", f"{name}: no gradient was produced"
            o, d = compare(x.grad, r, b, dtype, name, what=name)
            details.append(d)
            if o != "ok":
                outcome = o
        return outcome, " | ".join(details)

    return judge


# --- running ---------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What a probe's ``build`` returns.

    ``call``: the exact raw call. ``judge(result) -> (outcome, detail)`` checks a returned result
    (None: returning at all is ``ok``). ``run``: replaces the plain call (e.g. forward + backward);
    gets the kernel callable. ``caps``: passed to the contract (e.g. "sm86" where the class is
    arch-specific and no CUDA device says otherwise). ``needs_bytes``: device memory the call needs
    (the probe is skipped when it does not fit). ``poison``: tensors whose shapes the kernel's
    outputs will have; blocks of those sizes are filled with NaN and freed just before the call, so
    rows the kernel never writes show up as NaN instead of stale numbers."""

    call: Call
    judge: Callable[[Any], tuple[str, str]] | None = None
    run: Callable[[Callable], Any] | None = None
    caps: str | None = None
    needs_bytes: int = 0
    poison: tuple = ()
    notes: list[str] = field(default_factory=list)


def classify_exception(exc: BaseException) -> tuple[str, str]:
    """``cuda_error`` for CUDA runtime failures, ``skipped`` for out-of-memory, else ``clean_error``."""
    name = type(exc).__name__
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = f"{name}: {first}"[:400]
    low = text.lower()
    if name == "OutOfMemoryError" or "out of memory" in low:
        return "skipped", f"out of device memory: {detail}"
    if name == "AcceleratorError" or any(p in low for p in CUDA_ERROR_PATTERNS):
        return "cuda_error", detail
    return "clean_error", detail


def poison_allocator(shapes, device="cuda") -> None:
    """Fill freed caching-allocator blocks of these (shape, dtype) sizes with NaN (CUDA only)."""
    if not torch.cuda.is_available():
        return
    blocks = []
    for shape, dtype in shapes:
        try:
            blocks.append(torch.full(tuple(shape), math.nan, dtype=dtype, device=device))
        except Exception:  # noqa: BLE001 - poisoning is best effort
            pass
    del blocks


def execute(setup: Setup, kernel: Callable | None = None) -> tuple[str, str]:
    """Call the kernel (CUDA present), synchronise, judge. One call per process: after a CUDA error
    the context may be unusable, so the caller reports and exits. ``kernel`` replaces the real one
    (tests of the judges on the CPU)."""
    try:
        fn = kernel or setup.call.kernel()
    except ImportError as exc:
        return "skipped", f"{setup.call.provider} not importable: {exc}"
    poison_allocator(setup.poison)
    try:
        result = setup.run(fn) if setup.run else fn(*setup.call.args, **setup.call.kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ProbeSetupError as exc:
        return "probe_error", str(exc)
    except Exception as exc:  # noqa: BLE001 - every kernel failure is data here
        return classify_exception(exc)
    if setup.judge is None:
        return "ok", "returned without error"
    try:
        return setup.judge(result)
    except Exception as exc:  # noqa: BLE001
        outcome, detail = classify_exception(exc)
        if outcome == "cuda_error":
            return outcome, f"{detail} (surfaced while reading the result)"
        return "probe_error", f"judging the result failed: {detail}"


def contract_reasons(setup: Setup, strict: bool) -> list:
    """The contract's reasons for this exact call (the mapping ``contracts.guarded`` uses)."""
    from contracts import FA2ContractError
    from contracts.guard import check_call

    try:
        check_call(setup.call.kind, setup.call.bound(), strict=strict, provider=setup.call.provider,
                   caps=setup.caps)
    except FA2ContractError as exc:
        return exc.reasons
    return []


def provider_usable(provider: str) -> str | None:
    """None when the provider can run here, else why not."""
    import importlib.util

    if provider == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        return "flash_attn not installed"
    if provider == "torch" and not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "torch has no _flash_attention_forward"
    return None


def device_caps() -> str | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm{major}{minor}"


def env_line(env: dict) -> str:
    gpu = env.get("gpu", "none")
    if env.get("compute_capability"):
        gpu += f" (sm{env['compute_capability'].replace('.', '')}, {env.get('gpu_memory_gib')} GiB)"
    return (f"python {env.get('python')} | torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}) | "
            f"flash_attn {env.get('flash_attn')} | GPU {gpu} | driver {env.get('driver')} | "
            f"{env.get('platform')}")


def recommendation_lines(provider: str, rules) -> list[str]:
    """The provider spec's permanent-guard recommendation for each rule, where it has one."""
    from contracts import spec_for

    try:
        recs = getattr(spec_for(provider), "guard_recommendations", ())
    except Exception:  # noqa: BLE001
        return []
    lines = []
    for rec in recs:
        if rec.rule in rules:
            lines.append(f"  permanent guard: {rec.rule} -> {rec.action} when {rec.condition} "
                         f"[{', '.join(rec.archs) or 'any arch'}; evidence: {rec.evidence}]")
    return lines


def _emit(payload: dict) -> None:
    print(json.dumps(payload, default=str), flush=True)


def probe_one(mod, provider: str, variant: str, *, run_kernel: bool, cuda: bool, env: dict,
              as_json: bool) -> dict:
    """Describe, ask the contract, maybe run, classify: one (provider, variant) of one probe."""
    p = print
    p(f"\n== FA-2 probe {mod.NAME} [{variant}] provider={provider}")
    p(f"class:    {mod.TITLE}")
    p(f"expected: {mod.EXPECTED}")
    exploratory = getattr(mod, "EXPLORATORY", {}).get(provider)
    if exploratory:
        p(f"exploratory for {provider}: {exploratory}")
    result = {"stage": "contract", "probe": mod.NAME, "provider": provider, "variant": variant,
              "title": mod.TITLE, "expected_rules": [] if exploratory else list(mod.RULES)}
    caps = device_caps() if cuda else None
    na = getattr(mod, "not_applicable", None)
    reason = na(provider, variant) if na else None
    if reason:
        result.update(stage="result", outcome="not_applicable", detail=reason, contract_meta=[],
                      contract_strict=[], env=env)
        p(f"not applicable: {reason}")
        if as_json:
            _emit(result)
        return result
    device = "cuda" if (cuda and run_kernel) else "cpu"
    setup = mod.build(provider, variant, device)
    p("inputs:")
    for name, t in setup.call.tensors():
        p(tensor_line(name, t))
    p(f"call ({setup.call.layout}): {setup.call.text()}")
    for note in setup.notes:
        p(f"note: {note}")
    meta = contract_reasons(setup, strict=False)
    strict = contract_reasons(setup, strict=True)
    caps_note = f" (caps {setup.caps})" if setup.caps else ""
    p(f"contract (meta){caps_note}:   " + ("accepts" if not meta else "rejects: " + ", ".join(r.rule for r in meta)))
    p(f"contract (strict){caps_note}: " + ("accepts" if not strict else "rejects: " + ", ".join(r.rule for r in strict)))
    for r in strict:
        p(f"  [{r.rule}] ({r.kind}) {r.message}\n      fix: {r.fix}")
    for line in recommendation_lines(provider, {r.rule for r in strict} | set(mod.RULES)):
        p(line)
    result.update(contract_meta=[r.rule for r in meta], contract_strict=[r.rule for r in strict],
                  call=setup.call.text(), layout=setup.call.layout, inputs=setup.call.describe(),
                  caps=setup.caps or caps)
    if as_json:
        _emit(result)
    verdict = ", ".join(r.rule for r in strict) or "accepts"
    result["stage"] = "result"
    result["env"] = env
    if not cuda:
        outcome, detail = "skipped", "no CUDA"
        p(f"no CUDA: kernel not run; contract verdict: {verdict}")
    elif not run_kernel:
        outcome, detail = "skipped", "kernel not run (--no-run-kernel)"
        p(f"--no-run-kernel: kernel not run; contract verdict: {verdict}")
    elif (arch := getattr(mod, "arch_not_applicable", None)) and (why := arch(provider, variant, caps)):
        outcome, detail = "not_applicable", why
        p(f"not applicable: {why}")
    elif (why := provider_usable(provider)) is not None:
        outcome, detail = "skipped", why
        p(f"skipped: {why}")
    elif setup.needs_bytes and setup.needs_bytes > torch.cuda.mem_get_info()[0] - GiB:
        free = torch.cuda.mem_get_info()[0]
        outcome = "skipped"
        detail = f"needs {setup.needs_bytes / GiB:.1f} GiB, {free / GiB:.1f} GiB free"
        p(f"skipped: {detail}")
    else:
        p("calling the kernel ...", flush=True)
        sys.stderr.flush()
        outcome, detail = execute(setup)
        p(f"outcome: {outcome} -- {detail}")
    result.update(outcome=outcome, detail=detail)
    if as_json:
        _emit(result)
    return result


def main(mod, argv=None) -> int:
    """CLI of every probe: ``[--provider flash_attn|torch|all] [--variant V|all] [--json] [--run-kernel]``."""
    from conformance.tools.envinfo import collect

    ap = argparse.ArgumentParser(prog=f"python conformance/tools/probes/{mod.NAME}.py",
                                 description=(mod.__doc__ or "").strip().splitlines()[0])
    ap.add_argument("--provider", default="all", choices=[*mod.PROVIDERS, "all"])
    ap.add_argument("--variant", default="all", choices=[*mod.VARIANTS, "all"])
    ap.add_argument("--json", action="store_true", help="also print JSON lines (the last one is the result)")
    ap.add_argument("--run-kernel", action=argparse.BooleanOptionalAction, default=None,
                    help="call the raw kernel (default: only when CUDA is present)")
    args = ap.parse_args(argv)
    env = collect()
    print(f"environment: {env_line(env)}")
    cuda = bool(env.get("cuda_available"))
    run_kernel = cuda if args.run_kernel is None else args.run_kernel
    if run_kernel and not cuda:
        print("--run-kernel asked, but there is no CUDA device: the kernel cannot run here")
    providers = mod.PROVIDERS if args.provider == "all" else (args.provider,)
    variants = mod.VARIANTS if args.variant == "all" else (args.variant,)
    for provider in providers:
        for variant in variants:
            probe_one(mod, provider, variant, run_kernel=run_kernel, cuda=cuda, env=env, as_json=args.json)
    return 0
