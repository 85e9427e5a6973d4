# --import-mode=importlib keeps test folders off sys.path; the nsa_ref tests share one helper
# module (nsa_ref_testkit.py), so this folder is put on it here, once.
import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest


@pytest.fixture(autouse=True)
def _one_intra_op_thread(one_cpu_thread):
    """Every test here runs with one intra-op thread (``conformance.plugin.one_cpu_thread``)."""
    yield
