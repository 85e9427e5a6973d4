"""FLA's Native Sparse Attention (``fla.ops.nsa``, fla-core 0.6.0) in the conformance suite's slots.

    python -m pytest conformance --nsa-impl=conformance.adapters.fla:nsa_attention
    python -m pytest conformance --nsa-select-impl=conformance.adapters.fla:select_blocks ...

What is FLA's code and what is not
----------------------------------
FLA's code, imported from the user's fla-core install (nothing of it is copied here):

=========  ===================================================  ===================================
slot       CUDA (FLA's kernels)                                 CPU (FLA's naive reference)
=========  ===================================================  ===================================
nsa        ``fla.ops.nsa.parallel.parallel_nsa``                ``fla.ops.nsa.naive.naive_nsa``
cmp        ``fla.ops.nsa.compression.parallel_nsa_compression``  ``naive.naive_nsa_compression``
sel        ``parallel_nsa(block_indices=..., no gates)``        ``naive.naive_nsa_selection``
select     ``fla.ops.nsa.parallel.parallel_nsa_topk``           ``naive.naive_nsa_topk``
compress   ``fla.ops.utils.pooling.mean_pooling``               unavailable (see below)
win        ``flash_attn`` called as FLA calls it:               unavailable (see below)
           ``causal=True, window_size=(w - 1, 0)``, no scale
=========  ===================================================  ===================================

Stand-ins, this module's own code, used on the CPU only and only inside one ``nsa_attention``
call (``cpu_standins`` patches the globals of ``fla.ops.nsa.naive`` and restores them after):

- ``mean_pooling_standin`` for FLA's ``mean_pooling`` (a Triton kernel: "0 active drivers" without
  a GPU): the mean of consecutive chunks of ``block_size`` tokens per sequence, a trailing partial
  chunk averaged over its own length, summed in fp32 and stored in the input dtype, exactly what
  ``fla/ops/utils/pooling.py`` computes.
- ``flash_attn_func_standin`` / ``flash_attn_varlen_func_standin`` for ``flash_attn`` (not
  installed on a CPU machine): FA-2's semantics in plain torch, ``causal`` and
  ``window_size=(left, right)`` (query i attends key j iff i - left <= j <= i, bottom-right
  aligned), GQA head h -> h // G, default scale 1/sqrt(D), fp32 arithmetic. Unlike the real
  flash_attn it also accepts fp32/fp64 inputs and Dk != Dv.

So the CPU ``win`` and ``compress`` slots would test only these stand-ins: they are declared
unavailable on the CPU. The CPU ``nsa`` slot tests FLA's naive selection, compression and
gating logic, with its window and pooling supplied by the stand-ins.

Conventions converted (not semantics)
-------------------------------------
- Layout: the suite's varlen tensors ``(T, H, D)`` get FLA's batch dim ``(1, T, H, D)`` and lose
  it again; gates ``(T, Hq, 3)`` become ``g_cmp, g_slc, g_swa`` of shape ``(1, T, Hq)``.
- ``cu_seqlens``: int64 for the naive code (FLA documents a LongTensor); int32 as given on CUDA,
  because ``flash_attn_varlen_func`` requires int32 (FLA's own varlen tests pass int32 too).
- Compressed blocks: FLA stores ceil(T / l) blocks per sequence (the trailing partial chunk is
  kept so that the current block's index exists for the forced selection; no query ever sees
  it, as FLA's visibility is (i + 1) * l - 1 <= t). The suite packs Tc = floor(T / l) blocks
  (l = d). ``to_fla_blocks`` appends a zero block per sequence with a partial chunk before
  FLA's cmp/select, ``from_fla_blocks`` drops FLA's partial block after ``mean_pooling``.
- Block indices: FLA returns them in score order (top-k); the select slot sorts them ascending
  with -1 last, as int32.
- cmp log-sum-exp: natural log in both. FLA's CUDA kernel stores 0 on rows that see no block
  (a sentinel, its own test says so); the adapter writes -inf there (this project's convention).
  The naive code already returns -inf.
- ``cfg.scale=None``: FLA's own default ``Dk ** -0.5``.

Not converted (FLA's semantics, judged as they are): everything else, e.g. that FLA's window
branch calls flash_attn without ``softmax_scale`` (so an explicit ``scale`` does not reach the
window), that a selection row without any visible token is NaN, that the CUDA top-k rounds
``n_sel`` up to a power of two.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import types
import warnings
from typing import Any, Callable, Iterator

import torch

from conformance.capabilities import Capabilities

__all__ = [
    "MISSING",
    "capabilities",
    "nsa_attention",
    "cmp_attention",
    "sel_attention",
    "win_attention",
    "select_blocks",
    "compress",
    "mean_pooling_standin",
    "flash_attn_func_standin",
    "flash_attn_varlen_func_standin",
    "cpu_standins",
    "to_fla_blocks",
    "from_fla_blocks",
    "sort_block_idx",
]

MISSING = "fla-core is not installed: pip install -e '.[fla]' (or put FLA on PYTHONPATH)"
NO_FLASH_ATTN = ("flash_attn is not installed: FLA's parallel_nsa computes its window branch with "
                 "flash_attn (pip install -e '.[flash]')")
CPU_WIN = "FLA's window branch is flash_attn; runs on CUDA only (on the CPU only this adapter's stand-in would run)"
CPU_COMPRESS = ("FLA's compression is fla.ops.utils.pooling.mean_pooling, a Triton kernel; runs on CUDA only "
                "(on the CPU only this adapter's stand-in would run)")


# --- importing FLA lazily ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _import_fla() -> tuple[types.SimpleNamespace | None, str | None]:
    """``(namespace of FLA's modules, None)`` or ``(None, why not)``; tried once per process.

    Importing ``fla.ops`` imports every FLA op (about 10 s on a CPU) and warns that Triton has no
    GPU and that flash_attn is missing; those warnings are FLA's and are silenced here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            naive = importlib.import_module("fla.ops.nsa.naive")
            parallel = importlib.import_module("fla.ops.nsa.parallel")
            compression = importlib.import_module("fla.ops.nsa.compression")
            pooling = importlib.import_module("fla.ops.utils.pooling")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "fla":
            return None, MISSING
        return None, f"fla-core is installed but importing it failed: {type(exc).__name__}: {exc}"
    except Exception as exc:  # FLA raised while importing (e.g. a Triton/torch mismatch)
        return None, f"fla-core is installed but importing it failed: {type(exc).__name__}: {exc}"
    return types.SimpleNamespace(naive=naive, parallel=parallel, compression=compression, pooling=pooling), None


def _fla() -> types.SimpleNamespace:
    """FLA's modules, or ImportError with the reason (MISSING when fla-core is not installed)."""
    fla, why = _import_fla()
    if fla is None:
        raise ImportError(why)
    return fla


def _flash_attn_funcs(fla: types.SimpleNamespace) -> tuple[Callable, Callable]:
    """The ``flash_attn_func`` / ``flash_attn_varlen_func`` FLA itself imported (None there when
    flash_attn is missing: then ImportError)."""
    dense, varlen = fla.parallel.flash_attn_func, fla.parallel.flash_attn_varlen_func
    if dense is None or varlen is None:
        raise ImportError(NO_FLASH_ATTN)
    return dense, varlen


def _on_cuda(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


# --- capabilities ------------------------------------------------------------------------------

#: Triton tile constraints of FLA's kernels: block sizes are tl.arange extents and tl.dot sides
#: (a power of two, >= 16); G = Hq / Hkv is a tl.arange extent and the dot's M side (a power of
#: two, >= 16; parallel_nsa/naive_nsa assert it); Dk <= 256 ("The key dimension can not be larger
#: than 256"); head dims >= 16 (tl.dot: "Input shapes should have M >= 1, N >= 1 and K >= 16",
#: seen on the H200 for Dk = 9 in the 2026-12-03 run).
_TRITON = dict(block_sizes=(16, 32, 64, 128), min_group=16, group_power_of_two=True, min_head_dim=16,
               max_head_dim=256)
#: FLA's forced blocks: block 0, the current one and the previous one.
_FORCED = dict(tied_blocks=True, n_init=(1,), n_local=(2,))
_CUDA_NOTE = ("CUDA: FLA's Triton kernels (and flash_attn for the window). Not expressible as fields: "
              "parallel_nsa_topk asserts block_size >= 2 * next_pow2(n_sel) and selects next_pow2(n_sel) "
              "blocks. fp32 inputs are accepted by FLA but its "
              "tl.dot runs in tf32 unless TRITON_F32_DEFAULT=ieee, so fp32 is declared only then.")
_CPU_NOTE = ("CPU: FLA's naive reference (fla.ops.nsa.naive), q/k/v cast to fp32 inside; nsa uses this "
             "adapter's torch stand-ins for FLA's mean_pooling (Triton) and for flash_attn (window), see "
             "conformance/adapters/fla.py.")


def _cuda_dtypes() -> tuple[str, ...]:
    """fp32 only where Triton's dots really run in fp32 (FLA's own tests set this variable)."""
    ieee = os.environ.get("TRITON_F32_DEFAULT", "").lower() == "ieee"
    return ("fp32", "bf16", "fp16") if ieee else ("bf16", "fp16")


def _cpu_capabilities(slot: str) -> Capabilities:
    common = dict(decode=False, compute_dtype="fp32", note=_CPU_NOTE)
    table = {
        # naive_nsa asserts G a power of two >= 16; naive_nsa_selection crashes on an empty
        # sequence in cu_seqlens (view of 0 elements with -1), so nsa and sel declare none.
        "nsa": Capabilities(**_FORCED, min_group=16, group_power_of_two=True, empty_sequences=False, **common),
        "cmp": Capabilities(tied_blocks=True, **common),
        "sel": Capabilities(tied_blocks=True, empty_sequences=False, **common),
        # naive_nsa_topk does not cast: it scores in the input dtype. Indices have no gradient.
        "select": Capabilities(**_FORCED, decode=False, backward=False, note=_CPU_NOTE),
        "win": Capabilities(unavailable=CPU_WIN, note=_CPU_NOTE),
        "compress": Capabilities(unavailable=CPU_COMPRESS, note=_CPU_NOTE),
    }
    return table[slot]


def _cuda_capabilities(slot: str, fla: types.SimpleNamespace) -> Capabilities:
    has_fa = fla.parallel.flash_attn_func is not None
    dtypes = _cuda_dtypes()
    common = dict(decode=False, dtypes=dtypes, note=_CUDA_NOTE)
    fa2 = dict(equal_head_dims=True, max_head_dim=256, dtypes=("bf16", "fp16"))  # flash_attn's own limits
    table = {
        "nsa": Capabilities(**_FORCED, **{**_TRITON, **fa2}, decode=False, note=_CUDA_NOTE,
                            unavailable=None if has_fa else NO_FLASH_ATTN),
        "cmp": Capabilities(tied_blocks=True, **_TRITON, **common),
        "sel": Capabilities(tied_blocks=True, **_TRITON, **common),
        "select": Capabilities(**_FORCED, **_TRITON, backward=False, **common),
        "win": Capabilities(**fa2, decode=False, note=_CUDA_NOTE, unavailable=None if has_fa else NO_FLASH_ATTN),
        # mean_pooling: the chunk is a tl.arange extent (a power of two); sums in fp32.
        "compress": Capabilities(tied_blocks=True, block_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                 compute_dtype="fp32", decode=False, dtypes=("fp32", "bf16", "fp16"),
                                 note=_CUDA_NOTE),
    }
    return table[slot]


def capabilities(slot: str, device: str = "cpu") -> Capabilities:
    """What FLA supports in ``slot`` (one of conformance.impl.SLOTS) on ``device``."""
    fla, why = _import_fla()
    if fla is None:
        return Capabilities(unavailable=why)
    if str(device).startswith("cuda"):
        return _cuda_capabilities(slot, fla)
    return _cpu_capabilities(slot)


def _declare(slot: str) -> Callable[[Callable], Callable]:
    """Attach ``fn.capabilities = device -> Capabilities`` for ``slot``."""
    def mark(fn: Callable) -> Callable:
        fn.capabilities = functools.partial(capabilities, slot)
        return fn
    return mark


# --- config checks (FLA has one block size and fixed forced blocks) ----------------------------

def _block_size(cfg: Any, fields: tuple[str, ...]) -> int:
    """The one block size FLA takes, when ``cfg``'s ``fields`` agree; else ValueError."""
    values = {f: int(getattr(cfg, f)) for f in fields}
    if len(set(values.values())) != 1:
        shown = ", ".join(f"{f}={v}" for f, v in values.items())
        raise ValueError(f"FLA's NSA has one block size (l = d = l'); got {shown}")
    return next(iter(values.values()))


def _check_forced(cfg: Any) -> None:
    if (int(cfg.n_init), int(cfg.n_local)) != (1, 2):
        raise ValueError(f"FLA's NSA always forces block 0 and the current and previous blocks "
                         f"(n_init=1, n_local=2); got n_init={cfg.n_init}, n_local={cfg.n_local}")


def _scale(cfg: Any, head_dim: int) -> float:
    """cfg.scale, or FLA's own default ``head_dim ** -0.5``."""
    return float(cfg.scale) if cfg.scale is not None else head_dim ** -0.5


# --- convention helpers ------------------------------------------------------------------------

def _lengths(cu_seqlens: torch.Tensor | None, total: int) -> list[int]:
    """Per-sequence lengths: ``cu_seqlens (B+1,)`` -> [T_0, ...]; None -> [total]."""
    if cu_seqlens is None:
        return [total]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def _fla_cu(cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The suite's int32 cu_seqlens as FLA gets it: int64 for the naive code, int32 on CUDA."""
    if cu_seqlens is None:
        return None
    return cu_seqlens.to(device=device, dtype=torch.int32 if device.type == "cuda" else torch.int64)


def _positions(lengths: list[int], device: torch.device) -> torch.Tensor:
    """Position of each packed token inside its sequence: ``(T,)`` int64."""
    return torch.cat([torch.arange(n, device=device) for n in lengths]) if lengths else \
        torch.zeros(0, dtype=torch.long, device=device)


def to_fla_blocks(x_cmp: torch.Tensor, lengths: list[int], block: int) -> torch.Tensor:
    """Suite packing -> FLA packing of compressed blocks.

    ``x_cmp (sum_b floor(T_b / l), H, D)`` -> ``(sum_b ceil(T_b / l), H, D)``: a zero block is
    appended to each sequence with a trailing partial chunk (a block no query sees in FLA)."""
    parts, start = [], 0
    for T in lengths:
        n = T // block
        parts.append(x_cmp[start:start + n])
        if T % block:
            parts.append(x_cmp.new_zeros((1, *x_cmp.shape[1:])))
        start += n
    if start != x_cmp.shape[0]:
        raise ValueError(f"compressed tensor has {x_cmp.shape[0]} blocks, expected {start} "
                         f"(floor(T / {block}) per sequence for lengths {lengths})")
    return torch.cat(parts) if parts else x_cmp[:0]


def from_fla_blocks(x_cmp: torch.Tensor, lengths: list[int], block: int) -> torch.Tensor:
    """FLA packing -> suite packing: ``(sum_b ceil(T_b / l), H, D)`` -> ``(sum_b floor(T_b / l), H, D)``,
    dropping each sequence's trailing partial-chunk block."""
    parts, start = [], 0
    for T in lengths:
        parts.append(x_cmp[start:start + T // block])
        start += -(-T // block)
    return torch.cat(parts) if parts else x_cmp[:0]


def sort_block_idx(idx: torch.Tensor) -> torch.Tensor:
    """``(..., S)`` block indices in any order, -1 anywhere -> ascending with -1 last, int32."""
    idx = idx.to(torch.int64)
    big = torch.iinfo(torch.int64).max
    ordered = torch.where(idx < 0, torch.full_like(idx, big), idx).sort(dim=-1).values
    return torch.where(ordered == big, torch.full_like(ordered, -1), ordered).to(torch.int32)


# --- CPU stand-ins for FLA's two GPU-only dependencies ----------------------------------------

def _pool_one(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """One sequence ``x (T, H, D)`` -> ``(ceil(T / chunk), H, D)``: chunk means in fp32, stored in x.dtype."""
    T = x.shape[0]
    n = -(-T // chunk)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, n * chunk - T))
    sums = xf.reshape(n, chunk, *x.shape[1:]).sum(dim=1)
    counts = (T - torch.arange(n, device=x.device) * chunk).clamp(max=chunk).to(sums.dtype)
    return (sums / counts.view(n, 1, 1)).to(x.dtype)


def mean_pooling_standin(x: torch.Tensor, chunk_size: int, cu_seqlens: torch.Tensor | None = None,
                         **kwargs) -> torch.Tensor:
    """Torch twin of FLA's ``fla.ops.utils.pooling.mean_pooling`` (CPU stand-in, not FLA's code).

    ``x (B, T, H, D)`` -> ``(B, ceil(T / chunk_size), H, D)``: the mean of each chunk of
    ``chunk_size`` consecutive tokens, the trailing partial chunk divided by its own length
    (the kernel's ``sum / min(BT, T - i_t * BT)``), fp32 sums stored in ``x.dtype``. With
    ``cu_seqlens (N+1,)`` (B must be 1): per sequence, packed -> ``(1, sum_n ceil(T_n / chunk_size), H, D)``
    (FLA's ``prepare_chunk_offsets`` layout)."""
    if kwargs:
        raise TypeError(f"mean_pooling stand-in: unsupported arguments {sorted(kwargs)}")
    if cu_seqlens is None:
        return torch.stack([_pool_one(xb, chunk_size) for xb in x]) if x.shape[0] else \
            x.new_zeros((0, -(-x.shape[1] // chunk_size), *x.shape[2:]))
    if x.shape[0] != 1:
        raise ValueError(f"mean_pooling with cu_seqlens expects batch size 1, got {x.shape[0]}")
    cu = [int(c) for c in cu_seqlens.tolist()]
    parts = [_pool_one(x[0, a:b], chunk_size) for a, b in zip(cu[:-1], cu[1:])]
    return torch.cat(parts)[None] if parts else x.new_zeros((1, 0, *x.shape[2:]))


def _fa2_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
             window_size: tuple[int, int], max_q: int | None = None, max_k: int | None = None) -> torch.Tensor:
    """FA-2 attention of one sequence: ``q (Tq, Hq, D)``, ``k (Tk, Hkv, D)``, ``v (Tk, Hkv, Dv)`` -> ``(Tq, Hq, Dv)``.

    The mask is FA-2's own (``contracts.fa2_mask``: bottom-right aligned, causal = right window 0,
    the window normalised with the call's max_seqlen); GQA head h uses KV head h // G; fp32
    arithmetic; a row with no key is 0."""
    from contracts.fa2_mask import fa2_mask

    Tq, Hq, _ = q.shape
    Tk, Hkv, _ = k.shape
    G = Hq // Hkv
    kf, vf = k.float().repeat_interleave(G, dim=1), v.float().repeat_interleave(G, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    allowed = fa2_mask(Tq, Tk, causal, tuple(window_size), max_q, max_k, device=q.device)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = probs.masked_fill(~allowed.any(dim=-1)[:, None], 0.0)  # FA-2: a row with no key is 0
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


def flash_attn_func_standin(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Torch twin of FA-2's ``flash_attn_func`` (CPU stand-in, not flash_attn's code).

    ``q (B, Tq, Hq, D)``, ``k (B, Tk, Hkv, D)``, ``v (B, Tk, Hkv, Dv)`` -> ``(B, Tq, Hq, Dv)``;
    ``softmax_scale=None`` -> 1/sqrt(D); ``causal`` with ``window_size=(left, right)``: query i
    attends key j with i - left <= j <= i (aligned to the bottom-right corner)."""
    if dropout_p:
        raise NotImplementedError("flash_attn stand-in: dropout is not modelled")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return torch.stack([_fa2_one(q[b], k[b], v[b], scale, causal, window_size) for b in range(q.shape[0])]) \
        if q.shape[0] else q.new_zeros((*q.shape[:3], v.shape[-1]))


def flash_attn_varlen_func_standin(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                   max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                                   softmax_scale: float | None = None, causal: bool = False,
                                   window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Torch twin of FA-2's ``flash_attn_varlen_func`` (CPU stand-in, not flash_attn's code).

    ``q (total_q, Hq, D)``, ``k (total_k, Hkv, D)``, ``v (total_k, Hkv, Dv)`` packed by
    ``cu_seqlens_q`` / ``cu_seqlens_k`` -> ``(total_q, Hq, Dv)``; each sequence as
    ``flash_attn_func_standin``; an empty sequence contributes nothing."""
    if dropout_p:
        raise NotImplementedError("flash_attn stand-in: dropout is not modelled")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))
    cq, ck = [int(x) for x in cu_seqlens_q.tolist()], [int(x) for x in cu_seqlens_k.tolist()]
    for b in range(len(cq) - 1):
        if cq[b + 1] > cq[b]:
            out[cq[b]:cq[b + 1]] = _fa2_one(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                                            scale, causal, window_size, max_seqlen_q, max_seqlen_k)
    return out


@contextlib.contextmanager
def cpu_standins(naive: types.ModuleType) -> Iterator[None]:
    """Inside the block, ``fla.ops.nsa.naive``'s globals ``mean_pooling``, ``flash_attn_func`` and
    ``flash_attn_varlen_func`` are this module's stand-ins; restored on exit (errors included)."""
    patch = {"mean_pooling": mean_pooling_standin, "flash_attn_func": flash_attn_func_standin,
             "flash_attn_varlen_func": flash_attn_varlen_func_standin}
    saved = {name: getattr(naive, name) for name in patch}
    try:
        for name, fn in patch.items():
            setattr(naive, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(naive, name, fn)


# --- the slots ---------------------------------------------------------------------------------

@_declare("nsa")
def nsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, cfg: Any,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Full NSA through FLA: ``q (T, Hq, Dk)``, ``k (T, Hkv, Dk)``, ``v (T, Hkv, Dv)``,
    ``gates (T, Hq, 3)`` [g_cmp, g_sel, g_win] -> ``(T, Hq, Dv)``.

    CUDA: ``parallel_nsa``; CPU: ``naive_nsa`` with the stand-ins for mean_pooling and flash_attn."""
    fla = _fla()
    block = _block_size(cfg, ("block_len", "block_stride", "sel_block"))
    _check_forced(cfg)
    kwargs = dict(g_cmp=gates[None, ..., 0], g_slc=gates[None, ..., 1], g_swa=gates[None, ..., 2],
                  block_counts=int(cfg.n_sel), block_size=block, window_size=int(cfg.window), scale=cfg.scale,
                  cu_seqlens=_fla_cu(cu_seqlens, q.device))
    if _on_cuda(q):
        _flash_attn_funcs(fla)
        return fla.parallel.parallel_nsa(q[None], k[None], v[None], **kwargs)[0]
    with cpu_standins(fla.naive):
        return fla.naive.naive_nsa(q[None], k[None], v[None], **kwargs)[0]


@_declare("cmp")
def cmp_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, cfg: Any,
                  cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed branch: ``q (T, Hq, Dk)``, ``k_cmp (Tc, Hkv, Dk)``, ``v_cmp (Tc, Hkv, Dv)`` (suite
    packing, floor(T_b / l) per sequence) -> ``out (T, Hq, Dv)``, ``lse (T, Hq)`` fp32, natural
    log, -inf on rows that see no block."""
    fla = _fla()
    block = _block_size(cfg, ("block_len", "block_stride"))
    lengths = _lengths(cu_seqlens, q.shape[0])
    kc, vc = (to_fla_blocks(x, lengths, block)[None] for x in (k_cmp, v_cmp))
    scale, cu = _scale(cfg, q.shape[-1]), _fla_cu(cu_seqlens, q.device)
    if _on_cuda(q):
        out, lse = fla.compression.parallel_nsa_compression(q[None], kc, vc, TK=q.shape[0], block_size=block,
                                                            scale=scale, cu_seqlens=cu)
        empty = _positions(lengths, q.device) < block - 1  # FLA's kernel stores lse 0 there
        return out[0], lse[0].masked_fill(empty[:, None], float("-inf"))
    out, lse = fla.naive.naive_nsa_compression(q[None], kc, vc, block_size=block, scale=scale, cu_seqlens=cu)
    return out[0], lse[0]


@_declare("sel")
def sel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, cfg: Any,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Selected branch: ``q (T, Hq, Dk)``, ``k (T, Hkv, Dk)``, ``v (T, Hkv, Dv)``,
    ``block_idx (T, Hkv, n)`` (-1 padded) -> ``(T, Hq, Dv)``; selection blocks of ``cfg.sel_block``."""
    fla = _fla()
    block, cu = int(cfg.sel_block), _fla_cu(cu_seqlens, q.device)
    idx = block_idx.to(device=q.device, dtype=torch.int64)[None]
    if _on_cuda(q):
        return fla.parallel.parallel_nsa(q[None], k[None], v[None], block_indices=idx, block_counts=idx.shape[-1],
                                         block_size=block, scale=cfg.scale, cu_seqlens=cu)[0]
    return fla.naive.naive_nsa_selection(q[None], k[None], v[None], idx, block_size=block, scale=cfg.scale,
                                         cu_seqlens=cu)[0]


@_declare("win")
def win_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Any,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Window branch, CUDA only: flash_attn exactly as FLA's parallel_nsa calls it
    (``causal=True, window_size=(w - 1, 0)``, no ``softmax_scale``). ``q (T, Hq, D)``,
    ``k (T, Hkv, D)``, ``v (T, Hkv, D)`` -> ``(T, Hq, D)``."""
    fla = _fla()
    if not _on_cuda(q):
        raise RuntimeError(CPU_WIN)
    dense, varlen = _flash_attn_funcs(fla)
    window = (int(cfg.window) - 1, 0)
    if cu_seqlens is None:
        return dense(q[None], k[None], v[None], causal=True, window_size=window)[0]
    cu = _fla_cu(cu_seqlens, q.device)
    return varlen(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=q.shape[0], max_seqlen_k=k.shape[0],
                  causal=True, window_size=window)


@_declare("select")
def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, cfg: Any,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Block selection: ``q (T, Hq, Dk)``, ``k_cmp (Tc, Hkv, Dk)`` (suite packing) ->
    ``block_idx (T, Hkv, S)`` int32, ascending, -1 last (S = n_sel; FLA's CUDA top-k returns
    next_pow2(n_sel) columns, kept as they are)."""
    fla = _fla()
    block = _block_size(cfg, ("block_len", "block_stride", "sel_block"))
    _check_forced(cfg)
    lengths = _lengths(cu_seqlens, q.shape[0])
    kc = to_fla_blocks(k_cmp, lengths, block)[None]
    scale, cu = _scale(cfg, q.shape[-1]), _fla_cu(cu_seqlens, q.device)
    if _on_cuda(q):
        idx = fla.parallel.parallel_nsa_topk(q[None], kc, TK=q.shape[0], lse=None, block_counts=int(cfg.n_sel),
                                             block_size=block, scale=scale, cu_seqlens=cu)
    else:
        idx = fla.naive.naive_nsa_topk(q[None], kc, block_counts=int(cfg.n_sel), block_size=block, scale=scale,
                                       cu_seqlens=cu)
    return sort_block_idx(idx[0])


@_declare("compress")
def compress(x: torch.Tensor, cfg: Any, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean compression, CUDA only (FLA's ``mean_pooling``): ``x (T, H, D)`` ->
    ``(sum_b floor(T_b / l), H, D)`` packed per sequence (FLA's partial-chunk block dropped)."""
    fla = _fla()
    if not _on_cuda(x):
        raise RuntimeError(CPU_COMPRESS)
    block = _block_size(cfg, ("block_len", "block_stride"))
    lengths = _lengths(cu_seqlens, x.shape[0])
    pooled = fla.pooling.mean_pooling(x[None], block, _fla_cu(cu_seqlens, x.device))[0]
    return from_fla_blocks(pooled, lengths, block)
