"""The tuned shortest sequence per GPU and head dim from which 'auto' routes a branch to FA-2.

The table is ``nsa_ref/fa2_thresholds.yaml`` (written by ``nsa-fa2 bench`` analysis); keyed by a
substring of the GPU's torch device name, then branch, then head dim (or one int for all dims).
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

THRESHOLDS_FILE = Path(__file__).resolve().parent.parent / "fa2_thresholds.yaml"
_THRESHOLDS: dict | None = None


def load_thresholds() -> dict:
    with THRESHOLDS_FILE.open() as fh:
        return yaml.safe_load(fh) or {}


def gpu_name(device: torch.device) -> str:
    """The GPU's name as torch reports it (what the table is keyed by); "cpu" off CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def default_min_len(branch: str, device: torch.device, head_dim: int) -> int:
    """Tuned shortest T for FA-2 on this GPU and head dim."""
    return threshold_min_len(branch, gpu_name(device), head_dim)


def threshold_min_len(branch: str, gpu: str, head_dim: int) -> int:
    """Tuned shortest T for FA-2 on the GPU named ``gpu`` (a torch device name, or "cpu")."""
    global _THRESHOLDS
    if _THRESHOLDS is None:
        _THRESHOLDS = load_thresholds()
    table = _THRESHOLDS.get("gpus", {})
    entry = next((v for k, v in table.items() if k.lower() in gpu.lower()), _THRESHOLDS.get("default", {}))
    per_branch = entry.get(branch, {})
    if isinstance(per_branch, int):
        return per_branch
    # head-dim keyed: the closest listed head dim at or above ours, else the largest listed.
    dims = sorted(int(d) for d in per_branch)
    if not dims:
        return 0
    pick = next((d for d in dims if d >= head_dim), dims[-1])
    return int(per_branch[pick])
