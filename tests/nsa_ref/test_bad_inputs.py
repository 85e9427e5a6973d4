"""Bad inputs give a ValueError naming the value, before any state changes (review findings)."""
import pytest
import torch

from nsa_ref import NSAConfig, NSAKVCache, compress, decode_step, nsa_attention, select_blocks

CFG = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=8)


def _step_inputs(B=2, hq=4, hkv=2, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, hq, d, generator=g, dtype=dtype), torch.randn(B, hkv, d, generator=g, dtype=dtype),
            torch.randn(B, hkv, d, generator=g, dtype=dtype), torch.rand(B, hq, 3, generator=g, dtype=dtype))


def _cache():
    return NSAKVCache.allocate(2, 8, 2, 8, CFG, dtype=torch.float64)


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v, g: (q, k, v, g * 5), r"gates must lie in \[0, 1\]"),
    (lambda q, k, v, g: (q, k, v, g.clone().fill_(float("nan"))), r"gates must lie in \[0, 1\]"),
    (lambda q, k, v, g: (q.long(), k, v, g), "floating"),
    (lambda q, k, v, g: (q, k[:, :0], v[:, :0], g), "Hkv"),
    (lambda q, k, v, g: (q, k[..., :4], v, g), "head dim Dk"),
])
def test_decode_step_refuses_bad_inputs_without_touching_the_cache(mutate, match):
    cache = _cache()
    decode_step(*_step_inputs(), cache, CFG)
    with pytest.raises(ValueError, match=match):
        decode_step(*mutate(*_step_inputs()), cache, CFG)
    assert cache.lengths == [1, 1]


def test_decode_step_refuses_a_dtype_change_before_appending():
    cache = _cache()
    decode_step(*_step_inputs(), cache, CFG)
    with pytest.raises(ValueError, match="the cache holds torch.float64, got k torch.float32"):
        decode_step(*_step_inputs(dtype=torch.float32), cache, CFG)
    assert cache.lengths == [1, 1]


def test_decode_step_refuses_a_dict_config():
    with pytest.raises(ValueError, match="NSAConfig"):
        decode_step(*_step_inputs(), _cache(), {})


def test_api_refuses_zero_head_dim_integer_keys_and_off_device_gates():
    q = torch.randn(10, 4, 0, dtype=torch.float64)
    with pytest.raises(ValueError, match="head dims must be >= 1"):
        nsa_attention(q, q[:, :2], q[:, :2], torch.rand(10, 4, 3, dtype=torch.float64), CFG)
    with pytest.raises(ValueError, match="floating"):
        compress(torch.ones(10, 2, 8, dtype=torch.int64), CFG)
    with pytest.raises(ValueError, match="floating"):
        select_blocks(torch.ones(20, 4, 8, dtype=torch.int64), torch.ones(4, 2, 8, dtype=torch.int64), CFG)
    q = torch.randn(10, 4, 8, dtype=torch.float64)
    gates = torch.rand(10, 4, 3, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="gates must be on q's device"):
        nsa_attention(q, q[:, :2], q[:, :2], gates, CFG)


def test_nsa_attention_module_refuses_an_unknown_backend_when_built():
    from nsa_ref import NSAAttention

    with pytest.raises(ValueError, match=r"unknown backend 'fa3'; use one of auto, reference, sdpa, fa2, triton"):
        NSAAttention(32, 4, 2, 8, cfg=CFG, backend="fa3")
