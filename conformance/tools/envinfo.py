"""The environment a result belongs to: GPU, driver, CUDA, torch, FA-2 providers and versions,
and the peer NSA implementations a run could import (FLA's fla-core, native-sparse-attention-triton).

    python -m conformance.tools.envinfo            # JSON on stdout
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys


def _driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "n/a (no nvidia-smi)"
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


#: Peer NSA implementations: import name -> distribution name (None: used from a source checkout).
PEERS = {"fla": "fla-core", "native_sparse_attention": None}


def _peers() -> dict:
    """Each peer's version, or where its source is imported from, without importing it."""
    import importlib.util

    found = {}
    for module, dist in PEERS.items():
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            found[module] = "not importable"
        elif dist is not None and _version(dist) != "not installed":
            found[module] = f"{dist} {_version(dist)}"
        else:
            found[module] = f"source at {spec.origin}"
    return found


def collect() -> dict:
    """A flat dict describing this machine; never raises on a CPU-only machine."""
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda or "none (CPU build)",
        "cuda_available": torch.cuda.is_available(),
        "flash_attn": _version("flash_attn"),
        "triton": _version("triton"),
        "pydantic": _version("pydantic"),
        "torch_fa2_op": hasattr(torch.ops.aten, "_flash_attention_forward"),
        "driver": _driver(),
        "peers": _peers(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count)
    else:
        info.update(gpu="none", gpu_count=0)
    return info


def main() -> int:
    print(json.dumps(collect(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
