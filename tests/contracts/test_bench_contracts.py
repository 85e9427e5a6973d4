"""Cost of a contract check (pytest-benchmark). Deselected by default; run with
``python -m pytest tests/contracts -m bench --benchmark-only``. No timing thresholds here: the
target (<= 10 us median for a valid meta-mode call on CPU tensors) is reported, not asserted.
"""
from __future__ import annotations

import pytest
import torch

from contracts import dense_reasons, varlen_reasons
from contracts_testkit import dense_inputs, varlen_inputs

pytestmark = pytest.mark.bench


def test_bench_dense_reasons_meta_mode(benchmark):
    args = dense_inputs(b=2, sq=1024, sk=1024, hq=16, hk=4, d=128)
    assert benchmark(dense_reasons, **args) == []


def test_bench_varlen_reasons_meta_mode(benchmark):
    args = varlen_inputs(lq=(97, 1025, 300, 7), hq=16, hk=4, d=128)
    assert benchmark(varlen_reasons, **args, causal=True) == []


def test_bench_varlen_reasons_strict_mode(benchmark):
    args = varlen_inputs(lq=(97, 1025, 300, 7), hq=16, hk=4, d=128)
    args["seqused_k"] = torch.tensor([90, 1000, 300, 7], dtype=torch.int32)
    assert benchmark(varlen_reasons, **args, causal=True, strict=True) == []


@pytest.mark.gpu
def test_bench_varlen_reasons_strict_mode_cuda(benchmark):
    """Strict mode on CUDA index tensors: one concat and one device-to-host copy (one sync)."""
    args = varlen_inputs(lq=(97, 1025, 300, 7), hq=16, hk=4, d=128, device="cuda")
    args["seqused_k"] = torch.tensor([90, 1000, 300, 7], dtype=torch.int32, device="cuda")
    assert benchmark(varlen_reasons, **args, causal=True, strict=True) == []


@pytest.mark.gpu
def test_bench_varlen_reasons_meta_mode_cuda(benchmark):
    args = varlen_inputs(lq=(97, 1025, 300, 7), hq=16, hk=4, d=128, device="cuda")
    assert benchmark(varlen_reasons, **args, causal=True) == []


def test_bench_kvcache_rotary_meta_mode(benchmark):
    from contracts import kvcache_reasons
    from contracts_testkit import kvcache_inputs, rotary

    args = {**kvcache_inputs(s_new=1), **rotary()}
    assert benchmark(kvcache_reasons, **args, causal=True) == []


def test_bench_qkvpacked_meta_mode(benchmark):
    from contracts import qkvpacked_reasons

    qkv = torch.empty(2, 1024, 3, 16, 128, dtype=torch.float16)
    assert benchmark(qkvpacked_reasons, qkv, causal=True) == []


def test_bench_guarded_dense_meta_mode(benchmark):
    """The whole guarded() wrapper around a no-op kernel: binding, facts, rules."""
    from contracts import guarded

    f = guarded(lambda *a, **k: None, "dense", mode="meta")
    args = dense_inputs(b=2, sq=1024, sk=1024, hq=16, hk=4, d=128)
    benchmark(f, args["q"], args["k"], args["v"], 0.0, None, True)
