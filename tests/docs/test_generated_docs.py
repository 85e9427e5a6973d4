"""The generated blocks of the docs (rules, flags, known-good environments) match their data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conformance.tools import docs
from conformance.nsa_rules import RULES as NSA_RULES
from contracts import RULES
from nsa_ref.settings import NSASettings

ROOT = Path(__file__).resolve().parents[2]


def test_committed_docs_equal_the_regenerated_ones():
    for doc in docs.DOCUMENTS:
        committed, regenerated = docs.regenerate(doc)
        assert committed == regenerated, (
            f"{doc}: a generated block differs from its data (contracts.RULES, NSASettings or "
            "artifacts/**/env.json); run `python -m conformance.tools.docs` and commit the result"
        )


def test_check_command_agrees():
    assert docs.main(["--check"]) == 0


def test_committed_nsa_rules_document_equals_the_generated_one():
    committed, generated = docs.regenerate_file(docs.NSA_RULES_DOC)
    assert committed == generated, (
        f"{docs.NSA_RULES_DOC} differs from conformance.nsa_rules (or the slot, config or capability "
        "fields it lists); run `python -m conformance.tools.docs` and commit the result"
    )


def test_nsa_rules_document_has_one_section_per_rule_and_the_conventions():
    text = docs.nsa_rules_document()
    sections = re.findall(r"^### (NSA-[A-Z-]+)$", text, re.M)
    assert sections == list(NSA_RULES), "one section per rule, in catalog order"
    for rule in NSA_RULES.values():
        assert f"[`{rule.id}`](#{rule.id.lower()})" in text
        assert docs._prose(rule.statement) in text and f"`{rule.tag()}`" in text
    for needed in ("--nsa-impl=", "--nsa-dtype", "--nsa-compute-dtype", "--nsa-cap", "--nsa-report",
                   ".capabilities = Capabilities(", "(T, Hkv, n_sel)", "floor((T - l) / d) + 1",
                   "(never NaN)", "`-inf`", "cu_seqlens_cmp[b + 1]", "int32"):
        assert needed in text, f"the implementer document lacks {needed!r}"


def test_a_stale_nsa_rules_document_is_reported(tmp_path, monkeypatch):
    (tmp_path / "Documentation").mkdir()
    (tmp_path / docs.NSA_RULES_DOC).write_text("old\n", encoding="utf-8")
    monkeypatch.setattr(docs, "DOCUMENTS", {})
    assert docs.stale(tmp_path) == [docs.NSA_RULES_DOC]
    assert docs.write(tmp_path) == [docs.NSA_RULES_DOC] and docs.stale(tmp_path) == []


def test_rule_table_lists_every_rule_once_with_its_fix():
    block = docs.rules_block()
    rows = [line for line in block.splitlines() if line.startswith("| [`FA2-")]
    assert len(rows) == len(RULES)
    for rule, row in zip(RULES.values(), rows):
        assert f"[`{rule.id}`](../Troubleshooting_FA2.md#{rule.id.lower()})" in row
        assert rule.kind in row and rule.mode in row
        assert rule.fix.replace("|", "\\|") in row


def test_flag_table_lists_every_setting_with_its_default():
    block = docs.flags_block()
    for name, field in NSASettings.model_fields.items():
        row = next((line for line in block.splitlines() if line.startswith(f"| `NSA_{name.upper()}`")), None)
        assert row is not None, f"NSA_{name.upper()} missing from the flag table"
        assert docs._default_text(field.default) in row


def test_a_setting_without_a_note_is_refused(monkeypatch):
    notes = dict(docs.FLAG_NOTES)
    notes.pop("use_fa2")
    monkeypatch.setattr(docs, "FLAG_NOTES", notes)
    with pytest.raises(docs.DocsError, match="use_fa2"):
        docs.flags_block()


def test_replace_block_needs_exactly_one_marker_pair():
    text = "a\n<!-- x:begin -->\nold\n<!-- x:end -->\nb\n"
    assert docs.replace_block(text, "x", "new") == "a\n<!-- x:begin -->\nnew\n<!-- x:end -->\nb\n"
    for bad in ("no markers", text + text, "<!-- x:end -->\n<!-- x:begin -->"):
        with pytest.raises(docs.DocsError):
            docs.replace_block(bad, "x", "new")


def _fake_artifact(folder: Path, cuda: bool, junit: str | None) -> None:
    folder.mkdir(parents=True)
    env = {"gpu": "Fake GPU" if cuda else "none", "cuda_available": cuda, "compute_capability": "9.0",
           "driver": "1.2", "cuda_runtime": "13.0", "torch": "9.9", "flash_attn": "2.8", "triton": "3",
           "python": "3.12"}
    (folder / "env.json").write_text(json.dumps(env))
    if junit is not None:
        (folder / "gpu_junit.xml").write_text(junit)


def test_known_good_rows_come_from_env_json_and_the_results_next_to_it(tmp_path):
    passing = ('<testsuites><testsuite><testcase classname="m" name="a"/><testcase classname="m" name="b"/>'
               '<testcase classname="m" name="c"><skipped message="why"/></testcase></testsuite></testsuites>')
    failing = '<testsuites><testsuite><testcase classname="m" name="a"><failure message="x"/></testcase></testsuite></testsuites>'
    _fake_artifact(tmp_path / "artifacts" / "d1" / "good", True, passing)
    _fake_artifact(tmp_path / "artifacts" / "d1" / "bad", True, failing)
    _fake_artifact(tmp_path / "artifacts" / "d1" / "timings", True, None)
    _fake_artifact(tmp_path / "artifacts" / "d1" / "cpu", False, passing)
    block = docs.known_good_block(tmp_path)  # not a git checkout: every env.json on disk counts
    rows = {re.search(r"`artifacts/d1/(\w+)`", line).group(1): line
            for line in block.splitlines() if line.startswith("| [`artifacts/")}
    assert set(rows) == {"good", "bad", "timings"}, "CPU-only environments are not GPU evidence"
    assert "2 passed, 0 failed, 0 errors, 1 skipped" in rows["good"] and "**known good**" in rows["good"]
    assert "0 passed, 1 failed" in rows["bad"] and "known good" not in rows["bad"]
    assert "env.json only" in rows["timings"] and "known good" not in rows["timings"]


@pytest.mark.parametrize("verdict, word", [({"passed": True}, "training canary: passed"),
                                           ({"passed": False, "failures": ["x"]}, "training canary: FAILED"),
                                           ({"passed": None, "partial": "1 of 6 runs"},
                                            "training canary: partial (1 of 6 runs)")])
def test_known_good_rows_name_the_canary_verdict(tmp_path, verdict, word):
    folder = tmp_path / "artifacts" / "d1" / "canary_run"
    _fake_artifact(folder, True, None)
    (folder / "canary").mkdir()
    (folder / "canary" / "canary.json").write_text(json.dumps({"verdict": verdict}))
    row = next(line for line in docs.known_good_block(tmp_path).splitlines() if "canary_run" in line)
    assert word in row and "known good" not in row, "a canary is evidence, not a test run"
    assert row.endswith("| training canary passed |" if verdict["passed"] else "| timings / smoke only |")


def test_known_good_table_uses_committed_artifacts_only():
    files = docs.committed_env_files(ROOT)
    assert files, "the repository has committed GPU env.json files under artifacts/"
    assert all(p.name == "env.json" and "artifacts" in p.parts for p in files)
