"""Validation of one ``token_logprobs`` call and its flattening to [N] / [N, V] rows.

The rules and messages are those of ``sdar_loss`` (``_checks``): the same tensor checks, the same label
range check (free on CPU, opt-in on CUDA), the same strided-row handling (``token_rows``: a [B, T, V] view
sliced along T is read in place), and the temperature / backend / inplace_backward checks of
``SDAROptions``. Only what is specific to this op lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import (FLOAT_DTYPES, check_logits_and_labels, check_tensor, check_token_values, mask_as_bool,
                       token_rows)
from ..sdar_loss.options import SDAROptions


@dataclass
class TokenInputs:
    """Flat views of one call, ready for any row engine."""

    logits: torch.Tensor                 # [N, V] (or a [B, T, V] view without a flat view), unit stride on V
    labels: torch.Tensor                 # [N] int64 (anything on masked rows)
    mask: torch.Tensor                   # [N] bool
    teacher_logits: torch.Tensor | None  # like logits, detached
    token_shape: torch.Size
    temperature: float
    entropy: bool                        # compute the entropy (and accept its upstream gradient)
    inplace_backward: bool
    backend: str


def prepare_token_inputs(logits, labels, *, mask=None, temperature=1.0, entropy=True, teacher_logits=None,
                         inplace_backward=False, backend="auto", op="token_logprobs",
                         label_vocab=None) -> TokenInputs:
    """Validate a ``token_logprobs`` call (ValueError naming the argument) and flatten it."""
    options = SDAROptions(temperature=temperature, inplace_backward=inplace_backward, backend=backend)
    if not isinstance(entropy, bool):
        raise ValueError(f"entropy must be a bool, got {entropy!r}")
    device, token_shape, V = check_logits_and_labels(logits, labels)
    check_tensor("teacher_logits", teacher_logits, shape=logits.shape, device=device, dtypes=FLOAT_DTYPES)
    check_tensor("mask", mask, shape=token_shape, device=device)
    if options.backend == "triton":
        from .._runtime import can_use_triton
        if not can_use_triton(logits):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                             f"logits are on {device}")

    mask_bool = mask_as_bool(mask, token_shape, device)
    labels_flat = labels.reshape(-1).to(torch.int64)
    check_token_values(labels_flat, mask_bool.reshape(-1), label_vocab or V,
                       mask_values=None if mask is None else mask.reshape(-1))
    return TokenInputs(
        logits=token_rows(logits), labels=labels_flat, mask=mask_bool.reshape(-1),
        teacher_logits=None if teacher_logits is None else token_rows(teacher_logits.detach()),
        token_shape=token_shape, temperature=options.temperature, entropy=entropy,
        inplace_backward=inplace_backward, backend=options.backend,
    )
