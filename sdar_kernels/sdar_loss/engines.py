"""Row engines: the two backends that compute the SDAR row terms (and gradient) of prepared inputs.

Each engine has the same two entry points, used by ``sdar_loss`` and by the fused-linear chunk loop:
  forward(x, weights, grad, save_stats) -> (per-token dict of [N] fp32, stats or None)
      grad given: w_t * dl_t/dz written into it (it may be the logits themselves);
      save_stats: keep what a later gradient pass needs (None when the engine recomputes instead).
  backward(x, weights, grad, stats) -> None: one gradient pass with the weights of backward.
"""

from __future__ import annotations

from .._runtime import can_use_triton
from .torch_impl import sdar_rows_torch


class TorchRows:
    """The chunked torch backend. It keeps no statistics: its backward recomputes them per chunk (on one
    device; vocabulary-parallel rows keep the whole row's statistics, vocab_parallel.py)."""

    name = "torch"

    @staticmethod
    def forward(x, weights, grad, save_stats):
        return sdar_rows_torch(x, weights, grad), None

    @staticmethod
    def backward(x, weights, grad, stats):
        sdar_rows_torch(x, weights, grad)

    # vocabulary-parallel pieces (vocab_parallel.py)
    @staticmethod
    def partials(x):
        from .vocab_parallel import torch_partials
        return torch_partials(x)

    @staticmethod
    def jsd_partials(x, stats):
        from .vocab_parallel import torch_jsd_partials
        return torch_jsd_partials(x, stats)

    @staticmethod
    def grad_from_stats(x, weights, grad, stats, label_offset, entropy_rows=None):
        from .vocab_parallel import torch_grad_from_stats
        torch_grad_from_stats(x, weights, grad, stats, label_offset, entropy_rows)


class TritonRows:
    """The Triton backend (launch.py); imported lazily so CPU-only users never load the kernels."""

    name = "triton"

    @staticmethod
    def forward(x, weights, grad, save_stats):
        from .launch import sdar_rows_triton
        return sdar_rows_triton(x, weights, grad, save_stats=save_stats)

    @staticmethod
    def backward(x, weights, grad, stats):
        from .launch import sdar_rows_triton_grad
        sdar_rows_triton_grad(x, weights, grad, stats)

    # vocabulary-parallel pieces (vocab_parallel.py)
    @staticmethod
    def partials(x):
        from .launch import partials_triton
        return partials_triton(x)

    @staticmethod
    def jsd_partials(x, stats):
        from .launch import jsd_partials_triton
        return jsd_partials_triton(x, stats)

    @staticmethod
    def grad_from_stats(x, weights, grad, stats, label_offset, entropy_rows=None):
        from dataclasses import replace

        from .launch import sdar_rows_triton_grad
        # the gradient kernel matches the label against the shard's own columns: shift it into the shard
        sdar_rows_triton_grad(replace(x, labels=x.labels - label_offset), weights, grad, stats, entropy_rows)


ENGINES = {"torch": TorchRows, "triton": TritonRows}


def pick_engine(backend: str, tensor) -> str:
    """The engine name for ``backend`` ("auto" | "triton" | "torch") and the device of ``tensor``."""
    if backend == "torch":
        return "torch"
    if backend == "triton" or tensor.is_cuda and can_use_triton(tensor):
        return "triton"
    return "torch"
