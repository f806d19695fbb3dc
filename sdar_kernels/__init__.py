"""sdar-kernels: fused Triton kernels for SDAR (Self-Distilled Agentic Reinforcement Learning).

Public API (docs/api.md): ``sdar_loss`` and its eager oracle
``reference.sdar_loss_reference``; ``SDAROutput`` is what both return. ``token_logprobs`` is the
per-token log-prob / entropy step with a fused backward, returning ``TokenStats``.
"""

from . import reference
from .sdar_loss import METRIC_NAMES, SDAROptions, SDAROutput, sdar_loss
from .linear_sdar_loss import linear_sdar_loss
from .data_parallel import global_counts
from .packed import packed_loss_weights
from .token_logprobs import TokenStats, linear_token_logprobs, token_logprobs

__version__ = "0.1.0"

__all__ = ["sdar_loss", "linear_sdar_loss", "SDAROutput", "SDAROptions", "METRIC_NAMES", "reference", "__version__",
           "token_logprobs", "linear_token_logprobs", "TokenStats", "global_counts", "packed_loss_weights"]
