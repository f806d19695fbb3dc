"""``python -m bench [--quick]``: the project's benchmark (see bench/run.py and bench/README.md)."""

import sys

from .run import main

sys.exit(main())
