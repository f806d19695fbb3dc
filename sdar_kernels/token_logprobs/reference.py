"""Plain eager reference of ``token_logprobs`` (the oracle for every engine).

Readable over fast: the full [N, V] log-softmax in fp32 (or fp64 with ``compute_dtype``), ``gather`` and
the entropy sum, autograd for the gradient. Imports nothing from the fused path; input validation is the
shared one (``inputs.py``, no math).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .inputs import prepare_token_inputs
from .output import TokenStats


def token_logprobs_reference(logits, labels, *, mask=None, temperature=1.0, entropy=True, teacher_logits=None,
                             inplace_backward=False, backend="auto", compute_dtype=torch.float32) -> TokenStats:
    """Same signature and semantics as :func:`sdar_kernels.token_logprobs`; ``backend`` and
    ``inplace_backward`` are validated and ignored. ``compute_dtype`` picks fp32 or fp64 math."""
    x = prepare_token_inputs(logits, labels, mask=mask, temperature=temperature, entropy=entropy,
                             teacher_logits=teacher_logits, inplace_backward=inplace_backward, backend=backend)
    dt, m, V = compute_dtype, x.mask, x.logits.shape[-1]
    zero = torch.zeros((), dtype=dt, device=m.device)
    y = x.labels.clamp(0, V - 1)[:, None]   # masked rows may carry ignore labels (-100)

    def log_softmax_rows(z):
        # masked rows may hold NaN / inf: replace them (keeping autograd to the logits) before any sum
        return F.log_softmax(torch.where(m[:, None], z.reshape(-1, V).to(dt), zero) / x.temperature, dim=-1)

    def out(v):
        return torch.where(m, v, zero).to(torch.float32).reshape(x.token_shape)

    logp_all = log_softmax_rows(x.logits)
    p = logp_all.exp()
    stats = TokenStats(logprobs=out(logp_all.gather(-1, y).squeeze(-1)))
    if x.entropy:
        stats.entropy = out(-(p * torch.where(p > 0, logp_all, zero)).sum(-1))
    if x.teacher_logits is not None:
        with torch.no_grad():
            stats.teacher_logprobs = out(log_softmax_rows(x.teacher_logits).gather(-1, y).squeeze(-1))
    return stats


def linear_token_logprobs_reference(hidden, weight, labels, *, bias=None, teacher_hidden=None,
                                    teacher_weight=None, teacher_bias=None, **kwargs) -> TokenStats:
    """Same as :func:`sdar_kernels.linear_token_logprobs`, by materialising fp32 logits (operands upcast
    first, no low-precision rounding) and calling ``token_logprobs_reference`` (``compute_dtype`` passes on)."""
    logits = hidden.to(torch.float32) @ weight.to(torch.float32).T
    if bias is not None:
        logits = logits + bias.to(torch.float32)
    teacher_logits = None
    if teacher_hidden is not None:
        if teacher_weight is None:
            teacher_weight, teacher_bias = weight, (bias if teacher_bias is None else teacher_bias)
        with torch.no_grad():
            teacher_logits = teacher_hidden.to(torch.float32) @ teacher_weight.to(torch.float32).T
            if teacher_bias is not None:
                teacher_logits = teacher_logits + teacher_bias.to(torch.float32)
    return token_logprobs_reference(logits, labels, teacher_logits=teacher_logits, **kwargs)
