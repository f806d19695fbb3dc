"""Chunked torch row engine of ``token_logprobs``: the CPU / non-CUDA path (``backend="torch"``).

It walks the rows in the same chunks as the ``sdar_loss`` torch path (``row_chunks``: about 16 MB of fp32
logits each, never crossing a sequence of a sliced [B, T, V] view) and reuses its fp32 log-softmax helper,
so the memory beyond the inputs is two or three fp32 chunk temporaries, never [N, V].

Forward keeps nothing per row but the outputs (H is the backward's one row statistic): the backward
recomputes each chunk's log-softmax (one more streaming pass over the logits, cheap on a CPU) and
writes, for upstream gradients g_lp and g_H,

    dL/dz[v] = (1/tau) * [ g_lp * (1{v=y} - p_v) - g_H * p_v * (log p_v + H) ]      (README.md)
"""

from __future__ import annotations

import torch

from ..sdar_loss.torch_impl import _log_softmax_fp32, row_chunks, token_rows_slice

F32 = torch.float32


class TorchTokenRows:
    """Row engine interface (the Triton engine implements the same two methods):

    forward(x, save_stats) -> (dict of flat [N] fp32 "logprobs", "entropy" (None when x.entropy is
        False), "teacher_logprobs" (None without teacher logits), all 0 on masked rows; stats or None)
    backward(x, grad_logprobs, grad_entropy, stats, grad): write dL/dz into ``grad`` (the logits' shape and
        dtype; it may be the logits themselves). grad_* are flat [N] fp32, 0 on masked rows; grad_entropy
        may be None (no entropy term).
    """

    @staticmethod
    def forward(x, save_stats):
        out = token_rows_forward(x)
        return out, (out["entropy"] if save_stats else None)   # the backward's only row statistic: H

    @staticmethod
    def backward(x, grad_logprobs, grad_entropy, stats, grad):
        token_rows_backward(x, grad_logprobs, grad_entropy, stats, grad)


def _labels(x, sl):
    # masked rows may carry ignore labels (-100): clamp so gather stays in range; their values are dropped
    return x.labels[sl].clamp(0, x.logits.shape[-1] - 1)[:, None]


def token_rows_forward(x):
    N, V = x.labels.shape[0], x.logits.shape[-1]
    dev = x.logits.device
    inv_tau = 1.0 / x.temperature
    logprobs = torch.zeros(N, dtype=F32, device=dev)
    entropy = torch.zeros(N, dtype=F32, device=dev) if x.entropy else None
    teacher = torch.zeros(N, dtype=F32, device=dev) if x.teacher_logits is not None else None
    for sl in row_chunks(N, V, x.logits, x.teacher_logits):
        keep, y = x.mask[sl], _labels(x, sl)
        logp_all, logp = _log_softmax_fp32(token_rows_slice(x.logits, sl), inv_tau, y)
        # an out-of-range label on an unmasked row (possible only where labels are not checked: CUDA, a
        # compiled graph) poisons its row with NaN, as in sdar_loss
        labels = x.labels[sl]
        logp = torch.where((labels >= 0) & (labels < V), logp, float("nan"))
        logprobs[sl] = torch.where(keep, logp, 0.0)
        if entropy is not None:
            # p * log p in p's own buffer, then a pairwise row sum (error ~ log V ulps, as sdar_loss's)
            p = torch.exp(logp_all)
            entropy[sl] = torch.where(keep, -p.mul_(logp_all).sum(-1), 0.0)
            del p
        del logp_all
        if teacher is not None:
            logq_all, logq = _log_softmax_fp32(token_rows_slice(x.teacher_logits, sl), inv_tau, y)
            teacher[sl] = torch.where(keep, logq, 0.0)
            del logq_all
    return {"logprobs": logprobs, "entropy": entropy, "teacher_logprobs": teacher}


def token_rows_backward(x, grad_logprobs, grad_entropy, entropy, grad):
    """``entropy``: the forward's [N] entropies (needed only with ``grad_entropy``)."""
    N, V = x.labels.shape[0], x.logits.shape[-1]
    inv_tau = 1.0 / x.temperature
    for sl in row_chunks(N, V, x.logits, grad):
        keep, y = x.mask[sl], _labels(x, sl)
        g_lp = grad_logprobs[sl][:, None]
        # the chunk's log-probs are computed before its gradient is written: ``grad`` may alias the logits
        logp_all, _ = _log_softmax_fp32(token_rows_slice(x.logits, sl), inv_tau, y)
        p = torch.exp(logp_all)
        dst_chunk = token_rows_slice(grad, sl)
        dst = dst_chunk if dst_chunk.dtype == F32 else logp_all
        if grad_entropy is not None:
            # -g_H p (log p + H) - g_lp p  =  p * (-g_H (log p + H) - g_lp), built in the log-prob buffer
            g_h = grad_entropy[sl][:, None]
            logp_all.add_(entropy[sl][:, None]).mul_(-g_h).sub_(g_lp)
            torch.mul(logp_all, p, out=dst)
        else:
            torch.mul(p, -g_lp, out=dst)
        dst.scatter_add_(1, y, g_lp)
        if inv_tau != 1.0:
            dst.mul_(inv_tau)
        dst.masked_fill_(~keep[:, None], 0.0)   # exact zeros on masked rows, whatever their logits held
        if dst is not dst_chunk:
            dst_chunk.copy_(dst)
