"""GPU parity of the FA-2 fast paths (both providers) against the fp64 NSA reference.

Rule: max|x - ref| <= m * max|base - ref| + c (tolerances.yaml), with ref = nsa_ref.reference in
fp64 and base = the same reference in the input dtype. Set NSA_REQUIRE_PROVIDERS=flash_attn,torch
to turn a missing provider into a failure instead of a skip (the device run does).
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

PROVIDERS = ["flash_attn", "torch"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TS = [1, 31, 32, 97, 1025, 4099]
GS = [1, 4, 16]
HEAD_DIMS = [(64, 64), (96, 96), (128, 128), (192, 192), (192, 128)]
HKV = 2
_RESULTS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _parity_report():
    """With NSA_PARITY_REPORT=path.json, write every checked verdict there (for artifacts/)."""
    yield
    path = os.environ.get("NSA_PARITY_REPORT")
    if path and _RESULTS:
        import json

        with open(path, "w") as fh:
            json.dump(_RESULTS, fh, indent=1)


@pytest.fixture(params=PROVIDERS)
def provider(request):
    from nsa_ref.fa2 import get_provider

    prov = get_provider(request.param)
    if not prov.is_available():
        required = os.environ.get("NSA_REQUIRE_PROVIDERS", "").split(",")
        if request.param in required:
            pytest.fail(f"provider {request.param} is required (NSA_REQUIRE_PROVIDERS) but not usable")
        pytest.skip(f"FA-2 provider {request.param} not usable here")
    return prov


def _inputs(T, G, dk, dv, dtype, seed=0, cu=None, requires_grad=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hq = G * HKV

    def rnd(*shape):
        x = torch.randn(*shape, device="cuda", generator=gen, dtype=torch.float64).to(dtype)
        return x.requires_grad_(requires_grad)

    return rnd(T, hq, dk), rnd(T, HKV, dk), rnd(T, HKV, dv)


def _three(fn, tensors, dtype):
    """Run fn on the inputs in fp64 (ref), and in `dtype` (base)."""
    ref = fn(*(t.detach().double().requires_grad_(t.requires_grad) for t in tensors))
    base = fn(*(t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors))
    return ref, base


def _check(quantity, dtype, x, ref, base, what):
    from contracts.tolerances import lookup

    assert torch.isfinite(x).all(), f"{what}: non-finite values in the FA-2 result"
    verdict = lookup(dtype, quantity).check(x, ref, base)
    _RESULTS.append({"case": what, "quantity": quantity, "dtype": str(dtype).replace("torch.", ""),
                     "err": verdict.err, "base_err": verdict.base_err, "allowed": verdict.allowed,
                     "passed": bool(verdict)})
    assert verdict, f"{what}: {verdict}"


def _cfg():
    from nsa_ref import NSAConfig

    return NSAConfig()


def _win_case(provider, T, G, dk, dv, dtype, cu=None):
    from nsa_ref import fa2, reference

    cfg = _cfg()
    q, k, v = _inputs(T, G, dk, dv, dtype)
    out = fa2.win_attention(q, k, v, cfg, cu, provider=provider)
    ref, base = _three(lambda a, b, c: reference.win_attention(a, b, c, cfg, cu), (q, k, v), dtype)
    _check("out", dtype, out, ref, base, f"win {provider.name} T={T} G={G} d={dk}/{dv}")


def _cmp_case(provider, T, G, dk, dv, dtype, cu=None):
    from nsa_ref import compress, fa2, reference

    cfg = _cfg()
    q, k, v = _inputs(T, G, dk, dv, dtype)
    k_cmp, _ = compress(k, cfg, cu)
    v_cmp, _ = compress(v, cfg, cu)
    out, lse = fa2.cmp_attention(q, k_cmp, v_cmp, cfg, cu, provider=provider)
    ref, base = _three(lambda a, b, c: reference.cmp_attention(a, b, c, cfg, cu), (q, k_cmp, v_cmp), dtype)
    what = f"cmp {provider.name} T={T} G={G} d={dk}/{dv}"
    _check("out", dtype, out, ref[0], base[0], what)
    empty = torch.isinf(ref[1])
    assert torch.equal(torch.isinf(lse), empty), f"{what}: lse -inf rows differ from the reference"
    assert (out[empty.any(-1)] == 0).all(), f"{what}: rows with no visible block must be exactly 0"
    _check("lse", dtype, lse[~empty], ref[1][~empty].double(), base[1][~empty].double(), what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", GS)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("branch", ["cmp", "win"])
def test_branch_parity(provider, branch, T, G, dtype):
    case = _cmp_case if branch == "cmp" else _win_case
    case(provider, T, G, 128, 128, DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=lambda d: f"dk{d[0]}-dv{d[1]}")
@pytest.mark.parametrize("branch", ["cmp", "win"])
def test_head_dims(provider, branch, dims, dtype):
    case = _cmp_case if branch == "cmp" else _win_case
    case(provider, 1025, 4, dims[0], dims[1], DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("branch", ["cmp", "win"])
def test_packed_sequences_with_empty_ones(provider, branch, dtype):
    lengths = [0, 97, 1025, 0, 31, 600]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    case = _cmp_case if branch == "cmp" else _win_case
    case(provider, sum(lengths), 4, 128, 128, DTYPES[dtype], cu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [97, 1025])
@pytest.mark.parametrize("branch", ["cmp", "win"])
def test_gradients(provider, branch, T, dtype):
    from nsa_ref import compress, fa2, reference

    dt = DTYPES[dtype]
    cfg = _cfg()
    q, k, v = _inputs(T, 4, 128, 128, dt, requires_grad=True)
    if branch == "cmp":
        k = compress(k.detach(), cfg)[0].requires_grad_()
        v = compress(v.detach(), cfg)[0].requires_grad_()

        def fast(a, b, c):
            return fa2.cmp_attention(a, b, c, cfg, provider=provider)[0]

        def slow(a, b, c):
            return reference.cmp_attention(a, b, c, cfg)[0]
    else:
        def fast(a, b, c):
            return fa2.win_attention(a, b, c, cfg, provider=provider)

        def slow(a, b, c):
            return reference.win_attention(a, b, c, cfg)
    gen = torch.Generator(device="cuda").manual_seed(1)
    dout = torch.randn(T, q.shape[1], v.shape[-1], device="cuda", generator=gen, dtype=torch.float64)

    def grads(fn, dtype_):
        ins = [t.detach().to(dtype_).requires_grad_() for t in (q, k, v)]
        fn(*ins).backward(dout.to(dtype_))
        return [t.grad for t in ins]

    got, ref, base = grads(fast, dt), grads(slow, torch.float64), grads(slow, dt)
    for name, x, r, b in zip(("dq", "dk", "dv"), got, ref, base):
        _check(name, dt, x, r, b, f"{branch} grad {name} {provider.name} T={T}")


#: The calls nsa_attention makes to the router, one per branch (select = the block selection).
NSA_BRANCHES = ("cmp", "select", "sel", "win")
#: Shapes of test_full_nsa_through_router: G = 4 query heads per KV head, head dim 128.
ROUTER_G, ROUTER_D = 4, 128


def router_env(monkeypatch, provider_name: str) -> None:
    """The environment test_full_nsa_through_router routes under: one FA-2 provider, and no
    minimum length (the tuned thresholds would keep its short sequences on SDPA)."""
    monkeypatch.setenv("NSA_FA2_PROVIDER", provider_name)
    monkeypatch.setenv("NSA_FA2_MIN_LEN_WIN", "0")
    monkeypatch.setenv("NSA_FA2_MIN_LEN_CMP", "0")


def expected_nsa_paths(device, dtype, T: int, settings=None) -> set[tuple[str, str]]:
    """{(branch, path)} the router's policy predicts for test_full_nsa_through_router's
    nsa_attention(backend='auto') call: q (T, ROUTER_G * HKV, ROUTER_D), k, v (T, HKV, ROUTER_D)
    in ``dtype``, default NSAConfig, on a device with facts ``device`` (nsa_ref.router.DeviceFacts).

    Pure: needs no GPU (tests/routing/test_route_policy.py checks it on a faked H200).
    """
    from nsa_ref.router import expected_path

    return {(branch, expected_path(branch, "auto", device=device, dtype=dtype, head_dims=(ROUTER_D, ROUTER_D),
                                   tokens=T, heads=(ROUTER_G * HKV, HKV), cfg=_cfg(), settings=settings))
            for branch in NSA_BRANCHES}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [97, 1025])
def test_full_nsa_through_router(provider, T, dtype, monkeypatch):
    """nsa_attention(backend='auto') vs the fp64 reference, each branch where the router sends it.

    The paths taken (telemetry) must be the ones the router's policy predicts for this device
    (``expected_nsa_paths``: FA-2 for cmp and win, Triton for sel and select where it can run),
    and cmp and win must be on FA-2: this test is about FA-2 parity.
    With the default config every block is selectable for T <= 1024 (16 picks), so selection
    cannot flip between precisions and the comparison is exact in its rule.
    """
    from nsa_ref import nsa_attention, telemetry
    from nsa_ref.router import DeviceFacts

    router_env(monkeypatch, provider.name)
    dt = DTYPES[dtype]
    cfg = _cfg()
    q, k, v = _inputs(T, ROUTER_G, ROUTER_D, ROUTER_D, dt)
    facts = DeviceFacts.of(q.device, dt)
    expected = expected_nsa_paths(facts, dt, T)
    assert {("cmp", "fa2"), ("win", "fa2")} <= expected, (
        f"the router's policy keeps cmp/win off FA-2 on this device ({facts}): {sorted(expected)}")
    gen = torch.Generator(device="cuda").manual_seed(2)
    gates = torch.rand(T, q.shape[1], 3, device="cuda", generator=gen, dtype=torch.float64).to(dt)
    telemetry.reset()
    out = nsa_attention(q, k, v, gates, cfg, backend="auto")
    paths = {(b, p) for (b, p, _), n in telemetry.snapshot()["counts"].items()}
    assert paths == expected, (
        f"paths taken {sorted(paths)} differ from the router's policy {sorted(expected)} for {facts}; "
        f"reasons: {telemetry.snapshot()['counts']}")
    ref, base = _three(lambda a, b, c, g: nsa_attention(a, b, c, g, cfg, backend="reference"), (q, k, v, gates), dt)
    _check("out", dt, out, ref, base, f"nsa {provider.name} T={T}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [97, 1025, 4099])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_sel_gather_parity(provider, T, G, dtype):
    """The opt-in FA-2 gather path for sel, on selections computed by the fp64 reference."""
    from nsa_ref import compress, fa2, reference, select_blocks

    dt = DTYPES[dtype]
    cfg = _cfg()
    q, k, v = _inputs(T, G, 128, 128, dt)
    idx = select_blocks(q.double(), compress(k.double(), cfg)[0], cfg)
    out = fa2.sel_attention(q, k, v, idx, cfg, provider=provider)
    ref, base = _three(lambda a, b, c: reference.sel_attention(a, b, c, idx, cfg), (q, k, v), dt)
    _check("out", dt, out, ref, base, f"sel {provider.name} T={T} G={G}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_equals_prefill_on_gpu(provider, dtype, monkeypatch):
    """One token at a time through NSAKVCache (``decode_step``, backend "auto": FA-2 kvcache /
    Triton where they run) on the GPU vs the FA-2 prefill of the same sequences; both within the
    tolerance rule of the fp64 reference (T <= 1024: selection cannot flip)."""
    from nsa_ref import NSAKVCache, decode_step, nsa_attention

    monkeypatch.setenv("NSA_FA2_PROVIDER", provider.name)
    dt = DTYPES[dtype]
    cfg = _cfg()
    B, T = 2, 300
    q, k, v = _inputs(B * T, 4, 128, 128, dt)
    gen = torch.Generator(device="cuda").manual_seed(3)
    gates = torch.rand(B * T, q.shape[1], 3, device="cuda", generator=gen, dtype=torch.float64).to(dt)
    cu = torch.tensor([0, T, 2 * T], dtype=torch.int32, device="cuda")
    prefill = nsa_attention(q, k, v, gates, cfg, cu, backend="fa2")
    cache = NSAKVCache.allocate(B, T, HKV, 128, cfg, dtype=dt, device="cuda")
    decoded = torch.empty_like(prefill)
    for t in range(T):
        rows = [t, T + t]
        decoded[rows] = decode_step(q[rows], k[rows], v[rows], gates[rows], cache, cfg)
    ref, base = _three(lambda a, b, c, g: nsa_attention(a, b, c, g, cfg, cu, backend="reference"),
                       (q, k, v, gates), dt)
    _check("out", dt, prefill, ref, base, f"prefill {provider.name} B={B} T={T}")
    _check("out", dt, decoded, ref, base, f"decode {provider.name} B={B} T={T}")
