"""``sdar.SDARConfig`` (official SDAR hyperparameters, method presets) and the ``sdar.SDARLoss`` module."""

import dataclasses
import inspect

import pytest
import torch

import sdar
from helpers import make_case
from sdar_kernels import sdar_loss

# the SDAR paper's released values (docs/api.md, "Defaults"), written out by hand
OFFICIAL = {"gate_beta": 5.0, "distill_coef": 0.01, "distill": "sampled", "clip_low": 0.2, "clip_high": 0.2,
            "clip_ratio_c": 3.0, "kl_coef": 0.01, "entropy_coef": 0.001, "temperature": 1.0,
            "loss_agg_mode": "token-mean", "group_size": 8, "use_policy_gradient": True}


def test_defaults_are_the_official_hyperparameters():
    cfg = sdar.SDARConfig()
    for k, v in OFFICIAL.items():
        assert getattr(cfg, k) == v, k


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        sdar.SDARConfig().gate_beta = 1.0


@pytest.mark.parametrize("method,changed", [
    ("sdar", {}), ("grpo_opsd", {"gate_beta": 0.0}), ("grpo", {"distill_coef": 0.0}),
    ("opsd", {"use_policy_gradient": False})])
def test_for_method_presets(method, changed):
    cfg = sdar.SDARConfig.for_method(method)
    for k, v in {**OFFICIAL, **changed}.items():
        assert getattr(cfg, k) == v, k
    assert sdar.SDARConfig.for_method(method, temperature=0.7, kl_coef=0.0).temperature == 0.7


@pytest.mark.parametrize("method", ["SDAR", "ppo", "", "grpo-opsd"])
def test_for_method_unknown_raises(method):
    with pytest.raises(ValueError, match="method"):
        sdar.SDARConfig.for_method(method)


def test_loss_kwargs_are_exactly_sdar_loss_hyperparameters():
    kw = sdar.SDARConfig().loss_kwargs()
    assert "group_size" not in kw and "use_policy_gradient" not in kw
    params = inspect.signature(sdar_loss).parameters
    assert set(kw) <= set(params)
    assert {k: v for k, v in OFFICIAL.items() if k in kw} == {k: kw[k] for k in OFFICIAL if k in kw}


def _case():
    return make_case((2, 5), 97, advantages="seq", old_logprobs=True, ref_logprobs=True, mask="empty_rows")


def _call_module(module, case):
    logits = case["logits"].clone().requires_grad_(True)
    out = module(logits, **{k: v for k, v in case.items() if k != "logits"})
    out.loss.backward()
    return out, logits.grad


def _call_functional(case, **kwargs):
    logits = case["logits"].clone().requires_grad_(True)
    out = sdar_loss(logits, **{k: v for k, v in case.items() if k != "logits"}, **kwargs)
    out.loss.backward()
    return out, logits.grad


def test_module_equals_functional_with_official_config():
    case = _case()
    a, ga = _call_module(sdar.SDARLoss(), case)
    b, gb = _call_functional(case, **sdar.SDARConfig().loss_kwargs())
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)
    assert a.metrics["kl_loss"] > 0 and a.metrics["entropy"] > 0


def test_module_official_kl_needs_ref_logprobs():
    case = _case()
    del case["ref_logprobs"]
    with pytest.raises(ValueError, match="ref_logprobs"):
        _call_module(sdar.SDARLoss(), case)
    _call_module(sdar.SDARLoss(sdar.SDARConfig(kl_coef=0.0)), case)  # KL off explicitly: fine


def test_module_opsd_drops_the_policy_gradient():
    case = _case()
    a, ga = _call_module(sdar.SDARLoss(sdar.SDARConfig.for_method("opsd")), case)
    no_pg = {k: v for k, v in case.items() if k not in ("advantages", "old_logprobs")}
    b, gb = _call_functional(no_pg, **sdar.SDARConfig().loss_kwargs())
    assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)
    assert a.metrics["pg_loss"] == 0 and a.metrics["pg_clipfrac"] == 0


def test_module_grpo_opsd_gate_is_one_half():
    case = _case()
    out, _ = _call_module(sdar.SDARLoss(sdar.SDARConfig.for_method("grpo_opsd")), case)
    m = case["mask"]
    assert (out.gate[m] == 0.5).all() and out.metrics["gate_mean"].item() == pytest.approx(0.5)


def test_module_grpo_has_no_distillation_in_the_loss():
    case = _case()
    a, ga = _call_module(sdar.SDARLoss(sdar.SDARConfig.for_method("grpo")), case)
    no_teacher = {k: v for k, v in case.items() if k != "teacher_logits"}
    b, gb = _call_functional(no_teacher, **sdar.SDARConfig().loss_kwargs())
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_settings_pass_through(backend, device):
    dev = device if backend == "triton" else "cpu"
    case = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in _case().items()}
    module = sdar.SDARLoss(reduction="none", backend=backend)
    logits = case["logits"].clone().requires_grad_(True)
    out = module(logits, **{k: v for k, v in case.items() if k != "logits"})
    ref = sdar_loss(case["logits"], **{k: v for k, v in case.items() if k != "logits"}, reduction="none",
                    backend=backend, **sdar.SDARConfig().loss_kwargs())
    assert out.loss.shape == (2, 5) and torch.equal(out.loss.detach(), ref.loss)
    assert "reduction='none'" in repr(module) and f"backend='{backend}'" in repr(module)


@pytest.mark.parametrize("field,value", [("gate_beta", float("nan")), ("temperature", 0.0),
                                         ("distill", "kl"), ("loss_agg_mode", "mean")])
def test_config_validates_at_construction(field, value):
    """SDARConfig runs the loss's own validation when built, naming the field."""
    with pytest.raises(ValueError, match=field):
        sdar.SDARConfig(**{field: value})
