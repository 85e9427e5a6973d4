"""Permanent guard recommendations are data in the provider specs, consistent with the catalog."""
from __future__ import annotations

import pytest

from contracts import RULES, spec_for
from contracts.spec import GUARD_RECOMMENDATIONS, GuardRecommendation, guard_recommendations_for, recommended_guards

SPECS = ["flash_attn==2.8.3", "flash_attn==2.7.2", "flash_attn==2.9.0", "torch==2.11", "torch==2.13.0+cpu"]


def test_every_recommendation_names_a_catalog_rule_with_its_mode():
    for rec in GUARD_RECOMMENDATIONS:
        assert rec.rule in RULES, rec.rule
        assert rec.mode == RULES[rec.rule].mode, f"{rec.rule}: mode {rec.mode} != catalog {RULES[rec.rule].mode}"
        assert rec.evidence and rec.condition


def test_crash_and_corruption_rules_are_refused_semantics_may_warn():
    for rec in GUARD_RECOMMENDATIONS:
        if RULES[rec.rule].kind in ("crash", "corruption"):
            assert rec.action == "refuse", rec.rule


@pytest.mark.parametrize("label", SPECS)
def test_permanent_guards_all_have_a_refuse_recommendation(label):
    spec = spec_for(label)
    refused = {r.rule for r in spec.guard_recommendations if r.action == "refuse"}
    expected = set(spec.permanent_guards)
    if not spec.bwd_garbage_archs:
        expected.discard("FA2-BWD-GARBAGE-GRADS")
    assert expected <= refused, expected - refused


@pytest.mark.parametrize("label", SPECS)
def test_bwd_garbage_recommendation_follows_the_spec_archs(label):
    spec = spec_for(label)
    recs = [r for r in spec.guard_recommendations if r.rule == "FA2-BWD-GARBAGE-GRADS"]
    if spec.bwd_garbage_archs:
        assert recs and set(recs[0].archs) == {f"sm{a}{b}" for a, b in spec.bwd_garbage_archs}
    else:
        assert not recs


def test_version_and_arch_filters():
    assert "FA2-KV-CACHE-OVERFLOW" in {r.rule for r in guard_recommendations_for("flash_attn", "2.8.3.post2")}
    assert "FA2-KV-CACHE-OVERFLOW" not in {r.rule for r in guard_recommendations_for("flash_attn", "2.9.0")}
    assert "FA2-BWD-GARBAGE-GRADS" not in {r.rule for r in guard_recommendations_for("torch", "2.11.0")}
    on_h100 = {r.rule for r in recommended_guards("flash_attn==2.8.3", caps="sm90")}
    on_a10 = {r.rule for r in recommended_guards("flash_attn==2.8.3", caps="sm86")}
    assert on_a10 - on_h100 == {"FA2-BWD-GARBAGE-GRADS"}
    meta_refuse = {r.rule for r in recommended_guards("torch==2.11", action="refuse", mode="meta")}
    assert {"FA2-HEADS-KV-ZERO", "FA2-DENSE-EMPTY-Q", "FA2-GRID-LIMIT"} <= meta_refuse
    assert not any(RULES[r].mode == "strict" for r in meta_refuse)


def test_bad_version_bound_is_a_clear_error():
    rec = GuardRecommendation(rule="FA2-GRID-LIMIT", action="refuse", condition="c", evidence="e", versions="~=2.8")
    with pytest.raises(ValueError, match="must start with"):
        rec.covers_version("2.8.3")
