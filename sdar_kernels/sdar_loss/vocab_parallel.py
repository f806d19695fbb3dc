"""Vocabulary-parallel (tensor-parallel) rows: each rank holds a contiguous shard of the vocabulary.

Megatron's layout: with a group of P ranks, rank r passes logits [..., V/P] for vocabulary ids
[r V/P, (r+1) V/P); labels are global ids. The row statistics are those of the whole row, so:

1. each rank computes the *partial statistics* of its shard (passes.py's seven: running max and base-2
   sums of student and teacher, the entropy and cross sums, the support-gap flag) and the logits at the
   label where it owns the label (Triton: `partial_kernel` with one stretch; torch: `torch_partials`);
2. `combine` merges them across the group with two all-reduces of [N]-sized tensors: MAX of the two
   maxima, then SUM of the partial sums moved to the global maxima (the same update that merges tile rows
   and vocabulary splits inside the kernels, passes.combine) together with the owners' label logits;
   jsd adds one SUM of its two row sums, computed per shard once the normalizers are known;
3. every rank computes the same per-token terms from the same numbers (token_terms.py), so every rank
   returns the same loss and per-token outputs;
4. each rank writes the gradient of its own shard from the row statistics (the two-phase gradient pass,
   with the label shifted into the shard: a label elsewhere never matches).

Communication per token: 2 x 4 B (MAX) + 8 x 4 B (SUM), + 2 x 4 B for jsd, independent of V; it replaces
nothing of size [N, V] (csrc_notes/sdar_loss.md, "Vocabulary parallel").
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .output import NUM_ROW_STATS, PER_TOKEN_FIELDS
from .token_terms import token_terms
from .torch_common import per_token_outputs
from .torch_impl import row_chunks, token_rows_slice

F32 = torch.float32
LN2 = math.log(2.0)
NEG_BIG = -1.0e30
# columns of the [N, 7] partial statistics (passes.py, kernels.partial_kernel)
M_S, D_S, A_S, M_T, D_T, B, GAP = range(7)


# ---------------------------------------------------------------------------- per-shard partial statistics
def torch_partials(x):
    """The seven partial statistics of each row of prepared inputs ``x`` whose logits are one shard, in the
    kernels' representation (max in raw units, base-2 sums relative to it): fp32 math on chunks of rows."""
    o = x.options
    N, V = x.labels.shape[0], x.logits.shape[-1]
    k_scale = 1.0 / (o.temperature * LN2)
    out = torch.zeros(N, 7, dtype=F32, device=x.logits.device)
    out[:, M_S] = NEG_BIG
    out[:, M_T] = NEG_BIG
    for sl in row_chunks(N, V, x.logits, x.teacher_logits):
        keep = x.mask[sl]
        z = torch.where(keep[:, None], token_rows_slice(x.logits, sl).to(F32), -math.inf)  # masked: identity
        m = z.amax(-1).clamp_min(NEG_BIG)
        xs = (z - m[:, None]) * k_scale
        e = torch.exp2(xs)
        out[sl, M_S], out[sl, D_S] = m, e.sum(-1)
        out[sl, A_S] = (e * xs.clamp_min(NEG_BIG)).sum(-1)
        if x.teacher_logits is None:
            continue
        zt = torch.where(keep[:, None], token_rows_slice(x.teacher_logits, sl).to(F32), -math.inf)
        mt = zt.amax(-1).clamp_min(NEG_BIG)
        xt = (zt - mt[:, None]) * k_scale
        et = torch.exp2(xt)
        out[sl, M_T], out[sl, D_T] = mt, et.sum(-1)
        if o.divergence == "fkl":
            out[sl, B] = torch.where(et > 0, et * (xt - xs), 0.0).sum(-1)
            out[sl, GAP] = ((z == -math.inf) & (zt > -math.inf)).any(-1).to(F32)
        elif o.divergence == "rkl":
            out[sl, B] = torch.where(e > 0, e * (xs - xt), 0.0).sum(-1)
            out[sl, GAP] = ((zt == -math.inf) & (z > -math.inf)).any(-1).to(F32)
    return out


def torch_jsd_partials(x, stats):
    """KL(p||M), KL(q||M) (base 2) of each row's shard, from the global normalizers in ``stats``."""
    o = x.options
    N, V = x.labels.shape[0], x.logits.shape[-1]
    k_scale = 1.0 / (o.temperature * LN2)
    b = o.jsd_beta
    out = torch.zeros(N, 2, dtype=F32, device=x.logits.device)
    for sl in row_chunks(N, V, x.logits, x.teacher_logits):
        st = stats[sl]
        lp2 = (token_rows_slice(x.logits, sl).to(F32) - st[:, 0:1]) * k_scale - st[:, 1:2]
        lq2 = (token_rows_slice(x.teacher_logits, sl).to(F32) - st[:, 3:4]) * k_scale - st[:, 4:5]
        lm2 = torch.logaddexp2(lq2 + math.log2(b), lp2 + math.log2(1.0 - b))
        p, q = torch.exp2(lp2), torch.exp2(lq2)
        kp = torch.where(p > 0, p * (lp2 - lm2), 0.0).sum(-1)
        kq = torch.where(q > 0, q * (lq2 - lm2), 0.0).sum(-1)
        out[sl] = torch.where(x.mask[sl][:, None], torch.stack([kp, kq], 1), 0.0)
    return out


def torch_grad_from_stats(x, weights, grad, stats, label_offset, entropy_rows=None):
    """The gradient of a shard from the whole row's statistics (the kernels' gradient pass in torch):
    (1/tau) [c (1{v=y} - p) + ent_w p (log p + H) + div_w d(div)/ds], c = w dl/dlogp, ent_w = w ec,
    div_w = w dc div_scale (ent_w times ``entropy_rows`` per row, when given: token_logprobs); the label is
    shifted into the shard by ``label_offset``."""
    o = x.options
    N, V = x.labels.shape[0], x.logits.shape[-1]
    k_scale = 1.0 / (o.temperature * LN2)
    inv_tau = 1.0 / o.temperature
    for sl in row_chunks(N, V, x.logits, x.teacher_logits, grad):
        st, w, keep = stats[sl], weights[sl], x.mask[sl]
        c = torch.where(w != 0, w * st[:, 7], 0.0)[:, None]
        lp2 = (token_rows_slice(x.logits, sl).to(F32) - st[:, 0:1]) * k_scale - st[:, 1:2]
        p = torch.exp2(lp2)
        g = -c * p
        if o.entropy_coef != 0:
            ent_w = w * o.entropy_coef if entropy_rows is None else w * o.entropy_coef * entropy_rows[sl]
            g += ent_w[:, None] * p * (LN2 * lp2.clamp_min(NEG_BIG) + st[:, 2:3])
        if o.full_vocab_distill:
            div_w = torch.where(w != 0, w * o.distill_coef * st[:, 8], 0.0)[:, None]
            lq2 = (token_rows_slice(x.teacher_logits, sl).to(F32) - st[:, 3:4]) * k_scale - st[:, 4:5]
            div = torch.where(st[:, 5:6] < math.inf, st[:, 5:6], 0.0)
            if o.divergence == "fkl":
                g += div_w * (p - torch.exp2(lq2))
            elif o.divergence == "rkl":
                g += div_w * p * (LN2 * (lp2.clamp_min(NEG_BIG) - lq2.clamp_min(NEG_BIG)) - div)
            else:
                b = o.jsd_beta
                lm2 = torch.logaddexp2(lq2 + math.log2(b), lp2 + math.log2(1.0 - b))
                g += div_w * (1.0 - b) * p * LN2 * (lp2.clamp_min(NEG_BIG) - lm2.clamp_min(NEG_BIG) - st[:, 6:7])
        local = x.labels[sl] - label_offset
        own = (local >= 0) & (local < V)
        g.scatter_add_(1, torch.where(own, local, 0)[:, None], torch.where(own[:, None], c, 0.0))
        g = torch.where(keep[:, None], g * inv_tau, 0.0)    # exact zeros on masked rows
        token_rows_slice(grad, sl).copy_(g)


def label_logits(logits, labels, v0, mask):
    """(the logit at each row's label where this shard owns it, 0 elsewhere; 1 where owned), fp32 [N]."""
    V = logits.shape[-1]
    local = labels - v0
    own = (local >= 0) & (local < V) & mask
    idx = torch.where(own, local, torch.zeros_like(local))
    if logits.dim() == 2:
        z = logits[torch.arange(labels.shape[0], device=labels.device), idx]
    else:   # a [B, T, V] view sliced along T: index (b, t) without a flat copy
        T = logits.shape[1]
        rows = torch.arange(labels.shape[0], device=labels.device)
        z = logits[rows // T, rows % T, idx]
    return torch.where(own, z.to(F32), 0.0), own.to(F32)


# ---------------------------------------------------------------------------- the combine across ranks
def _moved(d, a, m, M, k_scale):
    """Sums d, a relative to maxima m moved to the global maxima M: (alpha d, alpha (a + delta d))."""
    delta = (m - M) * k_scale
    alpha = torch.exp2(delta)
    return alpha * d, torch.where(alpha > 0, alpha * (a + delta * d), 0.0), delta, alpha


def combine(part, z_y, zt_y, own, group, k_scale, divergence):
    """Whole-row statistics from every rank's partials: two all-reduces. Returns the global (M_s, D_s, A_s,
    M_t, D_t, B, gap, z_y, zt_y, owners) as [N] tensors (identical on every rank)."""
    maxima = part[:, [M_S, M_T]].contiguous()
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    Ms, Mt = maxima[:, 0], maxima[:, 1]
    ds, as_, delta_s, alpha_s = _moved(part[:, D_S], part[:, A_S], part[:, M_S], Ms, k_scale)
    dt, _, delta_t, alpha_t = _moved(part[:, D_T], torch.zeros_like(Ms), part[:, M_T], Mt, k_scale)
    b = torch.zeros_like(Ms)
    if divergence == "fkl":
        w = alpha_t * part[:, D_T]
        b = torch.where(w > 0, alpha_t * part[:, B] + w * (delta_t - delta_s), 0.0)
    elif divergence == "rkl":
        w = alpha_s * part[:, D_S]
        b = torch.where(w > 0, alpha_s * part[:, B] + w * (delta_s - delta_t), 0.0)
    sums = torch.stack([ds, as_, dt, b, part[:, GAP], z_y, zt_y, own], dim=1)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return (Ms, *sums[:, :2].unbind(1), Mt, *sums[:, 2:].unbind(1))


def finish(Ds, As, Dt, B_, gap, divergence, has_teacher_logits):
    """The row statistics (log2 d_s, entropy, log2 d_t, div) from the combined sums, as the kernels'
    finish_statistics computes them."""
    l2d_s = torch.log2(Ds)
    entropy = LN2 * (l2d_s - As / Ds)
    l2d_t = torch.log2(Dt) if has_teacher_logits else torch.zeros_like(Ds)
    div = torch.zeros_like(Ds)
    if divergence == "fkl":
        div = LN2 * (B_ / Dt - l2d_t + l2d_s)
    elif divergence == "rkl":
        div = LN2 * (B_ / Ds - l2d_s + l2d_t)
    if divergence in ("fkl", "rkl"):
        div = torch.where(gap > 0, math.inf, div)
    return l2d_s, entropy, l2d_t, div


# ---------------------------------------------------------------------------- the forward of one rank
def resolve_group(name: str):
    """The process group registered under ``name`` (custom ops take the group by name)."""
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def vocab_parallel_rows(x, engine, group, v0):
    """Per-token outputs (identical on every rank) and the [N, 9] row statistics of prepared inputs whose
    logits are this rank's shard; ``engine`` provides ``partials(x)`` and ``jsd_partials(x, stats)``."""
    part = engine.partials(x)
    z_y, own = label_logits(x.logits, x.labels, v0, x.mask)
    zt_y = label_logits(x.teacher_logits, x.labels, v0, x.mask)[0] if x.teacher_logits is not None else None
    return rows_from_partials(x, part, z_y, zt_y, own, group, lambda stats: engine.jsd_partials(x, stats))


def rows_from_partials(x, part, z_y, zt_y, own, group, jsd_partials):
    """Per-token outputs and the [N, 9] row statistics from this rank's partial statistics ``part`` [N, 7]
    and label logits (``own``: 1 where this rank holds the label). ``jsd_partials(stats)`` gives this
    rank's [N, 2] jsd row sums once the normalizers are in ``stats`` (only called for jsd). ``x``: the
    prepared inputs (labels, mask, side inputs, options; its logits are not read here)."""
    o = x.options
    N = x.labels.shape[0]
    k_scale = 1.0 / (o.temperature * LN2)
    inv_tau = 1.0 / o.temperature
    has_tl = zt_y is not None
    Ms, Ds, As, Mt, Dt, B_, gap, z_y, zt_y, owners = combine(
        part, z_y, zt_y if has_tl else torch.zeros_like(z_y), own, group, k_scale, o.divergence)
    l2d_s, entropy, l2d_t, div = finish(Ds, As, Dt, B_, gap, o.divergence, has_tl)
    stats = torch.zeros(N, NUM_ROW_STATS, dtype=F32, device=x.labels.device)
    stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3], stats[:, 4] = Ms, l2d_s, entropy, Mt, l2d_t
    kp = torch.zeros_like(Ms)
    if o.divergence == "jsd":
        jsd = jsd_partials(stats)                        # [N, 2]: KL(p||M), KL(q||M) of this shard, base 2
        dist.all_reduce(jsd, op=dist.ReduceOp.SUM, group=group)
        kp = jsd[:, 0]
        div = LN2 * (o.jsd_beta * jsd[:, 1] + (1.0 - o.jsd_beta) * kp)
    # a label that no rank owns (out of [0, V) on an unmasked row) poisons its row, as on one device
    logp = torch.where(owners > 0, (z_y - Ms) * inv_tau - LN2 * l2d_s, math.nan)
    logp_t = None
    if has_tl:
        logp_t = (zt_y - Mt) * inv_tau - LN2 * l2d_t
    elif x.teacher_logprobs is not None:
        logp_t = x.teacher_logprobs
    t = token_terms(logp=logp, entropy=entropy, mask=x.mask, options=o, logp_teacher=logp_t, divergence=div,
                    advantages=x.advantages, old_logprobs=x.old_logprobs, ref_logprobs=x.ref_logprobs)
    nonfinite = ~torch.isfinite(l2d_s)
    if has_tl:
        nonfinite = nonfinite | ~torch.isfinite(l2d_t)
    keep = x.mask
    stats[:, 5], stats[:, 6], stats[:, 7], stats[:, 8] = div, kp, t.dl_dlogp, t.div_scale
    per_token = dict(zip(PER_TOKEN_FIELDS, per_token_outputs(t, keep, logp, entropy, nonfinite, logp_t), strict=True))
    return per_token, stats
