# --import-mode=importlib keeps test folders off sys.path; the contracts tests share one helper
# module (contracts_testkit.py), so this folder is put on it here, once.
import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
