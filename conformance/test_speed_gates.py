"""Speed gates (markers gpu + bench): FA-2 must beat the SDPA fallback by >= 1.2x at T >= threshold.

Both paths are timed in the same test, on the same inputs, with CUDA events (warm-up, median of
rotated runs); only their ratio is asserted, never an absolute time. The FA-2 timing also goes
through pytest-benchmark so `--benchmark-json` keeps it:

    python -m pytest conformance/test_speed_gates.py -m "gpu and bench" --benchmark-json=gates.json
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.bench]

MIN_RATIO = 1.2
GATE_TS = [int(t) for t in os.environ.get("NSA_GATE_TS", "16384,65536").split(",")]


def _threshold(branch: str, head_dim: int) -> int:
    from nsa_ref.fa2.thresholds import default_min_len

    return default_min_len(branch, torch.device("cuda"), head_dim)


@pytest.mark.parametrize("T", GATE_TS)
@pytest.mark.parametrize("branch", ["win", "cmp"])
def test_fa2_beats_sdpa(benchmark, branch, T):
    from conformance.tools.bench import build_case, time_cuda
    from nsa_ref.config import NSAConfig
    from nsa_ref.fa2 import available_providers

    providers = available_providers()
    if not providers:
        pytest.skip("no FA-2 provider usable on this GPU")
    threshold = _threshold(branch, 128)
    if T < threshold:
        pytest.skip(f"T={T} below the configured FA-2 threshold {threshold} for {branch}")
    cfg = NSAConfig()
    fast, make = build_case(branch, f"fa2:{providers[0]}", T, 64, 4, 128, 128, torch.bfloat16, cfg)
    slow, _ = build_case(branch, "sdpa", T, 64, 4, 128, 128, torch.bfloat16, cfg)
    inputs = [make(seed) for seed in range(2)]
    with torch.no_grad():
        fa2_ms = time_cuda(fast, inputs, warmup=3, reps=10)[0]
        sdpa_ms = time_cuda(slow, inputs, warmup=2, reps=5)[0]
        benchmark.pedantic(fast, args=inputs[0], rounds=10, warmup_rounds=2)
    ratio = sdpa_ms / fa2_ms
    benchmark.extra_info.update(branch=branch, T=T, provider=providers[0], fa2_ms=fa2_ms,
                                sdpa_ms=sdpa_ms, ratio=ratio, threshold=threshold)
    assert ratio >= MIN_RATIO, (
        f"speed gate {branch} T={T} (threshold {threshold}): SDPA {sdpa_ms:.3f} ms / FA-2 "
        f"{fa2_ms:.3f} ms = {ratio:.2f}x < {MIN_RATIO}x"
    )
