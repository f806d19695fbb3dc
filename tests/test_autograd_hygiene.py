"""Autograd hygiene of the ops: in-place writes that autograd can see, no gradient work without autograd,
no [N, V] pass when the upstream gradient is 1, and a clear refusal of double backward."""

import pytest
import torch

import sdar_kernels as sk
from helpers import make_case, run
from sdar_kernels.linear_sdar_loss import heads
from sdar_kernels.sdar_loss import engines

BACKENDS = ["torch", "triton"]


def _dev(backend, device):
    return device if backend == "triton" else "cpu"


def _case(dev, N=6, V=97):
    case = make_case(N, V, device=dev, advantages="token", old_logprobs=True)
    return case.pop("logits"), case


# ---- inplace_backward: refuse unsafe storage, and let autograd see the write ----------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_refuses_expanded_logits(backend, reduction, device):
    dev = _dev(backend, device)
    base, case = _case(dev)
    row = base[:1].clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inplace_backward"):
        sk.sdar_loss(row.expand(6, -1), **case, inplace_backward=True, reduction=reduction, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refuses_teacher_sharing_the_logits_storage(backend, device):
    dev = _dev(backend, device)
    logits, case = _case(dev)
    logits = logits.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inplace_backward"):
        sk.sdar_loss(logits, **dict(case, teacher_logits=logits.detach()), inplace_backward=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_write_is_seen_by_another_reader_of_the_logits(backend, reduction, device):
    """Another op saved the same logits for its backward. If sdar_loss's backward runs first and overwrites
    them, that op's backward must raise (version counter), not silently use gradient values; if the other
    op's backward runs first, the result is the correct gradient."""
    dev = _dev(backend, device)
    logits0, case = _case(dev)
    opts = {"reduction": reduction, "backend": backend, "entropy_coef": 0.01}

    def total(first_other, inplace):
        logits = logits0.clone().requires_grad_(True)
        other = (logits ** 2).mean() if first_other else None
        out = sk.sdar_loss(logits, **case, inplace_backward=inplace, **opts)
        if other is None:
            other = (logits ** 2).mean()
        loss = out.loss.sum() + other
        return logits, loss

    logits, loss = total(first_other=False, inplace=False)
    expected = torch.autograd.grad(loss, logits)[0]
    # created first, so backward reaches it last: the sdar backward has overwritten the logits by then
    logits, loss = total(first_other=True, inplace=True)
    version = logits._version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    assert logits._version > version, "the in-place gradient write must bump the version counter"
    # created last, so it reads the logits before they are overwritten
    logits, loss = total(first_other=False, inplace=True)
    before = logits.detach().clone()
    assert torch.equal(logits.detach(), before), "the forward must not modify the logits"
    loss.backward()
    torch.testing.assert_close(logits.grad, expected)


# ---- no gradient work without autograd ----------------------------------------------------------------------
class _EngineSpy:
    def __init__(self, monkeypatch):
        self.calls = []
        for cls in (engines.TorchRows, engines.TritonRows):
            orig = cls.forward

            def spy(x, weights, grad, save_stats, _orig=orig):
                self.calls.append((grad is not None, save_stats))
                return _orig(x, weights, grad, save_stats)
            monkeypatch.setattr(cls, "forward", staticmethod(spy))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "no_requires_grad"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_gradient_work_without_autograd(backend, context, inplace, reduction, device, monkeypatch):
    dev = _dev(backend, device)
    logits, case = _case(dev)
    logits = logits.clone().requires_grad_(context != "no_requires_grad")
    before = logits.detach().clone()
    spy = _EngineSpy(monkeypatch)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context, torch.enable_grad)
    with ctx():
        out = sk.sdar_loss(logits, **case, inplace_backward=inplace, reduction=reduction, backend=backend)
    assert spy.calls == [(False, False)], "no gradient buffer and no saved statistics"
    assert not out.loss.requires_grad
    assert torch.equal(logits.detach(), before), "the logits must not be written"
    with torch.enable_grad():
        ref, _ = run(sk.reference.sdar_loss_reference, {**case, "logits": before}, {"reduction": reduction},
                     grad=False)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("context", ["no_grad", "no_requires_grad"])
def test_linear_no_gradient_matmuls_without_autograd(backend, context, device, monkeypatch):
    dev = _dev(backend, device)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=g).to(dev).requires_grad_(context == "no_grad")
    weight = torch.randn(41, 16, generator=g).to(dev).requires_grad_(context == "no_grad")

    def forbidden(*a, **k):
        raise AssertionError("a gradient matmul ran without autograd")
    monkeypatch.setattr(heads.Head, "grad_input", forbidden)
    monkeypatch.setattr(heads.Head, "accumulate_grad_weight", forbidden)
    spy = _EngineSpy(monkeypatch)
    with torch.no_grad() if context == "no_grad" else torch.enable_grad():
        out = sk.linear_sdar_loss(hidden, weight, torch.randint(0, 41, (7,), generator=g).to(dev),
                                  teacher_hidden=hidden.detach() * 0.5, advantages=torch.randn(7).to(dev),
                                  backend=backend)
    assert spy.calls and all(c == (False, False) for c in spy.calls)
    assert torch.isfinite(out.loss) and not out.loss.requires_grad


# ---- upstream gradient 1: no [N, V] pass in backward ------------------------------------------------------
def _ops_on_shape(prof, shape):
    return [e.name for e in prof.events() if any(list(s) == list(shape) for s in (e.input_shapes or []))]


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_fused_backward_touches_no_logits_sized_tensor_at_upstream_one(scale):
    """The fused schedule's backward multiplies the forward's gradient by the upstream scalar only when it
    is not 1 (torch path: checked on the host, free on CPU)."""
    N, V = 5, 301
    logits, case = _case("cpu", N, V)
    logits = logits.clone().requires_grad_(True)
    out = sk.sdar_loss(logits, **case, backend="torch")
    with torch.profiler.profile(record_shapes=True) as prof:
        (out.loss * scale).backward() if scale != 1.0 else out.loss.backward()
    views = ("aten::detach", "aten::view", "aten::alias", "aten::as_strided", "aten::reshape")
    touching = [n for n in _ops_on_shape(prof, (N, V)) if n.startswith("aten::") and n not in views]
    if scale == 1.0:
        assert touching == [], touching
    else:
        assert "aten::mul_" in touching and touching.count("aten::mul_") == 1, touching
    expected = run(sk.sdar_loss, {**case, "logits": logits.detach()}, {"backend": "torch"})[1] * scale
    torch.testing.assert_close(logits.grad, expected)


def test_scale_kernel_skips_the_pass_at_one():
    """The Triton scale kernel reads the scalar on the device and returns before touching memory when it is
    1: a signalling NaN (quieted by any multiply) survives bit for bit; at 2 it is rewritten."""
    from sdar_kernels.sdar_loss.launch import scale_triton_
    bits = torch.tensor([0x7F800001, 0x3F800000] * 3000, dtype=torch.int32)
    x = bits.view(torch.float32).clone()
    scale_triton_(x, torch.tensor([1.0]))
    assert torch.equal(x.view(torch.int32), bits)
    scale_triton_(x, torch.tensor([2.0]))
    assert x.view(torch.int32)[0].item() != bits[0].item() and x[1].item() == 2.0


# ---- double backward ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_refused(backend, reduction, device):
    dev = _dev(backend, device)
    logits, case = _case(dev)
    logits = logits.clone().requires_grad_(True)
    out = sk.sdar_loss(logits, **case, reduction=reduction, backend=backend)
    with pytest.raises(ValueError, match="double backward"):
        torch.autograd.grad(out.loss.sum(), logits, create_graph=True)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    out = sk.linear_sdar_loss(hidden, weight, torch.tensor([1, 2, 3, 4]), advantages=torch.ones(4),
                              reduction=reduction, backend="torch")
    with pytest.raises(ValueError, match="double backward"):
        torch.autograd.grad(out.loss.sum(), hidden, create_graph=True)
