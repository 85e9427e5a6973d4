"""Triton selected attention (nsa_ref.triton_kernels.selected) against the exact reference.

Pins: ``sel_attention``'s output and its gradients in q, k and v equal ``nsa_ref.reference.sel_attention``
run in fp64 on the same inputs (relative error < 1e-5 for fp32 inputs, < 1e-10 for fp64; 1e-7 on a GPU), with
Dk != Dv, GQA groups of 1/3/4, varlen packs with an empty sequence; block lists as the router
gives them and edited by hand (repeats count once, -1 anywhere is ignored, a block after the
query's own contributes nothing, an empty list gives exactly 0 output and 0 gradient); random
block lists (hypothesis); fp64 gradcheck on a tiny config; no NaN anywhere.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_testkit import REL_TOL, TINY, cu_of, qkv, rel_err

from nsa_ref import NSAConfig, masks, reference, selection, varlen
from nsa_ref.compress import compress

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
#: Gradcheck-sized rules: l=4, d=2, l'=4, 1 initial + 1 local block.
GRAD_CFG = NSAConfig(block_len=4, block_stride=2, sel_block=4, n_sel=2, n_init=1, n_local=1, window=3)


def _selection(q, k, cfg, cu=None) -> torch.Tensor:
    """block_idx (T, Hkv, n_sel) int32 as nsa_attention would pick it (reference selection)."""
    return selection.select_blocks(q, compress(k, cfg, cu)[0], cfg, cu)


def _run(fn, q, k, v, do):
    """-> (out, (dq, dk, dv)) of ``fn(q, k, v)`` for output gradient ``do``, on fresh leaves."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, do)


def _check_sel(selected, q, k, v, block_idx, cfg, cu=None, seed=0):
    """q (T, Hq, Dk), k (T, Hkv, Dk), v (T, Hkv, Dv), block_idx (T, Hkv, n): Triton forward and
    gradients vs the fp64 reference on the upcast inputs. -> (out, grads, do) of the Triton path."""
    tol = REL_TOL[q.dtype]
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(q.shape[0], q.shape[1], v.shape[-1], generator=g, dtype=torch.float64).to(q.device)
    out, grads = _run(lambda a, b, c: selected.sel_attention(a, b, c, block_idx, cfg, cu), q, k, v, do.to(q.dtype))
    ref, rgrads = _run(lambda a, b, c: reference.sel_attention(a, b, c, block_idx, cfg, cu),
                       q.double(), k.double(), v.double(), do)
    assert out.dtype == q.dtype and out.shape == ref.shape
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *rgrads)):
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        assert got.dtype == q.dtype, name
        err = rel_err(got, want)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    assert ref.abs().max() > 0
    return out, grads, do.to(q.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 3, 4])
def test_sel_matches_reference_for_gqa_groups(selected, kdev, G, dtype):
    """q (40, 2G, 24), k (40, 2, 24), v (40, 2, 16): two KV heads, each shared by G query heads."""
    q, k, v = qkv(40, 2 * G, 2, 24, 16, dtype, kdev, seed=G)
    out, _, _ = _check_sel(selected, q, k, v, _selection(q, k, TINY), TINY, seed=G)
    assert out.shape == (40, 2 * G, 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sel_matches_reference_varlen_with_empty_sequence(selected, kdev, dtype):
    """lengths [21, 0, 40] packed (T=61), q (61, 2, 24), k (61, 1, 24), v (61, 1, 16): keys never
    cross sequences; block indices are per sequence."""
    cu = cu_of([21, 0, 40], kdev)
    q, k, v = qkv(61, 2, 1, 24, 16, dtype, kdev, seed=4)
    idx = _selection(q, k, TINY, cu)
    out, _, _ = _check_sel(selected, q, k, v, idx, TINY, cu, seed=4)
    # the first token of the third sequence attends only itself: its output is its own value row
    torch.testing.assert_close(out[21], v[21, 0].expand(2, 16), rtol=1e-6, atol=1e-6)


def _edited(idx: torch.Tensor, cfg: NSAConfig) -> tuple[torch.Tensor, dict]:
    """block_idx (T, Hkv, 3) from the selection, edited on KV head 0 (rows named in the returned dict):
    repeat: an entry repeated, order reversed; hole: a -1 in the middle; future: block t//l' + 1
    added (after the query's own block); empty: nothing listed."""
    idx = idx.clone()
    rows = {"repeat": 30, "hole": 33, "future": 20, "empty": 27}
    t = rows["repeat"]
    idx[t, 0] = torch.stack([idx[t, 0, 1], idx[t, 0, 0], idx[t, 0, 1]])
    t = rows["hole"]
    idx[t, 0] = torch.stack([idx[t, 0, 2], idx.new_tensor(-1), idx[t, 0, 0]])
    t = rows["future"]
    idx[t, 0, 1] = t // cfg.sel_block + 1
    idx[rows["empty"], 0] = -1
    return idx, rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_sel_hand_edited_block_lists(selected, kdev, dtype):
    """q (40, 4, 24), k (40, 2, 24), v (40, 2, 16), block_idx (40, 2, 3) with repeats, a -1 in the
    middle, a future block and an empty row."""
    q, k, v = qkv(40, 4, 2, 24, 16, dtype, kdev, seed=9)
    idx, rows = _edited(_selection(q, k, TINY), TINY)
    out, grads, do = _check_sel(selected, q, k, v, idx, TINY, seed=9)
    dq = grads[0]
    # empty list: exactly 0 output and exactly 0 gradient for the query heads of KV head 0 (heads 0, 1)
    t = rows["empty"]
    assert (out[t, :2] == 0).all() and (dq[t, :2] == 0).all()
    assert (out[t, 2:] != 0).any(), "KV head 1 of the same token is untouched"
    # a future block contributes nothing: the same result, bit for bit, with it dropped
    t = rows["future"]
    dropped = idx.clone()
    dropped[t, 0, 1] = -1
    again, again_grads = _run(lambda a, b, c: selected.sel_attention(a, b, c, dropped, TINY), q, k, v, do)
    assert torch.equal(again, out)
    for name, a, b in zip(("dq", "dk", "dv"), again_grads, grads):
        assert torch.equal(a, b), name
    # a repeated block counts once: same as the de-duplicated list
    t = rows["repeat"]
    dedup = idx.clone()
    blocks = sorted(set(idx[t, 0].tolist()))
    dedup[t, 0] = torch.tensor(blocks + [-1] * (TINY.n_sel - len(blocks)), dtype=idx.dtype, device=idx.device)
    once = selected.sel_attention(q, k, v, dedup, TINY)
    assert torch.equal(once[t], out[t])


def test_unique_blocks_sorts_and_drops_repeats_and_negatives(selected):
    """(1, 2, 5) lists -> sorted, each block once, -1 at the end."""
    idx = torch.tensor([[[3, -1, 1, 3, 0], [-1, -1, -1, -1, -1]]], dtype=torch.int32)
    got = masks.unique_blocks(idx)
    assert got.tolist() == [[[0, 1, 3, -1, -1], [-1, -1, -1, -1, -1]]] and got.dtype == torch.int32


@st.composite
def _block_lists(draw):
    """(T, Hkv, G, block_idx values (T * Hkv * 3 ints in -1..nb-1), seed) for TINY."""
    T = draw(st.integers(1, 30))
    hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2]))
    nb = TINY.num_sel_blocks(T)
    values = draw(st.lists(st.integers(-1, nb - 1), min_size=T * hkv * TINY.n_sel, max_size=T * hkv * TINY.n_sel))
    return T, hkv, G, values, draw(st.integers(0, 2**16))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(case=_block_lists())
def test_sel_forward_random_block_lists(selected, kdev, case):
    """Any block_idx (T, Hkv, 3) with values in -1..nb-1, any order, repeats, future blocks:
    fp64 forward equals the reference's; rows whose list has nothing at or before t are 0."""
    T, hkv, G, values, seed = case
    q, k, v = qkv(T, G * hkv, hkv, 24, 16, torch.float64, kdev, seed=seed)
    idx = torch.tensor(values, dtype=torch.int32, device=kdev).reshape(T, hkv, TINY.n_sel)
    out = selected.sel_attention(q, k, v, idx, TINY)
    want = reference.sel_attention(q, k, v, idx, TINY)
    assert torch.isfinite(out).all()
    assert rel_err(out, want) < REL_TOL[torch.float64]
    visible = (idx >= 0) & (idx * TINY.sel_block <= torch.arange(T, device=kdev)[:, None, None])
    nothing = (~visible.any(-1)).repeat_interleave(G, dim=1)  # (T, Hq)
    assert (out[nothing] == 0).all()


def _grad_inputs(kdev):
    """q (11, 2, 3), k (11, 1, 3), v (11, 1, 2) fp64 leaves and the selection's block_idx (11, 1, 2)."""
    q, k, v = (x.requires_grad_() for x in qkv(11, 2, 1, 3, 2, torch.float64, kdev, seed=1))
    return q, k, v, _selection(q.detach(), k.detach(), GRAD_CFG)


def test_gradcheck_fast_mode(selected, kdev):
    """fp64 gradcheck, random projections of the Jacobians (fast_mode): seconds on the interpreter."""
    q, k, v, idx = _grad_inputs(kdev)
    assert torch.autograd.gradcheck(lambda a, b, c: selected.sel_attention(a, b, c, idx, GRAD_CFG), (q, k, v),
                                    eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.slow
def test_gradcheck_full(selected, kdev):
    """fp64 gradcheck, full Jacobians (~40 s on the interpreter: slow)."""
    q, k, v, idx = _grad_inputs(kdev)
    assert torch.autograd.gradcheck(lambda a, b, c: selected.sel_attention(a, b, c, idx, GRAD_CFG), (q, k, v),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


# --- paths the cases above do not reach -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32")])
def test_dkv_split_into_segments(selected, kdev, monkeypatch, dtype):
    """DKV_SEGMENT = 5: every key block's dK/dV sums over several programs (atomic adds), as blocks
    picked by > 256 tokens do at scale. q (40, 4, 24), k (40, 2, 24), v (40, 2, 16), scale 0.3."""
    cfg = TINY.model_copy(update={"scale": 0.3})
    monkeypatch.setattr(selected, "DKV_SEGMENT", 5)
    q, k, v = qkv(40, 4, 2, 24, 16, dtype, kdev, seed=5)
    idx = _selection(q, k, cfg)
    segments, _, _, _, nb = selected._reverse_index(masks.unique_blocks(idx), varlen.token_positions(None, 40, kdev)[0],
                                                    [40], cfg.sel_block)
    assert segments.shape[0] > 2 * nb, "some block is split"
    _check_sel(selected, q, k, v, idx, cfg, seed=5)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32")])
def test_strided_k_and_v(selected, kdev, dtype):
    """k (40, 2, 16) and v (40, 2, 16) as head slices of one fused (40, 8, 16) tensor; q contiguous."""
    q, fused, _ = qkv(40, 4, 8, 16, 1, dtype, kdev, seed=8)
    k, v = fused[:, 2:4], fused[:, 5:7]
    assert not k.is_contiguous() and not v.is_contiguous()
    _check_sel(selected, q, k, v, _selection(q, k, TINY), TINY, seed=8)


_STRIDED_Q_CHILD = """
import sys, warnings
warnings.simplefilter("ignore")
import torch
from nsa_ref import NSAConfig, reference, selection
from nsa_ref.compress import compress
from nsa_ref.triton_kernels import selected
dev = sys.argv[1]
cfg = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=8)
g = torch.Generator().manual_seed(0)
fused = torch.randn(20, 4, 16, generator=g, dtype=torch.float64).to(dev)  # q: heads 0-1, k: 2, v: 3
idx = selection.select_blocks(fused[:, :2], compress(fused[:, 2:3], cfg)[0], cfg)
do = torch.randn(20, 2, 16, generator=g, dtype=torch.float64).to(dev)
grads = []
for fn in (selected.sel_attention, reference.sel_attention):
    x = fused.clone().requires_grad_()
    out = fn(x[:, :2], x[:, 2:3], x[:, 3:], idx, cfg)
    grads.append(torch.autograd.grad(out, x, do)[0])
err = (grads[0] - grads[1]).abs().amax(dim=(1, 2))
print("max |d fused - reference| per token:", [f"{e:.1e}" for e in err.tolist()])
sys.exit(0 if bool(err.max() < (1e-7 if dev == "cuda" else 1e-10)) else 1)
"""


def test_strided_q_gradient(kdev):
    """q (20, 2, 16) = heads 0-1 of a fused (20, 4, 16) tensor (row stride 64 instead of 32), k = head 2,
    v = head 3: the gradient of the fused tensor equals the reference's. Regression test: dq used to be
    written with q's strides into a dense buffer, out of bounds (heap corruption), so it runs in a child
    process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ)
    if kdev == "cpu":
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    child = subprocess.run([sys.executable, "-c", _STRIDED_Q_CHILD, kdev], env=env, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, f"child exited {child.returncode}: {child.stdout[-2000:]} {child.stderr[-2000:]}"


def test_no_tokens(selected, kdev):
    """T = 0: out (0, 4, 16), gradients of the input shapes."""
    q = torch.zeros(0, 4, 24, device=kdev, requires_grad=True)
    k = torch.zeros(0, 2, 24, device=kdev, requires_grad=True)
    v = torch.zeros(0, 2, 16, device=kdev, requires_grad=True)
    idx = torch.zeros(0, 2, TINY.n_sel, dtype=torch.int32, device=kdev)
    for cu in (None, cu_of([0, 0], kdev)):
        out = selected.sel_attention(q, k, v, idx, TINY, cu)
        assert out.shape == (0, 4, 16)
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert [tuple(g.shape) for g in grads if g is not None] == [(0, 4, 24), (0, 2, 24), (0, 2, 16)]
