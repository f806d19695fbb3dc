"""Per-token log-probs and entropy with a fused backward (the trainer seam). Math: README.md in this folder."""

from .distill import gated_distill
from .function import token_logprobs
from .linear import linear_token_logprobs
from .output import TokenStats
from .reference import linear_token_logprobs_reference, token_logprobs_reference

__all__ = ["token_logprobs", "linear_token_logprobs", "TokenStats", "token_logprobs_reference",
           "linear_token_logprobs_reference", "gated_distill"]
