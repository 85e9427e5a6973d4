"""Documentation/Troubleshooting_FA2.md has exactly one entry per contract rule, and names no other."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from contracts import RULES

DOC = Path(__file__).resolve().parents[2] / "Documentation" / "Troubleshooting_FA2.md"
ENTRY = re.compile(r"^### (FA2-[A-Z0-9]+(?:-[A-Z0-9]+)*)\b", re.M)
MENTION = re.compile(r"\bFA2-[A-Z0-9]+(?:-[A-Z0-9]+)*\b")
FIELDS = ("**Symptom**", "**Cause**", "**Fix**")


def entries(text: str) -> dict[str, str]:
    """rule id -> the entry's text (up to the next heading)."""
    found = {}
    heads = list(re.finditer(r"^#{2,3} .*$", text, re.M))
    for n, head in enumerate(heads):
        match = ENTRY.match(head.group(0))
        if match:
            end = heads[n + 1].start() if n + 1 < len(heads) else len(text)
            found[match.group(1)] = text[head.start():end]
    return found


def missing_and_unknown(text: str) -> tuple[set[str], set[str]]:
    """(rule ids without an entry, ids the document names that are not rules)."""
    listed = set(ENTRY.findall(text))
    return set(RULES) - listed, set(MENTION.findall(text)) - set(RULES)


def test_every_rule_has_an_entry_and_no_unknown_rule_is_named():
    text = DOC.read_text(encoding="utf-8")
    missing, unknown = missing_and_unknown(text)
    assert not missing, f"{DOC.name}: no entry for {sorted(missing)}; add a '### <id>: ...' section"
    assert not unknown, f"{DOC.name} names rule ids that contracts.RULES does not have: {sorted(unknown)}"


def test_one_entry_per_rule():
    text = DOC.read_text(encoding="utf-8")
    dup = [rid for rid, n in Counter(ENTRY.findall(text)).items() if n > 1]
    assert not dup, f"{DOC.name}: more than one entry for {dup}"


def test_each_entry_has_symptom_cause_fix_and_its_anchor():
    text = DOC.read_text(encoding="utf-8")
    for rid, body in entries(text).items():
        for field in FIELDS:
            assert field in body, f"{DOC.name}: entry {rid} lacks {field}"
        assert f'<a id="{rid.lower()}"></a>\n### {rid}' in text, (
            f"{DOC.name}: put <a id=\"{rid.lower()}\"></a> right above the heading of {rid} "
            "(the guide's rule table links to it)"
        )


def test_the_checks_catch_a_missing_and_an_unknown_rule():
    text = DOC.read_text(encoding="utf-8")
    victim = next(iter(RULES))
    without = re.sub(rf"^### {re.escape(victim)}\b.*$", "### removed", text, flags=re.M)
    without = without.replace(victim, "")
    assert missing_and_unknown(without)[0] == {victim}
    assert missing_and_unknown(text + "\n### FA2-NO-SUCH-RULE: x\n")[1] == {"FA2-NO-SUCH-RULE"}
