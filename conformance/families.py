"""Config families: every NSA test runs over several block layouts, not one.

Public NSA implementations use different block layouts (nsa_spec.md): the paper's strided
compression (l = 32, d = 16, l' = 64: this project, Scalable-Flash-NSA and
native-sparse-attention-triton's defaults) and the tied layout l = d = l' (64/64/64: FLA's
``fla.ops.nsa``, which can express nothing else). A rule
tested in one layout only says nothing about an implementation of the other. Each family here
is a named ``NSAConfig`` plus the shapes worth testing in it: lengths around its block edges and
head layouts (G = Hq / Hkv) from MHA to the paper's 16.

The tied layout is the most common one in public code, so it has the most families; the
strided ones keep the rules that only strided compression exercises (overlap weights 1,2,2,2,1,
blocks visible mid-selection-block) and the non-default forced-block counts. The tied families
use Dk = Dv (>= 16): the public tied-layout kernels (FLA's Triton, flash_attn's window) need equal
head dims of at least 16, and Dk != Dv stays covered by the strided families and the small cases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Cfg = tuple[tuple[str, Any], ...]


def _cfg(**kw) -> Cfg:
    return tuple(sorted(kw.items()))


@dataclass(frozen=True)
class Family:
    """A named config and the shapes ``(T, Hq, Hkv)`` tested in it; ``slow``: lengths whose
    brute force takes seconds on a CPU (deselected by default, ``-m slow``)."""

    name: str
    cfg: Cfg
    shapes: tuple[tuple[int, int, int], ...]
    why: str
    slow: tuple[tuple[int, int, int], ...] = ()
    dims: tuple[int, int] | None = None  # (Dk, Dv); None: the grid's default (Dk != Dv)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    # Layouts only a general implementation expresses (strided compression, small blocks, other
    # forced-block counts); few shapes each, chosen for the rules only they exercise.
    Family("paper", (),  # NSAConfig defaults: l 32, d 16, l' 64, n 16 (1 init + 2 local), w 512
           shapes=((1, 16, 1), (97, 4, 2), (97, 16, 1), (1025, 2, 2)),
           slow=((1025, 16, 1),),
           why="the paper's strided compression; overlap weights 1,2,2,2,1; 512-token window"),
    Family("variant", _cfg(block_len=8, block_stride=4, sel_block=16, n_sel=4, n_init=0, n_local=3, window=7,
                           scale=0.3),
           shapes=((37, 16, 1), (40, 6, 2)),
           why="non-default forced blocks (n_init 0, n_local 3), window 7, explicit scale, G = 3, strided"),
    Family("tied8", _cfg(block_len=8, block_stride=8, sel_block=8, n_sel=5, n_init=1, n_local=2, window=5,
                         scale=0.35),
           shapes=((70, 16, 1),),
           why="tied blocks of 8 with 2 free picks among up to 9 blocks: the score ranking decides", dims=(16, 16)),
    Family("tied16", _cfg(block_len=16, block_stride=16, sel_block=16, n_sel=4, n_init=1, n_local=2, window=20,
                          scale=0.2),
           shapes=((15, 16, 1), (17, 32, 2), (100, 16, 1)),
           why="tied blocks of 16 (FLA's smallest tile): many selection rounds, explicit scale, odd window",
           dims=(32, 32)),
    # The layout public kernels share (l = d = l' in {32, 64}, G >= 16, Dk = Dv): most shapes.
    Family("tied32", _cfg(block_len=32, block_stride=32, sel_block=32, n_sel=4, n_init=1, n_local=2, window=48),
           shapes=((1, 16, 1), (31, 16, 1), (32, 16, 1), (33, 32, 2), (64, 16, 1), (65, 16, 1), (96, 16, 1),
                   (97, 32, 2), (129, 16, 1), (130, 16, 1), (161, 16, 1), (200, 32, 2), (257, 16, 1),
                   (320, 16, 1), (400, 32, 2)),
           why="l = d = l' = 32 (the smallest block both FLA's and native-sparse-attention-triton's kernels "
               "tile), 1 free pick, a 48-token window across block edges", dims=(32, 32)),
    Family("tied64", _cfg(block_len=64, block_stride=64, sel_block=64, n_sel=16, n_init=1, n_local=2, window=512),
           shapes=((1, 16, 1), (63, 16, 1), (64, 16, 1), (65, 32, 2), (127, 16, 1), (128, 16, 1), (130, 16, 1),
                   (191, 16, 1), (192, 16, 1), (257, 16, 1), (320, 32, 2), (450, 16, 1)),
           slow=((1025, 16, 1),),
           why="l = d = l' = 64: FLA's defaults (its only layout)", dims=(32, 32)),
    Family("tied64-d128", _cfg(block_len=64, block_stride=64, sel_block=64, n_sel=4, n_init=1, n_local=2,
                               window=100),
           shapes=((64, 16, 1), (129, 16, 1), (200, 16, 1), (300, 32, 2)),
           why="l = d = l' = 64 at the head dim real models use (128); 1 free pick among up to 4 blocks",
           dims=(128, 128)),
)}

#: Small strided config (blocks of 8, stride 4, selection blocks of 16, 3 picks, window 16):
#: every rule at a few dozen tokens; used by the varlen, causality and property tests.
SMALL_CFG: Cfg = _cfg(block_len=8, block_stride=4, sel_block=16, n_sel=3, n_init=1, n_local=1, window=16)
#: The tied twin of SMALL_CFG (the same tests in the l = d = l' layout) at the smallest block that
#: the public tied-layout kernels all tile (32: native-sparse-attention-triton's top-k needs l' >= 32,
#: FLA's >= 16); its cases use Dk = Dv = 16 (see the module docstring).
SMALL_TIED_CFG: Cfg = _cfg(block_len=32, block_stride=32, sel_block=32, n_sel=4, n_init=1, n_local=2, window=40)
#: Head dims of the small tied cases.
SMALL_TIED_DIMS = dict(dk=16, dv=16)


def family_of(cfg: Cfg) -> str:
    """The family name of a config tuple, or "custom"."""
    for fam in FAMILIES.values():
        if tuple(sorted(fam.cfg)) == tuple(sorted(cfg)):
            return fam.name
    if tuple(sorted(cfg)) == SMALL_CFG:
        return "small"
    if tuple(sorted(cfg)) == SMALL_TIED_CFG:
        return "small-tied"
    return "custom"
