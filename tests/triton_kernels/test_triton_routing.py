"""Routing to the Triton kernels (nsa_ref.router, nsa_ref.api) and the API around them.

Pins: backend='triton' for sel/select raises TritonUnavailable on CPU tensors unless
TRITON_INTERPRET=1 (the message says so), and is taken when it can run; 'auto' never takes Triton
for CPU tensors (select then runs the torch scoring) and says why; NSA_USE_TRITON=0 turns 'auto'
away from Triton; backend='triton' on cmp/win is 'auto'; ``api.select_blocks(backend='triton')``
and ``nsa_attention(backend='triton')`` equal their reference paths; a bad ``lse`` is refused
before any kernel runs.
"""
from __future__ import annotations

import pytest
import torch
from triton_testkit import REL_TOL, TINY, assert_same_blocks, cu_of, q_and_kcmp, qkv, rel_err

import nsa_ref
from nsa_ref import api, reference, router, selection, telemetry
from nsa_ref.compress import compress
from nsa_ref.settings import NSASettings

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="pins how CPU tensors are routed; this machine has CUDA, so the kernels run there"
)


@pytest.fixture(autouse=True)
def _clean_telemetry():
    telemetry.reset()
    yield
    telemetry.reset()


@pytest.fixture
def no_interpret(monkeypatch):
    """TRITON_INTERPRET unset for one test."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _tensors(device, T=16, hq=4, hkv=2, dk=16, dv=8, dtype=torch.float32):
    """-> q (T, hq, dk), k (T, hkv, dk), v (T, hkv, dv)."""
    return qkv(T, hq, hkv, dk, dv, dtype, device)


def _choose(branch, backend, q, k, v, **kw):
    return router.choose(branch, backend, q=q, k=k, v=v, cfg=TINY, **kw)


def test_conftest_put_triton_interpret_back(interpret_at_start, kdev, scoring, selected):
    """The kernels were built for the interpreter on CPU (compiled on a GPU), and TRITON_INTERPRET
    is as the session had it, so other test folders see their own environment."""
    import os

    from triton.runtime.interpreter import InterpretedFunction

    assert os.environ.get("TRITON_INTERPRET") == interpret_at_start
    kernels = (scoring._topn_kernel, scoring._slc_scores_kernel, selected._sel_fwd_kernel, selected._sel_dkv_kernel)
    for kernel in kernels:
        assert isinstance(kernel, InterpretedFunction) == (kdev == "cpu"), kernel


# --- router ---------------------------------------------------------------------------------------


@cpu_only
@pytest.mark.parametrize("branch", ["sel", "select"])
def test_explicit_triton_on_cpu_without_interpreter_raises(no_interpret, branch):
    q, k, v = _tensors("cpu")
    with pytest.raises(router.TritonUnavailable, match="TRITON_INTERPRET") as info:
        _choose(branch, "triton", q, k, v)
    assert "CUDA" in str(info.value) and branch in str(info.value)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_interpreter_refuses_16_bit_inputs(interpret_env, dtype):
    """Triton's CPU interpreter gets 16-bit kernels wrong (bf16 sel off by ~8e8 when measured), so an
    explicit backend='triton' on 16-bit CPU tensors raises instead of returning a wrong number."""
    q, k, v = _tensors("cpu", dtype=dtype)
    with pytest.raises(router.TritonUnavailable, match="interpreter computes 16-bit"):
        _choose("sel", "triton", q, k, v)
    assert router.choose("sel", "auto", q=q, k=k, v=v, cfg=TINY).path != "triton"


@cpu_only
@pytest.mark.parametrize("interpret", [False, True], ids=["plain", "TRITON_INTERPRET=1"])
def test_auto_never_takes_triton_for_cpu_tensors(monkeypatch, interpret):
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _tensors("cpu")
    sel = _choose("sel", "auto", q, k, v)
    assert sel.path != "triton" and "triton" in sel.reason and "cpu" in sel.reason
    select = _choose("select", "auto", q, k, k)
    assert select.path == "torch" and "triton" in select.reason
    assert telemetry.snapshot()["counts"] == {("sel", sel.path, sel.reason): 1, ("select", "torch", select.reason): 1}


@pytest.mark.parametrize("branch", ["sel", "select"])
def test_explicit_triton_taken_where_it_can_run(interpret_env, kdev, branch):
    q, k, v = _tensors(kdev)
    route = _choose(branch, "triton", q, k, v)
    assert route.path == "triton" and route.reason.startswith("triton ")


def test_use_triton_off_turns_auto_away(monkeypatch):
    """NSA_USE_TRITON=0 is checked before the device: pretend CUDA to reach it on any machine."""
    monkeypatch.setattr(router, "_on_cuda", lambda q: True)
    q, k, v = _tensors("cpu")
    off = NSASettings(use_triton=False)
    select = _choose("select", "auto", q, k, k, settings=off)
    assert select.path == "torch" and "NSA_USE_TRITON=0" in select.reason
    sel = _choose("sel", "auto", q, k, v, settings=NSASettings(use_triton=False, use_fa2=False))
    assert sel.path == "sdpa" and "NSA_USE_TRITON=0" in sel.reason and "NSA_USE_FA2=0" in sel.reason


@pytest.mark.parametrize("branch", ["cmp", "win"])
def test_triton_on_branches_without_a_kernel_routes_as_auto(no_interpret, kdev, branch):
    q, k, v = _tensors(kdev)
    if branch == "cmp":
        k, v = compress(k, TINY)[0], compress(v, TINY)[0]
    got = _choose(branch, "triton", q, k, v)
    want = _choose(branch, "auto", q, k, v)
    assert got.path == want.path != "triton" and got.reason == want.reason


# --- api ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_api_select_blocks_triton_equals_reference(interpret_env, kdev, dtype):
    """lengths [30, 0, 25]: q (55, 3, 16), k_cmp (Tc, 1, 16); with and without the cmp branch's lse."""
    cu = cu_of([30, 0, 25], kdev)
    q, kc = q_and_kcmp(55, 3, 1, 16, TINY, dtype, kdev, cu=cu, seed=2)
    want = selection.select_blocks(q, kc, TINY, cu)
    got = api.select_blocks(q, kc, TINY, cu, backend="triton")
    assert_same_blocks(got, want, "api.select_blocks(backend='triton')")
    _, lse = api.cmp_attention(q, kc, kc, TINY, cu, backend="reference", return_lse=True)
    assert_same_blocks(api.select_blocks(q, kc, TINY, cu, backend="triton", lse=lse), want, "with the cmp lse")
    routed = {key: n for key, n in telemetry.snapshot()["counts"].items() if key[0] == "select"}
    assert [(path, n) for (_, path, _), n in routed.items()] == [("triton", 2)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nsa_attention_triton_matches_reference(interpret_env, monkeypatch, kdev, dtype):
    """q (70, 2, 24), k (70, 1, 24), v (70, 1, 16), gates (70, 2, 3): full NSA, Triton for select and
    sel (cmp and win on SDPA; FA-2 off so GPUs compare exact paths too)."""
    monkeypatch.setenv("NSA_USE_FA2", "0")
    q, k, v = qkv(70, 2, 1, 24, 16, dtype, kdev, seed=70)
    gates = torch.rand(70, 2, 3, generator=torch.Generator().manual_seed(70), dtype=torch.float64).to(kdev, dtype)
    got = nsa_ref.nsa_attention(q, k, v, gates, TINY, backend="triton")
    want = nsa_ref.nsa_attention(q, k, v, gates, TINY, backend="reference")
    assert torch.isfinite(got).all() and got.dtype == dtype
    assert rel_err(got, want) < REL_TOL[dtype]
    counts = telemetry.snapshot()["counts"]
    assert {path for (branch, path, _) in counts if branch in ("select", "sel")} >= {"triton"}
    assert not any(path == "triton" for (branch, path, _) in counts if branch in ("cmp", "win"))


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda lse: lse[:, :-1], r"lse must be \(T, Hq\)"),
        (lambda lse: lse.index_fill(0, torch.tensor([3], device=lse.device), float("nan")), "lse must be finite"),
        (lambda lse: lse.index_fill(0, torch.tensor([5], device=lse.device), float("inf")), "lse must be finite"),
        # TINY: block_len 8, stride 4, so token 11 sees 2 compressed blocks; -inf there would make
        # every p infinite.
        (lambda lse: lse.index_fill(0, torch.tensor([11], device=lse.device), float("-inf")),
         r"lse\[11, 0\] = -inf, but token 11 \(position 11\) sees 2 compressed block"),
    ],
    ids=["shape", "nan", "plus-inf", "minus-inf-on-a-seeing-row"],
)
def test_api_select_blocks_refuses_a_bad_lse(kdev, bad, match):
    """lse (T, Hq) from the cmp branch, broken: ValueError naming lse, whatever the backend."""
    q, kc = q_and_kcmp(20, 4, 2, 16, TINY, torch.float32, kdev)
    lse = reference.cmp_attention(q, kc, kc, TINY)[1]
    api.select_blocks(q, kc, TINY, backend="auto", lse=lse)  # the unbroken lse (with its -inf rows) passes
    telemetry.reset()
    for backend in ("triton", "auto"):
        with pytest.raises(ValueError, match=match):
            api.select_blocks(q, kc, TINY, backend=backend, lse=bad(lse))
    assert telemetry.snapshot()["counts"] == {}, "refused before routing"
