"""The integrations are optional: importing sdar (or sdar.integrations) imports neither TRL nor verl."""

import subprocess
import sys


def test_importing_sdar_imports_no_trainer():
    code = ("import sys, sdar, sdar.integrations, sdar_kernels\n"
            "bad = [m for m in ('trl', 'verl', 'ray') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
