"""Input validation and normalisation shared by every SDAR op and backend.

Everything here is shape/dtype/device logic plus the aggregation weights (README.md of sdar_loss,
"Aggregation"); there is no loss math. Messages name the offending argument. Nothing here synchronises
with a CUDA device: values (label range, 0/1 mask, teacher log-probs <= 0, counts) are checked where
that is free (CPU tensors outside a compiled graph) and, on CUDA, only with
``SDAR_KERNELS_CHECK_INPUTS=1`` (the kernels poison a row with a bad label with NaN instead of reading
out of range).
"""

from __future__ import annotations

import math
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
    along V, or a >3-D input without a flat view, is copied. Decided from the strides alone (no
    exception handling), so torch.compile traces it without a graph break.
    """
    V = t.shape[-1]
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t
    if _rows_merge(t):
        return t.reshape(-1, V)      # a view: the leading dims merge into one stride
    return t if t.dim() == 3 else t.reshape(-1, V)


def _rows_merge(t):
    """Whether the leading dims of ``t`` [..., V] merge into one row dimension of a single stride."""
    expected = None
    for size, stride in reversed(list(zip(t.shape[:-1], t.stride()[:-1]))):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return False
        expected = stride * size
    return True


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


def _values_checked_here(t):
    """Whether value checks on ``t`` are free: a CPU tensor outside a compiled graph. On CUDA they need a
    host sync, so they run only with SDAR_KERNELS_CHECK_INPUTS=1 (or the older SDAR_KERNELS_CHECK_LABELS)."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    return any(os.environ.get(v, "0") not in ("", "0")
               for v in ("SDAR_KERNELS_CHECK_INPUTS", "SDAR_KERNELS_CHECK_LABELS"))


def _first_bad(bad):
    return int(bad.nonzero()[0, 0])


def check_token_values(labels, mask, vocab, *, mask_values=None, teacher_logprobs=None):
    """Value checks on unmasked tokens, where they are free (``_values_checked_here``): labels in [0, V),
    a numeric mask of 0 / 1 only, teacher log-probs <= 0. ValueError naming the argument."""
    if not _values_checked_here(labels):
        return
    bad = ((labels < 0) | (labels >= vocab)) & mask
    if bool(bad.any()):
        first = _first_bad(bad)
        raise ValueError(f"labels must lie in [0, {vocab}) on unmasked tokens; flat token {first} has "
                         f"label {int(labels[first])}")
    if mask_values is not None and mask_values.dtype != torch.bool:
        bad = (mask_values != 0) & (mask_values != 1)
        if bool(bad.any()):
            first = _first_bad(bad)
            raise ValueError(f"mask must hold only 0 and 1 (or be bool); flat token {first} has "
                             f"{mask_values[first].item()!r} (use loss_weights for per-token weights)")
    if teacher_logprobs is not None:
        bad = (teacher_logprobs > 0) & mask
        if bool(bad.any()):
            first = _first_bad(bad)
            raise ValueError(f"teacher_logprobs must be log-probabilities (<= 0); flat token {first} has "
                             f"{teacher_logprobs[first].item()!r}")


def check_count(name, value, device):
    """A global count (num_tokens, num_sequences): a Python number or a one-element
    tensor, returned as a float or a 0-dim fp32 tensor on ``device``, taken as at least 1.

    Numbers: negative or non-finite -> ValueError; below 1 (an all-masked global batch) -> 1.
    Tensors: nothing can be checked on CUDA without a sync, so a non-finite or < 1 value is taken as 1
    on the device; on CPU (free) a negative or non-finite one raises like a number.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex() or not (
                value.dtype.is_floating_point or value.dtype in (torch.int8, torch.int16, torch.int32,
                                                                 torch.int64, torch.uint8)):
            raise ValueError(f"{name} must be a non-negative number or a one-element numeric tensor, "
                             f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        if _values_checked_here(value):
            v = float(value)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative finite count, got {v!r}")
        t = value.detach().reshape(()).to(device=device, dtype=torch.float32)
        return torch.where(torch.isfinite(t) & (t >= 1), t, torch.ones((), device=device))
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return max(float(value), 1.0)


def _check_scale_factor(value):
    """loss_scale_factor of "seq-mean-token-sum-norm" (verl's fixed normaliser): a positive finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"loss_scale_factor must be a positive finite number, got {value!r}")
    return float(value)


def _check_dp_size(dp_size):
    if isinstance(dp_size, bool) or not isinstance(dp_size, numbers.Integral) or dp_size < 1:
        raise ValueError(f"dp_size must be a positive integer (the data-parallel world size), got {dp_size!r}")
    return int(dp_size)


def aggregation_weights(mask2d, options, *, loss_weights=None, num_tokens=None, num_sequences=None,
                        loss_scale_factor=None, dp_size=1):
    """w_t on the token shape of ``mask2d`` (bool), returned flat [N] fp32 (README.md, "Aggregation").

    reduction "sum" / "none" use w = m (the loss is sum(m*l) / m*l); "mean" uses the mode's weights
    (verl 0.9's agg_loss), or ``loss_weights * m`` when explicit weights are given; every "mean" weight is
    multiplied by ``dp_size``. Counts are already checked (``check_count``): floats or 0-dim tensors >= 1.
    """
    m = mask2d.to(torch.float32)
    if options.reduction != "mean":
        return m.reshape(-1)
    if loss_weights is not None:
        # where(), not a product: a NaN weight on a masked token must not make the loss NaN
        return (torch.where(mask2d, loss_weights.to(torch.float32), 0.0) * dp_size).reshape(-1)
    mode = options.loss_agg_mode
    if mode == "token-mean":
        denom = num_tokens if num_tokens is not None else m.sum().clamp_min(1.0)
        return (m * (dp_size / denom)).reshape(-1)
    if mode == "token-sum":
        return (m * dp_size).reshape(-1)
    if m.dim() != 2:
        raise ValueError(f"loss_agg_mode={mode!r} needs [B, T, V] logits (sequence structure); "
                         f"got token shape {tuple(m.shape)}; pass loss_weights for flat inputs")
    T = m.shape[1]
    tokens_per_seq = m.sum(-1, keepdim=True)
    # sequences with at least one unmasked token (verl excludes fully masked ones from the mean)
    n_seq = num_sequences if num_sequences is not None else (tokens_per_seq > 0).sum().clamp_min(1.0)
    if mode == "seq-mean-token-sum":
        scale = dp_size / n_seq
        return (m * scale).reshape(-1)
    if mode == "seq-mean-token-mean":
        return (m * (dp_size / n_seq) / tokens_per_seq.clamp_min(1.0)).reshape(-1)
    # seq-mean-token-sum-norm: seq-mean-token-sum / S, S = loss_scale_factor or the padded length T
    S = loss_scale_factor if loss_scale_factor is not None else float(T)
    return (m * (dp_size / n_seq) / S).reshape(-1)


def check_active_terms(options, *, has_teacher, has_advantages):
    """A call whose every loss term is off would silently return 0: refuse it."""
    if (has_teacher and options.distill_coef != 0) or has_advantages or options.kl_coef > 0 \
            or options.entropy_coef != 0:
        return
    raise ValueError(
        "no loss term is active: pass teacher_logits / teacher_logprobs with distill_coef != 0 "
        "(distillation), advantages (policy gradient), kl_coef > 0 with ref_logprobs, or entropy_coef != 0")


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


def mask_as_bool(mask, token_shape, device):
    """The (already shape-checked) mask as bool; all True when absent."""
    if mask is not None and mask.is_complex():
        raise ValueError(f"mask must be a bool or numeric 0/1 tensor, got {mask.dtype}")
    return torch.ones(token_shape, dtype=torch.bool, device=device) if mask is None else mask != 0


def normalize_inputs(logits, labels, *, teacher_logits=None, teacher_logprobs=None, mask=None,
                     advantages=None, old_logprobs=None, ref_logprobs=None, loss_weights=None,
                     num_tokens=None, num_sequences=None, loss_scale_factor=None, dp_size=1,
                     label_vocab=None, **option_kwargs) -> PreparedInputs:
    """Validate one call of the SDAR loss and flatten it to [N] / [N, V]. Raises ValueError.

    ``label_vocab``: the range of the labels when the logits hold one vocabulary shard (tensor parallel);
    default: the logits' own V."""
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
    num_tokens = check_count("num_tokens", num_tokens, device)
    num_sequences = check_count("num_sequences", num_sequences, device)
    loss_scale_factor = _check_scale_factor(loss_scale_factor)
    dp_size = _check_dp_size(dp_size)
    if options.backend == "triton":
        from ._runtime import can_use_triton
        if not can_use_triton(logits):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                             f"logits are on {device}")

    mask_bool = mask_as_bool(mask, token_shape, device)
    labels_flat = labels.reshape(-1).to(torch.int64)
    check_token_values(labels_flat, mask_bool.reshape(-1), label_vocab or V,
                       mask_values=None if mask is None else mask.reshape(-1),
                       teacher_logprobs=None if teacher_logprobs is None else teacher_logprobs.reshape(-1))

    # last, so that a malformed input is reported as such first
    check_active_terms(options, has_teacher=teacher_logits is not None or teacher_logprobs is not None,
                       has_advantages=advantages is not None)

    def flat(t):
        return None if t is None else t.detach().reshape(-1).to(torch.float32).contiguous()

    return PreparedInputs(
        logits=token_rows(logits), labels=labels_flat, mask=mask_bool.reshape(-1),
        weights=aggregation_weights(mask_bool, options, loss_weights=loss_weights, num_tokens=num_tokens,
                                    num_sequences=num_sequences, loss_scale_factor=loss_scale_factor,
                                    dp_size=dp_size),
        teacher_logits=None if teacher_logits is None else token_rows(teacher_logits.detach()),
        teacher_logprobs=flat(teacher_logprobs), advantages=flat(advantages),
        old_logprobs=flat(old_logprobs), ref_logprobs=flat(ref_logprobs), token_shape=token_shape,
        options=options,
    )
