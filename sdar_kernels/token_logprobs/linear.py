"""``linear_token_logprobs``: ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without [N, V] logits.

Forward, by engine (both as the custom op ``sdar_kernels::linear_token_logprobs_forward``):
- Triton: the logits-free kernel (linear_sdar_loss/logprob_launch.py): one fused GEMM + online
  log-sum-exp pass per head with the logit tiles on chip, no [C, V] buffer at all. Its lse and entropy are
  the statistics backward needs (as m = tau * lse, log2 d = 0 in the row kernels' form).
- torch: chunked over tokens exactly as ``linear_sdar_loss`` is (its ``Head`` matmuls and ``chunk_rows``
  rule): fp32 chunk logits [C, V], the torch row engine gives log p(y), H and the teacher's log p_T(y).
Backward (``linear_token_logprobs_backward``): recompute each chunk's logits, have the row engine write
dL/dz for the upstream g_lp, g_H (straight in the GEMMs' dtype, Head.grad_buffer), and run the GEMMs
grad_hidden = g @ W, grad_W += g.T @ h, grad_b += g.sum(0).

Masked rows: their hidden rows are zeroed before a matmul (so non-finite padding cannot reach grad_W
through 0 * NaN); the engines give them 0 outputs and an exact-zero gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._tp import vocab_shard
from ..linear_sdar_loss.chunking import chunk_rows
from ..linear_sdar_loss.heads import Head
from ..linear_sdar_loss.inputs import check_heads
from ..sdar_loss.vocab_parallel import resolve_group
from .engines import TOKEN_ENGINES, pick_token_engine, vocab_parallel_backward
from .function import package_stats, token_schedule
from .inputs import TokenInputs, prepare_token_inputs
from .ops import _refuse_double_backward, _upstreams

F32 = torch.float32
_NUM_TENSOR_INPUTS = 8


def _heads(weight, bias, teacher_hidden, teacher_weight, teacher_bias):
    """(student Head, teacher Head or None): a teacher_weight of None shares the student's head (and then a
    teacher_bias of None shares its bias)."""
    head = Head(weight, bias)
    if teacher_hidden is None:
        return head, None
    if teacher_weight is None:
        return head, (head if teacher_bias is None else Head(weight, teacher_bias, share_weight_with=head))
    return head, Head(teacher_weight, teacher_bias)


def _chunks(N, V, H, device, teacher, head):
    chunk = chunk_rows(N, V, H, device_type=device.type, teacher_logits=teacher,
                       low_precision_grad_copy=head.low_precision_grad_copy)
    for r0 in range(0, N, chunk):
        yield slice(r0, min(N, r0 + chunk))


def _chunk_inputs(head, h, labels, mask, temperature, entropy, teacher_logits=None):
    h = torch.where(mask[:, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
    x = TokenInputs(logits=head.logits(h), labels=labels, mask=mask, teacher_logits=teacher_logits,
                    token_shape=labels.shape, temperature=temperature, entropy=entropy, inplace_backward=False,
                    backend="auto")
    return x, h


def _forward_triton(hidden, weight, bias, labels, mask, teacher_hidden, teacher_head, temperature, entropy,
                    keep_stats):
    from ..linear_sdar_loss.logprob_launch import linear_logprobs
    student = linear_logprobs(hidden, weight, labels, bias=bias, mask=mask, temperature=temperature,
                              entropy=entropy)
    teacher = None
    if teacher_head is not None:
        teacher = linear_logprobs(teacher_hidden, teacher_head.weight, labels, bias=teacher_head.bias, mask=mask,
                                  temperature=temperature).logprobs
    stats = None
    if keep_stats:
        stats = torch.zeros(hidden.shape[0], 9, dtype=F32, device=hidden.device)
        stats[:, 0] = torch.where(mask, temperature * student.lse, 0.0)
        if entropy:
            stats[:, 2] = student.entropy
    return {"logprobs": student.logprobs, "entropy": student.entropy, "teacher_logprobs": teacher}, stats


def _forward_chunks(engine, hidden, head, labels, mask, teacher_hidden, teacher_head, temperature, entropy,
                    keep_stats):
    N, dev = labels.shape[0], hidden.device
    out = {"logprobs": torch.zeros(N, dtype=F32, device=dev),
           "entropy": torch.zeros(N, dtype=F32, device=dev) if entropy else None,
           "teacher_logprobs": torch.zeros(N, dtype=F32, device=dev) if teacher_head is not None else None}
    stats = []
    for sl in _chunks(N, head.weight.shape[0], hidden.shape[1], dev, teacher_head is not None, head):
        zt = None if teacher_head is None else teacher_head.logits(teacher_hidden[sl])
        xc, _ = _chunk_inputs(head, hidden[sl], labels[sl], mask[sl], temperature, entropy, zt)
        o, st = engine.forward(xc, save_stats=keep_stats)
        for k, v in o.items():
            if v is not None:
                out[k][sl] = v
        stats.append(st)
        del xc, zt, o
    stats = [s for s in stats if s is not None]
    return out, (torch.cat(stats) if stats else None)


def _forward_vocab_parallel(engine, hidden, head, labels, mask, teacher_hidden, teacher_head, temperature, entropy,
                            group, offset):
    """This rank's shard of the head, chunk by chunk: partial statistics and label logits, then the combine
    across the group (sdar_loss/vocab_parallel.py). Returns (outputs, the whole row's [N, 9] statistics)."""
    from ..sdar_loss.engines import ENGINES
    from ..sdar_loss.vocab_parallel import label_logits, rows_from_partials
    from .engines import _as_sdar_inputs
    N, dev = labels.shape[0], hidden.device
    part = torch.zeros(N, 7, dtype=F32, device=dev)
    part[:, 0] = part[:, 3] = -1.0e30
    z_y, zt_y, own = (torch.zeros(N, dtype=F32, device=dev) for _ in range(3))
    for sl in _chunks(N, head.weight.shape[0], hidden.shape[1], dev, teacher_head is not None, head):
        zt = None if teacher_head is None else teacher_head.logits(teacher_hidden[sl])
        xc, _ = _chunk_inputs(head, hidden[sl], labels[sl], mask[sl], temperature, entropy, zt)
        part[sl] = ENGINES[engine].partials(_as_sdar_inputs(xc))
        z_y[sl], own[sl] = label_logits(xc.logits, xc.labels, offset, xc.mask)
        if zt is not None:
            zt_y[sl] = label_logits(zt, xc.labels, offset, xc.mask)[0]
        del xc, zt
    whole = TokenInputs(logits=None, labels=labels, mask=mask, teacher_logits=None, token_shape=labels.shape,
                        temperature=temperature, entropy=entropy, inplace_backward=False, backend="auto")
    per_token, stats = rows_from_partials(_as_sdar_inputs(whole), part, z_y,
                                          zt_y if teacher_head is not None else None, own, group, None)
    return {"logprobs": per_token["logprobs"], "entropy": per_token["entropy"] if entropy else None,
            "teacher_logprobs": per_token["logp_teacher"] if teacher_head is not None else None}, stats


@torch.library.custom_op("sdar_kernels::linear_token_logprobs_forward", mutates_args=())
def linear_token_logprobs_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, mask: Tensor,
    teacher_hidden: Optional[Tensor], teacher_weight: Optional[Tensor], teacher_bias: Optional[Tensor],
    temperature: float, entropy: bool, engine: str, schedule: str, tp_group_name: Optional[str] = None,
    vocab_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .ops import _outputs
    head, teacher_head = _heads(weight, bias, teacher_hidden, teacher_weight, teacher_bias)
    keep = schedule != "no_grad"
    with torch.autocast(device_type=hidden.device.type, enabled=False):   # keep the logit GEMMs fp32
        if tp_group_name is not None:
            out, stats = _forward_vocab_parallel(engine, hidden, head, labels, mask, teacher_hidden, teacher_head,
                                                 temperature, entropy, resolve_group(tp_group_name), vocab_offset)
            stats = stats if keep else None
        elif engine == "triton":
            out, stats = _forward_triton(hidden, weight, bias, labels, mask, teacher_hidden, teacher_head,
                                         temperature, entropy, keep)
        else:
            out, stats = _forward_chunks(TOKEN_ENGINES[engine], hidden, head, labels, mask, teacher_hidden,
                                         teacher_head, temperature, entropy, keep)
    return _outputs(out, stats, out["logprobs"])


@linear_token_logprobs_forward.register_fake
def _(hidden, weight, bias, labels, mask, teacher_hidden, teacher_weight, teacher_bias, temperature, entropy,
      engine, schedule, tp_group_name=None, vocab_offset=0):
    N = labels.shape[0]
    f = hidden.new_empty(N, dtype=F32)
    ent = hidden.new_empty(N if entropy else 0, dtype=F32)
    teacher = hidden.new_empty(N if teacher_hidden is not None else 0, dtype=F32)
    shape = ((0,) if schedule == "no_grad" else (N, 9) if engine == "triton" or tp_group_name is not None
             else (N,) if entropy else (0,))
    return f, ent, teacher, hidden.new_empty(shape, dtype=F32)


@torch.library.custom_op("sdar_kernels::linear_token_logprobs_backward", mutates_args=())
def linear_token_logprobs_backward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, mask: Tensor, stats: Tensor,
    grad_logprobs: Tensor, grad_entropy: Optional[Tensor], temperature: float, entropy: bool, engine: str,
    grad_hidden: bool, grad_weight: bool, grad_bias: bool, tp_group_name: Optional[str] = None,
    vocab_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    head = Head(weight, bias)
    eng = TOKEN_ENGINES[engine]
    N, dev = labels.shape[0], hidden.device
    gh = torch.empty_like(hidden) if grad_hidden else None
    gw = torch.zeros(weight.shape, dtype=F32, device=weight.device) if grad_weight else None
    gb = torch.zeros(bias.shape, dtype=F32, device=bias.device) if grad_bias and bias is not None else None
    with torch.autocast(device_type=dev.type, enabled=False):
        for sl in _chunks(N, weight.shape[0], hidden.shape[1], dev, False, head):
            xc, h = _chunk_inputs(head, hidden[sl], labels[sl], mask[sl], temperature, entropy)
            g = head.grad_buffer(xc.logits)   # the engine writes dL/dz here (over the fp32 logits, or bf16)
            g_h = None if grad_entropy is None else grad_entropy[sl]
            if tp_group_name is not None:    # this rank's shard, from the whole row's statistics
                vocab_parallel_backward(xc, engine, grad_logprobs[sl], g_h, stats[sl], g, vocab_offset)
            else:
                eng.backward(xc, grad_logprobs[sl], g_h, stats[sl] if stats.numel() else None, g)
            if gh is not None:
                head.grad_input(g, gh[sl])
            if gw is not None:
                head.accumulate_grad_weight(gw, g, h)
            if gb is not None:
                gb.add_(g.sum(0, dtype=F32))
            del xc, g
    if gh is not None and tp_group_name is not None:   # every shard of the head contributes to grad_hidden
        torch.distributed.all_reduce(gh, op=torch.distributed.ReduceOp.SUM, group=resolve_group(tp_group_name))
    return (gh if gh is not None else hidden.new_empty(0),
            gw.to(weight.dtype) if gw is not None else weight.new_empty(0),
            gb.to(bias.dtype) if gb is not None else weight.new_empty(0))


@linear_token_logprobs_backward.register_fake
def _(hidden, weight, bias, labels, mask, stats, grad_logprobs, grad_entropy, temperature, entropy, engine,
      grad_hidden, grad_weight, grad_bias, tp_group_name=None, vocab_offset=0):
    return (torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if grad_weight else weight.new_empty(0),
            torch.empty_like(bias) if grad_bias and bias is not None else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, mask = inputs[:5]
    temperature, entropy, engine, schedule, tp_group_name, vocab_offset = inputs[_NUM_TENSOR_INPUTS:]
    _, ent, teacher, stats = output
    ctx.mark_non_differentiable(teacher, stats)
    if not entropy:
        ctx.mark_non_differentiable(ent)
    ctx.set_materialize_grads(False)
    ctx.temperature, ctx.entropy, ctx.engine, ctx.tp = temperature, entropy, engine, (tp_group_name, vocab_offset)
    if schedule != "no_grad":
        # backward recomputes the chunk logits; saving the inputs lets autograd catch in-place changes
        ctx.save_for_backward(hidden, weight, bias, labels, mask, stats)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_teacher, _grad_stats):
    _refuse_double_backward("linear_token_logprobs")
    hidden, weight, bias, labels, mask, stats = ctx.saved_tensors
    g_lp, g_h = _upstreams(ctx, mask, grad_logprobs, grad_entropy)
    nones = (None,) * (_NUM_TENSOR_INPUTS + 6)
    if g_lp is None:
        return nones
    needs = ctx.needs_input_grad[:3]
    gh, gw, gb = torch.ops.sdar_kernels.linear_token_logprobs_backward(
        hidden, weight, bias, labels, mask, stats, g_lp, g_h, ctx.temperature, ctx.entropy, ctx.engine,
        needs[0], needs[1], needs[2] and bias is not None, *ctx.tp)
    return (gh if needs[0] else None, gw if needs[1] else None,
            gb if needs[2] and bias is not None else None, *nones[3:])


linear_token_logprobs_forward.register_autograd(_backward, setup_context=_setup_context)


def linear_token_logprobs(hidden, weight, labels, *, bias=None, mask=None, temperature=1.0, entropy=True,
                          teacher_hidden=None, teacher_weight=None, teacher_bias=None, inplace_backward=False,
                          backend="auto", tp_group=None):
    """``token_logprobs(hidden @ weight.T + bias, labels, ...)`` without ever holding the [N, V] logits.

    hidden: [N, H] or [B, T, H] (fp32 / bf16 / fp16); weight: [V, H] in hidden's dtype (the lm_head);
    bias: [V] or None. ``teacher_hidden`` (same token shape) gives the teacher's log-prob of ``labels``
    through ``weight`` / ``bias`` unless ``teacher_weight`` / ``teacher_bias`` are given (no gradient ever
    flows to the teacher). Every other argument is that of ``token_logprobs``; ``inplace_backward`` has no
    effect here (the gradient is always written into the chunk's own buffer). Gradients flow to
    ``hidden``, ``weight`` and ``bias``. On the Triton engine the forward forms no logits at all (one fused
    GEMM + log-sum-exp pass per head); backward recomputes them a chunk at a time.

    ``tp_group``: the lm_head is split over this process group, as in ``linear_sdar_loss``: every rank gets
    the same outputs, the gradient of its own weight / bias rows and the full (group-summed) gradient of
    ``hidden``.
    """
    heads = check_heads(hidden, weight, bias=bias, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                        teacher_bias=teacher_bias)
    shard = vocab_shard(tp_group, weight.shape[0])
    stand_in = heads.stand_in_logits()
    x = prepare_token_inputs(stand_in, labels, mask=mask, temperature=temperature, entropy=entropy,
                             teacher_logits=None if teacher_hidden is None else stand_in,
                             inplace_backward=inplace_backward, backend=backend, op="linear_token_logprobs",
                             label_vocab=shard and shard.vocab)
    shared_bias = heads.shared_weight and heads.teacher_bias is bias
    logprobs, ent, teacher, _ = torch.ops.sdar_kernels.linear_token_logprobs_forward(
        heads.hidden, weight, bias, x.labels, x.mask, heads.teacher_hidden,
        None if heads.shared_weight else heads.teacher_weight, None if shared_bias else heads.teacher_bias,
        x.temperature, x.entropy, pick_token_engine(x.backend, heads.hidden),
        token_schedule(False, hidden, weight, bias), shard and shard.group_name, shard.offset if shard else 0)
    return package_stats(logprobs, ent, teacher, x)
