"""Plain eager PyTorch reference of the SDAR loss (the oracle for every backend).

Readable over fast: full [N, V] log-softmax of student and teacher in fp32 (or fp64 with
``compute_dtype``), autograd for the gradient. It imports nothing from the kernels; the math is
`README.md` beside this file (API: ``docs/api.md``). Input validation is shared with the
fused path only through ``sdar_kernels._checks`` (which holds no math).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import normalize_inputs
from .output import SDAROutput, masked_metrics


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
        loss_weights=loss_weights, num_tokens=num_tokens, gate_beta=gate_beta,
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
        gate = torch.sigmoid(o.gate_beta * gap)  # detached: built from detached quantities
        if o.distill == "sampled":
            distill_tok = gate * (logp_teacher - logp)
        elif o.distill == "reinforce":
            distill_tok = gate * (logp.detach() - logp_teacher) * logp
        else:
            distill_tok = gate * _divergence(logp_all, logq_all, o.distill, o.jsd_beta)
    else:
        gap, gate, distill_tok = zero, zero, zero

    # ---- GRPO policy gradient (verl "vanilla" with dual clip) ---------------------------------
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
        else:
            pg_tok = pgc
        ppo_kl_tok = -neg_approx_kl.detach()
    else:
        pg_tok, clipped, ppo_kl_tok = zero, zero, zero

    # ---- k3 KL to the reference policy -------------------------------------------------------
    if o.kl_coef > 0:
        d = x.ref_logprobs.to(dt) - logp
        kl_tok = torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)
    else:
        kl_tok = zero

    loss_tok = pg_tok + o.kl_coef * kl_tok - o.entropy_coef * entropy + o.distill_coef * distill_tok
    loss_tok = torch.where(m, loss_tok, zero)  # never let a masked row's value leak (NaN * 0 = NaN)

    if o.reduction == "none":
        loss = loss_tok
    elif o.reduction == "sum":
        loss = loss_tok.sum()
    else:
        loss = (x.weights.to(dt) * loss_tok).sum()

    def z(v):  # per-token outputs: detached, 0 on masked rows, in the input's token shape
        return torch.where(m, v.detach(), zero).float().reshape(x.token_shape)

    per_tok = dict(gate=gate, gap=gap, distill=distill_tok, pg=pg_tok, clipped=clipped,
                   ppo_kl=ppo_kl_tok, kl=kl_tok, entropy=entropy)
    metrics = masked_metrics({k: torch.where(m, v.detach(), zero) for k, v in per_tok.items()},
                             m, has_teacher=logp_teacher is not None)
    return SDAROutput(
        loss=loss.reshape(x.token_shape) if o.reduction == "none" else loss,
        logprobs=z(logp), entropy=z(entropy), gate=z(gate), gap=z(gap), metrics=metrics,
    )


def _divergence(logp_all, logq_all, kind, jsd_beta):
    """Full-vocabulary divergence per row between p_T = exp(logq_all) and p_S = exp(logp_all)."""
    p, q = logp_all.exp(), logq_all.exp()

    def kl(log_a, a, log_b):  # KL(a || b), with 0 * log 0 = 0
        # The logs are zeroed where a == 0 *before* the product: a where() around a * (log_a - log_b)
        # would still backpropagate 0 * (-inf) = NaN through its unselected branch (-inf logits).
        zero = torch.zeros_like(a)
        return (a * (torch.where(a > 0, log_a, zero) - torch.where(a > 0, log_b, zero))).sum(-1)

    if kind == "fkl" or (kind == "jsd" and jsd_beta == 0.0):
        return kl(logq_all, q, logp_all)
    if kind == "rkl" or (kind == "jsd" and jsd_beta == 1.0):
        return kl(logp_all, p, logq_all)
    b = jsd_beta
    mix = b * q + (1.0 - b) * p
    # M = 0 only where p = q = 0, whose terms kl() drops; log(1) there keeps the backward finite
    log_mix = torch.log(torch.where(mix > 0, mix, torch.ones_like(mix)))
    return b * kl(logq_all, q, log_mix) + (1.0 - b) * kl(logp_all, p, log_mix)
