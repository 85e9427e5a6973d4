"""The per-rule conformance report (``conformance.rule_report``) and its place in ``nsa-fa2 check``.

Synthetic outcomes pin the per-rule verdicts, counts and repro text; two real runs (pytest with
``--nsa-report`` and ``nsa-fa2 check``) point the suite at a deliberately wrong sliding window
(w + 1 keys) and read the reports they write.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import rule_report
from conformance.tools import cli
from conformance.impl import build
from conformance.nsa_rules import RULES

ROOT = Path(__file__).resolve().parents[2]

WIN_SPEC = "nsa_ref:win_attention"  # any importable callable: a "user" win slot for the header and repros

PASS_WIN = "conformance/test_win.py::test_win_matches_brute[ok]"
FAIL_WIN = "conformance/test_win.py::test_win_matches_brute[bad]"
NA_CMP = "conformance/test_cmp.py::test_cmp_matches_brute[wide]"
UNMARKED = "conformance/test_win.py::test_unmarked"
GPU_ONLY = "conformance/test_decode.py::test_decode_on_gpu"
OWN_CHECK = "conformance/test_brute.py::test_brute_by_hand"
PASS_SEL = "conformance/test_sel.py::test_sel_matches_brute[ok]"

#: What pytest's longrepr looks like: source lines (which may quote tags) then the E lines.
FAIL_DETAIL = """\
    def check_win(case, win_impl):
        other = "[NSA-GATE] quoted in the source, not in the message"
>       raise AssertionError(msg)
E       AssertionError: [NSA-WIN] sliding window (s in [max(0, t - w + 1), t]: w keys including t): T=9: max|impl - brute| = 2.3 / [NSA-CMP-VISIBLE] cmp visibility (i*d + l - 1 <= t): also off

conformance/assertions.py:166: AssertionError"""


def _impl(**overrides):
    # The synthetic tests call win, cmp, sel and nsa: all four are "user" slots, so all count.
    specs = {"win": WIN_SPEC, "cmp": "nsa_ref:cmp_attention", "sel": "nsa_ref:sel_attention",
             "nsa": "nsa_ref:nsa_attention"}
    return build(specs, cap_overrides=overrides)


def _outcomes() -> tuple[dict, dict]:
    outcomes = {
        PASS_WIN: {"outcome": "passed", "detail": ""},
        FAIL_WIN: {"outcome": "failed", "detail": FAIL_DETAIL},
        NA_CMP: {"outcome": "not applicable",
                 "detail": "not applicable: cmp: G = Hq/Hkv = 16 outside the supported group sizes 1..2; "
                           "cmp: Dk=13 is not a multiple of 8"},
        UNMARKED: {"outcome": "failed", "detail": "E       assert 1 == 2"},
        GPU_ONLY: {"outcome": "skipped", "detail": "GPU part skipped: no CUDA device on this machine."},
        OWN_CHECK: {"outcome": "failed", "detail": "E   AssertionError: [NSA-FULL] nsa_ref's own check"},
        PASS_SEL: {"outcome": "passed", "detail": ""},
    }
    rules_of = {
        PASS_WIN: (["NSA-WIN", "NSA-SCALE"], ["win"]),
        FAIL_WIN: (["NSA-WIN", "NSA-SCALE"], ["win"]),
        NA_CMP: (["NSA-CMP-LSE"], ["cmp"]),
        UNMARKED: ([], ["win"]),
        GPU_ONLY: (["NSA-DECODE"], ["nsa"]),
        OWN_CHECK: (["NSA-FULL"], []),  # calls no slot: not a conformance test of the implementation
        PASS_SEL: (["NSA-SEL-ATTN"], ["sel"]),
    }
    return outcomes, rules_of


def _rules(report: dict) -> dict[str, dict]:
    return {r["id"]: r for r in report["rules"]}


def test_statuses_counts_and_attribution():
    outcomes, rules_of = _outcomes()
    report = rule_report.build_rule_report(_impl(max_group="2"), outcomes, rules_of)
    rules = _rules(report)
    assert [r["id"] for r in report["rules"]] == list(RULES), "every rule, in catalog order"
    status = {rid: r["status"] for rid, r in rules.items()}
    assert status["NSA-WIN"] == "failed" and rules["NSA-WIN"]["counts"]["passed"] == 1
    assert status["NSA-CMP-VISIBLE"] == "failed", "a rule quoted in a failure message counts too"
    assert status["NSA-SCALE"] == "passed", "a failure naming rules counts against those, not every mark"
    assert rules["NSA-SCALE"]["counts"]["failed"] == 0 and rules["NSA-WIN"]["failures_naming_rule"] == 1
    assert status["NSA-GATE"] == "not tested", "tags in traceback source lines are not the message"
    assert status["NSA-FULL"] == "not tested", "tests calling no slot (nsa_ref's own) are left out"
    assert status["NSA-SEL-ATTN"] == "passed"
    assert status["NSA-CMP-LSE"] == "not applicable"
    assert rules["NSA-CMP-LSE"]["not_applicable_reasons"] == [
        "cmp: G = Hq/Hkv = 16 outside the supported group sizes 1..2", "cmp: Dk=13 is not a multiple of 8"]
    assert status["NSA-DECODE"] == "not tested" and rules["NSA-DECODE"]["counts"]["skipped"] == 1
    assert report["rule_counts"] == {"failed": 2, "known deviation": 0, "passed": 2, "not applicable": 1,
                                     "not tested": len(RULES) - 5}
    assert report["totals"] == {"tests": 6, "applicable": 4, "passed": 2, "failed": 2, "known deviation": 0,
                                "not applicable": 1, "skipped": 1, "applicable_fraction": 0.8}
    assert report["unattributed_failures"] == [UNMARKED]


def test_first_failure_has_the_message_line_and_a_repro():
    outcomes, rules_of = _outcomes()
    report = rule_report.build_rule_report(_impl(max_group="2"), outcomes, rules_of)
    first = _rules(report)["NSA-WIN"]["first_failure"]
    assert first["test"] == FAIL_WIN and first["names_rule"] is True
    assert first["message"].startswith("[NSA-WIN] sliding window") and "AssertionError" not in first["message"]
    assert first["repro"] == (f"python -m pytest '{FAIL_WIN}' --nsa-impl=nsa_ref:nsa_attention "
                              "--nsa-cmp-impl=nsa_ref:cmp_attention --nsa-sel-impl=nsa_ref:sel_attention "
                              f"--nsa-win-impl={WIN_SPEC} --nsa-device=cpu "
                              "--nsa-dtype=fp64 --nsa-cap=max_group=2")
    assert shlex.split(first["repro"])[3] == FAIL_WIN
    assert report["user_slots"] == ["nsa", "cmp", "sel", "win"]
    assert report["capabilities"] == {slot: ["max_group=2"] for slot in ("nsa", "cmp", "sel", "win")}
    assert report["implementation"][0].startswith("nsa-conformance: implementation under test")


def test_message_is_one_trimmed_line():
    long = "E   AssertionError: [NSA-WIN] " + "x" * 1000 + "\nE   second line"
    msg = rule_report.failure_message(long)
    assert len(msg) == rule_report.MAX_MESSAGE and msg.endswith("...") and "\n" not in msg
    assert rule_report.failure_message("E       assert 1 == 2") == "assert 1 == 2"
    assert rule_report.failure_message("f.py:3: AssertionError: [NSA-WIN] w") == "f.py:3: AssertionError: [NSA-WIN] w"


def test_not_applicable_reasons_are_capped_at_five():
    outcomes = {f"conformance/test_win.py::t[{i}]": {"outcome": "not applicable",
                                                    "detail": f"not applicable: win: reason {i}"} for i in range(7)}
    rules_of = {nodeid: (["NSA-WIN"], ["win"]) for nodeid in outcomes}
    report = rule_report.build_rule_report(_impl(), outcomes, rules_of)
    row = _rules(report)["NSA-WIN"]
    assert row["status"] == "not applicable" and row["counts"]["not applicable"] == 7
    assert len(row["not_applicable_reasons"]) == 5 and row["not_applicable_reasons_total"] == 7
    assert "... and 2 more distinct reason(s)" in rule_report.render_markdown(report)


def test_write_report_writes_sorted_json_and_markdown(tmp_path):
    outcomes, rules_of = _outcomes()
    paths = rule_report.write_report(tmp_path / "new" / "dir", _impl(max_group="2"), outcomes, rules_of)
    assert [p.name for p in paths] == ["report.json", "report.md"] and all(p.exists() for p in paths)
    text = paths[0].read_text(encoding="utf-8")
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n", "stable, sorted JSON"
    md = paths[1].read_text(encoding="utf-8")
    assert "| rule | title | status | passed | failed | known deviation | n/a |" in md
    assert f"| `NSA-WIN` | {RULES['NSA-WIN'].title} | **failed** | 1 | 1 | 0 | 0 |" in md
    assert "## Failures (2 rules)" in md and _rules(data)["NSA-WIN"]["first_failure"]["repro"] in md
    assert "## Not applicable" in md and "cmp: Dk=13 is not a multiple of 8" in md
    assert "applicable fraction 80.0% (4 of 5)" in md and UNMARKED in md


def test_merge_adds_up_runs():
    outcomes, rules_of = _outcomes()
    one = rule_report.build_rule_report(_impl(), outcomes, rules_of)
    merged = rule_report.merge_reports([one, one])
    assert merged["totals"]["applicable"] == 8 and merged["totals"]["applicable_fraction"] == 0.8
    win = _rules(merged)["NSA-WIN"]
    assert win["counts"]["failed"] == 2 and win["status"] == "failed" and win["failures_naming_rule"] == 2
    assert merged["rule_counts"] == one["rule_counts"]
    assert _rules(one)["NSA-WIN"]["counts"]["failed"] == 1, "the inputs are left as they were"


def test_by_test_counts_cases_per_function_and_merges():
    outcomes = {
        "conformance/test_win.py::test_w[a]": {"outcome": "passed", "detail": ""},
        "conformance/test_win.py::test_w[b]": {"outcome": "not applicable", "detail": "not applicable: win: G"},
        "conformance/test_win.py::test_w[c]": {"outcome": "known deviation", "detail": "known deviation [NSA-WIN]"},
        "conformance/test_win.py::test_w[d]": {"outcome": "skipped", "detail": "no GPU"},
        "conformance/test_win.py::test_x": {"outcome": "failed", "detail": "E   AssertionError: [NSA-WIN] w"},
    }
    rules_of = {nodeid: (["NSA-WIN"], ["win"]) for nodeid in outcomes}
    report = rule_report.build_rule_report(_impl(), outcomes, rules_of)
    assert report["by_test"] == {"conformance/test_win.py::test_w": {"applicable": 2, "not applicable": 1},
                                 "conformance/test_win.py::test_x": {"applicable": 1, "not applicable": 0}}
    md = rule_report.render_markdown(report)
    assert "2 test functions judged; 1 with fewer than 80% of their cases applicable." in md
    assert "| `conformance/test_win.py::test_w` | 2 | 1 | 67% |" in md
    merged = rule_report.merge_reports([report, report])
    assert merged["by_test"]["conformance/test_win.py::test_w"] == {"applicable": 4, "not applicable": 2}
    assert report["by_test"]["conformance/test_win.py::test_w"]["applicable"] == 2, "inputs untouched"


def test_merge_cli_writes_one_report_from_shard_dirs(tmp_path, capsys):
    outcomes, rules_of = _outcomes()
    one = rule_report.build_rule_report(_impl(), outcomes, rules_of)
    rule_report.write_files(tmp_path / "a", one)
    rule_report.write_files(tmp_path / "b", one)
    code = rule_report.main(["merge", str(tmp_path / "all"), str(tmp_path / "a"), str(tmp_path / "b"),
                             str(tmp_path / "never-ran")])
    assert code == 0
    data = json.loads((tmp_path / "all" / "report.json").read_text(encoding="utf-8"))
    assert data["totals"]["applicable"] == 2 * one["totals"]["applicable"]
    assert (tmp_path / "all" / "report.md").is_file()
    assert "never-ran/report.json (that run wrote no report); left out" in capsys.readouterr().out
    assert rule_report.main(["merge", str(tmp_path / "none"), str(tmp_path / "never-ran")]) == 1


# --- nsa-fa2 check: options and the per-rule report beside check_report.md ---------------------------

def test_check_forwards_the_implementation_flags_and_the_report_dir():
    args = argparse.Namespace(nsa_dtype="bf16", nsa_device="cuda", nsa_compute_dtype=None,
                              nsa_known_deviations="dev.yaml", nsa_cap=["backward=false", "min_group=2"])
    flags = cli.nsa_flags(args)
    assert flags == ["--nsa-dtype=bf16", "--nsa-device=cuda", "--nsa-known-deviations=dev.yaml",
                     "--nsa-cap=backward=false", "--nsa-cap=min_group=2"]
    (phase,) = cli.plan_phases(False, False, None)
    cmd = cli.pytest_command(phase, Path("conformance"), Path("j.xml"), "pkg.mod:fn", ["-x"],
                             report_dir=Path("out/rules"), nsa_flags=flags)
    assert "--nsa-report=out/rules" in cmd and cmd[-2:] == ["--nsa-impl=pkg.mod:fn", "-x"]
    assert cmd.index("--nsa-dtype=bf16") < cmd.index("--nsa-impl=pkg.mod:fn")


@pytest.mark.parametrize("argv, says", [
    (["--nsa-dtype", "fp8"], "--nsa-dtype=fp8"),
    (["--nsa-cap", "wings=2"], "unknown capability 'wings'"),
    (["--nsa-cap", "backward"], "expected KEY=VALUE"),
    (["--nsa-known-deviations", "no/such.yaml"], "cannot read it"),
])
def test_check_refuses_bad_implementation_flags(tmp_path, capsys, argv, says):
    assert cli.main(["check", *argv, "--out", str(tmp_path / "o")]) == cli.EXIT_USAGE
    assert says in capsys.readouterr().err


def test_check_merges_the_reports_of_several_runs(tmp_path):
    outcomes, rules_of = _outcomes()
    phases = [cli.Phase("cpu", "not gpu", None), cli.Phase("gpu", "gpu", None)]
    dirs = cli.rule_report_dirs(tmp_path, phases)
    assert dirs == {"cpu": tmp_path / "rules" / "cpu", "gpu": tmp_path / "rules" / "gpu"}
    rule_report.write_report(dirs["cpu"], _impl(), outcomes, rules_of)
    summary = cli.collect_rule_report(tmp_path, dirs)
    assert summary["written"] and summary["phases_missing"] == ["gpu"]
    assert summary["failed_rules"] == ["NSA-CMP-VISIBLE", "NSA-WIN"]
    assert (tmp_path / "rules" / "report.md").exists() and (tmp_path / "rules" / "report.json").exists()
    md = "\n".join(cli._rule_report_md(summary))
    assert "[`rules/report.md`](rules/report.md)" in md and "Failed rules: `NSA-CMP-VISIBLE`" in md
    assert "wrote no per-rule report" in md and "gpu" in md


# --- real runs against a wrong sliding window ---------------------------------------------------------

WRONG_WIN = '''
import nsa_ref


def win(q, k, v, cfg, cu_seqlens=None):
    """Off by one: w + 1 keys per query instead of w."""
    wider = cfg.model_copy(update={"window": cfg.window + 1})
    return nsa_ref.win_attention(q, k, v, wider, cu_seqlens, backend="reference")
'''
FEW_WIN_TESTS = "test_win_matches_brute and paper and (97 or 1025)"  # G = 2, 16 (T < w), G = 1 (T > w)


def _wrong_win_module(tmp_path: Path, monkeypatch) -> dict[str, str]:
    (tmp_path / "wrong_win.py").write_text(WRONG_WIN, encoding="utf-8")
    path = os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    monkeypatch.setenv("PYTHONPATH", path)
    return dict(os.environ)


def _check_wrong_win_report(data: dict) -> dict:
    win = _rules(data)["NSA-WIN"]
    assert win["status"] == "failed" and win["counts"]["failed"] >= 1
    assert win["counts"]["not applicable"] >= 1, "G = 16 cases are outside max_group=2"
    assert win["not_applicable_reasons"] == ["win: G = Hq/Hkv = 16 outside the supported group sizes 1..2"]
    first = win["first_failure"]
    assert first["message"].startswith("[NSA-WIN]") and first["names_rule"]
    assert "--nsa-win-impl=wrong_win:win" in first["repro"] and "--nsa-cap=max_group=2" in first["repro"]
    assert data["totals"]["failed"] == win["counts"]["failed"] and data["user_slots"] == ["win"]
    return win


def test_pytest_report_names_the_broken_rule_with_a_working_repro(tmp_path, monkeypatch):
    env = _wrong_win_module(tmp_path, monkeypatch)
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, "-m", "pytest", "conformance/test_win.py", "-q", "-k", FEW_WIN_TESTS,
                          "--nsa-win-impl=wrong_win:win", "--nsa-cap", "max_group=2", f"--nsa-report={out}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "per-rule report ->" in run.stdout
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    win = _check_wrong_win_report(data)
    assert (out / "report.md").exists() and win["first_failure"]["repro"] in (out / "report.md").read_text()
    repro = shlex.split(win["first_failure"]["repro"])
    again = subprocess.run([sys.executable, *repro[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 1 and "1 failed" in again.stdout and "[NSA-WIN]" in again.stdout


def test_check_writes_the_rule_report_beside_check_report(tmp_path, monkeypatch):
    _wrong_win_module(tmp_path, monkeypatch)
    out = tmp_path / "check"
    rc = cli.main(["check", "--target", str(ROOT / "conformance" / "test_win.py"), "-k", FEW_WIN_TESTS,
                   "--out", str(out), "--quiet", "--nsa-cap", "max_group=2", "--", "--nsa-win-impl=wrong_win:win"])
    assert rc == cli.EXIT_FAILED
    check = json.loads((out / "check_report.json").read_text(encoding="utf-8"))
    assert check["rule_report"]["written"] and "NSA-WIN" in check["rule_report"]["failed_rules"]
    assert check["options"]["nsa_cap"] == ["max_group=2"]
    assert "## Per-rule report" in (out / "check_report.md").read_text(encoding="utf-8")
    _check_wrong_win_report(json.loads((out / "rules" / "report.json").read_text(encoding="utf-8")))


def test_known_deviation_counts_for_the_rule_its_entry_names():
    nodeid = "conformance/test_nsa.py::test_nsa_matches_brute[tied16-T=15]"
    outcomes = {nodeid: {"outcome": "known deviation",
                         "detail": "known deviation [NSA-SCALE]: window ignores scale (upstream: none)"}}
    rules_of = {nodeid: (["NSA-FULL", "NSA-GATE", "NSA-SCALE"], ["nsa"])}
    report = rule_report.build_rule_report(_impl(), outcomes, rules_of)
    status = {r["id"]: r["status"] for r in report["rules"]}
    assert status["NSA-SCALE"] == "known deviation"
    assert status["NSA-FULL"] == "not tested" and status["NSA-GATE"] == "not tested"
    assert report["totals"]["known deviation"] == 1 and report["totals"]["applicable"] == 1
