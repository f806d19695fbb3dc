"""Fused-linear SDAR loss on the Triton engine with a teacher given as hidden states and a sampled-token
distillation: the teacher's log p_T(y) comes from the logits-free kernel (no teacher matmul in the chunk
loop, no [C, V] teacher logits), with the same results as the oracles and the torch engine."""

from __future__ import annotations

import pytest
import torch

import sdar_kernels as sk
from sdar_kernels.linear_sdar_loss import heads
from test_linear_sdar_loss import DTYPES, check, make_case, run_linear

if not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or the Triton interpreter", allow_module_level=True)

CASES = [
    # reduction "none": the two-phase backward runs without any teacher input
    ("reinforce-separate-bf16-none", 23, 40, 197, "bf16", dict(teacher="separate", advantages="token"),
     dict(distill="reinforce", gate_beta=2.0, reduction="none")),
    ("sampled-shared-fp16-mean-temp", 19, 36, 131, "fp16", dict(teacher="shared", old_logprobs=True),
     dict(temperature=0.8, entropy_coef=0.01)),
]


@pytest.mark.parametrize("cid,N,H,V,dt,ckw,opts", CASES, ids=[c[0] for c in CASES])
def test_against_oracle(monkeypatch, cid, N, H, V, dt, ckw, opts):
    monkeypatch.setenv("SDAR_LINEAR_CHUNK_ROWS", "7")      # several chunks, the last one partial
    check(make_case(N, H, V, DTYPES[dt], **ckw), opts, backend="triton")


def _logits_calls(monkeypatch):
    """Record the weight storage of every chunk-logits GEMM (Head.logits)."""
    calls = []
    original = heads.Head.logits

    def spy(self, h):
        calls.append(self.weight.data_ptr())
        return original(self, h)

    monkeypatch.setattr(heads.Head, "logits", spy)
    return calls


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_teacher_logits_for_sampled_token_distill(monkeypatch, reduction):
    monkeypatch.setenv("SDAR_LINEAR_CHUNK_ROWS", "7")
    case = make_case(17, 24, 101, torch.float32, teacher="separate")
    calls = _logits_calls(monkeypatch)
    run_linear(sk.linear_sdar_loss, case, dict(reduction=reduction), backend="triton")   # forward + backward
    teacher = case["teacher_weight"].data_ptr()
    assert calls and teacher not in calls, "the teacher head must never form chunk logits"
    # the spy does see a teacher GEMM where the full teacher row is needed
    calls.clear()
    sk.linear_sdar_loss(**case, distill="fkl", backend="triton")
    assert case["teacher_weight"].data_ptr() in calls


def test_nonfinite_teacher_row_counted_as_with_teacher_logits(monkeypatch):
    monkeypatch.setenv("SDAR_LINEAR_CHUNK_ROWS", "7")
    case = make_case(17, 24, 101, torch.float32, teacher="shared")
    live = int(case["mask"].nonzero()[2])
    case["teacher_hidden"][live, 3] = float("nan")
    ours = sk.linear_sdar_loss(**case, backend="triton")
    torch_engine = sk.linear_sdar_loss(**case, backend="torch")   # materialises the teacher logits
    assert ours.metrics["nonfinite_tokens"] == torch_engine.metrics["nonfinite_tokens"] == 1
    assert ours.gap[live].isnan() and torch_engine.gap[live].isnan()
    others = torch.ones(17, dtype=torch.bool)
    others[live] = False
    torch.testing.assert_close(ours.logprobs[others], torch_engine.logprobs[others])
    torch.testing.assert_close(ours.gap[others], torch_engine.gap[others])
