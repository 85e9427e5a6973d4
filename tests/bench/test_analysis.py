"""Threshold recommender, thresholds YAML and plots, on a synthetic bench.csv (no GPU needed)."""
import csv

import pytest
import yaml

from conformance.tools import analysis, bench
from nsa_ref import router
from nsa_ref.fa2 import thresholds

GPU = "NVIDIA H100 80GB HBM3"


def _write(tmp_path, timings):
    """timings: {(branch, path, mode): {T: ms}} -> bench.csv path."""
    path = tmp_path / "bench.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=bench.FIELDS)
        w.writeheader()
        for (branch, p, mode), pts in timings.items():
            for T, ms in pts.items():
                w.writerow(dict(gpu=GPU, branch=branch, path=p, version="x", T=T, hq=64, hkv=4, dk=128, dv=128,
                                dtype="bf16", mode=mode, median_ms=ms, p10_ms=ms, p90_ms=ms, fwd_tflops="",
                                status="ok"))
        w.writerow(dict(gpu=GPU, branch="win", path="flex", version="x", T=65536, hq=64, hkv=4, dk=128, dv=128,
                        dtype="bf16", mode="fwd", median_ms="", p10_ms="", p90_ms="", fwd_tflops="", status="oom"))
    return path


@pytest.mark.parametrize("ratios,expected", [
    ({256: 2.0, 1024: 3.0, 4096: 5.0}, 0),            # fast everywhere: from the first T
    ({256: 0.8, 1024: 1.3, 4096: 2.0}, 1024),         # knee at 1024
    ({256: 1.5, 1024: 1.1, 4096: 2.0}, 4096),         # a dip resets: must hold for all larger T
    ({256: 1.5, 1024: 1.3, 4096: 1.1}, analysis.NEVER),  # slower at the longest: never
])
def test_min_len_rule(ratios, expected):
    assert analysis.min_len(ratios, 1.2) == expected


def test_recommend_takes_strictest_mode_and_router_reads_yaml(tmp_path, monkeypatch):
    path = _write(tmp_path, {
        ("win", "sdpa", "fwd"): {256: 1.0, 1024: 2.0, 4096: 8.0},
        ("win", "fa2:flash_attn", "fwd"): {256: 0.5, 1024: 0.5, 4096: 1.0},
        ("win", "sdpa", "fwdbwd"): {256: 1.0, 1024: 2.0, 4096: 8.0},
        ("win", "fa2:flash_attn", "fwdbwd"): {256: 1.0, 1024: 1.0, 4096: 1.0},
        ("cmp", "sdpa", "fwd"): {256: 1.0, 1024: 1.0},
        ("cmp", "fa2:torch", "fwd"): {256: 1.0, 1024: 0.5},
    })
    rec = analysis.recommend(analysis.load_rows(path))
    assert rec[GPU]["win"]["128"]["min_len"] == 1024  # fwd: 0, fwdbwd: 1024
    assert rec[GPU]["cmp"]["128"]["min_len"] == 1024 and rec[GPU]["cmp"]["128"]["provider"] == "fa2:torch"
    text = analysis.thresholds_yaml(rec, "test.csv")
    assert yaml.safe_load(text)["gpus"][GPU]["win"][128] == 1024
    target = tmp_path / "fa2_thresholds.yaml"
    target.write_text(text)
    monkeypatch.setattr(thresholds, "THRESHOLDS_FILE", target)
    monkeypatch.setattr(thresholds, "_THRESHOLDS", None)
    monkeypatch.setattr(router.torch.cuda, "get_device_name", lambda device=None: GPU)
    assert thresholds.default_min_len("win", router.torch.device("cuda"), 128) == 1024
    assert thresholds.default_min_len("win", router.torch.device("cuda"), 64) == 1024  # next listed dim up


def test_main_writes_plots_and_json(tmp_path, capsys):
    path = _write(tmp_path, {
        ("win", "sdpa", "fwd"): {256: 1.0, 1024: 2.0},
        ("win", "fa2:flash_attn", "fwd"): {256: 0.5, 1024: 0.5},
    })
    assert analysis.main([str(path)]) == 0
    assert (tmp_path / "thresholds.json").exists()
    assert (tmp_path / "time_win.png").stat().st_size > 1000
    assert (tmp_path / "speedup_win.png").stat().st_size > 1000
    assert "win d=128: FA-2 from T >= 0" in capsys.readouterr().out


def test_main_rejects_missing_or_empty_csv(tmp_path):
    assert analysis.main([str(tmp_path / "nope.csv")]) == 2
    empty = _write(tmp_path, {})
    assert analysis.main([str(empty)]) == 2


def test_merge_shards(tmp_path):
    a = _write(tmp_path, {("win", "sdpa", "fwd"): {256: 1.0}})
    (tmp_path / "s1").mkdir()
    b = _write(tmp_path / "s1", {("win", "sdpa", "fwd"): {1024: 2.0}})
    target = tmp_path / "merged.csv"
    assert bench.merge_csvs([a, b], target) == 4  # two timing rows + two oom rows
    with target.open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
