"""torch.compile traces nsa_attention without a graph break (CPU: the reference and SDPA paths).

Before the packing/telemetry/validate changes a CPU trace broke 6 times (auto, sdpa) and 10 times
(reference): bool() on tensors in the value checks, the telemetry lock, a max().item() in the
selected mask, the settings object built inside the trace.
"""
import pytest
import torch

from nsa_ref import NSAConfig, nsa_attention, telemetry
from nsa_ref.packing import cu_seqlens_from_lengths

CFG = NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3, n_init=1, n_local=1, window=6)


def _inputs(T=33):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(T, h, 8, generator=g) for h in (4, 2, 2)] + [torch.rand(T, 4, 3, generator=g)]


@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
def test_no_graph_break(backend):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(nsa_attention)(*_inputs(), CFG, None, backend)
    reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, f"{explained.graph_break_count} graph breaks: {reasons}"


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_no_graph_break_with_watch_settings_read_eagerly(monkeypatch, backend):
    """NSA_DEBUG_TIMING=1 and NSA_SDPA_AUDIT=1 read by an eager call stay in force for a later trace
    (the settings last read stand there): timing and audit are skipped inside the trace (the audit
    reads a number back, the timing takes a lock), so they break no graph."""
    from nsa_ref.settings import current_settings

    monkeypatch.setenv("NSA_DEBUG_TIMING", "1")
    monkeypatch.setenv("NSA_SDPA_AUDIT", "1")
    assert current_settings().debug_timing and current_settings().sdpa_audit
    torch._dynamo.reset()
    explained = torch._dynamo.explain(nsa_attention)(*_inputs(), CFG, None, backend)
    monkeypatch.undo()
    current_settings()  # the next test's traces read the defaults again
    assert explained.graph_break_count == 0, [r.reason.splitlines()[0] for r in explained.break_reasons]


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    q, k, v, gates = _inputs()
    compiled = torch.compile(lambda *x: nsa_attention(*x, CFG, backend=backend), fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v, gates), nsa_attention(q, k, v, gates, CFG, backend=backend))


def test_fullgraph_with_packed_sequences_and_host_metadata():
    """Packed: the offsets come from cu_seqlens_cpu, so the trace reads nothing from the device."""
    torch._dynamo.reset()
    lengths = [20, 0, 13]
    cu = cu_seqlens_from_lengths(lengths)
    q, k, v, gates = _inputs(sum(lengths))
    host = cu.tolist()
    compiled = torch.compile(lambda *x: nsa_attention(*x, CFG, cu, "sdpa", cu_seqlens_cpu=host),
                             fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v, gates), nsa_attention(q, k, v, gates, CFG, cu, backend="sdpa"))


def test_compiled_gate_check_is_a_device_assert():
    torch._dynamo.reset()
    q, k, v, gates = _inputs()
    compiled = torch.compile(lambda *x: nsa_attention(*x, CFG, backend="sdpa"), fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match=r"gates must lie in \[0, 1\]"):
        compiled(q, k, v, gates + 1.0)
    telemetry.reset()


def test_fullgraph_takes_the_eager_route_decisions(monkeypatch):
    """Under torch.compile the router answers from the decisions made eagerly for the same call
    (on the CUDA path dynamo cannot trace the backends' checks): with decide() disabled during the
    trace, a compile after one eager call still succeeds and matches."""
    from nsa_ref import router

    torch._dynamo.reset()
    q, k, v, gates = _inputs()
    want = nsa_attention(q, k, v, gates, CFG)  # eager: every branch decided and remembered

    def no_decide(*args, **kwargs):
        raise AssertionError("decide() ran inside the trace although an eager decision existed")

    monkeypatch.setattr(router, "decide", no_decide)
    compiled = torch.compile(lambda *x: nsa_attention(*x, CFG), fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v, gates), want)


def test_eager_calls_still_decide_every_time(monkeypatch):
    """Remembering is for the trace only: an eager call re-decides (settings read per call)."""
    from nsa_ref import router

    q, k, v, gates = _inputs()
    nsa_attention(q, k, v, gates, CFG)
    calls = []
    real = router.decide
    monkeypatch.setattr(router, "decide", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    nsa_attention(q, k, v, gates, CFG)
    assert sorted(calls) == ["cmp", "sel", "select", "win"]
