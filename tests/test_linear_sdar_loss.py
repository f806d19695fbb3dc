"""Fused-linear SDAR loss (hidden states + lm_head in) against the oracles and against ``sdar_loss``.

Oracle rule: |ours - fp64 oracle| <= 2 * |eager - fp64 oracle| + atol, where
eager = "matmul then loss" at the input dtype (logits = hidden @ W.T in that dtype, then the eager SDAR
reference, autograd back to hidden / W / b) and the fp64 oracle = the SDAR reference in fp64 on the
fp32-rounded exact logits, chained to hidden / W / b with fp64 matmuls. Random upstream gradients for
reduction "none"; odd H / V / N; chunks forced small so that every case crosses chunk boundaries.
"""

from __future__ import annotations

import pytest
import torch

import sdar_kernels as sk
from sdar_kernels import METRIC_NAMES
from sdar_kernels.linear_sdar_loss import heads, schedule
from sdar_kernels.reference import linear_sdar_loss_reference, sdar_loss_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
F64 = torch.float64


# ----------------------------------------------------------------------------------------------- inputs
def make_case(shape, H, V, dtype=torch.float32, *, teacher="shared", bias=True, mask="random",
              advantages=None, old_logprobs=False, ref_logprobs=False, loss_weights=False,
              teacher_hidden_size=None, seed=0, device="cpu"):
    """One call's inputs. teacher: "shared" | "separate" | "logprobs" | None. mask: "random" | "none" |
    "all" | "ignore" (random, labels -100 on masked rows) | "nonfinite" (random, NaN/inf hidden there)."""
    g = torch.Generator().manual_seed(seed)
    tok = (shape,) if isinstance(shape, int) else tuple(shape)
    hidden = torch.randn(*tok, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    logits = hidden.to(dtype).float() @ weight.to(dtype).float().T + (0 if b is None else b)
    labels = torch.multinomial(torch.softmax(logits.reshape(-1, V), -1), 1, generator=g).reshape(tok)
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    case = {"hidden": hidden.to(dtype), "weight": weight.to(dtype), "labels": labels}
    if b is not None:
        case["bias"] = b.to(dtype)
    if teacher == "shared":
        case["teacher_hidden"] = (hidden + 0.6 * torch.randn(*tok, H, generator=g)).to(dtype)
    elif teacher == "separate":
        Ht = teacher_hidden_size or H
        case["teacher_hidden"] = torch.randn(*tok, Ht, generator=g).to(dtype)
        tw = torch.randn(V, Ht, generator=g) * (2.0 / Ht ** 0.5)
        if Ht == H:
            tw = 0.5 * tw + weight
        case["teacher_weight"] = tw.to(dtype)
        case["teacher_bias"] = (torch.randn(V, generator=g) * 0.5).to(dtype)
    elif teacher == "logprobs":
        case["teacher_logprobs"] = (logp + torch.randn(tok, generator=g)).clamp(max=0.0)  # log-probs are <= 0
    if mask != "none":
        m = torch.rand(tok, generator=g) < 0.7
        m.reshape(-1)[-1] = True
        if mask == "all":
            m[...] = False
        case["mask"] = m
        if mask == "ignore":
            case["labels"] = torch.where(m, labels, -100)
        if mask == "nonfinite":
            special = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.arange(H) % 3]
            case["hidden"][~m] = special.to(dtype)
            if "teacher_hidden" in case and case["teacher_hidden"].shape[-1] == H:
                case["teacher_hidden"][~m] = special.to(dtype)
    if advantages == "token":
        case["advantages"] = torch.randn(tok, generator=g)
    elif advantages == "seq":
        case["advantages"] = torch.randn(tok[:1], generator=g)
    if old_logprobs:
        case["old_logprobs"] = logp + torch.randn(tok, generator=g) * 0.6
    if ref_logprobs:
        case["ref_logprobs"] = logp + torch.randn(tok, generator=g) * 1.5
    if loss_weights:
        case["loss_weights"] = torch.rand(tok, generator=g) + 0.1
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


DIFF = ("hidden", "weight", "bias")


def _leaves(case):
    case = dict(case)
    for k in DIFF:
        if k in case:
            case[k] = case[k].detach().clone().requires_grad_(True)
    return case


def _upstream(loss, seed=1):
    """A random per-token upstream for reduction "none"; 0.75 for a scalar (exercises the scaling)."""
    if loss.dim() == 0:
        return torch.tensor(0.75, device=loss.device)
    return torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed)).to(loss.device)


def run_linear(fn, case, options, **extra):
    """(output, {name: grad}) of ``fn`` (linear_sdar_loss or its reference) with a fixed upstream."""
    c = _leaves(case)
    out = fn(**c, **options, **extra)
    out.loss.backward(_upstream(out.loss).to(out.loss.dtype))
    return out, {k: c[k].grad for k in DIFF if k in c}


def eager(case, options):
    """Matmul then loss at the input dtype (the baseline the fused path must not be worse than)."""
    c = _leaves(case)
    logits = c["hidden"] @ c["weight"].T + (c["bias"] if "bias" in c else 0)
    side = {k: v for k, v in c.items() if k not in DIFF + ("teacher_hidden", "teacher_weight", "teacher_bias")}
    if "teacher_hidden" in c:
        with torch.no_grad():
            tw = c.get("teacher_weight", c["weight"])
            tb = c.get("teacher_bias", c.get("bias") if "teacher_weight" not in c else None)
            side["teacher_logits"] = c["teacher_hidden"] @ tw.T + (0 if tb is None else tb)
    out = sdar_loss_reference(logits, **side, **options)
    out.loss.backward(_upstream(out.loss).to(out.loss.dtype))
    return out, {k: c[k].grad for k in DIFF if k in c}


def oracle64(case, options):
    """fp64 oracle: exact logits (rounded once to fp32, the widest the reference accepts), the reference
    in fp64, and the chain rule to hidden / W / b in fp64."""
    d = {k: (v.to(F64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in case.items()}
    logits = (d["hidden"] @ d["weight"].T + d.get("bias", 0)).float().requires_grad_(True)
    side = {k: v for k, v in case.items() if k not in DIFF + ("teacher_hidden", "teacher_weight", "teacher_bias")}
    side = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in side.items()}
    if "teacher_hidden" in d:
        tw = d.get("teacher_weight", d["weight"])
        tb = d.get("teacher_bias", d.get("bias") if "teacher_weight" not in d else None)
        side["teacher_logits"] = (d["teacher_hidden"] @ tw.T + (0 if tb is None else tb)).float()
    out = sdar_loss_reference(logits, **side, **options, compute_dtype=F64)
    (gz,) = torch.autograd.grad(out.loss, logits, _upstream(out.loss).to(out.loss.dtype))
    H = d["hidden"].shape[-1]
    gz = gz.to(F64).reshape(-1, gz.shape[-1])
    grads = {"hidden": (gz @ d["weight"]).reshape(d["hidden"].shape),
             "weight": gz.T @ d["hidden"].reshape(-1, H)}
    if "bias" in d:
        grads["bias"] = gz.sum(0)
    return out, grads


# ------------------------------------------------------------------------------------------- assertions
def assert_oracle(actual, o64, e, name, *, atol, factor=2.0):
    a, o, ee = (t.detach().to(F64) for t in (actual, o64, e))
    assert a.shape == o.shape, f"{name}: shape {tuple(a.shape)} != {tuple(o.shape)}"
    assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values"
    ok = torch.isfinite(o) & torch.isfinite(ee)
    eager_err = (ee - o)[ok].abs().max().item() if ok.any() else 0.0
    scale = o[ok].abs().max().item() if ok.any() else 0.0
    tol = factor * eager_err + atol * (1.0 + scale)
    err = torch.where(ok, (a - o).abs(), torch.zeros_like(a))
    bad = err > tol
    if bad.any():
        idx = bad.nonzero()[:4].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} off; max err {err.max().item():.3e} > tol {tol:.3e} "
            f"(eager err {eager_err:.3e}, scale {scale:.3e}); first (idx, ours, oracle, eager): "
            f"{[(i, a[tuple(i)].item(), o[tuple(i)].item(), ee[tuple(i)].item()) for i in idx]}")


ATOL = {torch.float32: 2e-6, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def check(case, options, backend="torch"):
    dtype = case["hidden"].dtype
    out, grads = run_linear(sk.linear_sdar_loss, case, options, backend=backend)
    o64, g64 = oracle64(case, options)
    oe, ge = eager(case, options)
    atol = ATOL[dtype]
    for f in ("loss", "logprobs", "entropy", "gate", "gap"):
        assert_oracle(getattr(out, f), getattr(o64, f), getattr(oe, f), f, atol=atol)
    assert set(out.metrics) == set(METRIC_NAMES)
    for k in METRIC_NAMES:
        assert_oracle(out.metrics[k], o64.metrics[k], oe.metrics[k], f"metrics[{k}]", atol=atol)
    for k, g in grads.items():
        assert g is not None and g.dtype == case[k].dtype and g.shape == case[k].shape, k
        assert_oracle(g, g64[k], ge[k], f"grad_{k}", atol=atol)
    if "mask" in case:
        m = case["mask"]
        assert (grads["hidden"][~m] == 0).all(), "masked rows must get exactly zero gradient"
        assert (out.loss[~m] == 0).all() if out.loss.dim() else True
    return out, grads


# ----------------------------------------------------------------------------------------- case tables
# (id, shape, H, V, dtype, case kwargs, loss options). Odd sizes everywhere; chunks forced to 16 rows.
CASES = [
    ("sampled-shared-adv-fp32", 61, 37, 301, "fp32",
     dict(teacher="shared", advantages="token", old_logprobs=True), dict()),
    ("sampled-logprobs-seqadv-bf16-BT", (3, 23), 40, 257, "bf16",
     dict(teacher="logprobs", advantages="seq", mask="ignore"), dict(entropy_coef=0.01)),
    ("reinforce-separate-fp32", 45, 33, 173, "fp32",
     dict(teacher="separate", mask="none"), dict(distill="reinforce", gate_beta=2.0)),
    ("fkl-shared-bf16-temp", 50, 48, 211, "bf16",
     dict(teacher="shared"), dict(distill="fkl", temperature=0.7, entropy_coef=0.01)),
    ("rkl-separate-otherH-kl-fp32", 39, 24, 199, "fp32",
     dict(teacher="separate", teacher_hidden_size=29, ref_logprobs=True), dict(distill="rkl", kl_coef=0.05)),
    ("jsd-shared-all-terms-bf16-BT", (2, 29), 32, 263, "bf16",
     dict(teacher="shared", advantages="token", old_logprobs=True, ref_logprobs=True),
     dict(distill="jsd", jsd_beta=0.3, kl_coef=0.02, entropy_coef=0.005, distill_coef=0.5)),
    ("sampled-shared-nobias-fp16", 47, 40, 190, "fp16", dict(teacher="shared", bias=False), dict()),
    ("grpo-no-teacher-nodualclip-fp32", 53, 36, 149, "fp32",
     dict(teacher=None, advantages="token", old_logprobs=True), dict(clip_ratio_c=None)),
    ("opsd-gate0-separate-bf16", 41, 27, 233, "bf16",
     dict(teacher="separate", bias=False), dict(gate_beta=0.0, distill_coef=1.0)),
]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setenv("SDAR_LINEAR_CHUNK_ROWS", "16")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cid,shape,H,V,dt,ckw,opts", CASES, ids=[c[0] for c in CASES])
def test_against_oracle_torch(small_chunks, cid, shape, H, V, dt, ckw, opts, reduction):
    case = make_case(shape, H, V, DTYPES[dt], **ckw)
    check(case, dict(opts, reduction=reduction))


AGG = [
    ("token-mean-numtokens", dict(loss_agg_mode="token-mean", num_tokens=57.0), {}),
    ("seq-mean-token-sum", dict(loss_agg_mode="seq-mean-token-sum"), {}),
    ("seq-mean-token-mean", dict(loss_agg_mode="seq-mean-token-mean"), {}),
    ("seq-mean-token-sum-norm", dict(loss_agg_mode="seq-mean-token-sum-norm"), {}),
    ("loss-weights", dict(), dict(loss_weights=True)),
]


@pytest.mark.parametrize("aid,opts,ckw", AGG, ids=[a[0] for a in AGG])
def test_aggregation_modes(small_chunks, aid, opts, ckw):
    case = make_case((4, 13), 21, 127, torch.float32, advantages="seq", **ckw)
    case["mask"][1] = False  # an empty sequence
    check(case, opts)


@pytest.mark.parametrize("compact", [True, False], ids=["cpu-compaction", "cuda-schedule"])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_masked_rows_nonfinite_hidden(small_chunks, monkeypatch, compact, dt):
    """Masked rows with NaN/inf hidden states: zero gradient, nothing non-finite leaks into grad_W / grad_b,
    with masked rows dropped (CPU) and with the every-row schedule used on CUDA."""
    monkeypatch.setattr(schedule, "COMPACT_MASKED_ROWS_ON_CPU", compact)
    case = make_case(57, 30, 151, DTYPES[dt], teacher="shared", mask="nonfinite", advantages="token")
    clean = dict(case, hidden=torch.where(case["mask"][:, None], case["hidden"], 0),
                 teacher_hidden=torch.where(case["mask"][:, None], case["teacher_hidden"], 0))
    for reduction in ("mean", "none"):
        out, grads = run_linear(sk.linear_sdar_loss, case, dict(reduction=reduction), backend="torch")
        ref, rgrads = check(clean, dict(reduction=reduction))
        torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
        for k in grads:
            torch.testing.assert_close(grads[k], rgrads[k], rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_cuda_gemm_path_emulated(small_chunks, monkeypatch, reduction, dt):
    """The CUDA GEMM path (low-precision operands, fp32-output GEMMs, G written in the weight dtype for the
    gradient GEMMs, masked rows not compacted) run on CPU, with the fp32-output GEMM emulated exactly."""
    calls = []

    def mm_f32(a, b):
        calls.append((a.dtype, b.dtype))
        assert a.dtype == b.dtype == DTYPES[dt]
        return a.float() @ b.float()

    def addmm_f32_(acc, a, b):
        assert acc.dtype == torch.float32 and a.dtype == b.dtype == DTYPES[dt]
        calls.append("addmm")
        acc.addmm_(a.float(), b.float())

    monkeypatch.setattr(heads, "_mm_f32", mm_f32)
    monkeypatch.setattr(heads, "_addmm_f32_", addmm_f32_)
    monkeypatch.setattr(schedule, "Head", lambda *a, **k: heads.Head(*a, **k, native=True))
    monkeypatch.setattr(schedule, "COMPACT_MASKED_ROWS_ON_CPU", False)
    case = make_case(53, 40, 263, DTYPES[dt], teacher="separate", advantages="token", mask="nonfinite")
    check(case, dict(distill="rkl", entropy_coef=0.01, reduction=reduction))
    assert "addmm" in calls and len(calls) >= 8


def test_all_masked_is_zero_not_nan(small_chunks):
    case = make_case(19, 16, 97, torch.bfloat16, mask="all", advantages="token")
    for reduction in ("mean", "sum", "none"):
        out, grads = run_linear(sk.linear_sdar_loss, case, dict(reduction=reduction), backend="torch")
        assert (out.loss == 0).all()
        assert all((g == 0).all() for g in grads.values())
        assert all(torch.isfinite(v).all() and v == 0 for v in out.metrics.values())


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_matches_sdar_loss_on_explicit_logits(small_chunks, reduction, dt):
    """Same fp32 logits through ``sdar_loss`` (same backend): outputs agree to fp32 GEMM rounding, and the
    gradients agree with autograd through the explicit logits."""
    case = make_case((3, 19), 35, 223, DTYPES[dt], teacher="shared", advantages="token", old_logprobs=True)
    opts = dict(distill="jsd", entropy_coef=0.01, reduction=reduction)
    out, grads = run_linear(sk.linear_sdar_loss, case, opts, backend="torch")
    c = _leaves(case)
    logits = c["hidden"].float() @ c["weight"].float().T + c["bias"].float()
    with torch.no_grad():
        tl = c["teacher_hidden"].float() @ c["weight"].float().T + c["bias"].float()
    side = {k: v for k, v in c.items() if k not in DIFF + ("teacher_hidden",)}
    ref = sk.sdar_loss(logits, teacher_logits=tl, **side, **opts, backend="torch")
    ref.loss.backward(_upstream(ref.loss))
    for f in ("loss", "logprobs", "entropy", "gate", "gap"):
        torch.testing.assert_close(getattr(out, f), getattr(ref, f), rtol=2e-5, atol=2e-6, msg=f)
    for k in METRIC_NAMES:
        torch.testing.assert_close(out.metrics[k], ref.metrics[k], rtol=2e-5, atol=2e-6, msg=k)
    tol = dict(rtol=2e-5, atol=2e-6) if dt == "fp32" else dict(rtol=1.6e-2, atol=1e-5)  # one bf16 rounding
    for k in DIFF:
        torch.testing.assert_close(grads[k], c[k].grad, **tol, msg=k)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_fp32_logits_beat_low_precision_eager(small_chunks, dt):
    """Logits straight from the matmul in fp32, never rounded to bf16/fp16: the loss, gate and gradients are
    an order of magnitude closer to the fp64 oracle than "matmul in bf16, then loss" (which is ~20% off
    on the bf16 gradients at this size; the 2x rule alone would let a rounding implementation pass)."""
    case = make_case(61, 64, 1001, DTYPES[dt], teacher="shared", advantages="token", old_logprobs=True)
    out, g = run_linear(sk.linear_sdar_loss, case, {}, backend="torch")
    o64, g64 = oracle64(case, {})
    oe, ge = eager(case, {})

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    assert err(out.loss, o64.loss) <= 0.1 * err(oe.loss, o64.loss)
    assert err(out.gate, o64.gate) <= 0.1 * err(oe.gate, o64.gate)
    for k in ("hidden", "weight"):
        assert err(g[k], g64[k]) <= 0.5 * err(ge[k], g64[k]), k


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_low_precision_gradients_rounded_once(small_chunks, reduction, dt):
    """On the CPU path bf16/fp16 inputs are computed in fp32 exactly like fp32 inputs holding the same values,
    so every gradient must be that fp32 gradient rounded once (<= half an ulp off), also after the fused
    path's upstream scaling (0.75 here): scaling an already-rounded gradient would round twice."""
    case = make_case(45, 24, 157, DTYPES[dt], teacher="shared", advantages="token", mask="nonfinite")
    c32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in case.items()}
    _, g = run_linear(sk.linear_sdar_loss, case, dict(reduction=reduction), backend="torch")
    _, g32 = run_linear(sk.linear_sdar_loss, c32, dict(reduction=reduction), backend="torch")
    mant = {"bf16": 7, "fp16": 10}[dt]
    for k in g:
        ref = g32[k].double()
        ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - mant)
        if dt == "fp16":
            ulp = ulp.clamp_min(2.0 ** -24)                   # subnormal spacing
        err = (g[k].double() - ref).abs()
        assert (err <= 0.5 * ulp * (1 + 1e-3) + 1e-7 * ref.abs().max()).all(), (k, (err / ulp).max().item())


def test_default_chunk_rule_single_and_many_chunks(monkeypatch):
    """The unforced rule (one chunk at this size) and a budget that forces many uneven chunks agree."""
    case = make_case(70, 20, 111, torch.float32, teacher="shared", advantages="token")
    out1, g1 = run_linear(sk.linear_sdar_loss, case, dict(reduction="none"), backend="torch")
    monkeypatch.setenv("SDAR_LINEAR_CHUNK_BYTES", str(111 * 8 * 20))  # 20 rows -> 5 chunks of 16 (last 6)
    out2, g2 = run_linear(sk.linear_sdar_loss, case, dict(reduction="none"), backend="torch")
    torch.testing.assert_close(out1.loss, out2.loss, rtol=1e-6, atol=1e-7)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-7)


def test_deterministic(small_chunks):
    case = make_case(64, 24, 131, torch.float32, teacher="shared", advantages="token")
    a = run_linear(sk.linear_sdar_loss, case, dict(), backend="torch")[1]
    b = run_linear(sk.linear_sdar_loss, case, dict(), backend="torch")[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_gradient_to_teacher_and_partial_grads(small_chunks):
    case = make_case(33, 20, 101, torch.float32, teacher="shared", advantages="token")
    full, fgrads = run_linear(sk.linear_sdar_loss, case, dict(), backend="torch")
    h = case["hidden"].clone().requires_grad_(True)
    th = case["teacher_hidden"].clone().requires_grad_(True)
    w = case["weight"].clone()  # frozen head: no grad_W GEMM at all
    side = {k: v for k, v in case.items() if k not in ("hidden", "weight", "teacher_hidden")}
    out = sk.linear_sdar_loss(h, w, teacher_hidden=th, **side, backend="torch")
    (out.loss * 0.75).backward()
    assert th.grad is None and w.grad is None
    torch.testing.assert_close(h.grad, fgrads["hidden"], rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        nog = sk.linear_sdar_loss(**case, backend="torch")
    torch.testing.assert_close(nog.loss, full.loss)


def test_autocast_does_not_round_the_logits(small_chunks):
    """Under an enclosing autocast the chunk GEMMs stay in fp32 (same result as without autocast)."""
    case = make_case(40, 32, 157, torch.float32, teacher="shared", advantages="token")
    plain, g1 = run_linear(sk.linear_sdar_loss, case, dict(reduction="none"), backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, g2 = run_linear(sk.linear_sdar_loss, case, dict(reduction="none"), backend="torch")
    torch.testing.assert_close(auto.loss, plain.loss, rtol=1e-6, atol=1e-7)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-7)


def test_retain_graph_none_and_guard_mean(small_chunks):
    case = _leaves(make_case(30, 20, 101, torch.float32, teacher="shared"))
    out = sk.linear_sdar_loss(**case, reduction="none", backend="torch")
    up = torch.randn(30)
    out.loss.backward(up, retain_graph=True)
    first = case["weight"].grad.clone()
    out.loss.backward(up)
    torch.testing.assert_close(case["weight"].grad, 2 * first)
    out = sk.linear_sdar_loss(**case, backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


def test_reference_matches_eager_logits():
    """The reference is literally sdar_loss_reference on fp32 logits (a self-check of the oracle wiring)."""
    case = make_case(29, 16, 89, torch.float32, teacher="separate")
    o1, g1 = run_linear(linear_sdar_loss_reference, case, dict(distill="fkl"))
    o2, g2 = eager(case, dict(distill="fkl"))
    torch.testing.assert_close(o1.loss, o2.loss)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k])


# -------------------------------------------------------------------- Triton engine (interpreter on CPU)
TRITON_CASES = [
    ("sampled-shared-fp32-mean", 13, 24, 131, "fp32", dict(teacher="shared", advantages="token"),
     dict(reduction="mean")),
    ("jsd-separate-bf16-none", 11, 20, 97, "bf16", dict(teacher="separate"),
     dict(distill="jsd", entropy_coef=0.01, reduction="none")),
    ("logprobs-BT-fp32-sum", (2, 7), 16, 67, "fp32",
     dict(teacher="logprobs", mask="ignore", advantages="seq", old_logprobs=True),
     dict(reduction="sum", temperature=0.8)),
]


@pytest.mark.parametrize("cid,shape,H,V,dt,ckw,opts", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_against_oracle_triton(monkeypatch, device, cid, shape, H, V, dt, ckw, opts):
    monkeypatch.setenv("SDAR_LINEAR_CHUNK_ROWS", "5")
    case = make_case(shape, H, V, DTYPES[dt], **ckw)
    if device != "cpu":
        pytest.skip("the GPU tier covers CUDA (test_linear_sdar_loss_gpu)")
    check(case, opts, backend="triton")
