"""Autograd Function and the public functional ``sdar_loss`` (API: docs/api.md).

Two schedules, picked from the reduction:
- "mean" / "sum": the aggregation weights w_t are known in the forward, so the backend writes
  w_t * dl_t/dz in the same launch as the loss (fused); backward only scales it by the upstream scalar.
- "none": the upstream gradient is per token and unknown in the forward. The forward computes the loss
  only and keeps the per-row statistics; backward makes one gradient pass with w_t = m_t * g_t.
"""

from __future__ import annotations

import dataclasses

import torch

from .._checks import normalize_inputs
from .._runtime import can_use_triton
from .output import PER_TOKEN_FIELDS, SDAROutput, package_output, reduce_loss
from .torch_impl import sdar_rows_torch


class TorchRows:
    """The chunked torch backend. It keeps no statistics: the "none" backward recomputes them."""

    @staticmethod
    def forward(x, weights, grad, save_stats):
        return sdar_rows_torch(x, weights, grad), None

    @staticmethod
    def backward(x, weights, grad, stats):
        sdar_rows_torch(x, weights, grad)


class TritonRows:
    """The Triton backend (launch.py); imported lazily so CPU-only users never load the kernels."""

    @staticmethod
    def forward(x, weights, grad, save_stats):
        from .launch import sdar_rows_triton
        return sdar_rows_triton(x, weights, grad, save_stats=save_stats)

    @staticmethod
    def backward(x, weights, grad, stats):
        from .launch import sdar_rows_triton_grad
        sdar_rows_triton_grad(x, weights, grad, stats)


def pick_backend(x):
    if x.options.backend == "torch":
        return TorchRows
    if x.options.backend == "triton" or x.logits.is_cuda and can_use_triton(x.logits):
        return TritonRows
    return TorchRows


class SDARLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, x, rows):
        o = x.options
        need_grad = ctx.needs_input_grad[0]
        fused = need_grad and o.reduction != "none"
        grad = None
        if fused:
            # inplace_backward: the gradient overwrites the student logits (each block is read before
            # it is written), saving one [N, V] buffer; the logits are garbage afterwards.
            grad = logits2d if o.inplace_backward else torch.empty_like(logits2d)
        per_token, stats = rows.forward(x, x.weights, grad, save_stats=need_grad and not fused)

        loss = reduce_loss(per_token["loss"], x)

        ctx.fused, ctx.rows, ctx.stats, ctx.used = fused, rows, stats, False
        ctx.inplace = o.inplace_backward
        # The fused backward needs only the gradient: keep no reference to the (teacher) logits, so they
        # are freed as soon as the caller drops them. "none" keeps the side inputs; its logits go
        # through save_for_backward below.
        ctx.x = None if fused else dataclasses.replace(x, logits=None)
        # fused: the gradient; "none": the logits, re-read by the backward pass (saved through autograd
        # so an in-place change to them between forward and backward raises instead of going unseen)
        ctx.save_for_backward(grad if fused else logits2d)
        stacked = torch.stack([per_token[k] for k in PER_TOKEN_FIELDS[1:]])
        ctx.mark_non_differentiable(stacked)
        return loss, stacked

    @staticmethod
    def backward(ctx, grad_loss, _grad_stacked):
        if ctx.used and (ctx.fused or ctx.inplace):
            raise RuntimeError("sdar_loss: backward ran twice through one forward; the gradient buffer (or, "
                               "with inplace_backward, the logits) was consumed in place, so retain_graph "
                               "re-use is not supported")
        ctx.used = True
        (saved,) = ctx.saved_tensors
        if ctx.fused:
            return saved.mul_(grad_loss.to(saved.dtype)), None, None
        x = dataclasses.replace(ctx.x, logits=saved)
        weights = x.mask.to(torch.float32) * grad_loss.reshape(-1).to(torch.float32)
        # inplace_backward: each block of the logits is read before its gradient overwrites it
        grad = saved if ctx.inplace else torch.empty_like(saved)
        ctx.rows.backward(x, weights, grad, ctx.stats)
        return grad, None, None


def sdar_loss(
    logits, labels, *, teacher_logits=None, teacher_logprobs=None, mask=None, advantages=None,
    old_logprobs=None, ref_logprobs=None, loss_weights=None, num_tokens=None,
    gate_beta=5.0, distill_coef=0.01, distill="sampled", jsd_beta=0.5,
    clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, kl_coef=0.0, entropy_coef=0.0,
    temperature=1.0, loss_agg_mode="token-mean", reduction="mean",
    inplace_backward=False, backend="auto",
) -> SDAROutput:
    """Fused SDAR loss: GRPO (dual clip) + k3 KL + entropy bonus + sigmoid-gated self-distillation.

    Per token: l = pg + kl_coef * kl - entropy_coef * H + distill_coef * gate * D, aggregated as
    sum_t w_t l_t (docs/api.md; derivations in sdar_kernels/sdar_loss/README.md).

    Args:
        logits: [..., V] student logits (fp32 / bf16 / fp16), usually [B, T, V] or [N, V]. Sliced
            [B, T, V] views (``logits[:, :-1]``) are read in place.
        labels: [...] int sampled tokens in [0, V) (any value on masked tokens, e.g. -100).
        teacher_logits: [..., V] logits of the privileged teacher (no gradient), or
        teacher_logprobs: [...] precomputed log pi_T(y). At most one; without either there is no
            distillation term (plain GRPO).
        mask: [...] bool / 0-1: tokens that get loss. Default: all.
        advantages: [...] per token, or [B] per sequence for [B, T, V] logits. None: no pg term.
        old_logprobs: [...] behaviour log-probs for the PPO ratio (None: on-policy, ratio 1).
        ref_logprobs: [...] reference log-probs, required when kl_coef > 0.
        loss_weights: [...] explicit w_t (overrides loss_agg_mode); num_tokens: global token count
            (number or 0-dim tensor) for "token-mean" across data-parallel ranks.
        gate_beta, distill_coef, distill ("sampled" | "reinforce" | "fkl" | "rkl" | "jsd"), jsd_beta,
        clip_low, clip_high, clip_ratio_c (None: no dual clip), kl_coef, entropy_coef, temperature,
        loss_agg_mode (verl's four modes), reduction ("mean" | "sum" | "none").
        inplace_backward: write the gradient into the logits' storage (saves an [N, V] buffer; the
            logits are overwritten, so nothing else may read them afterwards).
        backend: "auto" (Triton on CUDA tensors, the chunked torch path elsewhere) | "triton" | "torch".

    Returns:
        SDAROutput(loss, logprobs, entropy, gate, gap, metrics); everything but ``loss`` is detached.

    Raises:
        ValueError naming the argument, for every malformed input or option.
    """
    x = normalize_inputs(
        logits, labels, teacher_logits=teacher_logits, teacher_logprobs=teacher_logprobs, mask=mask,
        advantages=advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        loss_weights=loss_weights, num_tokens=num_tokens, gate_beta=gate_beta, distill_coef=distill_coef,
        distill=distill, jsd_beta=jsd_beta, clip_low=clip_low, clip_high=clip_high,
        clip_ratio_c=clip_ratio_c, kl_coef=kl_coef, entropy_coef=entropy_coef, temperature=temperature,
        loss_agg_mode=loss_agg_mode, reduction=reduction, inplace_backward=inplace_backward, backend=backend,
    )
    return run_sdar_rows(x, pick_backend(x))


def run_sdar_rows(x, rows):
    """Apply the autograd Function to prepared inputs and package the SDAROutput."""
    loss, stacked = SDARLossFunction.apply(x.logits, x, rows)
    has_teacher = x.teacher_logits is not None or x.teacher_logprobs is not None
    return package_output(loss, stacked, x, has_teacher=has_teacher)
