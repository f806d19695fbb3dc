"""``token_logprobs`` behaviour: masks and non-finite rows, in-place backward, no_grad, what the graph holds,
validation messages, and the fused-linear variant against its reference."""

import pytest
import torch

from helpers import DTYPES, assert_close_to_oracle
from sdar_kernels import linear_token_logprobs, token_logprobs
from sdar_kernels.reference import linear_token_logprobs_reference, token_logprobs_reference
from token_helpers import run_token, token_case, upstreams


def test_nonfinite_masked_rows_and_ignore_labels():
    case = token_case((3, 6), 53, mask="empty_rows", nan_masked=True, ignore_label=True, teacher=True)
    ups = upstreams(case)
    out, grad = run_token(token_logprobs, case, {}, ups)
    keep = case["mask"]
    for v in (out.logprobs, out.entropy, out.teacher_logprobs):
        assert torch.isfinite(v).all() and (v[~keep] == 0).all()
    assert torch.isfinite(grad).all() and (grad[~keep] == 0).all() and grad[keep].abs().sum() > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_minus_inf_logits_in_kept_rows(dtype):
    """Banned tokens (-inf logits) have p = 0: finite outputs, zero gradient there, as the reference."""
    case = token_case(9, 41, DTYPES[dtype], mask="none")
    case["logits"][:, ::3] = float("-inf")
    case["labels"] = torch.full((9,), 1)     # a finite column
    ups = upstreams(case)
    out, grad = run_token(token_logprobs, case, {}, ups)
    ref, gref = run_token(token_logprobs_reference, case, {}, ups)
    assert torch.isfinite(out.entropy).all() and torch.isfinite(grad.float()).all()
    assert (grad[:, ::3] == 0).all()
    torch.testing.assert_close(out.entropy, ref.entropy, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.float(), gref.float(), atol=1e-6, rtol=1e-2 if dtype == "bf16" else 1e-5)


def test_nonfinite_logit_in_a_kept_row_gives_nan_there_only():
    logits = torch.randn(4, 17)
    logits[2, 5] = float("nan")
    st = token_logprobs(logits, torch.randint(0, 17, (4,)))
    assert st.logprobs[2].isnan() and torch.isfinite(st.logprobs[[0, 1, 3]]).all()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_inplace_backward_same_gradient_in_logits_storage(dtype):
    case = token_case((2, 5), 67, DTYPES[dtype], teacher=True)
    ups = upstreams(case)
    _, expected = run_token(token_logprobs, case, {}, ups)
    src = case["logits"].clone().requires_grad_(True)
    logits = src * 1
    ptr = logits.data_ptr()
    version = logits._version
    st = token_logprobs(logits, case["labels"], mask=case["mask"], teacher_logits=case["teacher_logits"],
                        inplace_backward=True)
    (st.logprobs * ups["logprobs"] + st.entropy * ups["entropy"]).sum().backward()
    assert torch.equal(src.grad, expected)
    assert logits.data_ptr() == ptr and torch.equal(logits.detach(), expected)   # written over the logits
    assert logits._version > version       # autograd sees the write


def test_inplace_backward_twice_raises_and_plain_backward_twice_works():
    src = torch.randn(4, 19, requires_grad=True)
    st = token_logprobs(src * 1, torch.randint(0, 19, (4,)), inplace_backward=True)
    st.logprobs.sum().backward(retain_graph=True)
    # the first backward wrote the gradient into the logits and bumped their version: autograd's saved-tensor
    # check refuses the second one before the op's own "ran twice" check would
    with pytest.raises(RuntimeError, match="twice|modified by an inplace operation"):
        st.logprobs.sum().backward()
    src.grad = None
    st = token_logprobs(src, torch.randint(0, 19, (4,)))
    st.logprobs.sum().backward(retain_graph=True)
    first = src.grad.clone()
    st.logprobs.sum().backward()
    torch.testing.assert_close(src.grad, 2 * first)


def test_inplace_backward_refuses_expanded_logits():
    base = torch.randn(1, 23, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward.*logits"):
        token_logprobs(base.expand(4, 23), torch.zeros(4, dtype=torch.long), inplace_backward=True)


def test_no_grad_does_no_gradient_work(monkeypatch):
    from sdar_kernels.token_logprobs import torch_impl
    calls = []
    monkeypatch.setattr(torch_impl, "token_rows_backward", lambda *a: calls.append(a))
    logits = torch.randn(3, 4, 29, requires_grad=True)
    before = logits.detach().clone()
    with torch.no_grad():
        st = token_logprobs(logits, torch.randint(0, 29, (3, 4)), inplace_backward=True)
    assert st.logprobs.grad_fn is None and st.entropy.grad_fn is None
    st = token_logprobs(logits.detach(), torch.randint(0, 29, (3, 4)))       # no requires_grad
    assert st.logprobs.grad_fn is None
    assert torch.equal(logits.detach(), before) and calls == []


def test_forward_without_grad_matches():
    case = token_case((2, 7), 101, teacher=True)
    with torch.no_grad():
        a = token_logprobs(**case)
    b = token_logprobs(**{**case, "logits": case["logits"].clone().requires_grad_(True)})
    for f in ("logprobs", "entropy", "teacher_logprobs"):
        assert torch.equal(getattr(a, f), getattr(b, f).detach())


def test_graph_holds_the_logits_and_row_statistics_only():
    """No [N, V] activation besides the logits: the node keeps the logits and [N]-sized statistics."""
    logits = torch.randn(6, 40, requires_grad=True)
    teacher = torch.randn(6, 40)
    st = token_logprobs(logits * 1.0, torch.randint(0, 40, (6,)), teacher_logits=teacher)
    node = st.logprobs.grad_fn.next_functions[0][0]    # past the reshape to the token shape
    # everything the op's autograd node keeps goes through save_for_backward (no tensor attributes)
    held = [t for t in node.saved_tensors if t is not None]
    assert not [k for k, v in vars(node).items() if isinstance(v, torch.Tensor)]
    big = [t for t in held if t.numel() >= 6 * 40]
    assert len(big) == 1 and big[0].shape == (6, 40)        # the logits themselves
    assert teacher.data_ptr() not in {t.data_ptr() for t in held}


def test_unused_entropy_gets_no_gradient_term():
    """Only logprobs used: the gradient is that of log p(y) alone (entropy's upstream is None, not zeros)."""
    case = token_case(11, 31, mask="none")
    ups = {"logprobs": upstreams(case)["logprobs"]}
    out, grad = run_token(token_logprobs, case, {}, ups)
    ref, gref = run_token(token_logprobs_reference, case, {"entropy": False}, ups)
    torch.testing.assert_close(grad, gref, atol=1e-6, rtol=1e-5)


ERRORS = [
    ("logits-1d", lambda z, y: dict(logits=z[0, 0], labels=y[0, 0]), "logits must be"),
    ("labels-float", lambda z, y: dict(logits=z, labels=y.float()), "labels must be an integer"),
    ("labels-shape", lambda z, y: dict(logits=z, labels=y[:, :2]), "labels must have shape"),
    ("labels-range", lambda z, y: dict(logits=z, labels=y + 100), r"labels must lie in \[0, 13\)"),
    ("mask-shape", lambda z, y: dict(logits=z, labels=y, mask=torch.ones(2, 2)), "mask must have shape"),
    ("teacher-shape", lambda z, y: dict(logits=z, labels=y, teacher_logits=z[:, :, :5]),
     "teacher_logits must have shape"),
    ("teacher-dtype", lambda z, y: dict(logits=z, labels=y, teacher_logits=z.double()),
     "teacher_logits must have dtype"),
    ("logits-int", lambda z, y: dict(logits=y, labels=y), "logits must have dtype"),
    ("temperature", lambda z, y: dict(logits=z, labels=y, temperature=0.0), "temperature must be > 0"),
    ("temperature-nan", lambda z, y: dict(logits=z, labels=y, temperature=float("nan")), "temperature must be"),
    ("entropy", lambda z, y: dict(logits=z, labels=y, entropy="yes"), "entropy must be a bool"),
    ("backend", lambda z, y: dict(logits=z, labels=y, backend="cuda"), "backend must be one of"),
    ("inplace", lambda z, y: dict(logits=z, labels=y, inplace_backward=1), "inplace_backward must be a bool"),
]


@pytest.mark.parametrize("make,match", [pytest.param(m, r, id=i) for i, m, r in ERRORS])
@pytest.mark.parametrize("fn", [token_logprobs, token_logprobs_reference], ids=["op", "reference"])
def test_bad_input_raises_value_error_naming_it(fn, make, match):
    z, y = torch.randn(2, 3, 13), torch.randint(0, 13, (2, 3))
    with pytest.raises(ValueError, match=match):
        fn(**make(z, y))


def test_masked_labels_may_be_out_of_range():
    y = torch.full((2, 3), -100)
    y[0, 0] = 4
    mask = y >= 0
    st = token_logprobs(torch.randn(2, 3, 13), y, mask=mask)
    assert (st.logprobs[~mask] == 0).all()


# ---- fused-linear variant -------------------------------------------------------------------------------
LINEAR_CASES = [
    # id, dtype, bias, teacher ("shared" | "own" | None), entropy, mask kind, chunk rows
    ("fp32-plain", "fp32", False, None, True, "random", None),
    ("fp32-bias-shared-teacher", "fp32", True, "shared", True, "random", "5"),
    ("fp32-own-teacher-no-entropy", "fp32", False, "own", False, "none", "4"),
    ("bf16-bias-teacher", "bf16", True, "shared", True, "random", "7"),
    ("fp32-nan-masked-hidden", "fp32", True, None, True, "nan", "3"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,dtype,bias,teacher,entropy,mask,chunk",
                         [pytest.param(*c, id=c[0]) for c in LINEAR_CASES])
def test_linear_matches_reference(name, dtype, bias, teacher, entropy, mask, chunk, backend, monkeypatch):
    """The Triton engine's forward is the logits-free GEMM + log-sum-exp kernel (interpreter on CPU)."""
    if chunk:
        monkeypatch.setenv("SDAR_LINEAR_CHUNK_ROWS", chunk)
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 3, 5, 24, 301
    hidden = torch.randn(B, T, H, generator=g).to(dt)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dt)
    b = (torch.randn(V, generator=g) * 0.1).to(dt) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    m = None if mask == "none" else torch.rand(B, T, generator=g) < 0.7
    if mask == "nan":
        hidden[~m] = float("nan")
        labels[~m] = -100
    kw = {"bias": b, "mask": m, "entropy": entropy, "temperature": 0.9}
    if teacher == "shared":
        kw["teacher_hidden"] = hidden + 0.3 * torch.randn(B, T, H, generator=g).to(dt)
    elif teacher == "own":
        kw["teacher_hidden"] = torch.randn(B, T, 16, generator=g).to(dt)
        kw["teacher_weight"] = torch.randn(V, 16, generator=g).to(dt)
    ups = {"logprobs": torch.randn(B, T, generator=g), "entropy": torch.randn(B, T, generator=g)}

    def run(fn, cast, **extra):
        # the oracles see zeros where the op sees NaN padding (eager math would spread the NaN into grad_W)
        h_in = hidden if fn is linear_token_logprobs or m is None else torch.where(m[..., None], hidden, 0)
        h = cast(h_in).clone().requires_grad_(True)
        w = cast(weight).clone().requires_grad_(True)
        bb = None if b is None else cast(b).clone().requires_grad_(True)
        args = {k: (cast(v) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
        st = fn(h, w, labels, **{**args, "bias": bb}, **extra)
        total = (st.logprobs * ups["logprobs"]).sum()
        if st.entropy is not None:
            total = total + (st.entropy * ups["entropy"]).sum()
        grads = torch.autograd.grad(total, [t for t in (h, w, bb) if t is not None])
        return st, grads

    same, up64 = (lambda t: t), (lambda t: t.double())
    out, grads = run(linear_token_logprobs, same, backend=backend)
    o64, g64 = run(linear_token_logprobs_reference, up64, compute_dtype=torch.float64)
    oe, ge = run(linear_token_logprobs_reference, same)
    for f in ("logprobs", "entropy", "teacher_logprobs"):
        if getattr(o64, f) is None:
            assert getattr(out, f) is None
            continue
        assert_close_to_oracle(getattr(out, f), getattr(o64, f), getattr(oe, f), f, atol=1e-5)
    for i, (a, o, e) in enumerate(zip(grads, g64, ge)):
        assert a.dtype == dt and torch.isfinite(a.float()).all()
        ulp = torch.finfo(dt).eps if dt != torch.float32 else 1e-6
        assert_close_to_oracle(a, o, e, f"grad[{i}]", atol=1e-5, rtol=ulp)
    if m is not None:
        assert (grads[0][~m] == 0).all() and (out.logprobs[~m] == 0).all()


def test_linear_no_grad_and_validation():
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    y = torch.randint(0, 11, (4,))
    with torch.no_grad():
        st = linear_token_logprobs(h, w, y)
    assert st.logprobs.grad_fn is None and st.teacher_logprobs is None
    with pytest.raises(ValueError, match="weight must be"):
        linear_token_logprobs(h, w[:, :5], y)
    with pytest.raises(ValueError, match="teacher_weight / teacher_bias need teacher_hidden"):
        linear_token_logprobs(h, w, y, teacher_weight=w)
