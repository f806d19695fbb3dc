"""Triton kernels of the fused SDAR loss: one program per token row, two passes over the vocabulary.

Math and derivations: README.md in this folder (section names below refer to it).

Pass 1 (`row_statistics`) streams the student row (and the teacher row) once and keeps, in fp32, the
online log-sum-exp state of both plus the extra row sums the loss needs (entropy, and the forward/reverse
KL row sums). After it every per-token scalar is known: log p_S(y), log p_T(y), the gate, the GRPO and k3
terms, and c_t = w_t * dl_t/dlog p_S(y). Pass 2 (`gradient_row`) streams the rows again and writes the
gradient w_t * dl_t/dz_S. Nothing of size [N, V] is allocated; the gradient may alias the logits (each
block is read before it is written, and only by this program).

Tiles are [BLOCK_R, VEC]: VEC is one 16-byte vector of logits, so each thread owns whole rows of the tile
and the running statistics are kept *per tile row* (per thread). The reductions along the vector axis stay
inside a thread; the tile rows are combined once per token row (`_combine`). A pass therefore has no
block-wide reduction, barrier or shuffle inside its loop (README.md, "Per-thread running statistics").
The next tile is loaded before the current one is used, so each thread has a load in flight while it
computes.

Exponentials are base 2: k = log2(e) / temperature, x = (z - m) * k, so each is one exp2. The running max m
is kept in raw logit units and subtracted *before* the scaling (exact for nearby values: confident rows
keep fp32 log-probs). Every rescale of a running sum by alpha = 2^((m_old - m_new) k) is guarded so that a
lane that has only seen -inf, or a max that jumps by more than fp32 can scale (a logit of 3e38), never
turns 0 * inf into NaN; a NaN or +inf logit still makes its row NaN, as it does in eager PyTorch.
"""

import triton
import triton.language as tl

from . import output
from .output import NUM_ROW_STATS, PER_TOKEN_FIELDS

LN2 = tl.constexpr(0.6931471805599453)
# Finite floor for log-probabilities in products p * log p (0 * log 0 = 0 * NEG_BIG = 0) and the starting
# value of the running max (so a lane that only sees -inf keeps d = 0 and never computes -inf - -inf).
NEG_BIG = tl.constexpr(-1.0e30)
# The smallest normal fp32: a gate below it counts as 0 on every device.
GATE_FLOOR = tl.constexpr(output.GATE_FLOOR)

# Per-token output rows of `out` ([NUM_FIELDS, N] fp32), in the order of output.PER_TOKEN_FIELDS.
NUM_FIELDS = len(PER_TOKEN_FIELDS)
_NUM_FIELDS = tl.constexpr(NUM_FIELDS)
# Per-row statistics kept for a gradient pass in backward ([N, NUM_STATS] fp32), see _store_stats.
NUM_STATS = NUM_ROW_STATS
_NUM_STATS = tl.constexpr(NUM_STATS)
# DISTILL constexpr values; full-vocabulary divergences are >= 2 (jsd with beta 0/1 arrives as fkl/rkl).
DISTILL_CODES = {"sampled": 0, "reinforce": 1, "fkl": 2, "rkl": 3, "jsd": 4}


@triton.jit
def _tile_offsets(BLOCK_R: tl.constexpr, VEC: tl.constexpr):
    """[BLOCK_R, VEC] int32 offsets of one tile: row r holds VEC consecutive logits (one 16-byte vector)."""
    return tl.arange(0, BLOCK_R)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def _rescale(m_old, m_new, k_scale):
    """(delta, alpha) of a running max moving from m_old to m_new: delta = (m_old - m_new) k <= 0 and
    alpha = 2^delta. delta may be -inf (a jump beyond fp32 range): alpha is then 0, and every caller
    guards its `delta * sum` term with alpha > 0."""
    delta = (m_old - m_new) * k_scale
    return delta, tl.exp2(delta)


@triton.jit
def _entropy_sum(a, d_old, delta, alpha):
    """The entropy sum a = sum 2^x x (x relative to the max) moved to a new max: alpha (a + delta d_old).
    Zero where alpha is 0: the old terms are 2^(-inf) = 0, and delta * d_old could be -inf * 0."""
    return tl.where(alpha > 0, alpha * (a + delta * d_old), 0.0)


@triton.jit
def _cross_sum(b, d_w, alpha_w, delta_w, delta_o):
    """A row sum b = sum 2^(x_w) (x_w - x_o) (fkl: w = teacher, o = student; rkl the other way round),
    both x relative to their own running max, moved to new maxima: each x shifts by its delta, each
    weight 2^(x_w) by alpha_w."""
    weight = alpha_w * d_w     # 0 where nothing has been seen (d_w = 0) or the old terms vanish (alpha_w = 0)
    return tl.where(weight > 0, alpha_w * b + weight * (delta_w - delta_o), 0.0)


@triton.jit
def row_statistics(logits_row, teacher_row, V, k_scale,
                   BLOCK_R: tl.constexpr, VEC: tl.constexpr, HAS_TEACHER_LOGITS: tl.constexpr,
                   ENTROPY: tl.constexpr, DISTILL: tl.constexpr):
    """Pass 1: online log-sum-exp of student (and teacher), entropy and the fkl / rkl row sums.

    Returns (m_s, log2 d_s, entropy [nats], m_t, log2 d_t, div [nats]) with lse = m / tau + ln d;
    div is KL(q||p) for DISTILL 2, KL(p||q) for DISTILL 3, else 0 (+inf where the divergence is infinite).
    """
    tile = _tile_offsets(BLOCK_R, VEC)
    BLOCK: tl.constexpr = BLOCK_R * VEC
    # per tile row: running max (raw units), sum 2^x, sum 2^x x (entropy), teacher max / sum, cross sum
    m_s = tl.full([BLOCK_R], NEG_BIG, tl.float32)
    d_s = tl.zeros([BLOCK_R], tl.float32)
    a_s = tl.zeros([BLOCK_R], tl.float32)
    m_t = tl.full([BLOCK_R], NEG_BIG, tl.float32)
    d_t = tl.zeros([BLOCK_R], tl.float32)
    b = tl.zeros([BLOCK_R], tl.float32)
    # 1 where one side has a finite logit and the other -inf: the divergence is +inf, even where the
    # finite side's probability underflows to 0 and adds nothing to b
    support_gap = tl.zeros([BLOCK_R], tl.float32)
    # other=-inf gives 2^x = 0, the identity of every sum below
    z_next = tl.load(logits_row + tile, mask=tile < V, other=float("-inf"))
    if HAS_TEACHER_LOGITS:
        zt_next = tl.load(teacher_row + tile, mask=tile < V, other=float("-inf"))
    for start in range(0, V, BLOCK):
        z = z_next.to(tl.float32)
        if HAS_TEACHER_LOGITS:
            zt = zt_next.to(tl.float32)
        nxt = start + BLOCK + tile       # prefetch the next tile (masked off past V: no access)
        z_next = tl.load(logits_row + nxt, mask=nxt < V, other=float("-inf"))
        if HAS_TEACHER_LOGITS:
            zt_next = tl.load(teacher_row + nxt, mask=nxt < V, other=float("-inf"))

        ms_new = tl.maximum(m_s, tl.max(z, axis=1))
        delta_s, alpha_s = _rescale(m_s, ms_new, k_scale)
        x = (z - ms_new[:, None]) * k_scale
        e = tl.exp2(x)
        if ENTROPY:
            # max(x, NEG_BIG): 2^x x -> 0 * NEG_BIG = 0 at -inf logits; a NaN x still reaches the sum via e
            a_s = _entropy_sum(a_s, d_s, delta_s, alpha_s) + tl.sum(e * tl.maximum(x, NEG_BIG), axis=1)
        if HAS_TEACHER_LOGITS:
            mt_new = tl.maximum(m_t, tl.max(zt, axis=1))
            delta_t, alpha_t = _rescale(m_t, mt_new, k_scale)
            xt = (zt - mt_new[:, None]) * k_scale
            et = tl.exp2(xt)
            if DISTILL == 2:    # fkl: sum q-weights (x_t - x_s)
                b = _cross_sum(b, d_t, alpha_t, delta_t, delta_s) + \
                    tl.sum(tl.where(et > 0, et * (xt - x), 0.0), axis=1)
                gap_hit = (z == float("-inf")) & (zt > float("-inf"))
                support_gap = tl.maximum(support_gap, tl.max(tl.where(gap_hit, 1.0, 0.0), axis=1))
            if DISTILL == 3:    # rkl: sum p-weights (x_s - x_t)
                b = _cross_sum(b, d_s, alpha_s, delta_s, delta_t) + \
                    tl.sum(tl.where(e > 0, e * (x - xt), 0.0), axis=1)
                gap_hit = (zt == float("-inf")) & (z > float("-inf"))
                support_gap = tl.maximum(support_gap, tl.max(tl.where(gap_hit, 1.0, 0.0), axis=1))
            d_t = alpha_t * d_t + tl.sum(et, axis=1)
            m_t = mt_new
        # alpha * d keeps a NaN d NaN (0 * NaN), so a NaN logit never disappears from its row
        d_s = alpha_s * d_s + tl.sum(e, axis=1)
        m_s = ms_new

    # combine the tile rows once per token row
    ms_row = tl.max(m_s, axis=0)
    delta_s, alpha_s = _rescale(m_s, ms_row, k_scale)
    ds_row = tl.sum(alpha_s * d_s, axis=0)
    l2d_s = tl.log2(ds_row)
    entropy = 0.0
    if ENTROPY:
        entropy = LN2 * (l2d_s - tl.sum(_entropy_sum(a_s, d_s, delta_s, alpha_s), axis=0) / ds_row)
    mt_row = 0.0
    l2d_t = 0.0
    div = 0.0
    if HAS_TEACHER_LOGITS:
        mt_row = tl.max(m_t, axis=0)
        delta_t, alpha_t = _rescale(m_t, mt_row, k_scale)
        dt_row = tl.sum(alpha_t * d_t, axis=0)
        l2d_t = tl.log2(dt_row)
        if DISTILL == 2:    # KL(q||p) = ln2 [sum q (x_t - x_s) - log2 d_t + log2 d_s]
            div = LN2 * (tl.sum(_cross_sum(b, d_t, alpha_t, delta_t, delta_s), axis=0) / dt_row - l2d_t + l2d_s)
        if DISTILL == 3:    # KL(p||q) = ln2 [sum p (x_s - x_t) - log2 d_s + log2 d_t]
            div = LN2 * (tl.sum(_cross_sum(b, d_s, alpha_s, delta_s, delta_t), axis=0) / ds_row - l2d_s + l2d_t)
        if DISTILL == 2 or DISTILL == 3:
            div = tl.where(tl.max(support_gap, axis=0) > 0, float("inf"), div)
    return ms_row, l2d_s, entropy, mt_row, l2d_t, div


@triton.jit
def _log2_mixture(lp2, lq2, log2_b, log2_1mb):
    """log2 M = log2(b q + (1 - b) p) from log2 p and log2 q, in log space: a p that underflows (or a q
    of exactly 0) must not round M to 0. NaN only where p = q = 0, whose terms every caller drops."""
    u = lq2 + log2_b
    v = lp2 + log2_1mb
    hi = tl.maximum(u, v)
    return hi + tl.log2(1.0 + tl.exp2(tl.minimum(u, v) - hi))


@triton.jit
def jsd_statistics(logits_row, teacher_row, V, k_scale, m_s, l2d_s, m_t, l2d_t, log2_b, log2_1mb,
                   BLOCK_R: tl.constexpr, VEC: tl.constexpr):
    """Pass 1b (jsd only): KL(p||M) and KL(q||M) in base 2, once both normalizers are known."""
    tile = _tile_offsets(BLOCK_R, VEC)
    BLOCK: tl.constexpr = BLOCK_R * VEC
    kp = tl.zeros([BLOCK_R], tl.float32)
    kq = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tile
        in_v = offs < V
        z = tl.load(logits_row + offs, mask=in_v, other=float("-inf")).to(tl.float32)
        zt = tl.load(teacher_row + offs, mask=in_v, other=float("-inf")).to(tl.float32)
        lp2 = (z - m_s) * k_scale - l2d_s
        lq2 = (zt - m_t) * k_scale - l2d_t
        lm2 = _log2_mixture(lp2, lq2, log2_b, log2_1mb)
        p = tl.exp2(lp2)
        q = tl.exp2(lq2)
        kp += tl.sum(tl.where(p > 0, p * (lp2 - lm2), 0.0), axis=1)
        kq += tl.sum(tl.where(q > 0, q * (lq2 - lm2), 0.0), axis=1)
    return tl.sum(kp, axis=0), tl.sum(kq, axis=0)


@triton.jit
def gradient_row(grad_row, logits_row, teacher_row, V, y, k_scale, inv_tau,
                 m_s, l2d_s, entropy, m_t, l2d_t, div, kp, c, ent_w, div_w, jsd_beta, log2_b, log2_1mb,
                 BLOCK_R: tl.constexpr, VEC: tl.constexpr, HAS_ENTROPY: tl.constexpr, DISTILL: tl.constexpr):
    """Pass 2: write (1/tau) [c (1{v=y} - p) + ent_w p (ln p + H) + div_w d(div)/ds] over the row.

    c, ent_w and div_w are per-row scalars (README.md, "Gradient"); y is the int32 label.
    """
    tile = _tile_offsets(BLOCK_R, VEC)
    BLOCK: tl.constexpr = BLOCK_R * VEC
    div = tl.where(div < float("inf"), div, 0.0)   # an infinite rkl comes with div_w = 0: keep 0 * finite
    for start in range(0, V, BLOCK):
        offs = start + tile
        in_v = offs < V
        z = tl.load(logits_row + offs, mask=in_v, other=float("-inf")).to(tl.float32)
        lp2 = (z - m_s) * k_scale - l2d_s
        p = tl.exp2(lp2)
        g = -c * p
        if HAS_ENTROPY:    # d(-H)/ds = p (log p + H)
            g += ent_w * p * (LN2 * tl.maximum(lp2, NEG_BIG) + entropy)
        if DISTILL >= 2:
            zt = tl.load(teacher_row + offs, mask=in_v, other=float("-inf")).to(tl.float32)
            lq2 = (zt - m_t) * k_scale - l2d_t
            if DISTILL == 2:    # fkl: p - q
                g += div_w * (p - tl.exp2(lq2))
            elif DISTILL == 3:  # rkl: p (log p - log q - rkl); div_w is 0 where rkl is infinite
                g += div_w * p * (LN2 * (tl.maximum(lp2, NEG_BIG) - tl.maximum(lq2, NEG_BIG)) - div)
            else:               # jsd: (1 - b) p (log p - log M - KL(p||M))
                lm2 = _log2_mixture(lp2, lq2, log2_b, log2_1mb)
                g += div_w * (1.0 - jsd_beta) * p * LN2 * (
                    tl.maximum(lp2, NEG_BIG) - tl.maximum(lm2, NEG_BIG) - kp)
        g = tl.where(offs == y, g + c, g) * inv_tau
        tl.store(grad_row + offs, g.to(grad_row.dtype.element_ty), mask=in_v)


@triton.jit
def zero_row(grad_row, V, BLOCK_R: tl.constexpr, VEC: tl.constexpr):
    """Exact zeros over a masked row's gradient, whatever its logits hold."""
    tile = _tile_offsets(BLOCK_R, VEC)
    zeros = tl.zeros([BLOCK_R, VEC], dtype=grad_row.dtype.element_ty)
    for start in range(0, V, BLOCK_R * VEC):
        offs = start + tile
        tl.store(grad_row + offs, zeros, mask=offs < V)


@triton.jit
def _token_terms(logp, logp_t, row, adv_ptr, old_ptr, ref_ptr, div, gate_beta, distill_coef, clip_low, clip_high,
                 clip_c, kl_coef, HAS_TEACHER: tl.constexpr, DISTILL: tl.constexpr, HAS_ADV: tl.constexpr,
                 HAS_OLD: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, HAS_KL: tl.constexpr):
    """Per-token terms (README.md, "Per-token terms") of one row, from its log-probs and divergence.

    Returns (gap, gate, distill, pg, clipped, clipped_lower, ppo_kl, kl, dl/dlog p_S(y), div_scale) where
    div_scale multiplies distill_coef * w_t in the divergence's gradient (the gate, or 0 where the
    gated divergence is taken as its limit 0 or is infinite)."""
    dl_dlogp = 0.0
    gap = 0.0
    gate = 0.0
    distill = 0.0
    div_scale = 0.0
    if HAS_TEACHER:
        gap = logp_t - logp
        # gate_beta = 0 is the ungated baseline: 0.5 everywhere, also where gap is infinite (never 0 * inf)
        gate = tl.sigmoid(tl.where(gate_beta != 0, gate_beta * gap, 0.0))
        # A gate below the smallest normal fp32 is taken as 0 (the teacher gives y zero probability, or the
        # sigmoid underflows: whether it returns a subnormal or 0 depends on the device), and the gated term
        # as its limit 0 there, never 0 * inf (README.md, "Limits"). A NaN gate stays NaN.
        live = ~(gate < GATE_FLOOR)
        if DISTILL == 0:        # sampled: D = gate * (logp_T - logp_S)
            distill = tl.where(live, gate * gap, 0.0)
            dl_dlogp -= distill_coef * gate
        elif DISTILL == 1:      # reinforce: D = gate * sg(logp_S - logp_T) * logp_S
            distill = tl.where(live, -gate * gap * logp, 0.0)
            dl_dlogp -= distill_coef * tl.where(live, gate * gap, 0.0)
        else:                   # full-vocabulary divergence, gated; +inf stays +inf (README.md, "Limits")
            distill = tl.where(live, gate * div, 0.0)
            div_scale = tl.where(live, gate, 0.0)
            if DISTILL == 3:    # an infinite rkl has no finite gradient: none is taken (fkl's p - q is finite)
                div_scale = tl.where(div < float("inf"), div_scale, 0.0)

    pg = 0.0
    clipped = 0.0
    clipped_lower = 0.0
    ppo_kl = 0.0
    if HAS_ADV:
        adv = tl.load(adv_ptr + row)
        log_ratio = 0.0
        if HAS_OLD:
            log_ratio = logp - tl.load(old_ptr + row)
        lr = tl.minimum(tl.maximum(log_ratio, -20.0), 20.0)   # verl's clamp before exp
        ratio = tl.exp(lr)
        pg1 = -adv * ratio
        pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        pg = tl.maximum(pg1, pg2)
        flows = (pg1 >= pg2) & (tl.abs(log_ratio) <= 20.0)   # the gradient goes through pg1
        if HAS_DUAL_CLIP:
            pg3 = -adv * clip_c
            dual = (adv < 0) & (pg3 < pg)
            pg = tl.where(dual, pg3, pg)
            flows = flows & (dual == 0)
            clipped_lower = tl.where(dual, 1.0, 0.0)
        dl_dlogp += tl.where(flows, pg1, 0.0)
        clipped = tl.where(pg2 > pg1, 1.0, 0.0)
        ppo_kl = -lr

    kl = 0.0
    if HAS_KL:
        dref = tl.load(ref_ptr + row) - logp
        # Beyond dref = 20 k3 is far above the clamp (10), and exp(dref) would overflow (inf - inf = NaN
        # at dref = +inf): take the clamped value and its zero slope directly (README.md, "Limits").
        big = dref > 20.0
        e_ref = tl.exp(tl.minimum(dref, 20.0))
        k3 = e_ref - dref - 1.0
        kl = tl.where(big, 10.0, tl.minimum(tl.maximum(k3, -10.0), 10.0))
        dl_dlogp += kl_coef * tl.where(big | (tl.abs(k3) > 10.0), 0.0, 1.0 - e_ref)
    return gap, gate, distill, pg, clipped, clipped_lower, ppo_kl, kl, dl_dlogp, div_scale


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
def _row_pointer(ptr, row, seq_len, stride_b, stride_t):
    """Row `row` of a [B, T, V] (or [N, V], seq_len = N) tensor: (row // T) * stride_b + (row % T) * stride_t,
    so [B, T, V] tensors sliced along T (logits[:, :-1]) are read in place."""
    outer = row // seq_len
    return ptr + outer * stride_b + (row - outer * seq_len) * stride_t


@triton.jit
def sdar_rows_kernel(
    # outputs
    grad_ptr, out_ptr, stats_ptr,
    # inputs
    logits_ptr, teacher_ptr, labels_ptr, mask_ptr, weights_ptr,
    teacher_logp_ptr, adv_ptr, old_ptr, ref_ptr,
    # strides (elements) and sizes (see _row_pointer)
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
    """Forward: per-token outputs, optionally the gradient (fused schedule) or the row statistics."""
    row = tl.program_id(0).to(tl.int64)   # int64 before any pointer arithmetic: N * V passes 2^31
    keep = tl.load(mask_ptr + row) != 0
    logits_row = _row_pointer(logits_ptr, row, seq_len, stride_logits_b, stride_logits_t)
    teacher_row = _row_pointer(teacher_ptr, row, seq_len, stride_teacher_b, stride_teacher_t)
    grad_row = _row_pointer(grad_ptr, row, seq_len, stride_grad_b, stride_grad_t)

    if keep:
        w = tl.load(weights_ptr + row)
        y = tl.load(labels_ptr + row)
        y_ok = (y >= 0) & (y < V)
        y = tl.where(y_ok, y, 0).to(tl.int32)   # int32 inside the row: offsets and compares are 32-bit
        # Out-of-range labels are rejected on the host where that is free (CPU tensors); on CUDA a bad
        # label poisons its row with NaN instead of reading out of bounds (README.md, "Validation").
        z_y = tl.where(y_ok, tl.load(logits_row + y).to(tl.float32), float("nan"))

        # ---------------- pass 1: row statistics ----------------
        m_s, l2d_s, entropy, m_t, l2d_t, div = row_statistics(
            logits_row, teacher_row, V, k_scale, BLOCK_R, VEC, HAS_TEACHER_LOGITS, True, DISTILL)
        kp = 0.0
        if DISTILL == 4:
            kp, kq = jsd_statistics(logits_row, teacher_row, V, k_scale, m_s, l2d_s, m_t, l2d_t,
                                    log2_b, log2_1mb, BLOCK_R, VEC)
            div = LN2 * (jsd_beta * kq + (1.0 - jsd_beta) * kp)
        # a NaN / +inf logit, or a row of -inf only, leaves a normaliser that is not a positive number
        nonfinite = ~((l2d_s > float("-inf")) & (l2d_s < float("inf")))
        if HAS_TEACHER_LOGITS:
            nonfinite = nonfinite | ~((l2d_t > float("-inf")) & (l2d_t < float("inf")))

        # ---------------- per-token terms ----------------
        logp = (z_y - m_s) * inv_tau - LN2 * l2d_s
        logp_t = 0.0
        if HAS_TEACHER_LOGITS:
            zt_y = tl.load(teacher_row + y).to(tl.float32)
            logp_t = (zt_y - m_t) * inv_tau - LN2 * l2d_t
        if HAS_TEACHER_LOGPROBS:
            logp_t = tl.load(teacher_logp_ptr + row)
        gap, gate, distill, pg, clipped, clipped_lower, ppo_kl, kl, dl_dlogp, div_scale = _token_terms(
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
        if STORE_STATS:
            _store_stats(stats_ptr + row * _NUM_STATS, m_s, l2d_s, entropy, m_t, l2d_t, div, kp, dl_dlogp, div_scale)

        # ---------------- pass 2: gradient ----------------
        if WRITE_GRAD:
            gradient_row(grad_row, logits_row, teacher_row, V, y, k_scale, inv_tau,
                         m_s, l2d_s, entropy, m_t, l2d_t, div, kp,
                         w * dl_dlogp, w * entropy_coef, w * distill_coef * div_scale, jsd_beta, log2_b, log2_1mb,
                         BLOCK_R, VEC, HAS_ENTROPY, DISTILL)
    else:
        # masked row: exact zeros, whatever the logits hold (they may be inf/NaN)
        for f in tl.static_range(_NUM_FIELDS):
            tl.store(out_ptr + f * N + row, 0.0)
        if WRITE_GRAD:
            zero_row(grad_row, V, BLOCK_R, VEC)


@triton.jit
def sdar_grad_kernel(
    grad_ptr, logits_ptr, teacher_ptr, labels_ptr, mask_ptr, weights_ptr, stats_ptr,
    stride_logits_b, stride_logits_t, stride_teacher_b, stride_teacher_t, stride_grad_b, stride_grad_t,
    seq_len, V,
    k_scale, inv_tau, distill_coef, jsd_beta, log2_b, log2_1mb, entropy_coef,
    BLOCK_R: tl.constexpr, VEC: tl.constexpr, HAS_ENTROPY: tl.constexpr, DISTILL: tl.constexpr,
):
    """Backward of the two-phase schedule: one gradient pass from the statistics the forward stored,
    with per-token weights w_t that arrive only now (the upstream gradient)."""
    row = tl.program_id(0).to(tl.int64)
    keep = tl.load(mask_ptr + row) != 0
    logits_row = _row_pointer(logits_ptr, row, seq_len, stride_logits_b, stride_logits_t)
    teacher_row = _row_pointer(teacher_ptr, row, seq_len, stride_teacher_b, stride_teacher_t)
    grad_row = _row_pointer(grad_ptr, row, seq_len, stride_grad_b, stride_grad_t)
    if keep:
        w = tl.load(weights_ptr + row)
        y = tl.load(labels_ptr + row)
        y = tl.where((y >= 0) & (y < V), y, 0).to(tl.int32)
        st = stats_ptr + row * _NUM_STATS
        gradient_row(grad_row, logits_row, teacher_row, V, y, k_scale, inv_tau,
                     tl.load(st + 0), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3), tl.load(st + 4),
                     tl.load(st + 5), tl.load(st + 6),
                     w * tl.load(st + 7), w * entropy_coef, w * distill_coef * tl.load(st + 8),
                     jsd_beta, log2_b, log2_1mb, BLOCK_R, VEC, HAS_ENTROPY, DISTILL)
    else:
        zero_row(grad_row, V, BLOCK_R, VEC)


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
