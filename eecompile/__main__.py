"""``python -m eecompile``: the command line."""

import sys

from eecompile.cli import main

sys.exit(main())
