"""The logits-free log-prob kernel (linear_sdar_loss/logprob_launch.py) against eager fp32 logits.

The oracle materialises z = h W^T + b in float64 from the same (possibly bf16) inputs; the eager baseline is
the row engine's semantics, fp32 logits and log_softmax. The kernel must stay within 2x the eager error
plus a small atol. Small tiles make every case cross row-block, vocabulary-tile and H-step boundaries.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close_to_oracle
from sdar_kernels.linear_sdar_loss.logprob_launch import TileConfig, linear_logprobs, vocab_splits

if not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs CUDA or the Triton interpreter", allow_module_level=True)

# 16 rows x 64 columns x 32-deep steps: N = 37 spans 3 row blocks, V = 301 5 tiles (the last partial),
# H = 40 two steps (the second partial)
SMALL = TileConfig(block_n=16, block_v=64, block_h=32, group_rows=2, num_warps=4, num_stages=1, ctas_per_sm=1)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATOL = 2e-6


def make(N, H, V, dtype, *, bias=True, mask=True, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * scale * H ** -0.5 * 3).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    keep = torch.rand(N, generator=g) > 0.25 if mask else None
    return dict(hidden=hidden, weight=weight, bias=b, labels=labels, mask=keep)


def reference(case, temperature, dtype):
    """(logprobs, lse, entropy) from materialised logits in ``dtype`` (float64: oracle; float32: eager)."""
    z = case["hidden"].to(dtype) @ case["weight"].to(dtype).T
    if case["bias"] is not None:
        z = z + case["bias"].to(dtype)
    s = z / temperature
    logp_all = torch.log_softmax(s, dim=-1)
    keep = case["mask"] if case["mask"] is not None else torch.ones(len(z), dtype=torch.bool)
    logp = logp_all.gather(1, case["labels"].clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
    lse = torch.logsumexp(s, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return tuple(torch.where(keep, t, 0.0).float() for t in (logp, lse, entropy))


def check(case, *, temperature=1.0, entropy=True, **launch):
    out = linear_logprobs(**case, temperature=temperature, entropy=entropy, **launch)
    oracle = reference(case, temperature, torch.float64)
    eager = reference(case, temperature, torch.float32)
    names = ("logprobs", "lse", "entropy") if entropy else ("logprobs", "lse")
    for i, name in enumerate(names):
        assert_close_to_oracle(getattr(out, name), oracle[i], eager[i], name, atol=ATOL)
    if not entropy:
        assert out.entropy is None
    return out


# (id, N, H, V, dtype, case kwargs, call kwargs)
CASES = [
    ("fp32-bias-mask-entropy", 37, 40, 301, "fp32", dict(), dict()),
    ("bf16-bias-mask-temp", 37, 40, 301, "bf16", dict(), dict(temperature=0.7)),
    ("fp16-nobias-nomask-noentropy", 37, 40, 301, "fp16", dict(bias=False, mask=False), dict(entropy=False)),
    ("bf16-2-uneven-splits", 37, 40, 301, "bf16", dict(), dict(splits=2)),
    ("fp32-one-split-temp", 21, 33, 129, "fp32", dict(bias=False), dict(splits=1, temperature=1.3)),
    ("bf16-confident-rows", 19, 40, 197, "bf16", dict(scale=60.0), dict()),
]


@pytest.mark.parametrize("cid,N,H,V,dt,ckw,kw", CASES, ids=[c[0] for c in CASES])
def test_against_oracle(cid, N, H, V, dt, ckw, kw):
    check(make(N, H, V, DTYPES[dt], **ckw), config=SMALL, **kw)


def test_default_tiles_and_splits():
    """The launch a caller gets (tile table, split heuristic), on one odd shape."""
    check(make(70, 48, 517, torch.bfloat16))


def test_reads_only_its_rows_columns_and_vocabulary():
    """hidden / weight as strided views into NaN-filled buffers: any read outside [N, H] / [V, H] (rows
    past N, columns past H, vocabulary rows past V) would turn results NaN."""
    case = make(37, 40, 301, torch.bfloat16)
    hbuf = torch.full((41, 56), float("nan"), dtype=torch.bfloat16)
    hbuf[2:39, 3:43] = case["hidden"]
    wbuf = torch.full((305, 48), float("nan"), dtype=torch.bfloat16)
    wbuf[1:302, :40] = case["weight"]
    strided = dict(case, hidden=hbuf[2:39, 3:43], weight=wbuf[1:302, :40])
    assert strided["hidden"].stride() == (56, 1)
    out = check(strided, config=SMALL, splits=3)
    assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all()


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_hidden_poisons_only_its_row(bad):
    case = make(37, 40, 301, torch.bfloat16)
    keep = case["mask"]
    live, masked = int(keep.nonzero()[3]), int((~keep).nonzero()[0])
    case["hidden"][live, 5] = float(bad)
    case["hidden"][masked] = float(bad)
    out = linear_logprobs(**case, entropy=True, config=SMALL, splits=2)
    for t in out:
        assert t[live].isnan(), "a non-finite hidden state must make its own row NaN"
        assert t[masked] == 0, "a masked row is 0 whatever its hidden state holds"
    others = torch.ones(37, dtype=torch.bool)
    others[live] = False
    clean = dict(case, mask=keep & others)
    ref = check(clean, config=SMALL, splits=2)
    for got, want in zip(out, ref):
        assert torch.equal(got[others], want[others]), "other rows must not see the non-finite row"


def test_labels_out_of_range_and_masked_rows():
    case = make(37, 40, 301, torch.float32)
    keep = case["mask"]
    rows = keep.nonzero().reshape(-1)
    case["labels"][rows[0]] = 301            # one past V
    case["labels"][rows[1]] = -3
    case["labels"][rows[2]] = 2 ** 40        # beyond int32: must not wrap into range
    case["labels"][~keep] = -100             # ignore index on masked rows: fine
    out = linear_logprobs(**case, entropy=True, config=SMALL)
    bad = rows[:3]
    assert out.logprobs[bad].isnan().all()
    assert torch.isfinite(out.lse[bad]).all() and torch.isfinite(out.entropy[bad]).all()
    assert (out.logprobs[~keep] == 0).all() and (out.lse[~keep] == 0).all()
    good = keep.clone()
    good[bad] = False
    ref = reference(dict(case, mask=good), 1.0, torch.float64)
    torch.testing.assert_close(out.logprobs[good], ref[0][good], atol=1e-5, rtol=1e-5)


def test_all_masked_and_empty():
    case = make(37, 40, 301, torch.bfloat16)
    case["mask"] = torch.zeros(37, dtype=torch.bool)
    case["hidden"][:] = float("nan")
    out = linear_logprobs(**case, entropy=True, config=SMALL)
    assert all((t == 0).all() for t in out)
    empty = linear_logprobs(case["hidden"][:0], case["weight"], case["labels"][:0])
    assert empty.logprobs.shape == (0,) and empty.entropy is None


def test_split_heuristic():
    def plan(R, T, slots=132):
        """(splits, fraction of the SM-time doing work) of R row blocks x T vocabulary tiles."""
        s, per = vocab_splits(R, T, 8, slots)
        assert (s - 1) * per < T <= s * per, "every split holds at least one vocabulary tile"
        waves = -(-R * s // slots)
        return s, R * T / (waves * slots * per)
    # N = 64 (one row block) at V = 151936 (594 tiles of 256): the vocabulary spreads over most SMs
    s, busy = plan(1, 594)
    assert s >= 100 and busy >= 0.9
    # N = 1024 / 8192 (8 / 64 row blocks): no partial last wave (8 x ceil(132 / 8) = 136 programs would
    # leave 128 SMs idle through a second wave)
    assert plan(8, 594)[1] >= 0.95 and plan(64, 594)[1] >= 0.95
    assert vocab_splits(3, 5, 8, 132) == (5, 1)          # never more splits than vocabulary tiles
    for R, T in [(1, 1), (2, 7), (9, 1000), (512, 1024)]:
        plan(R, T)


@pytest.mark.parametrize("change,match", [
    (dict(weight=torch.zeros(301, 40, dtype=torch.float32)), "weight must have dtype"),
    (dict(weight=torch.zeros(301, 39, dtype=torch.bfloat16)), "weight must be"),
    (dict(bias=torch.zeros(300)), "bias must have shape"),
    (dict(labels=torch.zeros(36, dtype=torch.int64)), "labels must have shape"),
    (dict(labels=torch.zeros(37)), "labels must have dtype"),
    (dict(mask=torch.ones(37, dtype=torch.uint8)), "mask must have dtype"),
    (dict(hidden=torch.zeros(37, dtype=torch.bfloat16)), "hidden must be"),
])
def test_bad_input_names_the_argument(change, match):
    case = dict(make(37, 40, 301, torch.bfloat16), **change)
    with pytest.raises(ValueError, match=match):
        linear_logprobs(**case)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(tau):
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(**make(5, 8, 11, torch.float32), temperature=tau)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [40, 1000])
def test_cuda_default_launch_against_fp32_logits(N):
    """Tensor-core tiles at a model-like vocabulary (CUDA only), and no host sync in the launch."""
    case = {k: (v.cuda() if v is not None else None) for k, v in make(N, 512, 50257, torch.bfloat16).items()}
    linear_logprobs(**case, entropy=True)            # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = linear_logprobs(**case, entropy=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    oracle = reference({k: (v.cpu() if v is not None else None) for k, v in case.items()}, 1.0, torch.float64)
    eager = reference(case, 1.0, torch.float32)
    for got, o, e, name in zip(out, oracle, eager, ("logprobs", "lse", "entropy")):
        assert_close_to_oracle(got, o, e, name, atol=1e-5)
