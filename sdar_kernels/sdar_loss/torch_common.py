"""What the two formulations of the torch engine share (torch_impl.py: eager; torch_fused.py: compiled):
the log floor, the sampled token's log-prob with its label check, the per-token output tuple, and the
zeroing of masked gradient rows (also used by the token_logprobs torch engine)."""

from __future__ import annotations

import torch

# -inf logits (banned tokens) become this finite floor wherever a log-prob multiplies a probability, so
# 0 * log 0 terms are 0 * -1e30 = 0 instead of NaN. exp(-1e30) is exactly 0, so no value changes.
LOG_FLOOR = -1e30


def label_logprob(logp, labels, keep, vocab):
    """log p(y) of each row with an out-of-range label on an unmasked row turned into NaN.

    Such a label is only possible where labels are not checked (inside a compiled graph, or on CUDA); the
    row is poisoned as the Triton kernel poisons it, so the bad input shows as a non-finite row."""
    return torch.where((labels >= 0) & (labels < vocab) | ~keep, logp, float("nan"))


def per_token_outputs(terms, keep, logp, entropy, nonfinite, logp_teacher=None):
    """The per-token values in ``PER_TOKEN_FIELDS`` order, 0 on masked rows (``terms``: TokenTerms;
    ``logp_teacher``: the teacher's log-prob of the sampled token, None without a teacher)."""
    return (terms.loss, torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0), terms.gate, terms.gap,
            terms.distill, terms.pg, terms.clipped, terms.clipped_lower, terms.ppo_kl, terms.kl,
            (nonfinite & keep).to(torch.float32),
            torch.zeros_like(logp) if logp_teacher is None else torch.where(keep, logp_teacher, 0.0))


def zero_masked_rows_(grad, keep):
    """Exact zeros in the rows of ``grad`` [n, V] where ``keep`` [n] is False, whatever their logits held.

    On CPU only the masked rows are written (``index_fill_``: a tenth of the cost of ``masked_fill_`` with a
    broadcast [n, 1] mask, which is not vectorised along V); elsewhere ``masked_fill_``, which needs no
    host sync for the row indices."""
    if grad.device.type == "cpu":
        grad.index_fill_(0, (~keep).nonzero().squeeze(1), 0.0)
    else:
        grad.masked_fill_(~keep[:, None], 0.0)
    return grad
