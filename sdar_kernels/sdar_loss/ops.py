"""``sdar_loss`` as registered ``torch.library`` custom ops, with fake (shape) implementations and the
autograd formula, so ``torch.compile(fullgraph=True)`` traces a training step through it without a graph
break, and CUDA graphs see no host sync.

Ops (namespace ``sdar_kernels``):
  sdar_loss_forward(...)  -> (loss, per_token [F, N], grad, stats)    functional, differentiable
  sdar_loss_backward(...) -> grad                                     the two-phase gradient pass
  sdar_loss_backward_(logits!, ...)                                   the same, written into the logits
  scale_(t!, scale)                                                   t *= scale, skipped when scale == 1

The forward runs one of four schedules (README.md, "Schedules"):
  "fused"      mean / sum with a gradient: the gradient is written in the forward launch; backward scales
               it by the upstream scalar (no pass at all when that is 1).
  "two_phase"  reduction "none": the forward keeps row statistics; backward makes one gradient pass with
               w_t = m_t g_t.
  "inplace"    inplace_backward: two-phase, and backward writes the gradient into the logits' storage
               (the logits stay intact until then; a functional custom op cannot alias its input).
  "no_grad"    no gradient wanted (grad mode off, or logits that do not require grad): loss terms only.
"""

from typing import Optional

import torch
from torch import Tensor

from .._checks import PreparedInputs
from .engines import ENGINES
from .options import SDAROptions
from .output import NUM_ROW_STATS, PER_TOKEN_FIELDS, reduce_loss
from .vocab_parallel import resolve_group, vocab_parallel_rows

# SDAROptions fields the ops take as scalars, in schema order (loss_agg_mode is already in the weights).
OPTION_ARGS = ("gate_beta", "distill_coef", "distill", "jsd_beta", "clip_low", "clip_high", "clip_ratio_c",
               "kl_coef", "entropy_coef", "temperature", "reduction")
SCHEDULES = ("fused", "two_phase", "inplace", "no_grad")


def option_args(options: SDAROptions) -> tuple:
    return tuple(getattr(options, name) for name in OPTION_ARGS)


def _prepared(logits, labels, mask, weights, teacher_logits, teacher_logprobs, advantages, old_logprobs,
              ref_logprobs, opts, engine) -> PreparedInputs:
    options = SDAROptions(**dict(zip(OPTION_ARGS, opts)), backend=engine)
    return PreparedInputs(
        logits=logits, labels=labels, mask=mask, weights=weights, teacher_logits=teacher_logits,
        teacher_logprobs=teacher_logprobs, advantages=advantages, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, token_shape=labels.shape, options=options)


def _empty(like):
    return like.new_empty(0)


@torch.library.custom_op("sdar_kernels::sdar_loss_forward", mutates_args=())
def sdar_loss_forward(
    logits: Tensor, labels: Tensor, mask: Tensor, weights: Tensor,
    teacher_logits: Optional[Tensor], teacher_logprobs: Optional[Tensor], advantages: Optional[Tensor],
    old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor],
    gate_beta: float, distill_coef: float, distill: str, jsd_beta: float, clip_low: float, clip_high: float,
    clip_ratio_c: Optional[float], kl_coef: float, entropy_coef: float, temperature: float, reduction: str,
    engine: str, schedule: str, tp_group_name: Optional[str] = None, vocab_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    opts = (gate_beta, distill_coef, distill, jsd_beta, clip_low, clip_high, clip_ratio_c, kl_coef,
            entropy_coef, temperature, reduction)
    x = _prepared(logits, labels, mask, weights, teacher_logits, teacher_logprobs, advantages, old_logprobs,
                  ref_logprobs, opts, engine)
    grad = torch.empty_like(logits) if schedule == "fused" else None
    save_stats = schedule in ("two_phase", "inplace")
    if tp_group_name is not None:
        per_token, stats = vocab_parallel_rows(x, ENGINES[engine], resolve_group(tp_group_name), vocab_offset)
        if grad is not None:
            ENGINES[engine].grad_from_stats(x, weights, grad, stats, vocab_offset)
        stats = stats if save_stats else None
    else:
        per_token, stats = ENGINES[engine].forward(x, weights, grad, save_stats)
    loss = reduce_loss(per_token["loss"], x)
    stacked = torch.stack([per_token[k] for k in PER_TOKEN_FIELDS[1:]])
    return (loss, stacked, grad if grad is not None else _empty(logits),
            stats if stats is not None else _empty(weights))


@sdar_loss_forward.register_fake
def _(logits, labels, mask, weights, teacher_logits, teacher_logprobs, advantages, old_logprobs, ref_logprobs,
      gate_beta, distill_coef, distill, jsd_beta, clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef,
      temperature, reduction, engine, schedule, tp_group_name=None, vocab_offset=0):
    N = labels.shape[0]
    loss = weights.new_empty(N) if reduction == "none" else weights.new_empty(())
    stacked = weights.new_empty(len(PER_TOKEN_FIELDS) - 1, N)
    grad = torch.empty_like(logits) if schedule == "fused" else _empty(logits)
    keeps_stats = schedule in ("two_phase", "inplace") and (engine == "triton" or tp_group_name is not None)
    stats = weights.new_empty(N, NUM_ROW_STATS) if keeps_stats else _empty(weights)
    return loss, stacked, grad, stats


def _gradient_pass(grad, logits, labels, mask, weights, teacher_logits, teacher_logprobs, advantages,
                   old_logprobs, ref_logprobs, stats, opts, engine, vocab_parallel, vocab_offset):
    x = _prepared(logits, labels, mask, weights, teacher_logits, teacher_logprobs, advantages, old_logprobs,
                  ref_logprobs, opts, engine)
    if vocab_parallel:   # the whole row's statistics came from the group: the shard's gradient from them
        ENGINES[engine].grad_from_stats(x, weights, grad, stats, vocab_offset)
    else:
        ENGINES[engine].backward(x, weights, grad, stats if stats.numel() else None)


@torch.library.custom_op("sdar_kernels::sdar_loss_backward", mutates_args=())
def sdar_loss_backward(
    logits: Tensor, labels: Tensor, mask: Tensor, weights: Tensor,
    teacher_logits: Optional[Tensor], teacher_logprobs: Optional[Tensor], advantages: Optional[Tensor],
    old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor], stats: Tensor,
    gate_beta: float, distill_coef: float, distill: str, jsd_beta: float, clip_low: float, clip_high: float,
    clip_ratio_c: Optional[float], kl_coef: float, entropy_coef: float, temperature: float, reduction: str,
    engine: str, vocab_parallel: bool = False, vocab_offset: int = 0,
) -> Tensor:
    grad = torch.empty_like(logits)
    _gradient_pass(grad, logits, labels, mask, weights, teacher_logits, teacher_logprobs, advantages,
                   old_logprobs, ref_logprobs, stats,
                   (gate_beta, distill_coef, distill, jsd_beta, clip_low, clip_high, clip_ratio_c, kl_coef,
                    entropy_coef, temperature, reduction), engine, vocab_parallel, vocab_offset)
    return grad


@sdar_loss_backward.register_fake
def _(logits, *args):
    return torch.empty_like(logits)


@torch.library.custom_op("sdar_kernels::sdar_loss_backward_", mutates_args=("logits",))
def sdar_loss_backward_(
    logits: Tensor, labels: Tensor, mask: Tensor, weights: Tensor,
    teacher_logits: Optional[Tensor], teacher_logprobs: Optional[Tensor], advantages: Optional[Tensor],
    old_logprobs: Optional[Tensor], ref_logprobs: Optional[Tensor], stats: Tensor,
    gate_beta: float, distill_coef: float, distill: str, jsd_beta: float, clip_low: float, clip_high: float,
    clip_ratio_c: Optional[float], kl_coef: float, entropy_coef: float, temperature: float, reduction: str,
    engine: str, vocab_parallel: bool = False, vocab_offset: int = 0,
) -> None:
    # each block of the logits is read before its gradient overwrites it (kernels.py / torch_impl.py)
    _gradient_pass(logits, logits, labels, mask, weights, teacher_logits, teacher_logprobs, advantages,
                   old_logprobs, ref_logprobs, stats,
                   (gate_beta, distill_coef, distill, jsd_beta, clip_low, clip_high, clip_ratio_c, kl_coef,
                    entropy_coef, temperature, reduction), engine, vocab_parallel, vocab_offset)


@sdar_loss_backward_.register_fake
def _(logits, *args):
    return None


@torch.library.custom_op("sdar_kernels::scale_", mutates_args=("t",))
def scale_(t: Tensor, scale: Tensor) -> None:
    """t *= scale in one rounding (fp32 product), and nothing at all when scale is exactly 1: on CUDA the
    kernel reads the scalar on the device (no host sync); elsewhere reading it is free."""
    if t.is_cuda:
        from .launch import scale_triton_
        scale_triton_(t, scale.reshape(1).to(torch.float32))
    elif float(scale) != 1.0:
        t.mul_(scale.to(torch.float32))


@scale_.register_fake
def _(t, scale):
    return None


def _setup_context(ctx, inputs, output):
    (logits, labels, mask, weights, teacher_logits, teacher_logprobs, advantages, old_logprobs,
     ref_logprobs, *rest) = inputs
    opts = tuple(rest[:len(OPTION_ARGS)])
    engine, schedule, tp_group_name, vocab_offset = rest[len(OPTION_ARGS):]
    _, stacked, grad, stats = output
    # the per-token / gradient / statistics outputs get no gradient: don't let autograd allocate zeros
    # for them (an [N, V] zero fill in every backward)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(stacked, grad, stats)
    ctx.schedule, ctx.engine, ctx.opts, ctx.used = schedule, engine, opts, False
    ctx.vocab_parallel, ctx.vocab_offset = tp_group_name is not None, vocab_offset
    if schedule == "fused":
        # only the gradient: the (teacher) logits can be freed as soon as the caller drops them
        ctx.save_for_backward(grad)
    elif schedule in ("two_phase", "inplace"):
        # the logits go through save_for_backward, so an in-place change to them before backward raises
        ctx.save_for_backward(logits, labels, mask, weights, teacher_logits, teacher_logprobs, advantages,
                              old_logprobs, ref_logprobs, stats)


def _backward(ctx, grad_loss, _grad_stacked, _grad_grad, _grad_stats):
    if torch.is_grad_enabled():
        raise ValueError("sdar_loss: double backward (create_graph=True) is not supported; the gradient "
                         "is computed by a fused kernel, not by differentiable torch ops")
    nones = (None,) * (9 + len(OPTION_ARGS) + 4)
    if ctx.schedule in ("fused", "inplace"):
        if ctx.used:
            raise RuntimeError("sdar_loss: backward ran twice through one forward; the gradient buffer (or, "
                               "with inplace_backward, the logits) is written in place, so retain_graph "
                               "re-use is not supported for this schedule")
        ctx.used = True
    if ctx.schedule == "fused":
        (grad,) = ctx.saved_tensors
        torch.ops.sdar_kernels.scale_(grad, grad_loss)
        return (grad,) + nones[1:]
    (logits, labels, mask, weights, teacher_logits, teacher_logprobs, advantages, old_logprobs, ref_logprobs,
     stats) = ctx.saved_tensors
    # w_t * g (scalar upstream of "mean" / "sum") or m_t * g_t ("none": weights are the mask); a NaN
    # upstream value on a masked token stays out
    weights = torch.where(mask, weights * grad_loss.to(torch.float32), 0.0)
    args = (labels, mask, weights, teacher_logits, teacher_logprobs, advantages, old_logprobs, ref_logprobs,
            stats, *ctx.opts, ctx.engine, ctx.vocab_parallel, ctx.vocab_offset)
    if ctx.schedule == "inplace":
        torch.ops.sdar_kernels.sdar_loss_backward_(logits, *args)
        return (logits,) + nones[1:]
    return (torch.ops.sdar_kernels.sdar_loss_backward(logits, *args),) + nones[1:]


sdar_loss_forward.register_autograd(_backward, setup_context=_setup_context)
