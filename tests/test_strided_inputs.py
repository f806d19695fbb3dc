"""[B, T, V] logits sliced along T (``logits[:, :-1]``) are read in place, without an [N, V] copy."""

import pytest
import torch

import sdar_kernels as sk
from sdar_kernels._checks import token_rows

BACKENDS = ["torch", "triton"]


def test_token_rows_keeps_the_sliced_tensor():
    full = torch.randn(3, 6, 37)
    sliced = full[:, :-1]
    rows = token_rows(sliced)
    assert rows.dim() == 3 and rows.data_ptr() == sliced.data_ptr()      # no copy
    flat = token_rows(full)
    assert flat.shape == (18, 37) and flat.data_ptr() == full.data_ptr()  # a view


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("inplace", [False, True], ids=["grad-buffer", "inplace"])
@pytest.mark.parametrize("teacher_sliced", [True, False], ids=["teacher-sliced", "teacher-contig"])
def test_sliced_sequences_match_reference(backend, reduction, inplace, teacher_sliced, monkeypatch):
    # small blocks / chunks so that rows cross vocabulary blocks and torch chunks stop at sequence ends
    monkeypatch.setenv("SDAR_KERNELS_MAX_BLOCK_V", "16")
    from sdar_kernels.sdar_loss import torch_impl
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 100)
    B, T, V = 3, 5, 37
    full = torch.randn(B, T + 1, V)
    teacher_full = torch.randn(B, T + 2, V)
    labels = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    teacher = teacher_full[:, 1:-1] if teacher_sliced else teacher_full[:, 1:-1].contiguous()
    kw = dict(teacher_logits=teacher, advantages=adv, reduction=reduction, distill="rkl", entropy_coef=0.1)
    upstream = torch.randn(B, T) if reduction == "none" else torch.tensor(1.0)

    src = full.clone().requires_grad_(True)
    logits = (src * 1.0)[:, :-1]   # non-leaf, so inplace_backward may overwrite it
    out = sk.sdar_loss(logits, labels, backend=backend, inplace_backward=inplace, **kw)
    (out.loss * upstream).sum().backward()

    src_ref = full.clone().requires_grad_(True)
    ref = sk.reference.sdar_loss_reference(src_ref[:, :-1], labels, compute_dtype=torch.float64, **kw)
    (ref.loss * upstream.double()).sum().backward()

    torch.testing.assert_close(out.loss.double(), ref.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(src.grad, src_ref.grad, atol=1e-7, rtol=1e-5)
    assert src.grad[:, -1].abs().max() == 0    # the cut-off position got no gradient
    if inplace:   # the gradient now lives in the logits' storage
        torch.testing.assert_close(logits.detach(), src_ref.grad[:, :-1], atol=1e-7, rtol=1e-5)


def _tensors_held_by(node):
    """Every tensor the autograd node of sdar_loss keeps: saved tensors and the prepared inputs' fields."""
    held = [t for t in node.saved_tensors if t is not None]
    x = getattr(node, "x", None)
    if x is not None:
        held += [v for v in vars(x).values() if isinstance(v, torch.Tensor)]
    return held


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_graph_holds_the_logits_only_when_backward_reads_them(backend, reduction):
    """Fused ("mean"): the graph keeps only the gradient, so student and teacher logits can be freed
    before backward. "none": backward re-reads both, so the graph keeps them."""
    logits = torch.randn(6, 40, requires_grad=True)
    teacher = torch.randn(6, 40)
    out = sk.sdar_loss(logits * 1.0, torch.randint(0, 40, (6,)), teacher_logits=teacher, backend=backend,
                       distill="fkl", reduction=reduction)
    node = out.loss.grad_fn if reduction == "mean" else out.loss.grad_fn.next_functions[0][0]
    ptrs = {t.data_ptr() for t in _tensors_held_by(node)}
    assert (teacher.data_ptr() in ptrs) == (reduction == "none")
    out.loss.sum().backward()
    assert logits.grad.abs().sum() > 0
