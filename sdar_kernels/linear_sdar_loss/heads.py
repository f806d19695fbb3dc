"""The lm-head matmuls of the fused-linear SDAR loss: fp32 chunk logits and the gradient GEMMs.

Logits are produced in fp32 straight from the matmul, never rounded to bf16 first (README.md,
"Precision"): for bf16/fp16 weights on CUDA that is one GEMM with low-precision operands, fp32
accumulation and an fp32 output (``torch.mm(..., out_dtype=torch.float32)``); where that overload is
missing (CPU, older torch) the operands are upcast and the GEMM runs in fp32, with one fp32 copy of the
weight per call (bounded: V * H * 4 bytes, independent of N).

The backward GEMMs take the logit gradient g [C, V] (fp32, or written directly in the weight's dtype on
CUDA bf16 / fp16, as eager autograd would give it):
  grad_hidden[chunk] = g @ W           (operands in the weight's dtype on CUDA, as eager autograd does)
  grad_W            += g.T @ h_chunk   (accumulated in an fp32 [V, H] buffer, chunks in order: deterministic)
  grad_b            += g.sum(0)        (fp32)
"""

from __future__ import annotations

import functools

import torch

F32 = torch.float32


@functools.lru_cache(maxsize=None)
def _cuda_out_dtype_mm(dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=float32)`` works for ``dtype`` operands on this CUDA build.

    Probed once per dtype on a tiny problem (one host sync at first use, never on the hot path)."""
    try:
        a = torch.ones(2, 3, dtype=dtype, device="cuda")
        out = torch.mm(a, a.T, out_dtype=F32)
        return out.dtype == F32 and bool((out == 3).all())
    except (TypeError, RuntimeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def _cuda_out_dtype_addmm_inplace(dtype: torch.dtype) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=float32, out=acc)`` accumulates into an fp32 buffer in
    place (no [V, H] fp32 temporary per chunk). Probed once per dtype, like ``_cuda_out_dtype_mm``."""
    try:
        a = torch.ones(2, 3, dtype=dtype, device="cuda")
        acc = torch.ones(2, 2, dtype=F32, device="cuda")
        torch.addmm(acc, a, a.T, out_dtype=F32, out=acc)
        return bool((acc == 4).all())
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with low-precision operands, fp32 accumulation and an fp32 result (CUDA)."""
    return torch.mm(a, b, out_dtype=F32)


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with low-precision operands, in place if the overload allows it."""
    if _cuda_out_dtype_addmm_inplace(a.dtype):
        torch.addmm(acc, a, b, out_dtype=F32, out=acc)
    else:  # one fp32 [V, H] temporary per chunk
        acc.add_(_mm_f32(a, b))


class Head:
    """One lm head (weight [V, H], optional bias [V]) as the chunk loop uses it. Holds detached tensors."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, share_weight_with: "Head" = None,
                 native: bool | None = None):
        self.weight = weight.detach()
        self._shared = share_weight_with    # same weight tensor: share the fp32 copy, if one is made
        self.dtype = weight.dtype
        self.bias = None if bias is None else bias.detach().to(F32)
        if native is None:  # GEMMs in the input dtype with fp32 outputs (else: upcast operands)
            native = self.dtype == F32 or (weight.is_cuda and _cuda_out_dtype_mm(self.dtype))
        self.native = native
        self._w32 = None

    @property
    def low_precision_grad_copy(self) -> bool:
        """The backward GEMMs take the gradient in the weight's dtype: a [C, V] buffer of its own."""
        return self.native and self.dtype != F32

    def w32(self) -> torch.Tensor:
        if self._shared is not None:
            return self._shared.w32()
        if self._w32 is None:
            self._w32 = self.weight.to(F32)
        return self._w32

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 [C, V] logits of the hidden rows ``h`` [C, H] (a fresh buffer the loss may overwrite)."""
        if self.dtype == F32:
            z = torch.mm(h, self.weight.T)
        elif self.native:
            z = _mm_f32(h, self.weight.T)
        else:
            z = torch.mm(h.to(F32), self.w32().T)
        if self.bias is not None:
            z.add_(self.bias)
        return z

    def grad_buffer(self, z: torch.Tensor) -> torch.Tensor:
        """Where the row engine writes the chunk's logit gradient G, the backward GEMMs' left operand: the
        fp32 logits ``z`` themselves (overwritten), or a fresh [C, V] buffer in the weight dtype (CUDA
        bf16 / fp16), which the engine writes directly (no fp32 gradient followed by a cast pass)."""
        if self.low_precision_grad_copy:
            return torch.empty(z.shape, dtype=self.dtype, device=z.device)
        return z

    def label_logprobs(self, h: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, temperature: float):
        """(log p(label), lse) [N] fp32 of the rows ``h`` [N, H] without any [N, V] or [C, V] logits: one
        fused GEMM + online log-sum-exp pass (logprob_launch.py; CUDA, or the interpreter on CPU)."""
        from .logprob_launch import linear_logprobs   # imports triton: only where Triton runs
        out = linear_logprobs(h, self.weight, labels, bias=self.bias, mask=mask, temperature=temperature)
        return out.logprobs, out.lse

    def grad_input(self, g_op: torch.Tensor, out: torch.Tensor) -> None:
        """out [C, H] = g @ W; ``out`` is in the hidden dtype or fp32 (the fused path's accumulator)."""
        if self.dtype == F32:
            torch.mm(g_op, self.weight, out=out)
        elif self.native:
            if out.dtype == self.dtype:
                torch.mm(g_op, self.weight, out=out)
            else:
                out.copy_(_mm_f32(g_op, self.weight))
        else:
            out.copy_(torch.mm(g_op, self.w32()))

    def accumulate_grad_weight(self, acc: torch.Tensor, g_op: torch.Tensor, h: torch.Tensor) -> None:
        """acc [V, H] fp32 += g.T @ h."""
        if self.dtype == F32:
            acc.addmm_(g_op.T, h)
        elif self.native:
            _addmm_f32_(acc, g_op.T, h)
        else:
            acc.addmm_(g_op.T, h.to(F32))
