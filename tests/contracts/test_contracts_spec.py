"""Provider specs: parsing, version switches, the default flash_attn version, import hygiene."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from contracts import ProviderSpec, spec, spec_for


def test_spec_strings_and_cache():
    s = spec_for("flash_attn==2.8.3")
    assert (s.provider, s.version, s.label) == ("flash_attn", "2.8.3", "flash_attn==2.8.3")
    assert spec_for("flash_attn==2.8.3") is s
    assert spec_for(s) is s
    assert spec_for(" flash-attn == 2.6.3 ").version == "2.6.3"
    t = spec_for("torch")
    assert t.provider == "torch" and t.version == torch.__version__


@pytest.mark.parametrize("bad", ["flash", "torch==", "flash_attn>=2.8", "xformers", ""])
def test_unknown_provider_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="provider"):
        spec_for(bad)


def test_limits_are_data():
    s = spec_for("flash_attn==2.8.3")
    assert (s.max_head_dim, s.head_dim_multiple, s.grid_limit, s.int32_offset_limit, s.paged_block_multiple) == (
        256, 8, 65535, 2**31, 256)
    assert s.pads_head_dim and not spec_for("torch==2.13").pads_head_dim
    assert s.bwd_garbage_archs == ((8, 6), (8, 9), (12, 0)) and s.bwd_garbage_head_dim_range == (192, 256)
    assert s.allowed_archs is None and s.min_compute_major == 8
    assert spec_for("flash_attn==2.7.2").allowed_archs == ((8, None), (9, 0))
    assert spec_for("flash_attn==2.7.2").bwd_garbage_archs == ()
    assert "FA2-HEADS-KV-ZERO" in s.permanent_guards
    with pytest.raises(Exception):
        s.max_head_dim = 512  # frozen


def test_head_dim_rounding():
    s = spec_for("flash_attn==2.8.3")
    assert [s.round_head_dim(d) for d in (59, 64, 193)] == [64, 64, 200]
    assert [s.head_dim_rounded(d) for d in (8, 64, 72, 128, 136, 192, 200, 256)] == [32, 64, 96, 128, 192, 192, 256, 256]
    assert spec_for("torch==2.13").round_head_dim(59) == 59


@pytest.mark.parametrize("version, gqa", [("2.11.0", False), ("2.12.1", False), ("2.13.0+cpu", True), ("2.14", True)])
def test_varlen_attn_features_by_torch_version(version, gqa):
    s = spec_for(f"torch=={version}")
    assert s.varlen_attn_supports_gqa is gqa and s.varlen_attn_supports_seqused_k is gqa
    assert s.aten_supports_block_table is gqa


def test_default_flash_attn_version(monkeypatch):
    def missing(name):
        raise spec.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(spec, "_SPECS", {})
    monkeypatch.setattr(spec.importlib.metadata, "version", missing)
    assert spec_for("flash_attn").version == spec.DEFAULT_FLASH_ATTN_VERSION == "2.8.3"
    monkeypatch.setattr(spec, "_SPECS", {})
    monkeypatch.setattr(spec.importlib.metadata, "version", lambda name: "2.7.0.post2")
    assert spec_for("flash_attn").version == "2.7.0.post2"
    assert spec_for("flash_attn").allowed_archs == ((8, None), (9, 0))


def test_version_tuple():
    assert spec.version_tuple("2.8.3.post2") == (2, 8, 3)
    assert spec.version_tuple("2.13.0+cu130") == (2, 13, 0)
    assert spec.version_tuple("2.14.0a0") == (2, 14, 0)
    with pytest.raises(ValueError):
        spec.version_tuple("main")


def test_custom_spec_is_accepted():
    custom = ProviderSpec(provider="flash_attn", version="9.9", pads_head_dim=False,
                          fixes_last_dim_stride=True, masks_return_softmax=True, max_head_dim=128)
    from contracts_testkit import dense_inputs
    from contracts import dense_reasons

    assert [r.rule for r in dense_reasons(**dense_inputs(d=192), provider=custom)] == ["FA2-HEAD-DIM-MAX"]


def test_import_touches_no_cuda_and_no_other_room():
    code = (
        "import sys, torch, contracts, contracts.tolerances\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('nsa_ref', 'conformance', 'flash_attn')]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
