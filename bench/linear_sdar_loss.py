"""Benchmark of ``sdar_kernels.linear_sdar_loss`` alone: ``python -m bench.linear_sdar_loss [--quick] [python -m bench options]``.

The cases live in bench/cases.py and the providers in bench/providers.py; this is ``python -m bench --op linear_sdar_loss``.
"""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main(["--op", "linear_sdar_loss", *sys.argv[1:]]))
