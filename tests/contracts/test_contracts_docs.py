"""The committed rule table is the generated one, so docs cannot drift from the catalog."""
from __future__ import annotations

from contracts import RULES
from contracts.catalog import rules_markdown, rules_markdown_path


def test_committed_rule_table_matches_catalog():
    path = rules_markdown_path()
    assert path.exists(), f"{path} is missing; run contracts.catalog.write_rules_markdown()"
    committed = path.read_text(encoding="utf-8")
    assert committed == rules_markdown(), (
        f"{path} differs from the catalog; regenerate with "
        "python -c \"import contracts.catalog as c; c.write_rules_markdown()\""
    )


def test_rule_table_names_every_rule_with_its_facts():
    text = rules_markdown()
    for rule in RULES.values():
        assert f"## {rule.id}" in text
        for fact in (rule.kind, rule.source, rule.symptom, rule.fix):
            assert fact in text


def test_rule_ids_are_stable_strings():
    for rid, rule in RULES.items():
        assert rid == rule.id and rid.startswith("FA2-") and rid == rid.upper() and " " not in rid
