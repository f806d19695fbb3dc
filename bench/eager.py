"""The SDAR loss as RL trainers write it today: the ``eager`` baseline (and what ``compile`` compiles).

Deliberately independent of ``sdar_kernels`` (it must not share a bug with the code it measures): full
fp32 ``log_softmax`` of the student and the teacher, ``gather`` of the sampled token, a sigmoid gate, the
verl GRPO dual-clip terms, k3 KL and the entropy as verl's ``entropy_from_logits`` (softmax, logsumexp).
The [N] per-token tail is shared by the ``liger`` providers, which replace only the [N, V] parts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_tail(logp, logp_teacher, entropy, mask, advantages, old_logprobs, ref_logprobs, opts):
    """Token-mean of the per-token SDAR loss from [N] fp32 pieces (logp carries the gradient)."""
    gap = logp_teacher - logp.detach()
    gate = torch.sigmoid(opts["gate_beta"] * gap)
    distill = gate * (logp_teacher - logp)
    ratio = torch.exp(torch.clamp(logp - old_logprobs, -20.0, 20.0))
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - opts["clip_low"], 1.0 + opts["clip_high"])
    pgc = torch.maximum(pg1, pg2)
    pg = torch.where(advantages < 0, torch.minimum(-advantages * opts["clip_ratio_c"], pgc), pgc)
    loss = pg + opts["distill_coef"] * distill
    if opts["kl_coef"] > 0:
        d = ref_logprobs - logp
        loss = loss + opts["kl_coef"] * torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0)
    if opts["entropy_coef"] != 0:
        loss = loss - opts["entropy_coef"] * entropy
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp_min(1.0)


def entropy_from_logits(logits):
    """verl ``entropy_from_logits``: H = logsumexp(z) - sum softmax(z) * z."""
    pd = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (pd * logits).sum(-1)


def eager_sdar_loss(logits, labels, teacher_logits, mask, advantages, old_logprobs, ref_logprobs, opts):
    tau = opts["temperature"]
    s = logits.float() / tau
    logp = F.log_softmax(s, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    with torch.no_grad():
        t = teacher_logits.float() / tau
        logp_teacher = F.log_softmax(t, dim=-1).gather(-1, labels[:, None]).squeeze(-1)
    entropy = entropy_from_logits(s) if opts["entropy_coef"] != 0 else None
    return token_tail(logp, logp_teacher, entropy, mask, advantages, old_logprobs, ref_logprobs, opts)


def eager_linear_sdar_loss(hidden, weight, labels, teacher_hidden, mask, advantages, old_logprobs,
                           ref_logprobs, opts):
    """lm_head matmul in the model dtype, then the eager loss (what a trainer does without a fused head)."""
    logits = hidden @ weight.t()
    with torch.no_grad():
        teacher_logits = teacher_hidden @ weight.detach().t()
    return eager_sdar_loss(logits, labels, teacher_logits, mask, advantages, old_logprobs, ref_logprobs, opts)
