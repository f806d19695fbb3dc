"""The fused-linear SDAR loss with the lm_head split over a tensor-parallel group (each rank holds rows
[r V/P, (r+1) V/P) of the weight, and of the bias).

A row's statistics need every rank's part of its logits, so the chunk loop of schedule.py runs in sweeps:
  1. per chunk: this rank's logits z = h W_r^T (+ b_r) (and the teacher's), their partial statistics and
     the label logits where this rank holds the label (sdar_loss/vocab_parallel.py);
  2. once for all N rows: combine across the group (two all-reduces of [N]-sized tensors) and the per-token
     terms; jsd adds a sweep for its row sums (one more all-reduce);
  3. per chunk (when a gradient is wanted): recompute the logits, write this rank's shard of G from the row
     statistics, and run the gradient GEMMs: grad_W_r and grad_b_r are this rank's; grad_hidden gets a
     contribution from every shard and is summed over the group (one all-reduce of [N, H]).
So the teacher is never taken through the logits-free pass here, and the logit GEMMs run twice (three
times for jsd): the price of holding no [N, V/P] logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..sdar_loss.output import PER_TOKEN_FIELDS
from ..sdar_loss.vocab_parallel import label_logits, rows_from_partials
from .schedule import _chunk_inputs, _put, _take, accumulate_grads

F32 = torch.float32


def _chunk(plan, sel, weights, with_teacher):
    """(chunk inputs with this rank's fp32 logits, the chunk's hidden rows)."""
    inp = plan.inputs
    h = _take(inp.hidden.detach(), sel)
    if plan.zero_masked_rows:
        h = torch.where(_take(inp.x.mask, sel)[:, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
    z = plan.head.logits(h)
    zt = plan.teacher_head.logits(_take(inp.teacher_hidden, sel)) if with_teacher else None
    return _chunk_inputs(plan, sel, z, zt, _take(weights, sel), inp.x.teacher_logprobs), h


def forward_statistics(plan, group, offset):
    """Sweep 1 (and jsd's), then the combine: per-token outputs (the same on every rank) and the [N, 9]
    row statistics."""
    x = plan.inputs.x
    N, dev = x.labels.shape[0], x.labels.device
    has_teacher = plan.teacher_head is not None
    part = torch.zeros(N, 7, dtype=F32, device=dev)
    part[:, 0] = part[:, 3] = -1.0e30          # rows the loop never visits (dropped masked rows): identity
    z_y, zt_y, own = (torch.zeros(N, dtype=F32, device=dev) for _ in range(3))
    for sel in plan.chunks():
        xc, _ = _chunk(plan, sel, x.weights, has_teacher)
        _put(part, sel, plan.rows.partials(xc))
        zy, ow = label_logits(xc.logits, xc.labels, offset, xc.mask)
        _put(z_y, sel, zy)
        _put(own, sel, ow)
        if has_teacher:
            _put(zt_y, sel, label_logits(xc.teacher_logits, xc.labels, offset, xc.mask)[0])

    def jsd_partials(stats):
        out = torch.zeros(N, 2, dtype=F32, device=dev)
        for sel in plan.chunks():
            xc, _ = _chunk(plan, sel, x.weights, True)
            _put(out, sel, plan.rows.jsd_partials(xc, _take(stats, sel)))
        return out

    return rows_from_partials(x, part, z_y, zt_y if has_teacher else None, own, group, jsd_partials)


def gradient_sweep(plan, weights, stats, group, offset, grad_hidden=None, grad_weight=None, grad_bias=None):
    """Sweep 3: this rank's shard of G per chunk from the row statistics, and the gradient GEMMs;
    grad_hidden is then summed over the group."""
    x = plan.inputs.x
    if grad_hidden is not None and plan.active is not None:
        grad_hidden.zero_()                    # dropped (masked) rows are never visited
    for sel in plan.chunks():
        xc, h = _chunk(plan, sel, weights, x.options.full_vocab_distill)
        g = plan.head.grad_buffer(xc.logits)
        plan.rows.grad_from_stats(xc, xc.weights, g, _take(stats, sel), offset)
        accumulate_grads(plan, sel, g, h, grad_hidden, grad_weight, grad_bias)
        del xc, g
    if grad_hidden is not None:
        dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)


def run_vocab_parallel(plan, weights, group, offset, *, grad_hidden=None, grad_weight=None, grad_bias=None,
                       save_stats=False, stats=None, backward=False):
    """schedule.run_chunks for a vocabulary shard: the same arguments and returns."""
    with torch.autocast(device_type=plan.inputs.hidden.device.type, enabled=False):
        if backward:
            gradient_sweep(plan, weights, stats, group, offset, grad_hidden, grad_weight, grad_bias)
            return None, None
        per_token, stats = forward_statistics(plan, group, offset)
        if grad_hidden is not None or grad_weight is not None or grad_bias is not None:
            gradient_sweep(plan, weights, stats, group, offset, grad_hidden, grad_weight, grad_bias)
        assert set(per_token) == set(PER_TOKEN_FIELDS)
        return per_token, (stats if save_stats else None)
