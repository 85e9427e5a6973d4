"""CPU tests of conformance.adapters.nsa_triton (XunhaoLai/native-sparse-attention-triton).

The third party is never needed here: its import is replaced by a stub (declared capabilities) or
by a failure (the clean "unavailable" path). When the real package is on PYTHONPATH, one tiny
smoke test also runs it (its pure-torch references) against the brute force.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from conformance import brute
from conformance.adapters import nsa_triton as X
from conformance.capabilities import Capabilities, declared

SLOT_FUNCS = {
    "nsa": X.nsa_attention,
    "cmp": X.cmp_attention,
    "sel": X.sel_attention,
    "win": X.win_attention,
    "select": X.select_blocks,
    "compress": X.compress,
}


def _cfg(**kw):
    from nsa_ref import NSAConfig

    return NSAConfig(**kw)


@pytest.fixture
def missing_package(monkeypatch):
    """Every import of native_sparse_attention (and flash_attn) fails as if not installed."""

    def fail(name):
        top = name.split(".")[0]
        raise ModuleNotFoundError(f"No module named {top!r}", name=top)

    monkeypatch.setattr(X, "_import", fail)


@pytest.fixture
def stub_package(monkeypatch):
    """The package "imports" (empty stub modules); flash_attn does not."""

    def fake(name):
        if name.split(".")[0] == "flash_attn":
            raise ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn")
        return types.ModuleType(name)

    monkeypatch.setattr(X, "_import", fake)


def _inputs(T=6, hq=2, hkv=1, d=4):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(T, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(T, hkv, d, generator=g, dtype=torch.float64)
    return q, k, v


# --- unavailable: importing the adapter never fails, every slot says why and how to fix ---------

def test_adapter_module_imports_without_the_package(monkeypatch):
    """A fresh copy of the adapter imports while native_sparse_attention cannot be imported."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("native_sparse_attention", "flash_attn")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "native_sparse_attention", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    spec = importlib.util.spec_from_file_location("nsa_triton_fresh_copy", X.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    spec.loader.exec_module(fresh)
    caps = fresh.cmp_attention.capabilities("cpu")
    assert caps.unavailable and "native-sparse-attention-triton" in caps.unavailable
    with pytest.raises(ImportError):
        fresh.win_attention(*_inputs(), _cfg(window=2))


@pytest.mark.parametrize("slot", list(SLOT_FUNCS))
def test_unavailable_capabilities_when_not_importable(slot, missing_package):
    caps = declared(SLOT_FUNCS[slot], "cpu")
    assert isinstance(caps, Capabilities)
    assert caps.unavailable and "native_sparse_attention is not importable" in caps.unavailable
    assert "PYTHONPATH" in caps.unavailable and "pip install" in caps.unavailable
    # every test is then "not applicable" with that one reason
    assert caps.not_supported_reasons(None, slot) == [caps.unavailable]


def test_unavailable_call_raises_clear_import_error(missing_package):
    q, k, v = _inputs()
    cfg = _cfg(block_len=2, block_stride=2, sel_block=2, n_sel=3, window=2)
    calls = {
        "nsa": lambda: X.nsa_attention(q, k, v, torch.rand(6, 2, 3, dtype=torch.float64), cfg),
        "cmp": lambda: X.cmp_attention(q, k[:3], v[:3], cfg),
        "sel": lambda: X.sel_attention(q, k, v, torch.zeros(6, 1, 3, dtype=torch.int32), cfg),
        "win": lambda: X.win_attention(q, k, v, cfg),
        "select": lambda: X.select_blocks(q, k[:3], cfg),
        "compress": lambda: X.compress(k, cfg),
    }
    for slot, call in calls.items():
        with pytest.raises(ImportError, match="native_sparse_attention is not importable") as info:
            call()
        assert isinstance(info.value, X.NSATritonUnavailable), slot
        assert "PYTHONPATH=.peers/native-sparse-attention-triton" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("slot", list(SLOT_FUNCS))
def test_unavailable_on_cuda_without_cuda(slot, stub_package):
    caps = declared(SLOT_FUNCS[slot], "cuda")
    assert caps.unavailable and "torch.cuda.is_available() is False" in caps.unavailable
    assert "--nsa-device=cpu" in caps.unavailable


def test_build_with_missing_package_does_not_fail(missing_package):
    from conformance.impl import build

    impl = build({"nsa": "conformance.adapters.nsa_triton:nsa_attention",
                  "cmp": "conformance.adapters.nsa_triton:cmp_attention"}, device="cpu", dtype="bf16")
    for slot in ("nsa", "cmp"):
        reasons = impl.not_applicable(slot)
        assert len(reasons) == 1 and "not importable" in reasons[0]


# --- declared capabilities (package importable) -------------------------------------------------

def test_cpu_capabilities(stub_package):
    caps = {slot: declared(fn, "cpu") for slot, fn in SLOT_FUNCS.items()}
    assert all(c.unavailable is None and c.decode is False for c in caps.values())
    # torch references: any dtype, softmax in fp32; the compression asserts fp16/bf16
    for slot in ("cmp", "sel", "select"):
        assert caps[slot].dtypes == ("fp64", "fp32", "bf16", "fp16")
        assert caps[slot].compute_dtype == "fp32"
    assert caps["compress"].dtypes == caps["nsa"].dtypes == ("bf16", "fp16")
    assert caps["compress"].block_sizes == X.COMPRESS_KERNEL_SIZES
    assert caps["cmp"].lse is False  # compressed_attention_torch returns no lse
    assert caps["select"].backward is False and caps["cmp"].backward and caps["sel"].backward
    assert caps["select"].sel_multiple_of_block_len and caps["nsa"].sel_multiple_of_block_len
    assert "emulated" in caps["win"].note and caps["win"].compute_dtype is None
    assert all(not c.equal_head_dims and c.min_group == 1 and c.varlen and c.empty_sequences
               for c in caps.values())


def test_cuda_capabilities(stub_package, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    caps = {slot: declared(fn, "cuda") for slot, fn in SLOT_FUNCS.items()}
    assert all(c.unavailable is None for c in caps.values())
    for slot in ("nsa", "cmp", "sel", "select", "compress"):
        assert caps[slot].dtypes == ("bf16", "fp16"), slot
    assert caps["cmp"].lse is True
    assert caps["sel"].sel_block_sizes == X.SEL_BLOCK_SIZES and caps["nsa"].sel_block_sizes == X.SEL_BLOCK_SIZES
    assert caps["cmp"].max_head_dim == X.MAX_HEAD_DIM
    # without flash_attn the window is the emulated definition, which takes any dtype
    assert "emulated" in caps["win"].note and "fp64" in caps["win"].dtypes
    monkeypatch.setattr(X, "_flash_attn_varlen", lambda: object())
    win = declared(X.win_attention, "cuda")
    assert win.dtypes == ("bf16", "fp16") and "emulated" not in win.note and win.max_head_dim == 256


def test_block_size_rules_per_field(stub_package, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    paper = dict(block_len=32, block_stride=16, sel_block=64, n_sel=16, n_init=1, n_local=2, window=512, scale=None)
    tied16 = dict(paper, block_len=16, block_stride=16, sel_block=16)
    tied8 = dict(paper, block_len=8, block_stride=8, sel_block=8)
    nsa_cuda = X.nsa_attention.capabilities("cuda")
    assert nsa_cuda.config_reasons(paper, "nsa") == []
    assert any("sel_block=16" in r for r in nsa_cuda.config_reasons(tied16, "nsa"))
    assert any("block_len=8" in r for r in nsa_cuda.config_reasons(tied8, "nsa"))
    # sel judges only l': the compression kernel sizes do not apply to it
    sel_cuda = X.sel_attention.capabilities("cuda")
    assert sel_cuda.config_reasons(dict(paper, block_len=8, block_stride=4), "sel") == []
    assert sel_cuda.config_reasons(tied16, "sel")
    # torch reference top-k: l' must be a multiple of l
    select_cpu = X.select_blocks.capabilities("cpu")
    assert select_cpu.config_reasons(paper, "select") == []
    assert any("not a multiple" in r for r in select_cpu.config_reasons(dict(paper, sel_block=16), "select"))
    # the Triton compressed_attention asserts q_len > k_len: l = d = 1 is declared out (CUDA only)
    one = dict(paper, block_len=1, block_stride=1, sel_block=32)
    for fn in (X.cmp_attention, X.select_blocks):
        assert any("q_len > k_len" in r for r in fn.capabilities("cuda").config_reasons(one, "cmp"))
        assert fn.capabilities("cuda").config_reasons(dict(one, block_stride=2, block_len=2), "cmp") == []
    assert not any("q_len" in r for r in X.cmp_attention.capabilities("cpu").config_reasons(one, "cmp"))
    # on CUDA, sel's block_sizes constrain l' to the top-k kernel sizes (hypothesis draws from them)
    assert sel_cuda.block_sizes == X.SEL_BLOCK_SIZES


def test_capabilities_subclass_works_with_the_suite(stub_package):
    caps = X.nsa_attention.capabilities("cpu")
    caps.validate()
    shown = caps.summary()
    assert "block_len_sizes=(16, 32, 64, 128)" in shown and "dtypes=('bf16', 'fp16')" in shown
    over = caps.with_overrides({"backward": "false"})
    assert isinstance(over, X.XunhaoCapabilities) and over.backward is False
    assert over.block_len_sizes == caps.block_len_sizes


# --- conventions: transposes, padding, the emulated window ---------------------------------------

def test_block_idx_conversions():
    lib = torch.tensor([[[0, 2], [1, -1], [0, 1]]], dtype=torch.int64)  # (Hkv=1, T=3, k=2)
    suite = X._idx_to_suite(lib, 4)
    assert suite.dtype == torch.int32 and suite.shape == (3, 1, 4)
    assert suite[:, 0].tolist() == [[0, 2, -1, -1], [1, -1, -1, -1], [0, 1, -1, -1]]
    back = X._idx_to_library(suite, "cpu")
    assert back.shape == (1, 3, 4) and back.is_contiguous() and back[0, 0].tolist() == [0, 2, -1, -1]


def test_emulated_window_is_flash_attn_left_window_inclusive():
    """window_size=(w, -1) with causal=True: keys t-w..t, i.e. w + 1 keys (the library's choice)."""
    q, k, v = _inputs(T=9, hq=4, hkv=2, d=3)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    out = X._window_emulated(q, k, v, 2, 0.5, cu)
    ref = brute.win_attention(q, k, v, _cfg(window=3, scale=0.5, n_sel=16), cu)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_cu_and_scale_helpers():
    cu = X._cu(None, 7, "cpu")
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 7]
    assert X._cu(torch.tensor([0, 3, 7]), 7, "cpu").dtype == torch.int32
    assert X._scale(_cfg(scale=0.25), 64) == 0.25 and X._scale(_cfg(), 64) == 0.125
    assert X._kernel_width(8, 8) == 16 and X._kernel_width(24, 16) == 24
    x = torch.ones(2, 1, 3)
    assert X._pad_to(x, 16).shape == (2, 1, 16) and X._pad_to(x, 16)[..., 3:].abs().sum() == 0


def test_block_size_errors_are_clear(stub_package):
    q, k, v = _inputs(T=8)
    with pytest.raises(NotImplementedError, match=r"kernel_size \(block_len\) must be in"):
        X.compress(k.bfloat16(), _cfg(block_len=8, block_stride=8, sel_block=8, n_sel=3, window=4))
    with pytest.raises(NotImplementedError, match="block_size % kernel_size"):
        X.select_blocks(q, k[:1], _cfg(block_len=32, block_stride=16, sel_block=16, n_sel=3, window=4))


# --- the real package, when the user put it on PYTHONPATH ---------------------------------------

def test_real_package_smoke_cpu():
    if X.unavailable_reason("cpu"):
        pytest.skip("native-sparse-attention-triton not importable (PYTHONPATH=.peers/native-sparse-attention-triton)")
    cfg = _cfg(block_len=16, block_stride=8, sel_block=32, n_sel=3, n_init=1, n_local=1, window=5)
    q, k, v = _inputs(T=40, hq=2, hkv=1, d=8)
    k_cmp, _ = brute.compress(k, cfg)
    v_cmp, _ = brute.compress(v, cfg)
    out = X.cmp_attention(q, k_cmp, v_cmp, cfg)
    ref, _ = brute.cmp_attention(q, k_cmp, v_cmp, cfg)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)  # softmax in fp32
    idx = X.select_blocks(q, k_cmp, cfg)
    assert torch.equal(idx, brute.select_blocks(q, k_cmp, cfg))
