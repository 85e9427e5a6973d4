"""NSA_SDPA_AUDIT and NSA_DEBUG_TIMING, observed through telemetry and logging."""
import logging

import torch

from nsa_ref import NSAConfig, nsa_attention, telemetry
from nsa_ref.varlen import cu_seqlens_from_lengths

CFG = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=6)


def _inputs(T=40, hq=4, hkv=2, d=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(T, hq, d, generator=g), torch.randn(T, hkv, d, generator=g),
            torch.randn(T, hkv, d, generator=g), torch.rand(T, hq, 3, generator=g))


def test_audit_records_fast_path_vs_sdpa_difference(monkeypatch):
    monkeypatch.setenv("NSA_SDPA_AUDIT", "1")
    monkeypatch.setenv("NSA_SDPA_AUDIT_ROWS", "16")
    telemetry.reset()
    q, k, v, gates = _inputs()
    nsa_attention(q, k, v, gates, CFG, backend="reference")
    audits = telemetry.snapshot()["audits"]
    assert {a["branch"] for a in audits} == {"cmp", "sel", "win"}
    assert all(a["rows"] == 16 and a["path"] == "reference" for a in audits)
    assert all(a["max_abs_diff"] < 1e-5 for a in audits), audits


def test_audit_samples_the_first_sequence_only(monkeypatch):
    monkeypatch.setenv("NSA_SDPA_AUDIT", "1")
    telemetry.reset()
    q, k, v, gates = _inputs(T=30)
    cu = cu_seqlens_from_lengths([10, 20])
    nsa_attention(q, k, v, gates, CFG, cu_seqlens=cu, backend="reference")
    assert {a["rows"] for a in telemetry.snapshot()["audits"]} == {10}


def test_no_audit_when_sdpa_itself_ran(monkeypatch):
    monkeypatch.setenv("NSA_SDPA_AUDIT", "1")
    telemetry.reset()
    nsa_attention(*_inputs(), CFG, backend="sdpa")
    assert telemetry.snapshot()["audits"] == []


def test_debug_timing_logs_path_shape_dtype(monkeypatch, caplog):
    monkeypatch.setenv("NSA_DEBUG_TIMING", "1")
    telemetry.reset()
    with caplog.at_level(logging.INFO, logger="nsa_ref"):
        nsa_attention(*_inputs(), CFG, backend="sdpa")
    lines = [r.getMessage() for r in caplog.records]
    assert any("win via sdpa: q(40, 4, 8) torch.float32" in line for line in lines), lines
    assert any("select via torch: q(40, 4, 8) torch.float32" in line for line in lines), lines
    timed = [(t["branch"], t["path"]) for t in telemetry.snapshot()["timings"]]
    assert timed == [("cmp", "sdpa"), ("select", "torch"), ("sel", "sdpa"), ("win", "sdpa")]
