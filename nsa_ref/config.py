"""NSA hyper-parameters: one frozen, validated object (paper §4.1 defaults)."""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class NSAConfig(BaseModel):
    """NSA block sizes and counts; every rule in ``nsa_ref`` reads them from here.

    Names follow the paper: ``l = block_len``, ``d = block_stride``, ``l' = sel_block``,
    ``n = n_sel``, ``w = window``. ``scale=None`` means ``1/sqrt(Dk)``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    block_len: int = Field(32, description="l: tokens per compression block")
    block_stride: int = Field(16, description="d: stride between compression blocks")
    sel_block: int = Field(64, description="l': tokens per selection block")
    n_sel: int = Field(16, description="n: selected blocks per (query, KV head), forced included")
    n_init: int = Field(1, description="initial blocks always selected")
    n_local: int = Field(2, description="blocks ending at the current one, always selected")
    window: int = Field(512, description="w: sliding-window keys per query, itself included")
    compress: Literal["mean", "mlp"] = Field("mean", description="phi: compression function")
    scale: float | None = Field(None, description="softmax scale; None -> 1/sqrt(Dk)")

    @model_validator(mode="after")
    def _check_combination(self) -> "NSAConfig":
        problems: list[str] = []
        for name in ("block_len", "block_stride", "sel_block", "n_sel"):
            value = getattr(self, name)
            if value < 1:
                problems.append(f"{name} must be >= 1, got {name}={value}")
        for name in ("n_init", "n_local"):
            value = getattr(self, name)
            if value < 0:
                problems.append(f"{name} must be >= 0, got {name}={value}")
        if self.window < 1:
            problems.append(f"window must be >= 1 (it counts the query itself), got window={self.window}")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            problems.append(f"scale must be a finite positive number or None, got scale={self.scale}")
        if problems:
            raise ValueError("; ".join(problems))
        # Divisibility rules only make sense once every size is positive.
        l, d, lp = self.block_len, self.block_stride, self.sel_block
        if l < d:
            problems.append(
                f"block_len must be >= block_stride (blocks may not leave gaps), "
                f"got block_len={l} < block_stride={d}"
            )
        elif l % d:
            problems.append(f"block_len must be a multiple of block_stride, got block_len={l}, block_stride={d}")
        if lp % d:
            problems.append(f"sel_block must be a multiple of block_stride, got sel_block={lp}, block_stride={d}")
        if self.n_sel < self.n_init + self.n_local:
            problems.append(
                f"n_sel must be >= n_init + n_local (forced blocks count toward n_sel), "
                f"got n_sel={self.n_sel} < n_init={self.n_init} + n_local={self.n_local}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def softmax_scale(self, head_dim: int) -> float:
        """Softmax scale for keys of width ``head_dim``: ``scale`` or ``1/sqrt(head_dim)``."""
        return self.scale if self.scale is not None else 1.0 / math.sqrt(head_dim)

    def num_cmp_blocks(self, seqlen):
        """Tc: compression blocks [i*d, i*d + l) that fit in ``seqlen`` tokens; 0 when seqlen < l.

        ``seqlen``: an int, or an integer tensor of lengths (elementwise, computed by kernels on its
        device: no host read)."""
        l, d = self.block_len, self.block_stride
        if isinstance(seqlen, torch.Tensor):
            return ((seqlen - l).div(d, rounding_mode="floor") + 1).clamp_min(0)
        return 0 if seqlen < l else (seqlen - l) // d + 1

    def num_sel_blocks(self, seqlen: int) -> int:
        """nb = ceil(seqlen / l'): selection blocks [j*l', (j+1)*l') covering ``seqlen`` tokens."""
        return -(-seqlen // self.sel_block)
