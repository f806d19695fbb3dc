"""The SDAR distillation term on per-token log-probs, for trainers that hand their loss only log-probs.

The sampled-token forms of the gated term (the math of ``sdar_loss``, sdar_loss/README.md), written on
[...] log-prob tensors so that autograd carries dD/dlogp back into whatever produced them (e.g.
``token_logprobs``' fused backward):

    gap  = logp_T - sg(logp)          gate = sg(sigmoid(gate_beta * gap))
    "sampled":   D = gate * (logp_T - logp)            dD/dlogp = -gate
    "reinforce": D = gate * sg(logp - logp_T) * logp    dD/dlogp = -gate * gap

Where the teacher gives the token zero probability (logp_T = -inf) and gate_beta > 0 the gate is 0 and
D is its limit 0 (value and gradient), as in ``sdar_loss``.
"""

from __future__ import annotations

import torch

from .._checks import check_tensor
from ..sdar_loss.options import SDAROptions

SAMPLED_DISTILL = ("sampled", "reinforce")


def gated_distill(logprobs, teacher_logprobs, *, gate_beta=5.0, distill="sampled"):
    """Per-token D (differentiable w.r.t. ``logprobs``), gate and gap (detached), all in fp32.

    ``logprobs`` / ``teacher_logprobs``: [...] log-probs of the same sampled tokens under the student
    and the privileged teacher (the teacher's are detached here). Aggregate D with the trainer's own
    normaliser and add ``distill_coef`` times it to the loss.
    """
    options = SDAROptions(gate_beta=gate_beta, distill=distill)
    if options.distill not in SAMPLED_DISTILL:
        raise ValueError(f"distill must be one of {SAMPLED_DISTILL} on log-probs (full-vocabulary "
                         f"divergences need logits: use sdar_loss), got {distill!r}")
    check_tensor("logprobs", logprobs, allow_none=False)
    check_tensor("teacher_logprobs", teacher_logprobs, shape=logprobs.shape, device=logprobs.device,
                 allow_none=False)
    logp = logprobs.to(torch.float32)
    teacher = teacher_logprobs.detach().to(torch.float32)
    gap = teacher - logp.detach()
    gate = torch.sigmoid(options.gate_beta * gap)
    if options.distill == "sampled":
        d = gate * (teacher - logp)
    else:
        d = gate * (-gap) * logp
    # gate 0 (teacher log-prob -inf, gate_beta > 0): the limit 0, never 0 * inf = NaN
    d = torch.where(gate > 0, d, torch.zeros((), dtype=d.dtype, device=d.device))
    return d, gate, gap
