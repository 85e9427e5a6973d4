"""Device capabilities that arch-dependent rules read, so they can be evaluated on a CPU machine.

``caps=None`` in the checks means: read them from the tensors' CUDA device (once per device index,
then cached). For CPU and meta tensors with ``caps=None`` the arch rules are not evaluated: there is
no device to ask, and guessing one would either hide or invent problems.
"""
from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

_SM_TEXT = re.compile(r"^\s*(?:sm_?)?(\d+)(?:\.(\d+))?\s*$", re.IGNORECASE)


class DeviceCaps(BaseModel):
    """Compute capability of one GPU (``major``, ``minor``), with optional name and SM count."""

    model_config = ConfigDict(frozen=True)

    major: int = Field(ge=0)
    minor: int = Field(ge=0)
    name: str | None = None
    sm_count: int | None = Field(default=None, ge=1)

    @property
    def arch(self) -> tuple[int, int]:
        """``(major, minor)``, the form the provider specs use."""
        return (self.major, self.minor)

    @property
    def sm(self) -> str:
        """``"sm86"``-style name."""
        return f"sm{self.major}{self.minor}"

    def __str__(self) -> str:
        return f"{self.sm} ({self.name})" if self.name else self.sm

    @classmethod
    def parse(cls, text: str) -> "DeviceCaps":
        """``"sm86"``, ``"sm_120"``, ``"8.6"`` or ``"86"`` -> DeviceCaps(8, 6)."""
        match = _SM_TEXT.match(text)
        if match is None:
            raise ValueError(f"cannot read a compute capability from {text!r}; use e.g. 'sm86' or '8.6'")
        whole, minor = match.groups()
        if minor is not None:
            return cls(major=int(whole), minor=int(minor))
        if len(whole) < 2:
            raise ValueError(f"cannot read a compute capability from {text!r}; use e.g. 'sm86' or '8.6'")
        # The last digit is the minor version: sm86 -> 8.6, sm120 -> 12.0.
        return cls(major=int(whole[:-1]), minor=int(whole[-1]))

    @classmethod
    def from_device(cls, device) -> "DeviceCaps":
        """Caps of a CUDA device (``torch.device``, ``"cuda:1"`` or an index), cached per index."""
        import torch

        if isinstance(device, int):
            return caps_for_device(device)
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"{device} is not a CUDA device; pass DeviceCaps(major, minor) instead")
        index = device.index if device.index is not None else torch.cuda.current_device()
        return caps_for_device(index)


_CAPS_BY_INDEX: dict[int, DeviceCaps] = {}


def caps_for_device(index: int) -> DeviceCaps:
    """Caps of CUDA device ``index``, asked once per process and cached."""
    caps = _CAPS_BY_INDEX.get(index)
    if caps is None:
        import torch

        major, minor = torch.cuda.get_device_capability(index)
        props = torch.cuda.get_device_properties(index)
        caps = DeviceCaps(
            major=major, minor=minor, name=props.name, sm_count=props.multi_processor_count
        )
        _CAPS_BY_INDEX[index] = caps
    return caps


def resolve_caps(caps: DeviceCaps | str | None, tensor) -> DeviceCaps | None:
    """The caps a check uses: the given ones, else those of ``tensor``'s CUDA device, else None."""
    if caps is not None:
        return caps if isinstance(caps, DeviceCaps) else DeviceCaps.parse(caps)
    if getattr(tensor, "is_cuda", False):
        return caps_for_device(tensor.get_device())
    return None
