"""``python -m growlib``: the command line (growlib.cli)."""

import sys

from growlib.cli import main

sys.exit(main())
