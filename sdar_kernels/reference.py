"""``sdar_kernels.reference``: the plain eager PyTorch oracles of every op (readable, fp32 / fp64)."""

from .sdar_loss.reference import sdar_loss_reference
from .linear_sdar_loss.reference import linear_sdar_loss_reference
from .token_logprobs.reference import linear_token_logprobs_reference, token_logprobs_reference

__all__ = ["sdar_loss_reference", "linear_sdar_loss_reference", "token_logprobs_reference",
           "linear_token_logprobs_reference"]
