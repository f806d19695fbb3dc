"""``token_logprobs`` against the float64 reference: odd vocabularies, chunk-crossing sizes, dtypes, masks,
temperature, entropy on/off, teacher logits, random upstream gradients for both outputs, [B, T, V] views."""

import pytest
import torch

from helpers import DTYPES
from sdar_kernels import token_logprobs
from token_helpers import check_token_oracle, run_token, token_case, upstreams

# (id, token_case kwargs, token_logprobs options, outputs that receive an upstream gradient)
OPTION_CASES = [
    ("plain", {}, {}, ("logprobs", "entropy")),
    ("logprobs-grad-only", {}, {}, ("logprobs",)),
    ("entropy-grad-only", {}, {}, ("entropy",)),
    ("no-entropy", {}, {"entropy": False}, ("logprobs",)),
    ("teacher", {"teacher": True}, {}, ("logprobs", "entropy")),
    ("tau0.7-teacher", {"teacher": True}, {"temperature": 0.7}, ("logprobs", "entropy")),
    ("tau1.3-no-entropy", {}, {"temperature": 1.3, "entropy": False}, ("logprobs",)),
    ("no-mask", {"mask": "none"}, {}, ("logprobs", "entropy")),
    ("empty-rows-nan", {"mask": "empty_rows", "nan_masked": True, "ignore_label": True, "teacher": True}, {},
     ("logprobs", "entropy")),
    ("all-masked", {"mask": "all", "nan_masked": True}, {}, ("logprobs", "entropy")),
    ("confident", {"scale": 20.0}, {}, ("logprobs", "entropy")),
]
OPTIONS = {name: rest for name, *rest in OPTION_CASES}
SHAPES = {"N37-V997": (37, 997), "B3T5-V4097": ((3, 5), 4097)}


BACKENDS = ["torch", "triton"]


def _check(shape_id, dtype, name, backend, device="cpu"):
    shape, V = SHAPES[shape_id]
    kw, opts, outs = OPTIONS[name]
    case = token_case(shape, V, DTYPES[dtype], **kw)
    if backend == "triton":
        case = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    ups = upstreams(case, which=outs)
    check_token_oracle(run_token(token_logprobs, case, {**opts, "backend": backend}, ups), case, opts, ups)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_options_every_dtype(name, dtype, backend, device):
    _check("N37-V997", dtype, name, backend, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["plain", "teacher", "empty-rows-nan", "tau0.7-teacher"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sequences_odd_vocabulary(name, dtype, backend, device):
    _check("B3T5-V4097", dtype, name, backend, device)


@pytest.mark.parametrize("splits", [3])
@pytest.mark.parametrize("name", ["plain", "teacher", "empty-rows-nan"])
def test_triton_vocabulary_splits(name, splits, device, monkeypatch):
    """The Triton engine's split schedule (few rows on a large GPU), forced under the interpreter."""
    monkeypatch.setenv("SDAR_KERNELS_SPLITS", str(splits))
    monkeypatch.setenv("SDAR_KERNELS_MAX_BLOCK_V", "64")
    _check("N37-V997", "bf16", name, "triton", device)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["plain", "teacher", "empty-rows-nan"])
def test_chunks_cross_rows_and_sequences(name, dtype, monkeypatch):
    # 3 rows per chunk at V=131: chunks stop mid-sequence and at sequence ends
    from sdar_kernels.sdar_loss import torch_impl
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 3 * 131)
    kw, opts, outs = OPTIONS[name]
    case = token_case((4, 7), 131, DTYPES[dtype], **kw)
    ups = upstreams(case, which=outs)
    check_token_oracle(run_token(token_logprobs, case, opts, ups), case, opts, ups)


def test_auto_backend_equals_torch():
    case = token_case((3, 5), 257, teacher=True)
    ups = upstreams(case)
    a, ga = run_token(token_logprobs, case, {"backend": "auto"}, ups)
    b, gb = run_token(token_logprobs, case, {"backend": "torch"}, ups)
    assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.entropy, b.entropy) and torch.equal(ga, gb)


@pytest.mark.parametrize("inplace", [False, True], ids=["grad-buffer", "inplace"])
@pytest.mark.parametrize("teacher_sliced", [True, False], ids=["teacher-sliced", "teacher-contig"])
def test_sliced_sequences_read_in_place(inplace, teacher_sliced, monkeypatch):
    from sdar_kernels.sdar_loss import torch_impl
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 2 * 37)
    B, T, V = 3, 5, 37
    full = torch.randn(B, T + 1, V)
    teacher_full = torch.randn(B, T + 2, V)
    teacher = teacher_full[:, 1:-1] if teacher_sliced else teacher_full[:, 1:-1].contiguous()
    labels = torch.randint(0, V, (B, T))
    mask = torch.rand(B, T) < 0.8
    g_lp, g_h = torch.randn(B, T), torch.randn(B, T)

    src = full.clone().requires_grad_(True)
    logits = (src * 1.0)[:, :-1]   # non-leaf, so inplace_backward may overwrite it
    assert not logits.is_contiguous()
    st = token_logprobs(logits, labels, mask=mask, teacher_logits=teacher, inplace_backward=inplace,
                        temperature=0.9)
    (st.logprobs * g_lp + st.entropy * g_h).sum().backward()

    from sdar_kernels.reference import token_logprobs_reference
    ref_src = full.clone().requires_grad_(True)
    ref = token_logprobs_reference(ref_src[:, :-1].contiguous(), labels, mask=mask,
                                   teacher_logits=teacher.contiguous(), temperature=0.9)
    (ref.logprobs * g_lp + ref.entropy * g_h).sum().backward()
    for f in ("logprobs", "entropy", "teacher_logprobs"):
        torch.testing.assert_close(getattr(st, f), getattr(ref, f), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(src.grad, ref_src.grad, atol=2e-6, rtol=1e-5)
    assert (src.grad[:, -1] == 0).all()     # the row the slice leaves out gets no gradient


def test_strided_view_is_not_copied(monkeypatch):
    """The rows reach the engine as the caller's storage (no [N, V] copy of a sliced view)."""
    from sdar_kernels.token_logprobs import torch_impl
    seen = []
    real = torch_impl.token_rows_forward

    def spy(x):
        seen.append(x.logits.data_ptr())
        return real(x)

    monkeypatch.setattr(torch_impl, "token_rows_forward", spy)
    full = torch.randn(2, 6, 33)
    view = full[:, :-1]
    token_logprobs(view, torch.randint(0, 33, (2, 5)))
    assert seen == [view.data_ptr()]


def test_equals_sdar_loss_statistics():
    """The log-probs and entropy are the ones sdar_loss reports for the same rows (one set of math)."""
    from sdar_kernels import sdar_loss
    case = token_case((3, 7), 509, teacher=True, mask="empty_rows")
    st = token_logprobs(**case, temperature=0.8)
    out = sdar_loss(**case, temperature=0.8, reduction="none")
    torch.testing.assert_close(st.logprobs, out.logprobs, atol=0, rtol=0)
    torch.testing.assert_close(st.entropy, out.entropy, atol=0, rtol=0)
