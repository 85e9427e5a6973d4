"""Declared capabilities: what is judged "not applicable", at which precision, and how the suite
reports it (conformance.capabilities, conformance.impl, the pytest plugin)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conformance.capabilities import ANYTHING, Capabilities, parse_cap_flags
from conformance.cases import CFG_DEFAULTS, FAMILIES, SMALL_CFG, SMALL_TIED_CFG, single, varlen_case
from conformance.impl import ImplLoadError, build

REPO = Path(__file__).resolve().parents[2]
FLA_LIKE = Capabilities(tied_blocks=True, n_init=(1,), n_local=(2,), min_group=16, group_power_of_two=True,
                        compute_dtype="fp32", decode=False)


def test_cfg_defaults_mirror_nsaconfig():
    from nsa_ref import NSAConfig

    cfg = NSAConfig()
    assert CFG_DEFAULTS == {k: getattr(cfg, k) for k in CFG_DEFAULTS}


def test_anything_accepts_every_family_case():
    for fam in FAMILIES.values():
        for T, hq, hkv in fam.shapes:
            assert ANYTHING.not_supported_reasons(single(T, hq, hkv, fam.cfg), "nsa", ("varlen", "backward")) == []


def test_tied_layout_is_judged_per_slot():
    strided = single(37, 16, 1, SMALL_CFG)
    tied = single(37, 16, 1, SMALL_TIED_CFG)
    assert FLA_LIKE.not_supported_reasons(tied, "nsa") == []
    reasons = FLA_LIKE.not_supported_reasons(strided, "nsa")
    assert any("block_len=8, block_stride=4, sel_block=16" in r for r in reasons)
    # sel takes block_idx as input: only l' matters, so a strided config is still applicable.
    assert FLA_LIKE.not_supported_reasons(strided, "sel") == []
    # cmp compares l and d only; SMALL_CFG has l=8, d=4.
    assert any("block_len=8, block_stride=4" in r for r in FLA_LIKE.not_supported_reasons(strided, "cmp"))
    # forced-block counts matter to select, not to win.
    assert any("n_local=1" in r for r in FLA_LIKE.not_supported_reasons(strided, "select"))
    assert FLA_LIKE.not_supported_reasons(strided, "win") == []


def test_group_head_dim_dtype_and_feature_reasons_quote_values():
    caps = Capabilities(min_group=16, group_power_of_two=True, max_head_dim=64, head_dim_multiple=8,
                        equal_head_dims=True, dtypes=("bf16",), varlen=False, empty_sequences=False)
    reasons = caps.not_supported_reasons(single(9, 6, 2, SMALL_CFG, dk=13, dv=7), "nsa", (), "fp64")
    text = " | ".join(reasons)
    for needle in ("input dtype fp64", "G = Hq/Hkv = 3 outside", "G = Hq/Hkv = 3 is not a power of two",
                   "Dk=13 is not a multiple of 8", "Dk=13 != Dv=7"):
        assert needle in text, text
    packed = varlen_case((0, 5), hq=16, hkv=1, dk=8, dv=8)
    text = " | ".join(caps.not_supported_reasons(packed, "win", (), "bf16"))
    assert "varlen not supported" in text and "empty sequences not supported" in text


def test_unavailable_overrides_everything():
    caps = Capabilities(unavailable="fla-core is not installed")
    assert caps.not_supported_reasons(single(9, 16, 1, SMALL_TIED_CFG), "nsa") == ["fla-core is not installed"]


@pytest.mark.parametrize("compute, given, judged", [(None, "fp64", "fp64"), ("fp32", "fp64", "fp32"),
                                                    ("fp32", "bf16", "bf16"), ("fp64", "fp32", "fp32")])
def test_judged_dtype_is_the_coarser_precision(compute, given, judged):
    assert Capabilities(compute_dtype=compute).judged_dtype(given) == judged


def test_overrides_parse_text_and_refuse_nonsense():
    caps = ANYTHING.with_overrides(parse_cap_flags(["backward=false", "min_group=16", "n_local=1,2",
                                                    "dtypes=bf16,fp16", "compute_dtype=fp32"]))
    assert (caps.backward, caps.min_group, caps.n_local, caps.dtypes, caps.compute_dtype) == \
        (False, 16, (1, 2), ("bf16", "fp16"), "fp32")
    with pytest.raises(ValueError, match="unknown capability 'bogus'"):
        ANYTHING.with_overrides({"bogus": "1"})
    with pytest.raises(ValueError, match="expected true or false"):
        ANYTHING.with_overrides({"backward": "maybe"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_cap_flags(["backward"])
    with pytest.raises(ValueError, match="compute_dtype"):
        ANYTHING.with_overrides({"compute_dtype": "fp8"})


def test_build_takes_declared_capabilities_and_command_line_overrides(tmp_path, monkeypatch):
    (tmp_path / "declares_caps.py").write_text(textwrap.dedent("""
        from conformance.capabilities import Capabilities
        import nsa_ref

        def win(q, k, v, cfg, cu_seqlens=None):
            return nsa_ref.win_attention(q, k, v, cfg, cu_seqlens, backend="reference")
        win.capabilities = lambda device: Capabilities(min_group=16, note=f"on {device}")

        OTHER = Capabilities(varlen=False)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    impl = build({"win": "declares_caps:win"})
    assert impl.capabilities("win").min_group == 16 and impl.capabilities("win").note == "on cpu"
    assert impl.capabilities("nsa") is ANYTHING  # nsa_ref's own slot
    impl = build({"win": "declares_caps:win"}, capabilities="declares_caps:OTHER", compute_dtype="fp32",
                 cap_overrides={"backward": "false"})
    caps = impl.capabilities("win")
    assert (caps.varlen, caps.min_group, caps.backward, caps.compute_dtype) == (False, 1, False, "fp32")
    assert impl.judged_dtype("win") == torch.float32
    assert any("declares" in line for line in impl.describe())
    with pytest.raises(ImplLoadError, match="--nsa-capabilities"):
        build({"win": "declares_caps:win"}, capabilities="declares_caps:win_missing")


def _run_suite(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_out_of_space_tests_are_not_applicable_and_hypothesis_stays_inside(tmp_path):
    """An implementation that refuses G < 16 and strided layouts (by raising) passes every
    applicable test; the rest are reported "not applicable", never failed."""
    (tmp_path / "picky_nsa.py").write_text(textwrap.dedent("""
        import nsa_ref
        from conformance.capabilities import Capabilities

        def win(q, k, v, cfg, cu_seqlens=None):
            G = q.shape[1] // k.shape[1]
            if G < 16 or G & (G - 1):
                raise NotImplementedError(f"G={G}")
            return nsa_ref.win_attention(q, k, v, cfg, cu_seqlens, backend="reference")
        win.capabilities = Capabilities(min_group=16, group_power_of_two=True)
    """))
    run = _run_suite(tmp_path, "conformance/test_win.py", "--nsa-win-impl=picky_nsa:win", "-q")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "not applicable" in out and "0 failed" in out, out[-2000:]


def test_fp32_internal_precision_fails_at_fp64_and_passes_when_declared(tmp_path):
    """An implementation computing in fp32 misses the fp64 floor with a message naming the
    tolerance row and the flag; declaring --nsa-compute-dtype=fp32 makes the verdict fair."""
    (tmp_path / "fp32_inside.py").write_text(textwrap.dedent("""
        import nsa_ref

        def win(q, k, v, cfg, cu_seqlens=None):
            out = nsa_ref.win_attention(q.float(), k.float(), v.float(), cfg, cu_seqlens, backend="reference")
            return out.to(q.dtype)
    """))
    args = ("conformance/test_win.py", "--nsa-win-impl=fp32_inside:win", "-q", "-k", "tied16 and 100")
    strict = _run_suite(tmp_path, *args)
    assert strict.returncode == 1, strict.stdout[-2000:]
    assert "tolerances.yaml rules.fp64.out" in strict.stdout and "--nsa-compute-dtype" in strict.stdout
    assert "[NSA-WIN]" in strict.stdout
    fair = _run_suite(tmp_path, *args, "--nsa-compute-dtype=fp32")
    assert fair.returncode == 0, fair.stdout[-2000:]
    assert "1 applicable (1 passed, 0 failed)" in fair.stdout, fair.stdout[-1500:]


def test_case_strategy_keeps_to_rules_only_a_subclass_knows():
    """Hypothesis draws follow the plain fields; a subclass's own config rule filters the rest."""
    from dataclasses import dataclass

    from hypothesis import given, settings

    from conformance.cases import case_strategy

    @dataclass(frozen=True)
    class NoStrideOne(Capabilities):
        def config_reasons(self, cfg, slot="nsa"):
            out = super().config_reasons(cfg, slot)
            return out + (["block_stride=1 refused"] if cfg["block_stride"] == 1 else [])

    caps = NoStrideOne()
    seen = []

    @settings(max_examples=40, derandomize=True, database=None, deadline=None)
    @given(case=case_strategy(max_len=20, caps=caps, slot="cmp"))
    def draw(case):
        seen.append(case.cfg_fields()["block_stride"])
        assert caps.not_supported_reasons(case, "cmp") == []

    draw()
    assert seen and 1 not in seen and {2, 4} & set(seen)


def test_an_exception_from_the_implementation_names_the_rules(tmp_path):
    """An implementation that raises (here a bare assert, as a Triton wrapper does) fails with a
    message that starts with the test's rule tags and says where it was raised."""
    (tmp_path / "asserting_win.py").write_text(textwrap.dedent("""
        def win(q, k, v, cfg, cu_seqlens=None):
            assert q.shape[0] > 1000
    """))
    run = _run_suite(tmp_path, "conformance/test_win.py", "--nsa-win-impl=asserting_win:win", "-q",
                     "-k", "tied32 and 257")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-2000:]
    assert "AssertionError: [NSA-WIN] sliding window" in out and "the test raised AssertionError" in out, out[-3000:]
    assert "asserting_win.py:3" in out, out[-3000:]
    assert "1 applicable (0 passed, 1 failed)" in out, out[-1500:]
