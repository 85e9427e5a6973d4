"""Conformance adapter for XunhaoLai/native-sparse-attention-triton (``native_sparse_attention``).

Upstream: https://github.com/XunhaoLai/native-sparse-attention-triton (Apache-2.0). Nothing of it
is vendored here: the adapter imports ``native_sparse_attention`` from wherever the user put it::

    pip install git+https://github.com/XunhaoLai/native-sparse-attention-triton.git
    # or, from a checkout kept outside git (this repository ignores .peers/):
    PYTHONPATH=.peers/native-sparse-attention-triton python -m pytest conformance \\
        --nsa-impl=conformance.adapters.nsa_triton:nsa_attention --nsa-dtype=bf16

What the library offers and which of its functions each slot runs
-----------------------------------------------------------------
======== =============================================== =============================================
slot     CUDA (Triton kernels, the library's product)    CPU (its pure-torch "debug" references)
======== =============================================== =============================================
compress ``ops.avgpool_compress`` (w=None, pe=None):     ``ops.torch.compress_key_value.
         parameter-free mean of tokens [i*d, i*d+l)      avgpool_compress_torch`` (hard-codes
                                                         device="cuda" for one int32 buffer; the
                                                         adapter redirects that factory call to the
                                                         input's device, nothing else changes)
cmp      ``ops.triton.compressed_attention.              ``ops.torch.compressed_attention.
         CompressedAttention`` (the autograd Function    compressed_attention_torch`` (out only;
         ``compressed_attention`` wraps; returns its     it has no log-sum-exp)
         base-2 lse, converted here to natural log)
select   ``ops.compressed_attention(...)[1]`` (top-k)    ``compressed_attention_torch(...)[1]``
sel      ``ops.topk_sparse_attention``                   ``ops.torch.topk_sparse_attention.
                                                         topk_sparse_attention_torch``
win      ``flash_attn.flash_attn_varlen_func(causal=True, window_size=(w, -1))`` -- what the
         library's ``NativeSparseAttention`` module calls; the library has no window op of its own.
         Where ``flash_attn`` is not importable (always on CPU) the adapter evaluates that same
         call's definition (keys s with t - w <= s <= t) with a masked softmax ("emulated").
nsa      ``NativeSparseAttention.forward`` without its projections, RoPE and gate Linear:
         avgpool compress -> compressed_attention -> topk_sparse_attention -> window, gated
         ``g[...,0]*cmp + g[...,1]*sel + g[...,2]*win`` (the module's order).
======== =============================================== =============================================

Conventions converted (and nothing else)
----------------------------------------
* ``block_idx``: the library's ``topk_idx`` is ``(Hkv, T, k) int32`` with ``k = min(n, max #blocks)``;
  the suite's is ``(T, Hkv, n)``: transposed and right-padded with -1 (it is already ascending with
  its -1 entries last).
* ``lse``: the Triton kernel stores ``log2(sum 2^(qk*scale*log2 e))`` as ``(Hq, T)``; returned as
  ``(T, Hq)`` natural log (times ln 2); rows with no visible block stay ``-inf``.
* ``cu_seqlens=None`` -> one sequence; compressed offsets come from the library's own
  ``ops.triton.utils.get_compressed_seqlens``; int dtypes -> int32; inputs made contiguous.
* CUDA only: the Triton kernels take one head dim for q, k and v and need it >= 16 (``tl.dot``);
  q/k and v are zero-padded along the head dim to ``max(Dk, Dv, 16)`` and the output sliced back,
  with the softmax scale passed explicitly (``1/sqrt(Dk)`` of the unpadded Dk). Zero columns change
  no dot product, so this is exact.
* The scale is always passed explicitly (``cfg.scale`` or ``1/sqrt(Dk)``).
* The cmp and compress slots pass ``block_size``/``topk``/forced counts only to outputs they
  discard (the CPU reference asserts ``block_size % kernel_size == 0`` even for them).

Semantic differences are *exposed*, never fixed: e.g. the window attends ``w + 1`` keys
(``window_size=(w, -1)``), and the torch ``topk_sparse_attention_torch`` turns a ``-1`` pad into
block 0 (issue 17 point 7 lists the differences found, each with a minimal repro).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from conformance.capabilities import SLOT_FIELDS, Capabilities

PACKAGE = "native_sparse_attention"
UPSTREAM = "https://github.com/XunhaoLai/native-sparse-attention-triton"
INSTALL_HINT = (
    f"install it (pip install git+{UPSTREAM}.git) or put a checkout on PYTHONPATH, e.g. "
    "mkdir -p .peers && git clone " + UPSTREAM + " .peers/native-sparse-attention-triton && "
    "export PYTHONPATH=.peers/native-sparse-attention-triton"
)

#: Sizes the library's kernels assert (avgpool/linear compress: kernel_size; topk_sparse_attention:
#: block_size).
COMPRESS_KERNEL_SIZES = (16, 32, 64, 128)
SEL_BLOCK_SIZES = (32, 64, 128, 256)
#: README: "Only support attention head dimension less than 128 for now" (compressed / top-k kernels).
MAX_HEAD_DIM = 128
_POW2 = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

__all__ = [
    "NSATritonUnavailable", "XunhaoCapabilities", "unavailable_reason",
    "nsa_attention", "cmp_attention", "sel_attention", "win_attention", "select_blocks", "compress",
]


class NSATritonUnavailable(ImportError, RuntimeError):
    """native-sparse-attention-triton cannot run here (not importable, or CUDA asked for and absent).
    An ImportError, as ``conformance.adapters`` promises for a missing third party."""


# --- capabilities -------------------------------------------------------------------------------

@dataclass(frozen=True)
class XunhaoCapabilities(Capabilities):
    """``Capabilities`` plus the block-size rules of this library that one shared ``block_sizes``
    set cannot say (it applies one set to l, d and l' alike):

    ``block_len_sizes``  allowed l (the compress kernels assert kernel_size in {16, 32, 64, 128})
    ``sel_block_sizes``  allowed l' (topk_sparse_attention asserts block_size in {32, ..., 256})
    ``sel_multiple_of_block_len``  l' % l == 0 (the torch reference compressed_attention asserts it)
    ``more_tokens_than_blocks``  the Triton compressed_attention asserts q_len > k_len (T > Tc),
                                 which l = d = 1 (Tc = T) breaks
    """

    block_len_sizes: tuple[int, ...] | None = None
    sel_block_sizes: tuple[int, ...] | None = None
    sel_multiple_of_block_len: bool = False
    more_tokens_than_blocks: bool = False

    def config_reasons(self, cfg: Any, slot: str = "nsa") -> list[str]:
        reasons = super().config_reasons(cfg, slot)
        values = cfg if isinstance(cfg, dict) else {f: getattr(cfg, f) for f in SLOT_FIELDS["nsa"]}
        used = SLOT_FIELDS.get(slot, SLOT_FIELDS["nsa"])
        l, lp = values.get("block_len"), values.get("sel_block")
        if self.block_len_sizes is not None and "block_len" in used and l not in self.block_len_sizes:
            reasons.append(f"block_len={l} not in the library's compression kernel sizes {list(self.block_len_sizes)}")
        if self.sel_block_sizes is not None and "sel_block" in used and lp not in self.sel_block_sizes:
            reasons.append(f"sel_block={lp} not in the library's top-k kernel block sizes {list(self.sel_block_sizes)}")
        if (self.sel_multiple_of_block_len and "sel_block" in used and "block_len" in used
                and l and lp % l):
            reasons.append(f"sel_block={lp} is not a multiple of block_len={l} "
                           "(the library's torch compressed_attention asserts it)")
        d = values.get("block_stride")
        if self.more_tokens_than_blocks and "block_len" in used and l == 1 and d == 1:
            reasons.append("block_len=block_stride=1 gives as many compressed blocks as tokens; the library's "
                           "compressed_attention asserts q_len > k_len")
        return reasons

    def summary(self) -> list[str]:
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(Capabilities)}
        out = Capabilities(**base).summary()
        for name in ("block_len_sizes", "sel_block_sizes", "sel_multiple_of_block_len", "more_tokens_than_blocks"):
            value = getattr(self, name)
            if value not in (None, False):
                out.append(f"{name}={value!r}")
        return out


def _import(name: str):
    """Import hook (tests replace it to simulate a missing package)."""
    return importlib.import_module(name)


def _device_type(device: Any) -> str:
    return torch.device(device).type


def _flash_attn_varlen():
    """``flash_attn.flash_attn_varlen_func`` or None."""
    try:
        return _import("flash_attn").flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - any import failure means "use the emulation"
        return None


def unavailable_reason(device: Any = "cpu") -> str | None:
    """Why the library cannot run on ``device`` here, or None."""
    kind = _device_type(device)
    if kind not in ("cpu", "cuda"):
        return (f"native-sparse-attention-triton: device {device!r} not supported "
                "(CPU: its torch references; CUDA: its Triton kernels)")
    if kind == "cuda" and not torch.cuda.is_available():
        return ("native-sparse-attention-triton: CUDA requested but torch.cuda.is_available() is False; "
                "run on a CUDA machine, or use --nsa-device=cpu (the library's pure-torch references)")
    modules = ["native_sparse_attention.ops"]
    if kind == "cpu":
        modules += ["native_sparse_attention.ops.torch.compress_key_value",
                    "native_sparse_attention.ops.torch.compressed_attention",
                    "native_sparse_attention.ops.torch.topk_sparse_attention"]
    for name in modules:
        try:
            _import(name)
        except Exception as exc:  # noqa: BLE001 - report whatever stopped the import
            missing = getattr(exc, "name", None) or ""
            what = (f"{PACKAGE} is not importable (not installed, not on PYTHONPATH)"
                    if isinstance(exc, ModuleNotFoundError) and missing.split(".")[0] == PACKAGE
                    else f"importing {name} failed")
            return (f"native-sparse-attention-triton: {what} ({type(exc).__name__}: {exc}); {INSTALL_HINT}. "
                    "It needs torch, triton and einops (flash_attn only for the window branch on CUDA).")
    return None


_COMMON = dict(decode=False, lse=False, varlen=True, empty_sequences=True, window=True, explicit_scale=True)


def _caps_for(slot: str, device: Any) -> Capabilities:
    reason = unavailable_reason(device)
    if reason:
        return XunhaoCapabilities(unavailable=reason, note=f"native-sparse-attention-triton {slot}")
    cuda = _device_type(device) == "cuda"
    kw: dict[str, Any] = dict(_COMMON)
    src = "Triton kernels" if cuda else "pure-torch references (ops.torch, 'for debugging only')"
    if cuda:
        kw.update(dtypes=("bf16", "fp16"), max_head_dim=MAX_HEAD_DIM)
    else:
        kw.update(dtypes=("fp64", "fp32", "bf16", "fp16"), compute_dtype="fp32")
    if slot == "compress":
        kw.update(block_sizes=COMPRESS_KERNEL_SIZES, block_len_sizes=COMPRESS_KERNEL_SIZES,
                  dtypes=("bf16", "fp16"), compute_dtype=None, max_head_dim=None, backward=True)
        note = (f"avgpool_compress ({src}); fp16/bf16 only, kernel_size in {list(COMPRESS_KERNEL_SIZES)}; "
                "block_sizes also restricts d (the library takes any d dividing l)")
    elif slot == "cmp":
        kw.update(backward=True, lse=cuda, more_tokens_than_blocks=cuda)
        note = (f"compressed attention ({src}); " + ("lse from CompressedAttention (log2 -> ln); " if cuda else
                "the torch reference returns no lse and takes its softmax in fp32; ") +
                ("q/k/v zero-padded to one head dim >= 16 (exact)" if cuda else "any Dk/Dv"))
    elif slot == "select":
        kw.update(backward=False, more_tokens_than_blocks=cuda)
        if not cuda:
            kw.update(block_sizes=_POW2, sel_multiple_of_block_len=True)
        note = (f"top-k of compressed_attention ({src}); torch.topk decides ties; "
                + ("" if cuda else "block_sizes: powers of two (l' % l == 0 is asserted by the torch reference)"))
    elif slot == "sel":
        kw.update(backward=True)
        if cuda:  # for sel, block_sizes constrains l' only (the one block field sel uses)
            kw.update(sel_block_sizes=SEL_BLOCK_SIZES, block_sizes=SEL_BLOCK_SIZES)
        note = f"topk_sparse_attention ({src})" + (f"; block_size (l') in {list(SEL_BLOCK_SIZES)}" if cuda else "")
    elif slot == "win":
        fa = _flash_attn_varlen() if cuda else None
        kw.update(backward=True, max_head_dim=256 if fa else None)
        if fa is None:
            kw.update(dtypes=("fp64", "fp32", "bf16", "fp16"), compute_dtype=None)
        note = ("flash_attn_varlen_func(causal=True, window_size=(w, -1)) as the library's module calls it"
                if fa else "emulated definition of the module's flash_attn_varlen_func(causal=True, "
                "window_size=(w, -1)) call (flash_attn not importable); the library has no window op")
    elif slot == "nsa":
        kw.update(backward=True, dtypes=("bf16", "fp16"), compute_dtype=None,
                  block_sizes=COMPRESS_KERNEL_SIZES, block_len_sizes=COMPRESS_KERNEL_SIZES)
        if cuda:
            kw.update(sel_block_sizes=SEL_BLOCK_SIZES)
        else:
            kw.update(sel_multiple_of_block_len=True)
        win = "flash_attn" if (cuda and _flash_attn_varlen()) else "emulated flash_attn window"
        note = (f"NativeSparseAttention.forward minus projections/RoPE/gate Linear ({src}, window: {win}); "
                "fp16/bf16 only because the compression kernels assert it")
    else:  # pragma: no cover - programming error
        raise ValueError(slot)
    return XunhaoCapabilities(note=f"native-sparse-attention-triton: {note}", **kw)


def _declare(slot: str) -> Callable[[Any], Capabilities]:
    def capabilities(device: Any = "cpu") -> Capabilities:
        return _caps_for(slot, device)

    capabilities.__name__ = f"{slot}_capabilities"
    return capabilities


# --- helpers --------------------------------------------------------------------------------------

def _require(device: torch.device) -> None:
    reason = unavailable_reason(device)
    if reason:
        raise NSATritonUnavailable(reason)


def _cu(cu_seqlens, total: int, device) -> torch.Tensor:
    if cu_seqlens is None:
        return torch.tensor([0, total], dtype=torch.int32, device=device)
    return cu_seqlens.to(device=device, dtype=torch.int32).contiguous()


def _max_len(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0


def _cmp_cu(cu: torch.Tensor, cfg) -> tuple[torch.Tensor, int]:
    """Compressed offsets by the library's own rule (utils.get_compressed_seqlens)."""
    utils = _import("native_sparse_attention.ops.triton.utils")
    seqlens, cu_cmp = utils.get_compressed_seqlens(cu, int(cfg.block_len), int(cfg.block_stride))
    return cu_cmp.to(torch.int32), (int(seqlens.max().item()) if seqlens.numel() else 0)


def _scale(cfg, dk: int) -> float:
    return float(cfg.scale) if cfg.scale is not None else 1.0 / math.sqrt(dk)


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[-1] == width:
        return x.contiguous()
    return torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()


def _kernel_width(*dims: int) -> int:
    return max(16, *dims)


def _check_blocks(cfg, *, cuda: bool, sel: bool = False, compress: bool = False,
                  select_torch: bool = False) -> None:
    """Raise a clear error (instead of the library's bare assert) outside its block sizes."""
    l, lp = int(cfg.block_len), int(cfg.sel_block)
    if compress and l not in COMPRESS_KERNEL_SIZES:
        raise NotImplementedError(f"native-sparse-attention-triton: compression kernel_size (block_len) must be in "
                                  f"{list(COMPRESS_KERNEL_SIZES)}, got {l}")
    if sel and cuda and lp not in SEL_BLOCK_SIZES:
        raise NotImplementedError(f"native-sparse-attention-triton: topk_sparse_attention block_size (sel_block) "
                                  f"must be in {list(SEL_BLOCK_SIZES)}, got {lp}")
    if select_torch and lp % l:
        raise NotImplementedError(f"native-sparse-attention-triton: the torch compressed_attention asserts "
                                  f"block_size % kernel_size == 0, got sel_block={lp}, block_len={l}")


class _CudaFactoriesOnInputDevice(torch.overrides.TorchFunctionMode):
    """Redirect ``device="cuda"`` of factory calls to ``device`` (the torch compress references
    build one int32 offsets buffer with a hard-coded ``device="cuda"``)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = self.device
        return func(*args, **kwargs)


def _idx_to_suite(topk_idx: torch.Tensor, n_sel: int) -> torch.Tensor:
    """(Hkv, T, k) -> (T, Hkv, n_sel) int32, -1 padded on the right."""
    idx = topk_idx.permute(1, 0, 2).to(torch.int32)
    k = idx.shape[-1]
    if k < n_sel:
        pad = idx.new_full((*idx.shape[:2], n_sel - k), -1)
        idx = torch.cat([idx, pad], dim=-1)
    return idx[..., :n_sel].contiguous()


def _idx_to_library(block_idx: torch.Tensor, device) -> torch.Tensor:
    """(T, Hkv, n) -> (Hkv, T, n) int32 contiguous."""
    return block_idx.to(device=device, dtype=torch.int32).permute(1, 0, 2).contiguous()


def _window_emulated(q, k, v, w: int, scale: float, cu: torch.Tensor) -> torch.Tensor:
    """Definition of ``flash_attn_varlen_func(q, k, v, cu, cu, ..., causal=True, window_size=(w, -1))``:
    query t attends keys s with t - w <= s <= t of its own sequence (w + 1 keys)."""
    T, hq, _ = q.shape
    hkv = k.shape[1]
    G = hq // hkv
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros((T, hq, v.shape[-1]))
    bounds = [int(x) for x in cu.tolist()]
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        if n == 0:
            continue
        qs = q[s:e].to(compute).transpose(0, 1)  # (Hq, n, Dk)
        ks = k[s:e].to(compute).repeat_interleave(G, dim=1).transpose(0, 1)
        vs = v[s:e].to(compute).repeat_interleave(G, dim=1).transpose(0, 1)
        t = torch.arange(n, device=q.device)
        keep = (t[None, :] <= t[:, None]) & (t[None, :] >= t[:, None] - w)
        logits = (qs @ ks.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~keep, float("-inf"))
        out[s:e] = (torch.softmax(logits, dim=-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


# --- slot functions -----------------------------------------------------------------------------

def compress(x, cfg, cu_seqlens=None):
    """``x (T, H, D)`` -> ``(x_cmp (Tc, H, D), cu_seqlens_cmp)`` by the library's avgpool compression."""
    _require(x.device)
    cuda = x.device.type == "cuda"
    _check_blocks(cfg, cuda=cuda, compress=True)
    cu = _cu(cu_seqlens, x.shape[0], x.device)
    l, d = int(cfg.block_len), int(cfg.block_stride)
    if cuda:
        ops = _import("native_sparse_attention.ops")
        return ops.avgpool_compress(x.contiguous(), None, cu, l, d, None)
    ref = _import("native_sparse_attention.ops.torch.compress_key_value")
    with _CudaFactoriesOnInputDevice(x.device):
        return ref.avgpool_compress_torch(x.contiguous(), None, cu, l, d, None)


def cmp_attention(q, k_cmp, v_cmp, cfg, cu_seqlens=None):
    """Compressed attention. CUDA: ``(out, lse)`` (lse natural log, -inf on empty rows); CPU: out."""
    _require(q.device)
    cu = _cu(cu_seqlens, q.shape[0], q.device)
    cu_cmp, max_k = _cmp_cu(cu, cfg)
    max_q = _max_len(cu)
    dk, dv = q.shape[-1], v_cmp.shape[-1]
    scale = _scale(cfg, dk)
    l, d = int(cfg.block_len), int(cfg.block_stride)
    if q.device.type == "cuda":
        mod = _import("native_sparse_attention.ops.triton.compressed_attention")
        width = _kernel_width(dk, dv)
        out, lse2 = mod.CompressedAttention.apply(
            _pad_to(q, width), _pad_to(k_cmp, width), _pad_to(v_cmp, width), l, d, cu, cu_cmp,
            max_q, max_k, scale)
        return out[..., :dv], (lse2.transpose(0, 1) * math.log(2.0)).contiguous()
    ref = _import("native_sparse_attention.ops.torch.compressed_attention")
    # block_size/topk/init/local only feed the discarded top-k; the reference asserts
    # block_size % kernel_size == 0, so pass a value that satisfies it when cfg's does not.
    lp = int(cfg.sel_block) if int(cfg.sel_block) % l == 0 else l
    out, _ = ref.compressed_attention_torch(
        q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous(), l, d, lp, int(cfg.n_sel), cu, cu_cmp,
        max_q, max_k, scale, int(cfg.n_init), int(cfg.n_local))
    return out


def select_blocks(q, k_cmp, cfg, cu_seqlens=None):
    """``block_idx (T, Hkv, n_sel) int32``: the library's top-k (ascending, -1 padded)."""
    _require(q.device)
    cuda = q.device.type == "cuda"
    _check_blocks(cfg, cuda=cuda, select_torch=not cuda)
    cu = _cu(cu_seqlens, q.shape[0], q.device)
    cu_cmp, max_k = _cmp_cu(cu, cfg)
    max_q = _max_len(cu)
    dk = q.shape[-1]
    scale = _scale(cfg, dk)
    args = (int(cfg.block_len), int(cfg.block_stride), int(cfg.sel_block), int(cfg.n_sel), cu, cu_cmp,
            max_q, max_k, scale, int(cfg.n_init), int(cfg.n_local))
    with torch.no_grad():
        if cuda:
            ops = _import("native_sparse_attention.ops")
            width = _kernel_width(dk)
            qp, kp = _pad_to(q, width), _pad_to(k_cmp, width)
            _, topk_idx = ops.compressed_attention(qp, kp, kp, *args)  # values do not enter the scores
        else:
            ref = _import("native_sparse_attention.ops.torch.compressed_attention")
            kc = k_cmp.contiguous()
            _, topk_idx = ref.compressed_attention_torch(q.contiguous(), kc, kc, *args)
    return _idx_to_suite(topk_idx, int(cfg.n_sel))


def sel_attention(q, k, v, block_idx, cfg, cu_seqlens=None):
    """Selected-block attention over the given ``block_idx (T, Hkv, n)``."""
    _require(q.device)
    cuda = q.device.type == "cuda"
    _check_blocks(cfg, cuda=cuda, sel=True)
    cu = _cu(cu_seqlens, q.shape[0], q.device)
    dk, dv = q.shape[-1], v.shape[-1]
    scale = _scale(cfg, dk)
    idx = _idx_to_library(block_idx, q.device)
    lp = int(cfg.sel_block)
    if cuda:
        ops = _import("native_sparse_attention.ops")
        width = _kernel_width(dk, dv)
        out = ops.topk_sparse_attention(_pad_to(q, width), _pad_to(k, width), _pad_to(v, width), idx, lp, cu, scale)
        return out[..., :dv]
    ref = _import("native_sparse_attention.ops.torch.topk_sparse_attention")
    return ref.topk_sparse_attention_torch(q.contiguous(), k.contiguous(), v.contiguous(), idx, lp, cu, scale)


def win_attention(q, k, v, cfg, cu_seqlens=None):
    """The module's sliding window: ``flash_attn_varlen_func(causal=True, window_size=(w, -1))``."""
    _require(q.device)
    cu = _cu(cu_seqlens, q.shape[0], q.device)
    dk, dv = q.shape[-1], v.shape[-1]
    scale = _scale(cfg, dk)
    w = int(cfg.window)
    fa = _flash_attn_varlen() if q.device.type == "cuda" else None
    if fa is not None and q.dtype in (torch.float16, torch.bfloat16):
        max_len = _max_len(cu)
        width = max(dk, dv)
        out = fa(_pad_to(q, width), _pad_to(k, width), _pad_to(v, width), cu, cu, max_len, max_len,
                 softmax_scale=scale, causal=True, window_size=(w, -1))
        return out[..., :dv]
    return _window_emulated(q, k, v, w, scale, cu)


def nsa_attention(q, k, v, gates, cfg, cu_seqlens=None):
    """``NativeSparseAttention.forward`` on given q/k/v/gates (no projections, RoPE or gate Linear):
    avgpool-compressed k/v (intra-block pe = None), compressed attention + top-k, top-k sparse
    attention, the flash_attn window, gated in the module's order [cmp, sel, win]."""
    _require(q.device)
    cuda = q.device.type == "cuda"
    _check_blocks(cfg, cuda=cuda, sel=True, compress=True, select_torch=not cuda)
    cu = _cu(cu_seqlens, q.shape[0], q.device)
    k_cmp, _ = compress(k, cfg, cu)
    v_cmp, _ = compress(v, cfg, cu)
    cu_cmp, max_k = _cmp_cu(cu, cfg)
    max_q = _max_len(cu)
    dk, dv = q.shape[-1], v.shape[-1]
    scale = _scale(cfg, dk)
    l, d, lp = int(cfg.block_len), int(cfg.block_stride), int(cfg.sel_block)
    args = (l, d, lp, int(cfg.n_sel), cu, cu_cmp, max_q, max_k, scale, int(cfg.n_init), int(cfg.n_local))
    if cuda:
        ops = _import("native_sparse_attention.ops")
        width = _kernel_width(dk, dv)
        qp, kp, vp = _pad_to(q, width), _pad_to(k, width), _pad_to(v, width)
        o_cmp, topk_idx = ops.compressed_attention(qp, _pad_to(k_cmp, width), _pad_to(v_cmp, width), *args)
        o_sel = ops.topk_sparse_attention(qp, kp, vp, topk_idx, lp, cu, scale)
        o_cmp, o_sel = o_cmp[..., :dv], o_sel[..., :dv]
    else:
        ref_cmp = _import("native_sparse_attention.ops.torch.compressed_attention")
        ref_sel = _import("native_sparse_attention.ops.torch.topk_sparse_attention")
        o_cmp, topk_idx = ref_cmp.compressed_attention_torch(q.contiguous(), k_cmp, v_cmp, *args)
        o_sel = ref_sel.topk_sparse_attention_torch(q.contiguous(), k.contiguous(), v.contiguous(), topk_idx, lp,
                                                    cu, scale)
    o_win = win_attention(q, k, v, cfg, cu)
    return gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_sel + gates[..., 2:3] * o_win


for _name, _fn in (("nsa", nsa_attention), ("cmp", cmp_attention), ("sel", sel_attention),
                   ("win", win_attention), ("select", select_blocks), ("compress", compress)):
    _fn.capabilities = _declare(_name)
del _name, _fn
