"""The visibility rules in nsa_ref.masks, one at a time, against the spec's words."""
from __future__ import annotations

import torch

from nsa_ref import NSAConfig, masks
from nsa_ref_testkit import ODD, SMALL


def test_selection_weights_paper_pattern():
    cfg = NSAConfig()
    w = masks.selection_weights(12, 3, cfg)
    for j in range(3):
        col = {i: w[i, j].item() for i in range(12) if w[i, j] > 0}
        want = {i: x for i, x in zip(range(4 * j - 1, 4 * j + 4), (1, 2, 2, 2, 1)) if 0 <= i < 12}
        assert col == want, f"w(j, i) for l, d, l' = 32, 16, 64, j={j}: got {col}, want {want} (1,2,2,2,1 on 4j-1..4j+3)"


def test_selection_weights_are_overlap_over_stride():
    cfg = ODD
    w = masks.selection_weights(10, 4, cfg)
    for i in range(10):
        for j in range(4):
            tokens = set(range(i * 4, i * 4 + 12)) & set(range(j * 24, (j + 1) * 24))
            assert w[i, j].item() == len(tokens) / 4, f"w({j}, {i}) = |overlap| / d = {len(tokens)}/4, got {w[i, j].item()}"


def test_cmp_visibility_is_block_end():
    for cfg in (SMALL, ODD, NSAConfig()):
        for t in range(100):
            count = sum(1 for i in range(40) if i * cfg.block_stride + cfg.block_len - 1 <= t)
            assert masks.num_visible_cmp_blocks(t, cfg) == count, f"visible blocks at t={t}: i*d + l - 1 <= t"
            assert int(masks.num_visible_cmp_blocks(torch.tensor(t), cfg)) == count
            emitted = any(i * cfg.block_stride + cfg.block_len - 1 == t for i in range(40))
            assert masks.cmp_block_emitted_at(t, cfg) == emitted, f"block emitted at t={t} iff i*d + l - 1 == t"


def test_forced_blocks_are_init_and_local_clipped():
    cfg = ODD  # n_init=2, n_local=1, l'=24
    for t in range(0, 120, 5):
        c = t // 24
        forced = {j for j in range(10) if masks.sel_block_forced(t, j, cfg)}
        want = ({0, 1} | {c}) & set(range(c + 1))
        assert forced == want, f"forced at t={t} (c={c}): got {sorted(forced)}, want {sorted(want)}"


def test_window_has_w_keys_including_itself():
    cfg = ODD  # w = 11
    pos = torch.arange(40)
    vis = masks.win_visible_mask(pos, pos, cfg)
    for t in range(40):
        keys = vis[t].nonzero().flatten().tolist()
        assert keys == list(range(max(0, t - 10), t + 1)), f"window of t={t}: [max(0, t-w+1), t], got {keys}"


def test_selected_block_mask_ignores_padding_and_duplicates():
    idx = torch.tensor([[[2, 0, -1, 2]]], dtype=torch.int32)
    member = masks.selected_block_mask(idx, 4)
    assert member.tolist() == [[[True, False, True, False]]], f"-1 ignored, repeats once: {member.tolist()}"
