"""The oracle itself, checked against math done by hand (sdar_loss/README.md), and then both backends
against the same hand-derived values: closed forms on a 2-token vocabulary, every policy-gradient clip
branch, the k3 clamp, a pure-Python model of one token with finite-difference gradients, the
aggregation modes, and fp64 vs fp32 agreement of the reference."""

import dataclasses
import math

import pytest
import torch

from helpers import make_case, run, to_fp32
from sdar_kernels import sdar_loss
from sdar_kernels.reference import sdar_loss_reference

LN3 = math.log(3.0)
FNS = {"reference": (sdar_loss_reference, {"compute_dtype": torch.float64}),
       "torch": (sdar_loss, {"backend": "torch"}), "triton": (sdar_loss, {"backend": "triton"})}


def _call(fn_name, case, **options):
    """Run one implementation (Triton on CUDA when there is one); outputs come back on the CPU."""
    fn, extra = FNS[fn_name]
    if fn_name == "triton" and torch.cuda.is_available():
        case = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    out, grad = run(fn, case, {**options, **extra})
    cpu = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    cpu = {k: ({m: t.cpu() for m, t in v.items()} if k == "metrics" else v.detach().cpu()) for k, v in cpu.items()}
    return type(out)(**cpu), grad.cpu()


# ---- closed forms: student p = (1/4, 3/4), teacher q = (3/4, 1/4), sampled token y = 1 ---------------
def _two_token(tau=1.0, **extra):
    return {"logits": torch.tensor([[0.0, LN3 * tau]]), "labels": torch.tensor([1]),
            "teacher_logits": torch.tensor([[LN3 * tau, 0.0]]), **extra}


P = torch.tensor([0.25, 0.75], dtype=torch.float64)
ONEHOT_MINUS_P = torch.tensor([-0.25, 0.25], dtype=torch.float64)   # d log p(y) / dz
GATE = 1.0 / (1.0 + 3.0 ** 5)                                         # sigmoid(5 * (ln 1/4 - ln 3/4))
H = math.log(4.0) - 0.75 * LN3
# (distill, loss / distill_coef, gradient / distill_coef) by hand
TWO_TOKEN = [
    ("sampled", GATE * -LN3, -GATE * ONEHOT_MINUS_P),                         # D = gate * gap
    ("reinforce", GATE * LN3 * math.log(0.75), GATE * LN3 * ONEHOT_MINUS_P),  # D = gate * (-gap) * logp
    ("fkl", GATE * 0.5 * LN3, GATE * (P - P.flip(0))),                        # grad p - q
    ("rkl", GATE * 0.5 * LN3, GATE * P * (torch.log(P / P.flip(0)) - 0.5 * LN3)),
    ("jsd", GATE * (0.75 * LN3 - math.log(2.0)), GATE * 0.5 * P * (torch.log(P / 0.5) - (0.75 * LN3 - math.log(2.0)))),
]


@pytest.mark.parametrize("fn_name", FNS)
@pytest.mark.parametrize("tau", [1.0, 2.0], ids=["tau1", "tau2"])
@pytest.mark.parametrize("distill,value,grad", [pytest.param(*c, id=c[0]) for c in TWO_TOKEN])
def test_two_token_closed_forms(fn_name, distill, value, grad, tau):
    out, g = _call(fn_name, _two_token(tau), distill=distill, distill_coef=1.0, temperature=tau)
    assert out.logprobs.item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert out.entropy.item() == pytest.approx(H, abs=1e-6)
    assert out.gap.item() == pytest.approx(-LN3, abs=1e-6)
    assert out.gate.item() == pytest.approx(GATE, rel=1e-5)
    assert out.loss.item() == pytest.approx(value, rel=1e-5, abs=1e-8)
    torch.testing.assert_close(g[0].double(), grad / tau, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("fn_name", FNS)
def test_gate_beta_zero_is_one_half_and_entropy_gradient(fn_name):
    ec = 0.3
    out, g = _call(fn_name, _two_token(), gate_beta=0.0, distill_coef=0.0, entropy_coef=ec)
    assert out.gate.item() == 0.5 and out.metrics["gate_active_ratio"].item() == 0.0
    assert out.loss.item() == pytest.approx(-ec * H, rel=1e-6)
    torch.testing.assert_close(g[0].double(), ec * P * (torch.log(P) + H), rtol=1e-5, atol=1e-8)


# ---- policy gradient: every clip branch (clip 0.2 / 0.2, c = 3), by hand ------------------------------
# (id, advantage, ratio, clip_ratio_c, expected pg, expected d pg / d log p, clipped)
PG_BRANCHES = [
    ("A+in-range", 1.0, 1.1, 3.0, -1.1, -1.1, 0.0),
    ("A+above-clip", 1.0, 1.5, 3.0, -1.2, 0.0, 1.0),
    ("A+below-clip", 1.0, 0.5, 3.0, -0.5, -0.5, 0.0),
    ("A-below-clip", -1.0, 0.5, 3.0, 0.8, 0.0, 1.0),
    ("A-above-clip-under-c", -1.0, 2.0, 3.0, 2.0, 2.0, 0.0),
    ("A-dual-clip", -1.0, 4.0, 3.0, 3.0, 0.0, 0.0),
    ("A-no-dual-clip", -1.0, 4.0, None, 4.0, 4.0, 0.0),
    ("A-2-dual-clip", -2.0, 2.0, 1.5, 3.0, 0.0, 0.0),
    ("A0", 0.0, 1.7, 3.0, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("fn_name", FNS)
@pytest.mark.parametrize("adv,ratio,c,pg,dpg,clipped", [pytest.param(*b[1:], id=b[0]) for b in PG_BRANCHES])
def test_policy_gradient_branches(fn_name, adv, ratio, c, pg, dpg, clipped):
    case = _two_token(advantages=torch.tensor([adv]), old_logprobs=torch.tensor([math.log(0.75 / ratio)]))
    case.pop("teacher_logits")
    out, g = _call(fn_name, case, clip_ratio_c=c)
    assert out.loss.item() == pytest.approx(pg, abs=2e-6)
    assert out.metrics["pg_loss"].item() == pytest.approx(pg, abs=2e-6)
    assert out.metrics["pg_clipfrac"].item() == clipped
    assert out.metrics["ppo_kl"].item() == pytest.approx(-math.log(ratio), abs=2e-6)
    torch.testing.assert_close(g[0].double(), dpg * ONEHOT_MINUS_P, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fn_name", FNS)
def test_on_policy_ratio_is_one(fn_name):
    """old_logprobs None: r = exp(logp - sg(logp)) = 1, so pg = -A and d pg / d logp = -A."""
    case = _two_token(advantages=torch.tensor([0.7]))
    case.pop("teacher_logits")
    out, g = _call(fn_name, case)
    assert out.loss.item() == pytest.approx(-0.7, abs=1e-6) and out.metrics["ppo_kl"].item() == 0.0
    torch.testing.assert_close(g[0].double(), -0.7 * ONEHOT_MINUS_P, rtol=1e-5, atol=1e-7)


# (id, d = ref - logp, k3 value, d k3 / d logp): k3 = e^d - d - 1, clamped to [-10, 10] with no gradient outside
K3 = [("d-1", -1.0, math.exp(-1.0), 1 - math.exp(-1.0)), ("d+1", 1.0, math.e - 2.0, 1 - math.e),
      ("d0", 0.0, 0.0, 0.0), ("d+3-clamped", 3.0, 10.0, 0.0)]


@pytest.mark.parametrize("fn_name", FNS)
@pytest.mark.parametrize("d,k3,dk3", [pytest.param(*k[1:], id=k[0]) for k in K3])
def test_k3_kl_and_its_clamp(fn_name, d, k3, dk3):
    case = _two_token(ref_logprobs=torch.tensor([math.log(0.75) + d]))
    case.pop("teacher_logits")
    out, g = _call(fn_name, case, kl_coef=0.5)
    assert out.metrics["kl_loss"].item() == pytest.approx(k3, abs=2e-6)
    assert out.loss.item() == pytest.approx(0.5 * k3, abs=2e-6)
    torch.testing.assert_close(g[0].double(), 0.5 * dk3 * ONEHOT_MINUS_P, rtol=1e-5, atol=1e-7)


# ---- a pure-Python model of one token (floats and math only), gradients by central differences ---------
def _log_softmax(z):
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def py_token_loss(z, y, zt, adv, old, ref, o, z_sg=None):
    """l_t of sdar_loss/README.md; stop-gradient quantities are taken at ``z_sg`` (fixed under differences)."""
    tau = o["temperature"]
    lp = _log_softmax([v / tau for v in z])
    lp_sg = _log_softmax([v / tau for v in (z_sg or z)])
    lq = _log_softmax([v / tau for v in zt])
    p, q = [math.exp(v) for v in lp], [math.exp(v) for v in lq]
    H = -sum(a * b for a, b in zip(p, lp))
    gap = lq[y] - lp_sg[y]
    gate = 1.0 / (1.0 + math.exp(-o["gate_beta"] * gap))
    kind, b = o["distill"], o["jsd_beta"]
    if kind == "sampled":
        D = gate * (lq[y] - lp[y])
    elif kind == "reinforce":
        D = gate * (lp_sg[y] - lq[y]) * lp[y]
    else:
        kl_qp = sum(qi * (a - c) for qi, a, c in zip(q, lq, lp))
        kl_pq = sum(pi * (c - a) for pi, a, c in zip(p, lq, lp))
        if kind == "fkl" or b == 0.0:
            div = kl_qp
        elif kind == "rkl" or b == 1.0:
            div = kl_pq
        else:
            lm = [math.log(b * qi + (1 - b) * pi) for qi, pi in zip(q, p)]
            div = b * sum(qi * (a - m) for qi, a, m in zip(q, lq, lm)) + \
                (1 - b) * sum(pi * (c - m) for pi, c, m in zip(p, lp, lm))
        D = gate * div
    r = math.exp(lp[y] - old)
    pgc = max(-adv * r, -adv * min(max(r, 1 - o["clip_low"]), 1 + o["clip_high"]))
    pg = min(pgc, -adv * o["clip_ratio_c"]) if adv < 0 and o["clip_ratio_c"] is not None else pgc
    d = ref - lp[y]
    kl = min(max(math.exp(d) - d - 1.0, -10.0), 10.0)
    return pg + o["kl_coef"] * kl - o["entropy_coef"] * H + o["distill_coef"] * D


PY_OPTIONS = [
    {"distill": "sampled"}, {"distill": "reinforce", "gate_beta": 0.0}, {"distill": "fkl", "temperature": 0.6},
    {"distill": "rkl", "gate_beta": 1.0}, {"distill": "jsd", "jsd_beta": 0.3, "temperature": 1.7},
    {"distill": "jsd", "jsd_beta": 0.0}, {"distill": "jsd", "jsd_beta": 1.0}, {"clip_ratio_c": None},
]


@pytest.mark.parametrize("fn_name", FNS)
@pytest.mark.parametrize("opts", PY_OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_matches_pure_python_model(fn_name, opts):
    o = {"distill": "sampled", "gate_beta": 5.0, "distill_coef": 0.7, "jsd_beta": 0.5, "clip_low": 0.2,
         "clip_high": 0.28, "clip_ratio_c": 3.0, "kl_coef": 0.1, "entropy_coef": 0.05, "temperature": 1.0, **opts}
    N, V = 6, 5
    case = make_case(N, V, advantages="token", old_logprobs=True, ref_logprobs=True, mask="none", seed=3)
    out, grad = _call(fn_name, case, reduction="none", **o)
    up = torch.randn(N, generator=torch.Generator().manual_seed(1))  # run()'s upstream gradient
    h = 1e-5
    for t in range(N):
        z = case["logits"][t].double().tolist()
        args = (int(case["labels"][t]), case["teacher_logits"][t].double().tolist(),
                float(case["advantages"][t]), float(case["old_logprobs"][t]), float(case["ref_logprobs"][t]), o)
        assert out.loss[t].item() == pytest.approx(py_token_loss(z, *args), abs=3e-6, rel=1e-5)
        fd = [(py_token_loss(z[:v] + [z[v] + h] + z[v + 1:], *args, z_sg=z)
               - py_token_loss(z[:v] + [z[v] - h] + z[v + 1:], *args, z_sg=z)) / (2 * h) for v in range(V)]
        torch.testing.assert_close(grad[t].double(), up[t].double() * torch.tensor(fd, dtype=torch.float64),
                                   rtol=1e-4, atol=2e-6)


# ---- aggregation by hand from the per-token losses -------------------------------------------------------
@pytest.mark.parametrize("fn_name", FNS)
def test_aggregation_modes_by_hand(fn_name):
    B, T = 3, 4
    case = make_case((B, T), 13, advantages="seq", old_logprobs=True)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    case["mask"] = mask
    out, _ = _call(fn_name, case, reduction="none")
    lt = out.loss.double()
    assert (lt[~mask] == 0).all()
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(5))
    # verl 0.9 agg_loss: sequences count only when non-empty (rows 0 and 2 here: 2 sequences)
    expected = {
        "token-mean": lt.sum() / 4, "token-sum": lt.sum(), "seq-mean-token-sum": lt.sum() / 2,
        "seq-mean-token-mean": (lt[0].sum() / 3 + lt[2].sum() / 1) / 2,
        "seq-mean-token-sum-norm": lt.sum() / 2 / T,
    }
    for mode, value in expected.items():
        loss = _call(fn_name, case, loss_agg_mode=mode)[0].loss
        assert loss.item() == pytest.approx(value.item(), abs=1e-6), mode
        # dp_size multiplies every weight (undoing DDP's gradient averaging)
        loss = _call(fn_name, case, loss_agg_mode=mode, dp_size=4)[0].loss
        assert loss.item() == pytest.approx(4 * value.item(), abs=1e-6), mode
    # global counts from other data-parallel ranks
    assert _call(fn_name, case, num_tokens=10)[0].loss.item() == pytest.approx(lt.sum().item() / 10, abs=1e-6)
    assert _call(fn_name, case, num_tokens=torch.tensor(10))[0].loss.item() == \
        pytest.approx(lt.sum().item() / 10, abs=1e-6)
    for mode, per_seq in (("seq-mean-token-sum", lt.sum()), ("seq-mean-token-mean", lt[0].sum() / 3 + lt[2].sum())):
        got = _call(fn_name, case, loss_agg_mode=mode, num_sequences=torch.tensor(5.0))[0].loss
        assert got.item() == pytest.approx(per_seq.item() / 5, abs=1e-6), mode
    got = _call(fn_name, case, loss_agg_mode="seq-mean-token-sum-norm", num_sequences=3, loss_scale_factor=7)[0]
    assert got.loss.item() == pytest.approx(lt.sum().item() / 3 / 7, abs=1e-6)
    assert _call(fn_name, case, reduction="sum")[0].loss.item() == pytest.approx(lt.sum().item(), abs=1e-6)
    assert _call(fn_name, dict(case, loss_weights=w))[0].loss.item() == \
        pytest.approx((w.double() * lt).sum().item(), abs=1e-6)


@pytest.mark.parametrize("fn_name", FNS)
@pytest.mark.parametrize("count", [0, 0.0, 0.5, torch.tensor(0), torch.tensor(0.0), torch.tensor(0.25),
                                   torch.tensor(float("nan")), torch.tensor(-3.0)],
                         ids=["0", "0.0", "0.5", "t0", "t0.0", "t0.25", "tnan", "t-3"])
def test_counts_below_one_are_taken_as_one(fn_name, count):
    """A global count of 0 (an all-masked global batch) or a tensor count that cannot be checked without
    a sync is taken as 1: loss 0 on an all-masked batch, never NaN, and never a flipped sign. CPU tensors
    can be checked for free, so a negative or NaN one raises."""
    B, T = 2, 3
    case = make_case((B, T), 11, advantages="seq")
    for name, mode in (("num_tokens", "token-mean"), ("num_sequences", "seq-mean-token-sum")):
        if isinstance(count, torch.Tensor) and not (count >= 0):
            with pytest.raises(ValueError, match=name):
                _call(fn_name, case, loss_agg_mode=mode, **{name: count})
            continue
        full = _call(fn_name, case, loss_agg_mode=mode, **{name: 1})[0].loss
        got = _call(fn_name, case, loss_agg_mode=mode, **{name: count})[0].loss
        assert got.item() == pytest.approx(full.item(), abs=1e-7), name
        empty = _call(fn_name, dict(case, mask=torch.zeros(B, T, dtype=torch.bool)), loss_agg_mode=mode,
                      **{name: count})[0].loss
        assert empty.item() == 0.0, name


# ---- the oracle in fp64 and fp32 agree --------------------------------------------------------------------
@pytest.mark.parametrize("opts", [{"distill": "sampled"}, {"distill": "jsd", "jsd_beta": 0.3, "temperature": 0.7},
                                  {"distill": "rkl", "kl_coef": 0.1, "entropy_coef": 0.01}],
                         ids=["sampled", "jsd-tau0.7", "rkl-k3-entropy"])
def test_reference_fp64_and_fp32_agree(opts):
    case = make_case((3, 11), 2053, advantages="seq", old_logprobs=True, ref_logprobs=True,
                     mask="empty_rows", nan_masked=True, ignore_label=True)
    (o64, g64), (o32, g32) = (run(sdar_loss_reference, to_fp32(case), opts, compute_dtype=dt)
                              for dt in (torch.float64, torch.float32))
    for field in ("loss", "logprobs", "entropy", "gate", "gap"):
        torch.testing.assert_close(getattr(o32, field).double(), getattr(o64, field).double(), rtol=1e-5,
                                   atol=1e-5, msg=field)
    for k, v in o64.metrics.items():
        assert o32.metrics[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
    torch.testing.assert_close(g32, g64, rtol=1e-4, atol=1e-7)
    assert torch.isfinite(g64).all() and (g64[~case["mask"]] == 0).all()


@pytest.mark.parametrize("distill", ["sampled", "fkl", "rkl", "jsd"])
def test_reference_handles_minus_inf_logits(distill):
    """The oracle itself on -inf logits in kept rows (padded / banned vocabulary, student and teacher alike):
    finite gradient, equal to the same call with -inf replaced by -1e4 (probability exactly 0 either way)."""
    case = make_case(4, 67, advantages="token", mask="none")
    for k in ("logits", "teacher_logits"):
        case[k][:, -7:] = -math.inf
    case["labels"] = case["labels"].clamp_max(59)
    finite = {k: (v.masked_fill(v == -math.inf, -1e4) if k in ("logits", "teacher_logits") else v)
              for k, v in case.items()}
    opts = {"distill": distill, "distill_coef": 1.0, "entropy_coef": 0.1}
    for dt in (torch.float64, torch.float32):
        (a, ga), (b, gb) = (run(sdar_loss_reference, c, opts, compute_dtype=dt) for c in (case, finite))
        assert torch.isfinite(a.loss) and torch.equal(a.loss, b.loss)
        assert torch.isfinite(ga).all(), f"{int(ga.isnan().sum())} NaN gradient entries ({dt})"
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
