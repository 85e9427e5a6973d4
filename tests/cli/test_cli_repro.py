"""`nsa-fa2 repro`: one probe script in its own process; clear answers for unknown or missing probes."""
from __future__ import annotations

import signal
import sys

import pytest

from conformance.tools import cli

PROBE_OK = '''"""Exits with 3 and prints its arguments."""
import sys
print("probe args:", sys.argv[1:])
sys.exit(3)
'''
PROBE_CRASH = '''"""Dies by SIGABRT, as an FA-2 crash would."""
import os, signal
os.kill(os.getpid(), signal.SIGABRT)
'''


@pytest.fixture
def probes(tmp_path, monkeypatch):
    folder = tmp_path / "probes"
    folder.mkdir()
    (folder / "alpha.py").write_text(PROBE_OK, encoding="utf-8")
    (folder / "crash.py").write_text(PROBE_CRASH, encoding="utf-8")
    (folder / "_common.py").write_text('"""helpers, not a probe"""\n', encoding="utf-8")
    (folder / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.setattr(cli, "probes_dir", lambda: folder)
    return folder


def test_unknown_probe_lists_the_available_ones(probes, capsys):
    assert cli.main(["repro", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown probe 'nope'" in err and "alpha" in err and "crash" in err
    assert "_common" not in err and "__init__" not in err
    assert "Exits with 3 and prints its arguments." in err  # each probe's docstring summary


@pytest.mark.parametrize("name", ["../alpha", "alpha/../alpha", "_common", "-x.py", ""])
def test_names_outside_the_folder_are_unknown(probes, name, capsys):
    assert cli.main(["repro", name]) == 2


def test_list(probes, capsys):
    assert cli.main(["repro", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("available probes:") and "alpha" in out


def test_runs_a_probe_with_its_arguments_and_returns_its_exit_code(probes, capfd):
    assert cli.main(["repro", "alpha", "--provider", "torch"]) == 3
    out = capfd.readouterr().out
    assert "probe args: ['--provider', 'torch']" in out and "exited with 3" in out
    assert cli.main(["repro", "alpha.py"]) == 3  # the file name works too


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_probe_killed_by_a_signal_is_reported(probes, capfd):
    assert cli.main(["repro", "crash"]) == 128 + signal.SIGABRT
    assert "killed by SIGABRT" in capfd.readouterr().out


def test_missing_probes_folder_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "probes_dir", lambda: tmp_path / "probes")
    assert cli.main(["repro", "heads_kv_zero"]) == 2
    assert "is not there yet" in capsys.readouterr().err


def test_empty_probes_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "probes").mkdir()
    monkeypatch.setattr(cli, "probes_dir", lambda: tmp_path / "probes")
    assert cli.main(["repro", "x"]) == 2
    assert "no probes in" in capsys.readouterr().err
