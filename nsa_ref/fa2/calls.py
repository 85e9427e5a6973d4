"""The FA-2 calls of one NSA branch, planned once: the router checks the plan against ``contracts``
and the branch (``nsa_ref.fa2.branches`` / ``nsa_ref.fa2.selected``) runs from the same plan.

A plan holds what every call of the branch shares (compute dtype, padded head dim, scale, window)
and the calls the contract check sees, as shapes (``FA2Call``). Nothing here reads tensor values,
so a plan costs no device sync; packed cmp is planned as one fold over all T tokens (the longest
case of the per-sequence folds it runs, whose geometry ``cmp_fold`` gives per sequence).

dtype policy: fp16/bf16 run as they are; fp32 is cast to bf16 (fp16 with pref_fp16) and the
result cast back. Head dims are padded with zeros to a common multiple of 8 (the scale is passed
explicitly, so zero padding leaves q.k unchanged); this also covers dk != dv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig

#: Dtypes FA-2 computes in; fp32 inputs are cast to one of them (``compute_dtype``).
FA2_DTYPES = (torch.float16, torch.bfloat16)
#: Upper bound on gathered (token, KV head, key) slots per chunk of the selected branch.
GATHER_BUDGET = 1 << 24


def compute_dtype(dtype: torch.dtype, pref_fp16: bool = False) -> torch.dtype:
    """The dtype FA-2 runs in for inputs of `dtype` (fp32 -> bf16, or fp16 when preferred)."""
    if dtype in FA2_DTYPES:
        return dtype
    if dtype == torch.float32:
        return torch.float16 if pref_fp16 else torch.bfloat16
    raise ValueError(f"FA-2 paths take fp16, bf16 or fp32 inputs, got {dtype}")


def padded_head_dim(dk: int, dv: int) -> int:
    """Common head dim for q, k and v: max(dk, dv) rounded up to a multiple of 8."""
    return -(-max(dk, dv) // 8) * 8


class CmpFold(NamedTuple):
    """Geometry of the cmp fold over one sequence of T tokens: rows < ``t0`` see no block; rows
    t0 .. start-1 form ``n_groups`` stride groups (one causal call over a (d, n_groups) batch);
    rows start .. T-1 (< d of them) see blocks 0..n_groups (one small non-causal call)."""

    t0: int
    n_groups: int
    start: int


def cmp_fold(T: int, cfg: "NSAConfig") -> CmpFold:
    """T tokens of one sequence -> its ``CmpFold`` (n_groups <= Tc always)."""
    t0 = cfg.block_len - 1
    n_groups = max(T - t0, 0) // cfg.block_stride
    return CmpFold(t0, n_groups, t0 + n_groups * cfg.block_stride)


def sel_chunk_tokens(hkv: int, n_sel: int, sel_block: int) -> int:
    """Tokens per chunk of the selected branch: their gathered K/V stay within ``GATHER_BUDGET``."""
    return max(1, GATHER_BUDGET // (hkv * n_sel * sel_block))


@dataclass(frozen=True)
class FA2Call:
    """One FA-2 call as the contracts see it: shapes, mask arguments, varlen metadata.

    dense: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D). varlen: q (Tq, Hq, D), k/v (Tk, Hkv, D),
    ``num_seqs`` sequences, ``max_q`` / ``max_k`` their longest lengths.
    """

    kind: str
    q: tuple[int, ...]
    k: tuple[int, ...]
    v: tuple[int, ...]
    causal: bool
    window: tuple[int, int] = (-1, -1)
    max_q: int | None = None
    max_k: int | None = None
    num_seqs: int | None = None
    cu_dtype: torch.dtype = torch.int32

    def contract_reasons(self, dtype: torch.dtype, **options) -> list:
        """``contracts`` reasons against this call, on meta stand-ins of ``dtype`` (nothing is
        allocated and nothing is read from a device); ``options`` (requires_grad, caps, provider)
        go to ``contracts.dense_reasons`` / ``varlen_reasons``."""
        import contracts

        def meta(shape, dt=dtype):
            return torch.empty(shape, dtype=dt, device="meta")

        args = dict(q=meta(self.q), k=meta(self.k), v=meta(self.v), causal=self.causal)
        if self.window != (-1, -1):
            args["window_size"] = self.window
        if self.kind == "dense":
            return contracts.dense_reasons(**args, **options)
        cu = meta((self.num_seqs + 1,), self.cu_dtype)
        return contracts.varlen_reasons(**args, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=self.max_q,
                                        max_seqlen_k=self.max_k, **options)


@dataclass(frozen=True)
class FA2Plan:
    """The FA-2 calls of one branch call and what they share.

    dtype: the compute dtype; head_dim: the padded common head dim; scale: the softmax scale of
    the unpadded Dk; window: the (left, right) window of the branch's mask; calls: the
    ``FA2Call`` s the contracts check.
    """

    branch: str
    dtype: torch.dtype
    head_dim: int
    scale: float
    window: tuple[int, int]
    calls: tuple[FA2Call, ...]

    def prepare(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Tensors (..., D_i) -> cast to ``dtype`` and zero-padded to ``head_dim``."""
        return tuple(_pad_last(x.to(self.dtype), self.head_dim) for x in xs)

    def contract_refusal(self, *, requires_grad: bool, caps, provider: str) -> str | None:
        """"contract: FA2-..." naming the rules the planned calls break, or None."""
        for call in self.calls:
            reasons = call.contract_reasons(self.dtype, requires_grad=requires_grad, caps=caps, provider=provider)
            if reasons:
                return "contract: " + "; ".join(r.rule for r in reasons)
        return None


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def plan(branch: str, q, k, v, cfg: "NSAConfig", cu_seqlens=None, pref_fp16: bool = False) -> FA2Plan:
    """The plan of ``branch`` (cmp | sel | win) for q (T, Hq, Dk), k (S, Hkv, Dk), v (S, Hkv, Dv)
    and cu_seqlens (B+1,), a Packing or None (real or meta: only shapes and dtypes are read)."""
    from nsa_ref.packing import device_cu_seqlens

    cu_seqlens = device_cu_seqlens(cu_seqlens)
    T, Hq, dk = q.shape
    Hkv = k.shape[1]
    dp = padded_head_dim(dk, v.shape[-1])
    dtype = compute_dtype(q.dtype, pref_fp16) if q.dtype.is_floating_point else q.dtype
    scale = cfg.softmax_scale(dk)
    if branch == "win":
        window = (cfg.window - 1, 0)
        if cu_seqlens is None:
            calls = (FA2Call("dense", (1, T, Hq, dp), (1, T, Hkv, dp), (1, T, Hkv, dp), True, window),)
        else:
            calls = (FA2Call("varlen", (T, Hq, dp), (T, Hkv, dp), (T, Hkv, dp), True, window, T, T,
                             cu_seqlens.shape[0] - 1, cu_seqlens.dtype),)
        return FA2Plan(branch, dtype, dp, scale, window, calls)
    if branch == "cmp":
        d = cfg.block_stride
        n_groups = cmp_fold(T, cfg).n_groups
        calls = []
        if n_groups:
            calls.append(FA2Call("dense", (d, n_groups, Hq, dp), (d, n_groups, Hkv, dp), (d, n_groups, Hkv, dp), True))
        calls.append(FA2Call("dense", (1, d, Hq, dp), (1, n_groups + 1, Hkv, dp), (1, n_groups + 1, Hkv, dp), False))
        return FA2Plan(branch, dtype, dp, scale, (-1, -1), tuple(calls))
    if branch == "sel":
        keys = cfg.n_sel * cfg.sel_block
        rows = min(T, sel_chunk_tokens(Hkv, cfg.n_sel, cfg.sel_block)) * Hkv  # one chunk of (t, KV head) rows
        G = Hq // max(Hkv, 1)
        call = FA2Call("varlen", (rows * G, 1, dp), (rows * keys, 1, dp), (rows * keys, 1, dp), False,
                       (-1, -1), G, keys, rows)
        return FA2Plan(branch, dtype, dp, scale, (-1, -1), (call,))
    raise ValueError(f"no FA-2 plan for branch {branch!r}")
