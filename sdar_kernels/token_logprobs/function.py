"""The public functional ``token_logprobs`` (README.md in this folder): validate, pick the engine and the
schedule, call the custom op (ops.py).

The forward streams the rows once (twice with teacher logits) and keeps only per-row statistics; the
backward is one pass that writes dL/dz for whatever upstream gradients reached the log-probs and the
entropy (either may be absent). Under no_grad / inference_mode, or when the logits do not require grad,
no statistics are kept and nothing is written into the logits.
"""

from __future__ import annotations

import torch

from .._tp import vocab_shard
from ..sdar_loss.function import check_inplace_target
from . import ops  # noqa: F401  (registers the custom ops)
from .engines import pick_token_engine
from .inputs import prepare_token_inputs
from .output import TokenStats


def token_schedule(inplace_backward, *grad_inputs) -> str:
    """"no_grad" | "inplace" | "grad", from grad mode and requires_grad only."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)):
        return "no_grad"
    return "inplace" if inplace_backward else "grad"


def package_stats(logprobs, entropy, teacher, x) -> TokenStats:
    shape = x.token_shape
    return TokenStats(
        logprobs=logprobs.reshape(shape),
        entropy=entropy.reshape(shape) if x.entropy else None,
        teacher_logprobs=teacher.reshape(shape) if x.teacher_logits is not None else None,
    )


def token_logprobs(logits, labels, *, mask=None, temperature=1.0, entropy=True, teacher_logits=None,
                   inplace_backward=False, backend="auto", tp_group=None) -> TokenStats:
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
        inplace_backward: backward writes the gradient into the logits' storage (saves an [N, V] buffer;
            the logits are overwritten then, and autograd's version counter makes a later reader raise).
            Refused for expanded / overlapping views and teacher logits sharing the storage.
        backend: "auto" (Triton on CUDA tensors, the chunked torch path elsewhere) | "triton" | "torch".
        tp_group: a process group over which the vocabulary is split: logits (and teacher logits) are this
            rank's contiguous shard, labels global ids; every rank gets the same outputs and the gradient
            of its own shard.

    Returns:
        TokenStats(logprobs, entropy, teacher_logprobs), fp32 in the token shape.

    Raises:
        ValueError naming the argument, for every malformed input or option.
    """
    shard = vocab_shard(tp_group, logits.shape[-1]) if isinstance(logits, torch.Tensor) and logits.dim() else None
    x = prepare_token_inputs(logits, labels, mask=mask, temperature=temperature, entropy=entropy,
                             teacher_logits=teacher_logits, inplace_backward=inplace_backward, backend=backend,
                             label_vocab=shard and shard.vocab)
    schedule = token_schedule(x.inplace_backward, x.logits)
    if schedule == "inplace":
        check_inplace_target(x.logits, ("teacher_logits", x.teacher_logits))
    logprobs, ent, teacher, _ = torch.ops.sdar_kernels.token_logprobs_forward(
        x.logits, x.labels, x.mask, x.teacher_logits, x.temperature, x.entropy,
        pick_token_engine(x.backend, x.logits), schedule, shard and shard.group_name, shard.offset if shard else 0)
    return package_stats(logprobs, ent, teacher, x)
