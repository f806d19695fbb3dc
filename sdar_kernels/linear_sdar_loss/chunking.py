"""How many token rows the fused-linear SDAR loss processes at once (the chunk-size rule).

One chunk of C rows holds, beyond the inputs and the gradients:
  student logits, fp32, [C, V]          (the row engine writes the logit gradient into it, in place)
  teacher logits, fp32, [C, V]          (only with ``teacher_hidden``; none with ``teacher_logprobs``)
  the gradient in bf16/fp16             (only for low-precision weights on CUDA: the backward GEMMs'
                                         operand, written by the row engine; the CPU path multiplies with
                                         an fp32 weight copy and takes the gradient written over the logits)
The row engine adds nothing per row: the Triton engine works in place, and the torch engine's ~5 fp32
temporaries are bounded by its own sub-chunking (torch_impl.CHUNK_ELEMENTS: at most ~5 x 16 MiB).

Rule (README.md in this folder, "Chunk size"):
  budget = clamp(4 * V * H bytes, MIN_BUDGET, MAX_BUDGET[device])    # the size of the fp32 grad_weight
                                                                     # accumulator that is live anyway
  C      = budget // bytes_per_row(V)                                 # memory cap, independent of N
  C      = max(C, MIN_ROWS[device]); round down to a multiple of ALIGN[device]
  C      = ceil(N / ceil(N / C)) rounded up to ALIGN  (balanced: no tiny last chunk; C <= N)

Why the weight size: each chunk's grad_weight GEMM reads and writes the fp32 [V, H] accumulator
(8 V H bytes) for 2 C V H FLOPs, an arithmetic intensity of about C H / (4 H + C) FLOP/byte. Tying the
chunk's logits memory to 4 V H makes C grow with H (C ~ 0.4 H rows with a teacher in bf16), which keeps
that GEMM near the H100 ridge (~300 FLOP/B) at H = 3584 while the extra memory stays about the size of
the gradient the weight needs anyway. ``SDAR_LINEAR_CHUNK_ROWS`` (rows) or ``SDAR_LINEAR_CHUNK_BYTES``
(budget) override the rule, e.g. for benchmarks.
"""

from __future__ import annotations

import os

MIN_BUDGET = 64 << 20                                  # 64 MiB
MAX_BUDGET = {"cuda": 4 << 30, "cpu": 256 << 20}       # 4 GiB on a GPU, 256 MiB on a CPU
MIN_ROWS = {"cuda": 128, "cpu": 16}                    # below this the GEMMs stop being efficient
ALIGN = {"cuda": 64, "cpu": 16}                        # tensor-core friendly tile multiples on CUDA


def bytes_per_row(vocab: int, *, teacher_logits: bool, low_precision_grad_copy: bool) -> int:
    return vocab * (4 + (4 if teacher_logits else 0) + (2 if low_precision_grad_copy else 0))


def chunk_rows(n_rows: int, vocab: int, hidden_size: int, *, device_type: str, teacher_logits: bool,
               low_precision_grad_copy: bool = False) -> int:
    """Rows per chunk for ``n_rows`` tokens (the rule in the module docstring). Always >= 1."""
    kind = "cuda" if device_type == "cuda" else "cpu"
    if n_rows <= 0:
        return 1
    forced = os.environ.get("SDAR_LINEAR_CHUNK_ROWS")
    if forced:
        return max(1, min(n_rows, int(forced)))
    budget = os.environ.get("SDAR_LINEAR_CHUNK_BYTES")
    budget = int(budget) if budget else min(max(4 * vocab * hidden_size, MIN_BUDGET), MAX_BUDGET[kind])
    per_row = bytes_per_row(vocab, teacher_logits=teacher_logits,
                            low_precision_grad_copy=low_precision_grad_copy)
    align = ALIGN[kind]
    rows = max(budget // max(per_row, 1), MIN_ROWS[kind])
    rows = max(align, rows // align * align)
    if rows >= n_rows:
        return n_rows
    n_chunks = -(-n_rows // rows)
    balanced = -(-n_rows // n_chunks)
    return min(rows, -(-balanced // align) * align)
