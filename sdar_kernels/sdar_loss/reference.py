"""Plain eager PyTorch reference of the SDAR loss (the oracle for every backend).

Readable over fast: full [N, V] log-softmax of student and teacher in fp32 (or fp64 with
``compute_dtype``), autograd for the gradient. It imports nothing from the kernels; the math is
`README.md` beside this file (API: ``docs/api.md``). Input validation is shared with the
fused path only through ``sdar_kernels._checks`` (which holds no math).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import normalize_inputs
from .output import GATE_FLOOR, SDAROutput, masked_metrics


def sdar_loss_reference(
    logits,
    labels,
    *,
    teacher_logits=None,
    teacher_logprobs=None,
    mask=None,
    advantages=None,
    old_logprobs=None,
    ref_logprobs=None,
    loss_weights=None,
    num_tokens=None,
    num_sequences=None,
    loss_scale_factor=None,
    dp_size=1,
    gate_beta=5.0,
    distill_coef=0.01,
    distill="sampled",
    jsd_beta=0.5,
    clip_low=0.2,
    clip_high=0.2,
    clip_ratio_c=3.0,
    kl_coef=0.0,
    entropy_coef=0.0,
    temperature=1.0,
    loss_agg_mode="token-mean",
    reduction="mean",
    inplace_backward=False,
    backend="auto",
    compute_dtype=torch.float32,
) -> SDAROutput:
    """Same signature and semantics as :func:`sdar_kernels.sdar_loss`; ``backend`` and
    ``inplace_backward`` are accepted and ignored. ``compute_dtype`` picks fp32 or fp64 math."""
    x = normalize_inputs(
        logits, labels, teacher_logits=teacher_logits, teacher_logprobs=teacher_logprobs, mask=mask,
        advantages=advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        loss_weights=loss_weights, num_tokens=num_tokens, num_sequences=num_sequences,
        loss_scale_factor=loss_scale_factor, dp_size=dp_size, gate_beta=gate_beta,
        distill_coef=distill_coef, distill=distill, jsd_beta=jsd_beta, clip_low=clip_low,
        clip_high=clip_high, clip_ratio_c=clip_ratio_c, kl_coef=kl_coef, entropy_coef=entropy_coef,
        temperature=temperature, loss_agg_mode=loss_agg_mode, reduction=reduction,
        inplace_backward=inplace_backward, backend=backend,
    )
    o = x.options
    dt = compute_dtype
    m = x.mask  # [N] bool
    # Masked rows may hold inf/NaN logits: zero them (without breaking autograd to the logits)
    # so that nothing non-finite reaches the sums; their weight is 0 anyway.
    V = x.logits.shape[-1]
    s = torch.where(m[:, None], x.logits.reshape(-1, V).to(dt), torch.zeros((), dtype=dt)) / o.temperature
    logp_all = F.log_softmax(s, dim=-1)
    p = logp_all.exp()
    y = x.labels.clamp(0, s.shape[-1] - 1)  # masked rows may carry ignore labels (-100)
    logp = logp_all.gather(-1, y[:, None]).squeeze(-1)
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros((), dtype=dt))).sum(-1)

    logq_all = None
    if x.teacher_logits is not None:
        t = torch.where(m[:, None], x.teacher_logits.reshape(-1, V).to(dt), torch.zeros((), dtype=dt))
        logq_all = F.log_softmax(t / o.temperature, dim=-1)
        logp_teacher = logq_all.gather(-1, y[:, None]).squeeze(-1)
    elif x.teacher_logprobs is not None:
        logp_teacher = x.teacher_logprobs.to(dt)
    else:
        logp_teacher = None

    zero = torch.zeros_like(logp)
    # ---- gated self-distillation ------------------------------------------------------------
    if logp_teacher is not None:
        gap = logp_teacher - logp.detach()
        # detached: built from detached quantities; gate_beta = 0 gives 0.5 even where the gap is infinite
        gate = torch.sigmoid(o.gate_beta * gap) if o.gate_beta != 0 else torch.full_like(gap, 0.5)
        if o.distill == "sampled":
            distill_tok = _gated(gate, logp_teacher - logp)
        elif o.distill == "reinforce":
            distill_tok = _gated(gate, logp.detach() - logp_teacher) * logp
        else:
            distill_tok = _gated(gate, _divergence(logp_all, logq_all, o.distill, o.jsd_beta))
    else:
        gap, gate, distill_tok = zero, zero, zero

    # ---- GRPO policy gradient (verl "vanilla" with dual clip) ---------------------------------
    clipped_lower = zero
    if x.advantages is not None:
        adv = x.advantages.to(dt)
        old = x.old_logprobs.to(dt) if x.old_logprobs is not None else logp.detach()
        neg_approx_kl = torch.clamp(logp - old, -20.0, 20.0)
        ratio = torch.exp(neg_approx_kl)
        pg1 = -adv * ratio
        pg2 = -adv * torch.clamp(ratio, 1.0 - o.clip_low, 1.0 + o.clip_high)
        pgc = torch.maximum(pg1, pg2)
        clipped = (pg2 > pg1).to(dt)
        if o.clip_ratio_c is not None:
            pg3 = -adv * o.clip_ratio_c
            pg_tok = torch.where(adv < 0, torch.minimum(pg3, pgc), pgc)
            clipped_lower = ((pgc > pg3) & (adv < 0)).to(dt)   # verl's pg_clipfrac_lower
        else:
            pg_tok = pgc
        ppo_kl_tok = -neg_approx_kl.detach()
    else:
        pg_tok, clipped, ppo_kl_tok = zero, zero, zero

    # ---- k3 KL to the reference policy -------------------------------------------------------
    if o.kl_coef > 0:
        d = x.ref_logprobs.to(dt) - logp
        # Beyond d = 20, k3 = e^d - d - 1 is far above the clamp: take the constant 10 there without
        # evaluating exp(d), whose overflow would make the clamp's backward 0 * inf = NaN.
        big = d.detach() > 20.0
        d_small = torch.where(big, torch.zeros((), dtype=dt), d)
        kl_tok = torch.where(big, torch.full((), 10.0, dtype=dt),
                             torch.clamp(torch.exp(d_small) - d_small - 1.0, -10.0, 10.0))
    else:
        kl_tok = zero

    distill_term = o.distill_coef * distill_tok if o.distill_coef != 0 else zero
    loss_tok = pg_tok + o.kl_coef * kl_tok - o.entropy_coef * entropy + distill_term
    loss_tok = torch.where(m, loss_tok, zero)  # never let a masked row's value leak (NaN * 0 = NaN)

    if o.reduction == "none":
        loss = loss_tok
    elif o.reduction == "sum":
        loss = loss_tok.sum()
    else:
        loss = (x.weights.to(dt) * loss_tok).sum()

    def z(v):  # per-token outputs: detached, 0 on masked rows, in the input's token shape
        return torch.where(m, v.detach(), zero).float().reshape(x.token_shape)

    # rows whose log-softmax is NaN: a NaN / +inf logit, or only -inf (student or teacher)
    nonfinite = logp.isnan() | (logp_teacher.isnan() if logq_all is not None else torch.zeros_like(m))
    per_tok = dict(gate=gate, gap=gap, distill=distill_tok, pg=pg_tok, clipped=clipped,
                   clipped_lower=clipped_lower, ppo_kl=ppo_kl_tok, kl=kl_tok, entropy=entropy,
                   nonfinite=nonfinite.to(dt))
    metrics = masked_metrics({k: torch.where(m, v.detach(), zero) for k, v in per_tok.items()},
                             m, has_teacher=logp_teacher is not None)
    return SDAROutput(
        loss=loss.reshape(x.token_shape) if o.reduction == "none" else loss,
        logprobs=z(logp), entropy=z(entropy), gate=z(gate), gap=z(gap), metrics=metrics,
    )


def _gated(gate, term):
    """gate * term, taken as its limit 0 where the gate is 0 (a teacher that gives the sampled token zero
    probability: gate 0, term infinite), i.e. below the smallest normal fp32 whatever the compute dtype.
    where() keeps the unselected product out of the gradient."""
    live = ~(gate < GATE_FLOOR)    # below the smallest normal fp32 the gate counts as 0; NaN stays NaN
    safe = torch.where(live, term, torch.zeros((), dtype=term.dtype))
    return torch.where(live, gate * safe, torch.zeros((), dtype=term.dtype))


def _divergence(logp_all, logq_all, kind, jsd_beta):
    """Full-vocabulary divergence per row between p_T = exp(logq_all) and p_S = exp(logp_all).

    A divergence is +inf where one side has a finite log-probability and the other -inf (a -inf logit),
    whether or not the finite side's probability underflows. Its gradient is the math's where that is
    finite (fkl: p - q) and zero where it is not (rkl): the infinite log-ratios are kept out of the
    autograd graph so they cannot turn into NaN.
    """
    p, q = logp_all.exp(), logq_all.exp()
    zero = torch.zeros_like(p)
    neg_inf = float("-inf")

    def support_gap(log_a, log_b):  # rows where a has support and b has none
        return ((log_a > neg_inf) & (log_b == neg_inf)).any(-1)

    def kl(log_a, a, log_b):  # KL(a || b) with 0 * log 0 = 0; finite stand-in where b has no support
        # The logs are zeroed where a == 0 *before* the product: a where() around a * (log_a - log_b)
        # would still backpropagate 0 * (-inf) = NaN through its unselected branch (-inf logits).
        finite_b = torch.where(log_b > neg_inf, log_b, zero)
        return (a * (torch.where(a > 0, log_a, zero) - torch.where(a > 0, finite_b, zero))).sum(-1)

    if kind == "fkl" or (kind == "jsd" and jsd_beta == 0.0):
        # -sum q log p has the finite gradient p - q even where it is infinite: keep log p as it is, and add
        # the +inf of a gap whose q underflowed (and so added nothing) as a constant
        value = (q * (torch.where(q > 0, logq_all, zero) - torch.where(q > 0, logp_all, zero))).sum(-1)
        gap = support_gap(logq_all, logp_all)
        return value + torch.where(gap, float("inf"), 0.0).to(value.dtype)
    if kind == "rkl" or (kind == "jsd" and jsd_beta == 1.0):
        value = kl(logp_all, p, logq_all)
        return torch.where(support_gap(logp_all, logq_all), torch.full_like(value, float("inf")), value)
    b = jsd_beta
    # log M = logaddexp(log q + log b, log p + log(1 - b)): in log space, so a p that underflows cannot
    # round M to 0. Entries with p = q = 0 are dropped by kl(); their logs are replaced first so that
    # logaddexp's backward never sees -inf - -inf.
    empty = (logp_all == neg_inf) & (logq_all == neg_inf)
    log_mix = torch.logaddexp(torch.where(empty, zero, logq_all + math.log(b)),
                              torch.where(empty, zero, logp_all + math.log1p(-b)))
    return b * kl(logq_all, q, log_mix) + (1.0 - b) * kl(logp_all, p, log_mix)
