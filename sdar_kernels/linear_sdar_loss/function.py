"""The public functional ``linear_sdar_loss`` (hidden states + lm_head in): validate, pick the engine and the
schedule, call the custom op (ops.py), which runs the chunk loop (schedule.py).

Same contract and ``SDAROutput`` as ``sdar_loss`` with logits = hidden @ W.T (+ b) and teacher logits =
teacher_hidden @ W_T.T (+ b_T), never materialised beyond one chunk. Schedules, as in ``sdar_loss``:
- "mean" / "sum" with a gradient: the forward also runs the gradient GEMMs (fused); backward only scales
  grad_hidden / grad_weight / grad_bias by the upstream scalar.
- "none": the forward keeps only the per-row engine statistics and backward recomputes each chunk's
  logits (one more student and teacher matmul) with w_t = m_t * g_t.
- no gradient wanted (grad mode off, or nothing requires grad): the loss terms only, no gradient GEMM.
Gradients flow to ``hidden``, ``weight`` and ``bias`` only, never to the teacher side.
"""

from __future__ import annotations

import torch

from .._tp import vocab_shard
from ..sdar_loss import ops as row_ops
from ..sdar_loss.engines import pick_engine
from ..sdar_loss.output import SDAROutput, package_output
from . import ops  # noqa: F401  (registers the custom ops)
from .inputs import prepare_linear_inputs


def linear_sdar_loss(
    hidden, weight, labels, *, bias=None, teacher_hidden=None, teacher_weight=None, teacher_bias=None,
    teacher_logprobs=None, mask=None, advantages=None, old_logprobs=None, ref_logprobs=None,
    loss_weights=None, num_tokens=None, num_sequences=None, loss_scale_factor=None, dp_size=1, gate_beta=5.0, distill_coef=0.01, distill="sampled",
    jsd_beta=0.5, clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, kl_coef=0.0, entropy_coef=0.0,
    temperature=1.0, loss_agg_mode="token-mean", reduction="mean", inplace_backward=False,
    backend="auto", tp_group=None,
) -> SDAROutput:
    """Fused-linear SDAR loss: ``sdar_loss(hidden @ weight.T + bias, labels, teacher_logits=teacher_hidden
    @ (teacher_weight or weight).T + teacher_bias, ...)`` without ever holding the [N, V] logits.

    hidden: [N, H] or [B, T, H] (fp32 / bf16 / fp16); weight: [V, H] in hidden's dtype (the lm_head
    weight); bias: [V] or None. Teacher: ``teacher_hidden`` (same token shape; uses ``weight`` and
    ``bias`` unless ``teacher_weight`` / ``teacher_bias`` are given; no gradient ever flows to it, even
    when the weight is shared) or ``teacher_logprobs`` (no teacher matmul at all). Every other argument
    is that of ``sdar_loss`` (docs/api.md). ``inplace_backward`` has no effect here: the logit gradient is
    always written into the chunk's own fp32 logits buffer. See README.md in this folder.

    ``tp_group``: the lm_head is split over this process group (tensor parallel): ``weight`` / ``bias`` (and
    the teacher's) are this rank's contiguous rows [r V/P, (r+1) V/P), labels global ids. Every rank gets
    the same loss and outputs, the gradient of its own weight / bias rows, and the full gradient of
    ``hidden`` (its shard contributions are summed over the group inside the op: do not all-reduce it again).
    """
    shard = vocab_shard(tp_group, weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
    inputs = prepare_linear_inputs(
        hidden, weight, labels, bias=bias, label_vocab=shard and shard.vocab, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias, teacher_logprobs=teacher_logprobs, mask=mask, advantages=advantages,
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, loss_weights=loss_weights,
        num_tokens=num_tokens, num_sequences=num_sequences, loss_scale_factor=loss_scale_factor,
        dp_size=dp_size, gate_beta=gate_beta, distill_coef=distill_coef, distill=distill,
        jsd_beta=jsd_beta, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
        kl_coef=kl_coef, entropy_coef=entropy_coef, temperature=temperature, loss_agg_mode=loss_agg_mode,
        reduction=reduction, inplace_backward=inplace_backward, backend=backend,
    )
    x = inputs.x
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias))
    schedule = "no_grad" if not any(needs) else "two_phase" if x.options.reduction == "none" else "fused"
    shared_bias = inputs.shared_weight and inputs.teacher_bias is inputs.bias
    loss, stacked, *_ = torch.ops.sdar_kernels.linear_sdar_loss_forward(
        inputs.hidden, weight, bias, x.labels, x.mask, x.weights, inputs.teacher_hidden,
        None if inputs.shared_weight else inputs.teacher_weight, None if shared_bias else inputs.teacher_bias,
        x.teacher_logprobs, x.advantages, x.old_logprobs, x.ref_logprobs, *row_ops.option_args(x.options),
        pick_engine(x.options.backend, inputs.hidden), schedule, *needs, shard and shard.group_name,
        shard.offset if shard else 0)
    has_teacher = inputs.teacher_hidden is not None or x.teacher_logprobs is not None
    return package_output(loss, stacked, x, has_teacher=has_teacher)
