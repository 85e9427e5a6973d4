"""Pytest plugin: GPU skipping and the implementation-under-test options.

Loaded by the repository's root ``conftest.py``; from elsewhere use
``pytest -p conformance.plugin --pyargs conformance``.
"""
from __future__ import annotations

import pytest

GPU_SKIP_REASON = (
    "GPU part skipped: no CUDA device on this machine. "
    "Run `python -m pytest -m gpu` on a machine with an NVIDIA GPU (sm80 or newer)."
)


def _cuda_available() -> bool:
    # torch.cuda.is_available() asks the driver without creating a CUDA context.
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    config._nsa_gpu_skipped = 0
    if not gpu_items or _cuda_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in gpu_items:
        item.add_marker(skip)
    config._nsa_gpu_skipped = len(gpu_items)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    skipped = getattr(config, "_nsa_gpu_skipped", 0)
    if skipped:
        terminalreporter.write_line(
            f"nsa-fa2: {skipped} GPU test(s) skipped (no CUDA). "
            "To run them: `python -m pytest -m gpu` on a CUDA machine."
        )
