"""Where the Triton kernels can run. Never touches triton's driver at import time (it raises on CPU)."""

from __future__ import annotations

import importlib.util
import os

import torch


def is_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Whether the triton package is installed (found without importing it). A module constant, not a cached
# call: torch.compile traces can_use_triton and should see a plain Python value.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def can_use_triton(t: torch.Tensor) -> bool:
    """Triton can run on this tensor: CUDA, or any CPU tensor under the interpreter."""
    if not TRITON_INSTALLED:
        return False
    return t.is_cuda or (is_interpreter() and t.device.type == "cpu")
