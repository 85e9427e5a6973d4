"""Every ```python block of README.md and Documentation/**/*.md runs, each in a fresh namespace.

A block is skipped only when it is marked: the closest non-blank line before its opening fence is
``<!-- no-run -->``, or it uses a GPU (``device="cuda"``, ``.cuda()``, ``torch.cuda.``) on a
machine without one. The environment, the ``nsa_ref`` logger level and the telemetry counters are
restored after each block, so blocks cannot leak into each other or into other tests.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NO_RUN = "<!-- no-run -->"
_FENCE = re.compile(r"^```python[ \t]*$")
_GPU = re.compile(r"""device\s*=\s*["']cuda|\.cuda\(|torch\.cuda\.""")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "Documentation").glob("**/*.md"))]


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line of the opening fence, code, marked no-run) for each ```python block of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if _FENCE.match(lines[i].strip()):
            start = i
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"{path}:{start + 1}: ```python block is never closed")
            blocks.append((start + 1, "\n".join(body) + "\n", previous == NO_RUN))
        i += 1
    return blocks


def _cases():
    cases = []
    for path in doc_files():
        for line, code, no_run in python_blocks(path):
            rel = path.relative_to(ROOT).as_posix()
            cases.append(pytest.param(rel, line, code, no_run, id=f"{rel}:{line}"))
    return cases


@pytest.fixture
def isolated():
    """Restore os.environ, the nsa_ref logger level and the telemetry counters after a block."""
    from nsa_ref import telemetry
    from nsa_ref.settings import current_settings

    env = dict(os.environ)
    logger = logging.getLogger("nsa_ref")
    level = logger.level
    telemetry.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; extra threads only contend on shared CPUs
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(env)
        current_settings()  # re-read now: a later torch.compile trace uses the settings read last
        logger.setLevel(level)
        telemetry.reset()


@pytest.mark.parametrize("doc, line, code, no_run", _cases())
def test_doc_example_runs(doc, line, code, no_run, isolated, capsys):
    if no_run:
        pytest.skip(f"{doc}:{line} is marked {NO_RUN}")
    if _GPU.search(code) and not torch.cuda.is_available():
        pytest.skip(f"{doc}:{line} uses a GPU and there is none here")
    namespace = {"__name__": f"doc_example_{Path(doc).stem}_{line}"}
    try:
        exec(compile(code, f"{doc}:{line}", "exec"), namespace)
    except Exception as exc:
        out = capsys.readouterr().out
        raise AssertionError(f"the example at {doc}:{line} failed: {type(exc).__name__}: {exc}\n"
                             f"its output so far:\n{out}") from exc


def test_the_docs_have_examples_to_run():
    counts = {path.relative_to(ROOT).as_posix(): len(python_blocks(path)) for path in doc_files()}
    for doc in ("Documentation/Architecture/FA2_Integration_Guide_for_NSA.md", "Documentation/Rollout.md",
                "Documentation/Troubleshooting_FA2.md"):
        assert counts.get(doc, 0) > 0, f"{doc} has no ```python example: {counts}"


def test_block_extraction_rules(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n```python\nprint(1)\n```\n\n<!-- no-run -->\n\n```python\nraise SystemExit\n```\n"
        "```bash\necho no\n```\n```python   \nx = 2\n```\n",
        encoding="utf-8",
    )
    assert python_blocks(doc) == [(2, "print(1)\n", False), (8, "raise SystemExit\n", True), (14, "x = 2\n", False)]
    doc.write_text("```python\nprint(1)\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="never closed"):
        python_blocks(doc)


@pytest.mark.parametrize("code, gpu", [
    ('x = torch.zeros(3, device="cuda")', True),
    ("x = torch.zeros(3).cuda()", True),
    ("torch.cuda.synchronize()", True),
    ('reason = "FA-2 needs CUDA"', False),
])
def test_gpu_blocks_are_recognised(code, gpu):
    assert bool(_GPU.search(code)) is gpu
