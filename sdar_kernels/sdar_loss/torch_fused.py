"""The torch engine's fused formulation: the loss and gradient of torch_impl.py's eager one, written for
inductor (torch.compile, sdar_kernels/compiled.py), which turns each pass below into one loop.

Why a second formulation: eagerly every torch op is a full pass over the [n, V] chunk, so the eager one
leans on aten's fused log-softmax and on in-place products. Compiled, that dataflow still leaves a stored
softmax, a separate scatter for the sampled-token term and one loop per statistic. This one follows the
Triton kernel's passes (README.md, "Row statistics in one pass"), in base e, with z = (logit - m) / tau:

  1. the row maxima m of the raw logits (student and teacher);
  2. one loop: d = sum e^z (one exp per tensor), the entropy's centred sum a = sum e^z z
     (H = log d - a / d: no lse - E[s] cancellation at large logits), and for fkl / rkl the divergence's
     cross sum b (KL(q||p) = b_q / d_T - log d_T + log d_S with b_q = sum e^{z_T} (z_T - z_S), and
     symmetrically for rkl); each side is centred on its own maximum, so b holds differences of the
     size of the logits' spread, never an offset between student and teacher;
  3. jsd only: one more loop for KL(p||M) and KL(q||M), which need both normalisers (README.md, "Why JSD
     reads 3x");
  4. the gradient: one loop reading the logits (and the teacher for full-vocabulary divergences) that
     writes w_t dl_t/dz, the sampled-token term included (a comparison with the column index).
Nothing of size [n, V] is materialised. The [n]-sized per-token terms between 2-3 and 4 are token_terms.py,
run eagerly and shared with every backend. The limits (README.md, "Limits") hold as in the eager
formulation: log-probs that multiply a probability are floored at LOG_FLOOR, support gaps make fkl / rkl
+inf, a NaN / +inf logit or a row of only -inf makes the row NaN (reported non-finite).

Only the dtypes and the divergence kind are structural: the temperature and jsd's beta come in as 0-dim
tensors, so one compiled graph serves every option value.
"""

from __future__ import annotations

import functools

import torch

from .. import compiled
from .token_terms import token_terms
from .torch_common import LOG_FLOOR, label_logprob, per_token_outputs


def chunk_function(options, device, logits, teacher_logits, grad):
    """``chunk_terms`` for ``options`` with its two passes compiled (compiled.py), each graph keyed by what
    it is specialised on: the dtypes, whether there are teacher logits, whether the gradient overwrites
    the logits, and the divergence kind. Tensors are the whole call's (only their dtypes are read)."""
    divergence = options.divergence if options.full_vocab_distill else None
    inputs = (logits.dtype, None if teacher_logits is None else teacher_logits.dtype)
    stats = compiled.cached(row_statistics, device=device, key=inputs, divergence=divergence)
    gradient = None
    if grad is not None:
        gradient = compiled.cached(row_gradient, device=device, key=(*inputs, grad.dtype, grad is logits),
                                   divergence=divergence)
    return functools.partial(chunk_terms, options=options, stats_fn=stats, gradient_fn=gradient)


def chunk_terms(logits, teacher_logits, labels, keep, w, teacher_logprobs, advantages, old_logprobs,
                ref_logprobs, grad, *, options, stats_fn=None, gradient_fn=None):
    """torch_impl.chunk_terms computed by the fused passes (``stats_fn`` / ``gradient_fn``: the compiled
    ``row_statistics`` / ``row_gradient``; None runs them eagerly, for tests)."""
    o = options
    divergence = o.divergence if o.full_vocab_distill else None
    stats_fn = stats_fn or functools.partial(row_statistics, divergence=divergence)
    gradient_fn = gradient_fn or functools.partial(row_gradient, divergence=divergence)
    device = logits.device
    # the op hands over the logits that require grad; the compiled passes see detached views (dynamo
    # guards on requires_grad), the same object for both when the gradient overwrites the logits
    in_place = grad is logits
    logits = logits.detach()
    grad = logits if in_place else grad
    inv_tau = torch.tensor(1.0 / o.temperature, dtype=torch.float32, device=device)
    beta = torch.tensor(o.jsd_beta, dtype=torch.float32, device=device)
    s = stats_fn(logits, teacher_logits, labels, inv_tau, beta)

    logp = label_logprob(s["logp"], labels, keep, logits.shape[-1])
    nonfinite = logp.isnan()
    logp_teacher = teacher_logprobs
    if teacher_logits is not None:
        logp_teacher = s["logq"]
        nonfinite = nonfinite | logp_teacher.isnan()
    t = token_terms(logp=logp, entropy=s["entropy"], mask=keep, options=o, logp_teacher=logp_teacher,
                    divergence=s.get("divergence"), advantages=advantages, old_logprobs=old_logprobs,
                    ref_logprobs=ref_logprobs)

    if grad is not None:
        coef = t.coef(w)
        w_ec = w * o.entropy_coef
        div_scale = t.distill_scale(w, o.distill_coef) if divergence is not None else torch.zeros_like(w)
        gradient_fn(logits, teacher_logits, labels, keep, s, coef, w_ec, div_scale, inv_tau, beta, grad)
    return per_token_outputs(t, keep, logp, s["entropy"], nonfinite, logp_teacher)


def _centred(x, m, inv_tau):
    """z = (x - m) / tau in fp32: <= 0, 0 at the maximum; -inf for -inf logits; NaN for a NaN / +inf logit
    (m = +inf) or a row of only -inf (m = -inf), which spreads to the whole row's sums."""
    return (x.float() - m[:, None]) * inv_tau


def _row_max(x):
    return x.float().amax(-1)


def row_statistics(logits, teacher_logits, labels, inv_tau, beta, *, divergence=None):
    """Passes 1-3: dict of [n] fp32 row statistics.

    m, log_d: the student's max (raw units) and log sum e^z; entropy; logp: log p(y) at the clamped labels.
    With teacher logits: m_t, log_d_t, logq = log q(y). Full-vocabulary divergences: divergence (+inf on
    a support gap); rkl and jsd add div_grad_shift, the row constant their gradient subtracts (rkl: the
    divergence, 0 where it is infinite; jsd: KL(p||M)).
    """
    V = logits.shape[-1]
    y = labels.clamp(0, V - 1)[:, None]   # masked rows may hold ignore labels
    m = _row_max(logits)
    z = _centred(logits, m, inv_tau)
    e = z.exp()
    d = e.sum(-1)
    a = (e * z.clamp_min(LOG_FLOOR)).sum(-1)
    log_d = d.log()
    out = dict(m=m, log_d=log_d, entropy=log_d - a / d, logp=z.gather(1, y).squeeze(1) - log_d)
    if teacher_logits is None:
        return out

    m_t = _row_max(teacher_logits)
    z_t = _centred(teacher_logits, m_t, inv_tau)
    e_t = z_t.exp()
    d_t = e_t.sum(-1)
    log_d_t = d_t.log()
    out.update(m_t=m_t, log_d_t=log_d_t, logq=z_t.gather(1, y).squeeze(1) - log_d_t)
    finite_s, finite_t = z > LOG_FLOOR, z_t > LOG_FLOOR
    zf, zf_t = z.clamp_min(LOG_FLOOR), z_t.clamp_min(LOG_FLOOR)

    if divergence == "fkl":   # KL(q||p); infinite where q > 0 and p = 0
        value = (e_t * (zf_t - zf)).sum(-1) / d_t - log_d_t + log_d
        infinite = (finite_t & ~finite_s).any(-1)
        out.update(divergence=torch.where(infinite, float("inf"), value))
    elif divergence == "rkl":  # KL(p||q); infinite where p > 0 and q = 0 (no finite gradient there)
        value = (e * (zf - zf_t)).sum(-1) / d - log_d + log_d_t
        infinite = (finite_s & ~finite_t).any(-1)
        out.update(divergence=torch.where(infinite, float("inf"), value),
                   div_grad_shift=torch.where(infinite, 0.0, value))
    elif divergence == "jsd":
        lp, lq = z - log_d[:, None], z_t - log_d_t[:, None]
        log_mix = _log_mixture(lp, lq, beta)
        kl_q_mix = (lq.exp() * (lq.clamp_min(LOG_FLOOR) - log_mix)).sum(-1)
        kl_p_mix = (lp.exp() * (lp.clamp_min(LOG_FLOOR) - log_mix)).sum(-1)
        out.update(divergence=beta * kl_q_mix + (1.0 - beta) * kl_p_mix, div_grad_shift=kl_p_mix)
    return out


def _log_mixture(lp, lq, beta):
    """log M = log(beta q + (1 - beta) p) from floored log-probs (finite wherever p > 0 or q > 0)."""
    return torch.logaddexp(lq.clamp_min(LOG_FLOOR) + beta.log(), lp.clamp_min(LOG_FLOOR) + torch.log1p(-beta))


def row_gradient(logits, teacher_logits, labels, keep, stats, coef, w_ec, div_scale, inv_tau, beta, grad, *,
                 divergence=None):
    """Pass 4: w_t dl_t/dz_S written into ``grad`` (README.md, "Gradient"; ``grad`` may be ``logits``):

        (1/tau) [ p (w ec (log p + H) - c) + c 1{v = y} + w dc gate d(div)/ds ],  0 on masked rows.

    ``coef`` = c, ``w_ec`` = w * entropy_coef, ``div_scale`` = w * distill_coef * gate (0 where no
    divergence gradient flows); ``stats``: ``row_statistics``'s dict."""
    V = logits.shape[-1]
    lp = _centred(logits, stats["m"], inv_tau) - stats["log_d"][:, None]
    p = lp.exp()
    lpf = lp.clamp_min(LOG_FLOOR)
    g = p * (w_ec[:, None] * (lpf + stats["entropy"][:, None]) - coef[:, None])
    columns = torch.arange(V, device=logits.device)
    g = g + torch.where(columns[None, :] == labels.clamp(0, V - 1)[:, None], coef[:, None], 0.0)
    if divergence is not None:
        lq = _centred(teacher_logits, stats["m_t"], inv_tau) - stats["log_d_t"][:, None]
        if divergence == "fkl":
            d_div = p - lq.exp()
        elif divergence == "rkl":
            d_div = p * (lpf - lq.clamp_min(LOG_FLOOR) - stats["div_grad_shift"][:, None])
        else:
            d_div = (1.0 - beta) * p * (lpf - _log_mixture(lp, lq, beta) - stats["div_grad_shift"][:, None])
        g = g + div_scale[:, None] * d_div
    g = g * inv_tau
    grad.copy_(torch.where(keep[:, None], g, 0.0))  # exact zeros on masked rows, whatever their logits held
