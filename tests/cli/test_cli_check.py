"""`nsa-fa2 check`: pytest in a subprocess, then a Markdown + JSON report with the right counts.

Two real runs (a tiny filter of the conformance suite, and a generated suite with known outcomes)
and report-building cases that need no subprocess.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from conformance.tools import cli

CUDA = torch.cuda.is_available()


def _report(out: Path) -> tuple[dict, str]:
    data = json.loads((out / "check_report.json").read_text(encoding="utf-8"))
    return data, (out / "check_report.md").read_text(encoding="utf-8")


def test_quick_check_on_a_tiny_filter_writes_both_reports(tmp_path, capsys):
    out = tmp_path / "check"
    rc = cli.main(["check", "--quick", "-k", "test_num_cmp_blocks", "--out", str(out), "--quiet"])
    data, md = _report(out)
    # the counts are the JUnit file's, phase by phase and in total
    cases = [c for ph in data["phases"] for c in cli.parse_junit(out / ph["junit"])]
    assert data["counts"]["tests"] == len(cases) > 0
    for outcome, key in (("passed", "passed"), ("failed", "failed"), ("error", "errors"), ("skipped", "skipped")):
        assert data["counts"][key] == sum(c["outcome"] == outcome for c in cases)
    c = data["counts"]
    assert f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped" in md
    assert rc == (1 if c["failed"] or c["errors"] else 0) == data["exit_code"]
    assert data["options"]["quick"] is True and data["options"]["k"] == "test_num_cmp_blocks"
    assert "test_num_cmp_blocks" in " ".join(data["phases"][0]["command"])
    assert data["environment"]["torch"] == torch.__version__ and "## Environment" in md
    assert (out / "env.json").exists() and (out / "pytest_cpu.log").exists()
    if not CUDA:
        assert [p["name"] for p in data["phases"]] == ["cpu"]
        assert data["not_run"] and "-m gpu" in data["not_run"][0]["how"]
        assert "## Not run here" in md and "python -m pytest conformance -m gpu" in md
    printed = capsys.readouterr().out
    assert "[1/" in printed and "report:" in printed  # progress lines and where the report went


FAKE_SUITE = '''
import pytest

def test_one(): pass
def test_two(): pass
def test_three(): assert 1 + 1 == 3, "arithmetic is broken"

@pytest.mark.skip(reason="needs a unicorn")
def test_skipped(): pass

@pytest.fixture
def broken():
    raise RuntimeError("fixture exploded")

def test_error(broken): pass
'''


def test_counts_failures_and_skips_of_a_known_suite(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_fake.py").write_text(FAKE_SUITE, encoding="utf-8")
    out = tmp_path / "report"
    rc = cli.main(["check", "--target", str(suite), "--out", str(out), "--quiet"])
    data, md = _report(out)
    assert rc == 1 and data["status"] == "failed"
    if not CUDA:  # on CUDA the same suite runs twice (cpu part, gpu part); the counts double
        assert data["counts"] == {"tests": 5, "passed": 2, "failed": 1, "errors": 1, "skipped": 1, "xfailed": 0}
    failed = {f["test"].split("::")[-1]: f for f in data["failures"]}
    assert failed["test_three"]["kind"] == "failed" and "arithmetic is broken" in failed["test_three"]["message"]
    assert failed["test_error"]["kind"] == "error" and "fixture exploded" in failed["test_error"]["message"]
    assert data["skipped"][0]["reason"] == "needs a unicorn"
    assert "arithmetic is broken" in md and "needs a unicorn" in md and "**FAILED**" in md


def test_bad_out_and_bad_impl_are_refused_before_running(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["check", "--out", str(a_file)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["check", "--impl", "not a spec", "--out", str(tmp_path / "o")]) == 2
    assert "module:function" in capsys.readouterr().err
    assert cli.main(["check", "--target", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


# --- report building without a subprocess -----------------------------------------------------------

def _junit(path: Path, cases: list[tuple[str, str | None, str]]) -> Path:
    root = ET.Element("testsuites")
    suite = ET.SubElement(root, "testsuite")
    for name, tag, message in cases:
        tc = ET.SubElement(suite, "testcase", classname="conformance.test_x", name=name)
        if tag:
            ET.SubElement(tc, tag, message=message).text = f"details of {name}"
    ET.ElementTree(root).write(path)
    return path


def _build(phases, cases_by_phase, cuda=False):
    return cli.build_report({"gpu": "none", "cuda_available": cuda}, phases, cases_by_phase,
                            {"quick": False}, cuda, "2026-01-01T00:00:00+00:00", 1.0)


def test_parse_junit_outcomes(tmp_path):
    path = _junit(tmp_path / "j.xml", [("a", None, ""), ("b", "failure", "boom"), ("c", "error", "setup"),
                                        ("d", "skipped", "GPU part skipped: no CUDA")])
    got = [(c["test"], c["outcome"], c["message"]) for c in cli.parse_junit(path)]
    assert got == [("conformance.test_x::a", "passed", ""), ("conformance.test_x::b", "failed", "boom"),
                   ("conformance.test_x::c", "error", "setup"),
                   ("conformance.test_x::d", "skipped", "GPU part skipped: no CUDA")]


def test_a_crashed_run_is_an_error_with_its_signal(tmp_path):
    phase = cli.Phase("cpu", None, None, command=["python", "-m", "pytest"], returncode=136,
                      note="killed by SIGFPE in test_x (t.py:3); no JUnit XML written (see the log)")
    report = _build([phase], {"cpu": []})
    assert report["status"] == "error" and report["exit_code"] == 136
    assert any("SIGFPE" in p for p in report["problems"])
    assert "SIGFPE" in cli.render_markdown(report)


def test_nothing_selected_is_exit_5_and_says_so():
    phase = cli.Phase("cpu", None, "nothing", command=["python"], returncode=5)
    report = _build([phase], {"cpu": []})
    assert report["exit_code"] == 5 and "no test was selected" in report["problems"][0]


def test_gpu_phase_with_nothing_selected_does_not_fail_the_check():
    cpu = cli.Phase("cpu", "not gpu", None, command=["python"], returncode=0)
    gpu = cli.Phase("gpu", "gpu", None, command=["python"], returncode=5)
    cases = {"cpu": [{"test": "t", "outcome": "passed", "message": "", "details": "", "time_s": 0.0}], "gpu": []}
    report = _build([cpu, gpu], cases, cuda=True)
    assert report["exit_code"] == 0 and report["not_run"] == []


@pytest.mark.parametrize("cuda, quick, names, markers", [
    (False, False, ["cpu"], [None]),
    (True, False, ["cpu", "gpu"], ["not gpu and not slow and not bench", "gpu"]),
])
def test_plan_phases(cuda, quick, names, markers):
    phases = cli.plan_phases(cuda, quick, None)
    assert [p.name for p in phases] == names and [p.marker for p in phases] == markers


def test_quick_and_k_combine():
    (phase,) = cli.plan_phases(False, True, "win")
    assert phase.keyword == f"({cli.QUICK_CPU} or {cli.QUICK_GPU}) and (win)"
    cmd = cli.pytest_command(phase, Path("conformance"), Path("j.xml"), "pkg.mod:fn", ["-x"])
    assert cmd[-2:] == ["--nsa-impl=pkg.mod:fn", "-x"] and "-k" in cmd
