"""What every SDAR loss backend returns, and the masked-mean metrics built from per-token values."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Per-token values every backend produces, flat [N] fp32 and 0 on masked rows (the Triton kernel writes
# them in this order).
# "clipped" / "clipped_lower": the clip / the dual clip is the active branch (0/1); "nonfinite": the row's
# student or teacher logits hold a NaN or +inf, or nothing but -inf (0/1).
# "logp_teacher": the teacher's log-prob of the sampled token (from its logits, or as given), 0 without one.
PER_TOKEN_FIELDS = ("loss", "logprobs", "entropy", "gate", "gap", "distill", "pg", "clipped", "clipped_lower",
                    "ppo_kl", "kl", "nonfinite", "logp_teacher")

# Row statistics the Triton engine keeps between the two phases of the two-phase schedule (kernels.py):
# max and log2-sum of student and teacher, entropy, divergence, KL(p||M), dl/dlog p_S(y), divergence scale.
NUM_ROW_STATS = 9

# A gate below the smallest normal fp32 counts as 0 (whether a sigmoid that far out returns a subnormal or
# 0 depends on the device): the gated terms are 0 there, the limit of gate * gap at gap = -inf.
GATE_FLOOR = 1.1754943508222875e-38

METRIC_NAMES = (
    "gate_mean", "gate_active_ratio", "gap_mean", "distill_loss", "pg_loss",
    "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "kl_loss", "entropy", "nonfinite_tokens",
)


@dataclass
class SDAROutput:
    """Result of :func:`sdar_kernels.sdar_loss`.

    ``loss`` carries the gradient; everything else is detached. Per-token tensors have the token shape
    of the input (``logits.shape[:-1]``), fp32, and are 0 on masked tokens (so no NaN escapes a masked
    row). ``metrics`` always holds every name in ``METRIC_NAMES`` as a 0-dim fp32 tensor on the input's
    device (masked token means; 0 where the term is off), computed without host syncs.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    gate: torch.Tensor
    gap: torch.Tensor
    metrics: dict = field(default_factory=dict)


def masked_metrics(per_token: dict, mask: torch.Tensor, *, has_teacher: bool) -> dict:
    """Masked token means of the per-token values (already zero on masked rows), as 0-dim fp32 tensors.

    ``per_token`` holds flat [N] tensors: gate, gap, distill, pg, clipped, clipped_lower, ppo_kl, kl,
    entropy, nonfinite. One division by max(#tokens, 1): an all-masked batch gives 0, never NaN, and no
    ``.item()``. ``nonfinite_tokens`` is a count, not a mean.
    """
    count = mask.sum().clamp_min(1).to(torch.float32)

    def mean(v):
        return (v.to(torch.float32).sum() / count).detach()

    gate = per_token["gate"]
    active = ((gate > 0.5) & mask).to(torch.float32) if has_teacher else torch.zeros_like(gate)
    return {
        "gate_mean": mean(gate),
        "gate_active_ratio": mean(active),
        "gap_mean": mean(per_token["gap"]),
        "distill_loss": mean(per_token["distill"]),
        "pg_loss": mean(per_token["pg"]),
        "pg_clipfrac": mean(per_token["clipped"]),
        "pg_clipfrac_lower": mean(per_token["clipped_lower"]),
        "ppo_kl": mean(per_token["ppo_kl"]),
        "kl_loss": mean(per_token["kl"]),
        "entropy": mean(per_token["entropy"]),
        "nonfinite_tokens": per_token["nonfinite"].to(torch.float32).sum().detach(),
    }


def reduce_loss(loss_tok, x):
    """The loss (README.md, "Aggregation") from the per-token l_t (0 on masked rows) of prepared inputs ``x``:
    "none" -> m*l per token, "sum" -> sum m*l, "mean" -> sum w*l with the aggregation weights."""
    reduction = x.options.reduction
    if reduction == "none":
        return loss_tok
    if reduction == "sum":
        return loss_tok.sum()
    return (x.weights * loss_tok).sum()


def package_output(loss, stacked, x, *, has_teacher: bool) -> SDAROutput:
    """SDAROutput from an autograd Function's loss and its stacked per-token rows (PER_TOKEN_FIELDS[1:]),
    for prepared inputs ``x`` (token shape, mask, reduction)."""
    per_token = dict(zip(PER_TOKEN_FIELDS[1:], stacked.unbind(0)))
    shape = x.token_shape
    return SDAROutput(
        loss=loss.reshape(shape) if x.options.reduction == "none" else loss,
        logprobs=per_token["logprobs"].reshape(shape), entropy=per_token["entropy"].reshape(shape),
        gate=per_token["gate"].reshape(shape), gap=per_token["gap"].reshape(shape),
        metrics=masked_metrics(per_token, x.mask, has_teacher=has_teacher),
    )
