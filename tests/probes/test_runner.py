"""The probe runner: classification of dying/hanging/failing children, and the JSON/Markdown it writes."""
from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from conformance.tools.probes import runner
from probes_testkit import PYTHON, REPO, cpu_env


def _child(tmp_path, code: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(code)
    return [PYTHON, str(path)]


def _result_line(outcome="silent_corruption", detail="rows 3-7 differ") -> str:
    return json.dumps({"stage": "result", "probe": "x", "outcome": outcome, "detail": detail,
                       "contract_strict": ["FA2-CU-SEQLENS-START"]})


def test_sigfpe_child_is_killed_by_signal(tmp_path):
    code = ("import json, os, signal\n"
            "print(json.dumps({'stage': 'contract', 'probe': 'x', 'contract_strict': ['FA2-HEADS-KV-ZERO']}), flush=True)\n"
            "os.kill(os.getpid(), signal.SIGFPE)\n")
    run = runner.run_command(_child(tmp_path, code), timeout=60)
    assert run.returncode == -signal.SIGFPE
    outcome, detail, payload = runner.classify(run, 60)
    assert outcome == "killed_by_signal" and "SIGFPE" in detail and "after the contract verdict" in detail
    assert payload["contract_strict"] == ["FA2-HEADS-KV-ZERO"]


def test_hanging_child_times_out_and_is_killed(tmp_path):
    start = time.monotonic()
    run = runner.run_command(_child(tmp_path, "import time\nprint('started', flush=True)\ntime.sleep(60)\n"), timeout=1)
    assert time.monotonic() - start < 30
    assert run.timed_out and "started" in run.stdout
    outcome, detail, _ = runner.classify(run, 1)
    assert outcome == "timeout" and "1 s" in detail


def test_nonzero_exit_without_result_is_a_probe_error(tmp_path):
    run = runner.run_command(_child(tmp_path, "import sys\nsys.stderr.write('Traceback: boom\\n')\nsys.exit(3)\n"), 60)
    assert run.returncode == 3
    outcome, detail, _ = runner.classify(run, 60)
    assert outcome == "probe_error" and "exited 3" in detail and "boom" in detail


def test_cuda_failure_on_stderr_is_a_cuda_error(tmp_path):
    code = "import sys\nsys.stderr.write('RuntimeError: CUDA error: an illegal memory access was encountered\\n')\nsys.exit(1)\n"
    outcome, detail, _ = runner.classify(runner.run_command(_child(tmp_path, code), 60), 60)
    assert outcome == "cuda_error" and "illegal memory access" in detail


def test_result_line_wins_and_a_late_exit_code_is_noted(tmp_path):
    code = f"import sys\nprint('chatter')\nprint({_result_line()!r})\nsys.exit(1)\n"
    outcome, detail, payload = runner.classify(runner.run_command(_child(tmp_path, code), 60), 60)
    assert outcome == "silent_corruption" and detail.startswith("rows 3-7 differ") and "exited 1" in detail
    assert payload["contract_strict"] == ["FA2-CU-SEQLENS-START"]


@pytest.mark.parametrize("rc, stdout, expected", [
    (0, "", "probe_error"),
    (0, _result_line("ok", "matched"), "ok"),
    (-11, "", "killed_by_signal"),
    (-6, _result_line(), "killed_by_signal"),
    (0, "{not json, \"probe\"\n" + _result_line("clean_error", "RuntimeError: x"), "clean_error"),
])
def test_classify_synthetic(rc, stdout, expected):
    run = runner.RunRecord(command=["x"], returncode=rc, timed_out=False, wall_s=0.1, stdout=stdout, stderr="")
    assert runner.classify(run)[0] == expected


def test_soundness_labels():
    assert runner.soundness("killed_by_signal", ["FA2-HEADS-KV-ZERO"]) == "rejected by the contract"
    assert runner.soundness("silent_corruption", []) == "NOT REJECTED"
    assert runner.soundness("ok", ["FA2-MAX-SEQLEN-K-LOW"]) == "contract stricter than the kernel"
    assert runner.soundness("skipped", []) == "-"


def test_runner_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    for key, value in cpu_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    rc = runner.main(["--out", str(tmp_path), "--only", "heads_kv_zero,paged_kv_overflow", "--provider", "torch",
                      "--jobs", "2", "--timeout", "120"])
    assert rc == 0
    progress = capsys.readouterr().out
    assert "[3/3]" in progress and "wrote" in progress
    report = json.loads((tmp_path / "fa2_probes.json").read_text())
    got = {(r["probe"], r["variant"]): r for r in report["results"]}
    assert set(got) == {("heads_kv_zero", "dense"), ("paged_kv_overflow", "next_row"), ("paged_kv_overflow", "past_end")}
    kv = got[("heads_kv_zero", "dense")]
    assert (kv["outcome"], kv["detail"], kv["returncode"]) == ("skipped", "no CUDA", 0)
    assert kv["contract_strict"] == ["FA2-HEADS-KV-ZERO"] and kv["provider"] == "torch"
    assert got[("paged_kv_overflow", "next_row")]["outcome"] == "not_applicable"
    assert report["summary"]["runs"] == 3 and report["summary"]["not_rejected"] == []
    md = (tmp_path / "fa2_probes.md").read_text()
    assert "| probe | provider | contract rule ids that reject it (strict) | outcome | detail |" in md
    assert "| heads_kv_zero | torch | `FA2-HEADS-KV-ZERO` | skipped: no CUDA |" in md
    assert "| paged_kv_overflow [past_end] | torch | none | not_applicable |" in md


def test_unknown_probe_name_is_refused():
    with pytest.raises(SystemExit, match="unknown probe"):
        runner.discover(["no_such_probe"])


@pytest.mark.slow
def test_full_runner_run_without_cuda(tmp_path):
    """Every probe through the runner (about 35 s on 2 cores; deselected by default: -m slow)."""
    import subprocess

    res = subprocess.run([sys.executable, "-m", "conformance.tools.probes.runner", "--out", str(tmp_path), "--jobs", "2"],
                         cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "fa2_probes.json").read_text())
    assert {r["outcome"] for r in report["results"]} <= {"skipped", "not_applicable"}
    assert all(r["contract_strict"] or r["outcome"] == "not_applicable" or r["exploratory"] for r in report["results"])


def test_one_name_for_how_a_child_ended():
    from conformance.tools.subprocesses import how_it_ended, signal_name

    assert signal_name(-11) == "SIGSEGV" and signal_name(-6) == "SIGABRT"
    assert signal_name(-999) == "signal 999"
    assert how_it_ended(0) == "exit 0" and how_it_ended(3) == "exit 3" and how_it_ended(-9) == "SIGKILL"
