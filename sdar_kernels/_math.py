"""``@triton.jit`` math helpers whose best form differs between a GPU and the CPU interpreter.

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


@triton.jit
def log2_approx(x):
    """log2(x) for x in [1, 2] to within 2^-22 absolute: one MUFU.LG2 on a GPU."""
    if _INTERPRETER:
        return tl.log2(x)
    else:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
