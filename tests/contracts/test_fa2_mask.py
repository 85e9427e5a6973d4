"""contracts.fa2_mask: FA-2's normalisation, the masks, and the host-only row comparison."""
import itertools

import torch

from contracts.fa2_mask import fa2_mask, first_differing_row, intended_mask, normalised_window


def test_normalisation_examples():
    assert normalised_window(True, (-1, -1), 1, 9) == (False, (-1, -1))  # max_q == 1: causal off
    assert normalised_window(False, (2, -1), 5, 4) == (False, (2, 4))  # left window: right = max_k
    assert normalised_window(False, (-1, 4), 16, 4) == (False, (-1, -1))  # the max_k clamp
    assert normalised_window(True, (3, -1), 8, 8) == (True, (3, 0))


def test_dense_mask_defaults_to_its_own_lengths():
    assert torch.equal(fa2_mask(3, 3, True, (-1, -1)), torch.ones(3, 3, dtype=torch.bool).tril())
    assert fa2_mask(16, 4, False, (-1, 4)).all()  # right window >= seqlen_k dropped
    # varlen: the clamp uses the call's max_seqlen_k, not the sequence's own length
    assert not fa2_mask(6, 4, False, (-1, 4), 6, 8).all()


def test_first_differing_row_equals_the_masks_on_small_shapes():
    windows = [(a, b) for a in range(-1, 7) for b in range(-1, 7)]
    for sq, sk in itertools.product(range(6), range(6)):
        for asked, computed in itertools.product(windows, windows):
            m1, m2 = intended_mask(sq, sk, False, asked), intended_mask(sq, sk, False, computed)
            rows = [i for i in range(sq) if not torch.equal(m1[i], m2[i])]
            assert first_differing_row(sq, sk, asked, computed) == (rows[0] if rows else None), (sq, sk, asked, computed)
