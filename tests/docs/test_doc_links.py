"""Relative links in the FA-2 documents point at files (and anchors) that exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    "Documentation/Architecture/FA2_Integration_Guide_for_NSA.md",
    "Documentation/Troubleshooting_FA2.md",
    "Documentation/Rollout.md",
]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    explicit = set(re.findall(r'<a id="([^"]+)"></a>', text))
    # GitHub-style heading anchors: lower case, punctuation dropped, spaces to hyphens.
    headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}
    return explicit | headings


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    path = ROOT / doc
    problems = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{target}: no anchor #{anchor} in {dest.name}")
    assert not problems, f"{doc}:\n" + "\n".join(problems)


PROBE_MENTION = re.compile(r"nsa-fa2 repro ([a-z_][a-z0-9_]*)")


def test_probes_named_in_the_docs_exist():
    probes = ROOT / "conformance" / "tools" / "probes"
    if not probes.is_dir():
        pytest.skip("conformance/tools/probes/ is not in this checkout yet")
    named = {name for doc in DOCS for name in PROBE_MENTION.findall((ROOT / doc).read_text(encoding="utf-8"))}
    missing = sorted(n for n in named if not (probes / f"{n}.py").is_file())
    assert named, "the docs name probes to reproduce the crash rules"
    assert not missing, f"the docs name probes that conformance/tools/probes/ does not have: {missing}"
