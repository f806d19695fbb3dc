"""What ``token_logprobs`` / ``linear_token_logprobs`` and their references return."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenStats:
    """Per-token statistics in the token shape of the input (``logits.shape[:-1]``), fp32, 0 on masked tokens.

    ``logprobs`` (log p(y) at the temperature) and ``entropy`` carry gradients to the logits (or hidden
    states and lm_head); ``entropy`` is None when computed with ``entropy=False``. ``teacher_logprobs`` is
    the teacher's log-prob of the same tokens, detached, or None without teacher logits.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
