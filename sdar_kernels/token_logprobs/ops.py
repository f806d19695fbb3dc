"""``token_logprobs`` and ``linear_token_logprobs`` as registered ``torch.library`` custom ops (fake
implementations + the autograd formula), like ``sdar_loss`` (sdar_loss/ops.py): ``torch.compile(fullgraph=True)``
traces through them, and the work runs inside the ops.

  token_logprobs_forward(...)         -> (logprobs, entropy, teacher_logprobs, stats)
  token_logprobs_backward(...)        -> grad                      one gradient pass (any g_lp, g_H)
  token_logprobs_backward_(logits!)                                the same, written into the logits
  linear_token_logprobs_forward(...)  -> (logprobs, entropy, teacher_logprobs, stats)
  linear_token_logprobs_backward(...) -> (grad_hidden, grad_weight, grad_bias)

Schedules: "grad" (the forward keeps row statistics, backward makes one pass), "inplace" (the same, the
pass written into the logits' storage: the logits stay intact until backward), "no_grad" (outputs only).
Outputs that are not computed (entropy=False, no teacher) are empty tensors.
"""

from typing import Optional

import torch
from torch import Tensor

from ..sdar_loss.vocab_parallel import resolve_group
from .engines import TOKEN_ENGINES, vocab_parallel_backward, vocab_parallel_forward
from .inputs import TokenInputs

F32 = torch.float32


def _token_inputs(logits, labels, mask, teacher_logits, temperature, entropy) -> TokenInputs:
    return TokenInputs(logits=logits, labels=labels, mask=mask, teacher_logits=teacher_logits,
                       token_shape=labels.shape, temperature=temperature, entropy=entropy, inplace_backward=False,
                       backend="auto")


def _outputs(out, stats, like):
    """The op's four outputs: absent ones as empty tensors; statistics never alias an output."""
    ent = out["entropy"] if out["entropy"] is not None else like.new_empty(0)
    teacher = out["teacher_logprobs"] if out["teacher_logprobs"] is not None else like.new_empty(0)
    if stats is None:
        stats = like.new_empty(0)   # a fresh empty tensor per output: outputs may not alias each other
    elif stats is ent:
        stats = stats.clone()   # the torch engine's statistic is the entropy itself
    return out["logprobs"], ent, teacher, stats


@torch.library.custom_op("sdar_kernels::token_logprobs_forward", mutates_args=())
def token_logprobs_forward(
    logits: Tensor, labels: Tensor, mask: Tensor, teacher_logits: Optional[Tensor], temperature: float,
    entropy: bool, engine: str, schedule: str, tp_group_name: Optional[str] = None, vocab_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = _token_inputs(logits, labels, mask, teacher_logits, temperature, entropy)
    if tp_group_name is not None:
        out, stats = vocab_parallel_forward(x, engine, resolve_group(tp_group_name), vocab_offset)
        out = {k: (v.clone() if v is not None else None) for k, v in out.items()}   # outputs never alias
        return _outputs(out, stats if schedule != "no_grad" else None, out["logprobs"])
    out, stats = TOKEN_ENGINES[engine].forward(x, save_stats=schedule != "no_grad")
    return _outputs(out, stats, out["logprobs"])


def _stats_shape(engine, N, entropy, vocab_parallel=False):
    if engine == "triton" or vocab_parallel:
        return (N, 9)
    return (N,) if entropy else (0,)


@token_logprobs_forward.register_fake
def _(logits, labels, mask, teacher_logits, temperature, entropy, engine, schedule, tp_group_name=None,
      vocab_offset=0):
    N = labels.shape[0]
    f = logits.new_empty(N, dtype=F32)
    ent = logits.new_empty(N if entropy else 0, dtype=F32)
    teacher = logits.new_empty(N if teacher_logits is not None else 0, dtype=F32)
    shape = _stats_shape(engine, N, entropy, tp_group_name is not None) if schedule != "no_grad" else (0,)
    return f, ent, teacher, logits.new_empty(shape, dtype=F32)


def _gradient_pass(grad, logits, labels, mask, stats, grad_logprobs, grad_entropy, temperature, entropy, engine,
                   vocab_parallel, vocab_offset):
    x = _token_inputs(logits, labels, mask, None, temperature, entropy)
    if vocab_parallel:
        vocab_parallel_backward(x, engine, grad_logprobs, grad_entropy, stats, grad, vocab_offset)
    else:
        TOKEN_ENGINES[engine].backward(x, grad_logprobs, grad_entropy, stats, grad)


@torch.library.custom_op("sdar_kernels::token_logprobs_backward", mutates_args=())
def token_logprobs_backward(
    logits: Tensor, labels: Tensor, mask: Tensor, stats: Tensor, grad_logprobs: Tensor,
    grad_entropy: Optional[Tensor], temperature: float, entropy: bool, engine: str, vocab_parallel: bool = False,
    vocab_offset: int = 0,
) -> Tensor:
    grad = torch.empty_like(logits)
    _gradient_pass(grad, logits, labels, mask, stats, grad_logprobs, grad_entropy, temperature, entropy, engine,
                   vocab_parallel, vocab_offset)
    return grad


@token_logprobs_backward.register_fake
def _(logits, *args):
    return torch.empty_like(logits)


@torch.library.custom_op("sdar_kernels::token_logprobs_backward_", mutates_args=("logits",))
def token_logprobs_backward_(
    logits: Tensor, labels: Tensor, mask: Tensor, stats: Tensor, grad_logprobs: Tensor,
    grad_entropy: Optional[Tensor], temperature: float, entropy: bool, engine: str, vocab_parallel: bool = False,
    vocab_offset: int = 0,
) -> None:
    # each block / chunk of the logits is read before its gradient overwrites it
    _gradient_pass(logits, logits, labels, mask, stats, grad_logprobs, grad_entropy, temperature, entropy, engine,
                   vocab_parallel, vocab_offset)


@token_logprobs_backward_.register_fake
def _(logits, *args):
    return None


def masked_upstream(g, mask):
    """An upstream gradient as flat fp32 with exact zeros on masked rows (None stays None)."""
    if g is None:
        return None
    return torch.where(mask, g.reshape(-1).to(F32), 0.0)


def _refuse_double_backward(op):
    if torch.is_grad_enabled():
        raise ValueError(f"{op}: double backward (create_graph=True) is not supported; the gradient is "
                         "computed by a fused pass, not by differentiable torch ops")


def _upstreams(ctx, mask, grad_logprobs, grad_entropy):
    """(g_lp, g_H) masked, g_H None without an entropy term; (None, None) when nothing flows back."""
    g_lp = masked_upstream(grad_logprobs, mask)
    g_h = masked_upstream(grad_entropy, mask) if ctx.entropy else None
    if g_lp is None and g_h is None:
        return None, None
    return (g_lp if g_lp is not None else torch.zeros_like(g_h)), g_h


def _setup_context(ctx, inputs, output):
    logits, labels, mask, teacher_logits, temperature, entropy, engine, schedule, tp_group_name, vocab_offset = inputs
    _, ent, teacher, stats = output
    ctx.mark_non_differentiable(teacher, stats)
    if not entropy:
        ctx.mark_non_differentiable(ent)
    ctx.set_materialize_grads(False)   # an unused output's gradient arrives as None: no work for it
    ctx.temperature, ctx.entropy, ctx.engine, ctx.schedule, ctx.used = temperature, entropy, engine, schedule, False
    ctx.vocab_parallel, ctx.vocab_offset = tp_group_name is not None, vocab_offset
    if schedule != "no_grad":
        # the logits go through save_for_backward: an in-place change before backward raises
        ctx.save_for_backward(logits, labels, mask, stats)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_teacher, _grad_stats):
    _refuse_double_backward("token_logprobs")
    logits, labels, mask, stats = ctx.saved_tensors
    g_lp, g_h = _upstreams(ctx, mask, grad_logprobs, grad_entropy)
    if g_lp is None:
        return (None,) * 10
    if ctx.schedule == "inplace":
        if ctx.used:
            raise RuntimeError("token_logprobs: backward ran twice through one forward with inplace_backward; "
                               "the logits were overwritten by the first gradient")
        ctx.used = True
    args = (labels, mask, stats, g_lp, g_h, ctx.temperature, ctx.entropy, ctx.engine, ctx.vocab_parallel,
            ctx.vocab_offset)
    if ctx.schedule == "inplace":
        torch.ops.sdar_kernels.token_logprobs_backward_(logits, *args)
        return (logits,) + (None,) * 9
    return (torch.ops.sdar_kernels.token_logprobs_backward(logits, *args),) + (None,) * 9


token_logprobs_forward.register_autograd(_backward, setup_context=_setup_context)
