"""``gated_distill`` on log-probs equals the distillation term of ``sdar_loss`` (value and logit gradient)."""

import pytest
import torch

from sdar_kernels import sdar_loss, token_logprobs
from sdar_kernels.token_logprobs import gated_distill
from token_helpers import token_case


@pytest.mark.parametrize("distill", ["sampled", "reinforce"])
@pytest.mark.parametrize("gate_beta", [0.0, 5.0])
def test_equals_sdar_loss_distillation(distill, gate_beta):
    case = token_case((3, 6), 211, mask="empty_rows")
    g = torch.Generator().manual_seed(4)
    logits = case["logits"]
    teacher = torch.log_softmax(logits + torch.randn(logits.shape, generator=g), -1).gather(
        -1, case["labels"].clamp_min(0)[..., None]).squeeze(-1)
    upstream = torch.randn(3, 6, generator=g)
    opts = dict(gate_beta=gate_beta, distill=distill)

    z1 = logits.clone().requires_grad_(True)
    st = token_logprobs(z1, case["labels"], mask=case["mask"], entropy=False)
    d, gate, gap = gated_distill(st.logprobs, teacher, **opts)
    m = case["mask"]
    (torch.where(m, d, 0.0) * upstream).sum().backward()

    z2 = logits.clone().requires_grad_(True)
    out = sdar_loss(z2, case["labels"], mask=m, teacher_logprobs=teacher, distill_coef=1.0, reduction="none",
                    **opts)
    (out.loss * upstream).sum().backward()
    torch.testing.assert_close(torch.where(m, d, 0.0), out.loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.where(m, gate, 0.0), out.gate, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.where(m, gap, 0.0), out.gap, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-6, rtol=1e-5)


def test_zero_teacher_probability_gives_the_limit_zero():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    teacher = torch.tensor([float("-inf"), -1.0])
    d, gate, _ = gated_distill(logp, teacher, gate_beta=5.0)
    d.sum().backward()
    assert d[0] == 0 and gate[0] == 0 and torch.isfinite(logp.grad).all() and logp.grad[0] == 0


def test_refuses_full_vocabulary_divergences_and_bad_shapes():
    with pytest.raises(ValueError, match="distill must be one of"):
        gated_distill(torch.zeros(3), torch.zeros(3), distill="fkl")
    with pytest.raises(ValueError, match="teacher_logprobs must have shape"):
        gated_distill(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="gate_beta must be >= 0"):
        gated_distill(torch.zeros(3), torch.zeros(3), gate_beta=-1.0)
