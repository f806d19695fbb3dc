"""The public functional ``sdar_loss``: validate, pick the engine and the schedule, call the custom op.

The op (ops.py) does the work; this file holds no math. Schedules (README.md, "Schedules"):
- "mean" / "sum" with a gradient: the aggregation weights w_t are known in the forward, so the engine
  writes w_t * dl_t/dz in the same launch as the loss (fused); backward only scales it by the upstream
  scalar, and not at all when that is 1.
- "none", or ``inplace_backward``: the forward computes the loss and keeps the row statistics; backward
  makes one gradient pass (with w_t = m_t * g_t for "none"), into the logits' storage for inplace.
- no gradient wanted (``torch.no_grad()``, ``inference_mode()``, logits that do not require grad): the
  loss terms only; nothing of size [N, V] is allocated or written.
"""

from __future__ import annotations

import torch

from .._checks import normalize_inputs
from .._tp import vocab_shard
from . import ops  # registers the custom ops
from .engines import pick_engine
from .output import SDAROutput, package_output


def pick_schedule(options, logits) -> str:
    """One of ops.SCHEDULES for a call on ``logits`` (decided from grad mode and requires_grad only)."""
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return "no_grad"
    if options.inplace_backward:
        return "inplace"
    return "two_phase" if options.reduction == "none" else "fused"


def _has_internal_overlap(t) -> bool:
    """Whether two elements of ``t`` share a memory location (decided from sizes and strides): with the
    dims of size > 1 sorted by stride, each stride must step over the whole extent of the smaller ones."""
    extent = 0
    dims = sorted(((st, s) for s, st in zip(t.shape, t.stride()) if s > 1))
    for stride, size in dims:
        if stride <= extent:
            return True
        extent += (size - 1) * stride
    return False


def check_inplace_target(logits, *others):
    """inplace_backward writes the gradient into ``logits``' storage: refuse storage where that write is
    unsafe (one memory location behind several elements, e.g. an expand()ed tensor) or shared with
    another input that is still read while the gradient is written (e.g. teacher logits)."""
    if _has_internal_overlap(logits):
        raise ValueError("inplace_backward=True needs logits whose elements do not share memory (got an "
                         "expanded or overlapping view); pass inplace_backward=False or .contiguous() logits")
    if torch.compiler.is_compiling():
        return
    storage = logits.untyped_storage().data_ptr()
    for name, t in others:
        if t is not None and t.untyped_storage().data_ptr() == storage:
            raise ValueError(f"inplace_backward=True would overwrite {name}, which shares storage with the "
                             f"logits; pass inplace_backward=False")


def sdar_loss(
    logits, labels, *, teacher_logits=None, teacher_logprobs=None, mask=None, advantages=None,
    old_logprobs=None, ref_logprobs=None, loss_weights=None, num_tokens=None, num_sequences=None,
    loss_scale_factor=None, dp_size=1,
    gate_beta=5.0, distill_coef=0.01, distill="sampled", jsd_beta=0.5,
    clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, kl_coef=0.0, entropy_coef=0.0,
    temperature=1.0, loss_agg_mode="token-mean", reduction="mean",
    inplace_backward=False, backend="auto", tp_group=None,
) -> SDAROutput:
    """Fused SDAR loss: GRPO (dual clip) + k3 KL + entropy bonus + sigmoid-gated self-distillation.

    Per token: l = pg + kl_coef * kl - entropy_coef * H + distill_coef * gate * D, aggregated as
    sum_t w_t l_t (derivations in sdar_kernels/sdar_loss/README.md).

    Args:
        logits: [..., V] student logits (fp32 / bf16 / fp16), usually [B, T, V] or [N, V]. Sliced
            [B, T, V] views (``logits[:, :-1]``) are read in place.
        labels: [...] int sampled tokens in [0, V) (any value on masked tokens, e.g. -100).
        teacher_logits: [..., V] logits of the privileged teacher (no gradient), or
        teacher_logprobs: [...] precomputed log pi_T(y) (<= 0). At most one; without either there is no
            distillation term (plain GRPO).
        mask: [...] bool, or numeric 0 / 1: tokens that get loss. Default: all.
        advantages: [...] per token, or [B] per sequence for [B, T, V] logits. None: no pg term.
        old_logprobs: [...] behaviour log-probs for the PPO ratio (None: on-policy, ratio 1).
        ref_logprobs: [...] reference log-probs, required when kl_coef > 0.
        loss_weights: [...] explicit w_t (overrides loss_agg_mode).
        num_tokens / num_sequences: global token / non-empty sequence counts (numbers or 0-dim tensors)
            across data-parallel ranks; loss_scale_factor: S of "seq-mean-token-sum-norm"; dp_size:
            multiplies every weight (undoes DDP/FSDP gradient averaging, as verl does).
        gate_beta, distill_coef, distill ("sampled" | "reinforce" | "fkl" | "rkl" | "jsd"), jsd_beta,
        clip_low, clip_high, clip_ratio_c (None: no dual clip), kl_coef, entropy_coef, temperature,
        loss_agg_mode ("token-mean" | "token-sum" | "seq-mean-token-sum" | "seq-mean-token-mean" |
        "seq-mean-token-sum-norm"), reduction ("mean" | "sum" | "none").
        inplace_backward: backward writes the gradient into the logits' storage (saves an [N, V] buffer;
            the logits are overwritten then, so nothing else may read them afterwards).
        backend: "auto" (Triton on CUDA tensors, the chunked torch path elsewhere) | "triton" | "torch".
        tp_group: a torch.distributed process group over which the vocabulary is split (tensor parallel):
            logits (and teacher logits) are this rank's contiguous shard [..., V / P] (rank r holds ids
            [r V/P, (r+1) V/P)), labels are global ids; every rank gets the same loss and per-token
            outputs and the gradient of its own shard (README.md, "Vocabulary parallel").

    Returns:
        SDAROutput(loss, logprobs, entropy, gate, gap, metrics); everything but ``loss`` is detached.

    Raises:
        ValueError naming the argument, for every malformed input or option, and when no loss term is
        active.
    """
    shard = vocab_shard(tp_group, logits.shape[-1]) if isinstance(logits, torch.Tensor) and logits.dim() else None
    x = normalize_inputs(
        logits, labels, teacher_logits=teacher_logits, teacher_logprobs=teacher_logprobs, mask=mask,
        advantages=advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
        loss_weights=loss_weights, num_tokens=num_tokens, num_sequences=num_sequences,
        loss_scale_factor=loss_scale_factor, dp_size=dp_size, label_vocab=shard and shard.vocab,
        gate_beta=gate_beta, distill_coef=distill_coef,
        distill=distill, jsd_beta=jsd_beta, clip_low=clip_low, clip_high=clip_high,
        clip_ratio_c=clip_ratio_c, kl_coef=kl_coef, entropy_coef=entropy_coef, temperature=temperature,
        loss_agg_mode=loss_agg_mode, reduction=reduction, inplace_backward=inplace_backward, backend=backend,
    )
    schedule = pick_schedule(x.options, x.logits)
    if schedule == "inplace":
        check_inplace_target(x.logits, ("teacher_logits", x.teacher_logits))
    loss, stacked, _, _ = torch.ops.sdar_kernels.sdar_loss_forward(
        x.logits, x.labels, x.mask, x.weights, x.teacher_logits, x.teacher_logprobs, x.advantages,
        x.old_logprobs, x.ref_logprobs, *ops.option_args(x.options), pick_engine(x.options.backend, x.logits),
        schedule, shard and shard.group_name, shard.offset if shard else 0)
    has_teacher = x.teacher_logits is not None or x.teacher_logprobs is not None
    return package_output(loss, stacked, x, has_teacher=has_teacher)
