"""``linear_token_logprobs``: ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without [N, V] logits.

Chunked over tokens exactly as ``linear_sdar_loss`` is (its ``Head`` matmuls and ``chunk_rows`` rule):
per chunk of C rows, fp32 logits z = h @ W.T (+ b) [C, V] (and the teacher's, with ``teacher_hidden``),
the row engine's forward gives log p(y), H and the teacher's log p_T(y). Nothing of size [N, V] is kept:
the backward recomputes each chunk's logits, has the engine overwrite them with dL/dz for the upstream
g_lp, g_H, and runs the GEMMs grad_hidden = g @ W, grad_W += g.T @ h, grad_b += g.sum(0).

Masked rows: their hidden rows are zeroed before the matmul (so non-finite padding cannot reach grad_W
through 0 * NaN); the engine gives them 0 outputs and an exact-zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..linear_sdar_loss.chunking import chunk_rows
from ..linear_sdar_loss.heads import Head
from ..linear_sdar_loss.inputs import check_heads
from .function import masked_upstream, package_stats, pick_token_engine
from .inputs import TokenInputs, prepare_token_inputs

F32 = torch.float32


@dataclass
class LinearTokenPlan:
    x: TokenInputs              # flat labels / mask / options (logits: zero-stride stand-ins, never read)
    heads: object               # linear_sdar_loss.inputs.Heads
    head: Head
    teacher_head: Head | None
    engine: object
    chunk: int

    def chunks(self):
        N = self.x.labels.shape[0]
        for r0 in range(0, N, self.chunk):
            yield slice(r0, min(N, r0 + self.chunk))

    def chunk_inputs(self, sl, h):
        """The row engine's inputs for rows ``sl``: fp32 chunk logits (a fresh buffer) and the teacher's."""
        keep = self.x.mask[sl]
        h = torch.where(keep[:, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        zt = None
        if self.teacher_head is not None:
            zt = self.teacher_head.logits(self.heads.teacher_hidden[sl])
        return replace(self.x, logits=self.head.logits(h), labels=self.x.labels[sl], mask=keep,
                       teacher_logits=zt, token_shape=torch.Size([h.shape[0]])), h


def make_linear_token_plan(hidden, weight, labels, *, bias, teacher_hidden, teacher_weight, teacher_bias,
                           **kwargs) -> LinearTokenPlan:
    heads = check_heads(hidden, weight, bias=bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                        teacher_bias=teacher_bias)
    stand_in = heads.stand_in_logits()
    x = prepare_token_inputs(stand_in, labels, teacher_logits=None if teacher_hidden is None else stand_in,
                             op="linear_token_logprobs", **kwargs)
    head = Head(weight, bias)
    teacher_head = None
    if teacher_hidden is not None:
        if heads.shared_weight and heads.teacher_bias is bias:
            teacher_head = head
        else:
            teacher_head = Head(heads.teacher_weight, heads.teacher_bias,
                                share_weight_with=head if heads.shared_weight else None)
    N, H = heads.hidden.shape
    chunk = chunk_rows(N, weight.shape[0], H, device_type=hidden.device.type,
                       teacher_logits=teacher_head is not None,
                       low_precision_grad_copy=head.low_precision_grad_copy)
    return LinearTokenPlan(x=x, heads=heads, head=head, teacher_head=teacher_head, engine=pick_token_engine(x),
                           chunk=chunk)


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, plan):
        needs = tuple(ctx.needs_input_grad[:3])
        N, dev = plan.x.labels.shape[0], hidden2d.device
        logprobs = torch.zeros(N, dtype=F32, device=dev)
        entropy = torch.zeros(N, dtype=F32, device=dev) if plan.x.entropy else logprobs.new_empty(0)
        teacher = torch.zeros(N, dtype=F32, device=dev) if plan.teacher_head is not None else logprobs.new_empty(0)
        stats = []
        with torch.autocast(device_type=dev.type, enabled=False):  # keep the logit GEMMs fp32 (heads.py)
            for sl in plan.chunks():
                xc, _ = plan.chunk_inputs(sl, hidden2d.detach()[sl])
                out, st = plan.engine.forward(xc, save_stats=any(needs))
                stats.append(st)
                logprobs[sl] = out["logprobs"]
                if plan.x.entropy:
                    entropy[sl] = out["entropy"]
                if plan.teacher_head is not None:
                    teacher[sl] = out["teacher_logprobs"]
                del xc, out
        ctx.mark_non_differentiable(teacher)
        if not plan.x.entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        ctx.needs = needs
        if any(needs):
            # backward recomputes the chunk logits; saving the inputs lets autograd catch in-place changes
            ctx.plan, ctx.stats = plan, stats
            ctx.save_for_backward(hidden2d, weight)
        return logprobs, entropy, teacher

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_teacher):
        plan, needs = ctx.plan, ctx.needs
        mask = plan.x.mask
        g_lp = masked_upstream(grad_logprobs, mask)
        g_h = masked_upstream(grad_entropy, mask) if plan.x.entropy else None
        if g_lp is None and g_h is None:
            return None, None, None, None
        if g_lp is None:
            g_lp = torch.zeros_like(g_h)
        hidden2d, weight = ctx.saved_tensors
        bias = plan.heads.bias
        gh = torch.empty_like(hidden2d) if needs[0] else None
        gw = torch.zeros(weight.shape, dtype=F32, device=weight.device) if needs[1] else None
        gb = torch.zeros(bias.shape, dtype=F32, device=bias.device) if needs[2] else None
        with torch.autocast(device_type=hidden2d.device.type, enabled=False):
            for sl, st in zip(plan.chunks(), ctx.stats):
                xc, h = plan.chunk_inputs(sl, hidden2d.detach()[sl])
                z = xc.logits     # the engine overwrites the chunk logits with dL/dz
                plan.engine.backward(xc, g_lp[sl], None if g_h is None else g_h[sl], st, z)
                g_op = plan.head.grad_operand(z)
                if gh is not None:
                    plan.head.grad_input(g_op, gh[sl])
                if gw is not None:
                    plan.head.accumulate_grad_weight(gw, g_op, h)
                if gb is not None:
                    gb.add_(z.sum(0))
                del xc, z, g_op
        return (gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype), None)


def linear_token_logprobs(hidden, weight, labels, *, bias=None, mask=None, temperature=1.0, entropy=True,
                          teacher_hidden=None, teacher_weight=None, teacher_bias=None, inplace_backward=False,
                          backend="auto"):
    """``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without ever holding the [N, V] logits.

    hidden: [N, H] or [B, T, H] (fp32 / bf16 / fp16); weight: [V, H] in hidden's dtype (the lm_head);
    bias: [V] or None. ``teacher_hidden`` (same token shape) gives the teacher's log-prob of ``labels``
    through ``weight`` / ``bias`` unless ``teacher_weight`` / ``teacher_bias`` are given (no gradient ever
    flows to the teacher). Every other argument is that of ``token_logprobs``; ``inplace_backward`` has no
    effect here (the gradient is always written into the chunk's own logits buffer). Gradients flow to
    ``hidden``, ``weight`` and ``bias``.
    """
    plan = make_linear_token_plan(hidden, weight, labels, bias=bias, teacher_hidden=teacher_hidden,
                                  teacher_weight=teacher_weight, teacher_bias=teacher_bias, mask=mask,
                                  temperature=temperature, entropy=entropy, inplace_backward=inplace_backward,
                                  backend=backend)
    out = LinearTokenLogprobsFunction.apply(plan.heads.hidden, weight, bias, plan)
    return package_stats(*out, plan.x)
