"""Chunked torch implementation of the SDAR loss: the CPU / non-CUDA backend (``backend="torch"``).

Rows are processed in chunks of about ``CHUNK_ELEMENTS`` logits. Each chunk is converted to fp32 once, its
row statistics computed, and its gradient (README.md, "Gradient") written straight into the gradient buffer,
so the peak memory beyond the inputs is the gradient buffer plus a handful of fp32 chunk temporaries,
not the several fp32 [N, V] copies (log-softmax, softmax, autograd saves) that eager code makes.
The same function serves the fused-linear torch path, which hands it one token chunk of fp32 logits.
"""

from __future__ import annotations

import math

import torch

from .output import PER_TOKEN_FIELDS
from .token_terms import token_terms

# ~4M fp32 elements (16 MB) per chunk temporary; at most ~5 live at once.
CHUNK_ELEMENTS = 1 << 22

# -inf logits (banned tokens) become this finite floor after the log-softmax, so 0 * log 0 terms are
# 0 * -1e30 = 0 instead of NaN. exp(-1e30) is exactly 0, so no value changes.
LOG_FLOOR = -1e30



class _RowDot:
    """sum_v a[n, v] * b[n, v] through one reusable chunk-sized scratch buffer.

    torch's sum reduces pairwise (error ~ log V ulps), which the entropy of a 150k-word row needs; a
    batched-matmul dot avoids the buffer but accumulates sequentially (error ~ V ulps: 10x eager's
    at V = 4097).
    """

    def __init__(self, like):
        self.scratch = torch.empty_like(like)

    def __call__(self, a, b):
        return torch.mul(a, b, out=self.scratch).sum(-1)


def _log_softmax_fp32(x, inv_tau, y):
    """fp32 log-softmax of a chunk of logits / temperature (a fused torch kernel: one new buffer), and its
    value at the labels ``y`` [n, 1].

    -inf logits give log-probs floored at LOG_FLOOR (the label's own log-prob keeps its -inf). Masked rows
    are not cleaned first: their NaN/inf stay inside their own row and are replaced by zeros in the
    outputs and the gradient.
    """
    if inv_tau != 1.0:
        # subtract the row max before scaling (as the kernel does): z - max is exact for nearby logits, while
        # scaling a raw logit of a few hundred first costs an ulp of the scaled value in every log-prob
        x = x.to(torch.float32)
        x = (x - x.amax(-1, keepdim=True)).mul_(inv_tau)
    log_probs = torch.log_softmax(x, dim=-1, dtype=torch.float32)
    at_labels = log_probs.gather(1, y).squeeze(1)
    return log_probs.clamp_min_(LOG_FLOOR), at_labels


def sdar_rows_torch(x, weights, grad=None):
    """Loss terms for every row of ``x`` (PreparedInputs) and, if ``grad`` is given ([N, V], any float dtype),
    w_t * dl_t/dz_S written into it. ``weights`` [N] fp32 are the w_t (0 on masked rows).

    Returns a dict of flat [N] fp32 per-token tensors (``PER_TOKEN_FIELDS``), 0 on masked rows.
    """
    N, V = x.labels.shape[0], x.logits.shape[-1]
    out = {k: torch.zeros(N, dtype=torch.float32, device=x.logits.device) for k in PER_TOKEN_FIELDS}
    for sl in row_chunks(N, V, x.logits, x.teacher_logits):
        terms = _chunk(x, sl, weights[sl], None if grad is None else token_rows_slice(grad, sl))
        for k in PER_TOKEN_FIELDS:
            out[k][sl] = terms[k]
    return out


def row_chunks(N, V, *tensors):
    """Row slices of about ``CHUNK_ELEMENTS`` logits each. [B, T, V] tensors without a flat view (sliced
    along T) are walked sequence by sequence, so a slice never crosses a sequence (``token_rows_slice``)."""
    rows = max(1, min(N, CHUNK_ELEMENTS // max(V, 1)))
    per_seq = next((t.shape[1] for t in tensors if t is not None and t.dim() == 3), N)
    for s0 in range(0, N, max(per_seq, 1)):
        for r0 in range(s0, min(N, s0 + per_seq), rows):
            yield slice(r0, min(s0 + per_seq, r0 + rows))


def token_rows_slice(t, sl):
    """Rows ``sl`` (never crossing a sequence) of an [N, V] or [B, T, V] tensor, as an [n, V] view."""
    if t.dim() == 2:
        return t[sl]
    T = t.shape[1]
    b = sl.start // T
    return t[b, sl.start - b * T: sl.stop - b * T]


def _chunk(x, sl, w, grad):
    o = x.options
    inv_tau = 1.0 / o.temperature
    keep = x.mask[sl]
    y = x.labels[sl].clamp(0, x.logits.shape[-1] - 1)[:, None]  # masked rows may hold ignore labels

    logp_all, logp = _log_softmax_fp32(token_rows_slice(x.logits, sl), inv_tau, y)  # log p_S
    # an out-of-range label on an unmasked row (only possible where it is not checked: inside a compiled
    # graph, or on CUDA) poisons its row with NaN, as the Triton kernel does
    labels = x.labels[sl]
    logp = torch.where((labels >= 0) & (labels < x.logits.shape[-1]) | ~keep, logp, float("nan"))
    p = torch.exp(logp_all)
    rowdot = _RowDot(p)
    entropy = -rowdot(p, logp_all)
    # a NaN / +inf logit, or a row of -inf only, makes the whole log-softmax row NaN
    nonfinite = logp.isnan()

    logp_teacher, divergence, div_grad = None, None, None
    if x.teacher_logits is not None:
        logq_all, logp_teacher = _log_softmax_fp32(token_rows_slice(x.teacher_logits, sl), inv_tau, y)  # log p_T
        nonfinite = nonfinite | logp_teacher.isnan()
        if o.full_vocab_distill:
            divergence, div_grad = _divergence(o, logp_all, p, logq_all, entropy, rowdot,
                                               want_grad=grad is not None)
        del logq_all
    elif x.teacher_logprobs is not None:
        logp_teacher = x.teacher_logprobs[sl]

    def side(t):
        return None if t is None else t[sl]

    t = token_terms(logp=logp, entropy=entropy, mask=keep, options=o, logp_teacher=logp_teacher,
                    divergence=divergence, advantages=side(x.advantages),
                    old_logprobs=side(x.old_logprobs), ref_logprobs=side(x.ref_logprobs))

    if grad is not None:
        coef = t.coef(w)
        # dL/ds = p * (w*ec*(log p + H) - c) + c * 1{v=y} + w*dc*gate * d(div)/ds ; then / tau.
        # fp32 gradients are written straight into `grad`; other dtypes go through the fp32 chunk.
        dst = grad if grad.dtype == torch.float32 else logp_all
        if o.entropy_coef != 0.0:
            w_ec = (w * o.entropy_coef)[:, None]
            logp_all.mul_(w_ec).add_(w_ec * entropy[:, None] - coef[:, None])
            torch.mul(logp_all, p, out=dst)
        else:
            torch.mul(p, -coef[:, None], out=dst)
        dst.scatter_add_(1, y, coef[:, None])
        if div_grad is not None:
            dst.add_(div_grad.mul_(t.distill_scale(w, o.distill_coef)[:, None]))
        if inv_tau != 1.0:
            dst.mul_(inv_tau)
        dst.masked_fill_(~keep[:, None], 0.0)  # exact zeros on masked rows, whatever their logits held
        if dst is not grad:
            grad.copy_(dst)

    return dict(loss=t.loss, logprobs=torch.where(keep, logp, 0.0), entropy=torch.where(keep, entropy, 0.0),
                gate=t.gate, gap=t.gap, distill=t.distill, pg=t.pg, clipped=t.clipped,
                clipped_lower=t.clipped_lower, ppo_kl=t.ppo_kl, kl=t.kl,
                nonfinite=(nonfinite & keep).to(torch.float32),
                logp_teacher=torch.where(keep, logp_teacher, 0.0) if logp_teacher is not None
                else torch.zeros_like(logp))


def _divergence(o, logp_all, p, logq_all, entropy, rowdot, want_grad):
    """Row value of the full-vocab divergence and (optionally) its gradient w.r.t. s = z_S / tau.

    fkl = KL(q||p): grad p - q.   rkl = KL(p||q): grad p * (log p - log q - rkl).
    jsd(b): grad (1-b) * p * (log(p/M) - KL(p||M)), M = b q + (1-b) p.  (derivations: README.md)
    The logs are floored at LOG_FLOOR, so a divergence that is truly infinite (one side has a finite
    logit where the other's is -inf, even if its probability underflows) is found by its support and set
    to +inf (README.md, "Limits"); its gradient is the finite p - q for fkl and is not taken for rkl (the
    caller's distill scale is 0 there).
    """
    kind = o.divergence
    q = torch.exp(logq_all)
    if kind == "fkl":
        value = rowdot(q, logq_all) - rowdot(q, logp_all)
        infinite = ((logq_all > LOG_FLOOR) & (logp_all <= LOG_FLOOR)).any(-1)
        return torch.where(infinite, float("inf"), value), (p - q if want_grad else None)
    neg_entropy = -entropy
    if kind == "rkl":
        value = neg_entropy - rowdot(p, logq_all)
        infinite = ((logp_all > LOG_FLOOR) & (logq_all <= LOG_FLOOR)).any(-1)
        grad = (logp_all - logq_all).sub_(torch.where(infinite, 0.0, value)[:, None]).mul_(p) if want_grad else None
        return torch.where(infinite, float("inf"), value), grad
    b = o.jsd_beta
    log_mix = torch.logaddexp(logq_all + math.log(b), logp_all + math.log1p(-b))
    kl_q_mix = rowdot(q, logq_all) - rowdot(q, log_mix)
    kl_p_mix = neg_entropy - rowdot(p, log_mix)
    value = b * kl_q_mix + (1.0 - b) * kl_p_mix
    grad = None
    if want_grad:
        grad = log_mix.neg_().add_(logp_all).sub_(kl_p_mix[:, None]).mul_(p).mul_(1.0 - b)
    return value, grad
