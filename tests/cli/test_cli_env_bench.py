"""`nsa-fa2 env`, `nsa-fa2 bench`, the entry points, and argument errors."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from conformance.tools import cli

ROOT = Path(__file__).resolve().parents[2]


def test_env_json_parses_and_names_the_stack():
    # Through `python -m conformance`, the way a user or a CI job calls it.
    res = subprocess.run([sys.executable, "-m", "conformance", "env", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    for key in ("gpu", "driver", "cuda_runtime", "cuda_available", "torch", "flash_attn", "python"):
        assert key in info, f"env --json lacks {key}"
    assert info["torch"] == torch.__version__
    assert set(info["providers"]) == {"flash_attn", "torch"}
    for p in info["providers"].values():
        assert set(p) == {"usable", "version", "why_not"} and (p["usable"] or p["why_not"])
    assert info["nsa_settings"]["fa2_contracts"] in ("off", "meta", "strict")


def test_env_table_is_the_default(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "provider torch" in out and "provider flash_attn" in out and "NSA_USE_FA2" in out
    assert not out.lstrip().startswith("{")


def test_env_reports_a_bad_flag_instead_of_failing(monkeypatch, capsys):
    monkeypatch.setenv("NSA_FA2_PROVIDER", "flash-attn")  # not one of auto/flash_attn/torch
    assert cli.main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "invalid NSA_* environment" in info["nsa_settings"]["error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_without_cuda_exits_0_with_its_message(capsys):
    assert cli.main(["bench", "--branches", "win", "--T", "256"]) == 0
    assert "no CUDA device here" in capsys.readouterr().out


def test_bench_help_is_the_sweeps_own(capsys):
    assert cli.main(["bench", "--help"]) == 0
    assert "--branches" in capsys.readouterr().out
    assert cli.main(["bench", "--no-such-option"]) == 2


@pytest.mark.parametrize("argv, words", [
    (["frobnicate"], "invalid choice"),
    ([], "usage"),
    (["check", "--no-such-option"], "unrecognized arguments"),
])
def test_bad_input_exits_2_with_a_message(argv, words, capsys):
    assert cli.main(argv) == 2
    assert words in capsys.readouterr().err


def test_help_and_version_exit_0(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for sub in ("env", "check", "bench", "repro"):
        assert sub in out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("nsa-fa2 ")


def test_console_script_points_at_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["nsa-fa2"].split(":")
    assert (module, func) == ("conformance.tools.cli", "main")
    assert (ROOT / "conformance" / "__main__.py").exists()
