"""Set-up for the Triton kernel tests (nsa_ref.triton_kernels).

- No Triton: every test here is skipped, with the command that installs it.
- CUDA available: the kernels run compiled on the GPU; nothing else happens here.
- CPU only: the kernels run through Triton's interpreter. ``triton.jit`` picks the interpreter when
  a kernel is *decorated*, so TRITON_INTERPRET=1 is set while Triton and the kernel modules are
  imported, then put back as it was (unset if it was unset): the other test folders of the same
  session still see the environment they started with. Tests that go through the router (whose
  ``triton_refusal`` reads the variable at call time) take the ``interpret_env`` fixture.

Nothing here touches CUDA except ``torch.cuda.is_available()``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# --import-mode=importlib keeps test folders off sys.path; the tests here share triton_testkit.py.
_HERE = Path(__file__).parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

INSTALL_HINT = "pip install -e '.[interpreter]'"
#: Kernel modules, each with one of its kernels (to tell whether it was built for the interpreter).
KERNEL_MODULES = {
    "nsa_ref.triton_kernels.scoring": "_topn_kernel",
    "nsa_ref.triton_kernels.selected": "_sel_fwd_kernel",
    "nsa_ref.triton_kernels.decode_select": "_decode_select_kernel",
    "nsa_ref.triton_kernels.decode_sel": "_decode_sel_kernel",
    "nsa_ref.triton_kernels.decode_append": "_append_kernel",
    "nsa_ref.triton_kernels.combine": "_combine_fwd_kernel",
}
#: The interpreter computes exp2/log2 on masked lanes too (-inf - -inf, log2(0)); numpy warns.
NUMPY_LANE_WARNINGS = "ignore:.*encountered in:RuntimeWarning:triton"


def _version(text: str) -> tuple[int, ...]:
    """'3.6.0+git1234' -> (3, 6)."""
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


def _import_for_interpreter() -> str | None:
    """Import Triton and the kernel modules with TRITON_INTERPRET=1; -> skip reason or None."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        try:
            import triton  # noqa: F401
            import triton.language as tl
        except ImportError as exc:
            return f"Triton does not import ({exc}): {INSTALL_HINT}"
        try:
            # Triton imports its Gluon front end lazily at the first launch, and Gluon asserts that
            # the interpreter is on when Triton's language library was built for it: import it now.
            import triton.experimental.gluon  # noqa: F401
        except ImportError:
            pass
        if not _interpreted(tl.standard.sum):
            return (
                "Triton was imported before tests/triton_kernels/conftest.py could set TRITON_INTERPRET=1 "
                "(torch._dynamo imports it, for one), so its language library is built for the GPU compiler "
                "and cannot run in the CPU interpreter. Run `TRITON_INTERPRET=1 python -m pytest ...`, "
                "or this folder on its own"
            )
        for name, kernel in KERNEL_MODULES.items():
            module = sys.modules.get(name)
            if module is None:
                importlib.import_module(name)
            elif not _interpreted(getattr(module, kernel)):
                importlib.reload(module)  # imported earlier without the interpreter: rebuild
        return None
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _prepare() -> str | None:
    """-> why every test here must be skipped, or None (and the kernels are ready to run)."""
    if importlib.util.find_spec("triton") is None:
        return f"Triton is not installed; on a CPU-only machine: {INSTALL_HINT} (Triton >= 3.7, run by its interpreter)"
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"Triton does not import ({exc}): {INSTALL_HINT}"
        return None
    import numpy

    triton_v = _version(importlib.metadata.version("triton"))
    if triton_v < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (
            f"Triton {importlib.metadata.version('triton')} with numpy {numpy.__version__}: Triton 3.6's interpreter "
            "fails on data-dependent loop bounds with numpy >= 2.4. Install Triton >= 3.7 for the interpreter: "
            f"{INSTALL_HINT}"
        )
    return _import_for_interpreter()


#: TRITON_INTERPRET as the session had it before this file ran (the tests check it was put back).
INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")
SKIP_REASON = _prepare()


def pytest_collection_modifyitems(config, items):
    # A conftest hook sees the whole session's items: touch only this folder's.
    for item in items:
        if _HERE not in Path(item.path).parents:
            continue
        item.add_marker(pytest.mark.filterwarnings(NUMPY_LANE_WARNINGS))
        if SKIP_REASON is not None:
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def kdev() -> str:
    """Device the kernels run on: "cuda" where there is a GPU, else "cpu" (Triton's interpreter)."""
    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip(f"GPU of compute capability {major}.{minor}: the Triton kernels need sm80 or newer")
    return "cuda"


@pytest.fixture
def interpret_env(monkeypatch, kdev):
    """TRITON_INTERPRET=1 for one test on CPU, so the router lets backend='triton' run there."""
    if kdev == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture(scope="session")
def interpret_at_start() -> str | None:
    """TRITON_INTERPRET before this conftest imported the kernels (None: unset)."""
    return INTERPRET_AT_START


@pytest.fixture(scope="session")
def scoring():
    """nsa_ref.triton_kernels.scoring (imported here so that a missing Triton is a skip, not an error)."""
    return importlib.import_module("nsa_ref.triton_kernels.scoring")


@pytest.fixture(scope="session")
def selected():
    """nsa_ref.triton_kernels.selected."""
    return importlib.import_module("nsa_ref.triton_kernels.selected")


@pytest.fixture(autouse=True)
def _one_intra_op_thread(one_cpu_thread):
    """Every test here runs with one intra-op thread (``conformance.plugin.one_cpu_thread``)."""
    yield
