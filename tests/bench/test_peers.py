"""Peer paths of ``nsa-fa2 bench`` (conformance.tools.peers) and the sweep's families, without a GPU.

Pins: each peer path names its peer or says why it cannot run (a LookupError the sweep records as
a skipped row, never a crash); FLA is refused outside tied layouts; ``impl:MOD:FN`` resolves any
importable callable; ``--peer-path`` puts folders first on sys.path; the families are valid
NSAConfigs and FLA's is the tied one.
"""
from __future__ import annotations

import sys

import pytest

from conformance.tools import bench, peers
from nsa_ref.config import NSAConfig


def test_families_are_valid_configs():
    cfgs = {name: NSAConfig(**kw) for name, kw in bench.FAMILIES.items()}
    assert cfgs["paper"] == NSAConfig()
    fla = cfgs["fla"]
    assert fla.block_len == fla.block_stride == fla.sel_block == 64


def test_fla_refused_outside_tied_layouts():
    with pytest.raises(LookupError, match="tied layouts only"):
        peers.peer_fn("peer:fla", NSAConfig(), 64, 4, 128, 128)


def test_flash_nsa_missing_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_nsa", None)  # import fails as if not installed
    with pytest.raises(LookupError, match="--peer-path"):
        peers.peer_fn("peer:flash_nsa", NSAConfig(), 64, 4, 128, 128)


def test_impl_path_resolves_any_callable_and_rejects_bad_names():
    fn, version = peers.peer_fn("impl:nsa_ref.api:nsa_attention", NSAConfig(), 8, 2, 16, 16)
    from nsa_ref.api import nsa_attention
    assert fn is nsa_attention and version == "nsa_ref.api"
    with pytest.raises(LookupError, match="impl:<module>:<function>"):
        peers.peer_fn("impl:nothing", NSAConfig(), 8, 2, 16, 16)
    with pytest.raises(LookupError, match="unknown peer path"):
        peers.peer_fn("peer:nope", NSAConfig(), 8, 2, 16, 16)
    assert peers.is_peer("impl:a:b") and peers.is_peer("peer:fla") and not peers.is_peer("triton")


def test_peer_paths_go_first_on_sys_path(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", list(sys.path))
    peers.add_peer_paths([str(tmp_path / "a"), str(tmp_path / "b")])
    assert sys.path[:2] == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_peer_path_on_another_branch_is_a_skip():
    with pytest.raises(LookupError, match="nsa branch only"):
        bench.build_case("win", "peer:fla", 128, 4, 2, 16, 16, None, NSAConfig())
