"""Providers: every way of computing the same SDAR loss that the benchmark compares.

A provider turns one case's inputs (bench/inputs.py) into the scalar token-mean loss, differentiable
w.r.t. the student logits (``sdar_loss``) or the hidden states and lm_head weight (``linear_sdar_loss``).
``unavailable`` returns a printed reason instead of raising when a provider cannot run here; every
optional dependency (Triton kernels, the fused-linear op, Liger-Kernel) is imported inside a function.

- eager        trainer-style fp32 log_softmax + gather + gate + GRPO + entropy (bench/eager.py)
- compile      torch.compile of eager (inductor, static shapes); its compile is the first call, timed apart
- sdar-torch   sdar_kernels, backend="torch" (the chunked CPU path)
- sdar-triton  sdar_kernels, backend="triton" (CUDA; the CPU interpreter only in the correctness check)
- liger        Liger-Kernel's fused cross-entropy (or fused-linear cross-entropy) for log p_S(y) and
               log p_T(y), then the same [N] gate/GRPO/KL tail: the best an existing library offers
"""

from __future__ import annotations

import functools
import os

import torch

from .eager import eager_linear_sdar_loss, eager_sdar_loss, token_tail

OPS = ("sdar_loss", "linear_sdar_loss")


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _side(inp):
    return inp["mask"], inp["advantages"], inp["old_logprobs"], inp["ref_logprobs"]


class Provider:
    name = "?"

    def unavailable(self, case, device: str, timing: bool = True) -> str | None:
        return None

    def loss(self, inp: dict, case) -> torch.Tensor:
        raise NotImplementedError


class Eager(Provider):
    name = "eager"

    def loss(self, inp, case):
        o = case.options
        if case.op == "sdar_loss":
            return eager_sdar_loss(inp["logits"], inp["labels"], inp["teacher_logits"], *_side(inp), o)
        return eager_linear_sdar_loss(inp["hidden"], inp["weight"], inp["labels"], inp["teacher_hidden"],
                                      *_side(inp), o)


class Compile(Provider):
    """What a user gets by wrapping the eager loss in ``torch.compile``: static shapes (faster than
    ``dynamic=True`` here: 1.15 s vs 1.76 s of CPU time at N=2048, V=32000, fp32, 1 thread). Each case
    runs in a fresh process, so the compile is that process's first call (the harness's ``first_ms``)."""

    name = "compile"

    @functools.cached_property
    def _fns(self):
        return {"sdar_loss": torch.compile(eager_sdar_loss, dynamic=False),
                "linear_sdar_loss": torch.compile(eager_linear_sdar_loss, dynamic=False)}

    def loss(self, inp, case):
        o = case.options
        if case.op == "sdar_loss":
            return self._fns[case.op](inp["logits"], inp["labels"], inp["teacher_logits"], *_side(inp), o)
        return self._fns[case.op](inp["hidden"], inp["weight"], inp["labels"], inp["teacher_hidden"],
                                  *_side(inp), o)


def _linear_op():
    import sdar_kernels as sk
    return getattr(sk, "linear_sdar_loss", None)


class SDAR(Provider):
    def __init__(self, backend):
        self.backend = backend
        self.name = f"sdar-{backend}"

    def unavailable(self, case, device, timing=True):
        if case.op == "linear_sdar_loss" and _linear_op() is None:
            return "sdar_kernels.linear_sdar_loss is not in this checkout yet"
        if self.backend == "triton":
            if device != "cuda" and not (_interpreter() and not timing):
                return ("Triton needs CUDA; on CPU it runs only in the interpreter (TRITON_INTERPRET=1), "
                        "far too slow to time (covered by the correctness check)")
            try:
                import triton  # noqa: F401
                from sdar_kernels.sdar_loss import launch  # noqa: F401
            except Exception as e:  # the kernel may not exist yet in this checkout
                return f"Triton kernel not importable: {type(e).__name__}: {e}"
        return None

    def loss(self, inp, case):
        import sdar_kernels as sk
        side = dict(mask=inp["mask"], advantages=inp["advantages"], old_logprobs=inp["old_logprobs"],
                    ref_logprobs=inp["ref_logprobs"], backend=self.backend, **case.options)
        if case.op == "sdar_loss":
            return sk.sdar_loss(inp["logits"], inp["labels"], teacher_logits=inp["teacher_logits"], **side).loss
        # Teacher = the same model with privileged context: same lm_head (the op's default when no
        # teacher_weight is given), other hidden states.
        return _linear_op()(inp["hidden"], inp["weight"], inp["labels"], teacher_hidden=inp["teacher_hidden"],
                            **side).loss


class Liger(Provider):
    name = "liger"

    def unavailable(self, case, device, timing=True):
        try:
            import liger_kernel  # noqa: F401
        except Exception as e:
            return f"liger-kernel not installed ({type(e).__name__})"
        if device != "cuda" and not (_interpreter() and not timing):
            return "Liger-Kernel's Triton kernels need CUDA (interpreter only in the correctness check)"
        o = case.options
        if o["entropy_coef"] != 0:
            return "Liger-Kernel has no fused entropy term; compared at config no-entropy"
        if o["temperature"] != 1.0 or o["distill"] != "sampled":
            return "composition covers distill='sampled' at temperature 1 only"
        return None

    def loss(self, inp, case):
        # Per-token NLL with reduction="none" (its backward takes the per-token upstream gradient).
        # Liger writes the student gradient into the logits buffer during the forward (in place).
        if case.op == "sdar_loss":
            from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction as CE
            logp = -CE.apply(inp["logits"], inp["labels"], None, -100, 0.0, 0.0, "none")[0].float()
            with torch.no_grad():
                logp_t = -CE.apply(inp["teacher_logits"], inp["labels"], None, -100, 0.0, 0.0, "none")[0].float()
        else:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as FLCE
            logp = -FLCE.apply(inp["hidden"], inp["weight"], inp["labels"], None, None, -100, 0.0, 0.0,
                               "none")[0].float()
            with torch.no_grad():
                logp_t = -FLCE.apply(inp["teacher_hidden"], inp["weight"].detach(), inp["labels"], None, None,
                                     -100, 0.0, 0.0, "none")[0].float()
        return token_tail(logp, logp_t, None, *_side(inp), case.options)


PROVIDERS = {p.name: p for p in (Eager(), Compile(), SDAR("torch"), SDAR("triton"), Liger())}
