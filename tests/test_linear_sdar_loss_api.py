"""Fused-linear SDAR loss: argument validation, the chunk-size rule, and the ``sdar.LinearSDARLoss`` module."""

from __future__ import annotations

import pytest
import torch

import sdar
import sdar_kernels as sk
from sdar_kernels.linear_sdar_loss import chunk_rows
from test_linear_sdar_loss import make_case


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setenv("SDAR_LINEAR_CHUNK_ROWS", "16")


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad,match", [
    (dict(weight=torch.randn(50, 7)), "weight must be \\[V, H\\]"),
    (dict(weight=torch.randn(50, 16, dtype=torch.bfloat16)), "weight has dtype"),
    (dict(bias=torch.randn(49)), "bias must have shape"),
    (dict(teacher_weight=torch.randn(50, 16)), "need teacher_hidden"),
    (dict(teacher_hidden=torch.randn(9, 16), teacher_logprobs=torch.randn(9)), "at most one teacher"),
    (dict(teacher_hidden=torch.randn(8, 16)), "teacher_hidden must have token shape"),
    (dict(teacher_hidden=torch.randn(9, 12)), "teacher_hidden must have hidden's size"),
    (dict(teacher_hidden=torch.randn(9, 12), teacher_weight=torch.randn(51, 12)), "teacher_weight must have V"),
    (dict(distill="fkl"), "needs teacher_hidden"),
    (dict(labels=torch.full((9,), 50)), "labels must lie in"),
    (dict(mask=torch.ones(8)), "mask must have shape"),
    (dict(hidden=torch.randn(16)), "hidden must be"),
    (dict(gate_beta=float("nan")), "gate_beta"),
])
def test_validation(bad, match):
    args = dict(hidden=torch.randn(9, 16), weight=torch.randn(50, 16), labels=torch.randint(0, 50, (9,)))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        sk.linear_sdar_loss(**args, backend="torch")


def test_chunk_rule():
    V, H = 151936, 3584
    qwen = chunk_rows(16384, V, H, device_type="cuda", teacher_logits=True, low_precision_grad_copy=True)
    assert qwen % 64 == 0 and 512 <= qwen <= 2048
    assert qwen * V * 10 <= 4 << 30                                    # within the 4 GiB cap
    # independent of N once N exceeds a chunk (up to balancing), grows with H, bounded for any N
    big = [chunk_rows(n, V, H, device_type="cuda", teacher_logits=True, low_precision_grad_copy=True)
           for n in (10 ** 5, 10 ** 6, 10 ** 7)]
    assert max(big) <= qwen + 64 and min(big) >= qwen - 64
    assert chunk_rows(10 ** 6, V, 896, device_type="cuda", teacher_logits=True) < \
        chunk_rows(10 ** 6, V, 5120, device_type="cuda", teacher_logits=True)
    assert chunk_rows(100, V, H, device_type="cuda", teacher_logits=True) == 100      # one chunk
    # balanced: the last chunk is within one alignment step per chunk of a full one
    for n in (1000, 1100, 3000):
        c = chunk_rows(n, 32000, 256, device_type="cpu", teacher_logits=True)
        k = -(-n // c)
        assert n - (k - 1) * c > c - 16 * k, (n, c)
    # CPU, the memory-test shape: the chunk's logits are 1/32 of one [N, V] fp32 buffer
    c = chunk_rows(8192, 32000, 256, device_type="cpu", teacher_logits=True)
    assert c * 32000 * 8 <= 64 << 20


def test_module_wrapper(small_chunks):
    case = make_case((2, 21), 24, 119, torch.float32, teacher="shared", advantages="seq",
                     old_logprobs=True, ref_logprobs=True)
    cfg = sdar.SDARConfig()
    head = torch.nn.Linear(24, 119)
    with torch.no_grad():
        head.weight.copy_(case["weight"])
        head.bias.copy_(case["bias"])
    side = {k: v for k, v in case.items() if k not in ("hidden", "weight", "bias")}
    out = sdar.LinearSDARLoss(cfg, backend="torch")(case["hidden"], head, **side)
    ref = sk.linear_sdar_loss(**case, **cfg.loss_kwargs(), backend="torch")
    torch.testing.assert_close(out.loss, ref.loss)
    out.loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    opsd = sdar.LinearSDARLoss(sdar.SDARConfig.for_method("opsd"), backend="torch")
    o = opsd(case["hidden"], case["weight"], bias=case["bias"], **side)
    assert o.metrics["pg_loss"] == 0


def test_matmul_work_teacher_logprobs_and_masked_rows(small_chunks, monkeypatch):
    """teacher_logprobs: no teacher GEMM at all; on CPU masked rows never reach a GEMM."""
    from sdar_kernels.linear_sdar_loss import heads

    rows = []
    real = heads.Head.logits
    monkeypatch.setattr(heads.Head, "logits", lambda self, h: rows.append(h.shape[0]) or real(self, h))
    case = make_case(70, 24, 131, torch.float32, teacher="logprobs", advantages="token")
    case["hidden"].requires_grad_(True)
    kept = int(case["mask"].sum())
    sk.linear_sdar_loss(**case, backend="torch").loss.backward()
    assert sum(rows) == kept and max(rows) <= 16          # student only, masked rows dropped, chunks of 16
    rows.clear()
    case = make_case(70, 24, 131, torch.float32, teacher="shared", advantages="token")
    case["hidden"].requires_grad_(True)
    sk.linear_sdar_loss(**case, backend="torch").loss.backward()
    assert sum(rows) == 2 * int(case["mask"].sum())      # student + teacher


def test_none_backward_detects_inplace_change(small_chunks):
    """reduction "none" recomputes the logits in backward: changing hidden in between must raise."""
    case = make_case(20, 16, 67, torch.float32, teacher="shared")
    h = case.pop("hidden").requires_grad_(True)
    h2 = h * 1.0
    out = sk.linear_sdar_loss(h2, **case, reduction="none", backend="torch")
    h2.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.sum().backward()
