"""Case tables: ``sdar_kernels.sdar_loss`` (torch and Triton backends) against the float64 reference.

Every table holds odd, non-power-of-two vocabularies and one crossing a block boundary (torch: 4097 and a
multi-chunk case above CHUNK_ELEMENTS; Triton: 2049 over a 1024..4096 BLOCK_V, and 32003). The Triton
backend runs under the CPU interpreter without CUDA, which is slow: its tables are small, one case per
option; full cross-products run on the torch backend only.
"""

import pytest
import torch

from helpers import DTYPES, assert_close_to_oracle, check_against_oracle, make_case, run, to_fp32
from sdar_kernels import sdar_loss
from sdar_kernels.reference import sdar_loss_reference

# (id, make_case kwargs, sdar_loss options): one entry per option of the per-token math (sdar_loss/README.md)
OPTION_CASES = [
    ("sampled", {}, {"distill": "sampled"}),
    ("reinforce", {}, {"distill": "reinforce"}),
    ("fkl", {}, {"distill": "fkl"}),
    ("rkl", {}, {"distill": "rkl"}),
    ("jsd", {}, {"distill": "jsd"}),
    ("jsd-b0.2", {}, {"distill": "jsd", "jsd_beta": 0.2}),
    ("jsd-b0", {}, {"distill": "jsd", "jsd_beta": 0.0}),
    ("jsd-b1", {}, {"distill": "jsd", "jsd_beta": 1.0}),
    ("gate0", {}, {"gate_beta": 0.0, "distill_coef": 1.0}),
    ("gate5-coef1", {}, {"gate_beta": 5.0, "distill_coef": 1.0}),
    ("teacher-logprobs", {"teacher": "logprobs"}, {"distill": "reinforce"}),
    ("pg", {"teacher": None, "advantages": "token", "old_logprobs": True}, {}),
    ("pg-nodual", {"teacher": None, "advantages": "token", "old_logprobs": True},
     {"clip_ratio_c": None, "clip_low": 0.1, "clip_high": 0.28}),
    ("pg-onpolicy", {"teacher": None, "advantages": "token"}, {}),
    ("k3", {"teacher": None, "ref_logprobs": True}, {"kl_coef": 0.1}),
    ("entropy", {"teacher": None}, {"entropy_coef": 0.01}),
    ("tau0.7-fkl", {}, {"distill": "fkl", "temperature": 0.7}),
    ("all-terms", {"advantages": "token", "old_logprobs": True, "ref_logprobs": True},
     {"distill": "jsd", "distill_coef": 0.5, "gate_beta": 2.0, "kl_coef": 0.05, "entropy_coef": 0.01,
      "temperature": 1.3}),
]
OPTIONS = {name: (kw, opts) for name, kw, opts in OPTION_CASES}

# torch: every option at every dtype (mean) and reduction (fp32); the [B, T] shape at V=4097 for every option
TORCH_SHAPES = [(37, 997), ((3, 5), 4097)]


def _id(shape, V, dtype, name, reduction):
    s = f"N{shape}" if isinstance(shape, int) else f"B{shape[0]}T{shape[1]}"
    return f"V{V}-{s}-{dtype}-{name}-{reduction}"


def _table(shapes, dtypes, names, reductions):
    return [pytest.param(shape, V, dt, name, red, id=_id(shape, V, dt, name, red))
            for shape, V in shapes for dt in dtypes for name in names for red in reductions]


def _check(backend, shape, V, dtype, name, reduction, device="cpu", **case_overrides):
    kw, opts = OPTIONS[name]
    case = make_case(shape, V, DTYPES[dtype], device=device, **{**kw, **case_overrides})
    options = {**opts, "reduction": reduction, "backend": backend}
    check_against_oracle(run(sdar_loss, case, options), case, options)


TORCH_CASES = (_table(TORCH_SHAPES[:1], DTYPES, OPTIONS, ["mean"])
               + _table(TORCH_SHAPES[1:], ["fp32"], OPTIONS, ["mean"])
               + _table(TORCH_SHAPES[:1], ["fp32"], OPTIONS, ["sum", "none"])
               + _table(TORCH_SHAPES[:1], ["bf16"], ["all-terms", "sampled", "jsd", "pg"], ["sum", "none"])
               + _table(TORCH_SHAPES[1:], ["bf16", "fp16"], ["all-terms", "jsd"], ["mean", "none"])
               + _table([(4, 32003)], ["bf16"], ["all-terms"], ["mean"]))


@pytest.mark.parametrize("shape,V,dtype,name,reduction", TORCH_CASES)
def test_torch_options(shape, V, dtype, name, reduction):
    _check("torch", shape, V, dtype, name, reduction)


# Triton (interpreter on CPU): one case per option, then dtypes / reductions / block-crossing sizes.
TRITON_CASES = (
    _table([(5, 997)], ["fp32"], OPTIONS, ["mean"])
    + _table([(5, 997)], ["bf16", "fp16"], ["all-terms", "sampled", "jsd"], ["mean"])
    + _table([(5, 997)], ["fp32"], ["all-terms", "pg", "fkl"], ["sum", "none"])
    + _table([((2, 3), 2049)], ["bf16"], ["all-terms", "rkl"], ["mean", "none"])
    + _table([(3, 32003)], ["bf16"], ["all-terms"], ["mean"])
    + _table([(2, 32003)], ["fp32"], ["jsd"], ["none"])
)


@pytest.mark.parametrize("shape,V,dtype,name,reduction", TRITON_CASES)
def test_triton_options(shape, V, dtype, name, reduction, device):
    _check("triton", shape, V, dtype, name, reduction, device=device)


# ---- aggregation: every loss_agg_mode, loss_weights, num_tokens; [N, V] and [B, T, V] --------------------
AGG_CASES = [
    # (id, shape, make_case kwargs, options)
    ("token-mean-flat", 29, {"advantages": "token"}, {"loss_agg_mode": "token-mean"}),
    ("token-mean-numtokens", 29, {"advantages": "token", "num_tokens": 50.0}, {}),
    ("token-mean-numtokens-tensor", (3, 7), {"advantages": "seq", "num_tokens": torch.tensor(40)}, {}),
    ("loss-weights-flat", 29, {"advantages": "token", "loss_weights": True}, {}),
    ("loss-weights-bt", (3, 7), {"advantages": "seq", "loss_weights": True},
     {"loss_agg_mode": "seq-mean-token-mean"}),  # explicit weights override the mode
    ("token-mean-bt-seqadv", (3, 7), {"advantages": "seq"}, {"loss_agg_mode": "token-mean"}),
    ("seq-mean-token-sum", (3, 7), {"advantages": "seq"}, {"loss_agg_mode": "seq-mean-token-sum"}),
    ("seq-mean-token-mean", (3, 7), {"advantages": "seq"}, {"loss_agg_mode": "seq-mean-token-mean"}),
    ("seq-mean-token-sum-norm", (3, 7), {"advantages": "seq"}, {"loss_agg_mode": "seq-mean-token-sum-norm"}),
    ("seq-mean-token-mean-tokadv", (4, 5), {"advantages": "token"}, {"loss_agg_mode": "seq-mean-token-mean"}),
]


def _agg_params(V, dtype, names=None):
    return [pytest.param(shape, kw, opts, V, dtype, id=f"V{V}-{dtype}-{name}")
            for name, shape, kw, opts in AGG_CASES if names is None or name in names]


def _check_agg(backend, shape, kw, opts, V, dtype, device="cpu"):
    case = make_case(shape, V, DTYPES[dtype], device=device, mask="empty_rows", old_logprobs=True, **kw)
    options = {**opts, "backend": backend}
    check_against_oracle(run(sdar_loss, case, options), case, options)


@pytest.mark.parametrize("shape,kw,opts,V,dtype", _agg_params(997, "fp32") + _agg_params(8193, "bf16"))
def test_torch_aggregation(shape, kw, opts, V, dtype):
    _check_agg("torch", shape, kw, opts, V, dtype)


@pytest.mark.parametrize("shape,kw,opts,V,dtype", _agg_params(
    509, "fp32", ["token-mean-numtokens", "loss-weights-flat", "seq-mean-token-sum", "seq-mean-token-mean",
                  "seq-mean-token-sum-norm"]) + _agg_params(2049, "bf16", ["seq-mean-token-mean"]))
def test_triton_aggregation(shape, kw, opts, V, dtype, device):
    if isinstance(shape, int):
        shape = min(shape, 12)
    _check_agg("triton", shape, kw, opts, V, dtype, device=device)


# ---- masks: empty rows, NaN/inf in masked rows, ignore labels, no mask -----------------------------------
MASK_CASES = [
    ("empty-rows", {"mask": "empty_rows"}),
    ("nan-masked", {"mask": "empty_rows", "nan_masked": True}),
    ("ignore-label-nan", {"nan_masked": True, "ignore_label": True}),
    ("no-mask", {"mask": "none"}),
]


def _mask_params(shapes, dtypes, names=None):
    return [pytest.param(shape, V, dt, kw, id=f"V{V}-{dt}-{name}-{'flat' if isinstance(shape, int) else 'bt'}")
            for shape, V in shapes for dt in dtypes for name, kw in MASK_CASES if names is None or name in names]


def _check_mask(backend, shape, V, dtype, kw, device="cpu"):
    case = make_case(shape, V, DTYPES[dtype], device=device, advantages="token", old_logprobs=True,
                     ref_logprobs=True, **kw)
    for reduction in ("mean", "none"):
        options = {**OPTIONS["all-terms"][1], "reduction": reduction, "backend": backend}
        check_against_oracle(run(sdar_loss, case, options), case, options)


@pytest.mark.parametrize("shape,V,dtype,kw", _mask_params([(23, 1031), ((3, 6), 4097)], ["fp32", "bf16"]))
def test_torch_masks(shape, V, dtype, kw):
    _check_mask("torch", shape, V, dtype, kw)


@pytest.mark.parametrize("shape,V,dtype,kw", _mask_params([(9, 1031)], ["fp32"])
                         + _mask_params([((2, 4), 2049)], ["bf16"], ["nan-masked"]))
def test_triton_masks(shape, V, dtype, kw, device):
    _check_mask("triton", shape, V, dtype, kw, device=device)


# Confident rows (large logits, sampled token ~ argmax, log p ~ -1e-4) as in RL on a trained LLM: the
# log-prob must not lose the absolute precision that log_softmax keeps by subtracting the row max first.
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("scale", [12.0, 40.0], ids=["scale12", "scale40"])
def test_peaked_rows(backend, dtype, scale, device):
    case = make_case(8, 2049, DTYPES[dtype], device=device if backend == "triton" else "cpu", scale=scale,
                     advantages="token", old_logprobs=True, mask="none")
    options = {"distill": "rkl", "distill_coef": 1.0, "entropy_coef": 0.1, "backend": backend}
    check_against_oracle(run(sdar_loss, case, options), case, options)


def test_torch_multiple_chunks():
    """N * V above CHUNK_ELEMENTS (2^22): the torch backend processes the rows in several chunks."""
    from sdar_kernels.sdar_loss.torch_impl import CHUNK_ELEMENTS
    N, V = 300, 16411
    assert N * V > CHUNK_ELEMENTS
    case = make_case(N, V, torch.bfloat16, advantages="token", old_logprobs=True, ref_logprobs=True,
                     mask="empty_rows", nan_masked=True)
    options = {**OPTIONS["all-terms"][1], "backend": "torch"}
    check_against_oracle(run(sdar_loss, case, options), case, options)


def _triton_vs_reference_chunked(N, V, chunk, device):
    """Triton on one [N, V] bf16 call (reduction "none", random upstream) vs the fp64 reference and the
    eager reference run on row chunks, so the reference's fp64 [chunk, V] temporaries bound the memory."""
    case = make_case(N, V, torch.bfloat16, device=device, advantages="token", old_logprobs=True,
                     ref_logprobs=True, nan_masked=True)
    options = {**OPTIONS["all-terms"][1], "reduction": "none"}
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(device)
    out, grad = run(sdar_loss, case, {**options, "backend": "triton"}, upstream=upstream)
    for r0 in range(0, N, chunk):
        rows = slice(r0, r0 + chunk)
        part = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
        o64, g64 = run(sdar_loss_reference, to_fp32(part), options, upstream=upstream[rows],
                       compute_dtype=torch.float64)
        oe, ge = run(sdar_loss_reference, part, options, upstream=upstream[rows])
        for field in ("loss", "logprobs", "entropy", "gate", "gap"):
            assert_close_to_oracle(getattr(out, field)[rows], getattr(o64, field), getattr(oe, field),
                                   f"{field}[{r0}:{r0 + chunk}]", atol=1e-5)
        assert_close_to_oracle(grad[rows], g64, ge, f"grad[{r0}:{r0 + chunk}]", atol=1e-5,
                               rtol=torch.finfo(torch.bfloat16).eps)
        assert (grad[rows][~part["mask"]] == 0).all()


@pytest.mark.gpu
def test_triton_large_bf16_against_reference_chunked():
    """Model-sized call (N = 8192 tokens, Qwen vocabulary V = 151936), bf16."""
    _triton_vs_reference_chunked(8192, 151936, 512, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("N", [64, 1024], ids=["N64-vocabulary-splits", "N1024-one-program-per-row"])
@pytest.mark.parametrize("beta,tau", [(0.1, 1.0), (0.5, 0.7), (0.9, 2.0)])
def test_jsd_hardware_log2_accuracy(beta, tau, N):
    """jsd's log-space mixture takes the hardware log2 (lg2.approx, error < 2^-22 on [1, 2]) on a GPU, where
    the interpreter uses the accurate one: at the Qwen vocabulary, loss, outputs and gradient stay within the
    oracle rule (2x eager's error against fp64 + 1e-5 absolute; the gradient one bf16 ulp more)."""
    case = make_case(N, 151936, torch.bfloat16, device="cuda", advantages="token", nan_masked=True)
    options = {"distill": "jsd", "jsd_beta": beta, "distill_coef": 1.0, "temperature": tau, "reduction": "none"}
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2)).cuda()
    out, grad = run(sdar_loss, case, {**options, "backend": "triton"}, upstream=upstream)
    for r0 in range(0, N, 256):
        rows = slice(r0, r0 + 256)
        part = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
        o64, g64 = run(sdar_loss_reference, to_fp32(part), options, upstream=upstream[rows],
                       compute_dtype=torch.float64)
        oe, ge = run(sdar_loss_reference, part, options, upstream=upstream[rows])
        for field in ("loss", "logprobs", "entropy", "gate", "gap"):
            assert_close_to_oracle(getattr(out, field)[rows], getattr(o64, field), getattr(oe, field), field,
                                   atol=1e-5)
        assert_close_to_oracle(grad[rows], g64, ge, "grad", atol=1e-5, rtol=torch.finfo(torch.bfloat16).eps)
