"""conformance/tools/device/contract_fuzz.py on the CPU (--dry-run: a stand-in kernel): drawing calls over
every entry point, verdicts per broken thing, the reference, classification, worker restarts, outputs."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("contract_fuzz", ROOT / "conformance" / "tools" / "device" / "contract_fuzz.py")
CF = importlib.util.module_from_spec(_spec)
sys.modules["contract_fuzz"] = CF  # dataclasses look their module up there
_spec.loader.exec_module(CF)


def test_calls_cover_every_entry_point_and_are_seeded():
    a = CF.draw_calls(450, 7, ["flash_attn", "torch"])
    b = CF.draw_calls(450, 7, ["flash_attn", "torch"])
    assert json.dumps([dataclasses.asdict(x) for x in a]) == json.dumps([dataclasses.asdict(x) for x in b])  # NaN scales
    assert {x.entry for x in a} == set(CF.FLASH_ENTRIES) | set(CF.TORCH_ENTRIES)
    kv = [x for x in a if x.entry == "kvcache"]
    assert any(x.rotary_dim and not x.mutation for x in kv) and any(x.page for x in kv)
    assert any(x.leftpad for x in kv) and any(x.s_new for x in kv)
    assert 0.55 < sum(x.mutation is None for x in a) / len(a) < 0.85


@pytest.mark.parametrize("mutation, rule", [
    ("fp32", "FA2-DTYPE"), ("scale_nan", "FA2-SOFTMAX-SCALE"), ("heads_kv_zero", "FA2-HEADS-KV-ZERO"),
    ("softcap_dropout", "FA2-SOFTCAP-DROPOUT"), ("pack_n", "FA2-PACKED-SHAPE"),
    ("rotary_no_new_kv", "FA2-ROTARY-NEW-KV"), ("rotary_dim_odd", "FA2-ROTARY-DIM"),
    ("rotary_short", "FA2-ROTARY-TABLE"), ("rotary_dtype", "FA2-ROTARY-TABLE"),
    ("paged_leftpad", "FA2-PAGED-COMBINATION"), ("page_128", "FA2-PAGED-BLOCK-SIZE"),
    ("num_splits_big", "FA2-NUM-SPLITS"), ("cu_int64", "FA2-INDEX-DTYPE"),
])
def test_each_mutation_breaks_its_rule(mutation, rule):
    entry = {"pack_n": "varlen_kvpacked", "cu_int64": "varlen", "softcap_dropout": "kvpacked"}.get(mutation, "kvcache")
    if mutation in ("fp32", "scale_nan", "heads_kv_zero"):
        entry = "qkvpacked"
    rng = random.Random(mutation)
    s = CF.draw(rng, 0, "flash_attn", entry, p_mutate=0.0)
    s.mutation = mutation
    _force(s, mutation, rng)
    assert rule in [r.rule for r in CF.verdict(s, "sm90")]


def _force(s, mutation, rng):
    real_choice = rng.choice
    rng.choice = lambda options: mutation if mutation in options else real_choice(options)
    CF._mutate(rng, s)


def test_legal_calls_are_accepted_and_match_the_reference():
    """A legal call of each entry point: no reason, and the stand-in (the reference) is judged ok."""
    rng = random.Random(3)
    for entry in CF.FLASH_ENTRIES:
        s = CF.draw(rng, 0, "flash_attn", entry, p_mutate=0.0)
        assert CF.verdict(s, "sm90") == [], s.label()
        assert CF.run_one(s, "fake", [])["outcome"] == "ok", s.label()


def test_rotary_reference_rotates_pairs():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    cos, sin = torch.zeros(2, 2), torch.ones(2, 2)  # a quarter turn at every position
    pos = torch.tensor([1])
    assert CF._rotate(x, cos, sin, pos, interleaved=True).tolist() == [[[-2.0, 1.0, -4.0, 3.0]]]
    assert CF._rotate(x, cos, sin, pos, interleaved=False).tolist() == [[[-3.0, -4.0, 1.0, 2.0]]]


@pytest.mark.parametrize("rejected, outcome, cls", [
    (False, "ok", "true_accept"), (False, "clean_error", "false_accept"), (False, "timeout", "false_accept"),
    (True, "killed_by_signal", "true_reject"), (True, "ok", "false_reject"), (True, None, "rejected_not_run"),
    (False, "unverified", "unverified"),
])
def test_classification(rejected, outcome, cls):
    assert CF.classify(rejected, outcome) == cls


def test_worker_restarts_after_a_fatal_signal():
    rng = random.Random(5)
    ok1 = CF.draw(rng, 0, "flash_attn", "dense", p_mutate=0.0)
    dead = dataclasses.replace(CF.draw(rng, 1, "flash_attn", "dense", p_mutate=0.0), hk=0, mutation="heads_kv_zero")
    ok2 = CF.draw(rng, 2, "flash_attn", "varlen", p_mutate=0.0)
    records = CF.run([ok1, dead, ok2], backend="fake", caps=None, workers=1, timeout_s=120, run_crash=True,
                     budget_s=600, log=lambda *_: None)
    assert [r["class"] for r in records] == ["true_accept", "true_reject", "true_accept"]
    assert records[1]["outcome"] == "killed_by_signal" and "SIGFPE" in records[1]["detail"]
    assert CF.run.worker_starts == 2
    skipped = CF.run([dead], backend="fake", caps=None, workers=1, timeout_s=120, run_crash=False,
                     budget_s=600, log=lambda *_: None)
    assert skipped[0]["class"] == "rejected_not_run"


def test_dry_run_writes_csv_json_and_ends_with_the_table(tmp_path, capsys):
    rc = CF.main(["--dry-run", "--calls", "27", "--workers", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert out[-1].startswith("ALL ") and out[-11].startswith("entry ")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["total"]["calls"] == 27 and summary["false_accepts"] == []
    assert len(summary["by_entry"]) == 9
    rows = (tmp_path / "calls.csv").read_text().splitlines()
    assert len(rows) == 28 and rows[0].startswith("id,provider,entry")
    assert "FA-2 contract differential fuzzing" in (tmp_path / "summary.md").read_text()


def test_reference_agrees_with_the_probes_reference():
    """Without softcap / ALiBi the fuzzer's reference is the probes' one (dense, varlen, kvcache)."""
    from conformance.tools.probes import _common as C

    rng = random.Random(11)
    checked = {"dense": 0, "varlen": 0, "kvcache": 0}
    for i in range(60):
        entry = ("dense", "varlen", "kvcache")[i % 3]
        s = CF.draw(rng, i, "flash_attn", entry, p_mutate=0.0)
        s.softcap, s.alibi, s.rotary_dim, s.leftpad = 0.0, False, 0, None
        _, _, p = CF.build(s, "cpu", fill=True)
        got = CF.reference(s, p, torch.float64)
        scale = s.scale if s.scale is not None else s.d ** -0.5
        if entry == "dense":
            want = C.reference_dense(p["q"], p["k"], p["v"], causal=s.causal, window=tuple(s.window), scale=scale)
        elif entry == "varlen":
            want = C.reference_varlen(p["q"], p["k"], p["v"], p["cu_q"], p["cu_k"], causal=s.causal,
                                      window=tuple(s.window), scale=scale)
        else:
            rows = []
            for b in range(s.b):
                kc = torch.cat([p["k_cache"][g] for g in p["table"][b]]) if s.page else p["k_cache"][b]
                vc = torch.cat([p["v_cache"][g] for g in p["table"][b]]) if s.page else p["v_cache"][b]
                n = s.cache_lens[b]
                if s.s_new:
                    kc, vc = kc.clone(), vc.clone()
                    kc[n:n + s.s_new], vc[n:n + s.s_new] = p["k_new"][b], p["v_new"][b]
                    n += s.s_new
                rows.append(C.reference_dense(p["q"][b:b + 1], kc[None, :n], vc[None, :n], causal=s.causal,
                                              window=tuple(s.window), scale=scale)[0])
            want = torch.stack(rows)
        assert torch.allclose(got, want, atol=1e-9), s.label()
        checked[entry] += 1
    assert min(checked.values()) == 20


def test_false_rejects_are_classified_by_the_rule_kind():
    """A silent-corruption rule that one draw ran clean is a hazard, not a contract bug; an error
    rule refusing a call that ran clean is a bug."""
    rec = {"provider": "flash_attn", "entry": "dense", "label": "#1", "outcome": "ok", "detail": "",
           "class": "false_reject", "rules": ["FA2-SOFTMAX-SCALE", "FA2-HEAD-DIM"],
           "kinds": {"FA2-SOFTMAX-SCALE": "corruption", "FA2-HEAD-DIM": "clean-error"}}
    by_rule = CF.summarize([rec], {})["false_rejects_by_rule"]
    assert by_rule["FA2-SOFTMAX-SCALE"]["class"].startswith("hazard")
    assert by_rule["FA2-HEAD-DIM"]["class"].startswith("contract bug")
