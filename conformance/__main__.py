"""``python -m conformance ...`` is the ``nsa-fa2`` command (see ``conformance.cli``)."""
import sys

from conformance.cli import main

sys.exit(main())
