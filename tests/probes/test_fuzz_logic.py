"""The fuzzer's CPU-testable parts: case generation, tensors/layouts, verdicts, reference, classification,
report, and the worker plumbing (with a CPU stand-in kernel that kills itself like FA-2 does)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conformance.tools import fuzz
from conformance.tools.probes import _common as C


def _varlen(**kw) -> fuzz.FuzzCase:
    c = fuzz.FuzzCase(provider=kw.pop("provider", "flash_attn"), layout="varlen", dtype="fp16", hq=4, hk=2, d=64, dv=64,
                      lens_q=[5, 11], lens_k=[7, 9])
    fuzz._sync_varlen(c)
    return dataclasses.replace(c, **kw)


def _dense(**kw) -> fuzz.FuzzCase:
    base = dict(provider="flash_attn", layout="dense", dtype="fp16", hq=4, hk=2, d=64, dv=64, b=2, sq=9, sk=7)
    return fuzz.FuzzCase(**{**base, **kw})


def _rules(c, caps="sm90"):
    return [r.rule for r in fuzz.verdict(c, caps)]


# --- generation ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated():
    cases = []
    for provider in ("flash_attn", "torch"):
        @settings(max_examples=150, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(fuzz.case_strategy(provider))
        def collect(case):
            cases.append(case)

        collect()
    return [(c, _rules(c)) for c in cases]


def test_generator_makes_valid_and_invalid_cases_of_both_layouts(generated):
    assert len(generated) >= 250
    accepted = [c for c, r in generated if not r]
    rejected = [c for c, r in generated if r]
    assert len(accepted) >= 30 and len(rejected) >= 30, (len(accepted), len(rejected))
    for provider in ("flash_attn", "torch"):
        for layout in ("dense", "varlen"):
            assert any(c.provider == provider and c.layout == layout for c in accepted), (provider, layout)
    from contracts import RULES

    kinds = {RULES[rule].kind for _, rules in generated for rule in rules}
    # Which examples hypothesis draws can shift with the other tests in the session, so the
    # corruption kind (strict rules only) is asserted through the mutations that produce it.
    assert kinds >= {"clean-error", "crash", "semantics"}, kinds
    corrupting = {"cu_start", "cu_decreasing", "cu_overrun", "max_q_low"}
    assert corrupting & {m for c, _ in generated for m in c.mutations}, "no corruption mutation generated"
    mutations = {m for c, _ in generated for m in c.mutations}
    assert len(mutations) >= 8, mutations
    assert {c.stride for c, _ in generated} == {"contiguous", "heads_major", "last_dim"}
    assert len({c.d for c, _ in generated}) >= 8 and any(c.d % 8 for c, _ in generated)


def test_generated_cases_round_trip_as_json(generated):
    for c, _ in generated[:40]:
        assert fuzz.FuzzCase.from_dict(__import__("json").loads(c.to_json())) == c


# --- mutations -> rules --------------------------------------------------------------------------


SEEDS = [c for p in ("flash_attn", "torch") for c in fuzz.seed_cases(p)]


@pytest.mark.parametrize("case", SEEDS, ids=[f"{c.provider}-{c.expected_rule or 'valid'}-{i}" for i, c in enumerate(SEEDS)])
def test_seed_cases_get_their_rule(case):
    rules = _rules(case)
    if case.expected_rule is None:
        assert rules == [], case.label()
    else:
        assert case.expected_rule in rules, (case.label(), rules)


def test_seed_cases_cover_every_mutation():
    for provider in ("flash_attn", "torch"):
        covered = {m for c in fuzz.seed_cases(provider) for m in c.mutations}
        assert covered == set(fuzz.DENSE_MUTATIONS) | set(fuzz.VARLEN_MUTATIONS)


def test_valid_cases_and_layouts():
    for c in (_dense(), _varlen(), _dense(stride="heads_major"), _dense(stride="last_dim"), _dense(d=59, dv=59),
              _varlen(stride="heads_major", causal=True, window=(3, 0))):
        assert _rules(c) == [], c.label()
    call, t = fuzz.build_call(_dense(stride="last_dim"), "cpu", fill=True)
    assert t["q"].stride(-1) == 2 and t["q"].shape == (2, 9, 4, 64) and call.kind == "dense"
    _, t = fuzz.build_call(_varlen(stride="heads_major"), "cpu", fill=True)
    assert t["q"].shape == (16, 4, 64) and t["q"].stride() == (64, 16 * 64, 1)
    call, _ = fuzz.build_call(_varlen(provider="torch"), "cpu", fill=False)
    assert call.kind == "aten" and call.args[3].tolist() == [0, 5, 16]


@settings(max_examples=5, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_mutation_keeps_tensors_and_intent_consistent(data):
    for layout, names in (("varlen", fuzz.VARLEN_MUTATIONS), ("dense", fuzz.DENSE_MUTATIONS)):
        for name in names:
            c = _varlen() if layout == "varlen" else _dense()
            fuzz._mutate(c, name, data.draw, st)
            _, t = fuzz.build_call(c, "cpu", fill=False)
            if layout == "varlen":
                assert t["q"].shape[0] == sum(c.lens_q) and t["k"].shape[0] == sum(c.lens_k), name
                assert len(c.cu_q) == len(c.lens_q) + 1 == len(c.cu_k), name
            else:
                assert t["q"].shape == (c.b, c.sq, c.hq, c.d) and t["v"].shape == (c.b, c.sk, c.hk, c.dv), name
            assert c.mutations == [name]


# --- reference, masks, known gaps ----------------------------------------------------------------


def test_masks_bottom_right_causal_windows_and_fa2_normalisation():
    m = C.intended_mask(2, 4, causal=True)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    assert C.intended_mask(3, 3, False, (1, 0)).tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert C.intended_mask(16, 4, False, (-1, 4))[:8].any().item() is False
    assert C.fa2_mask(16, 4, False, (-1, 4), 16, 4).all()       # right window >= seqlen_k dropped
    assert C.fa2_window(True, (-1, -1), 1, 9) == (False, (-1, -1))   # max_q == 1: causal off
    assert C.fa2_window(False, (2, -1), 5, 4) == (False, (2, 4))     # left window: right = seqlen_k


def test_reference_matches_explicit_softmax_with_gqa_and_empty_sequences():
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 6)
    out = C.reference_varlen(q, k, v, [0, 3, 3, 7], [0, 4, 9, 9], causal=True)
    assert out.shape == (7, 4, 6) and out.dtype == torch.float64
    assert torch.equal(out[3:7], torch.zeros(4, 4, 6, dtype=torch.float64))   # sequence 2 has no keys
    h = 3  # query head 3 uses key/value head 1
    s = (q[0:3, h].double() @ k[0:4, 1].double().T) / math.sqrt(8)
    s = s.masked_fill(~C.intended_mask(3, 4, True), -math.inf)
    want = torch.softmax(s, -1) @ v[0:4, 1].double()
    torch.testing.assert_close(out[0:3, h], want)
    dense = C.reference_dense(q[None, 0:3], k[None, 0:4], v[None, 0:4], causal=True)
    torch.testing.assert_close(dense[0], out[0:3])


def test_left_only_window_rule_matches_fa2_normalisation_exactly():
    """FA2-WINDOW-LEFT-ONLY fires iff FA-2's mask (right side -> seqlen_k) differs from the intended
    one (right side unbounded), over every small dense shape and left window."""
    from contracts import dense_reasons

    for sq in range(1, 10):
        for sk in range(1, 7):
            for wl in range(0, sk + 2):
                differs = not torch.equal(C.intended_mask(sq, sk, False, (wl, -1)),
                                          C.fa2_mask(sq, sk, False, (wl, -1), sq, sk))
                q = torch.empty(1, sq, 2, 8, dtype=torch.float16, device="meta")
                k = torch.empty(1, sk, 2, 8, dtype=torch.float16, device="meta")
                fired = "FA2-WINDOW-LEFT-ONLY" in [r.rule for r in dense_reasons(q, k, k, window_size=(wl, -1))]
                assert fired == differs, f"sq={sq} sk={sk} wl={wl}: rule fired={fired}, masks differ={differs}"



# --- classification and report -------------------------------------------------------------------


@pytest.mark.parametrize("rejected, outcome, expected", [
    (False, "ok", "true_accept"),
    (False, "silent_corruption", "false_accept"),
    (False, "killed_by_signal", "false_accept"),
    (False, "clean_error", "false_accept"),
    (False, "timeout", "false_accept"),
    (True, "cuda_error", "true_reject"),
    (True, "clean_error", "true_reject"),
    (True, "ok", "false_reject"),
    (True, None, "rejected_not_run"),
    (False, None, "accepted_not_run"),
    (True, "unverified", "unverified"),
    (False, "skipped", "unverified"),
])
def test_classify(rejected, outcome, expected):
    assert fuzz.classify(rejected, outcome) == expected


def _record(cls, rules=(), provider="torch", outcome="ok"):
    return {"provider": provider, "rules": list(rules), "class": cls, "outcome": outcome, "detail": "d",
            "label": f"{provider} case {cls}"}


def test_summary_and_markdown():
    records = [_record("true_accept"), _record("false_reject", ["FA2-MAX-SEQLEN-K-LOW"]),
               _record("false_accept", outcome="silent_corruption"),
               _record("false_accept", provider="flash_attn", outcome="cuda_error"),
               _record("rejected_not_run", ["FA2-HEADS-KV-ZERO"], outcome=None)]
    s = fuzz.summarize(records, fuzz.PROFILES["ci"], "sm90", 1.0, 1)
    assert s["total"]["cases"] == 5 and s["total"]["false_accept"] == 2
    assert s["by_provider"]["torch"]["false_accept"] == 1 and s["by_provider"]["flash_attn"]["false_accept"] == 1
    assert s["false_rejects_by_rule"] == {"FA2-MAX-SEQLEN-K-LOW": {"count": 1, "examples": ["torch case false_reject"]}}
    md = fuzz.markdown(s, {"gpu": "X"})
    assert "| all | 5 | 3 | 2 | 4 | 1 | 2 | 0 | 1 | 1 | 0 |" in md
    assert "`FA2-MAX-SEQLEN-K-LOW`: 1 case(s)" in md and "torch case false_accept" in md


def test_profiles(monkeypatch):
    monkeypatch.delenv("NSA_FUZZ_PROFILE", raising=False)
    assert fuzz.profile_from_env().name == "ci" and fuzz.PROFILES["ci"].derandomize
    monkeypatch.setenv("NSA_FUZZ_PROFILE", "device")
    p = fuzz.profile_from_env()
    assert 2 * p.examples_per_provider >= 2000 and p.time_budget_s <= 300
    monkeypatch.setenv("NSA_FUZZ_PROFILE", "huge")
    with pytest.raises(ValueError, match="known profiles"):
        fuzz.profile_from_env()


# --- the worker plumbing, end to end on CPU -------------------------------------------------------


def test_worker_restarts_after_a_killed_or_hung_case_and_classifies_each():
    profile = dataclasses.replace(fuzz.PROFILES["ci"], run_crash_cases=True, case_timeout_s=3)
    cases = [_dense(), _dense(dtype="fp32"), _dense(hk=0), _varlen(max_k=3), _dense(mutations=["hang"]), _varlen()]
    summary, records = fuzz.run_fuzz(profile, ["flash_attn"], backend="fake", cases=cases, log=lambda *_: None)
    got = [(r["outcome"], r["class"]) for r in records]
    assert got == [("ok", "true_accept"), ("clean_error", "true_reject"), ("killed_by_signal", "true_reject"),
                   ("ok", "false_reject"), ("timeout", "false_accept"), ("ok", "true_accept")], got
    assert "SIGFPE" in records[2]["detail"] and "no answer within 3 s" in records[4]["detail"]
    assert summary["worker_starts"] == 3
    assert summary["false_rejects_by_rule"]["FA2-MAX-SEQLEN-K-LOW"]["count"] == 1


def test_crash_rule_cases_are_not_run_by_default():
    engine = fuzz.Engine(fuzz.PROFILES["ci"], backend="fake", log=lambda *_: None)
    engine.worker.starts = 1  # pretend it started; a crash-rule case must not need the worker at all
    rec = engine.handle(_dense(hk=0))
    assert (rec["outcome"], rec["class"], rec["detail"]) == (None, "rejected_not_run", "rejected by a crash rule (not run)")
    assert engine.worker.proc is None
