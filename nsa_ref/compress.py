"""Compression phi: block i = tokens [i*d, i*d + l) of a sequence -> one key (or value).

``compress`` is the parameter-free "mean" phi of the functional API; ``MLPCompressor`` is the
learnable "mlp" phi (paper Eq. 7: an MLP over the block's l tokens plus an intra-block position
embedding) used by ``NSAAttention``. Both map blocks ``(Nb, l, H, D) -> (Nb, H, D_out)`` so the
module and decode treat them alike.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from nsa_ref import varlen
from nsa_ref.packing import Packing

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig


def gather_cmp_blocks(x: torch.Tensor, cfg: "NSAConfig", cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """x: (T, H, D) -> (Tc_total, l, H, D): the tokens of every compression block, packed."""
    index = varlen.cmp_block_token_index(cu_seqlens, x.shape[0], cfg, device=x.device)
    return x[index]


def mean_phi(blocks: torch.Tensor) -> torch.Tensor:
    """blocks: (Nb, l, H, D) -> (Nb, H, D): the "mean" phi, average over the block's l tokens."""
    return blocks.mean(dim=1)


def compress(
    x: torch.Tensor, cfg: "NSAConfig", cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (T, H, D) keys or values -> (x_cmp (Tc_total, H, D), cu_seqlens_cmp (B+1,) int32).

    Mean over each block [i*d, i*d + l) of each sequence; Tc = floor((T_b - l)/d) + 1 blocks
    when T_b >= l, else 0. Differentiable. ``cfg.compress == "mlp"`` is refused: that phi has
    weights, which live in ``NSAAttention`` (or compress yourself and call the branch functions).
    """
    if cfg.compress != "mean":
        raise ValueError(
            f"compress() implements the parameter-free 'mean' phi, got cfg.compress={cfg.compress!r}; "
            "the 'mlp' phi needs learned weights: use NSAAttention or MLPCompressor"
        )
    if x.dim() != 3:
        raise ValueError(f"compress expects x: (T, H, D), got shape={tuple(x.shape)}")
    packing = Packing.of(cu_seqlens, x.shape[0])  # validated once (a Packing: already was)
    cu_cmp = packing.cmp_cu_seqlens(cfg, device=x.device)
    return mean_phi(gather_cmp_blocks(x, cfg, packing)), cu_cmp


class MLPCompressor(nn.Module):
    """Learnable phi: blocks (Nb, l, H, D) -> (Nb, H, D_out).

    Adds an intra-block position embedding (l, D), flattens the block to l*D features and applies
    Linear -> GELU -> Linear. Weights are shared by all KV heads (as the position embedding is).
    """

    def __init__(self, block_len: int, dim: int, out_dim: int | None = None, hidden: int | None = None) -> None:
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        hidden = 2 * dim if hidden is None else hidden
        self.block_len = block_len
        self.pos_emb = nn.Parameter(torch.zeros(block_len, dim))
        self.mlp = nn.Sequential(nn.Linear(block_len * dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks: (Nb, l, H, D) -> (Nb, H, D_out)."""
        nb, l, h, d = blocks.shape
        if l != self.block_len:
            raise ValueError(f"MLPCompressor was built for block_len={self.block_len}, got blocks of l={l}")
        x = blocks + self.pos_emb[None, :, None, :]
        x = x.permute(0, 2, 1, 3).reshape(nb, h, l * d)
        return self.mlp(x)
