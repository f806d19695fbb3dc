"""``LinearSDARLoss``: an nn.Module around :func:`sdar_kernels.linear_sdar_loss` holding an SDARConfig."""

from __future__ import annotations

import torch

import sdar_kernels

from .config import SDARConfig


class LinearSDARLoss(torch.nn.Module):
    """``LinearSDARLoss(config)(hidden, lm_head, labels, **tensors)`` -> ``SDAROutput``.

    ``lm_head``: the [V, H] weight tensor, or an ``nn.Linear`` (its weight and bias are used). Teacher:
    ``teacher_hidden=`` (shares the student head unless ``teacher_weight`` / ``teacher_bias`` are given)
    or ``teacher_logprobs=``. The other tensor arguments (mask, advantages, old_logprobs, ref_logprobs,
    loss_weights, num_tokens) pass through; the hyperparameters come from the config. With
    ``config.use_policy_gradient`` False (OPSD) the advantages are dropped. ``reduction`` and ``backend``
    are module settings. ``sdar.hf.lm_head_inputs`` gets (hidden, weight, bias) out of a HF causal LM.
    """

    def __init__(self, config: SDARConfig | None = None, *, reduction="mean", backend="auto"):
        super().__init__()
        self.config = config or SDARConfig()
        self.reduction, self.backend = reduction, backend

    def forward(self, hidden, lm_head, labels, *, bias=None, **tensors):
        if isinstance(lm_head, torch.nn.Linear):
            if bias is not None:
                raise ValueError("pass bias only with a weight tensor, not with an nn.Linear lm_head")
            weight, bias = lm_head.weight, lm_head.bias
        else:
            weight = lm_head
        if not self.config.use_policy_gradient:
            tensors.pop("advantages", None)
            tensors.pop("old_logprobs", None)
        # kl_coef > 0 (the official 0.01) needs ref_logprobs: linear_sdar_loss raises if they are missing
        return sdar_kernels.linear_sdar_loss(hidden, weight, labels, bias=bias, **tensors,
                                             **self.config.loss_kwargs(), reduction=self.reduction,
                                             backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.config}, reduction={self.reduction!r}, backend={self.backend!r}"
