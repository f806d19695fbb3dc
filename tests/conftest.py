"""Test setup: run Triton kernels in the CPU interpreter when there is no GPU, seed everything.

TRITON_INTERPRET must be set before triton is imported anywhere (triton.jit reads it at decoration
time), so it is set here, at the top of conftest, before any test module imports the kernels.
"""

import os

try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    """The device the Triton kernels run on: CUDA if present, else CPU through the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
