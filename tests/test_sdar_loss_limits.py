"""Limits and extreme inputs: no NaN where the math is finite, and one documented value where it is not.

Each case here once broke a backend (the kernel, the torch path or the reference): jsd with underflowing
probabilities, a teacher that gives the sampled token zero probability, a saturated k3 KL, student and
teacher offset by a large constant, a maximum logit near the fp32 limit, infinite divergences, and rows
with non-finite logits. Conventions (sdar_kernels/sdar_loss/README.md, "Limits"):
- gate * gap and gate * divergence are 0 where the gate is 0 (gate_beta > 0);
- a divergence is +inf when one side has a finite logit where the other's is -inf; fkl keeps its finite
  gradient p - q there, rkl contributes no gradient;
- an unmasked row with a NaN / +inf logit (or only -inf) is NaN in its own outputs and counted in
  ``metrics["nonfinite_tokens"]``; nothing else changes.
"""

import math

import pytest
import torch

from helpers import assert_close_to_oracle, check_against_oracle, oracles, run
from sdar_kernels import linear_sdar_loss, sdar_loss
from sdar_kernels.reference import linear_sdar_loss_reference, sdar_loss_reference

BACKENDS = ["torch", "triton"]
NEG_INF = float("-inf")


def _dev(backend, device):
    return device if backend == "triton" else "cpu"


def _on(case, dev):
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _ref64(case, options, upstream=None):
    c = {k: (v.double().float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in case.items()}
    return run(sdar_loss_reference, c, options, upstream=upstream, compute_dtype=torch.float64)


def _assert_finite(out, grad):
    for field in ("loss", "logprobs", "entropy", "gate", "gap"):
        assert torch.isfinite(getattr(out, field)).all(), field
    for k, v in out.metrics.items():
        assert torch.isfinite(v), k
    assert torch.isfinite(grad).all()


# ---- 1. jsd with probabilities that underflow --------------------------------------------------------
def _jsd_cases():
    g = torch.Generator().manual_seed(3)
    yield "two-words", dict(logits=torch.tensor([[0.0, -103.0]]), teacher_logits=torch.tensor([[0.0, -300.0]]),
                            labels=torch.tensor([0])), {}
    z = torch.randn(3, 4099, generator=g) * 20   # spreads > 126 bits: subnormal p next to q = 0
    yield "randn20", dict(logits=z, teacher_logits=torch.randn(3, 4099, generator=g) * 20,
                          labels=torch.tensor([1, 2, 3])), {}
    z = torch.randn(3, 4099, generator=g) * 2
    yield "tau0.05", dict(logits=z, teacher_logits=torch.randn(3, 4099, generator=g) * 2,
                          labels=torch.tensor([4, 5, 6])), {"temperature": 0.05}


JSD_CASES = list(_jsd_cases())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coef", [1.0, 0.0], ids=["coef1", "coef0"])
@pytest.mark.parametrize("name,case,extra", JSD_CASES, ids=[c[0] for c in JSD_CASES])
def test_jsd_finite_when_probabilities_underflow(backend, coef, name, case, extra, device):
    options = {"distill": "jsd", "distill_coef": coef, "backend": backend, **extra}
    if coef == 0.0:   # the divergence alone is not a loss term: add a policy-gradient term
        case = dict(case, advantages=torch.ones(case["labels"].shape))
    case = _on(case, _dev(backend, device))
    out, grad = run(sdar_loss, case, options)
    _assert_finite(out, grad)
    check_against_oracle((out, grad), case, options)


# ---- 4. a teacher that gives the sampled token zero probability ---------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("distill,form", [("sampled", "logits"), ("reinforce", "logits"), ("fkl", "logits"),
                                         ("sampled", "logprobs"), ("reinforce", "logprobs")])
def test_teacher_zero_probability_on_the_sampled_token(backend, distill, form, device):
    """gate_beta > 0: the gate is 0 and the gated term is its limit 0 (not 0 * -inf = NaN)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 37, generator=g)
    zt = torch.randn(4, 37, generator=g)
    y = torch.tensor([3, 7, 11, 20])
    zt[0, 3] = NEG_INF
    zt[2, 11] = NEG_INF
    case = dict(logits=z, labels=y, advantages=torch.randn(4, generator=g))
    if form == "logits":
        case["teacher_logits"] = zt
    else:
        case["teacher_logprobs"] = torch.log_softmax(zt, -1).gather(-1, y[:, None]).squeeze(-1)
    fn = sdar_loss_reference if backend == "reference" else sdar_loss
    options = {"distill": distill, "distill_coef": 0.5}
    if backend != "reference":
        options["backend"] = backend
        case = _on(case, _dev(backend, device))
    out, grad = run(fn, case, options)
    assert out.gate.cpu()[[0, 2]].eq(0).all() and (out.gap.cpu()[[0, 2]] == NEG_INF).all()
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    # the same as the loss without those two rows' distillation: their gated term is exactly 0
    (ref, ref_grad) = _ref64(case, {k: v for k, v in options.items() if k != "backend"})
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
    torch.testing.assert_close(grad.double().cpu(), ref_grad.double().cpu(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ungated_baseline_keeps_its_infinite_value(backend, device):
    """gate_beta = 0 (GRPO+OPSD): the gate is 0.5 everywhere and the released formula gives -inf."""
    case = _on(dict(logits=torch.randn(2, 11), labels=torch.tensor([1, 2]),
                    teacher_logprobs=torch.tensor([NEG_INF, -1.0])), _dev(backend, device))
    out, _ = run(sdar_loss, case, {"gate_beta": 0.0, "backend": backend}, grad=False)
    assert (out.gate == 0.5).all()
    assert out.loss.item() == NEG_INF


# ---- 6. k3 KL far beyond its clamp ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_k3_saturation_has_finite_gradient(backend, device):
    """ref - logp up to +inf: k3 is clamped at 10 with zero slope; exp must not overflow into NaN."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 23, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4])
    logp = torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)
    ref = logp + torch.tensor([100.0, 500.0, 1e6, 0.5, -3.0])
    case = dict(logits=z, labels=y, ref_logprobs=ref)
    options = {"kl_coef": 0.1}
    fn = sdar_loss_reference if backend == "reference" else sdar_loss
    if backend != "reference":
        options["backend"] = backend
        case = _on(case, _dev(backend, device))
    out, grad = run(fn, case, options)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert out.metrics["kl_loss"].item() == pytest.approx((10 * 3 + _k3(0.5) + _k3(-3.0)) / 5, rel=1e-5)
    assert (grad.cpu()[:3] == 0).all(), "clamped rows pass no gradient"


def _k3(d):
    return math.exp(d) - d - 1


def test_linear_reference_k3_saturation_has_finite_gradient():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 8, generator=g, requires_grad=True)
    weight = torch.randn(17, 8, generator=g, requires_grad=True)
    out = linear_sdar_loss_reference(hidden, weight, torch.tensor([1, 2, 3]), kl_coef=0.1,
                                     ref_logprobs=torch.tensor([200.0, 0.0, -1.0]))
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


# ---- 7. teacher logits offset from the student's by a constant ----------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distill", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("offset", [1e4, -3e3])
@pytest.mark.parametrize("both", [False, True], ids=["teacher", "both"])
def test_divergences_invariant_to_a_constant_offset(backend, distill, offset, both, device):
    """A constant added to a row's logits changes no probability, so no divergence: the kernel must not
    sum raw z_T - z_S differences of size 1e4 and cancel them against the log-sum-exp difference."""
    g = torch.Generator().manual_seed(4)
    # multiples of 1/64: exact in fp32 with the offset added, so both calls see the same differences
    z = (torch.randn(6, 1031, generator=g) * 3 * 64).round() / 64
    zt = z + (torch.randn(6, 1031, generator=g) * 64).round() / 64
    case = _on(dict(logits=z + offset if both else z, teacher_logits=zt + offset, labels=torch.arange(6) * 7),
               _dev(backend, device))
    options = {"distill": distill, "distill_coef": 1.0, "backend": backend}
    out, grad = run(sdar_loss, case, options)
    check_against_oracle((out, grad), case, options)
    # and the same values as without the offset (the math is invariant)
    base = _on(dict(logits=z, teacher_logits=zt, labels=torch.arange(6) * 7), _dev(backend, device))
    out0, _ = run(sdar_loss, base, options)
    assert out.loss.item() == pytest.approx(out0.loss.item(), rel=2e-5, abs=1e-6)


# ---- 8. a maximum logit near the fp32 limit ---------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,top,tau", [(torch.bfloat16, 3e38, 1.0), (torch.float32, 1.5e37, 0.05),
                                           (torch.float32, 3.3e38, 1.0)], ids=["bf16-3e38", "fp32-1.5e37-tau0.05",
                                                                              "fp32-3.3e38"])
def test_huge_maximum_logit(backend, dtype, top, tau, device):
    """The running max jumps by more than fp32 can scale: log-prob 0 and entropy 0 for the peaked row."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 300, generator=g)
    z[0, 17] = top
    z[1, 0] = top
    case = _on(dict(logits=z.to(dtype), labels=torch.tensor([17, 0, 5]), advantages=torch.ones(3),
                    teacher_logprobs=torch.full((3,), -1.0)), _dev(backend, device))
    options = {"temperature": tau, "entropy_coef": 0.1, "backend": backend}
    out, grad = run(sdar_loss, case, options)
    _assert_finite(out, grad)
    assert out.logprobs[:2].abs().max().item() == 0 and out.entropy[:2].abs().max().item() == 0
    check_against_oracle((out, grad), case, options)


# ---- 9. infinite divergences -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("distill", ["fkl", "rkl"])
@pytest.mark.parametrize("tau", [1.0, 0.05])
def test_infinite_divergence_is_inf_with_a_finite_gradient(backend, distill, tau, device):
    """fkl with the student -inf where the teacher has mass (and rkl the other way round) is +inf for that
    row; fkl's gradient p - q stays finite, rkl's is not taken; other rows are untouched."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 41, generator=g)
    zt = z + torch.randn(3, 41, generator=g)
    side = z if distill == "fkl" else zt
    side[0, 5] = NEG_INF                  # row 0: a support gap with real mass on the other side
    side[1, 6] = NEG_INF
    (zt if distill == "fkl" else z)[1, 6] = -200.0   # row 1: the other side's mass there underflows
    case = dict(logits=z, teacher_logits=zt, labels=torch.tensor([1, 2, 3]))
    # gate_beta 0: the gate is 0.5, never 0, so the row's value is the divergence's (the gate's own limit is
    # tested above)
    options = {"distill": distill, "distill_coef": 0.5, "gate_beta": 0.0, "temperature": tau, "reduction": "none"}
    fn = sdar_loss_reference if backend == "reference" else sdar_loss
    if backend != "reference":
        options["backend"] = backend
        case = _on(case, _dev(backend, device))
    out, grad = run(fn, case, options, upstream=torch.ones(3).to(case["logits"].device))
    loss = out.loss.cpu()
    assert loss[0].item() == math.inf and loss[1].item() == math.inf and math.isfinite(loss[2].item())
    assert torch.isfinite(grad).all()
    # finite rows agree with a call that holds them alone; the infinite rows' gradient is the math's
    lone = {k: (v[2:] if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    lone_out, lone_grad = run(fn, lone, options, upstream=torch.ones(1).to(case["logits"].device))
    assert loss[2].item() == pytest.approx(lone_out.loss.cpu()[0].item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad[2:].cpu(), lone_grad.cpu())
    (o64, g64), (_, g_eager) = oracles({k: v.cpu() for k, v in case.items()},
                                       {k: v for k, v in options.items() if k != "backend"}, upstream=torch.ones(3))
    # The rkl gradient p (log p - log q - rkl) cancels two O(rkl) numbers: the two-pass kernels carry about
    # one fp32 ulp of the divergence value there, times coef * gate / tau (README.md, "Precision").
    div = (o64.loss[2] / (0.5 * 0.5)).abs().item()
    slack = 4 * torch.finfo(torch.float32).eps * div * 0.5 * 0.5 / tau if distill == "rkl" else 0.0
    assert_close_to_oracle(grad, g64, g_eager, "grad", atol=1e-6 + slack)


# ---- non-finite logits in unmasked rows ------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all-neg-inf"], ids=["nan", "inf", "all-neg-inf"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nonfinite_logits_poison_only_their_row_and_are_counted(backend, bad, where, device):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(4, 29, generator=g)
    zt = torch.randn(4, 29, generator=g)
    target = z if where == "student" else zt
    if bad == "all-neg-inf":
        target[1] = NEG_INF
    else:
        target[1, 3] = bad
    case = dict(logits=z, teacher_logits=zt, labels=torch.tensor([0, 1, 2, 3]), advantages=torch.randn(4, generator=g))
    options = {}
    fn = sdar_loss_reference if backend == "reference" else sdar_loss
    if backend != "reference":
        options["backend"] = backend
        case = _on(case, _dev(backend, device))
    out, grad = run(fn, case, options, reduction="none", upstream=torch.ones(4).to(case["logits"].device))
    assert out.metrics["nonfinite_tokens"].item() == 1.0
    assert out.loss.cpu()[1].isnan()
    keep = torch.tensor([True, False, True, True])
    assert torch.isfinite(out.loss.cpu()[keep]).all() and torch.isfinite(grad.cpu()[keep]).all()
    # a masked row with the same logits is not counted
    out, _ = run(fn, dict(case, mask=keep.to(case["logits"].device)), options, grad=False)
    assert out.metrics["nonfinite_tokens"].item() == 0.0 and torch.isfinite(out.loss)


# ---- the fused-linear op shares the row engine: one limit case end to end ---------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_jsd_and_zero_probability_teacher(backend, device):
    dev = _dev(backend, device)
    g = torch.Generator().manual_seed(8)
    hidden = (torch.randn(4, 16, generator=g) * 8).to(dev).requires_grad_(True)
    weight = (torch.randn(53, 16, generator=g) * 4).to(dev).requires_grad_(True)
    labels = torch.tensor([1, 5, 9, 13], device=dev)
    tlp = torch.tensor([NEG_INF, -2.0, -0.5, NEG_INF], device=dev)
    out = linear_sdar_loss(hidden, weight, labels, teacher_logprobs=tlp, advantages=torch.ones(4, device=dev),
                           backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    out = linear_sdar_loss(hidden, weight, labels, teacher_hidden=hidden.detach() * 1.5, distill="jsd",
                           distill_coef=1.0, backend=backend)
    assert torch.isfinite(out.loss)
