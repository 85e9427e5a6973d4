"""The FLA adapter (conformance/adapters/fla.py) on the CPU: its declarations, its torch stand-ins
for FLA's GPU-only dependencies, its convention helpers, and one full-NSA run against the brute
force. Tests that need fla-core skip with the reason when it is not installed."""
from __future__ import annotations

import pytest
import torch

from conformance import brute
from conformance.adapters import fla as adapter
from conformance.capabilities import Capabilities


@pytest.fixture(scope="module")
def fla_installed():
    """Skip (with the install hint) unless fla-core imports here."""
    pytest.importorskip("fla.ops.nsa.naive", reason=adapter.MISSING)
    fla, why = adapter._import_fla()
    if fla is None:
        pytest.skip(why)
    return fla


def _cfg(**over):
    from nsa_ref import NSAConfig

    base = dict(block_len=8, block_stride=8, sel_block=8, n_sel=3, n_init=1, n_local=2, window=5)
    return NSAConfig(**{**base, **over})


# --- declarations --------------------------------------------------------------------------------

def test_every_slot_declares_capabilities():
    for fn in (adapter.nsa_attention, adapter.cmp_attention, adapter.sel_attention, adapter.win_attention,
               adapter.select_blocks, adapter.compress):
        assert callable(fn.capabilities)


def test_without_fla_everything_is_unavailable_and_calls_say_how_to_install(monkeypatch):
    monkeypatch.setattr(adapter, "_import_fla", lambda: (None, adapter.MISSING))
    for slot in ("nsa", "cmp", "sel", "win", "select", "compress"):
        for device in ("cpu", "cuda"):
            assert adapter.capabilities(slot, device) == Capabilities(unavailable=adapter.MISSING)
    q = torch.zeros(4, 16, 8)
    with pytest.raises(ImportError, match=r"fla-core is not installed: pip install -e '\.\[fla\]'"):
        adapter.nsa_attention(q, q[:, :1], q[:, :1], torch.zeros(4, 16, 3), _cfg())


def test_cpu_declarations(fla_installed):
    nsa = adapter.nsa_attention.capabilities("cpu")
    assert (nsa.tied_blocks, nsa.n_init, nsa.n_local) == (True, (1,), (2,))
    assert (nsa.min_group, nsa.group_power_of_two) == (16, True)
    assert nsa.compute_dtype == "fp32" and nsa.decode is False and nsa.empty_sequences is False
    assert nsa.unavailable is None
    for slot in ("cmp", "sel"):  # FLA's naive branch functions take any G
        caps = adapter.capabilities(slot, "cpu")
        assert (caps.min_group, caps.group_power_of_two, caps.compute_dtype) == (1, False, "fp32")
    select = adapter.select_blocks.capabilities("cpu")
    assert select.compute_dtype is None and select.backward is False  # topk scores in the input dtype
    assert "flash_attn" in adapter.win_attention.capabilities("cpu").unavailable
    assert "mean_pooling" in adapter.compress.capabilities("cpu").unavailable


def test_cuda_declarations(fla_installed):
    for slot in ("cmp", "sel", "select"):
        caps = adapter.capabilities(slot, "cuda")
        assert (caps.min_group, caps.group_power_of_two, caps.max_head_dim) == (16, True, 256)
        assert caps.block_sizes == (16, 32, 64, 128) and "fp64" not in caps.dtypes
    has_fa = fla_installed.parallel.flash_attn_func is not None
    for slot in ("nsa", "win"):
        caps = adapter.capabilities(slot, "cuda")
        assert caps.equal_head_dims and caps.dtypes == ("bf16", "fp16")
        assert (caps.unavailable is None) == has_fa


def test_declared_space_rejects_untied_configs(fla_installed):
    caps = adapter.nsa_attention.capabilities("cpu")
    fields = dict(block_len=32, block_stride=16, sel_block=64, n_sel=16, n_init=1, n_local=2, window=512, scale=None)
    assert any("block_len == block_stride == sel_block" in r for r in caps.config_reasons(fields, "nsa"))
    assert caps.shape_reasons(hq=32, hkv=2, dk=16, dv=16) == []  # G = 16
    assert caps.shape_reasons(hq=8, hkv=1, dk=16, dv=16) != []  # G = 8 < 16
    assert caps.shape_reasons(hq=24, hkv=1, dk=16, dv=16) != []  # G = 24, not a power of two


# --- stand-ins (this adapter's torch code; checked by hand, no FLA needed) ---------------------

def test_mean_pooling_standin_partial_chunk_and_varlen():
    x = torch.arange(5.0).view(1, 5, 1, 1)  # tokens 0..4, chunk 2 -> [0.5, 2.5, 4 (partial)]
    assert adapter.mean_pooling_standin(x, 2).flatten().tolist() == [0.5, 2.5, 4.0]
    packed = torch.tensor([0.0, 1, 2, 10, 20, 30, 40]).view(1, 7, 1, 1)
    cu = torch.tensor([0, 3, 3, 7])  # lengths 3, 0, 4
    got = adapter.mean_pooling_standin(packed, 2, cu).flatten().tolist()
    assert got == [0.5, 2.0, 15.0, 35.0]  # ceil(3/2) + 0 + ceil(4/2) blocks, packed
    assert adapter.mean_pooling_standin(x.double(), 2).dtype == torch.float64


def test_flash_attn_standin_window_semantics():
    """q = 0 makes every allowed key weigh the same: out[t] = mean of v over FA-2's allowed keys."""
    T, left = 6, 2
    q = torch.zeros(1, T, 2, 4)
    k = torch.randn(1, T, 1, 4)
    v = torch.arange(T, dtype=torch.float32).view(1, T, 1, 1).expand(1, T, 1, 4)
    out = adapter.flash_attn_func_standin(q, k, v, causal=True, window_size=(left, 0))
    want = [sum(range(max(0, t - left), t + 1)) / (t + 1 - max(0, t - left)) for t in range(T)]
    assert out.shape == (1, T, 2, 4)
    assert torch.allclose(out[0, :, 1, 0], torch.tensor(want))  # head 1 shares KV head 0 (GQA)
    full = adapter.flash_attn_func_standin(q, k, v, causal=True)  # window (-1, -1): plain causal
    assert torch.allclose(full[0, :, 0, 0], torch.tensor([t / 2 for t in range(T)]))
    # Tq < Tk aligns to the bottom-right corner: the one query is position Tk - 1.
    last = adapter.flash_attn_func_standin(q[:, -1:], k, v, causal=True, window_size=(1, 0))
    assert torch.allclose(last[0, 0, 0, 0], torch.tensor((T - 2 + T - 1) / 2))


def test_flash_attn_varlen_standin_matches_dense_per_sequence():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, h, 4, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    got = adapter.flash_attn_varlen_func_standin(q, k, v, cu, cu, 5, 5, causal=True, window_size=(1, 0))
    for a, b in ((0, 4), (4, 9)):
        dense = adapter.flash_attn_func_standin(q[None, a:b], k[None, a:b], v[None, a:b], causal=True,
                                                window_size=(1, 0))[0]
        assert torch.allclose(got[a:b], dense)


def test_cpu_standins_are_restored_even_on_error():
    naive = type("naive", (), {"mean_pooling": "m", "flash_attn_func": None, "flash_attn_varlen_func": None})
    with pytest.raises(RuntimeError):
        with adapter.cpu_standins(naive):
            assert naive.mean_pooling is adapter.mean_pooling_standin
            raise RuntimeError
    assert (naive.mean_pooling, naive.flash_attn_func, naive.flash_attn_varlen_func) == ("m", None, None)


# --- convention helpers --------------------------------------------------------------------------

def test_block_packing_round_trip_and_index_sort():
    lengths, block = [17, 0, 16, 5], 8  # floor: 2, 0, 2, 0; ceil: 3, 0, 2, 1
    suite = torch.arange(4.0).view(4, 1, 1)
    fla_side = adapter.to_fla_blocks(suite, lengths, block)
    assert fla_side.flatten().tolist() == [0.0, 1.0, 0.0, 2.0, 3.0, 0.0]
    assert torch.equal(adapter.from_fla_blocks(fla_side, lengths, block), suite)
    idx = torch.tensor([[[3, -1, 0, 2]]])
    assert adapter.sort_block_idx(idx).tolist() == [[[0, 2, 3, -1]]]
    assert adapter.sort_block_idx(idx).dtype == torch.int32


# --- FLA itself, one small tied case --------------------------------------------------------------

def test_nsa_slot_matches_brute_on_a_tied_case(fla_installed):
    """FLA's naive_nsa (fp32 inside) with the stand-ins vs the fp64 brute force: scale=None (an
    explicit scale does not reach FLA's window, a known difference), T crossing block edges."""
    import fla.ops.nsa.naive as naive

    cfg = _cfg()
    gen = torch.Generator().manual_seed(1)
    T, hq, hkv, dk, dv = 21, 16, 1, 8, 8
    q, k = torch.randn(T, hq, dk, generator=gen, dtype=torch.float64), torch.randn(T, hkv, dk, generator=gen,
                                                                                   dtype=torch.float64)
    v, gates = torch.randn(T, hkv, dv, generator=gen, dtype=torch.float64), torch.rand(T, hq, 3, generator=gen,
                                                                                     dtype=torch.float64)
    before = (naive.mean_pooling, naive.flash_attn_func)
    out = adapter.nsa_attention(q, k, v, gates, cfg)
    assert (naive.mean_pooling, naive.flash_attn_func) == before  # FLA's globals restored
    want = brute.nsa_attention(q, k, v, gates, cfg)
    assert out.shape == want.shape and out.dtype == torch.float64
    assert (out - want).abs().max().item() < 1e-5  # fp32 arithmetic inside FLA's naive code
