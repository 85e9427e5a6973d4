"""Reviewed, known deviations of an implementation under test (array-api-tests' ``xfails.txt``).

A deviation the suite found, checked by hand (a minimal repro against the brute force) and
reported upstream, is recorded in a YAML file next to the adapter::

    implementation: fla-core 0.6.0
    deviations:
      - rule: NSA-WIN
        why: the window branch calls flash_attn without softmax_scale, so cfg.scale never reaches it
        upstream: not filed yet (repro in artifacts/.../FINDINGS.md)
        tests:                       # node ids; * matches anything (brackets are literal)
          - "conformance/test_nsa.py::test_nsa_matches_brute[tied16-*]"

``pytest --nsa-known-deviations=FILE`` turns every matching test into a *strict* xfail that only
an ``AssertionError`` satisfies: the implementation's CI stays green on the known bug, a crash
still fails, and the day upstream fixes it the test XPASSes and fails, so the entry is removed.
Known deviations count as applicable and show as such in the per-rule report.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from conformance.nsa_rules import RULES


def _glob(pattern: str) -> re.Pattern:
    """A node-id pattern: ``*`` matches anything, every other character (``[``, ``]`` of the
    parameter ids included) only itself."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


class KnownDeviationsError(ValueError):
    """The file cannot be used; the message names the file, the entry and the fix."""


@dataclass(frozen=True)
class Deviation:
    """One reviewed deviation: the rule it breaks, why, where it is reported, and its tests."""

    rule: str
    why: str
    upstream: str
    tests: tuple[str, ...]

    def reason(self) -> str:
        return f"known deviation [{self.rule}]: {self.why} (upstream: {self.upstream})"

    def matches(self, nodeid: str) -> bool:
        return any(_glob(pattern).fullmatch(nodeid) for pattern in self.tests)


@dataclass(frozen=True)
class KnownDeviations:
    implementation: str
    deviations: tuple[Deviation, ...]

    def match(self, nodeid: str) -> Deviation | None:
        """The first deviation whose patterns match ``nodeid``, or None."""
        return next((d for d in self.deviations if d.matches(nodeid)), None)


def load(path: str | Path) -> KnownDeviations:
    """Read and check a known-deviations file (every entry needs a known rule id, a why, an
    upstream note and at least one test pattern)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise KnownDeviationsError(f"--nsa-known-deviations={path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise KnownDeviationsError(f"--nsa-known-deviations={path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("deviations"), list):
        raise KnownDeviationsError(f"{path}: expected a mapping with a 'deviations' list")
    out = []
    for i, entry in enumerate(data["deviations"]):
        where = f"{path}: deviations[{i}]"
        if not isinstance(entry, dict):
            raise KnownDeviationsError(f"{where}: expected a mapping with rule, why, upstream, tests")
        missing = [k for k in ("rule", "why", "upstream", "tests") if not entry.get(k)]
        if missing:
            raise KnownDeviationsError(f"{where}: missing {', '.join(missing)}")
        if entry["rule"] not in RULES:
            raise KnownDeviationsError(f"{where}: unknown rule {entry['rule']!r}; known: {', '.join(RULES)}")
        tests = entry["tests"]
        if isinstance(tests, str) or not all(isinstance(t, str) for t in tests):
            raise KnownDeviationsError(f"{where}: 'tests' must be a list of node-id patterns")
        out.append(Deviation(entry["rule"], str(entry["why"]).strip(), str(entry["upstream"]).strip(), tuple(tests)))
    return KnownDeviations(str(data.get("implementation", "")), tuple(out))
