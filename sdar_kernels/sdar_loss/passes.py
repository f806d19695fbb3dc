"""The passes of the SDAR row kernels as ``@triton.jit`` helpers (kernels.py wires them into kernels).

Math and derivations: README.md in this folder (section names below refer to it).

Tiles are [BLOCK_R, VEC]: VEC is one 16-byte vector of logits, so each thread owns whole rows of the tile
and the running statistics are kept *per tile row* (per thread). The reductions along the vector axis stay
inside a thread; the tile rows are combined once per token row (`combine`), with the same formulas that
combine the vocabulary splits of a row (kernels.py, `finish_kernel`). A pass therefore has no block-wide
reduction, barrier or shuffle inside its loop (README.md, "Per-thread running statistics"). The next tile is
loaded before the current one is used, so each thread has a load in flight while it computes.

Exponentials are base 2: k = log2(e) / temperature, x = (z - m) * k, so each is one exp2. The running max m
is kept in raw logit units and subtracted *before* the scaling (exact for nearby values: confident rows
keep fp32 log-probs). Every rescale of a running sum by alpha = 2^((m_old - m_new) k) is guarded so that a
lane that has only seen -inf, or a max that jumps by more than fp32 can scale (a logit of 3e38), never
turns 0 * inf into NaN; a NaN or +inf logit still makes its row NaN, as it does in eager PyTorch.

Partial statistics of one stretch of a row (all relative to the stretch's maxima), in this order:
  m_s, d_s = sum 2^x_s, a_s = sum 2^x_s x_s (entropy), m_t, d_t = sum 2^x_t, b (fkl: sum 2^x_t (x_t - x_s);
  rkl: sum 2^x_s (x_s - x_t)), gap (1 where one side is finite and the other -inf).
"""

import triton
import triton.language as tl

from . import output
from .._math import LN2, NEG_BIG, entropy_sum_moved, log2_approx, rescale

# The smallest normal fp32: a gate below it counts as 0 on every device.
GATE_FLOOR = tl.constexpr(output.GATE_FLOOR)


@triton.jit
def tile_offsets(BLOCK_R: tl.constexpr, VEC: tl.constexpr):
    """[BLOCK_R, VEC] int32 offsets of one tile: row r holds VEC consecutive logits (one 16-byte vector)."""
    return tl.arange(0, BLOCK_R)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def row_pointer(ptr, row, seq_len, stride_b, stride_t):
    """Row `row` of a [B, T, V] (or [N, V], seq_len = N) tensor: (row // T) * stride_b + (row % T) * stride_t,
    so [B, T, V] tensors sliced along T (logits[:, :-1]) are read in place."""
    outer = row // seq_len
    return ptr + outer * stride_b + (row - outer * seq_len) * stride_t


@triton.jit
def _cross_sum(b, d_w, alpha_w, delta_w, delta_o):
    """A row sum b = sum 2^(x_w) (x_w - x_o) (fkl: w = teacher, o = student; rkl the other way round),
    both x relative to their own running max, moved to new maxima: each x shifts by its delta, each
    weight 2^(x_w) by alpha_w."""
    weight = alpha_w * d_w     # 0 where nothing has been seen (d_w = 0) or the old terms vanish (alpha_w = 0)
    return tl.where(weight > 0, alpha_w * b + weight * (delta_w - delta_o), 0.0)


@triton.jit
def combine(m_s, d_s, a_s, m_t, d_t, b, gap, k_scale, HAS_TEACHER_LOGITS: tl.constexpr, DISTILL: tl.constexpr):
    """Partial statistics of several stretches of one row (1-D vectors: tile rows, or vocabulary splits)
    combined into the row's (scalars), relative to the row maxima."""
    ms_row = tl.max(m_s, axis=0)
    delta_s, alpha_s = rescale(m_s, ms_row, k_scale)
    # alpha * d keeps a NaN d NaN (0 * NaN), so a NaN logit never disappears from its row
    ds_row = tl.sum(alpha_s * d_s, axis=0)
    as_row = tl.sum(entropy_sum_moved(a_s, d_s, delta_s, alpha_s), axis=0)
    mt_row = 0.0
    dt_row = 0.0
    b_row = 0.0
    gap_row = 0.0
    if HAS_TEACHER_LOGITS:
        mt_row = tl.max(m_t, axis=0)
        delta_t, alpha_t = rescale(m_t, mt_row, k_scale)
        dt_row = tl.sum(alpha_t * d_t, axis=0)
        if DISTILL == 2:
            b_row = tl.sum(_cross_sum(b, d_t, alpha_t, delta_t, delta_s), axis=0)
        if DISTILL == 3:
            b_row = tl.sum(_cross_sum(b, d_s, alpha_s, delta_s, delta_t), axis=0)
        gap_row = tl.max(gap, axis=0)
    return ms_row, ds_row, as_row, mt_row, dt_row, b_row, gap_row


@triton.jit
def stream_statistics(logits_row, teacher_row, V, k_scale,
                      BLOCK_R: tl.constexpr, VEC: tl.constexpr, HAS_TEACHER_LOGITS: tl.constexpr,
                      ENTROPY: tl.constexpr, DISTILL: tl.constexpr):
    """Pass 1 over logits [0, V) of a row (or of one stretch of it): the partial statistics (module
    docstring), combined across the tile rows once at the end."""
    tile = tile_offsets(BLOCK_R, VEC)
    BLOCK: tl.constexpr = BLOCK_R * VEC
    m_s = tl.full([BLOCK_R], NEG_BIG, tl.float32)
    d_s = tl.zeros([BLOCK_R], tl.float32)
    a_s = tl.zeros([BLOCK_R], tl.float32)
    m_t = tl.full([BLOCK_R], NEG_BIG, tl.float32)
    d_t = tl.zeros([BLOCK_R], tl.float32)
    b = tl.zeros([BLOCK_R], tl.float32)
    # 1 where one side has a finite logit and the other -inf: the divergence is +inf, even where the
    # finite side's probability underflows to 0 and adds nothing to b
    gap = tl.zeros([BLOCK_R], tl.float32)
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
        delta_s, alpha_s = rescale(m_s, ms_new, k_scale)
        x = (z - ms_new[:, None]) * k_scale
        e = tl.exp2(x)
        if ENTROPY:
            # max(x, NEG_BIG): 2^x x -> 0 * NEG_BIG = 0 at -inf logits; a NaN x still reaches the sum via e
            a_s = entropy_sum_moved(a_s, d_s, delta_s, alpha_s) + tl.sum(e * tl.maximum(x, NEG_BIG), axis=1)
        if HAS_TEACHER_LOGITS:
            mt_new = tl.maximum(m_t, tl.max(zt, axis=1))
            delta_t, alpha_t = rescale(m_t, mt_new, k_scale)
            xt = (zt - mt_new[:, None]) * k_scale
            et = tl.exp2(xt)
            if DISTILL == 2:    # fkl: sum q-weights (x_t - x_s)
                b = _cross_sum(b, d_t, alpha_t, delta_t, delta_s) + \
                    tl.sum(tl.where(et > 0, et * (xt - x), 0.0), axis=1)
                hit = (z == float("-inf")) & (zt > float("-inf"))
                gap = tl.maximum(gap, tl.max(tl.where(hit, 1.0, 0.0), axis=1))
            if DISTILL == 3:    # rkl: sum p-weights (x_s - x_t)
                b = _cross_sum(b, d_s, alpha_s, delta_s, delta_t) + \
                    tl.sum(tl.where(e > 0, e * (x - xt), 0.0), axis=1)
                hit = (zt == float("-inf")) & (z > float("-inf"))
                gap = tl.maximum(gap, tl.max(tl.where(hit, 1.0, 0.0), axis=1))
            d_t = alpha_t * d_t + tl.sum(et, axis=1)
            m_t = mt_new
        d_s = alpha_s * d_s + tl.sum(e, axis=1)
        m_s = ms_new
    return combine(m_s, d_s, a_s, m_t, d_t, b, gap, k_scale, HAS_TEACHER_LOGITS, DISTILL)


@triton.jit
def finish_statistics(m_s, d_s, a_s, m_t, d_t, b, gap, HAS_TEACHER_LOGITS: tl.constexpr, DISTILL: tl.constexpr):
    """A whole row's partial statistics -> (m_s, log2 d_s, entropy [nats], m_t, log2 d_t, div [nats]) with
    lse = m / tau + ln d; div is KL(q||p) for DISTILL 2, KL(p||q) for DISTILL 3 (+inf on a support gap),
    else 0."""
    l2d_s = tl.log2(d_s)
    entropy = LN2 * (l2d_s - a_s / d_s)
    l2d_t = 0.0
    div = 0.0
    if HAS_TEACHER_LOGITS:
        l2d_t = tl.log2(d_t)
        if DISTILL == 2:    # KL(q||p) = ln2 [sum q (x_t - x_s) - log2 d_t + log2 d_s]
            div = LN2 * (b / d_t - l2d_t + l2d_s)
        if DISTILL == 3:    # KL(p||q) = ln2 [sum p (x_s - x_t) - log2 d_s + log2 d_t]
            div = LN2 * (b / d_s - l2d_s + l2d_t)
        if DISTILL == 2 or DISTILL == 3:
            div = tl.where(gap > 0, float("inf"), div)
    return m_s, l2d_s, entropy, m_t, l2d_t, div


@triton.jit
def _log2_mixture(lp2, lq2, log2_b, log2_1mb):
    """log2 M = log2(b q + (1 - b) p) from log2 p and log2 q, in log space: a p that underflows (or a q
    of exactly 0) must not round M to 0. NaN only where p = q = 0, whose terms every caller drops."""
    u = lq2 + log2_b
    v = lp2 + log2_1mb
    hi = tl.maximum(u, v)
    # the argument is in [1, 2]: the hardware log2 is accurate there (_math.log2_approx)
    return hi + log2_approx(1.0 + tl.exp2(tl.minimum(u, v) - hi))


@triton.jit
def jsd_statistics(logits_row, teacher_row, V, k_scale, m_s, l2d_s, m_t, l2d_t, log2_b, log2_1mb,
                   BLOCK_R: tl.constexpr, VEC: tl.constexpr):
    """Pass 1b (jsd only): KL(p||M) and KL(q||M) in base 2 over [0, V), once both normalizers are known."""
    tile = tile_offsets(BLOCK_R, VEC)
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
    """Pass 2 over [0, V): write (1/tau) [c (1{v=y} - p) + ent_w p (ln p + H) + div_w d(div)/ds].

    c, ent_w and div_w are per-row scalars (README.md, "Gradient"); y is the int32 label relative to the
    stretch (out of [0, V) when the label is elsewhere in the row).
    """
    tile = tile_offsets(BLOCK_R, VEC)
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
    tile = tile_offsets(BLOCK_R, VEC)
    zeros = tl.zeros([BLOCK_R, VEC], dtype=grad_row.dtype.element_ty)
    for start in range(0, V, BLOCK_R * VEC):
        offs = start + tile
        tl.store(grad_row + offs, zeros, mask=offs < V)


@triton.jit
def token_terms(logp, logp_t, row, adv_ptr, old_ptr, ref_ptr, div, gate_beta, distill_coef, clip_low, clip_high,
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
