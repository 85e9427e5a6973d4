"""The router: one decision per branch call, with its reason counted in telemetry."""
import pytest
import torch

from nsa_ref import router, telemetry
from nsa_ref.fa2 import thresholds
from nsa_ref.config import NSAConfig
from nsa_ref.fa2.emulate import EmulatedFA2
from nsa_ref.settings import NSASettings, current_settings

CFG = NSAConfig()


def _qkv(T=64, hq=8, hkv=2, d=64, dtype=torch.bfloat16):
    return torch.zeros(T, hq, d, dtype=dtype), torch.zeros(T, hkv, d, dtype=dtype), torch.zeros(T, hkv, d, dtype=dtype)


@pytest.fixture
def gpu_like(monkeypatch):
    """Pretend the inputs are on a GPU with a usable provider, to reach the later rules on CPU."""
    monkeypatch.setattr(router, "_on_cuda", lambda q: True)
    monkeypatch.setattr("nsa_ref.fa2.resolve_provider", lambda pref: EmulatedFA2())


def test_cpu_inputs_fall_back_to_sdpa_and_say_why():
    q, k, v = _qkv()
    route = router.choose("win", "auto", q=q, k=k, v=v, cfg=CFG)
    assert route.path == "sdpa" and "cpu" in route.reason
    assert telemetry.snapshot()["counts"] == {("win", "sdpa", route.reason): 1}


def test_explicit_fa2_on_cpu_raises_with_the_reason():
    q, k, v = _qkv()
    with pytest.raises(router.FA2Unavailable, match="FA-2 needs CUDA"):
        router.choose("cmp", "fa2", q=q, k=k, v=v, cfg=CFG)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_requested_backend_is_taken(backend):
    q, k, v = _qkv()
    assert router.choose("sel", backend, q=q, k=k, v=v, cfg=CFG).path == backend


def test_unknown_branch_and_backend_are_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown branch"):
        router.choose("full", "auto", q=q, k=k, v=v, cfg=CFG)
    with pytest.raises(ValueError, match="unknown backend"):
        router.choose("win", "cuda", q=q, k=k, v=v, cfg=CFG)


def test_fa2_taken_when_enabled_legal_and_long_enough(gpu_like):
    q, k, v = _qkv()
    route = router.choose("win", "auto", q=q, k=k, v=v, cfg=CFG, settings=NSASettings())
    assert route.path == "fa2" and route.provider is not None


@pytest.mark.parametrize("flag,branch", [("use_fa2", "win"), ("use_fa2_win", "win"), ("use_fa2_cmp", "cmp")])
def test_flags_disable_fa2(gpu_like, flag, branch):
    q, k, v = _qkv()
    route = router.choose(branch, "auto", q=q, k=k, v=v, cfg=CFG, settings=NSASettings(**{flag: False}))
    assert route.path == "sdpa" and f"NSA_{flag.upper()}=0" in route.reason


def test_min_length_from_flag(gpu_like):
    q, k, v = _qkv(T=64)
    s = NSASettings(fa2_min_len_win=65)
    route = router.choose("win", "auto", q=q, k=k, v=v, cfg=CFG, settings=s)
    assert route.path == "sdpa" and "NSA_FA2_MIN_LEN_WIN" in route.reason
    # an explicit fa2 request ignores the speed heuristic
    assert router.choose("win", "fa2", q=q, k=k, v=v, cfg=CFG, settings=s).path == "fa2"


def test_contract_violation_routes_to_sdpa_naming_the_rule(gpu_like):
    q, k, v = _qkv(d=320)  # head dim above FA-2's 256
    route = router.choose("win", "auto", q=q, k=k, v=v, cfg=CFG, settings=NSASettings())
    assert route.path == "sdpa" and route.reason.startswith("contract: FA2-")
    off = router.choose("win", "auto", q=q, k=k, v=v, cfg=CFG, settings=NSASettings(fa2_contracts="off"))
    assert off.path == "fa2"


def test_sel_fa2_gather_is_default_and_can_be_switched_off(gpu_like):
    q, k, v = _qkv()
    on = router.choose("sel", "auto", q=q, k=k, v=v, cfg=CFG, settings=NSASettings())
    assert on.path == "fa2"
    off = router.choose("sel", "auto", q=q, k=k, v=v, cfg=CFG, settings=NSASettings(use_fa2_sel=False))
    assert off.path == "sdpa" and "NSA_USE_FA2_SEL=0" in off.reason


def test_settings_read_from_environment(monkeypatch):
    monkeypatch.setenv("NSA_USE_FA2_WIN", "0")
    monkeypatch.setenv("NSA_FA2_MIN_LEN_CMP", "2048")
    s = current_settings()
    assert s.use_fa2_win is False and s.fa2_min_len_cmp == 2048
    monkeypatch.setenv("NSA_FA2_CONTRACTS", "sometimes")
    with pytest.raises(ValueError, match="fa2_contracts"):
        current_settings()


def test_thresholds_file_default_applies_to_unlisted_gpus(monkeypatch):
    table = {"default": {"win": 7}, "gpus": {"H100": {"win": {64: 11, 128: 99}}}}
    monkeypatch.setattr(thresholds, "_THRESHOLDS", table)
    monkeypatch.setattr(router.torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    assert thresholds.default_min_len("win", torch.device("cuda"), 128) == 7
    monkeypatch.setattr(router.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert thresholds.default_min_len("win", torch.device("cuda"), 128) == 99
    assert thresholds.default_min_len("win", torch.device("cuda"), 32) == 11  # next listed dim up
    assert thresholds.default_min_len("win", torch.device("cuda"), 256) == 99  # above all: the largest


def test_committed_thresholds_file_parses_and_lists_the_measured_gpus():
    table = thresholds.load_thresholds()
    assert set(table["default"]) == {"win", "cmp"}
    assert any("H100" in gpu for gpu in table["gpus"]), table["gpus"].keys()


def test_telemetry_fractions():
    telemetry.record("win", "fa2", "ok")
    telemetry.record("win", "fa2", "ok")
    telemetry.record("win", "sdpa", "short")
    snap = telemetry.snapshot()
    assert snap["path_fractions"][("win", "fa2")] == pytest.approx(2 / 3)
    telemetry.reset()
    assert telemetry.snapshot()["counts"] == {}


def test_explicit_fa2_ignores_the_auto_switches(gpu_like):
    q, k, v = _qkv()
    s = NSASettings(use_fa2=False, use_fa2_sel=False)  # auto is off, explicit still runs
    assert router.choose("sel", "fa2", q=q, k=k, v=v, cfg=CFG, settings=s).path == "fa2"
    assert router.choose("sel", "auto", q=q, k=k, v=v, cfg=CFG, settings=s).path == "sdpa"


def test_backward_only_rules_are_checked_when_training(gpu_like):
    # 262144 tokens x Hq 64 x d 128: the backward's int32 offsets overflow (FA2-INT32-OFFSET).
    q = torch.empty(262144, 64, 128, dtype=torch.bfloat16, device="meta")
    k = v = torch.empty(262144, 4, 128, dtype=torch.bfloat16, device="meta")
    s = NSASettings(fa2_min_len_win=0)
    assert router.choose("win", "auto", q=q, k=k, v=v, cfg=CFG, settings=s).path == "fa2"
    q.requires_grad_()
    route = router.choose("win", "auto", q=q, k=k, v=v, cfg=CFG, settings=s)
    assert route.path == "sdpa" and "FA2-INT32-OFFSET" in route.reason


def test_decode_asks_the_router_as_prefill_does():
    """backend='fa2' on CPU: prefill's sel branch raises FA2Unavailable, and so does decode_step,
    before the cache changes (it used to run the reference math silently)."""
    from nsa_ref import NSAKVCache, decode_step, nsa_attention

    cfg = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=6)
    q, k, v = _qkv(T=2, hq=4, hkv=2, d=8, dtype=torch.float32)
    gates = torch.rand(2, 4, 3)
    with pytest.raises(router.FA2Unavailable, match="FA-2 needs CUDA"):
        nsa_attention(q, k, v, gates, cfg, backend="fa2")
    cache = NSAKVCache.allocate(2, 4, 2, 8, cfg)
    with pytest.raises(router.FA2Unavailable, match="FA-2 needs CUDA"):
        decode_step(q, k, v, gates, cache, cfg, backend="fa2")
    assert cache.lengths == [0, 0]
    assert decode_step(q, k, v, gates, cache, cfg, backend="sdpa").shape == (2, 4, 8)
