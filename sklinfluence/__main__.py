"""``python -m sklinfluence``: the command line (see :mod:`sklinfluence.cli`)."""

import sys

from .cli import main

sys.exit(main())
