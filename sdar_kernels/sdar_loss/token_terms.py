"""Per-token scalar terms of the SDAR loss in torch (README.md, "Per-token terms"), shared by the torch backend and the
fused-linear torch path. The Triton kernel implements the same formulas in ``kernels.py``.

Given the row statistics (log p_S(y), log p_T(y), entropy, divergence value) this returns every per-token
value and c_t = w_t * d l_t / d log p_S(y), the coefficient of the sampled-token gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# verl clamps log(r) to +-20 before exp (released-code semantics, see README.md)
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0


@dataclass
class TokenTerms:
    loss: torch.Tensor      # l_t (unweighted), 0 on masked rows
    gate: torch.Tensor
    gap: torch.Tensor
    distill: torch.Tensor
    pg: torch.Tensor
    clipped: torch.Tensor
    ppo_kl: torch.Tensor
    kl: torch.Tensor
    coef: torch.Tensor      # c_t
    distill_scale: torch.Tensor  # w_t * distill_coef * gate: weight of the full-vocab divergence gradient


def token_terms(*, logp, entropy, mask, weights, options, logp_teacher=None, divergence=None,
                advantages=None, old_logprobs=None, ref_logprobs=None) -> TokenTerms:
    o = options
    zero = torch.zeros_like(logp)
    dl_dlogp = torch.zeros_like(logp)

    if logp_teacher is not None:
        gap = logp_teacher - logp
        gate = torch.sigmoid(o.gate_beta * gap)
        if o.distill == "sampled":
            distill = gate * gap
            dl_dlogp = dl_dlogp - o.distill_coef * gate
        elif o.distill == "reinforce":
            distill = -gate * gap * logp
            dl_dlogp = dl_dlogp - o.distill_coef * gate * gap
        else:
            distill = gate * divergence
    else:
        gap, gate, distill = zero, zero, zero

    if advantages is not None:
        log_ratio = (logp - old_logprobs) if old_logprobs is not None else zero
        in_range = log_ratio.abs() <= LOG_RATIO_CLAMP
        ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        pg1 = -advantages * ratio
        pg2 = -advantages * ratio.clamp(1.0 - o.clip_low, 1.0 + o.clip_high)
        pg = torch.maximum(pg1, pg2)
        unclipped = pg1 >= pg2  # the gradient flows through pg1 (ratio inside the clip range or pg1 wins)
        if o.clip_ratio_c is not None:
            pg3 = -advantages * o.clip_ratio_c
            dual = (advantages < 0) & (pg3 < pg)
            pg = torch.where(dual, pg3, pg)
            unclipped = unclipped & ~dual
        dl_dlogp = dl_dlogp + torch.where(unclipped & in_range, pg1, zero)  # d(-A r)/dlogp = -A r
        clipped = (pg2 > pg1).to(logp.dtype)
        ppo_kl = -log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    else:
        pg, clipped, ppo_kl = zero, zero, zero

    if o.kl_coef > 0:
        d = ref_logprobs - logp
        k3 = torch.exp(d) - d - 1.0
        kl = k3.clamp(-K3_CLAMP, K3_CLAMP)
        dl_dlogp = dl_dlogp + o.kl_coef * torch.where(k3.abs() <= K3_CLAMP, 1.0 - torch.exp(d), zero)
    else:
        kl = zero

    loss = pg + o.kl_coef * kl - o.entropy_coef * entropy + o.distill_coef * distill
    keep = mask

    def masked(v):
        return torch.where(keep, v, zero)

    return TokenTerms(
        loss=masked(loss), gate=masked(gate), gap=masked(gap), distill=masked(distill), pg=masked(pg),
        clipped=masked(clipped), ppo_kl=masked(ppo_kl), kl=masked(kl),
        coef=masked(weights * dl_dlogp), distill_scale=masked(weights * o.distill_coef * gate),
    )
