"""One-token NSA decode with a per-sequence cache; equals prefill at the same position.

Per sequence the cache keeps the raw keys/values seen so far and the compressed blocks emitted
so far. Appending token t emits compressed block i exactly when it ends there
(i*d + l - 1 == t, ``masks.cmp_block_emitted_at``), so every cached block is visible to the new
query, as in prefill. The step reuses prefill's rule functions and math (``reference.attend``,
``selection.cmp_block_probs`` / ``block_scores`` / ``top_blocks``) on the cached tensors, so in
fp64 it agrees with prefill to rounding (~1e-12).

``decode_step(..., backend=)`` asks ``nsa_ref.router`` as prefill's sel branch does: where it
routes to Triton, block selection and the selected branch run on the Triton decode kernels;
every other route runs the reference math on the cached tensors (cmp and win always do), and an
explicit backend that cannot run raises as in prefill (backend="fa2" on CPU: FA2Unavailable).

The cache stores tensors as given (graph included); run inference under ``torch.no_grad()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nsa_ref import masks, reference, router, selection, telemetry, varlen
from nsa_ref.api import combine_branches
from nsa_ref.compress import gather_cmp_blocks, mean_phi
from nsa_ref.config import NSAConfig
from nsa_ref.inputs import check_cfg, check_gates, check_heads
from nsa_ref.packing import Packing

#: phi: blocks (Nb, l, H, D) -> (Nb, H, D_out); ``mean_phi`` or an ``MLPCompressor``.
Phi = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SequenceCache:
    """One sequence: k (S, Hkv, Dk), v (S, Hkv, Dv), k_cmp (Tc, Hkv, Dk), v_cmp (Tc, Hkv, Dv).

    Tensors are None until the first token arrives (head sizes are unknown before).
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    k_cmp: torch.Tensor | None = None
    v_cmp: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens seen so far (S)."""
        return 0 if self.k is None else self.k.shape[0]


class NSACache:
    """Decode state of B sequences: raw K/V, compressed K/V and tokens seen, per sequence.

    ``NSACache()`` holds no sequence yet: the next multi-token call (prefill) creates them.
    ``NSACache(batch_size=B)`` starts B empty sequences, so decoding can begin at position 0.
    """

    def __init__(self, batch_size: int = 0) -> None:
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        self.seqs: list[SequenceCache] = [SequenceCache() for _ in range(batch_size)]

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    @property
    def is_empty(self) -> bool:
        """No sequence yet: the next call must be a prefill."""
        return not self.seqs

    def lengths(self) -> list[int]:
        """Tokens seen per sequence."""
        return [s.num_tokens for s in self.seqs]

    def prefill(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cmp: torch.Tensor,
        v_cmp: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        cu_seqlens_cmp: torch.Tensor | None = None,
    ) -> None:
        """k: (T, Hkv, Dk), v: (T, Hkv, Dv), k_cmp: (Tc_total, Hkv, Dk), v_cmp: (Tc_total, Hkv, Dv)
        packed by cu_seqlens / cu_seqlens_cmp (tensors, Packings, or None = one sequence) -> fills
        an empty cache."""
        if not self.is_empty:
            raise ValueError(
                f"prefill needs an empty cache, this one already holds {self.batch_size} sequence(s) "
                f"with lengths {self.lengths()}; decode continues one token per sequence"
            )
        bounds = varlen.seq_bounds(cu_seqlens, k.shape[0])
        cmp_bounds = varlen.seq_bounds(cu_seqlens_cmp, k_cmp.shape[0])
        if len(bounds) != len(cmp_bounds):
            raise ValueError(
                f"cu_seqlens and cu_seqlens_cmp must describe the same sequences, got {len(bounds)} vs {len(cmp_bounds)}"
            )
        self.seqs = [
            SequenceCache(k[a:b], v[a:b], k_cmp[ca:cb], v_cmp[ca:cb])
            for (a, b), (ca, cb) in zip(bounds, cmp_bounds)
        ]

    @classmethod
    def from_prefill(
        cls, k: torch.Tensor, v: torch.Tensor, cfg: NSAConfig, cu_seqlens: torch.Tensor | None = None,
        phi_k: Phi = mean_phi, phi_v: Phi = mean_phi,
    ) -> "NSACache":
        """k: (T, Hkv, Dk), v: (T, Hkv, Dv) -> a cache holding them and their compressed blocks."""
        cache = cls()
        cu_seqlens = Packing.of(cu_seqlens, k.shape[0])
        cu_cmp = cu_seqlens.cmp_packing(cfg, device=k.device)
        cache.prefill(
            k, v, phi_k(gather_cmp_blocks(k, cfg, cu_seqlens)), phi_v(gather_cmp_blocks(v, cfg, cu_seqlens)),
            cu_seqlens, cu_cmp,
        )
        return cache

    def append(self, b: int, k_new: torch.Tensor, v_new: torch.Tensor, cfg: NSAConfig,
               phi_k: Phi = mean_phi, phi_v: Phi = mean_phi) -> int:
        """k_new: (Hkv, Dk), v_new: (Hkv, Dv) -> position t of the new token in sequence b.

        Emits compressed block (t - l + 1) / d when it ends at t.
        """
        seq = self.seqs[b]
        if seq.k is None:
            # phi keeps the head dim, so the compressed shapes are known from the first token.
            seq.k, seq.k_cmp = k_new.new_zeros((0, *k_new.shape)), k_new.new_zeros((0, *k_new.shape))
            seq.v, seq.v_cmp = v_new.new_zeros((0, *v_new.shape)), v_new.new_zeros((0, *v_new.shape))
        seq.k = torch.cat([seq.k, k_new[None]])
        seq.v = torch.cat([seq.v, v_new[None]])
        t = seq.num_tokens - 1
        if masks.cmp_block_emitted_at(t, cfg):
            start = t - cfg.block_len + 1
            kc, vc = phi_k(seq.k[None, start:]), phi_v(seq.v[None, start:])
            seq.k_cmp = torch.cat([seq.k_cmp, kc])
            seq.v_cmp = torch.cat([seq.v_cmp, vc])
        return t


def _decode_one(q: torch.Tensor, seq: SequenceCache, t: int, cfg: NSAConfig, use_triton: bool = False):
    """q: (1, Hq, Dk) at position t of a cached sequence -> (o_cmp, o_sel, o_win), each (1, Hq, Dv)."""
    Dk = q.shape[-1]
    Hkv = seq.k.shape[1]
    scale = cfg.softmax_scale(Dk)
    pos = torch.tensor([t], device=q.device)
    k_pos = torch.arange(t + 1, device=q.device)
    k_cmp, v_cmp = seq.k_cmp, seq.v_cmp
    tc = k_cmp.shape[0]

    o_cmp, _ = reference.attend(q, k_cmp, v_cmp, masks.cmp_visible_mask(pos, tc, cfg)[None], scale)

    if use_triton:
        from nsa_ref.triton_kernels.scoring import select_blocks_decode
        from nsa_ref.triton_kernels.selected import sel_attention_decode

        block_idx = select_blocks_decode(q, k_cmp, cfg, [t], [0], [tc])
        zero = torch.zeros(1, dtype=torch.int64, device=q.device)
        o_sel = sel_attention_decode(q, seq.k, seq.v, block_idx, cfg, pos, zero)
    else:
        with torch.no_grad():
            p_cmp = selection.cmp_block_probs(q, k_cmp, pos, cfg)
            scores = selection.block_scores(p_cmp, Hkv, masks.num_sel_blocks(t + 1, cfg), cfg)
            block_idx = selection.top_blocks(scores, pos, cfg)
        o_sel, _ = reference.attend(q, seq.k, seq.v, masks.sel_visible_mask(pos, k_pos, block_idx, cfg, cfg.num_sel_blocks(t + 1)), scale)

    lo = max(0, t - cfg.window + 1)
    o_win, _ = reference.attend(
        q, seq.k[lo:], seq.v[lo:], masks.win_visible_mask(pos, k_pos[lo:], cfg)[None], scale
    )
    return o_cmp, o_sel, o_win


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    cache: NSACache,
    cfg: NSAConfig,
    phi_k: Phi = mean_phi,
    phi_v: Phi = mean_phi,
    backend: str = "auto",
) -> torch.Tensor:
    """q: (B, Hq, Dk), k: (B, Hkv, Dk), v: (B, Hkv, Dv), gates: (B, Hq, 3) -> (B, Hq, Dv).

    Row b is the next token of cached sequence b: appended to the cache (emitting a compressed
    block when one ends), then cmp / select / sel / win for that single query, gated as in
    ``nsa_attention``. ``phi_k``/``phi_v`` must be the compressors prefill used. ``backend`` goes
    to the router as for prefill's sel branch: a Triton route runs select and sel on the Triton
    kernels, any other the reference math; an explicit backend that cannot run raises
    (``router.TritonUnavailable``, ``router.FA2Unavailable``) before the cache changes.
    """
    # Every check runs before the cache is touched: a refused step leaves the cache as it was.
    check_cfg(cfg)
    check_heads(q, k, v)
    check_gates(gates, q)
    for b, seq in enumerate(cache.seqs):
        if seq.k is not None and (seq.k.shape[1:] != k.shape[1:] or seq.v.shape[1:] != v.shape[1:]
                                  or seq.k.dtype != k.dtype or seq.k.device != k.device):
            raise ValueError(
                f"decode_step: sequence {b} caches k {tuple(seq.k.shape[1:])} {seq.k.dtype} on {seq.k.device} "
                f"and v {tuple(seq.v.shape[1:])}, got k {tuple(k.shape[1:])} {k.dtype} on {k.device}, "
                f"v {tuple(v.shape[1:])}"
            )
    if cache.batch_size != q.shape[0]:
        raise ValueError(
            f"decode_step takes one token per cached sequence: got {q.shape[0]} token(s) for a cache "
            f"of batch_size={cache.batch_size}; start with NSACache(batch_size=B) or prefill first"
        )
    if not (k.shape[0] == v.shape[0] == gates.shape[0] == q.shape[0]):
        raise ValueError(
            f"q, k, v, gates need one row per sequence, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}, {gates.shape[0]}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"Hq must be a multiple of Hkv (GQA), got Hq={q.shape[1]}, Hkv={k.shape[1]}")
    if tuple(gates.shape[1:]) != (q.shape[1], 3):
        raise ValueError(f"gates must be (B, Hq, 3) = {(q.shape[0], q.shape[1], 3)}, got {tuple(gates.shape)}")
    # The same decision as prefill's sel branch (an explicit backend that cannot run raises
    # FA2Unavailable / TritonUnavailable here, before the cache changes); decode has one-token
    # steps for Triton only, every other path runs the exact math below.
    use_triton = router.decide("sel", backend, q=q, k=k, v=v, cfg=cfg).path == "triton"
    path = "triton" if use_triton else "reference"
    for branch in ("select", "sel"):
        telemetry.record(branch, path, "decode_step")
    rows = []
    for b in range(q.shape[0]):
        t = cache.append(b, k[b], v[b], cfg, phi_k, phi_v)
        o_cmp, o_sel, o_win = _decode_one(q[b : b + 1], cache.seqs[b], t, cfg, use_triton)
        rows.append(combine_branches(gates[b : b + 1], o_cmp, o_sel, o_win))
    return torch.cat(rows) if rows else q.new_zeros((0, q.shape[1], v.shape[-1]))
