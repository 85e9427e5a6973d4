"""The probes' judges on the CPU, with stand-in kernels that do what fa2_contract.md says FA-2 does:
each crash/corruption symptom must come out as the right outcome class, and a correct result as ok."""
from __future__ import annotations

import pytest
import torch

from conformance.tools.probes import _common as C
from probes_testkit import probe_module


@pytest.fixture(autouse=True)
def _values_on_cpu(monkeypatch):
    monkeypatch.setattr(C, "FILL_ON_CPU", True)
    # The judges' logic at a CPU-friendly batch (the contract tests use the real 8300).
    monkeypatch.setattr(probe_module("int32_offset"), "B", 8)
    torch.manual_seed(0)


def _setup(name, provider="flash_attn", variant=None):
    mod = probe_module(name)
    return mod.build(provider, variant or mod.VARIANTS[0], "cpu")


def _args(call):
    """(q, k, v, causal, window, layout extras) from a flash_attn or aten call, FA-2 names."""
    a = call.bound()
    if call.kind == "aten":
        q, k, v, causal = a["query"], a["key"], a["value"], a["is_causal"]
        wl, wr = a.get("window_size_left"), a.get("window_size_right")
        window = (-1 if wl is None else wl, -1 if wr is None else wr)
        cu_q, cu_k, max_q, max_k = a["cum_seq_q"], a["cum_seq_k"], a["max_q"], a["max_k"]
    else:
        q, k, v, causal, window = a["q"], a["k"], a["v"], a.get("causal", False), tuple(a.get("window_size", (-1, -1)))
        cu_q, cu_k = a.get("cu_seqlens_q"), a.get("cu_seqlens_k")
        max_q, max_k = a.get("max_seqlen_q"), a.get("max_seqlen_k")
    return q, k, v, causal, window, cu_q, cu_k, max_q, max_k


def fa2_emulated(call):
    """A CPU kernel with FA-2's mask normalisation (clamped windows, causal off at max_seqlen_q == 1),
    trusting whatever cu_seqlens it is given (rows outside every sequence stay 0)."""

    def kernel(*_, **__):
        q, k, v, causal, window, cu_q, cu_k, max_q, max_k = _args(call)
        if call.layout == "dense":
            sq, sk = q.shape[1], k.shape[1]
            out = C.reference_dense(q, k, v, dtype=q.dtype,
                                    mask_fn=lambda a, b: C.fa2_mask(a, b, causal, window, sq, sk))
        else:
            out = C.reference_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), dtype=q.dtype,
                                     mask_fn=lambda a, b: C.fa2_mask(a, b, causal, window, max_q, max_k))
        return (out, None) if call.kind == "aten" else out

    return kernel


def raising(message):
    def kernel(*_, **__):
        raise RuntimeError(message)

    return kernel


@pytest.mark.parametrize("provider", C.BOTH)
def test_causal_dropped_is_seen_as_the_non_causal_result(provider):
    s = _setup("causal_dropped", provider)
    outcome, detail = C.execute(s, fa2_emulated(s.call))
    assert outcome == "silent_corruption" and "matches the NON-causal reference instead" in detail


@pytest.mark.parametrize("provider", C.BOTH)
def test_window_clamped_is_seen_as_no_window(provider):
    s = _setup("window_clamped", provider)
    outcome, detail = C.execute(s, fa2_emulated(s.call))
    assert outcome == "silent_corruption" and "no-window reference" in detail and "bad rows of out: batch 0: 0-10" in detail


def test_cu_seqlens_start_leaves_rows_unwritten():
    s = _setup("cu_seqlens_start")
    outcome, detail = C.execute(s, fa2_emulated(s.call))
    assert outcome == "silent_corruption" and "bad rows of out: 0-2" in detail


def test_cu_seqlens_decreasing_reads_the_neighbours_keys():
    s = _setup("cu_seqlens_decreasing")

    def kernel(*_, **__):  # what the broken cu_seqlens_k says, with a negative length read as no keys
        q, k, v = s.call.args[:3]
        cu_k = [0, 10, 10, 16]
        out = C.reference_varlen(q, k, v, [0, 5, 10, 16], cu_k, dtype=q.dtype)
        out[10:16] = C.reference_varlen(q[10:16], k[8:16], v[8:16], [0, 6], [0, 8], dtype=q.dtype)
        return out

    outcome, detail = C.execute(s, kernel)
    assert outcome == "silent_corruption" and "bad rows of out: 10-15" in detail


def test_max_seqlen_q_low_unwritten_rows_show_as_nan():
    s = _setup("max_seqlen_q_low")

    def kernel(*_, **__):
        out = fa2_emulated(s.call)()
        out[128:300] = float("nan")  # tiles past ceil(40 / 128) = 1 never written (poisoned memory)
        return out

    outcome, detail = C.execute(s, kernel)
    assert outcome == "silent_corruption" and "128-299" in detail and "non-finite" in detail


@pytest.mark.parametrize("name", ["cu_seqlens_start", "cu_seqlens_overrun", "cu_seqlens_decreasing", "max_seqlen_q_low",
                                  "causal_dropped", "window_clamped", "varlen_gqa_decode", "grid_limit"])
@pytest.mark.parametrize("provider", C.BOTH)
def test_a_correct_result_is_ok(name, provider):
    s = _setup(name, provider)
    mod = probe_module(name)
    intended = {
        "cu_seqlens_start": lambda: C.reference_varlen(*s.call.args[:3], [0, 5, 16], [0, 5, 16], causal=True),
        "cu_seqlens_overrun": lambda: C.reference_varlen(*s.call.args[:3], [0, 5, 16], [0, 5, 16], causal=True),
        "cu_seqlens_decreasing": lambda: C.reference_varlen(*s.call.args[:3], [0, 5, 10, 16], [0, 10, 10, 16]),
        "max_seqlen_q_low": lambda: C.reference_varlen(*s.call.args[:3], [0, 300, 340], [0, 300, 340], causal=True),
        "causal_dropped": lambda: C.reference_varlen(*s.call.args[:3], [0, 4, 10], [0, 4, 10], causal=True),
        "window_clamped": lambda: C.reference_dense(*s.call.args[:3], window=(-1, 4)),
        "varlen_gqa_decode": lambda: C.reference_varlen(*s.call.args[:3], [0, 1, 1, 2], [0, 5, 11, 18]),
        "grid_limit": lambda: C.reference_dense(*s.call.args[:3]),
    }[name]
    q = s.call.args[0]
    outcome, detail = C.execute(s, lambda *_, **__: intended().to(q.dtype))
    assert outcome == "ok", (mod.NAME, detail)


@pytest.mark.parametrize("name, message, expected", [
    ("varlen_gqa_decode", "shape '[3, 2, 2, 64]' is invalid for input of size 256", "clean_error"),
    ("head_dim_v", "v must have shape (batch_size, seqlen_k, num_heads_k, head_size)", "clean_error"),
    ("dense_empty_q", "CUDA error: invalid argument\nCompile with TORCH_USE_CUDA_DSA", "cuda_error"),
    ("grid_limit", "CUDA error: invalid configuration argument", "cuda_error"),
    ("int32_offset", "CUDA error: an illegal memory access was encountered", "cuda_error"),
    ("int32_offset", "CUDA out of memory. Tried to allocate 8.10 GiB", "skipped"),
])
def test_kernel_errors_are_classified(name, message, expected):
    s = _setup(name)
    outcome, detail = C.execute(s, raising(message))
    assert outcome == expected and message.splitlines()[0][:40] in detail


def test_heads_kv_zero_returning_at_all_is_reported_plainly():
    s = _setup("heads_kv_zero")
    assert C.execute(s, lambda *_, **__: torch.zeros(2, 16, 4, 64)) == ("ok", "returned without error")


def test_int32_offset_backward_grads_are_compared():
    s = _setup("int32_offset", "torch")
    q, k, v = s.call.args[:3]
    good = C.execute(s, lambda *_, **__: (C.reference_dense(q, k, v, dtype=q.dtype), None))
    assert good[0] == "ok", good
    for x in (q, k, v):
        x.grad = None
    bad = C.execute(s, lambda *_, **__: (C.reference_dense(q * 1.5, k, v, dtype=q.dtype), None))
    assert bad[0] == "silent_corruption" and "dq" in bad[1]


def test_bwd_garbage_grads_arch_gate_and_judge():
    mod = probe_module("bwd_garbage_grads")
    assert "not applicable on this arch (sm90)" in mod.arch_not_applicable("flash_attn", "dense", "sm90")
    assert mod.arch_not_applicable("flash_attn", "dense", "sm86") is None
    s = mod.build("flash_attn", "dense", "cpu")
    assert s.caps == "sm86"
    q, k, v = s.call.args[:3]
    assert C.execute(s, lambda *_, **__: C.reference_dense(q, k, v, dtype=q.dtype))[0] == "ok"
    for x in (q, k, v):
        x.grad = None
    outcome, detail = C.execute(s, lambda *_, **__: C.reference_dense(q, k, v * float("nan"), dtype=q.dtype))
    assert outcome == "silent_corruption" and "non-finite" in detail


def test_paged_overflow_into_the_next_row_is_caught():
    mod = probe_module("paged_kv_overflow")
    s = mod.build("flash_attn", "next_row", "cpu")
    a = s.call.bound()
    table = a["block_table"].reshape(-1).tolist()
    lengths = a["cache_seqlens"].tolist()

    def kernel(*_, **__):  # FA-2's page arithmetic: row b, page p read at flat index b * pages + p
        kc, vc, kn, vn, q = a["k_cache"], a["v_cache"], a["k"], a["v"], a["q"]
        pages = a["block_table"].shape[1]
        outs = []
        for b, n in enumerate(lengths):
            where = [(table[b * pages + p // mod.PAGE], p % mod.PAGE) for p in range(n + mod.NEW)]
            for j in range(mod.NEW):
                kc[where[n + j]] = kn[b, j]
                vc[where[n + j]] = vn[b, j]
            keys = torch.stack([kc[w] for w in where])
            vals = torch.stack([vc[w] for w in where])
            keep = C.intended_mask(mod.NEW, n + mod.NEW, True)
            outs.append(C.attend(q[b:b + 1], keys[None], vals[None], keep, mod.D ** -0.5, q.dtype)[0])
        return torch.stack(outs)

    outcome, detail = C.execute(s, kernel)
    assert outcome == "silent_corruption"
    assert "cache rows written outside the sequence's own pages: page 2 rows 0-9" in detail
