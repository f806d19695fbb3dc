"""Input validation and normalisation shared by every SDAR op and backend.

Everything here is shape/dtype/device logic plus the aggregation weights of LOSS.md section 3; there is
no loss math. Messages name the offending argument. Nothing here synchronises with a CUDA device: the
label range is checked where it is free (CPU tensors) and, on CUDA, only with
``SDAR_KERNELS_CHECK_LABELS=1`` (the kernels poison the row with NaN instead of reading out of range).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

import torch

from .sdar_loss.options import SDAROptions

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class PreparedInputs:
    """Flat [N] / [N, V] views of one call's tensors, ready for any backend."""

    logits: torch.Tensor                  # [N, V] (or [B, T, V] without a flat view), unit stride along V
    labels: torch.Tensor                  # [N] int64
    mask: torch.Tensor                    # [N] bool
    weights: torch.Tensor                 # [N] fp32: d(loss)/d(l_t); 0 on masked rows
    teacher_logits: torch.Tensor | None   # like logits (detached)
    teacher_logprobs: torch.Tensor | None  # [N] fp32
    advantages: torch.Tensor | None       # [N] fp32
    old_logprobs: torch.Tensor | None     # [N] fp32
    ref_logprobs: torch.Tensor | None     # [N] fp32
    token_shape: torch.Size
    options: SDAROptions


def token_rows(t):
    """``t`` [..., V] as rows of the vocabulary without copying where possible.

    Returns an [N, V] view, or, for a [B, T, V] tensor that has no such view (e.g. ``logits[:, :-1]``
    cut from [B, T + 1, V] model outputs), the 3-D tensor itself: the kernels index its rows as
    (b, t) with its own strides, so the usual slice costs no [N, V] copy. Only a non-unit stride
    along V, or a >3-D input without a flat view, is copied.
    """
    V = t.shape[-1]
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, V)
    except RuntimeError:
        return t if t.dim() == 3 else t.reshape(-1, V)


def check_tensor(name, t, *, shape=None, device=None, dtypes=None, allow_none=True):
    if t is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def _check_labels_in_range(labels, mask, vocab):
    """Raise if an unmasked label is outside [0, V). Free on CPU; a host sync on CUDA, so opt-in there."""
    if labels.is_cuda and os.environ.get("SDAR_KERNELS_CHECK_LABELS", "0") in ("", "0"):
        return
    bad = ((labels < 0) | (labels >= vocab)) & mask
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels must lie in [0, {vocab}) on unmasked tokens; flat token {first} has "
            f"label {int(labels[first])}")


def _check_num_tokens(num_tokens, device):
    if num_tokens is None:
        return None
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1 or not num_tokens.dtype.is_floating_point and num_tokens.dtype not in (
                torch.int32, torch.int64):
            raise ValueError("num_tokens must be a positive number or a one-element numeric tensor")
        return num_tokens.reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Real) or not (num_tokens > 0) \
            or num_tokens == float("inf"):
        raise ValueError(f"num_tokens must be a positive finite number, got {num_tokens!r}")
    return float(num_tokens)


def aggregation_weights(mask2d, options, *, loss_weights=None, num_tokens=None):
    """w_t of LOSS.md section 3 on the token shape of ``mask2d`` (bool), returned flat [N] fp32.

    reduction "sum" / "none" use w = m (the loss is sum(m*l) / m*l); "mean" uses the mode's weights,
    or ``loss_weights * m`` when explicit weights are given.
    """
    m = mask2d.to(torch.float32)
    if options.reduction != "mean":
        return m.reshape(-1)
    if loss_weights is not None:
        # where(), not a product: a NaN weight on a masked token must not make the loss NaN
        return torch.where(mask2d, loss_weights.to(torch.float32), 0.0).reshape(-1)
    mode = options.loss_agg_mode
    if mode == "token-mean":
        denom = num_tokens if num_tokens is not None else m.sum().clamp_min(1.0)
        return (m / denom).reshape(-1)
    if m.dim() != 2:
        raise ValueError(f"loss_agg_mode={mode!r} needs [B, T, V] logits (sequence structure); "
                         f"got token shape {tuple(m.shape)}; pass loss_weights for flat inputs")
    B, T = m.shape
    if mode == "seq-mean-token-sum":
        return (m / B).reshape(-1)
    if mode == "seq-mean-token-mean":
        return (m / (m.sum(-1, keepdim=True).clamp_min(1.0) * B)).reshape(-1)
    return (m / T).reshape(-1)  # seq-mean-token-sum-norm


def check_logits_and_labels(logits, labels):
    """The checks every logits op shares: [..., V] float logits and integer labels of their token shape.
    Returns (device, token_shape, V)."""
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, allow_none=False)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V] with at least 2 dims, got shape {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    device, token_shape, V = logits.device, logits.shape[:-1], logits.shape[-1]
    check_tensor("labels", labels, shape=token_shape, device=device, allow_none=False)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    return device, token_shape, V


def normalize_inputs(logits, labels, *, teacher_logits=None, teacher_logprobs=None, mask=None,
                     advantages=None, old_logprobs=None, ref_logprobs=None, loss_weights=None,
                     num_tokens=None, **option_kwargs) -> PreparedInputs:
    """Validate one call of the SDAR loss and flatten it to [N] / [N, V]. Raises ValueError."""
    options = SDAROptions(**option_kwargs)
    device, token_shape, V = check_logits_and_labels(logits, labels)

    if teacher_logits is not None and teacher_logprobs is not None:
        raise ValueError("pass at most one teacher form: teacher_logits or teacher_logprobs, not both")
    check_tensor("teacher_logits", teacher_logits, shape=logits.shape, device=device, dtypes=FLOAT_DTYPES)
    check_tensor("teacher_logprobs", teacher_logprobs, shape=token_shape, device=device, dtypes=FLOAT_DTYPES)
    if options.full_vocab_distill and teacher_logits is None:
        raise ValueError(f"distill={options.distill!r} is a full-vocabulary divergence and needs teacher_logits")

    check_tensor("mask", mask, shape=token_shape, device=device)
    if advantages is not None:
        per_sequence = logits.dim() == 3 and advantages.dim() == 1
        expected = token_shape[:1] if per_sequence else token_shape
        check_tensor("advantages", advantages, shape=expected, device=device, dtypes=FLOAT_DTYPES)
        if per_sequence:
            advantages = advantages[:, None].expand(token_shape)
    check_tensor("old_logprobs", old_logprobs, shape=token_shape, device=device, dtypes=FLOAT_DTYPES)
    check_tensor("ref_logprobs", ref_logprobs, shape=token_shape, device=device, dtypes=FLOAT_DTYPES)
    check_tensor("loss_weights", loss_weights, shape=token_shape, device=device, dtypes=FLOAT_DTYPES)
    if options.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (log-probs of the reference policy)")
    num_tokens = _check_num_tokens(num_tokens, device)
    if options.backend == "triton":
        from ._runtime import can_use_triton
        if not can_use_triton(logits):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                             f"logits are on {device}")

    mask_bool = torch.ones(token_shape, dtype=torch.bool, device=device) if mask is None else mask != 0
    labels_flat = labels.reshape(-1).to(torch.int64)
    _check_labels_in_range(labels_flat, mask_bool.reshape(-1), V)

    def flat(t):
        return None if t is None else t.detach().reshape(-1).to(torch.float32).contiguous()

    return PreparedInputs(
        logits=token_rows(logits), labels=labels_flat, mask=mask_bool.reshape(-1),
        weights=aggregation_weights(mask_bool, options, loss_weights=loss_weights, num_tokens=num_tokens),
        teacher_logits=None if teacher_logits is None else token_rows(teacher_logits.detach()),
        teacher_logprobs=flat(teacher_logprobs), advantages=flat(advantages),
        old_logprobs=flat(old_logprobs), ref_logprobs=flat(ref_logprobs), token_shape=token_shape,
        options=options,
    )
