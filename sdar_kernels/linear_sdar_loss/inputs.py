"""Validation of one fused-linear SDAR loss call and its flattening to [N, H] / [N] tensors.

Everything but the hidden states and the heads is validated by the very code ``sdar_loss`` uses
(``_checks.normalize_inputs``): it is given a zero-stride stand-in for the [..., V] logits (one [V]
allocation expanded to the token shape, never read), so labels, masks, side inputs, options and the
aggregation weights w_t follow the same rules and messages as the logits op. The stand-ins are
replaced by real fp32 chunk logits in the chunk loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import FLOAT_DTYPES, PreparedInputs, check_tensor, normalize_inputs
from ..sdar_loss.options import FULL_VOCAB_DISTILL


@dataclass
class LinearInputs:
    x: PreparedInputs                   # flat side inputs, weights w_t, options (logits: stand-ins)
    hidden: torch.Tensor                # [N, H], the differentiable input (a view of ``hidden``)
    weight: torch.Tensor                # [V, H]
    bias: torch.Tensor | None           # [V]
    teacher_hidden: torch.Tensor | None  # [N, H_T] detached
    teacher_weight: torch.Tensor | None  # [V, H_T] (``weight`` itself when shared); never differentiated
    teacher_bias: torch.Tensor | None   # [V] (``bias`` when the head is shared); never differentiated
    shared_weight: bool                 # the teacher uses the student's weight tensor


def _check_head(prefix, hidden_name, hidden, weight, bias, device):
    check_tensor(f"{prefix}weight", weight, device=device, dtypes=FLOAT_DTYPES, allow_none=False)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}weight must be [V, H] with H = {hidden_name}.shape[-1] = "
                         f"{hidden.shape[-1]}, got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{prefix}weight must have a non-empty vocabulary dimension")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{prefix}weight has dtype {weight.dtype} but {hidden_name} has {hidden.dtype}; "
                         f"cast one of them (the matmul runs in one input dtype)")
    check_tensor(f"{prefix}bias", bias, shape=weight.shape[:1], device=device, dtypes=FLOAT_DTYPES)


@dataclass
class Heads:
    """The validated heads of a fused-linear call, with flat [N, H] hidden states."""

    hidden: torch.Tensor                 # [N, H] (a view of ``hidden`` where possible; differentiable)
    weight: torch.Tensor
    bias: torch.Tensor | None
    teacher_hidden: torch.Tensor | None  # [N, H_T] detached
    teacher_weight: torch.Tensor | None  # ``weight`` itself when the teacher shares the head
    teacher_bias: torch.Tensor | None
    shared_weight: bool
    token_shape: torch.Size

    def stand_in_logits(self):
        """[..., V] with strides (0, ..., 0, 1), backed by one [V] buffer that is never read: lets the
        logits ops' validation (labels, mask, side inputs, options) run without any [N, V] tensor."""
        V = self.weight.shape[0]
        return torch.empty(V, dtype=self.hidden.dtype, device=self.hidden.device).expand(*self.token_shape, V)


def check_heads(hidden, weight, *, bias=None, teacher_hidden=None, teacher_weight=None,
                teacher_bias=None) -> Heads:
    """Validate the hidden states and lm heads of a fused-linear call (ValueError naming the argument)."""
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, allow_none=False)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., H] with at least 2 dims, got shape {tuple(hidden.shape)}")
    device = hidden.device
    _check_head("", "hidden", hidden, weight, bias, device)
    V = weight.shape[0]
    token_shape = hidden.shape[:-1]

    if teacher_hidden is None and (teacher_weight is not None or teacher_bias is not None):
        raise ValueError("teacher_weight / teacher_bias need teacher_hidden")
    shared = teacher_hidden is not None and (teacher_weight is None or teacher_weight is weight)
    if teacher_hidden is not None:
        check_tensor("teacher_hidden", teacher_hidden, device=device, dtypes=FLOAT_DTYPES)
        if teacher_hidden.shape[:-1] != token_shape:
            raise ValueError(f"teacher_hidden must have token shape {tuple(token_shape)} (as hidden), "
                             f"got shape {tuple(teacher_hidden.shape)}")
        if teacher_weight is None:
            if teacher_hidden.shape[-1] != hidden.shape[-1] or teacher_hidden.dtype != hidden.dtype:
                raise ValueError("teacher_hidden must have hidden's size and dtype when the teacher shares "
                                 f"weight; got {tuple(teacher_hidden.shape)} {teacher_hidden.dtype}")
            teacher_weight = weight
            if teacher_bias is None:
                teacher_bias = bias       # a shared head shares its bias too
        else:
            _check_head("teacher_", "teacher_hidden", teacher_hidden, teacher_weight, teacher_bias, device)
            if teacher_weight.shape[0] != V:
                raise ValueError(f"teacher_weight must have V = {V} rows (as weight), "
                                 f"got shape {tuple(teacher_weight.shape)}")

    def flat(t):
        if t is None:
            return None
        t = t.detach().reshape(-1, t.shape[-1])
        return t if t.is_contiguous() else t.contiguous()

    h2d = hidden.reshape(-1, hidden.shape[-1])
    if not h2d.is_contiguous():
        h2d = h2d.contiguous()
    return Heads(hidden=h2d, weight=weight, bias=bias, teacher_hidden=flat(teacher_hidden),
                 teacher_weight=teacher_weight, teacher_bias=teacher_bias, shared_weight=shared,
                 token_shape=token_shape)


def prepare_linear_inputs(hidden, weight, labels, *, bias=None, teacher_hidden=None, teacher_weight=None,
                          teacher_bias=None, teacher_logprobs=None, **kwargs) -> LinearInputs:
    """Validate a ``linear_sdar_loss`` call (ValueError naming the argument) and flatten it."""
    heads = check_heads(hidden, weight, bias=bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                        teacher_bias=teacher_bias)
    if teacher_hidden is not None and teacher_logprobs is not None:
        raise ValueError("pass at most one teacher form: teacher_hidden or teacher_logprobs, not both")
    if kwargs.get("distill", "sampled") in FULL_VOCAB_DISTILL and teacher_hidden is None:
        raise ValueError(f"distill={kwargs['distill']!r} is a full-vocabulary divergence and needs "
                         f"teacher_hidden")
    stand_in = heads.stand_in_logits()
    x = normalize_inputs(stand_in, labels, teacher_logits=None if teacher_hidden is None else stand_in,
                         teacher_logprobs=teacher_logprobs, **kwargs)
    return LinearInputs(
        x=x, hidden=heads.hidden, weight=weight, bias=bias, teacher_hidden=heads.teacher_hidden,
        teacher_weight=heads.teacher_weight, teacher_bias=heads.teacher_bias, shared_weight=heads.shared_weight,
    )
