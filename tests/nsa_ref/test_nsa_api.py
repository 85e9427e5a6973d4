"""Functional API: input validation messages and dispatch through the router."""
from __future__ import annotations

import pytest
import torch

from nsa_ref import cmp_attention, compress, nsa_attention, sel_attention, select_blocks, telemetry, win_attention
from nsa_ref_testkit import SMALL, cu_of, qkv


def _raises(fn, *needles):
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    missing = [n for n in needles if n not in message]
    assert not missing, f"error must mention {missing}; got: {message}"


def test_shape_and_head_checks():
    q, k, v, gates = qkv(20, 3, 2)
    _raises(lambda: win_attention(q, k, v, SMALL), "Hq must be a positive multiple of Hkv", "Hq=3", "Hkv=2")
    q, k, v, gates = qkv(20, 4, 2)
    _raises(lambda: win_attention(q[:, :, :4], k, v, SMALL), "same head dim Dk", "4 != 5")
    _raises(lambda: win_attention(q[:19], k, v, SMALL), "same number of tokens T", "19 != 20")
    _raises(lambda: win_attention(q, k, v[:, :1], SMALL), "same Hkv", "2 != 1")
    _raises(lambda: win_attention(q, k.float(), v, SMALL), "share a dtype")
    _raises(lambda: win_attention(q[0], k, v, SMALL), "q must have 3 dims", "(4, 5)")
    _raises(lambda: win_attention(q, k, v, {"window": 8}), "cfg must be an nsa_ref.NSAConfig")


def test_cu_seqlens_checks():
    q, k, v, _ = qkv(20, 2, 2)
    _raises(lambda: win_attention(q, k, v, SMALL, torch.tensor([0, 20])), "int32", "torch.int64")
    _raises(lambda: win_attention(q, k, v, SMALL, cu_of([12, 8]).flip(0)), "cu_seqlens[0] must be 0", "20")
    _raises(lambda: win_attention(q, k, v, SMALL, torch.tensor([0, 12, 5, 20], dtype=torch.int32)),
            "non-decreasing", "cu_seqlens[1]=12 > cu_seqlens[2]=5")
    _raises(lambda: win_attention(q, k, v, SMALL, cu_of([12, 7])), "cu_seqlens[-1]", "19 != T=20")


def test_cmp_and_selection_checks():
    q, k, v, _ = qkv(20, 2, 2)
    k_cmp, _ = compress(k, SMALL)
    v_cmp, _ = compress(v, SMALL)
    _raises(lambda: cmp_attention(q, k_cmp[:-1], v_cmp[:-1], SMALL), "Tc_total=4", "got 3 rows")
    _raises(lambda: select_blocks(q, k_cmp, SMALL, cu_of([10, 10])), "Tc_total=2", "got 4 rows")
    block_idx = select_blocks(q, k_cmp, SMALL)
    _raises(lambda: sel_attention(q, k, v, block_idx[:, :, :2], SMALL), "(T, Hkv, n_sel) = (20, 2, 3)", "(20, 2, 2)")
    _raises(lambda: sel_attention(q, k, v, block_idx.float(), SMALL), "int32", "torch.float32")
    bad = block_idx.clone()
    bad[7, 1, 2] = 3  # nb = ceil(20 / 8) = 3
    _raises(lambda: sel_attention(q, k, v, bad, SMALL), "block_idx[7, 1, 2]=3", "nb=3")


def test_gate_checks():
    q, k, v, gates = qkv(20, 2, 2)
    _raises(lambda: nsa_attention(q, k, v, gates[..., :2], SMALL), "gates must be (T, Hq, 3) = (20, 2, 3)")
    _raises(lambda: nsa_attention(q, k, v, gates * 3 - 1, SMALL), "gates must lie in [0, 1]", "min=", "max=")
    _raises(lambda: nsa_attention(q, k, v, gates, SMALL.model_copy(update={"compress": "mlp"})),
            "cfg.compress='mlp'", "NSAAttention")


def test_unknown_backend_is_refused():
    q, k, v, _ = qkv(20, 2, 2)
    _raises(lambda: win_attention(q, k, v, SMALL, backend="cuda"), "unknown backend 'cuda'")


def test_auto_on_cpu_routes_to_sdpa_and_is_counted():
    q, k, v, gates = qkv(20, 2, 2)
    telemetry.reset()
    out = nsa_attention(q, k, v, gates, SMALL)
    ref = nsa_attention(q, k, v, gates, SMALL, backend="reference")
    paths = {(branch, path) for (branch, path, _), n in telemetry.snapshot()["counts"].items()}
    assert {("cmp", "sdpa"), ("sel", "sdpa"), ("win", "sdpa")} <= paths, f"auto on CPU must run SDPA: {paths}"
    assert (out - ref).abs().max() < 1e-12, "auto (sdpa) vs reference"
