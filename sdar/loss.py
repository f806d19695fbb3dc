"""``SDARLoss``: an nn.Module around :func:`sdar_kernels.sdar_loss` holding an :class:`SDARConfig`."""

from __future__ import annotations

import torch

import sdar_kernels

from .config import SDARConfig


class SDARLoss(torch.nn.Module):
    """``SDARLoss(config)(logits, labels, **tensors)`` -> ``SDAROutput``.

    Tensor arguments (teacher_logits / teacher_logprobs, mask, advantages, old_logprobs, ref_logprobs,
    loss_weights, num_tokens) are passed through; the hyperparameters come from the config. With
    ``config.use_policy_gradient`` False (OPSD) the advantages are dropped. ``reduction``,
    ``inplace_backward`` and ``backend`` are module settings.
    """

    def __init__(self, config: SDARConfig | None = None, *, reduction="mean", inplace_backward=False,
                 backend="auto"):
        super().__init__()
        self.config = config or SDARConfig()
        self.reduction, self.inplace_backward, self.backend = reduction, inplace_backward, backend

    def forward(self, logits, labels, **tensors):
        if not self.config.use_policy_gradient:
            tensors.pop("advantages", None)
            tensors.pop("old_logprobs", None)
        # kl_coef > 0 (the official 0.01) needs ref_logprobs: sdar_loss raises if they are missing
        return sdar_kernels.sdar_loss(logits, labels, **tensors, **self.config.loss_kwargs(),
                                      reduction=self.reduction,
                                      inplace_backward=self.inplace_backward, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.config}, reduction={self.reduction!r}, backend={self.backend!r}"
