"""Per-token scalar terms of the SDAR loss in torch (README.md, "Per-token terms"), shared by the torch backend and the
fused-linear torch path. The Triton kernel implements the same formulas in ``kernels.py``.

Given the row statistics (log p_S(y), log p_T(y), entropy, divergence value) this returns every per-token
value, dl_t / d log p_S(y) (the coefficient of the sampled-token gradient, before the weight w_t) and the
scale of the full-vocabulary divergence's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .output import GATE_FLOOR

# verl clamps log(r) to +-20 before exp (released-code semantics, see README.md)
LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0
K3_SAFE_ARG = 20.0     # k3(20) = e^20 - 21 >> K3_CLAMP


@dataclass
class TokenTerms:
    loss: torch.Tensor      # l_t (unweighted), 0 on masked rows
    gate: torch.Tensor
    gap: torch.Tensor
    distill: torch.Tensor
    pg: torch.Tensor
    clipped: torch.Tensor
    clipped_lower: torch.Tensor
    ppo_kl: torch.Tensor
    kl: torch.Tensor
    dl_dlogp: torch.Tensor  # dl_t / dlog p_S(y) (unweighted)
    div_scale: torch.Tensor  # the gate where the divergence gradient flows, else 0 (README.md, "Limits")

    def coef(self, weights):
        """c_t = w_t * dl_t/dlog p_S(y), 0 on masked rows (weights are 0 there)."""
        return torch.where(weights != 0, weights * self.dl_dlogp, 0.0)

    def distill_scale(self, weights, distill_coef):
        """w_t * distill_coef * gate: the weight of the full-vocabulary divergence's gradient."""
        return torch.where(weights != 0, weights * distill_coef * self.div_scale, 0.0)


def _masked_product(gate, b):
    """gate * b taken as 0 where the gate is 0, i.e. below GATE_FLOOR (the gated terms' limit: gate 0 times an
    infinite gap or divergence). A NaN gate stays NaN."""
    return torch.where(gate < GATE_FLOOR, torch.zeros((), dtype=gate.dtype, device=gate.device), gate * b)


def token_terms(*, logp, entropy, mask, options, logp_teacher=None, divergence=None,
                advantages=None, old_logprobs=None, ref_logprobs=None) -> TokenTerms:
    o = options
    zero = torch.zeros_like(logp)
    dl_dlogp = torch.zeros_like(logp)
    div_scale = zero

    if logp_teacher is not None:
        gap = logp_teacher - logp
        # gate_beta = 0: 0.5 everywhere, also where the gap is infinite
        gate = torch.sigmoid(gap * o.gate_beta) if o.gate_beta != 0 else torch.full_like(gap, 0.5)
        if o.distill == "sampled":
            distill = _masked_product(gate, gap)
            dl_dlogp = dl_dlogp - o.distill_coef * gate
        elif o.distill == "reinforce":
            distill = -_masked_product(gate, gap) * logp
            dl_dlogp = dl_dlogp - o.distill_coef * _masked_product(gate, gap)
        else:
            distill = _masked_product(gate, divergence)
            # an infinite rkl has no finite gradient: none is taken (fkl's p - q is finite)
            div_scale = torch.where(gate < GATE_FLOOR, zero, gate)
            if o.divergence == "rkl":
                div_scale = torch.where(divergence < float("inf"), div_scale, zero)
    else:
        gap, gate, distill = zero, zero, zero

    clipped_lower = zero
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
            clipped_lower = dual.to(logp.dtype)
        dl_dlogp = dl_dlogp + torch.where(unclipped & in_range, pg1, zero)  # d(-A r)/dlogp = -A r
        clipped = (pg2 > pg1).to(logp.dtype)
        ppo_kl = -log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    else:
        pg, clipped, ppo_kl = zero, zero, zero

    if o.kl_coef > 0:
        d = ref_logprobs - logp
        # beyond d = 20 the value is clamped at 10 anyway and exp(d) could overflow (inf - inf at d = +inf)
        big = d > K3_SAFE_ARG
        e = torch.exp(d.clamp(max=K3_SAFE_ARG))
        k3 = e - d - 1.0
        kl = torch.where(big, K3_CLAMP, k3.clamp(-K3_CLAMP, K3_CLAMP))
        dl_dlogp = dl_dlogp + o.kl_coef * torch.where(big | (k3.abs() > K3_CLAMP), zero, 1.0 - e)
    else:
        kl = zero

    # distill_coef = 0 drops the term even where it is +inf
    distill_term = o.distill_coef * distill if o.distill_coef != 0 else zero
    loss = pg + o.kl_coef * kl - o.entropy_coef * entropy + distill_term
    keep = mask

    def masked(v):
        return torch.where(keep, v, zero)

    return TokenTerms(
        loss=masked(loss), gate=masked(gate), gap=masked(gap), distill=masked(distill), pg=masked(pg),
        clipped=masked(clipped), clipped_lower=masked(clipped_lower), ppo_kl=masked(ppo_kl), kl=masked(kl),
        dl_dlogp=masked(dl_dlogp), div_scale=masked(div_scale),
    )
