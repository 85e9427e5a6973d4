"""NSAConfig: paper defaults, validation messages that quote the values, helpers."""
from __future__ import annotations

import math

import pytest

from nsa_ref import NSAConfig


def test_defaults_are_the_paper_values():
    cfg = NSAConfig()
    got = (cfg.block_len, cfg.block_stride, cfg.sel_block, cfg.n_sel, cfg.n_init, cfg.n_local, cfg.window)
    assert got == (32, 16, 64, 16, 1, 2, 512), f"paper §4.1 defaults (l, d, l', n, init, local, w) = {got}"
    assert cfg.compress == "mean" and cfg.scale is None
    assert cfg.softmax_scale(192) == pytest.approx(1 / math.sqrt(192)), "scale None -> 1/sqrt(Dk)"
    assert NSAConfig(scale=0.5).softmax_scale(192) == 0.5


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"sel_block": 40}, ["sel_block must be a multiple of block_stride", "sel_block=40", "block_stride=16"]),
        ({"block_len": 40}, ["block_len must be a multiple of block_stride", "block_len=40", "block_stride=16"]),
        ({"block_len": 8}, ["block_len must be >= block_stride", "block_len=8", "block_stride=16"]),
        ({"n_sel": 2}, ["n_sel must be >= n_init + n_local", "n_sel=2", "n_init=1", "n_local=2"]),
        ({"block_len": 0}, ["block_len must be >= 1", "block_len=0"]),
        ({"block_stride": -4}, ["block_stride must be >= 1", "block_stride=-4"]),
        ({"sel_block": 0}, ["sel_block must be >= 1", "sel_block=0"]),
        ({"n_sel": 0}, ["n_sel must be >= 1", "n_sel=0"]),
        ({"n_init": -1}, ["n_init must be >= 0", "n_init=-1"]),
        ({"window": 0}, ["window must be >= 1", "window=0"]),
        ({"scale": -1.0}, ["scale must be a finite positive number", "scale=-1.0"]),
        ({"compress": "max"}, ["compress"]),
        ({"blocklen": 32}, ["blocklen"]),
    ],
)
def test_invalid_combinations_name_the_values(kwargs, needles):
    with pytest.raises(ValueError) as info:
        NSAConfig(**kwargs)
    message = str(info.value)
    missing = [n for n in needles if n not in message]
    assert not missing, f"NSAConfig({kwargs}) error must mention {missing}; got: {message}"


def test_config_is_frozen():
    cfg = NSAConfig()
    with pytest.raises(ValueError):
        cfg.window = 3


@pytest.mark.parametrize("T, tc", [(0, 0), (31, 0), (32, 1), (47, 1), (48, 2), (97, 5), (1025, 63)])
def test_num_cmp_blocks(T, tc):
    assert NSAConfig().num_cmp_blocks(T) == tc, f"Tc = floor((T - l)/d) + 1 if T >= l else 0, T={T}"


@pytest.mark.parametrize("T, nb", [(0, 0), (1, 1), (64, 1), (65, 2), (1025, 17)])
def test_num_sel_blocks(T, nb):
    assert NSAConfig().num_sel_blocks(T) == nb, f"nb = ceil(T / l'), T={T}"
