"""The decode append in one Triton launch: each sequence's new token into the paged raw cache and,
where it ends a compression block, that block's mean into the compressed cache.

    decode_append(cache, k_new, v_new)   k_new (B, Hkv, Dk), v_new (B, Hkv, Dv); in place, no host read

One program per sequence b, grid (B,). It reads pos = raw cache_seqlens[b] on the device, writes
the token at k_pages[block_table[b, pos // P], pos % P], and when token pos ends compressed block
i = (pos + 1 - l) / d (``masks.cmp_block_emitted_at``) writes the mean of that block's l tokens
(read back from the pages after a barrier, summed in fp32 / fp64, ``compress.mean_phi``) at slot i
of the compressed pages; then raw cache_seqlens[b] = pos + 1 and compressed cache_seqlens[b] =
``cfg.num_cmp_blocks(pos + 1)``. One program owns a sequence, so nothing races on its lengths.

What ``decode_graph.append_static`` computes with torch ops (~20 launches: index writes, the block
gather, two means, length arithmetic) for the "mean" phi; a learned phi stays on that path.
Capturable in a CUDA graph. The host lengths are not advanced (``advance_host_lengths``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from nsa_ref.triton_kernels.dtypes import tl_acc
from nsa_ref.triton_kernels.layout import next_pow2

if TYPE_CHECKING:
    from nsa_ref.kv_cache import NSAKVCache


@triton.jit
def _append_kernel(
    KN, VN, KP, VP, BT, SEQ, KC, VC, CT, NC,
    skn_b, skn_h, svn_b, svn_h, sk_p, sk_s, sk_h, sv_p, sv_s, sv_h, sbt_b,
    skc_p, skc_s, skc_h, svc_p, svc_s, svc_h, sct_b,
    H, Dk, Dv, P, Pc, L, STRIDE,
    HAS_CMP: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLK: tl.constexpr,
    ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pos = tl.load(SEQ + b)
    h = tl.arange(0, BH)
    d = tl.arange(0, BD)
    dv = tl.arange(0, BDV)
    page = tl.load(BT + b * sbt_b + pos // P).to(tl.int64)
    off = (pos % P).to(tl.int64)
    mk = (h < H)[:, None] & (d < Dk)[None, :]
    mv = (h < H)[:, None] & (dv < Dv)[None, :]
    k = tl.load(KN + b * skn_b + h[:, None] * skn_h + d[None, :], mask=mk)
    v = tl.load(VN + b * svn_b + h[:, None] * svn_h + dv[None, :], mask=mv)
    tl.store(KP + page * sk_p + off * sk_s + h[:, None] * sk_h + d[None, :], k, mask=mk)
    tl.store(VP + page * sv_p + off * sv_s + h[:, None] * sv_h + dv[None, :], v, mask=mv)
    n = pos + 1
    tc = tl.where(n >= L, (n - L) // STRIDE + 1, 0)
    if HAS_CMP:
        emit = (n >= L) & ((n - L) % STRIDE == 0)
        if emit:
            tl.debug_barrier()  # the token just stored is read back below
            i = tc - 1
            u = tl.arange(0, BLK)
            s = i * STRIDE + u
            ok = u < L
            spage = tl.load(BT + b * sbt_b + tl.where(ok, s, 0) // P, mask=ok, other=0).to(tl.int64)
            soff = (tl.where(ok, s, 0) % P).to(tl.int64)
            cpage = tl.load(CT + b * sct_b + i // Pc).to(tl.int64)
            coff = (i % Pc).to(tl.int64)
            for hh in range(H):
                kb = tl.load(KP + (spage * sk_p + soff * sk_s + hh * sk_h)[:, None] + d[None, :],
                             mask=ok[:, None] & (d < Dk)[None, :], other=0.0)
                km = tl.sum(kb.to(ACC), 0) / L
                tl.store(KC + cpage * skc_p + coff * skc_s + hh * skc_h + d, km.to(KC.dtype.element_ty), mask=d < Dk)
                vb = tl.load(VP + (spage * sv_p + soff * sv_s + hh * sv_h)[:, None] + dv[None, :],
                             mask=ok[:, None] & (dv < Dv)[None, :], other=0.0)
                vm = tl.sum(vb.to(ACC), 0) / L
                tl.store(VC + cpage * svc_p + coff * svc_s + hh * svc_h + dv, vm.to(VC.dtype.element_ty), mask=dv < Dv)
    tl.store(SEQ + b, n)
    tl.store(NC + b, tc)


def refusal(cache: "NSAKVCache", k_new: torch.Tensor) -> str | None:
    """Why ``decode_append`` cannot serve this cache (None: it can): the Triton device rules
    (``triton_kernels.unavailable_reason``), and a phi other than the mean."""
    from nsa_ref.compress import mean_phi
    from nsa_ref.triton_kernels import unavailable_reason

    why = unavailable_reason(k_new)
    if why is not None:
        return why
    if cache.phi_k is not mean_phi or cache.phi_v is not mean_phi:
        return "a learned phi (only the mean phi is fused)"
    if cache.raw.k_pages.stride(-1) != 1 or cache.raw.v_pages.stride(-1) != 1:
        return "raw pages without a contiguous last dim"
    return None


@torch.no_grad()
def decode_append(cache: "NSAKVCache", k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    """k_new (B, Hkv, Dk), v_new (B, Hkv, Dv) -> one token appended to every sequence of ``cache``
    (raw pages, emitted compressed blocks, both device ``cache_seqlens``), one launch. Inputs and
    room are assumed checked (``decode_graph.check_static_append``)."""
    raw, cmp, cfg = cache.raw, cache.cmp, cache.cfg
    B, H, Dk = k_new.shape
    Dv = v_new.shape[-1]
    if B == 0:
        return
    k_new = k_new if k_new.stride(-1) == 1 else k_new.contiguous()
    v_new = v_new if v_new.stride(-1) == 1 else v_new.contiguous()
    kp, vp, kc, vc = raw.k_pages, raw.v_pages, cmp.k_pages, cmp.v_pages
    has_cmp = bool(cfg.num_cmp_blocks(raw.capacity)) and cmp.max_pages > 0
    ct = cmp.block_table if has_cmp else raw.block_table
    _append_kernel[(B,)](
        k_new, v_new, kp, vp, raw.block_table, raw.cache_seqlens, kc, vc, ct, cmp.cache_seqlens,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        kp.stride(0), kp.stride(1), kp.stride(2), vp.stride(0), vp.stride(1), vp.stride(2), raw.block_table.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2), ct.stride(0),
        H, Dk, Dv, kp.shape[1], max(kc.shape[1], 1), cfg.block_len, cfg.block_stride,
        HAS_CMP=has_cmp, BH=next_pow2(H), BD=next_pow2(Dk, 16), BDV=next_pow2(Dv, 16),
        BLK=next_pow2(cfg.block_len, 16), ACC=tl_acc(k_new.dtype), num_warps=4,
    )


__all__ = ["decode_append", "refusal"]
