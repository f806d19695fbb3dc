"""Triton kernels of the logits-free token log-probs: hidden states + lm_head in, per-row log-sum-exp, the
log-prob of a label and (optionally) the entropy out, with the logits living only in registers.

For hidden h [N, H], weight W [V, H], optional bias b [V], labels y [N], mask [N] and temperature tau, the
logits are z = h W^T + b (fp32 accumulation), and per unmasked row

    lse = logsumexp(z / tau),   logp = z[y] / tau - lse,   entropy = lse - sum_v softmax(z / tau)_v z_v / tau

exactly as the SDAR row engine computes them from fp32 logits (sdar_loss/README.md; the state and its
update are in sdar_kernels/_math.py). Masked rows give 0 and their hidden rows are never read; a label
outside [0, V) on an unmasked row gives a NaN log-prob (no out-of-range read: the label's logit is picked
from the tile that holds it, never loaded by address); a NaN / inf hidden state makes only its own row NaN.

Schedule (csrc_notes/linear_logprobs.md): the grid is (row block, vocabulary split). A program owns
BLOCK_N rows and one contiguous slice of the vocabulary; per BLOCK_V-wide tile of that slice it runs the
matmul main loop over H (tensor-core tiles, fp32 accumulator [BLOCK_N, BLOCK_V]) and folds the finished
tile into the rows' running statistics; no logit is ever written to memory. Each program writes its
slice's partial statistics [NUM_PARTIALS, S, N] (O(N S) floats); `combine_kernel` merges the S partials
of each row. Programs are numbered so that the ones resident at the same time cover a few row blocks
(GROUP_R) and many splits: their hidden blocks stay in L2 while the weight streams, and each weight tile
is read from HBM once per group of GROUP_R row blocks rather than once per row block.
"""

import triton
import triton.language as tl

from .._math import LN2, NEG_BIG, entropy_sum_moved, mma, online_lse_update, rescale

# Partial statistics per (split, row): running max (raw units), sum 2^x, sum 2^x x, the label's logit
# (0 in every split but the one that holds the label).
NUM_PARTIALS = 4
_P_MAX = tl.constexpr(0)
_P_SUM = tl.constexpr(1)
_P_ENT = tl.constexpr(2)
_P_LABEL = tl.constexpr(3)


@triton.jit
def _program_block(pid, num_row_blocks, num_splits, GROUP_R: tl.constexpr):
    """(row block, split) of program ``pid``: consecutive programs walk the splits of a group of GROUP_R
    row blocks (row block fastest), so programs resident together share hidden blocks and weight tiles."""
    per_group = GROUP_R * num_splits
    group = pid // per_group
    first = group * GROUP_R
    rows_in_group = tl.minimum(num_row_blocks - first, GROUP_R)
    local = pid - group * per_group
    return first + local % rows_in_group, local // rows_in_group


@triton.jit
def _logit_tile(h_ptrs, w_ptrs, in_rows, in_cols, H,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IN_FP32: tl.constexpr):
    """The matmul main loop: z [BLOCK_N, BLOCK_V] = h[rows] @ W[cols]^T, accumulated in fp32, no bias.

    h_ptrs [BLOCK_N, BLOCK_H] / w_ptrs [BLOCK_V, BLOCK_H]: the first H-slice of the rows / of the weight
    rows of the tile's columns. Rows outside ``in_rows`` and columns outside ``in_cols`` load 0."""
    ks = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        in_k = (k0 + ks) < H
        h = tl.load(h_ptrs, mask=in_rows[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=in_cols[:, None] & in_k[None, :], other=0.0)
        acc = mma(h, tl.trans(w), acc, IN_FP32)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    return acc


@triton.jit
def partials_kernel(
    # output: partial statistics [NUM_PARTIALS, num_splits, N] fp32
    part_ptr,
    # inputs
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, mask_ptr,
    # strides (elements; the H axis has unit stride) and sizes
    stride_hidden, stride_weight, N, V, H,
    # vocabulary split: tiles of BLOCK_V per split, number of splits
    tiles_per_split, num_splits,
    # runtime scalars
    k_scale,
    # compile-time switches
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_R: tl.constexpr,
    HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, IN_FP32: tl.constexpr,
):
    """One (row block, vocabulary split): online statistics of the split's logits for BLOCK_N rows."""
    row_block, split = _program_block(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_R)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = tl.load(mask_ptr + rows, mask=rows < N, other=0) != 0
    # A block of masked rows only (padding) costs nothing; a partly masked block computes its masked rows
    # from zero hidden states (finite, never read back: combine_kernel writes 0 for them).
    if tl.max(keep.to(tl.int32), axis=0) > 0:
        y = tl.load(labels_ptr + rows, mask=keep, other=-1)
        # int32 for the per-element compare; an out-of-range label (even one beyond int32) becomes -1,
        # which matches no column: its row gets no label logit and combine_kernel makes it NaN
        y = tl.where((y >= 0) & (y < V), y, -1).to(tl.int32)
        # int64 before any pointer arithmetic: N * H and V * H pass 2^31 at real sizes
        h_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hidden + tl.arange(0, BLOCK_H)[None, :]

        m = tl.full([BLOCK_N], NEG_BIG, tl.float32)
        d = tl.zeros([BLOCK_N], tl.float32)
        a = tl.zeros([BLOCK_N], tl.float32)
        z_y = tl.zeros([BLOCK_N], tl.float32)
        v_begin = split * tiles_per_split * BLOCK_V
        v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            in_cols = cols < V
            w_ptrs = weight_ptr + cols.to(tl.int64)[:, None] * stride_weight + tl.arange(0, BLOCK_H)[None, :]
            z = _logit_tile(h_ptrs, w_ptrs, keep, in_cols, H, BLOCK_N, BLOCK_V, BLOCK_H, IN_FP32)
            if HAS_BIAS:
                z += tl.load(bias_ptr + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
            z = tl.where(in_cols[None, :], z, float("-inf"))    # -inf: the identity of every row sum
            z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
            m, d, a = online_lse_update(m, d, a, z, k_scale, ENTROPY)

        n64 = N.to(tl.int64)
        plane = num_splits * n64
        out = part_ptr + split * n64 + rows
        tl.store(out + _P_MAX * plane, m, mask=keep)
        tl.store(out + _P_SUM * plane, d, mask=keep)
        if ENTROPY:
            tl.store(out + _P_ENT * plane, a, mask=keep)
        tl.store(out + _P_LABEL * plane, z_y, mask=keep)


@triton.jit
def combine_kernel(
    # outputs [N] fp32
    logprobs_ptr, lse_ptr, entropy_ptr,
    # inputs
    part_ptr, labels_ptr, mask_ptr,
    # sizes and runtime scalars
    N, V, num_splits, k_scale, inv_tau,
    BLOCK: tl.constexpr, ENTROPY: tl.constexpr,
):
    """Merge the splits' partial statistics of BLOCK rows into lse, log p(y) and the entropy."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_n = rows < N
    keep = tl.load(mask_ptr + rows, mask=in_n, other=0) != 0
    plane = num_splits * N.to(tl.int64)
    m = tl.full([BLOCK], NEG_BIG, tl.float32)
    at = part_ptr + _P_MAX * plane + rows
    for _ in range(0, num_splits):
        m = tl.maximum(m, tl.load(at, mask=keep, other=NEG_BIG))
        at += N     # the next split (pointer steps: the offsets never pass through int32)
    d = tl.zeros([BLOCK], tl.float32)
    a = tl.zeros([BLOCK], tl.float32)
    z_y = tl.zeros([BLOCK], tl.float32)
    at = part_ptr + rows
    for _ in range(0, num_splits):
        d_s = tl.load(at + _P_SUM * plane, mask=keep, other=0.0)
        delta, alpha = rescale(tl.load(at + _P_MAX * plane, mask=keep, other=NEG_BIG), m, k_scale)
        d += alpha * d_s
        if ENTROPY:
            a += entropy_sum_moved(tl.load(at + _P_ENT * plane, mask=keep, other=0.0), d_s, delta, alpha)
        z_y += tl.load(at + _P_LABEL * plane, mask=keep, other=0.0)
        at += N

    d = tl.where(keep, d, 1.0)      # masked rows (d = 0) are written as 0 below: no log2(0) or 0 / 0 for them
    l2d = tl.log2(d)
    y = tl.load(labels_ptr + rows, mask=keep, other=0)
    logp = (z_y - m) * inv_tau - LN2 * l2d
    logp = tl.where((y >= 0) & (y < V), logp, float("nan"))
    tl.store(logprobs_ptr + rows, tl.where(keep, logp, 0.0), mask=in_n)
    tl.store(lse_ptr + rows, tl.where(keep, m * inv_tau + LN2 * l2d, 0.0), mask=in_n)
    if ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(keep, LN2 * (l2d - a / d), 0.0), mask=in_n)
