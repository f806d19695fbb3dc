"""Autograd Function and the public functional ``token_logprobs`` (README.md in this folder).

The forward streams the rows once (twice with teacher logits) and keeps only per-row statistics; the
backward is one pass that writes dL/dz for whatever upstream gradients reached the log-probs and the
entropy (either may be absent). The row engine (``TorchTokenRows`` here; a Triton engine with the same two
methods plugs in through ``pick_token_engine``) does the streaming.
"""

from __future__ import annotations

import dataclasses

import torch

from .inputs import prepare_token_inputs
from .output import TokenStats
from .torch_impl import TorchTokenRows

F32 = torch.float32


def pick_token_engine(x):
    """The row engine for prepared inputs. Until the Triton kernel lands every backend runs the torch engine
    ("triton" is refused at validation, so nothing silently falls back)."""
    return TorchTokenRows


def masked_upstream(g, mask):
    """An upstream gradient as flat fp32 with exact zeros on masked rows (None stays None)."""
    if g is None:
        return None
    return torch.where(mask, g.reshape(-1).to(F32), 0.0)


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, x, engine):
        need_grad = ctx.needs_input_grad[0]
        out, stats = engine.forward(x, save_stats=need_grad)
        logprobs = out["logprobs"]
        entropy = out["entropy"] if out["entropy"] is not None else logprobs.new_empty(0)
        teacher = out["teacher_logprobs"] if out["teacher_logprobs"] is not None else logprobs.new_empty(0)
        ctx.mark_non_differentiable(teacher)
        if not x.entropy:
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)   # an unused output's gradient arrives as None: no work for it
        ctx.used = False
        if need_grad:
            ctx.engine, ctx.stats = engine, stats
            # side inputs only: the logits go through save_for_backward (an in-place change to them between
            # forward and backward then raises instead of going unseen), the teacher is not needed
            ctx.x = dataclasses.replace(x, logits=None, teacher_logits=None)
            ctx.save_for_backward(logits2d)
        return logprobs, entropy, teacher

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_teacher):
        if ctx.used and ctx.x.inplace_backward:
            raise RuntimeError("token_logprobs: backward ran twice through one forward with inplace_backward; "
                               "the logits were overwritten by the first gradient")
        ctx.used = True
        x = ctx.x
        g_lp = masked_upstream(grad_logprobs, x.mask)
        g_h = masked_upstream(grad_entropy, x.mask) if x.entropy else None
        if g_lp is None and g_h is None:
            return None, None, None
        if g_lp is None:
            g_lp = torch.zeros_like(g_h)
        (logits2d,) = ctx.saved_tensors
        x = dataclasses.replace(x, logits=logits2d)
        # inplace_backward: each chunk / block is read before its gradient overwrites it
        grad = logits2d if x.inplace_backward else torch.empty_like(logits2d)
        ctx.engine.backward(x, g_lp, g_h, ctx.stats, grad)
        return grad, None, None


def package_stats(logprobs, entropy, teacher, x) -> TokenStats:
    shape = x.token_shape
    return TokenStats(
        logprobs=logprobs.reshape(shape),
        entropy=entropy.reshape(shape) if x.entropy else None,
        teacher_logprobs=teacher.reshape(shape) if x.teacher_logits is not None else None,
    )


def token_logprobs(logits, labels, *, mask=None, temperature=1.0, entropy=True, teacher_logits=None,
                   inplace_backward=False, backend="auto") -> TokenStats:
    """Per-token log-prob of ``labels`` and entropy of softmax(logits / temperature), with a fused backward.

    The seam every trainer has (logits -> log p(y), H), for running a trainer's own loss code on fused
    statistics: the forward keeps per-row statistics only (no [N, V] activation besides the logits), and
    the backward is one pass writing dL/dz = (1/tau) [g_lp (1{v=y} - p) - g_H p (log p + H)] for any
    upstream gradients g_lp, g_H of the two outputs.

    Args:
        logits: [..., V] fp32 / bf16 / fp16, usually [B, T, V] or [N, V]; a [B, T, V] view sliced along T
            (``logits[:, :-1]``) is read in place.
        labels: [...] integer tokens in [0, V) on unmasked tokens (anything, e.g. -100, on masked ones).
        mask: [...] bool / 0-1, tokens to score (default all). Masked tokens give 0 and an exact-zero
            gradient; their logits are never read (NaN there is fine).
        temperature: > 0; the statistics are those of softmax(logits / temperature).
        entropy: False skips the entropy (``.entropy`` is None).
        teacher_logits: [..., V] like ``logits``: also return the teacher's log-prob of ``labels`` (detached).
        inplace_backward: write the gradient into the logits' storage (saves an [N, V] buffer; the logits
            are garbage afterwards). Refused for expanded / overlapping views.
        backend: "auto" | "torch" ("triton" raises ValueError until this op's kernel lands).

    Returns:
        TokenStats(logprobs, entropy, teacher_logprobs), fp32 in the token shape.

    Raises:
        ValueError naming the argument, for every malformed input or option.
    """
    x = prepare_token_inputs(logits, labels, mask=mask, temperature=temperature, entropy=entropy,
                             teacher_logits=teacher_logits, inplace_backward=inplace_backward, backend=backend)
    return package_stats(*TokenLogprobsFunction.apply(x.logits, x, pick_token_engine(x)), x)
