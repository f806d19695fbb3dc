"""Helpers of the token_logprobs tests: cases built from helpers.make_case, runners, the oracle check."""

from __future__ import annotations

import torch

from helpers import assert_close_to_oracle, make_case, to_fp32
from sdar_kernels.reference import token_logprobs_reference

TOKEN_ARGS = ("labels", "mask", "teacher_logits")


def token_case(shape, V, dtype=torch.float32, *, teacher=False, mask="random", **kw):
    """logits, labels (a sample of softmax(logits)), mask and teacher logits of one call."""
    case = make_case(shape, V, dtype, teacher="logits" if teacher else None, mask=mask, **kw)
    return {k: v for k, v in case.items() if k == "logits" or k in TOKEN_ARGS}


def upstreams(case, seed=1, *, which=("logprobs", "entropy")):
    """Random upstream gradients for the chosen outputs (token shape, fp32)."""
    g = torch.Generator().manual_seed(seed)
    shape = case["logits"].shape[:-1]
    return {k: torch.randn(shape, generator=g).to(case["logits"].device) for k in which}


def run_token(fn, case, options, ups=None, *, grad=True, **extra):
    """Call ``fn`` on a fresh leaf copy of the logits; backprop sum(g_k * out.k) over ``ups``.
    Returns (stats, logits.grad or None)."""
    case = dict(case)
    logits = case.pop("logits").detach().clone().requires_grad_(grad)
    out = fn(logits, **case, **options, **extra)
    if not grad or not ups:
        return out, None
    total = sum((getattr(out, k) * g).sum() for k, g in ups.items() if getattr(out, k) is not None)
    total.backward()
    return out, logits.grad


def check_token_oracle(actual, case, options, ups):
    """Every output and the gradient of an engine against the fp64 oracle, by the 2x-eager rule."""
    out, grad = actual
    o64, g64 = run_token(token_logprobs_reference, to_fp32(case), options, ups, compute_dtype=torch.float64)
    oe, ge = run_token(token_logprobs_reference, case, options, ups, compute_dtype=torch.float32)
    for field in ("logprobs", "entropy", "teacher_logprobs"):
        a, o, e = getattr(out, field), getattr(o64, field), getattr(oe, field)
        assert (a is None) == (o is None), f"{field}: present {a is not None}, oracle {o is not None}"
        if a is None:
            continue
        assert a.dtype == torch.float32 and a.shape == case["logits"].shape[:-1]
        assert_close_to_oracle(a, o, e, field)
        assert not a.isnan().any(), f"NaN in {field}"
        if "mask" in case:
            assert (a[~case["mask"].bool()] == 0).all(), f"{field} must be 0 on masked tokens"
    if g64 is None:
        assert grad is None
        return
    assert grad is not None and grad.dtype == case["logits"].dtype and grad.shape == case["logits"].shape
    ulp = torch.finfo(grad.dtype).eps if grad.dtype != torch.float32 else 1e-6
    assert_close_to_oracle(grad, g64, ge, "grad", rtol=ulp)
    if "mask" in case:
        assert (grad[~case["mask"].bool()] == 0).all(), "masked rows must get exactly zero gradient"
