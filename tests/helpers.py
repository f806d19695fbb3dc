"""Shared test helpers for the SDAR loss: input builders, runners and the oracle assertion.

Oracle rule: a backend's error against the float64 reference must be at
most ~2x the error of the eager reference at the input's dtype (``compute_dtype=float32`` on the same
bf16/fp16/fp32 inputs, whose gradient is rounded to the input dtype like the backends'), plus a small atol.
"""

from __future__ import annotations

import torch

from sdar_kernels import METRIC_NAMES
from sdar_kernels.reference import sdar_loss_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TENSOR_ARGS = ("teacher_logits", "teacher_logprobs", "mask", "advantages", "old_logprobs", "ref_logprobs",
               "loss_weights", "num_tokens")


def dtype_name(dtype):
    return {v: k for k, v in DTYPES.items()}[dtype]


def make_case(shape, V, dtype=torch.float32, *, teacher="logits", mask="random", advantages=None,
              old_logprobs=False, ref_logprobs=False, loss_weights=False, num_tokens=None,
              nan_masked=False, ignore_label=False, scale=2.0, device="cpu", seed=0):
    """Random inputs of one SDAR loss call, as a dict of keyword arguments (logits and labels included).

    shape: N (flat [N, V]) or (B, T) ([B, T, V]).  teacher: "logits" | "logprobs" | None.
    mask: "random" (~75% kept) | "none" (argument omitted) | "empty_rows" (random, plus fully masked
    sequences / a masked block of rows) | "all" (everything masked).  advantages: None | "token" | "seq".
    nan_masked: put NaN / +inf / -inf into masked rows of every floating input.
    ignore_label: labels of masked tokens are -100.
    """
    g = torch.Generator().manual_seed(seed)
    tok = (shape,) if isinstance(shape, int) else tuple(shape)
    student = torch.randn(*tok, V, generator=g) * scale
    gumbel = -torch.log(-torch.log(torch.rand(*tok, V, generator=g).clamp_min(1e-20)))
    labels = (student + gumbel).argmax(-1)  # a sample of softmax(student) (Gumbel-max)
    logp = torch.log_softmax(student.to(dtype).float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    case = {"logits": student, "labels": labels}

    if mask == "none":
        m = torch.ones(tok, dtype=torch.bool)
    elif mask == "all":
        m = torch.zeros(tok, dtype=torch.bool)
    else:
        m = torch.rand(tok, generator=g) < 0.75
        if mask == "empty_rows":
            if len(tok) == 2:
                m[0] = False  # an empty sequence
                m[-1, : tok[1] // 2] = False
            else:
                m[: max(1, tok[0] // 4)] = False
        m.reshape(-1)[-1] = True if mask != "all" else False  # at least one kept token
    if mask != "none":
        case["mask"] = m

    if teacher == "logits":
        case["teacher_logits"] = student + torch.randn(*tok, V, generator=g) * 0.7 * scale
    elif teacher == "logprobs":
        case["teacher_logprobs"] = (logp + torch.randn(tok, generator=g)).clamp(max=0.0)  # log-probs are <= 0
    if advantages == "token":
        case["advantages"] = torch.randn(tok, generator=g)
    elif advantages == "seq":
        case["advantages"] = torch.randn(tok[:1], generator=g)
    if old_logprobs:  # ratios around 1, some outside the clip range and some beyond the dual clip
        case["old_logprobs"] = logp + torch.randn(tok, generator=g) * 0.6
    if ref_logprobs:  # some k3 values above the clamp at 10 (ref - logp > ~2.6)
        case["ref_logprobs"] = logp + torch.randn(tok, generator=g) * 1.5
    if loss_weights:
        case["loss_weights"] = torch.rand(tok, generator=g) + 0.1
    if num_tokens is not None:
        case["num_tokens"] = num_tokens

    bad = ~m
    if ignore_label:
        case["labels"] = torch.where(bad, torch.full_like(labels, -100), labels)
    if nan_masked and bad.any():
        specials = torch.tensor([float("nan"), float("inf"), -float("inf")])
        idx = torch.arange(V) % 3
        case["logits"][bad] = specials[idx]
        if "teacher_logits" in case:
            case["teacher_logits"][bad] = specials[(idx + 1) % 3]
        for k in ("teacher_logprobs", "old_logprobs", "ref_logprobs"):
            if k in case:
                case[k][bad] = float("nan")
        if advantages == "token":
            case["advantages"][bad] = float("nan")

    for k in ("logits", "teacher_logits"):
        if k in case:
            case[k] = case[k].to(dtype)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def to_fp32(case):
    """The same call with every floating tensor in fp32 (exact for bf16/fp16): the fp64 oracle's input."""
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in case.items()}


def upstream_for(out_loss, seed=1):
    """A random upstream gradient for reduction "none", else None (scalar: plain backward)."""
    if out_loss.dim() == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_loss.shape, generator=g).to(out_loss.device)


def run(fn, case, options, *, upstream=None, grad=True, **extra):
    """Call ``fn`` (sdar_loss or the reference) on a fresh leaf copy of the logits; returns (out, grad)."""
    case = dict(case)
    logits = case.pop("logits").detach().clone().requires_grad_(grad)
    out = fn(logits, **case, **options, **extra)
    if not grad:
        return out, None
    g = upstream if upstream is not None else upstream_for(out.loss)
    if g is None:
        out.loss.backward()
    else:
        out.loss.backward(g.to(out.loss.dtype))
    return out, logits.grad


def oracles(case, options, upstream=None):
    """(fp64 oracle, eager reference at the input dtype): each an (out, grad) pair."""
    o64 = run(sdar_loss_reference, to_fp32(case), options, upstream=upstream, compute_dtype=torch.float64)
    eager = run(sdar_loss_reference, case, options, upstream=upstream, compute_dtype=torch.float32)
    return o64, eager


def assert_close_to_oracle(actual, oracle64, eager, name, *, atol=1e-6, rtol=1e-6, factor=2.0):
    """|actual - oracle64| <= factor * max|eager - oracle64| + atol + rtol * max|oracle64| elementwise,
    and NaN/inf exactly where the oracle has them. Prints count, first indices and NaN disagreement."""
    a = actual.detach().to(torch.float64).cpu()
    o = oracle64.detach().to(torch.float64).cpu()
    e = eager.detach().to(torch.float64).cpu()
    assert a.shape == o.shape, f"{name}: shape {tuple(a.shape)} != oracle {tuple(o.shape)}"
    finite_a, finite_o = torch.isfinite(a), torch.isfinite(o)
    nonfinite_mismatch = (finite_a != finite_o) | (~finite_o & (a != o) & ~(a.isnan() & o.isnan()))
    both = finite_a & finite_o
    eager_err = (e - o)[both & torch.isfinite(e)].abs().max().item() if both.any() else 0.0
    scale = o[both].abs().max().item() if both.any() else 0.0
    tol = factor * eager_err + atol + rtol * scale
    err = torch.where(both, (a - o).abs(), torch.zeros_like(a))
    bad = (err > tol) | nonfinite_mismatch
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        first = [(i, a[tuple(i)].item(), o[tuple(i)].item(), e[tuple(i)].item()) for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off; max err {err.max().item():.3e} > tol "
            f"{tol:.3e} (eager err {eager_err:.3e}, |oracle| max {scale:.3e}); non-finite disagreement at "
            f"{int(nonfinite_mismatch.sum())} elements (actual NaN {int(a.isnan().sum())}, oracle NaN "
            f"{int(o.isnan().sum())}); first (index, actual, oracle64, eager): {first}")


def atol_for(dtype):
    """Small absolute slack on top of the 2x rule. The math is fp32 on exactly upcast inputs whatever their
    dtype, so it is the same for every input dtype; the gradient's rounding to bf16/fp16 gets one unit in
    the last place on top (check_against_oracle)."""
    return {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}[dtype]


def check_against_oracle(actual, case, options, upstream=None):
    """Compare (out, grad) of a backend with the oracles on every output, metric and the gradient
    (``upstream``: the gradient the backend's loss was backpropagated with, if not run()'s default)."""
    (out, grad) = actual
    (o64, g64), (oe, ge) = oracles(case, options, upstream)
    atol = atol_for(case["logits"].dtype)
    for field in ("loss", "logprobs", "entropy", "gate", "gap"):
        assert_close_to_oracle(getattr(out, field), getattr(o64, field), getattr(oe, field), field, atol=atol)
        assert not getattr(out, field).isnan().any(), f"NaN in {field}"
    assert set(out.metrics) == set(METRIC_NAMES), sorted(out.metrics)
    for k in METRIC_NAMES:
        assert_close_to_oracle(out.metrics[k], o64.metrics[k], oe.metrics[k], f"metrics[{k}]", atol=atol)
    if grad is not None or g64 is not None:
        assert grad is not None and grad.dtype == case["logits"].dtype
        assert grad.shape == case["logits"].shape
        # a bf16/fp16 gradient may be off by one unit in the last place of its largest entries
        ulp = torch.finfo(grad.dtype).eps if grad.dtype != torch.float32 else 1e-6
        assert_close_to_oracle(grad, g64, ge, "grad", atol=atol, rtol=ulp)
        if "mask" in case:
            assert (grad[~case["mask"].bool()] == 0).all(), "masked rows must get exactly zero gradient"
