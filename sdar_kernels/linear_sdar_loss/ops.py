"""``linear_sdar_loss`` as registered ``torch.library`` custom ops (fake implementations + autograd), so
``torch.compile(fullgraph=True)`` traces through it; the chunk loop runs inside the op.

  linear_sdar_loss_forward(...)  -> (loss, per_token [F, N], grad_hidden, grad_weight, grad_bias, stats)
  linear_sdar_loss_backward(...) -> (grad_hidden, grad_weight, grad_bias)   the "none" recompute pass

Schedules (README.md, "Schedule"): "fused" (mean / sum: the gradient GEMMs run in the forward, in fp32
buffers; backward scales them by the upstream scalar and rounds once), "two_phase" (reduction "none":
backward recomputes each chunk's logits), "no_grad" (loss terms only, no gradient GEMM at all).
Gradients that are not needed are empty tensors and cost nothing.

The teacher head is passed as given by the user: ``teacher_weight`` None means "the student's head" (and
``teacher_bias`` None then means "the student's bias too").
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from .._checks import PreparedInputs
from ..sdar_loss.engines import ENGINES
from ..sdar_loss.ops import OPTION_ARGS
from ..sdar_loss.options import SDAROptions
from ..sdar_loss.output import NUM_ROW_STATS, PER_TOKEN_FIELDS, reduce_loss
from .inputs import LinearInputs
from ..sdar_loss.vocab_parallel import resolve_group
from .schedule import make_plan, run_chunks
from .vocab_parallel import run_vocab_parallel

F32 = torch.float32
_NUM_TENSOR_INPUTS = 13


def _plan(hidden, weight, bias, labels, mask, weights, teacher_hidden, teacher_weight, teacher_bias,
          teacher_logprobs, advantages, old_logprobs, ref_logprobs, opts, engine, vocab_parallel=False):
    options = SDAROptions(**dict(zip(OPTION_ARGS, opts)), backend=engine)
    x = PreparedInputs(logits=None, labels=labels, mask=mask, weights=weights, teacher_logits=None,
                       teacher_logprobs=teacher_logprobs, advantages=advantages, old_logprobs=old_logprobs,
                       ref_logprobs=ref_logprobs, token_shape=labels.shape, options=options)
    shared = teacher_hidden is not None and teacher_weight is None
    if shared:
        teacher_weight = weight
        teacher_bias = bias if teacher_bias is None else teacher_bias
    inputs = LinearInputs(x=x, hidden=hidden, weight=weight, bias=bias, teacher_hidden=teacher_hidden,
                          teacher_weight=teacher_weight, teacher_bias=teacher_bias, shared_weight=shared)
    return make_plan(inputs, ENGINES[engine], vocab_parallel)


def _grad_buffers(hidden, weight, bias, needs, hidden_dtype):
    gh = torch.empty(hidden.shape, dtype=hidden_dtype, device=hidden.device) if needs[0] else None
    gw = torch.zeros(weight.shape, dtype=F32, device=weight.device) if needs[1] else None
    gb = torch.zeros(bias.shape, dtype=F32, device=bias.device) if needs[2] and bias is not None else None
    return gh, gw, gb


@torch.library.custom_op("sdar_kernels::linear_sdar_loss_forward", mutates_args=())
def linear_sdar_loss_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, mask: Tensor, weights: Tensor,
    teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    teacher_logprobs: Optional[Tensor], advantages: Optional[Tensor], old_logprobs: Optional[Tensor],
    ref_logprobs: Optional[Tensor],
    gate_beta: float, distill_coef: float, distill: str, jsd_beta: float, clip_low: float, clip_high: float,
    clip_ratio_c: Optional[float], kl_coef: float, entropy_coef: float, temperature: float, reduction: str,
    engine: str, schedule: str, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
    tp_group_name: Optional[str] = None, vocab_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    opts = (gate_beta, distill_coef, distill, jsd_beta, clip_low, clip_high, clip_ratio_c, kl_coef,
            entropy_coef, temperature, reduction)
    plan = _plan(hidden, weight, bias, labels, mask, weights, teacher_hidden, teacher_weight, teacher_bias,
                 teacher_logprobs, advantages, old_logprobs, ref_logprobs, opts, engine, tp_group_name is not None)
    needs = (grad_hidden, grad_weight, grad_bias) if schedule == "fused" else (False, False, False)
    # fused: every gradient stays fp32 until backward has applied the upstream scale, so a bf16 / fp16
    # gradient is rounded once (scaling an already-rounded bf16 gradient would round twice)
    gh, gw, gb = _grad_buffers(hidden, weight, bias, needs, hidden_dtype=F32)
    run = run_chunks if tp_group_name is None else functools.partial(
        run_vocab_parallel, group=resolve_group(tp_group_name), offset=vocab_offset)
    per_token, stats = run(plan, weights, grad_hidden=gh, grad_weight=gw, grad_bias=gb,
                           save_stats=schedule == "two_phase")
    loss = reduce_loss(per_token["loss"], plan.inputs.x)
    stacked = torch.stack([per_token[k] for k in PER_TOKEN_FIELDS[1:]])

    def out(t):
        return t if t is not None else hidden.new_empty(0, dtype=F32)

    return loss, stacked, out(gh), out(gw), out(gb), out(stats)


@linear_sdar_loss_forward.register_fake
def _(hidden, weight, bias, labels, mask, weights, teacher_hidden, teacher_weight, teacher_bias,
      teacher_logprobs, advantages, old_logprobs, ref_logprobs, gate_beta, distill_coef, distill, jsd_beta,
      clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature, reduction, engine, schedule,
      grad_hidden, grad_weight, grad_bias, tp_group_name=None, vocab_offset=0):
    N = labels.shape[0]
    fused = schedule == "fused"

    def buf(want, shape):
        return hidden.new_empty(shape if want else (0,), dtype=F32)

    return (weights.new_empty(N) if reduction == "none" else weights.new_empty(()),
            weights.new_empty(len(PER_TOKEN_FIELDS) - 1, N),
            buf(fused and grad_hidden, hidden.shape), buf(fused and grad_weight, weight.shape),
            buf(fused and grad_bias and bias is not None, weight.shape[:1]),
            buf(schedule == "two_phase" and (engine == "triton" or tp_group_name is not None), (N, NUM_ROW_STATS)))


@torch.library.custom_op("sdar_kernels::linear_sdar_loss_backward", mutates_args=())
def linear_sdar_loss_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, mask: Tensor, weights: Tensor,
    teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    teacher_logprobs: Optional[Tensor], advantages: Optional[Tensor], old_logprobs: Optional[Tensor],
    ref_logprobs: Optional[Tensor], stats: Tensor,
    gate_beta: float, distill_coef: float, distill: str, jsd_beta: float, clip_low: float, clip_high: float,
    clip_ratio_c: Optional[float], kl_coef: float, entropy_coef: float, temperature: float, reduction: str,
    engine: str, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
    tp_group_name: Optional[str] = None, vocab_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    opts = (gate_beta, distill_coef, distill, jsd_beta, clip_low, clip_high, clip_ratio_c, kl_coef,
            entropy_coef, temperature, reduction)
    plan = _plan(hidden, weight, bias, labels, mask, weights, teacher_hidden, teacher_weight, teacher_bias,
                 teacher_logprobs, advantages, old_logprobs, ref_logprobs, opts, engine, tp_group_name is not None)
    gh, gw, gb = _grad_buffers(hidden, weight, bias, (grad_hidden, grad_weight, grad_bias),
                               hidden_dtype=hidden.dtype)
    run = run_chunks if tp_group_name is None else functools.partial(
        run_vocab_parallel, group=resolve_group(tp_group_name), offset=vocab_offset)
    run(plan, weights, grad_hidden=gh, grad_weight=gw, grad_bias=gb, stats=stats if stats.numel() else None,
        backward=True)
    return (gh if gh is not None else hidden.new_empty(0),
            gw.to(weight.dtype) if gw is not None else weight.new_empty(0),
            gb.to(bias.dtype) if gb is not None else weight.new_empty(0))


@linear_sdar_loss_backward.register_fake
def _(hidden, weight, bias, *args):
    grad_hidden, grad_weight, grad_bias = args[-5:-2]
    return (torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if grad_weight else weight.new_empty(0),
            torch.empty_like(bias) if grad_bias and bias is not None else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    tensors, rest = inputs[:_NUM_TENSOR_INPUTS], inputs[_NUM_TENSOR_INPUTS:]
    opts = tuple(rest[:len(OPTION_ARGS)])
    engine, schedule = rest[len(OPTION_ARGS)], rest[len(OPTION_ARGS) + 1]
    ctx.tp = tuple(rest[len(OPTION_ARGS) + 5:])      # (tp_group_name, vocab_offset)
    _, stacked, gh, gw, gb, stats = output
    # the per-token / gradient / statistics outputs get no gradient: don't let autograd allocate zeros
    # for them (an [N, V] zero fill in every backward)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(stacked, gh, gw, gb, stats)
    ctx.schedule, ctx.engine, ctx.opts, ctx.used = schedule, engine, opts, False
    hidden, weight, bias = tensors[:3]
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    if schedule == "fused":       # everything backward needs is in the gradients
        ctx.save_for_backward(gh, gw, gb)
    elif schedule == "two_phase":  # backward recomputes from the inputs; saving them lets autograd
        ctx.save_for_backward(*tensors, stats)   # detect in-place changes between forward and backward


def _backward(ctx, grad_loss, *_unused):
    if torch.is_grad_enabled():
        raise ValueError("linear_sdar_loss: double backward (create_graph=True) is not supported")
    nones = (None,) * (_NUM_TENSOR_INPUTS + len(OPTION_ARGS) + 7)
    needs = ctx.needs_input_grad[:3]
    if ctx.schedule == "fused":
        if ctx.used:
            raise RuntimeError("linear_sdar_loss: backward ran twice; the fused gradients are scaled in place, "
                               "so retain_graph re-use is not supported with reduction 'mean' / 'sum' "
                               "('none' recomputes and supports it)")
        ctx.used = True
        grads = []
        for g, dt, need in zip(ctx.saved_tensors, ctx.dtypes, needs):
            if not need:
                grads.append(None)
                continue
            torch.ops.sdar_kernels.scale_(g, grad_loss)
            grads.append(g.to(dt))
        return (*grads, *nones[3:])
    *tensors, stats = ctx.saved_tensors
    hidden, weight, bias, labels, mask, weights = tensors[:6]
    weights = torch.where(mask, weights * grad_loss.to(F32), 0.0)
    gh, gw, gb = torch.ops.sdar_kernels.linear_sdar_loss_backward(
        hidden, weight, bias, labels, mask, weights, *tensors[6:], stats, *ctx.opts, ctx.engine,
        needs[0], needs[1], needs[2] and bias is not None, *ctx.tp)
    return (gh if needs[0] else None, gw if needs[1] else None,
            gb if needs[2] and bias is not None else None, *nones[3:])


linear_sdar_loss_forward.register_autograd(_backward, setup_context=_setup_context)
