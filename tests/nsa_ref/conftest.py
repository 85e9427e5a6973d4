# --import-mode=importlib keeps test folders off sys.path; the nsa_ref tests share one helper
# module (nsa_ref_testkit.py), so this folder is put on it here, once.
import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    # These tensors are tiny: extra intra-op threads only contend for the shared CPUs (a full
    # gradcheck ran 20x slower with 2 threads on a loaded 2-core machine than with 1).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
