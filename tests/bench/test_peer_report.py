"""peer_report on a synthetic bench.csv: ratios taken within the CSV, each target judged from the
rows it names (fastest peer per T, full causal from 8K, 6x at 64K forward, FLA in its family)."""
from __future__ import annotations

import csv

from conformance.tools import bench, peer_report


def _csv(tmp_path, rows):
    path = tmp_path / "bench.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=bench.FIELDS)
        w.writeheader()
        for fam, branch, p, T, mode, ms in rows:
            w.writerow(dict(gpu="G", family=fam, branch=branch, path=p, T=T, hq=64, hkv=4, dk=128, dv=128,
                            dtype="bf16", mode=mode, median_ms=ms, peak_mib=100, status="ok"))
    return path


def test_targets_and_table(tmp_path):
    rows = [("paper", "nsa", "triton", 8192, "fwd", 2.0), ("paper", "nsa", "peer:flash_nsa", 8192, "fwd", 3.0),
            ("paper", "nsa", "peer:nsa_triton", 8192, "fwd", 1.0),  # the fastest peer at 8K: ours 0.5x
            ("paper", "nsa", "triton", 65536, "fwd", 10.0), ("paper", "nsa", "peer:flash_nsa", 65536, "fwd", 13.0),
            ("paper", "full_causal", "fa2:flash_attn", 8192, "fwd", 3.0),
            ("paper", "full_causal", "fa2:flash_attn", 65536, "fwd", 70.0),
            ("fla", "nsa", "triton", 8192, "fwd", 2.0), ("fla", "nsa", "peer:fla", 8192, "fwd", 3.2),
            ("paper", "nsa", "triton", 8192, "fwdbwd", 1.0)]
    t = peer_report._table(peer_report.load(_csv(tmp_path, rows)), "triton")
    got = {name: (ok, ev) for name, ok, ev in peer_report.targets(t, "triton")}
    assert got["fwd: >= 1.2x the fastest peer at every T"] == (False, "lowest 0.50x at T=8192 (vs native-sparse-attention-triton)")
    assert got["fwd: faster than full causal FA-2 from 8K"] == (True, "lowest 1.50x at T=8192")
    assert got["fwd: >= 6x full causal FA-2 at 64K"] == (True, "7.00x")
    assert got["fwd (FLA family): >= 1.5x FLA parallel_nsa at every T"] == (True, "lowest 1.60x at T=8192")
    md = peer_report.markdown(t, "triton")
    assert "| 65536 | 10.00 | 13.00 | - | 70.00 | 1.30x | - | 7.00x |" in md
    assert peer_report.main([str(_csv(tmp_path, rows)), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "peers.md").read_text() == md


def test_our_variants_are_columns_not_peers(tmp_path):
    rows = [("paper", "nsa", "triton", 8192, "fwd", 2.0), ("paper", "nsa", "triton:shapes", 8192, "fwd", 0.5),
            ("paper", "nsa", "peer:flash_nsa", 8192, "fwd", 3.0)]
    t = peer_report._table(peer_report.load(_csv(tmp_path, rows)), "triton")
    got = {name: ev for name, ok, ev in peer_report.targets(t, "triton")}
    assert got["fwd: >= 1.2x the fastest peer at every T"] == "lowest 1.50x at T=8192 (vs Scalable-Flash-NSA)"
    assert "ours, validate='shapes' ms" in peer_report.markdown(t, "triton")
