"""``NSAAttention``: projections, per-head sigmoid gates, a compressor, and the NSA branches."""
from __future__ import annotations

import torch
from torch import nn

from nsa_ref import api
from nsa_ref.compress import MLPCompressor, gather_cmp_blocks, mean_phi
from nsa_ref.config import NSAConfig
from nsa_ref.decode import NSACache, decode_step
from nsa_ref.packing import Packing


class NSAAttention(nn.Module):
    """Native Sparse Attention layer over packed tokens x: (T, d_model).

    q = x Wq: (T, n_heads, head_dim), k = x Wk: (T, n_kv_heads, head_dim),
    v = x Wv: (T, n_kv_heads, v_head_dim), gates = sigmoid(x Wg): (T, n_heads, 3) in order
    (cmp, sel, win); output o Wo: (T, d_model). ``cfg.compress`` picks phi: "mean" (no weights,
    runs ``nsa_attention``) or "mlp" (an ``MLPCompressor`` each for k and v; the module then
    calls the branch functions itself).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        cfg: NSAConfig = NSAConfig(),
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads must be a positive multiple of n_kv_heads, got {n_heads} and {n_kv_heads}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.cfg, self.backend = cfg, backend
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.v_head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.v_head_dim, d_model, bias=False)
        self.gate_proj = nn.Linear(d_model, 3 * n_heads)
        if cfg.compress == "mlp":
            self.k_compressor: nn.Module | None = MLPCompressor(cfg.block_len, head_dim)
            self.v_compressor: nn.Module | None = MLPCompressor(cfg.block_len, self.v_head_dim)
        else:
            self.k_compressor = self.v_compressor = None

    def _phis(self):
        return (self.k_compressor or mean_phi), (self.v_compressor or mean_phi)

    def _project(self, x: torch.Tensor):
        """x: (T, d_model) -> q (T, Hq, Dk), k (T, Hkv, Dk), v (T, Hkv, Dv), gates (T, Hq, 3)."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.n_kv_heads, self.v_head_dim)
        gates = torch.sigmoid(self.gate_proj(x)).view(T, self.n_heads, 3)
        return q, k, v, gates

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, cache: NSACache | None = None
    ) -> torch.Tensor:
        """x: (T, d_model) packed by cu_seqlens -> (T, d_model).

        With an empty ``cache`` (``NSACache()``) this is a prefill that also fills the cache.
        With a cache holding B sequences, x: (B, d_model) is one new token per sequence (decode;
        cu_seqlens must be None) and the result equals prefill at those positions.
        """
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x must be (T, d_model={self.d_model}), got shape={tuple(x.shape)}")
        q, k, v, gates = self._project(x)
        if cache is not None and not cache.is_empty:
            if cu_seqlens is not None:
                raise ValueError("decode takes one token per cached sequence: pass cu_seqlens=None")
            phi_k, phi_v = self._phis()
            out = decode_step(q, k, v, gates, cache, self.cfg, phi_k, phi_v, backend=self.backend)
            return self.o_proj(out.reshape(x.shape[0], self.n_heads * self.v_head_dim))
        # One packing for every call below: cu_seqlens is read (and validated) once.
        cu_seqlens = Packing.of(cu_seqlens, x.shape[0], device=x.device)
        if self.k_compressor is None:
            out = api.nsa_attention(q, k, v, gates, self.cfg, cu_seqlens, backend=self.backend)
            if cache is not None:
                cache.prefill(k, v, *self._compressed(k, v, cu_seqlens), cu_seqlens,
                              cu_seqlens.cmp_packing(self.cfg, device=x.device))
        else:
            k_cmp, v_cmp = self._compressed(k, v, cu_seqlens)
            o_cmp, lse = api.cmp_attention(q, k_cmp, v_cmp, self.cfg, cu_seqlens, backend=self.backend,
                                           return_lse=True)
            block_idx = api.select_blocks(q, k_cmp, self.cfg, cu_seqlens, backend=self.backend, lse=lse)
            o_sel = api.sel_attention(q, k, v, block_idx, self.cfg, cu_seqlens, backend=self.backend)
            o_win = api.win_attention(q, k, v, self.cfg, cu_seqlens, backend=self.backend)
            out = api.combine_branches(gates, o_cmp, o_sel, o_win)
            if cache is not None:
                cache.prefill(k, v, k_cmp, v_cmp, cu_seqlens, cu_seqlens.cmp_packing(self.cfg, device=x.device))
        return self.o_proj(out.reshape(x.shape[0], self.n_heads * self.v_head_dim))

    def _compressed(self, k: torch.Tensor, v: torch.Tensor, cu_seqlens):
        """k: (T, Hkv, Dk), v: (T, Hkv, Dv) -> (k_cmp (Tc_total, Hkv, Dk), v_cmp (Tc_total, Hkv, Dv))."""
        phi_k, phi_v = self._phis()
        return phi_k(gather_cmp_blocks(k, self.cfg, cu_seqlens)), phi_v(gather_cmp_blocks(v, self.cfg, cu_seqlens))
