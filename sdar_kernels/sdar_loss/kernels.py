"""Triton kernel of the fused SDAR loss: one program per token row, two passes over the vocabulary.

Math and derivations: README.md in this folder (section names below refer to it).

Pass 1 streams the student row (and the teacher row) once and keeps, in fp32, the online
log-sum-exp state of both plus the extra row sums the loss needs (entropy, and the forward/reverse KL
row sums). After it every per-token scalar is known: log p_S(y), log p_T(y), the gate, the GRPO and k3
terms, and c_t = w_t * dl_t/dlog p_S(y). Pass 2 streams the rows again and writes the gradient
w_t * dl_t/dz_S. Nothing of size [N, V] is allocated; the gradient may alias the logits (each block is
read before it is written, and only by this program).

Exponentials are base 2: k = log2(e) / temperature folds the log2(e) into the temperature, so each is
one exp2 of (z - max) * k. The running max is kept in raw logit units and subtracted *before* the
scaling: z - max is exact for nearby values, so confident rows (logits ~ 40) keep fp32 log-probs
(scaling first costs ~1e-5 absolute at |u| ~ 200). Log-probs in nats: (z - max) / tau - ln2 * log2(d).
The generalized JSD is the one divergence whose row sums need both normalizers first, so it adds a
statistics pass (pass 1b) between the two: three reads instead of two (README.md, "Why JSD reads 3x").
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
# Finite stand-in for -inf: the running max starts here so (m_old - m_new) * d_old is never -inf * 0,
# and log-probs of zero-probability entries are floored here so p * log p is 0 * finite = 0.
NEG_BIG = tl.constexpr(-1.0e30)

# Per-token output rows of `out` ([NUM_FIELDS, N] fp32), in the order of torch_impl.PER_TOKEN_FIELDS.
NUM_FIELDS = 10
# Per-row statistics kept for the reduction="none" backward ([N, NUM_STATS] fp32):
# max_s, log2(d_s), entropy, max_t, log2(d_t), divergence, KL(p||M) (jsd).
NUM_STATS = 7
_STATS_STRIDE = tl.constexpr(7)
# DISTILL constexpr values; full-vocabulary divergences are >= 2 (jsd with beta 0/1 arrives as fkl/rkl).
DISTILL_CODES = {"sampled": 0, "reinforce": 1, "fkl": 2, "rkl": 3, "jsd": 4}


@triton.jit
def _row_stats(logits_row, teacher_row, V, k_scale,
               BLOCK_V: tl.constexpr, HAS_TEACHER_LOGITS: tl.constexpr, DISTILL: tl.constexpr):
    """Pass 1: online log-sum-exp of student and teacher, entropy and the KL row sums.

    Returns (max_s, log2 d_s, entropy [nats], max_t, log2 d_t, div [nats]) with lse = max/tau + ln d;
    div is fkl or rkl for DISTILL 2 / 3, else 0.
    """
    cols = tl.arange(0, BLOCK_V)
    m_s = NEG_BIG    # running max, raw logit units
    d_s = 0.0        # sum 2^((z - m_s) k)
    a_s = 0.0        # sum 2^x * x, x = (z - m_s) k: entropy without the lse - E[s] cancellation
    m_t = NEG_BIG
    d_t = 0.0
    b_div = 0.0      # fkl: sum 2^x_t * (z_t - z) k;  rkl: sum 2^x * (z - z_t) k
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_v = offs < V
        # other=-inf gives 2^x = 0, the identity of every sum below (guarded products: 0 * inf)
        z = tl.load(logits_row + offs, mask=in_v, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_s, tl.max(z, axis=0))
        alpha = tl.exp2((m_s - m_new) * k_scale)
        x = (z - m_new) * k_scale
        e = tl.exp2(x)
        a_s = alpha * (a_s + (m_s - m_new) * k_scale * d_s) + tl.sum(tl.where(e > 0, e * x, 0.0), axis=0)
        d_s = alpha * d_s + tl.sum(e, axis=0)
        m_s = m_new
        if HAS_TEACHER_LOGITS:
            zt = tl.load(teacher_row + offs, mask=in_v, other=float("-inf")).to(tl.float32)
            mt_new = tl.maximum(m_t, tl.max(zt, axis=0))
            alpha_t = tl.exp2((m_t - mt_new) * k_scale)
            e_t = tl.exp2((zt - mt_new) * k_scale)
            d_t = alpha_t * d_t + tl.sum(e_t, axis=0)
            m_t = mt_new
            if DISTILL == 2:
                b_div = alpha_t * b_div + tl.sum(tl.where(e_t > 0, e_t * (zt - z) * k_scale, 0.0), axis=0)
            if DISTILL == 3:
                b_div = alpha * b_div + tl.sum(tl.where(e > 0, e * (z - zt) * k_scale, 0.0), axis=0)
    l2d_s = tl.log2(d_s)
    entropy = LN2 * (l2d_s - a_s / d_s)
    l2d_t = 0.0
    div = 0.0
    if HAS_TEACHER_LOGITS:
        l2d_t = tl.log2(d_t)
        lse2_diff = (m_s - m_t) * k_scale + l2d_s - l2d_t   # (lse_S - lse_T) / ln 2
        if DISTILL == 2:
            div = LN2 * (b_div / d_t + lse2_diff)
        if DISTILL == 3:
            div = LN2 * (b_div / d_s - lse2_diff)
    return m_s, l2d_s, entropy, m_t, l2d_t, div


@triton.jit
def _jsd_stats(logits_row, teacher_row, V, k_scale, m_s, l2d_s, m_t, l2d_t, jsd_beta, BLOCK_V: tl.constexpr):
    """Pass 1b (jsd only): KL(p||M) and KL(q||M) in base 2, M = beta q + (1 - beta) p."""
    cols = tl.arange(0, BLOCK_V)
    kp = 0.0
    kq = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        in_v = offs < V
        z = tl.load(logits_row + offs, mask=in_v, other=float("-inf")).to(tl.float32)
        zt = tl.load(teacher_row + offs, mask=in_v, other=float("-inf")).to(tl.float32)
        lp2 = (z - m_s) * k_scale - l2d_s
        lq2 = (zt - m_t) * k_scale - l2d_t
        p = tl.exp2(lp2)
        q = tl.exp2(lq2)
        lm2 = tl.log2(jsd_beta * q + (1.0 - jsd_beta) * p)
        kp += tl.sum(tl.where(p > 0, p * (lp2 - lm2), 0.0), axis=0)
        kq += tl.sum(tl.where(q > 0, q * (lq2 - lm2), 0.0), axis=0)
    return kp, kq


@triton.jit
def sdar_rows_kernel(
    # outputs
    grad_ptr, out_ptr, stats_ptr,
    # inputs
    logits_ptr, teacher_ptr, labels_ptr, mask_ptr, weights_ptr,
    teacher_logp_ptr, adv_ptr, old_ptr, ref_ptr,
    # strides (elements) and sizes; token row r lives at (r // seq_len) * stride_*_b + (r % seq_len) * stride_*_t,
    # so [B, T, V] tensors sliced along T (logits[:, :-1]) are read in place ([N, V]: seq_len = N)
    stride_logits_b, stride_logits_t, stride_teacher_b, stride_teacher_t, stride_grad_b, stride_grad_t,
    seq_len, N, V,
    # runtime scalars
    k_scale, inv_tau, gate_beta, distill_coef, jsd_beta, clip_low, clip_high, clip_c, kl_coef, entropy_coef,
    # compile-time switches
    BLOCK_V: tl.constexpr,
    HAS_TEACHER_LOGITS: tl.constexpr, HAS_TEACHER_LOGPROBS: tl.constexpr, DISTILL: tl.constexpr,
    HAS_ADV: tl.constexpr, HAS_OLD: tl.constexpr, HAS_DUAL_CLIP: tl.constexpr, HAS_KL: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    COMPUTE_STATS: tl.constexpr,   # False: use the stats the forward saved (reduction="none" backward)
    STORE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr, WRITE_OUTPUTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)   # int64 before any pointer arithmetic: N * V passes 2^31
    cols = tl.arange(0, BLOCK_V)
    keep = tl.load(mask_ptr + row) != 0
    outer = row // seq_len
    inner = row - outer * seq_len
    logits_row = logits_ptr + outer * stride_logits_b + inner * stride_logits_t
    teacher_row = teacher_ptr + outer * stride_teacher_b + inner * stride_teacher_t
    grad_row = grad_ptr + outer * stride_grad_b + inner * stride_grad_t

    if keep:
        w = tl.load(weights_ptr + row)
        y = tl.load(labels_ptr + row)
        y_ok = (y >= 0) & (y < V)
        y_safe = tl.where(y_ok, y, 0)
        # Out-of-range labels are rejected on the host where that is free (CPU tensors); on CUDA a bad
        # label poisons its row with NaN instead of reading out of bounds (README.md, "Validation").
        z_y = tl.load(logits_row + y_safe).to(tl.float32)
        z_y = tl.where(y_ok, z_y, float("nan"))

        # ---------------- row statistics ----------------
        if COMPUTE_STATS:
            m_s, l2d_s, entropy, m_t, l2d_t, div = _row_stats(logits_row, teacher_row, V, k_scale,
                                                              BLOCK_V, HAS_TEACHER_LOGITS, DISTILL)
            kp = 0.0
            if DISTILL == 4:
                kp, kq = _jsd_stats(logits_row, teacher_row, V, k_scale, m_s, l2d_s, m_t, l2d_t, jsd_beta,
                                    BLOCK_V)
                div = LN2 * (jsd_beta * kq + (1.0 - jsd_beta) * kp)
            if STORE_STATS:
                stats_row = stats_ptr + row * _STATS_STRIDE
                tl.store(stats_row + 0, m_s)
                tl.store(stats_row + 1, l2d_s)
                tl.store(stats_row + 2, entropy)
                tl.store(stats_row + 3, m_t)
                tl.store(stats_row + 4, l2d_t)
                tl.store(stats_row + 5, div)
                tl.store(stats_row + 6, kp)
        else:
            stats_row = stats_ptr + row * _STATS_STRIDE
            m_s = tl.load(stats_row + 0)
            l2d_s = tl.load(stats_row + 1)
            entropy = tl.load(stats_row + 2)
            m_t = tl.load(stats_row + 3)
            l2d_t = tl.load(stats_row + 4)
            div = tl.load(stats_row + 5)
            kp = tl.load(stats_row + 6)

        # ---------------- per-token terms (README.md "Per-token terms") ----------------
        logp = (z_y - m_s) * inv_tau - LN2 * l2d_s
        dl_dlogp = 0.0
        gap = 0.0
        gate = 0.0
        distill = 0.0
        if HAS_TEACHER_LOGITS or HAS_TEACHER_LOGPROBS:
            if HAS_TEACHER_LOGITS:
                zt_y = tl.load(teacher_row + y_safe).to(tl.float32)
                logp_t = (zt_y - m_t) * inv_tau - LN2 * l2d_t
            else:
                logp_t = tl.load(teacher_logp_ptr + row)
            gap = logp_t - logp
            gate = tl.sigmoid(gate_beta * gap)
            if DISTILL == 0:        # sampled: D = gate * (logp_T - logp_S)
                distill = gate * gap
                dl_dlogp -= distill_coef * gate
            elif DISTILL == 1:      # reinforce: D = gate * sg(logp_S - logp_T) * logp_S
                distill = -gate * gap * logp
                dl_dlogp -= distill_coef * gate * gap
            else:                   # full-vocabulary divergence, gated
                distill = gate * div

        pg = 0.0
        clipped = 0.0
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
            dl_dlogp += tl.where(flows, pg1, 0.0)
            clipped = tl.where(pg2 > pg1, 1.0, 0.0)
            ppo_kl = -lr

        kl = 0.0
        if HAS_KL:
            dref = tl.load(ref_ptr + row) - logp
            k3 = tl.exp(dref) - dref - 1.0
            kl = tl.minimum(tl.maximum(k3, -10.0), 10.0)
            dl_dlogp += kl_coef * tl.where(tl.abs(k3) <= 10.0, 1.0 - tl.exp(dref), 0.0)

        if WRITE_OUTPUTS:
            loss = pg + kl_coef * kl - entropy_coef * entropy + distill_coef * distill
            tl.store(out_ptr + 0 * N + row, loss)
            tl.store(out_ptr + 1 * N + row, logp)
            tl.store(out_ptr + 2 * N + row, entropy)
            tl.store(out_ptr + 3 * N + row, gate)
            tl.store(out_ptr + 4 * N + row, gap)
            tl.store(out_ptr + 5 * N + row, distill)
            tl.store(out_ptr + 6 * N + row, pg)
            tl.store(out_ptr + 7 * N + row, clipped)
            tl.store(out_ptr + 8 * N + row, ppo_kl)
            tl.store(out_ptr + 9 * N + row, kl)

        # ---------------- pass 2: gradient (README.md "Gradient") ----------------
        if WRITE_GRAD:
            c = w * dl_dlogp
            ent_w = w * entropy_coef
            div_w = w * distill_coef * gate
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                in_v = offs < V
                z = tl.load(logits_row + offs, mask=in_v, other=float("-inf")).to(tl.float32)
                lp2 = (z - m_s) * k_scale - l2d_s
                p = tl.exp2(lp2)
                g = -c * p
                if HAS_ENTROPY:    # d(-H)/ds = p * (log p + H)
                    g += ent_w * p * (LN2 * tl.maximum(lp2, NEG_BIG) + entropy)
                if DISTILL >= 2:
                    zt = tl.load(teacher_row + offs, mask=in_v, other=float("-inf")).to(tl.float32)
                    lq2 = (zt - m_t) * k_scale - l2d_t
                    q = tl.exp2(lq2)
                    if DISTILL == 2:    # fkl: p - q
                        g += div_w * (p - q)
                    elif DISTILL == 3:  # rkl: p * (log p - log q - rkl)
                        g += div_w * p * (LN2 * (tl.maximum(lp2, NEG_BIG) - tl.maximum(lq2, NEG_BIG)) - div)
                    else:               # jsd: (1 - b) p * (log p - log M - KL(p||M))
                        lm2 = tl.log2(jsd_beta * q + (1.0 - jsd_beta) * p)
                        g += div_w * (1.0 - jsd_beta) * p * LN2 * (
                            tl.maximum(lp2, NEG_BIG) - tl.maximum(lm2, NEG_BIG) - kp)
                g = tl.where(offs == y, g + c, g) * inv_tau
                tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=in_v)
    else:
        # masked row: exact zeros, whatever the logits hold (they may be inf/NaN)
        if WRITE_OUTPUTS:
            for f in tl.static_range(10):
                tl.store(out_ptr + f * N + row, 0.0)
        if WRITE_GRAD:
            zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                tl.store(grad_row + offs, zeros, mask=offs < V)
