"""The FA-2 layouts (cmp stride-0 fold, win window, packed sequences) checked on CPU.

EmulatedFA2 applies FA-2's own mask formula, so these tests pin that our *layout* maps NSA's
rules onto FA-2 calls exactly; the real kernels are checked on the GPU (conformance/test_gpu_fa2.py).
"""
import math

import pytest
import torch

from contracts.fa2_mask import fa2_mask
from nsa_ref import fa2, reference
from nsa_ref.config import NSAConfig
from nsa_ref.compress import compress
from nsa_ref.packing import cu_seqlens_from_lengths
from nsa_ref.fa2.emulate import EmulatedFA2

EMU = EmulatedFA2()
SMALL = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=6)


def _qkv(T, hq, hkv, dk, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, hq, dk, generator=g, dtype=dtype), torch.randn(T, hkv, dk, generator=g, dtype=dtype),
            torch.randn(T, hkv, dv, generator=g, dtype=dtype))


def _cu(lengths):
    return cu_seqlens_from_lengths(lengths)


def test_fa2_mask_formula_examples():
    # causal with Sq == Sk is lower-triangular; with Sq < Sk it is bottom-right aligned.
    assert torch.equal(fa2_mask(3, 3, True, (-1, -1)), torch.ones(3, 3, dtype=torch.bool).tril())
    assert fa2_mask(2, 4, True, (-1, -1)).tolist() == [[True, True, True, False], [True, True, True, True]]
    # window (w-1, 0) keeps the w keys ending at the query.
    assert fa2_mask(4, 4, True, (1, 0)).tolist() == [
        [True, False, False, False], [True, True, False, False], [False, True, True, False], [False, False, True, True]]


@pytest.mark.parametrize("T", [0, 1, 6, 7, 8, 9, 11, 12, 13, 37])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (6, 1)])
def test_cmp_fold_equals_reference(T, hq, hkv):
    cfg = SMALL
    q, k, v = _qkv(T, hq, hkv, 8, 8, torch.float64)
    k_cmp, _ = compress(k, cfg)
    v_cmp, _ = compress(v, cfg)
    # The emulator computes in fp32 after the fp32 -> bf16 cast policy; compare against the
    # reference on the same bf16-rounded inputs.
    out, lse = fa2.cmp_attention(q.float(), k_cmp.float(), v_cmp.float(), cfg, provider=EMU)
    rq, rk, rv = (x.to(torch.bfloat16).double() for x in (q, k_cmp, v_cmp))
    ref, ref_lse = reference.cmp_attention(rq, rk, rv, cfg)
    assert out.shape == (T, hq, 8) and out.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "cmp empty rows (t < l-1) must match"
    err = (out.double() - ref).abs().max().item() if T else 0.0
    assert err < 2e-2, f"cmp fold vs reference: max|diff| = {err:.3e}"
    assert (out[: min(T, cfg.block_len - 1)] == 0).all(), "rows t < l-1 must be exactly 0"


@pytest.mark.parametrize("dk,dv", [(8, 8), (12, 8), (8, 20)])
def test_win_matches_reference_with_padding(dk, dv):
    cfg = SMALL
    q, k, v = _qkv(29, 4, 2, dk, dv, torch.bfloat16)
    out = fa2.win_attention(q, k, v, cfg, provider=EMU)
    ref = reference.win_attention(q.double(), k.double(), v.double(), cfg)
    err = (out.double() - ref).abs().max().item()
    assert out.shape == (29, 4, dv)
    assert err < 2e-2, f"win (w-1, 0) vs reference [d={dk}/{dv}]: max|diff| = {err:.3e}"


@pytest.mark.parametrize("branch", ["cmp", "win"])
def test_packed_sequences_match_per_sequence(branch):
    cfg = SMALL
    lengths = [0, 13, 1, 0, 22]
    cu = _cu(lengths)
    q, k, v = _qkv(sum(lengths), 4, 2, 8, 8, torch.bfloat16)
    if branch == "win":
        packed = fa2.win_attention(q, k, v, cfg, cu, provider=EMU)
    else:
        kc, _ = compress(k, cfg, cu)
        vc, _ = compress(v, cfg, cu)
        packed = fa2.cmp_attention(q, kc, vc, cfg, cu, provider=EMU)[0]
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        if branch == "win":
            single = fa2.win_attention(q[sl], k[sl], v[sl], cfg, provider=EMU)
        else:
            single = fa2.cmp_attention(q[sl], compress(k[sl], cfg)[0], compress(v[sl], cfg)[0], cfg, provider=EMU)[0]
        assert torch.equal(packed[sl], single), f"{branch}: packed sequence at {start}..{start + n} differs"
        start += n


def test_fp32_inputs_use_bf16_or_fp16_by_preference():
    assert fa2.compute_dtype(torch.float32) == torch.bfloat16
    assert fa2.compute_dtype(torch.float32, pref_fp16=True) == torch.float16
    assert fa2.compute_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="float64"):
        fa2.compute_dtype(torch.float64)


def test_padded_head_dim():
    assert fa2.padded_head_dim(192, 128) == 192
    assert fa2.padded_head_dim(59, 59) == 64
    assert fa2.padded_head_dim(8, 20) == 24


def test_planned_calls_are_legal_for_the_contract():
    q, k, v = _qkv(100, 8, 2, 192, 128, torch.bfloat16)
    for branch in ("cmp", "win", "sel"):
        plan = fa2.calls.plan(branch, q, k, v, NSAConfig())
        for call in plan.calls:
            kind = call.kind
            assert call.contract_reasons(plan.dtype) == [], f"{branch} {kind} plan should be legal"


@pytest.mark.parametrize("lengths", [[37], [0, 13, 1, 0, 22]])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2)])
def test_sel_gather_equals_reference(lengths, hq, hkv):
    from nsa_ref.selection import select_blocks

    cfg = SMALL
    cu = _cu(lengths) if len(lengths) > 1 else None
    T = sum(lengths)
    q, k, v = _qkv(T, hq, hkv, 8, 12, torch.float64)
    kc, _ = compress(k, cfg, cu)
    idx = select_blocks(q, kc, cfg, cu)
    idx[::5, :, 0] = idx[::5, :, -1]  # repeats must count once
    idx[::7, 0, :] = -1  # a row with nothing selected gives 0
    out = fa2.sel_attention(q.float(), k.float(), v.float(), idx, cfg, cu, provider=EMU)
    rq, rk, rv = (x.to(torch.bfloat16).double() for x in (q, k, v))
    ref = reference.sel_attention(rq, rk, rv, idx, cfg, cu)
    err = (out.double() - ref).abs().max().item()
    assert err < 2e-2, f"sel gather vs reference: max|diff| = {err:.3e}"


def test_fa2_mask_without_window_is_full_even_when_sq_exceeds_sk():
    assert fa2_mask(3, 1, False, (-1, -1)).all()


@pytest.mark.parametrize("T", [7, 8, 37])
def test_cmp_fold_gradients_flow_to_q_and_compressed_kv(T):
    cfg = SMALL
    q, k, v = _qkv(T, 4, 2, 8, 8, torch.float32)
    kc, vc = compress(k, cfg)[0], compress(v, cfg)[0]
    dout = torch.randn(T, 4, 8, generator=torch.Generator().manual_seed(3))

    def grads(fn, dtype):
        ins = [x.detach().to(dtype).requires_grad_() for x in (q, kc, vc)]
        (fn(*ins) * dout.to(dtype)).sum().backward()
        return [x.grad.double() for x in ins]

    fast = grads(lambda a, b, c: fa2.cmp_attention(a, b, c, cfg, provider=EMU)[0], torch.float32)
    ref = grads(lambda a, b, c: reference.cmp_attention(a, b, c, cfg)[0], torch.float64)
    for name, x, r in zip(("dq", "dk_cmp", "dv_cmp"), fast, ref):
        assert x.shape == r.shape, f"cmp fold gradient {name} T={T}: shape {x.shape} != {r.shape}"
        err = (x - r).abs().max().item() if x.numel() else 0.0
        assert err < 5e-2, f"cmp fold gradient {name} T={T}: max|diff| = {err:.3e}"
    assert (fast[0][: cfg.block_len - 1] == 0).all(), "rows t < l-1 must get zero gradient"


def test_sel_gather_gradients_match_reference_through_checkpointed_chunks(monkeypatch):
    from nsa_ref.fa2 import calls, selected
    from nsa_ref.selection import select_blocks

    monkeypatch.setattr(calls, "GATHER_BUDGET", 2 * 2 * 3 * 8)  # two tokens per chunk
    cfg = SMALL
    q, k, v = _qkv(21, 4, 2, 8, 8, torch.float32)
    idx = select_blocks(q.double(), compress(k.double(), cfg)[0], cfg)

    def grads(fn, dtype):
        ins = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        fn(*ins).square().sum().backward()
        return [x.grad.double() for x in ins]

    fast = grads(lambda a, b, c: fa2.sel_attention(a, b, c, idx, cfg, provider=EMU), torch.float32)
    ref = grads(lambda a, b, c: reference.sel_attention(a, b, c, idx, cfg), torch.float64)
    for name, x, r in zip(("dq", "dk", "dv"), fast, ref):
        rel = ((x - r).abs().max() / r.abs().max()).item()  # bf16 compute: ~1e-2 relative
        assert rel < 2e-2, f"sel gather gradient {name}: max|diff| / max|ref| = {rel:.3e}"
