"""Known deviations (conformance.known_deviations): loading, matching, and strict xfails in a run."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conformance.known_deviations import KnownDeviationsError, load

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dev.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_patterns_take_brackets_literally_and_star_as_anything(tmp_path):
    known = load(_write(tmp_path, """
        implementation: x 1.0
        deviations:
          - rule: NSA-WIN
            why: w + 1 keys
            upstream: none
            tests: ["conformance/test_win.py::test_win_matches_brute[tied16-T=15-*]"]
    """))
    hit = known.match("conformance/test_win.py::test_win_matches_brute[tied16-T=15-G=16-Hq=16-Dk=32-Dv=32]")
    assert hit is not None and hit.reason().startswith("known deviation [NSA-WIN]: w + 1 keys")
    assert known.match("conformance/test_win.py::test_win_matches_brute[tied16-T=1-G=16]") is None
    assert known.match("conformance/test_win.py::test_win_matches_brute[t]") is None  # '[' is no class


@pytest.mark.parametrize("body, message", [
    ("deviations: 3", "expected a mapping with a 'deviations' list"),
    ("deviations: [{rule: NSA-WIN, why: a, upstream: b}]", "missing tests"),
    ("deviations: [{rule: NSA-NOPE, why: a, upstream: b, tests: [x]}]", "unknown rule 'NSA-NOPE'"),
    ("deviations: [{rule: NSA-WIN, why: a, upstream: b, tests: x}]", "list of node-id patterns"),
    ("deviations: [: bad", "not valid YAML"),
])
def test_bad_files_are_refused_with_the_entry_and_the_fix(tmp_path, body, message):
    with pytest.raises(KnownDeviationsError, match=message):
        load(_write(tmp_path, body))
    with pytest.raises(KnownDeviationsError, match="cannot read it"):
        load(tmp_path / "missing.yaml")


def test_fla_file_is_valid_and_names_reviewed_rules():
    known = load(REPO / "conformance" / "adapters" / "fla_known_deviations.yaml")
    assert {d.rule for d in known.deviations} == {"NSA-SCALE", "NSA-FINITE", "NSA-SEL-TIES"}
    assert all("FINDINGS.md" in d.why for d in known.deviations)


def test_strict_xfail_in_a_run_and_xpass_fails(tmp_path):
    """A recorded deviation is an xfail; the same entry on a test that passes fails the run."""
    (tmp_path / "wide_win.py").write_text(textwrap.dedent("""
        import nsa_ref

        def win(q, k, v, cfg, cu_seqlens=None):  # one key too many: w + 1
            return nsa_ref.win_attention(q, k, v, cfg.model_copy(update={"window": cfg.window + 1}), cu_seqlens,
                                         backend="reference")
    """))
    dev = _write(tmp_path, """
        deviations:
          - rule: NSA-WIN
            why: w + 1 keys
            upstream: none
            tests: ["conformance/test_win.py::test_win_matches_brute[tied16-T=100-*]",
                    "conformance/test_win.py::test_win_matches_brute[tied32-T=1-*]"]
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    ids = [f"conformance/test_win.py::test_win_matches_brute[{fam}-T={T}-G=16-Hq=16-Dk=32-Dv=32]"
           for fam, T in (("tied16", 100), ("tied32", 1))]
    run = subprocess.run([sys.executable, "-m", "pytest", *ids, "-q", "-p", "no:cacheprovider",
                          "--nsa-win-impl=wide_win:win", f"--nsa-known-deviations={dev}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    # tied16 T=100 misses (known deviation, xfailed); T=1 has one key, the wider window cannot show: XPASS(strict) fails.
    assert run.returncode == 1, out[-2000:]
    assert "1 xfailed" in out and "XPASS(strict)" in out, out[-2000:]
    assert "1 known deviation(s)" in out, out[-2000:]
