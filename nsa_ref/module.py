"""``NSAAttention``: projections, per-head sigmoid gates, a compressor, and the NSA branches."""
from __future__ import annotations

import torch
from torch import nn

from nsa_ref import api
from nsa_ref.router import check_backend
from nsa_ref.compress import MLPCompressor, gather_cmp_blocks, mean_phi
from nsa_ref.config import NSAConfig
from nsa_ref.decode import decode_step
from nsa_ref.kv_cache import NSAKVCache
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
        self.cfg, self.backend = cfg, check_backend(backend)
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

    # -- cache ------------------------------------------------------------------------------
    def _cache_kwargs(self, dtype, device=None) -> dict:
        """dtype / device default to the parameters'; phi is the module's compressors for "mlp"."""
        weight = self.q_proj.weight
        kw = dict(n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, cfg=self.cfg, v_head_dim=self.v_head_dim,
                  dtype=weight.dtype if dtype is None else dtype)
        if device is not None:
            kw["device"] = device
        if self.k_compressor is not None:
            kw.update(phi_k=self.k_compressor, phi_v=self.v_compressor)
        return kw

    def allocate_cache(self, batch_size: int, capacity: int, *, dtype: torch.dtype | None = None,
                       device=None) -> NSAKVCache:
        """-> an empty preallocated ``NSAKVCache`` of ``batch_size`` sequences of up to ``capacity``
        tokens each: raw pages (B, capacity, Hkv, D), compressed (B, Tc(capacity), Hkv, D), in
        ``dtype`` on ``device`` (default: the module's parameters'), compressing with this
        module's phi (its ``MLPCompressor``s when cfg.compress == "mlp", else the mean)."""
        device = self.q_proj.weight.device if device is None else device
        return NSAKVCache.allocate(batch_size, capacity, **self._cache_kwargs(dtype, device))

    def allocate_paged_cache(self, block_table: torch.Tensor, num_pages: int, page_size: int, *,
                             dtype: torch.dtype | None = None, **cmp_pages) -> NSAKVCache:
        """-> an empty paged ``NSAKVCache``: raw pool (num_pages, page_size, Hkv, D) addressed by
        ``block_table`` (B, max_pages) int32 (on the cache's device), as
        ``NSAKVCache.allocate_paged`` (``cmp_pages``: its cmp_block_table / cmp_num_pages /
        cmp_page_size), with this module's dtype (default) and phi."""
        return NSAKVCache.allocate_paged(block_table, num_pages, page_size, **self._cache_kwargs(dtype),
                                         **cmp_pages)

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, NSAKVCache):
            raise TypeError(
                f"cache must be an nsa_ref.NSAKVCache, got {type(cache).__name__}; build one with "
                "module.allocate_cache(batch_size, capacity)"
            )
        if cache.cfg != self.cfg:
            raise ValueError(
                f"the cache was built for cfg {cache.cfg!r}, this module has {self.cfg!r}; build it with "
                "module.allocate_cache(batch_size, capacity)"
            )
        if self.k_compressor is not None and (cache.phi_k is not self.k_compressor
                                              or cache.phi_v is not self.v_compressor):
            raise ValueError(
                "cfg.compress='mlp': the cache's phi_k / phi_v are not this module's k_compressor / "
                "v_compressor, so its compressed blocks would differ from prefill's; build the cache with "
                "module.allocate_cache(batch_size, capacity) (or allocate_paged_cache)"
            )

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, cache: NSAKVCache | None = None
    ) -> torch.Tensor:
        """x: (T, d_model) packed by cu_seqlens (B+1,) int32 -> (T, d_model).

        ``cache`` (an ``NSAKVCache`` from ``allocate_cache``):

        - every sequence holds 0 tokens -> prefill: the output of the call without a cache, and
          k / v of every token go into the cache. cu_seqlens must describe ``cache.batch_size``
          sequences (None only when batch_size == 1; ``arange(B + 1)`` starts B sequences with
          one token each).
        - the cache holds tokens -> decode: x (B, d_model) is one new token per sequence,
          cu_seqlens must be None; ``decode_step(..., backend=self.backend)``, equal to prefill
          at those positions. Inference only: run it under ``torch.no_grad()``.
        """
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x must be (T, d_model={self.d_model}), got shape={tuple(x.shape)}")
        if cache is not None:
            self._check_cache(cache)
        if cache is not None and any(cache.lengths):
            if cu_seqlens is not None:
                raise ValueError(
                    f"decode takes one token per cached sequence (x: (B={cache.batch_size}, d_model)): pass "
                    "cu_seqlens=None"
                )
            q, k, v, gates = self._project(x)
            out = decode_step(q, k, v, gates, cache, self.cfg, backend=self.backend)
            return self.o_proj(out.reshape(x.shape[0], self.n_heads * self.v_head_dim))
        if cache is not None and cu_seqlens is None and cache.batch_size != 1:
            raise ValueError(
                f"prefill into an empty cache of batch_size={cache.batch_size} needs cu_seqlens with "
                f"{cache.batch_size + 1} offsets (e.g. torch.arange({cache.batch_size} + 1, dtype=torch.int32) "
                f"to start {cache.batch_size} sequences with one token each); cu_seqlens=None is one sequence"
            )
        # One packing for every call below: cu_seqlens is read (and validated) once.
        cu_seqlens = Packing.of(cu_seqlens, x.shape[0], device=x.device)
        if cache is not None and cu_seqlens.num_seqs != cache.batch_size:
            raise ValueError(
                f"prefill: cu_seqlens describes {cu_seqlens.num_seqs} sequence(s), the cache holds "
                f"batch_size={cache.batch_size}; allocate the cache for that many or pass one offset per sequence"
            )
        q, k, v, gates = self._project(x)
        out = nsa_prefill(q, k, v, gates, self.cfg, cu_seqlens, self.backend, self.k_compressor, self.v_compressor)
        if cache is not None:
            cache.prefill(k, v, cu_seqlens)
        return self.o_proj(out.reshape(x.shape[0], self.n_heads * self.v_head_dim))


def nsa_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, cfg: NSAConfig,
                cu_seqlens, backend: str = "auto", phi_k: nn.Module | None = None,
                phi_v: nn.Module | None = None) -> torch.Tensor:
    """q: (T, Hq, Dk), k: (T, Hkv, Dk), v: (T, Hkv, Dv), gates: (T, Hq, 3) packed by cu_seqlens
    ((B+1,) int32, a ``Packing`` or None) -> (T, Hq, Dv): the gated NSA branches of a layer.

    ``phi_k`` / ``phi_v`` None (cfg.compress == "mean"): ``api.nsa_attention``. Learned phis
    (``MLPCompressor``s, cfg.compress == "mlp"): compress with them, then the branch functions
    (cmp with its lse handed to the selection, sel, win) and ``combine_branches``. Shared by
    ``NSAAttention`` and ``nsa_ref.hf_llama.NSALlamaAttention``, whose gates are sigmoid outputs:
    their values are not read back (validate="shapes"), so a layer costs no device sync.
    """
    if (phi_k is None) != (phi_v is None):
        raise ValueError("pass both phi_k and phi_v (the 'mlp' phi) or neither (the 'mean' phi)")
    if phi_k is None:
        return api.nsa_attention(q, k, v, gates, cfg, cu_seqlens, backend=backend, validate="shapes")
    k_cmp = phi_k(gather_cmp_blocks(k, cfg, cu_seqlens))
    v_cmp = phi_v(gather_cmp_blocks(v, cfg, cu_seqlens))
    o_cmp, lse = api.cmp_attention(q, k_cmp, v_cmp, cfg, cu_seqlens, backend=backend, return_lse=True)
    block_idx = api.select_blocks(q, k_cmp, cfg, cu_seqlens, backend=backend, lse=lse)
    o_sel = api.sel_attention(q, k, v, block_idx, cfg, cu_seqlens, backend=backend)
    o_win = api.win_attention(q, k, v, cfg, cu_seqlens, backend=backend)
    return api.combine_branches(gates, o_cmp, o_sel, o_win)
