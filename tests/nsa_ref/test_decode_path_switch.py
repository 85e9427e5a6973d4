"""A switch of path in the middle of a sequence (the seed's off-by-one worry): every step of one
cache goes through another decode path, and every step still equals prefill at its position.

CPU (fp64, ragged batch with an empty prompt, pages of 5 tokens): the reference step, the fast
step's torch path ("sdpa"), "auto", the fast step with an FA-2 kvcache emulation for win, cmp and
sel (the same call arguments and masks FA-2 gets), and ``CapturedDecodeStep`` (its device-side
append, run eagerly), in turn, to 1e-12 of prefill. GPU (bf16, paper config, pages of 256): the
backends "fa2" (where flash_attn is installed), "triton", "sdpa", "reference", "auto" and the
captured graph in turn on one cache,
against the reference step on a twin cache, within the bf16 rule of ``test_decode_fast``.
"""
from __future__ import annotations

import pytest
import torch
from test_decode_fast import EMULATED, PAPER, _bf16_close, _gpu_case

from nsa_ref import NSAConfig, NSAKVCache, decode_step, nsa_attention
from nsa_ref.decode_batched import decode_step_batched
from nsa_ref.decode_fast import decode_step_fast
from nsa_ref.decode_graph import CapturedDecodeStep

CFG = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=6)


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def test_switching_paths_mid_sequence_equals_prefill():
    pre, steps = [0, 5, 13], 15
    full = [n + steps for n in pre]
    g = torch.Generator().manual_seed(3)
    T = sum(full)
    q, k, v = (torch.randn(T, h, 6, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    gates = torch.rand(T, 4, 3, generator=g, dtype=torch.float64)
    want = nsa_attention(q, k, v, gates, CFG, _cu(full), backend="reference")
    starts = _cu(full)[:-1].tolist()
    table = torch.randperm(3 * 8, generator=g).to(torch.int32).reshape(3, 8)  # pages of 5: 40 tokens each
    cache = NSAKVCache.allocate_paged(table, 3 * 8, 5, 2, 6, CFG, dtype=torch.float64)
    head = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, pre)])
    cache.prefill(k[head], v[head], _cu(pre))

    def rows(step):
        return [s + n + step for s, n in zip(starts, pre)]

    captured = CapturedDecodeStep(cache, CFG, *(x[rows(0)] for x in (q, k, v, gates)), fa2=None, graph=False)
    paths = [
        lambda *a: decode_step(*a, cache, CFG, backend="reference"),
        lambda *a: decode_step(*a, cache, CFG, backend="sdpa"),
        lambda *a: decode_step_fast(*a, cache, CFG, fa2=EMULATED, select="torch", win="fa2"),
        lambda *a: decode_step(*a, cache, CFG, backend="auto"),
        lambda *a: captured(*a).clone(),
    ]
    for step in range(steps):
        got = paths[step % len(paths)](*(x[rows(step)] for x in (q, k, v, gates)))
        err = (got - want[rows(step)]).abs().max().item()
        assert err <= 1e-12, f"step {step} (path {step % len(paths)}): max|decode - prefill| = {err:.2e}"
    assert cache.lengths == full and cache.num_cmp_blocks == [CFG.num_cmp_blocks(n) for n in full]


@pytest.mark.gpu
def test_gpu_switching_paths_mid_sequence():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    (cache, ref), inputs = _gpu_case(seed=5)
    captured = CapturedDecodeStep(cache, PAPER, *inputs(0))
    from nsa_ref.decode_fast import resolve_kvcache

    fa2 = "fa2" if resolve_kvcache("auto")[0] is not None else "auto"  # flash_attn not installed: no kvcache kernel
    paths = [
        lambda *a: decode_step(*a, cache, PAPER, backend=fa2),
        lambda *a: decode_step(*a, cache, PAPER, backend="triton"),
        lambda *a: decode_step(*a, cache, PAPER, backend="sdpa"),
        lambda *a: captured(*a).clone(),
        lambda *a: decode_step(*a, cache, PAPER, backend="reference"),
        lambda *a: decode_step(*a, cache, PAPER, backend="auto"),
    ]
    for step in range(18):
        args = inputs(step)
        got = paths[step % len(paths)](*args)
        _bf16_close(got, decode_step_batched(*args, ref, PAPER), f"step {step} (path {step % len(paths)})")
    assert cache.lengths == ref.lengths and torch.equal(cache.cache_seqlens, ref.cache_seqlens)
    assert torch.equal(cache.cmp.cache_seqlens, ref.cmp.cache_seqlens)
