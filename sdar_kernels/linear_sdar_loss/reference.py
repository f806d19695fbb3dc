"""Plain eager reference of the fused-linear SDAR loss: materialise the logits, call the SDAR oracle.

Readable over fast: logits = hidden @ weight.T (+ bias) as full [N, V] fp32 tensors (operands upcast
first, so there is no low-precision rounding of the logits), teacher logits the same under no_grad,
then ``sdar_loss_reference``; autograd gives the gradients of hidden, weight and bias. Imports nothing
from the fused path.
"""

from __future__ import annotations

import torch

from ..sdar_loss.reference import sdar_loss_reference


def linear_sdar_loss_reference(hidden, weight, labels, *, bias=None, teacher_hidden=None,
                               teacher_weight=None, teacher_bias=None, **kwargs):
    """Same signature and semantics as :func:`sdar_kernels.linear_sdar_loss` (plus ``compute_dtype``,
    passed to ``sdar_loss_reference``). The logits are formed in fp32."""
    f32 = torch.float32
    logits = hidden.to(f32) @ weight.to(f32).T
    if bias is not None:
        logits = logits + bias.to(f32)
    teacher_logits = None
    if teacher_hidden is not None:
        if teacher_weight is None:
            teacher_weight = weight
            teacher_bias = bias if teacher_bias is None else teacher_bias
        with torch.no_grad():
            teacher_logits = teacher_hidden.to(f32) @ teacher_weight.to(f32).T
            if teacher_bias is not None:
                teacher_logits = teacher_logits + teacher_bias.to(f32)
    return sdar_loss_reference(logits, labels, teacher_logits=teacher_logits, **kwargs)
