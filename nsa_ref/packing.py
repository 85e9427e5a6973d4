"""One packing object per call: cu_seqlens, its host offsets, the lengths and the compressed packing.

FA-2 varlen layout: one token axis of T rows, ``cu_seqlens (B+1,) int32`` (starts at 0,
non-decreasing, ends at T); ``None`` = one sequence of T tokens. Each read of a device
cu_seqlens to the host is a device sync, so a ``Packing`` reads it at most once (``offsets``),
validates the values on that one host copy, and caches everything derived from it: the bounds,
the lengths, the longest length, the compressed blocks per sequence and their cu_seqlens.
A caller who already has host metadata hands it in (``cu_seqlens_cpu``: a host copy of the
offsets, as FLA's ``cu_seqlens_cpu``; ``max_seqlen``: as FA-2's ``max_seqlen_q``) and pays no sync.

The public functions build one (``Packing.of``) and pass it, in the ``cu_seqlens`` position, down
to the backends; a branch function called directly with a tensor gets one through ``as_packing``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from nsa_ref.config import NSAConfig


def cu_seqlens_from_lengths(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """lengths: B ints -> cu_seqlens (B+1,) int32 (the one lengths -> offsets helper)."""
    return torch.tensor(offsets_from_lengths(lengths), dtype=torch.int32, device=device)


def offsets_from_lengths(lengths: Sequence[int]) -> list[int]:
    """lengths: B ints -> host offsets [0, l0, l0 + l1, ...] (B+1 ints)."""
    cu = [0]
    for n in lengths:
        if n < 0:
            raise ValueError(f"sequence lengths must be >= 0, got {list(lengths)}")
        cu.append(cu[-1] + int(n))
    return cu


def check_offsets(values: Sequence[int], total: int, name: str = "cu_seqlens") -> None:
    """Host offsets (B+1 ints) -> raises ValueError unless they start at 0, never decrease and
    end at ``total``."""
    if values[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {values[0]}")
    drops = [b for b in range(len(values) - 1) if values[b + 1] < values[b]]
    if drops:
        b = drops[0]
        raise ValueError(
            f"{name} must be non-decreasing, got {name}[{b}]={values[b]} > {name}[{b + 1}]={values[b + 1]}"
        )
    if values[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens, got {values[-1]} != T={total}")


def check_cu_metadata(cu_seqlens, name: str = "cu_seqlens") -> None:
    """Type, dtype and rank of cu_seqlens (no value is read)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 (FA-2 varlen layout), got dtype={cu_seqlens.dtype}; use .to(torch.int32)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D with B+1 >= 1 entries, got shape={tuple(cu_seqlens.shape)}")


class Packing:
    """How T tokens are packed into sequences, for one call.

    cu_seqlens: (B+1,) int32 on the inputs' device, or None (one sequence); total: T.
    ``offsets`` (host, B+1 ints) is read from the device at most once and validated there.
    """

    def __init__(self, cu_seqlens: torch.Tensor | None, total: int, *, host: Sequence[int] | None = None,
                 max_seqlen: int | None = None, name: str = "cu_seqlens") -> None:
        self.cu_seqlens = cu_seqlens
        self.total = int(total)
        self.name = name
        self._offsets: tuple[int, ...] | None = None
        self._max = max_seqlen
        self._cmp: dict = {}
        self._positions: dict = {}
        if cu_seqlens is None:
            self._offsets = (0, self.total)
        elif host is not None:
            self._set_offsets(host)

    @classmethod
    def of(cls, cu_seqlens, total: int, *, cu_seqlens_cpu=None, max_seqlen: int | None = None,
           device: torch.device | None = None, name: str = "cu_seqlens") -> "Packing":
        """A validated packing of ``total`` tokens: metadata now, values from ``cu_seqlens_cpu``
        (a host copy: no device read) or from one read of ``cu_seqlens``. ``device``: where the
        inputs live (cu_seqlens must be there too)."""
        if isinstance(cu_seqlens, Packing):
            if cu_seqlens.total != total:
                raise ValueError(f"{name} packs {cu_seqlens.total} tokens, the inputs have T={total}")
            return cu_seqlens
        if cu_seqlens is not None:
            check_cu_metadata(cu_seqlens, name)
            if device is not None and cu_seqlens.device != device:
                raise ValueError(f"{name} must be on q's device, got {cu_seqlens.device} vs {device}")
        host = None
        if cu_seqlens_cpu is not None:
            host = [int(x) for x in (cu_seqlens_cpu.tolist() if isinstance(cu_seqlens_cpu, torch.Tensor)
                                     else cu_seqlens_cpu)]
            if cu_seqlens is not None and len(host) != cu_seqlens.numel():
                raise ValueError(f"cu_seqlens_cpu has {len(host)} entries, {name} has {cu_seqlens.numel()}")
        packing = cls(cu_seqlens, total, host=host, max_seqlen=max_seqlen, name=name)
        packing.offsets  # validates (the one device read when no host copy was given)
        return packing

    def _set_offsets(self, values: Sequence[int]) -> None:
        values = tuple(int(x) for x in values)
        check_offsets(values, self.total, self.name)
        self._offsets = values

    @property
    def is_packed(self) -> bool:
        """cu_seqlens was given (False: one sequence of T tokens)."""
        return self.cu_seqlens is not None

    @property
    def num_seqs(self) -> int:
        """B, from the shape alone."""
        return 1 if self.cu_seqlens is None else self.cu_seqlens.shape[0] - 1

    @property
    def offsets(self) -> tuple[int, ...]:
        """Host offsets (B+1 ints): the one device read of cu_seqlens, validated."""
        if self._offsets is None:
            self._set_offsets(self.cu_seqlens.tolist())
        return self._offsets

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """[(start, end)] per sequence."""
        o = self.offsets
        return list(zip(o[:-1], o[1:]))

    @property
    def lengths(self) -> list[int]:
        o = self.offsets
        return [b - a for a, b in zip(o[:-1], o[1:])]

    @property
    def max_seqlen(self) -> int:
        """Longest sequence (as handed in, or from the offsets)."""
        if self._max is None:
            self._max = max([0, *self.lengths])
        return self._max

    def cmp_lengths(self, cfg: "NSAConfig") -> list[int]:
        """[Tc_b]: compression blocks of every sequence."""
        return self._cmp_entry(cfg)[0]

    def cmp_offsets(self, cfg: "NSAConfig") -> list[int]:
        """Host offsets of the packed compressed blocks (B+1 ints)."""
        return self._cmp_entry(cfg)[1]

    def cmp_packing(self, cfg: "NSAConfig", device=None) -> "Packing":
        """The packing of the compressed blocks (Tc_total rows): cu_seqlens_cmp (B+1,) int32 built
        from the host offsets (no device read) on ``device`` (default: cu_seqlens's), with those
        host offsets already known."""
        if device is None and self.cu_seqlens is not None:
            device = self.cu_seqlens.device
        key = (cfg.block_len, cfg.block_stride, str(device))
        if key not in self._cmp:
            offsets = self.cmp_offsets(cfg)
            if device is not None and torch.device(device).type == "cuda":
                cu = self._cmp_cu_on_device(cfg, torch.device(device))
            else:
                cu = torch.tensor(offsets, dtype=torch.int32, device=device)
            self._cmp[key] = Packing(cu, offsets[-1], host=offsets, name=f"{self.name}_cmp")
        return self._cmp[key]

    def _cmp_cu_on_device(self, cfg: "NSAConfig", device: torch.device) -> torch.Tensor:
        """cu_seqlens_cmp (B+1,) int32 computed by kernels on ``device`` from the device offsets
        (or, for one sequence, from T): a copy of host ints to a GPU would synchronise the host.
        Tc_b by ``NSAConfig.num_cmp_blocks`` on the device lengths."""
        if self.cu_seqlens is not None and self.cu_seqlens.device == device:
            cu = self.cu_seqlens.to(torch.int64)
            lengths = cu[1:] - cu[:-1]
        elif self.cu_seqlens is None:
            lengths = torch.full((1,), self.total, dtype=torch.int64, device=device)
        else:  # offsets on another device: one host -> device copy of the host offsets
            return torch.tensor(self.cmp_offsets(cfg), dtype=torch.int32, device=device)
        blocks = cfg.num_cmp_blocks(lengths)
        out = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=device)
        out[1:] = torch.cumsum(blocks, 0).to(torch.int32)
        return out

    def cmp_cu_seqlens(self, cfg: "NSAConfig", device=None) -> torch.Tensor:
        """cu_seqlens_cmp (B+1,) int32 over the packed compressed blocks (``cmp_packing``'s)."""
        return self.cmp_packing(cfg, device).cu_seqlens

    def _cmp_entry(self, cfg: "NSAConfig"):
        key = (cfg.block_len, cfg.block_stride)
        if key not in self._cmp:
            lengths = [cfg.num_cmp_blocks(n) for n in self.lengths]
            self._cmp[key] = (lengths, offsets_from_lengths(lengths))
        return self._cmp[key]

    def token_positions(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (local position (T,), first packed row of the token's sequence (T,)) int64, on
        ``device`` without a host read (computed once per device)."""
        key = str(device)
        if key not in self._positions:
            idx = torch.arange(self.total, device=device)
            if self.cu_seqlens is None:
                self._positions[key] = (idx, torch.zeros_like(idx))
            else:
                cu = self.cu_seqlens.to(device=device, dtype=torch.long)
                start = cu[torch.searchsorted(cu[1:], idx, right=True)]
                self._positions[key] = (idx - start, start)
        return self._positions[key]


def as_packing(cu_seqlens, total: int) -> Packing:
    """cu_seqlens: a Packing (returned as it is), a (B+1,) tensor or None -> a Packing of
    ``total`` tokens (for branch functions called directly; nothing is read until needed)."""
    if isinstance(cu_seqlens, Packing):
        return cu_seqlens
    return Packing(cu_seqlens, total)


def device_cu_seqlens(cu_seqlens) -> torch.Tensor | None:
    """The (B+1,) tensor behind a Packing or a tensor (None stays None)."""
    return cu_seqlens.cu_seqlens if isinstance(cu_seqlens, Packing) else cu_seqlens
