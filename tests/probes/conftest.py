# --import-mode=importlib keeps test folders off sys.path; the probe tests share probes_testkit.py.
import sys
from pathlib import Path

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
