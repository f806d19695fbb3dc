"""Where the Triton kernels can run. Never touches triton's driver at import time (it raises on CPU)."""

from __future__ import annotations

import functools
import os

import torch


def is_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a Linux dependency
        return False
    return True


def can_use_triton(t: torch.Tensor) -> bool:
    """Triton can run on this tensor: CUDA, or any CPU tensor under the interpreter."""
    if not triton_available():
        return False
    return t.is_cuda or (is_interpreter() and t.device.type == "cpu")
