"""torch.compile(fullgraph=True) traces a training step through the ops (registered custom ops with fake
implementations and their autograd formula): no graph break, the same loss, metrics and gradients as
eager. ``aot_eager`` runs dynamo and AOTAutograd (what a graph break or a missing fake would fail);
one case goes through inductor's code generation too."""

import pytest
import torch

import sdar_kernels as sk

B, T, V, H = 2, 5, 37, 8


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(src=torch.randn(B, T + 1, V, generator=g), labels=torch.randint(0, V, (B, T), generator=g),
                teacher=torch.randn(B, T, V, generator=g), adv=torch.randn(B, generator=g),
                mask=torch.rand(B, T, generator=g) > 0.2)


def _sdar_step(src, labels, teacher, adv, mask, **options):
    logits = (src * 1.0)[:, :-1]       # model logits, cut to the response (a strided view)
    out = sk.sdar_loss(logits, labels, teacher_logits=teacher, advantages=adv, mask=mask, entropy_coef=0.01,
                       num_tokens=mask.sum(), **options)
    return out.loss.sum(), out.logprobs, out.metrics["gate_mean"], out.metrics["nonfinite_tokens"]


def _compare(step, inp, compiler, **options):
    src = inp["src"].clone().requires_grad_(True)
    args = {k: v for k, v in inp.items() if k != "src"}
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    got = compiled(src, **args, **options)
    (g_got,) = torch.autograd.grad(got[0], src)
    want = step(src, **args, **options)
    (g_want,) = torch.autograd.grad(want[0], src)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_got, g_want, atol=1e-7, rtol=1e-5)
    assert g_got.abs().sum() > 0


@pytest.mark.parametrize("engine", ["torch", "triton"])
@pytest.mark.parametrize("reduction,inplace", [("mean", False), ("mean", True), ("none", False), ("none", True)])
def test_sdar_loss_compiles_fullgraph(engine, reduction, inplace):
    torch._dynamo.reset()
    _compare(_sdar_step, _inputs(), "aot_eager", backend=engine, reduction=reduction, inplace_backward=inplace,
             distill="fkl")


def test_sdar_loss_compiles_with_inductor():
    # no on-disk caches: a graph cached by an older checkout of the ops would be reused (the cache key does
    # not see the fake implementations) and fail on the new output shapes (docs/api.md, "torch.compile").
    # torch's own config.patch, not monkeypatch: undoing a monkeypatch deletes the config entry (hides it),
    # and every later compile in the process then fails reading it.
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    before = functorch_config.enable_autograd_cache
    torch._dynamo.reset()
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        _compare(_sdar_step, _inputs(1), "inductor", backend="torch")
    assert functorch_config.enable_autograd_cache == before     # restored for the rest of the session


WEIGHT = torch.randn(V, H, generator=torch.Generator().manual_seed(3))


def _linear_step(src, labels, teacher, adv, mask, **options):
    hidden = src[:, :-1, :H] * 1.0
    weight = WEIGHT + src[0, 0, 0] * 0      # a weight in the graph, as a module's Parameter would be
    out = sk.linear_sdar_loss(hidden, weight, labels, teacher_hidden=hidden.detach() * 0.5, advantages=adv,
                              mask=mask, **options)
    return out.loss.sum(), out.logprobs, out.metrics["pg_clipfrac_lower"]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_sdar_loss_compiles_fullgraph(reduction):
    torch._dynamo.reset()
    _compare(_linear_step, _inputs(2), "aot_eager", backend="torch", reduction=reduction)


def test_label_check_is_skipped_inside_a_compiled_graph():
    """On CPU a bad label raises in eager (the check is free there); inside a compiled graph it would be a
    data-dependent branch, so it is skipped, as on CUDA: the row's log-prob is NaN instead."""
    torch._dynamo.reset()
    inp = _inputs(4)
    inp["labels"][0, 1] = V + 3
    inp["mask"][0, 1] = True
    with pytest.raises(ValueError, match="labels"):
        _sdar_step(**inp, backend="torch")
    compiled = torch.compile(_sdar_step, fullgraph=True, backend="aot_eager")
    _, logprobs, _, _ = compiled(**inp, backend="torch")
    assert logprobs[0, 1].isnan() and torch.isfinite(logprobs[inp["mask"]].flatten()[2:]).all()


def _token_step(src, labels, teacher, adv, mask, **options):
    logits = (src * 1.0)[:, :-1]
    st = sk.token_logprobs(logits, labels, mask=mask, teacher_logits=teacher, **options)
    # a trainer's own loss on the fused statistics
    loss = -(st.logprobs * adv[:, None]).sum() / mask.sum() - 0.01 * st.entropy.sum()
    return loss, st.logprobs, st.teacher_logprobs


@pytest.mark.parametrize("engine", ["torch", "triton"])
@pytest.mark.parametrize("inplace", [False, True])
def test_token_logprobs_compiles_fullgraph(engine, inplace):
    torch._dynamo.reset()
    _compare(_token_step, _inputs(5), "aot_eager", backend=engine, inplace_backward=inplace)


def _linear_token_step(src, labels, teacher, adv, mask, **options):
    hidden = src[:, :-1, :H] * 1.0
    weight = WEIGHT + src[0, 0, 0] * 0
    st = sk.linear_token_logprobs(hidden, weight, labels, mask=mask, teacher_hidden=hidden.detach() * 0.5, **options)
    return -(st.logprobs * adv[:, None]).sum() - 0.01 * st.entropy.sum(), st.logprobs, st.teacher_logprobs


@pytest.mark.parametrize("engine", ["torch", "triton"])
def test_linear_token_logprobs_compiles_fullgraph(engine):
    torch._dynamo.reset()
    _compare(_linear_token_step, _inputs(6), "aot_eager", backend=engine)
