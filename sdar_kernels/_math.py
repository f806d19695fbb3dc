"""``@triton.jit`` helpers shared by kernels: matmul tiles that also run in the interpreter, the online
log-sum-exp update in the house form (base-2 exponentials, running max in raw logit units, guarded
rescales; sdar_loss/README.md, "Per-thread running statistics"), and a base-2 log whose best form differs
between a GPU and the interpreter.

Online log-sum-exp state of a set of logits z at temperature tau, with k = log2(e) / tau:
    m = max z (raw units),  d = sum 2^x,  a = sum 2^x x,  x = (z - m) k
    lse = m / tau + ln2 log2 d          entropy = ln2 (log2 d - a / d)
Moving the state to a larger max m' multiplies every 2^x by alpha = 2^delta, delta = (m - m') k <= 0, and
shifts every x by delta. delta may be -inf (a max that jumps beyond fp32 range, or the NEG_BIG start
value): alpha is then 0 and the old terms vanish; the guards below keep 0 * inf from turning that into
NaN. A NaN or +inf logit still makes its row NaN (through 2^x), as eager PyTorch does.

``log2_approx``: the hardware base-2 logarithm (PTX ``lg2.approx.f32``, one ``MUFU.LG2``) on a GPU, where
``tl.log2`` compiles to libdevice's accurate software polynomial (~25 instructions). Its absolute error is
below 2^-22 for arguments in [1, 2] (PTX ISA, ``lg2.approx``), which is where the SDAR kernels call it
(log2(1 + 2^-u), u >= 0: the log-space mixture of jsd), so the result is as good as the fp32 rounding of
the terms it is added to. The interpreter has no inline assembly: it uses ``tl.log2``.
"""

import triton
import triton.language as tl

from ._runtime import is_interpreter

_INTERPRETER = tl.constexpr(is_interpreter())

LN2 = tl.constexpr(0.6931471805599453)
# Start value of a running max, so a row that has seen only -inf keeps d = 0 and never computes -inf - -inf;
# also the finite floor of x in the products 2^x x (0 * NEG_BIG = 0 where 2^x = 0).
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def mma(a, b, acc, IN_FP32: tl.constexpr):
    """acc + a @ b, accumulated in fp32 (tensor cores for bf16 / fp16 operands).

    IN_FP32 upcasts both operands and multiplies them in full fp32 precision ("ieee", never TF32):
    - fp32 inputs, because torch's fp32 matmul does not use TF32 by default and the result must match it;
    - the Triton interpreter, whose tl.dot on bf16 operands returns garbage (values of 1e10 for a
      product of unit normals, Triton 3.9); the fp32 product of bf16 / fp16 values is exact, so the
      interpreter computes the same logits a tensor-core accumulation would, up to summation order.
    """
    if IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def rescale(m_old, m_new, k_scale):
    """(delta, alpha) of a running max moving from m_old to m_new: delta = (m_old - m_new) k <= 0 and
    alpha = 2^delta (0 where delta is -inf; callers guard `delta * sum` with alpha > 0)."""
    delta = (m_old - m_new) * k_scale
    return delta, tl.exp2(delta)


@triton.jit
def entropy_sum_moved(a, d_old, delta, alpha):
    """The sum a = sum 2^x x moved to a new max: alpha (a + delta d_old); 0 where alpha is 0 (the old
    terms are 2^(-inf) = 0, and delta * d_old could be -inf * 0)."""
    return tl.where(alpha > 0, alpha * (a + delta * d_old), 0.0)


@triton.jit
def online_lse_update(m, d, a, z, k_scale, ENTROPY: tl.constexpr):
    """Fold a tile z [R, C] (fp32, -inf where a column does not exist) into the row states m, d, a [R].

    Returns the new (m, d, a); a is left at 0 unless ENTROPY."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    delta, alpha = rescale(m, m_new, k_scale)
    x = (z - m_new[:, None]) * k_scale
    e = tl.exp2(x)
    if ENTROPY:
        # max(x, NEG_BIG): 2^x x -> 0 * NEG_BIG = 0 at -inf logits; a NaN x still reaches the sum via e
        a = entropy_sum_moved(a, d, delta, alpha) + tl.sum(e * tl.maximum(x, NEG_BIG), axis=1)
    # alpha * d keeps a NaN d NaN (0 * NaN), so a NaN logit never disappears from its row
    d = alpha * d + tl.sum(e, axis=1)
    return m_new, d, a


@triton.jit
def log2_approx(x):
    """log2(x) for x in [1, 2] to within 2^-22 absolute: one MUFU.LG2 on a GPU."""
    if _INTERPRETER:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
