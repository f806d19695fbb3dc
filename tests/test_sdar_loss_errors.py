"""Every ValueError path of ``sdar_loss`` (and of the reference, which shares the validation): the message
names the offending argument (docs/api.md, "Limits and errors")."""

import math

import pytest
import torch

from sdar_kernels import sdar_loss
from sdar_kernels.reference import sdar_loss_reference

B, T, V = 2, 3, 37
NAN, INF = float("nan"), float("inf")


def _base():
    g = torch.Generator().manual_seed(0)
    return {
        "logits": torch.randn(B, T, V, generator=g),
        "labels": torch.randint(0, V, (B, T), generator=g),
        "teacher_logits": torch.randn(B, T, V, generator=g),
        "mask": torch.ones(B, T, dtype=torch.bool),
        "advantages": torch.randn(B, T, generator=g),
        "old_logprobs": -torch.rand(B, T, generator=g),
    }


# (id, changes to the base call (None removes an argument), argument the message must name)
BAD_INPUTS = [
    ("logits-not-tensor", {"logits": [[0.0] * V]}, "logits"),
    ("logits-int", {"logits": torch.zeros(B, T, V, dtype=torch.int64)}, "logits"),
    ("logits-fp64", {"logits": torch.zeros(B, T, V, dtype=torch.float64)}, "logits"),
    ("logits-1d", {"logits": torch.zeros(V), "labels": torch.zeros((), dtype=torch.int64),
                   "teacher_logits": None, "mask": None, "advantages": None, "old_logprobs": None}, "logits"),
    ("logits-empty-vocab", {"logits": torch.zeros(B, T, 0), "teacher_logits": None}, "logits"),
    ("labels-none", {"labels": None}, "labels"),
    ("labels-shape", {"labels": torch.zeros(B, T + 1, dtype=torch.int64)}, "labels"),
    ("labels-float", {"labels": torch.zeros(B, T)}, "labels"),
    ("labels-bool", {"labels": torch.zeros(B, T, dtype=torch.bool)}, "labels"),
    ("labels-eq-V", {"labels": torch.full((B, T), V)}, "labels"),
    ("labels-negative", {"labels": torch.full((B, T), -1)}, "labels"),
    ("labels-ignore-unmasked", {"labels": torch.full((B, T), -100)}, "labels"),
    ("labels-device", {"labels": torch.zeros(B, T, dtype=torch.int64, device="meta")}, "labels"),
    ("two-teacher-forms", {"teacher_logprobs": torch.zeros(B, T)}, "teacher_logprobs"),
    ("teacher-logits-shape", {"teacher_logits": torch.zeros(B, T, V + 1)}, "teacher_logits"),
    ("teacher-logits-fp64", {"teacher_logits": torch.zeros(B, T, V, dtype=torch.float64)}, "teacher_logits"),
    ("teacher-logits-device", {"teacher_logits": torch.zeros(B, T, V, device="meta")}, "teacher_logits"),
    ("teacher-logprobs-shape", {"teacher_logits": None, "teacher_logprobs": torch.zeros(B * T)},
     "teacher_logprobs"),
    ("teacher-logprobs-int", {"teacher_logits": None, "teacher_logprobs": torch.zeros(B, T, dtype=torch.int64)},
     "teacher_logprobs"),
    ("mask-shape", {"mask": torch.ones(B, T + 1, dtype=torch.bool)}, "mask"),
    ("mask-device", {"mask": torch.ones(B, T, dtype=torch.bool, device="meta")}, "mask"),
    ("advantages-shape", {"advantages": torch.zeros(B, T + 1)}, "advantages"),
    ("advantages-per-seq-length", {"advantages": torch.zeros(B + 1)}, "advantages"),
    ("advantages-int", {"advantages": torch.zeros(B, T, dtype=torch.int64)}, "advantages"),
    ("old-logprobs-shape", {"old_logprobs": torch.zeros(B)}, "old_logprobs"),
    ("old-logprobs-fp64", {"old_logprobs": torch.zeros(B, T, dtype=torch.float64)}, "old_logprobs"),
    ("ref-logprobs-shape", {"ref_logprobs": torch.zeros(T, B), "kl_coef": 0.1}, "ref_logprobs"),
    ("kl-without-ref", {"kl_coef": 0.1}, "ref_logprobs"),
    ("loss-weights-shape", {"loss_weights": torch.ones(B * T)}, "loss_weights"),
    ("loss-weights-int", {"loss_weights": torch.ones(B, T, dtype=torch.int32)}, "loss_weights"),
    ("num-tokens-negative", {"num_tokens": -4.0}, "num_tokens"),
    ("num-tokens-nan", {"num_tokens": NAN}, "num_tokens"),
    ("num-tokens-inf", {"num_tokens": INF}, "num_tokens"),
    ("num-tokens-bool", {"num_tokens": True}, "num_tokens"),
    ("num-tokens-str", {"num_tokens": "6"}, "num_tokens"),
    ("num-tokens-2-elements", {"num_tokens": torch.tensor([3.0, 3.0])}, "num_tokens"),
    ("num-tokens-bool-tensor", {"num_tokens": torch.tensor(True)}, "num_tokens"),
    ("num-tokens-negative-cpu-tensor", {"num_tokens": torch.tensor(-2)}, "num_tokens"),
    ("num-sequences-negative", {"num_sequences": -1}, "num_sequences"),
    ("num-sequences-nan-cpu-tensor", {"num_sequences": torch.tensor(NAN)}, "num_sequences"),
    ("loss-scale-factor-zero", {"loss_scale_factor": 0}, "loss_scale_factor"),
    ("loss-scale-factor-tensor", {"loss_scale_factor": torch.tensor(2.0)}, "loss_scale_factor"),
    ("dp-size-zero", {"dp_size": 0}, "dp_size"),
    ("dp-size-float", {"dp_size": 2.0}, "dp_size"),
    ("dp-size-bool", {"dp_size": True}, "dp_size"),
    ("mask-half", {"mask": torch.full((B, T), 0.5)}, "mask"),
    ("mask-two", {"mask": torch.full((B, T), 2, dtype=torch.int64)}, "mask"),
    ("teacher-logprobs-positive", {"teacher_logits": None, "teacher_logprobs": torch.full((B, T), 0.1)},
     "teacher_logprobs"),
    ("full-vocab-needs-teacher-logits", {"teacher_logits": None, "teacher_logprobs": torch.zeros(B, T),
                                         "distill": "fkl"}, "teacher_logits"),
    ("jsd-without-teacher", {"teacher_logits": None, "distill": "jsd"}, "teacher_logits"),
]


@pytest.mark.parametrize("fn", [sdar_loss, sdar_loss_reference], ids=["sdar_loss", "reference"])
@pytest.mark.parametrize("changes,argname", [pytest.param(c, a, id=i) for i, c, a in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(fn, changes, argname):
    kwargs = {**_base(), **changes}
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "labels"}
    logits, labels = kwargs.pop("logits"), kwargs.pop("labels")
    with pytest.raises(ValueError, match=argname):
        fn(logits, labels, **kwargs, backend="torch")


def test_sequence_modes_need_sequence_structure():
    g = torch.Generator().manual_seed(0)
    for mode in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        with pytest.raises(ValueError, match="loss_agg_mode"):
            sdar_loss(torch.randn(6, V, generator=g), torch.zeros(6, dtype=torch.int64), loss_agg_mode=mode,
                      advantages=torch.randn(6, generator=g))


# (id, option, bad value): non-finite / wrong-type hyperparameters and out-of-range values
BAD_OPTIONS = (
    [(f"{name}-{tag}", name, value)
     for name in ("gate_beta", "distill_coef", "jsd_beta", "clip_low", "clip_high", "kl_coef", "entropy_coef",
                  "temperature")
     for tag, value in (("nan", NAN), ("inf", INF), ("-inf", -INF), ("str", "0.5"), ("bool", True),
                        ("none", None), ("tensor", torch.tensor(0.5)))]
    + [
        ("clip_ratio_c-nan", "clip_ratio_c", NAN), ("clip_ratio_c-inf", "clip_ratio_c", INF),
        ("clip_ratio_c-1", "clip_ratio_c", 1.0), ("clip_ratio_c-0.5", "clip_ratio_c", 0.5),
        ("clip_ratio_c-bool", "clip_ratio_c", True), ("clip_ratio_c-str", "clip_ratio_c", "3"),
        ("temperature-0", "temperature", 0.0), ("temperature-neg", "temperature", -1.0),
        ("gate_beta-neg", "gate_beta", -1.0), ("clip_low-neg", "clip_low", -0.1),
        ("clip_high-neg", "clip_high", -0.1), ("kl_coef-neg", "kl_coef", -0.01),
        ("clip_low-1", "clip_low", 1.0), ("jsd_beta-1.5", "jsd_beta", 1.5), ("jsd_beta-neg", "jsd_beta", -0.1),
        ("distill-unknown", "distill", "kl"), ("distill-case", "distill", "FKL"),
        ("loss_agg_mode-unknown", "loss_agg_mode", "token_mean"), ("reduction-unknown", "reduction", "avg"),
        ("reduction-None", "reduction", None), ("backend-unknown", "backend", "cuda"),
        ("inplace_backward-int", "inplace_backward", 1), ("inplace_backward-str", "inplace_backward", "yes"),
    ]
)


@pytest.mark.parametrize("fn", [sdar_loss, sdar_loss_reference], ids=["sdar_loss", "reference"])
@pytest.mark.parametrize("name,value", [pytest.param(n, v, id=i) for i, n, v in BAD_OPTIONS])
def test_bad_options_raise_naming_the_option(fn, name, value):
    kwargs = _base()
    logits, labels = kwargs.pop("logits"), kwargs.pop("labels")
    with pytest.raises(ValueError, match=name):
        fn(logits, labels, **kwargs, **{name: value})


@pytest.mark.parametrize("name,value", [("jsd_beta", 0.0), ("jsd_beta", 1.0), ("gate_beta", 0.0),
                                        ("clip_low", 0.0), ("clip_ratio_c", None), ("clip_ratio_c", 1.5),
                                        ("temperature", 1e-3), ("entropy_coef", -0.01), ("distill_coef", 0),
                                        ("num_tokens", 1), ("num_tokens", torch.tensor(5))])
def test_boundary_values_are_accepted(name, value):
    kwargs = _base()
    logits, labels = kwargs.pop("logits"), kwargs.pop("labels")
    out = sdar_loss(logits, labels, **kwargs, **{name: value}, backend="torch")
    assert math.isfinite(out.loss.item())


def test_labels_out_of_range_on_masked_tokens_are_accepted():
    kwargs = _base()
    logits, labels = kwargs.pop("logits"), kwargs.pop("labels").clone()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = False
    labels[0, 1], labels[1, 2] = -100, V + 5
    kwargs["mask"] = mask
    for fn in (sdar_loss, sdar_loss_reference):
        out = fn(logits, labels, **kwargs)
        assert torch.isfinite(out.loss)
    mask[1, 2] = True
    with pytest.raises(ValueError, match="labels"):
        sdar_loss(logits, labels, **kwargs)


def test_triton_backend_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kwargs = _base()
    logits, labels = kwargs.pop("logits"), kwargs.pop("labels")
    with pytest.raises(ValueError, match="backend"):
        sdar_loss(logits, labels, **kwargs, backend="triton")


@pytest.mark.parametrize("fn", [sdar_loss, sdar_loss_reference], ids=["sdar_loss", "reference"])
def test_a_call_without_any_loss_term_raises(fn):
    """No teacher, no advantages, no KL, no entropy: the loss would be 0 whatever the logits; refuse it.
    Each term alone makes the call valid."""
    base = _base()
    logits, labels = base["logits"], base["labels"]
    with pytest.raises(ValueError, match="no loss term is active"):
        fn(logits, labels)
    with pytest.raises(ValueError, match="no loss term is active"):
        fn(logits, labels, teacher_logits=base["teacher_logits"], distill_coef=0.0)
    for term in ({"teacher_logits": base["teacher_logits"]}, {"advantages": base["advantages"]},
                 {"kl_coef": 0.1, "ref_logprobs": base["old_logprobs"]}, {"entropy_coef": 0.01}):
        assert torch.isfinite(fn(logits, labels, **term).loss)
