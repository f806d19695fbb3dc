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

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--fused-eager", action="store_true",
                     help="run every call of the torch engine through its fused formulation (torch_fused.py, "
                          "the one large CPU calls compile), eagerly: that formulation's math on any test "
                          "without compiling (tests/test_torch_compiled.py runs the torch tests this way)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fused_eager(request, monkeypatch):
    if not request.config.getoption("--fused-eager"):
        return
    from sdar_kernels import compiled
    monkeypatch.setattr(compiled, "wanted", lambda device, elements: True)
    monkeypatch.setattr(compiled, "cached",
                        lambda fn, *, device, key=(), **constants: functools.partial(fn, **constants))


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
