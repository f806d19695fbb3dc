"""Triton kernels of the fused SDAR loss, wired from the passes in passes.py.

Two schedules of the same passes (launch.py picks one; README.md, "Kernels and launch"):

- One program per token row (`sdar_rows_kernel`): pass 1 streams the student row (and the teacher row)
  once and keeps the row statistics; then every per-token scalar is known (log p_S(y), log p_T(y), the
  gate, the GRPO and k3 terms, c_t = w_t * dl_t/dlog p_S(y)); pass 2 streams the rows again and writes the
  gradient. One launch; nothing of size [N, V] is allocated; the gradient may alias the logits (each block
  is read before it is written, and only by this program). Used when there are enough rows to fill the GPU.
- Vocabulary splits (few rows): each row is cut into S stretches, one program per (row, stretch).
  `partial_kernel` writes each stretch's partial statistics, `finish_kernel` combines them per row (the
  same formulas that combine the tile rows inside a program) and computes the per-token terms, and
  `sdar_grad_kernel` writes the gradient of each stretch. jsd, whose row sums need both normalizers
  first, adds `jsd_partial_kernel` and a second finish stage.

`sdar_grad_kernel` is also the backward of the two-phase schedules (reduction "none", inplace_backward):
one gradient pass from the statistics the forward stored, with weights that arrive only in backward.
"""

import triton
import triton.language as tl

from .output import NUM_ROW_STATS, PER_TOKEN_FIELDS
from .passes import (LN2, finish_statistics, gradient_row, jsd_statistics, row_pointer, stream_statistics,
                     token_terms, zero_row, combine, NEG_BIG)

# Per-token output rows of `out` ([NUM_FIELDS, N] fp32), in the order of output.PER_TOKEN_FIELDS.
NUM_FIELDS = len(PER_TOKEN_FIELDS)
_NUM_FIELDS = tl.constexpr(NUM_FIELDS)
# Per-row statistics kept for a gradient pass ([N, NUM_STATS] fp32), see _store_stats.
NUM_STATS = NUM_ROW_STATS
_NUM_STATS = tl.constexpr(NUM_STATS)
# Partial statistics of one stretch of a row (passes.py): m_s, d_s, a_s, m_t, d_t, b, gap.
NUM_PARTIALS = 7
_NUM_PARTIALS = tl.constexpr(NUM_PARTIALS)
# DISTILL constexpr values; full-vocabulary divergences are >= 2 (jsd with beta 0/1 arrives as fkl/rkl).
DISTILL_CODES = {"sampled": 0, "reinforce": 1, "fkl": 2, "rkl": 3, "jsd": 4}


@triton.jit
def _store_stats(stats_row, m_s, l2d_s, entropy, m_t, l2d_t, div, kp, dl_dlogp, div_scale):
    tl.store(stats_row + 0, m_s)
    tl.store(stats_row + 1, l2d_s)
    tl.store(stats_row + 2, entropy)
    tl.store(stats_row + 3, m_t)
    tl.store(stats_row + 4, l2d_t)
    tl.store(stats_row + 5, div)
    tl.store(stats_row + 6, kp)
    tl.store(stats_row + 7, dl_dlogp)
    tl.store(stats_row + 8, div_scale)


@triton.jit
def _row_outputs(out_ptr, stats_ptr, row, N, logits_row, teacher_row, y, y_ok,
                 teacher_logp_ptr, adv_ptr, old_ptr, ref_ptr,
                 m_s, l2d_s, entropy, m_t, l2d_t, div, kp,
                 inv_tau, gate_beta, distill_coef, clip_low, clip_high, clip_c, kl_coef, entropy_coef,
                 HAS_TEACHER_LOGITS: tl.constexpr, HAS_TEACHER_LOGPROBS: tl.constexpr, DISTILL: tl.constexpr,
                 HAS_ADV: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, HAS_KL: tl.constexpr,
                 STORE_STATS: tl.constexpr):
    """From a row's finished statistics: the per-token terms, stored as outputs (and as the statistics a
    gradient pass needs). Returns (dl/dlog p_S(y), div_scale)."""
    # Out-of-range labels are rejected on the host where that is free (CPU tensors); on CUDA a bad
    # label poisons its row with NaN instead of reading out of bounds (README.md, "Validation").
    z_y = tl.where(y_ok, tl.load(logits_row + y).to(tl.float32), float("nan"))
    logp = (z_y - m_s) * inv_tau - LN2 * l2d_s
    logp_t = 0.0
    if HAS_TEACHER_LOGITS:
        zt_y = tl.load(teacher_row + y).to(tl.float32)
        logp_t = (zt_y - m_t) * inv_tau - LN2 * l2d_t
    if HAS_TEACHER_LOGPROBS:
        logp_t = tl.load(teacher_logp_ptr + row)
    # a NaN / +inf logit, or a row of -inf only, leaves a normaliser that is not a positive number
    nonfinite = ~((l2d_s > float("-inf")) & (l2d_s < float("inf")))
    if HAS_TEACHER_LOGITS:
        nonfinite = nonfinite | ~((l2d_t > float("-inf")) & (l2d_t < float("inf")))
    gap, gate, distill, pg, clipped, clipped_lower, ppo_kl, kl, dl_dlogp, div_scale = token_terms(
        logp, logp_t, row, adv_ptr, old_ptr, ref_ptr, div, gate_beta, distill_coef, clip_low, clip_high,
        clip_c, kl_coef, HAS_TEACHER_LOGITS or HAS_TEACHER_LOGPROBS, DISTILL, HAS_ADV, HAS_OLD,
        HAS_DUAL_CLIP, HAS_KL)
    # distill_coef = 0 drops the term even where it is +inf (never 0 * inf in the loss)
    loss = pg + kl_coef * kl - entropy_coef * entropy + tl.where(distill_coef != 0, distill_coef * distill, 0.0)
    tl.store(out_ptr + 0 * N + row, loss)
    tl.store(out_ptr + 1 * N + row, logp)
    tl.store(out_ptr + 2 * N + row, entropy)
    tl.store(out_ptr + 3 * N + row, gate)
    tl.store(out_ptr + 4 * N + row, gap)
    tl.store(out_ptr + 5 * N + row, distill)
    tl.store(out_ptr + 6 * N + row, pg)
    tl.store(out_ptr + 7 * N + row, clipped)
    tl.store(out_ptr + 8 * N + row, clipped_lower)
    tl.store(out_ptr + 9 * N + row, ppo_kl)
    tl.store(out_ptr + 10 * N + row, kl)
    tl.store(out_ptr + 11 * N + row, tl.where(nonfinite, 1.0, 0.0))
    tl.store(out_ptr + 12 * N + row, logp_t)
    if STORE_STATS:
        _store_stats(stats_ptr + row * _NUM_STATS, m_s, l2d_s, entropy, m_t, l2d_t, div, kp, dl_dlogp, div_scale)
    return dl_dlogp, div_scale


@triton.jit
def _zero_outputs(out_ptr, row, N):
    for f in tl.static_range(_NUM_FIELDS):
        tl.store(out_ptr + f * N + row, 0.0)


@triton.jit
def _label(labels_ptr, row, V):
    """(label as int32 inside [0, V), whether it was in range)."""
    y = tl.load(labels_ptr + row)
    y_ok = (y >= 0) & (y < V)
    return tl.where(y_ok, y, 0).to(tl.int32), y_ok


@triton.jit
def sdar_rows_kernel(
    # outputs
    grad_ptr, out_ptr, stats_ptr,
    # inputs
    logits_ptr, teacher_ptr, labels_ptr, mask_ptr, weights_ptr,
    teacher_logp_ptr, adv_ptr, old_ptr, ref_ptr,
    # strides (elements) and sizes (passes.row_pointer)
    stride_logits_b, stride_logits_t, stride_teacher_b, stride_teacher_t, stride_grad_b, stride_grad_t,
    seq_len, N, V,
    # runtime scalars
    k_scale, inv_tau, gate_beta, distill_coef, jsd_beta, log2_b, log2_1mb, clip_low, clip_high, clip_c,
    kl_coef, entropy_coef,
    # compile-time switches
    BLOCK_R: tl.constexpr, VEC: tl.constexpr,
    HAS_TEACHER_LOGITS: tl.constexpr, HAS_TEACHER_LOGPROBS: tl.constexpr, DISTILL: tl.constexpr,
    HAS_ADV: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, HAS_KL: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    STORE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """One program per row: per-token outputs, and the gradient (fused) or the row statistics."""
    row = tl.program_id(0).to(tl.int64)   # int64 before any pointer arithmetic: N * V passes 2^31
    keep = tl.load(mask_ptr + row) != 0
    logits_row = row_pointer(logits_ptr, row, seq_len, stride_logits_b, stride_logits_t)
    teacher_row = row_pointer(teacher_ptr, row, seq_len, stride_teacher_b, stride_teacher_t)
    grad_row = row_pointer(grad_ptr, row, seq_len, stride_grad_b, stride_grad_t)

    if keep:
        y, y_ok = _label(labels_ptr, row, V)
        # ---------------- pass 1: row statistics ----------------
        m_s, d_s, a_s, m_t, d_t, b, gap = stream_statistics(
            logits_row, teacher_row, V, k_scale, BLOCK_R, VEC, HAS_TEACHER_LOGITS, True, DISTILL)
        m_s, l2d_s, entropy, m_t, l2d_t, div = finish_statistics(m_s, d_s, a_s, m_t, d_t, b, gap,
                                                                 HAS_TEACHER_LOGITS, DISTILL)
        kp = 0.0
        if DISTILL == 4:
            kp, kq = jsd_statistics(logits_row, teacher_row, V, k_scale, m_s, l2d_s, m_t, l2d_t,
                                    log2_b, log2_1mb, BLOCK_R, VEC)
            div = LN2 * (jsd_beta * kq + (1.0 - jsd_beta) * kp)

        # ---------------- per-token terms ----------------
        dl_dlogp, div_scale = _row_outputs(
            out_ptr, stats_ptr, row, N, logits_row, teacher_row, y, y_ok, teacher_logp_ptr, adv_ptr, old_ptr,
            ref_ptr, m_s, l2d_s, entropy, m_t, l2d_t, div, kp, inv_tau, gate_beta, distill_coef, clip_low,
            clip_high, clip_c, kl_coef, entropy_coef, HAS_TEACHER_LOGITS, HAS_TEACHER_LOGPROBS, DISTILL, HAS_ADV,
            HAS_OLD, HAS_DUAL_CLIP, HAS_KL, STORE_STATS)

        # ---------------- pass 2: gradient ----------------
        if WRITE_GRAD:
            w = tl.load(weights_ptr + row)
            gradient_row(grad_row, logits_row, teacher_row, V, y, k_scale, inv_tau,
                         m_s, l2d_s, entropy, m_t, l2d_t, div, kp,
                         w * dl_dlogp, w * entropy_coef, w * distill_coef * div_scale, jsd_beta, log2_b, log2_1mb,
                         BLOCK_R, VEC, HAS_ENTROPY, DISTILL)
    else:
        # masked row: exact zeros, whatever the logits hold (they may be inf/NaN)
        _zero_outputs(out_ptr, row, N)
        if WRITE_GRAD:
            zero_row(grad_row, V, BLOCK_R, VEC)


@triton.jit
def partial_kernel(
    part_ptr, logits_ptr, teacher_ptr, mask_ptr,
    stride_logits_b, stride_logits_t, stride_teacher_b, stride_teacher_t, seq_len, V, V_SPLIT, k_scale,
    BLOCK_R: tl.constexpr, VEC: tl.constexpr, HAS_TEACHER_LOGITS: tl.constexpr, DISTILL: tl.constexpr,
):
    """Grid (N, S): the partial statistics of stretch s = [s * V_SPLIT, (s + 1) * V_SPLIT) of row n."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if tl.load(mask_ptr + row) != 0:
        v0 = split * V_SPLIT
        width = tl.minimum(V - v0, V_SPLIT)
        logits_row = row_pointer(logits_ptr, row, seq_len, stride_logits_b, stride_logits_t) + v0
        teacher_row = row_pointer(teacher_ptr, row, seq_len, stride_teacher_b, stride_teacher_t) + v0
        m_s, d_s, a_s, m_t, d_t, b, gap = stream_statistics(
            logits_row, teacher_row, width, k_scale, BLOCK_R, VEC, HAS_TEACHER_LOGITS, True, DISTILL)
        p = part_ptr + (row * tl.num_programs(1) + split) * _NUM_PARTIALS
        tl.store(p + 0, m_s)
        tl.store(p + 1, d_s)
        tl.store(p + 2, a_s)
        tl.store(p + 3, m_t)
        tl.store(p + 4, d_t)
        tl.store(p + 5, b)
        tl.store(p + 6, gap)


@triton.jit
def jsd_partial_kernel(
    part_ptr, logits_ptr, teacher_ptr, mask_ptr, stats_ptr,
    stride_logits_b, stride_logits_t, stride_teacher_b, stride_teacher_t, seq_len, V, V_SPLIT, k_scale,
    log2_b, log2_1mb, BLOCK_R: tl.constexpr, VEC: tl.constexpr,
):
    """Grid (N, S): the jsd row sums KL(p||M), KL(q||M) (base 2) of one stretch, from the normalizers the
    first finish stage stored."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if tl.load(mask_ptr + row) != 0:
        v0 = split * V_SPLIT
        width = tl.minimum(V - v0, V_SPLIT)
        st = stats_ptr + row * _NUM_STATS
        kp, kq = jsd_statistics(
            row_pointer(logits_ptr, row, seq_len, stride_logits_b, stride_logits_t) + v0,
            row_pointer(teacher_ptr, row, seq_len, stride_teacher_b, stride_teacher_t) + v0, width, k_scale,
            tl.load(st + 0), tl.load(st + 1), tl.load(st + 3), tl.load(st + 4), log2_b, log2_1mb, BLOCK_R, VEC)
        p = part_ptr + (row * tl.num_programs(1) + split) * 2
        tl.store(p + 0, kp)
        tl.store(p + 1, kq)


@triton.jit
def finish_kernel(
    out_ptr, stats_ptr, part_ptr, jsd_part_ptr,
    logits_ptr, teacher_ptr, labels_ptr, mask_ptr, teacher_logp_ptr, adv_ptr, old_ptr, ref_ptr,
    stride_logits_b, stride_logits_t, stride_teacher_b, stride_teacher_t, seq_len, N, V, S,
    k_scale, inv_tau, gate_beta, distill_coef, jsd_beta, clip_low, clip_high, clip_c, kl_coef, entropy_coef,
    S_BLOCK: tl.constexpr,
    HAS_TEACHER_LOGITS: tl.constexpr, HAS_TEACHER_LOGPROBS: tl.constexpr, DISTILL: tl.constexpr,
    HAS_ADV: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, HAS_KL: tl.constexpr,
    STAGE: tl.constexpr,   # 0: everything; jsd: 1 normalizers only, then 2 (after jsd_partial_kernel) the terms
):
    """Grid (N,): combine a row's S partial statistics and compute its per-token terms and statistics."""
    row = tl.program_id(0).to(tl.int64)
    if tl.load(mask_ptr + row) != 0:
        logits_row = row_pointer(logits_ptr, row, seq_len, stride_logits_b, stride_logits_t)
        teacher_row = row_pointer(teacher_ptr, row, seq_len, stride_teacher_b, stride_teacher_t)
        st = stats_ptr + row * _NUM_STATS
        if STAGE == 2:
            m_s = tl.load(st + 0)
            l2d_s = tl.load(st + 1)
            entropy = tl.load(st + 2)
            m_t = tl.load(st + 3)
            l2d_t = tl.load(st + 4)
        else:
            s = tl.arange(0, S_BLOCK)
            ok = s < S
            p = part_ptr + (row * S + s) * _NUM_PARTIALS
            # absent splits hold the identity of every sum (max NEG_BIG, sums 0)
            m_s, d_s, a_s, m_t, d_t, b, gap = combine(
                tl.load(p + 0, mask=ok, other=NEG_BIG), tl.load(p + 1, mask=ok, other=0.0),
                tl.load(p + 2, mask=ok, other=0.0), tl.load(p + 3, mask=ok, other=NEG_BIG),
                tl.load(p + 4, mask=ok, other=0.0), tl.load(p + 5, mask=ok, other=0.0),
                tl.load(p + 6, mask=ok, other=0.0), k_scale, HAS_TEACHER_LOGITS, DISTILL)
            m_s, l2d_s, entropy, m_t, l2d_t, div = finish_statistics(m_s, d_s, a_s, m_t, d_t, b, gap,
                                                                     HAS_TEACHER_LOGITS, DISTILL)
        if STAGE == 1:
            tl.store(st + 0, m_s)
            tl.store(st + 1, l2d_s)
            tl.store(st + 2, entropy)
            tl.store(st + 3, m_t)
            tl.store(st + 4, l2d_t)
        else:
            kp = 0.0
            if STAGE == 2:
                s = tl.arange(0, S_BLOCK)
                ok = s < S
                jp = jsd_part_ptr + (row * S + s) * 2
                kp = tl.sum(tl.load(jp + 0, mask=ok, other=0.0), axis=0)
                kq = tl.sum(tl.load(jp + 1, mask=ok, other=0.0), axis=0)
                div = LN2 * (jsd_beta * kq + (1.0 - jsd_beta) * kp)
            y, y_ok = _label(labels_ptr, row, V)
            _row_outputs(out_ptr, stats_ptr, row, N, logits_row, teacher_row, y, y_ok, teacher_logp_ptr, adv_ptr,
                         old_ptr, ref_ptr, m_s, l2d_s, entropy, m_t, l2d_t, div, kp, inv_tau, gate_beta,
                         distill_coef, clip_low, clip_high, clip_c, kl_coef, entropy_coef, HAS_TEACHER_LOGITS,
                         HAS_TEACHER_LOGPROBS, DISTILL, HAS_ADV, HAS_OLD, HAS_DUAL_CLIP, HAS_KL, True)
    elif STAGE != 1:
        _zero_outputs(out_ptr, row, N)


@triton.jit
def sdar_grad_kernel(
    grad_ptr, logits_ptr, teacher_ptr, labels_ptr, mask_ptr, weights_ptr, stats_ptr, ent_rows_ptr,
    stride_logits_b, stride_logits_t, stride_teacher_b, stride_teacher_t, stride_grad_b, stride_grad_t,
    seq_len, V, V_SPLIT,
    k_scale, inv_tau, distill_coef, jsd_beta, log2_b, log2_1mb, entropy_coef,
    BLOCK_R: tl.constexpr, VEC: tl.constexpr, HAS_ENTROPY: tl.constexpr, DISTILL: tl.constexpr,
    ENT_PER_ROW: tl.constexpr,
):
    """Grid (N, S): the gradient of stretch s of row n from the row's stored statistics and a weight w_t
    (the aggregation weight, or m_t g_t with the upstream gradient of a two-phase backward). With
    ENT_PER_ROW the entropy term's weight is w_t * entropy_coef * ent_rows[t] (token_logprobs: the
    upstream gradient of each entropy, negated)."""
    row = tl.program_id(0).to(tl.int64)
    v0 = tl.program_id(1) * V_SPLIT
    width = tl.minimum(V - v0, V_SPLIT)
    grad_row = row_pointer(grad_ptr, row, seq_len, stride_grad_b, stride_grad_t) + v0
    if tl.load(mask_ptr + row) != 0:
        w = tl.load(weights_ptr + row)
        ent_w = w * entropy_coef
        if ENT_PER_ROW:
            ent_w = ent_w * tl.load(ent_rows_ptr + row)
        # a label outside [0, V) matches no column (-1): a row with a bad label is already NaN in its
        # statistics, and a vocabulary shard that does not hold the label must not get the label's term
        y = tl.load(labels_ptr + row)
        y = tl.where((y >= 0) & (y < V), y, -1).to(tl.int32)
        st = stats_ptr + row * _NUM_STATS
        gradient_row(grad_row, row_pointer(logits_ptr, row, seq_len, stride_logits_b, stride_logits_t) + v0,
                     row_pointer(teacher_ptr, row, seq_len, stride_teacher_b, stride_teacher_t) + v0, width,
                     tl.where(y >= 0, y - v0, -1), k_scale, inv_tau,
                     tl.load(st + 0), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3), tl.load(st + 4),
                     tl.load(st + 5), tl.load(st + 6),
                     w * tl.load(st + 7), ent_w, w * distill_coef * tl.load(st + 8),
                     jsd_beta, log2_b, log2_1mb, BLOCK_R, VEC, HAS_ENTROPY, DISTILL)
    else:
        zero_row(grad_row, width, BLOCK_R, VEC)


@triton.jit
def scale_kernel(x_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    """x *= scale, with the scalar read on the device: no pass at all when it is exactly 1 (the usual
    ``loss.backward()``), and no host sync to find that out."""
    scale = tl.load(scale_ptr)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < numel
        x = tl.load(x_ptr + offs, mask=in_range)
        tl.store(x_ptr + offs, (x.to(tl.float32) * scale).to(x_ptr.dtype.element_ty), mask=in_range)
