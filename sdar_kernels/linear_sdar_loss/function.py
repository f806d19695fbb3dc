"""Autograd Function and the public functional ``linear_sdar_loss`` (hidden states + lm_head in).

Same contract and ``SDAROutput`` as ``sdar_loss`` (docs/api.md) with logits = hidden @ W.T (+ b)
and teacher logits = teacher_hidden @ W_T.T (+ b_T), never materialised beyond one chunk (schedule.py).
Two schedules, as in ``sdar_loss``:
- "mean" / "sum": w_t is known in the forward, so the forward pass also runs the gradient GEMMs
  (fused); backward only scales grad_hidden / grad_weight / grad_bias by the upstream scalar.
- "none": the upstream gradient is per token; the forward keeps only the per-row engine statistics and
  backward recomputes each chunk's logits (one more student and teacher matmul) with w_t = m_t * g_t.
Gradients flow to ``hidden``, ``weight`` and ``bias`` only, never to the teacher side.
"""

from __future__ import annotations

import torch

from ..sdar_loss.function import pick_backend
from ..sdar_loss.output import PER_TOKEN_FIELDS, SDAROutput, package_output, reduce_loss
from .inputs import prepare_linear_inputs
from .schedule import make_plan, run_chunks

F32 = torch.float32


def _grad_buffers(plan, needs, hidden2d, weight, bias, *, hidden_dtype):
    gh = torch.empty(hidden2d.shape, dtype=hidden_dtype, device=hidden2d.device) if needs[0] else None
    gw = torch.zeros(weight.shape, dtype=F32, device=weight.device) if needs[1] else None
    gb = torch.zeros(bias.shape, dtype=F32, device=bias.device) if needs[2] else None
    return gh, gw, gb


class LinearSDARLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, plan):
        o = plan.inputs.x.options
        needs = tuple(ctx.needs_input_grad[:3])
        fused = any(needs) and o.reduction != "none"
        # fused: every gradient stays fp32 until backward has applied the upstream scale, so a bf16 / fp16
        # gradient is rounded once (scaling an already-rounded bf16 gradient would round twice)
        gh, gw, gb = (_grad_buffers(plan, needs, hidden2d, weight, bias, hidden_dtype=F32) if fused
                      else (None, None, None))
        per_token, stats = run_chunks(plan, plan.inputs.x.weights, grad_hidden=gh, grad_weight=gw,
                                      grad_bias=gb, save_stats=any(needs) and not fused)
        loss = reduce_loss(per_token["loss"], plan.inputs.x)

        ctx.fused, ctx.needs, ctx.stats, ctx.used = fused, needs, stats, False
        ctx.plan = None
        if fused:       # everything backward needs is in the gradients: release the plan (and its tensors)
            ctx.grads = (gh, gw, gb)
            ctx.dtypes = (hidden2d.dtype, weight.dtype, None if bias is None else bias.dtype)
        elif any(needs):  # "none": backward recomputes from the inputs; saving them lets autograd
            ctx.plan = plan     # detect in-place changes between forward and backward
            ctx.save_for_backward(hidden2d, weight)
        stacked = torch.stack([per_token[k] for k in PER_TOKEN_FIELDS[1:]])
        ctx.mark_non_differentiable(stacked)
        return loss, stacked

    @staticmethod
    def backward(ctx, grad_loss, _grad_stacked):
        plan = ctx.plan
        if ctx.fused:
            if ctx.used:
                raise RuntimeError("linear_sdar_loss: backward ran twice; the fused gradients are scaled in "
                                   "place, so retain_graph re-use is not supported with reduction "
                                   "'mean' / 'sum' ('none' recomputes and supports it)")
            ctx.used = True
            grads = tuple(None if g is None else g.mul_(grad_loss.to(F32)).to(dt)
                          for g, dt in zip(ctx.grads, ctx.dtypes))
            ctx.grads = None
            return (*grads, None)
        ctx.saved_tensors  # noqa: B018  (raises if hidden / weight were modified in place since forward)
        inp = plan.inputs
        weights = inp.x.mask.to(F32) * grad_loss.reshape(-1).to(F32)
        gh, gw, gb = _grad_buffers(plan, ctx.needs, inp.hidden, inp.weight, inp.bias,
                                   hidden_dtype=inp.hidden.dtype)
        run_chunks(plan, weights, grad_hidden=gh, grad_weight=gw, grad_bias=gb, stats=ctx.stats,
                   backward=True)
        return (gh, None if gw is None else gw.to(inp.weight.dtype),
                None if gb is None else gb.to(inp.bias.dtype), None)


def linear_sdar_loss(
    hidden, weight, labels, *, bias=None, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
    teacher_logprobs=None, mask=None, advantages=None, old_logprobs=None, ref_logprobs=None,
    loss_weights=None, num_tokens=None, gate_beta=5.0, distill_coef=0.01, distill="sampled",
    jsd_beta=0.5, clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, kl_coef=0.0, entropy_coef=0.0,
    temperature=1.0, loss_agg_mode="token-mean", reduction="mean", inplace_backward=False,
    backend="auto",
) -> SDAROutput:
    """Fused-linear SDAR loss: ``sdar_loss(hidden @ weight.T + bias, labels, teacher_logits=teacher_hidden
    @ (teacher_weight or weight).T + teacher_bias, ...)`` without ever holding the [N, V] logits.

    hidden: [N, H] or [B, T, H] (fp32 / bf16 / fp16); weight: [V, H] in hidden's dtype (the lm_head
    weight); bias: [V] or None. Teacher: ``teacher_hidden`` (same token shape; uses ``weight`` and
    ``bias`` unless ``teacher_weight`` / ``teacher_bias`` are given; no gradient ever flows to it, even
    when the weight is shared) or ``teacher_logprobs`` (no teacher matmul at all). Every other argument
    is that of ``sdar_loss`` (docs/api.md). ``inplace_backward`` has no effect here: the logit gradient is
    always written into the chunk's own fp32 logits buffer. See README.md in this folder.
    """
    inputs = prepare_linear_inputs(
        hidden, weight, labels, bias=bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
        teacher_bias=teacher_bias, teacher_logprobs=teacher_logprobs, mask=mask, advantages=advantages,
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, loss_weights=loss_weights,
        num_tokens=num_tokens, gate_beta=gate_beta, distill_coef=distill_coef, distill=distill,
        jsd_beta=jsd_beta, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
        kl_coef=kl_coef, entropy_coef=entropy_coef, temperature=temperature, loss_agg_mode=loss_agg_mode,
        reduction=reduction, inplace_backward=inplace_backward, backend=backend,
    )
    x = inputs.x
    plan = make_plan(inputs, pick_backend(x))
    loss, stacked = LinearSDARLossFunction.apply(inputs.hidden, weight, bias, plan)
    has_teacher = inputs.teacher_hidden is not None or x.teacher_logprobs is not None
    return package_output(loss, stacked, x, has_teacher=has_teacher)
