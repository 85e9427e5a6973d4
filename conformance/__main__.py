"""``python -m conformance ...`` is the ``nsa-fa2`` command (see ``conformance.tools.cli``)."""
import sys

from conformance.tools.cli import main

sys.exit(main())
