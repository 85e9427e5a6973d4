"""The SDPA sel path recomputes chunks in backward (checkpoint): gradients must stay exact, also
for packed sequences, where each chunk must use its own sequence's offsets when re-run."""
import torch

from nsa_ref import reference, sdpa
from nsa_ref.compress import compress
from nsa_ref.config import NSAConfig
from nsa_ref.selection import select_blocks
from nsa_ref.varlen import cu_seqlens_from_lengths


def test_checkpointed_sel_gradients_equal_reference_on_packed_sequences():
    cfg = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=6)
    cu = cu_seqlens_from_lengths([9, 0, 17])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(26, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    idx = select_blocks(q, compress(k, cfg, cu)[0], cfg, cu)
    # Sequences must differ in their selections, or a chunk re-run with the wrong offset
    # would go unnoticed: give the first sequence arbitrary (valid) blocks of its own.
    idx[:9] = torch.randint(-1, 2, (9, 2, 3), generator=g).to(idx.dtype)

    def grads(fn):
        ins = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        fn(*ins).square().sum().backward()
        return [x.grad for x in ins]

    with sdpa.mask_budget(64):  # many chunks across both non-empty sequences
        got = grads(lambda a, b, c: sdpa.sel_attention(a, b, c, idx, cfg, cu))
    want = grads(lambda a, b, c: reference.sel_attention(a, b, c, idx, cfg, cu))
    for name, x, r in zip(("dq", "dk", "dv"), got, want):
        err = (x - r).abs().max().item()
        assert err < 1e-10, f"sel sdpa checkpointed gradient {name}: max|diff| = {err:.3e}"
