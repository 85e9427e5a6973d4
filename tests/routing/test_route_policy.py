"""The router's policy without a GPU: ``router.expected_path`` on ``DeviceFacts`` vs ``router.choose``.

Pins: for faked CUDA devices (sm90 / sm80 / sm75, Triton on / off, an FA-2 provider present /
absent) ``expected_path`` predicts what ``choose`` does (the path, or the same exception and
message) for every branch and backend; and the route expectations of the GPU test
conformance/test_gpu_fa2.py::test_full_nsa_through_router (``expected_nsa_paths``) are what the
router really does for nsa_attention's calls on an H200-like device, so a routing change the GPU
test would disagree with fails here, on CPU.

The fake (``fake_cuda``) replaces only what the router reads of the device: ``router._on_cuda``,
``router._device_caps``, ``router._gpu_name``, ``torch.cuda.get_device_capability`` and
``nsa_ref.fa2.resolve_provider``; Triton's own verdict (``unavailable_reason``) still runs, on a
stand-in that says "cuda", so its sm80 rule is the real one.
"""
from __future__ import annotations

import types

import pytest
import torch

from nsa_ref import router, telemetry, triton_kernels
from nsa_ref.config import NSAConfig
from nsa_ref.fa2 import get_provider
from nsa_ref.settings import NSASettings, current_settings

CFG = NSAConfig()
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
HEAD_DIMS = [(128, 128), (192, 128), (320, 320)]
TOKENS = [97, 4099]
BACKENDS = router.BACKENDS
H200 = dict(capability=(9, 0), name="NVIDIA H200")
DEVICES = {
    "sm90-H200": H200,
    "sm80-A100": dict(capability=(8, 0), name="NVIDIA A100-SXM4-80GB"),
    "sm75-T4": dict(capability=(7, 5), name="Tesla T4"),
}


@pytest.fixture
def fake_cuda(monkeypatch):
    """fake_cuda(capability, name, fa2_present) -> router.DeviceFacts of that faked GPU for a dtype.

    After the call, every tensor counts as on that GPU for the router; FA-2 resolves to the
    provider NSA_FA2_PROVIDER names ("auto": flash_attn), or to none when ``fa2_present`` is False.
    """
    real_unavailable = triton_kernels.unavailable_reason

    def install(capability, name, fa2_present=True):
        from contracts import DeviceCaps

        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(router, "_on_cuda", lambda q: True)
        monkeypatch.setattr(router, "_device_caps", lambda q: DeviceCaps(major=capability[0], minor=capability[1]))
        monkeypatch.setattr(router, "_gpu_name", lambda device: name)
        monkeypatch.setattr(
            "nsa_ref.fa2.resolve_provider",
            lambda pref: get_provider("flash_attn" if pref == "auto" else pref) if fa2_present else None,
        )
        on_gpu = lambda x: types.SimpleNamespace(device=torch.device("cuda", 0), dtype=x.dtype)  # noqa: E731
        monkeypatch.setattr(triton_kernels, "unavailable_reason", lambda x: real_unavailable(on_gpu(x)))
        return lambda dtype, settings=None: router.DeviceFacts.of(torch.device("cuda", 0), dtype, settings)

    return install


def _meta(T, h, d, dtype):
    """A (T, h, d) stand-in: the router reads shapes and dtype only."""
    return torch.empty(T, h, d, dtype=dtype, device="meta")


def _outcome(fn):
    """("path", path) or ("raises", exception type name, message), to compare two routers."""
    try:
        result = fn()
    except (router.FA2Unavailable, router.TritonUnavailable) as exc:
        return ("raises", type(exc).__name__, str(exc))
    return ("path", result.path if isinstance(result, router.Route) else result)


def _both(branch, backend, facts, dtype, dims, T, settings, heads=(8, 2)):
    """(choose's outcome on meta tensors, expected_path's outcome on the facts) for one call."""
    dk, dv = dims if branch != "select" else (dims[0], dims[0])
    q, k, v = _meta(T, heads[0], dk, dtype), _meta(T, heads[1], dk, dtype), _meta(T, heads[1], dv, dtype)
    got = _outcome(lambda: router.choose(branch, backend, q=q, k=k, v=v if branch != "select" else k,
                                         cfg=CFG, settings=settings))
    want = _outcome(lambda: router.expected_path(branch, backend, device=facts, dtype=dtype, head_dims=(dk, dv),
                                                 tokens=T, heads=heads, cfg=CFG, settings=settings))
    return got, want


@pytest.mark.parametrize("fa2_present", [True, False], ids=["fa2", "no-fa2"])
@pytest.mark.parametrize("use_triton", [True, False], ids=["triton-on", "triton-off"])
@pytest.mark.parametrize("device", DEVICES)
def test_policy_agrees_with_choose_on_faked_gpus(fake_cuda, device, use_triton, fa2_present):
    """Every branch x backend x dtype x head dims x T (short: below the H200/A100 thresholds;
    long: above) on the faked GPU: ``expected_path`` == ``choose``, exceptions included."""
    facts_of = fake_cuda(**DEVICES[device], fa2_present=fa2_present)
    settings = NSASettings(use_triton=use_triton)
    disagree = []
    for dtype in DTYPES:
        facts = facts_of(dtype, settings)
        assert facts.capability == DEVICES[device]["capability"] and facts.device_type == "cuda"
        for dims in HEAD_DIMS:
            for T in TOKENS:
                for branch in router.BRANCHES:
                    for backend in BACKENDS:
                        got, want = _both(branch, backend, facts, dtype, dims, T, settings)
                        if got != want:
                            disagree.append(f"{branch}/{backend} {dtype} d={dims} T={T}: choose {got}, policy {want}")
    assert not disagree, f"{device}: {len(disagree)} disagreements, first: " + "\n".join(disagree[:5])


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_policy_agrees_with_choose_on_contract_limits(fake_cuda, training):
    """Shape-driven rules: GQA groups that do not divide, and the backward's int32 offsets
    (262144 tokens x 64 heads x d 128, FA2-INT32-OFFSET only when a backward follows)."""
    facts = fake_cuda(**H200)(torch.bfloat16)
    s = NSASettings(fa2_min_len_win=0, fa2_min_len_cmp=0)
    for T, heads in [(97, (8, 2)), (262144, (64, 4))]:
        q = torch.empty(T, heads[0], 128, dtype=torch.bfloat16, device="meta", requires_grad=training)
        k = torch.empty(T, heads[1], 128, dtype=torch.bfloat16, device="meta")
        for branch in ("cmp", "win"):
            got = router.choose(branch, "auto", q=q, k=k, v=k, cfg=CFG, settings=s)
            want = router.expected_path(branch, "auto", device=facts, dtype=torch.bfloat16, head_dims=(128, 128),
                                        tokens=T, heads=heads, cfg=CFG, requires_grad=training, settings=s)
            assert got.path == want, (branch, T, heads, got)
    big = router.expected_path("win", "auto", device=facts, dtype=torch.bfloat16, head_dims=(128, 128),
                               tokens=262144, heads=(64, 4), cfg=CFG, requires_grad=training, settings=s)
    assert big == ("sdpa" if training else "fa2")


@pytest.mark.parametrize("device, sel, select, cmp", [
    ("sm90-H200", "triton", "triton", "fa2"),
    ("sm80-A100", "triton", "triton", "fa2"),
    ("sm75-T4", "sdpa", "torch", "sdpa"),  # no Triton below sm80, FA2-ARCH refuses FA-2
])
def test_policy_reads_the_capability(fake_cuda, device, sel, select, cmp):
    """The facts matter: bf16, d 128, long T, defaults -> Triton for sel/select from sm80 on."""
    facts = fake_cuda(**DEVICES[device])(torch.bfloat16)
    kw = dict(device=facts, dtype=torch.bfloat16, head_dims=(128, 128), tokens=8192, heads=(8, 2), cfg=CFG,
              settings=NSASettings())
    got = {b: router.expected_path(b, "auto", **kw) for b in ("sel", "select", "cmp")}
    assert got == {"sel": sel, "select": select, "cmp": cmp}


def test_policy_off_cuda_matches_choose_on_cpu_tensors():
    """No fake: CPU facts and CPU tensors (whatever TRITON_INTERPRET says) route the same."""
    s = current_settings()
    for dtype in (torch.float32, torch.bfloat16):
        facts = router.DeviceFacts.of("cpu", dtype, s)
        assert facts.device_type == "cpu" and facts.capability is None
        q = torch.zeros(40, 4, 16, dtype=dtype)
        k = torch.zeros(40, 2, 16, dtype=dtype)
        for branch in router.BRANCHES:
            for backend in BACKENDS:
                got = _outcome(lambda: router.choose(branch, backend, q=q, k=k, v=k, cfg=CFG, settings=s))
                want = _outcome(lambda: router.expected_path(branch, backend, device=facts, dtype=dtype,
                                                             head_dims=(16, 16), tokens=40, heads=(4, 2), cfg=CFG,
                                                             settings=s))
                assert got == want, (branch, backend, dtype)


# --- the GPU test's expectations --------------------------------------------------------------


@pytest.mark.parametrize("T", [97, 1025])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("provider", ["flash_attn", "torch"])
def test_gpu_router_test_expects_what_the_router_does_on_an_h200(fake_cuda, monkeypatch, provider, dtype, T):
    """conformance/test_gpu_fa2.py::test_full_nsa_through_router on a faked H200 (sm90, head dim
    128): its expected paths (``expected_nsa_paths``) equal the paths ``choose`` records for the
    calls nsa_attention really makes, and keep cmp and win on FA-2 (that test's own check).

    choose decides (and records) as on the H200; the test then runs the selection on CPU (torch
    scoring) and stands in zeros of the right shapes for cmp, sel and win (their values do not
    matter here, only the calls nsa_attention makes to the router).
    """
    from conformance import test_gpu_fa2 as gpu_test
    from nsa_ref import api, nsa_attention

    gpu_test.router_env(monkeypatch, provider)
    facts = fake_cuda(**H200)(dtype)
    expected = gpu_test.expected_nsa_paths(facts, dtype, T)
    assert {("cmp", "fa2"), ("win", "fa2")} <= expected, expected

    real_choose = router.choose

    def decide_then_run_on_cpu(branch, backend="auto", **kw):
        real_choose(branch, backend, **kw)
        return router.Route(branch, "torch" if branch == "select" else "sdpa", "run on CPU by the test")

    def zeros(q, k, v, *rest):
        """(T, Hq, Dv) zeros: a branch output."""
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])

    monkeypatch.setattr(api.router, "choose", decide_then_run_on_cpu)
    monkeypatch.setattr("nsa_ref.sdpa.cmp_attention",
                        lambda q, k, v, *rest: (zeros(q, k, v), q.new_zeros(q.shape[:2], dtype=torch.float32)))
    monkeypatch.setattr("nsa_ref.sdpa.sel_attention", zeros)
    monkeypatch.setattr("nsa_ref.sdpa.win_attention", zeros)
    hq, hkv, d = gpu_test.ROUTER_G * gpu_test.HKV, gpu_test.HKV, gpu_test.ROUTER_D
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, h, d, generator=gen).to(dtype) for h in (hq, hkv, hkv))
    gates = torch.rand(T, hq, 3, generator=gen).to(dtype)
    nsa_attention(q, k, v, gates, gpu_test._cfg(), backend="auto")
    paths = {(b, p) for (b, p, _) in telemetry.snapshot()["counts"]}
    assert paths == expected, f"router on a faked H200: {sorted(paths)}; GPU test expects {sorted(expected)}"
