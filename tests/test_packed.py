"""Packed sequences (the remove-padding layout): ``packed_loss_weights`` gives the padded layout's loss and
gradient for every ``loss_agg_mode``; ``global_counts`` / ``local_counts`` count packed and padded alike."""

import pytest
import torch

import sdar_kernels as sk
from sdar_kernels.data_parallel import local_counts
from sdar_kernels.packed import sequence_ids
from sdar_kernels.sdar_loss.options import LOSS_AGG_MODES

V = 37
# lengths of the sequences of one batch: an empty one, one whose tokens are all masked (prompt only),
# one of a single token; the padded batch is wider than the longest sequence
LENGTHS = [5, 0, 4, 1, 7, 3]
PAD_T = 9


def padded_and_packed(seed=0):
    """The same sequences as a padded [B, T, V] batch and as one packed row [1, total, V]."""
    g = torch.Generator().manual_seed(seed)
    B, total = len(LENGTHS), sum(LENGTHS)
    real = torch.zeros(B, PAD_T, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        real[b, :n] = True
    mask = real & (torch.rand(B, PAD_T, generator=g) < 0.7)
    mask[2] = False                       # a sequence with tokens, none of them in the loss
    mask[3, 0] = True
    mask[4, :2] = True
    padded = {
        "logits": torch.randn(B, PAD_T, V, generator=g) * 2,
        "teacher_logits": torch.randn(B, PAD_T, V, generator=g) * 2,
        "labels": torch.randint(0, V, (B, PAD_T), generator=g),
        "mask": mask,
        "advantages": torch.randn(B, PAD_T, generator=g),
        "old_logprobs": -torch.rand(B, PAD_T, generator=g) * 3,
        "ref_logprobs": -torch.rand(B, PAD_T, generator=g) * 3,
    }
    # packing: the real tokens of every row, in order (what verl's unpad_input does)
    packed = {k: v[real].unsqueeze(0) for k, v in padded.items()}
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist())
    assert packed["logits"].shape == (1, total, V)
    return padded, packed, real, cu


OPTIONS = dict(distill="fkl", kl_coef=0.05, entropy_coef=0.01, distill_coef=0.3)


def loss_and_grad(case, **kw):
    logits = case["logits"].clone().requires_grad_(True)
    out = sk.sdar_loss(logits, **{k: v for k, v in case.items() if k != "logits"}, **OPTIONS, **kw)
    out.loss.backward()
    return out.loss.detach(), logits.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_packed_weights_give_the_padded_loss_and_gradient(mode, backend):
    padded, packed, real, cu = padded_and_packed()
    ref_loss, ref_grad = loss_and_grad(padded, loss_agg_mode=mode, backend=backend)
    # S of seq-mean-token-sum-norm: the padded layout divides by its padded length T
    scale = PAD_T if mode == "seq-mean-token-sum-norm" else None
    w = sk.packed_loss_weights(packed["mask"], cu_seqlens=cu, loss_agg_mode=mode, loss_scale_factor=scale)
    assert w.shape == packed["mask"].shape and w.dtype == torch.float32
    loss, grad = loss_and_grad(packed, loss_weights=w, backend=backend)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad[0], ref_grad[real], rtol=1e-5, atol=1e-8)
    assert torch.count_nonzero(ref_grad[~real]) == 0
    assert float(loss) != 0.0


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_packed_weights_with_global_counts_match_the_padded_ones(mode):
    """Under data parallelism the counts are global and dp_size scales the weights: same on both layouts."""
    padded, packed, real, cu = padded_and_packed(seed=1)
    counts = dict(num_tokens=torch.tensor(41.0), num_sequences=torch.tensor(13.0), loss_scale_factor=11.0)
    ref_loss, ref_grad = loss_and_grad(padded, loss_agg_mode=mode, dp_size=3, **counts)
    w = sk.packed_loss_weights(packed["mask"], cu_seqlens=cu, loss_agg_mode=mode, **counts)
    loss, grad = loss_and_grad(packed, loss_weights=w, dp_size=3)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad[0], ref_grad[real], rtol=1e-5, atol=1e-8)


def test_cu_seqlens_and_sequence_ids_agree():
    _, packed, _, cu = padded_and_packed()
    ids = sequence_ids(cu[-1].item(), cu_seqlens=cu)
    assert ids.tolist() == [s for s, n in enumerate(LENGTHS) for _ in range(n)]
    # any labelling of the sequences works, contiguous or not: relabel them and swap token 0 (of the first
    # sequence) with token 5 (of the third), so that both sequences are split in two
    perm = torch.arange(ids.numel())
    perm[[0, 5]] = perm[[5, 0]]
    relabel = torch.tensor([4, 9, 0, 2, 7, 1])[ids][perm]
    for mode in LOSS_AGG_MODES:
        kw = dict(loss_agg_mode=mode, loss_scale_factor=PAD_T)
        a = sk.packed_loss_weights(packed["mask"], cu_seqlens=cu, **kw)
        b = sk.packed_loss_weights(packed["mask"][:, perm], seq_ids=relabel, **kw)
        torch.testing.assert_close(b, a[:, perm], rtol=0, atol=0, msg=mode)


def test_counts_of_packed_and_padded_layouts_are_the_same():
    padded, packed, _, cu = padded_and_packed()
    want = [int(padded["mask"].sum()), int(padded["mask"].any(-1).sum())]
    assert local_counts(padded["mask"]).tolist() == want
    assert local_counts(packed["mask"], cu_seqlens=cu).tolist() == want
    # without torch.distributed: local counts over every micro-batch, dp_size 1
    c = sk.global_counts([padded["mask"], packed["mask"]], cu_seqlens=[None, cu])
    assert c["dp_size"] == 1 and c["num_tokens"].item() == 2 * want[0] and c["num_sequences"].item() == 2 * want[1]
    assert c["num_tokens"].dtype == torch.float32 and c["num_tokens"].dim() == 0
    # a 1-D mask is one sequence; an all-masked one none
    assert local_counts(torch.tensor([0, 1, 1])).tolist() == [2, 1]
    assert local_counts(torch.zeros(4)).tolist() == [0, 0]


def test_all_masked_packed_row_gives_zero_weights_not_nan():
    cu = torch.tensor([0, 2, 5])
    for mode in LOSS_AGG_MODES:
        w = sk.packed_loss_weights(torch.zeros(1, 5, dtype=torch.bool), cu_seqlens=cu, loss_agg_mode=mode,
                                   loss_scale_factor=4)
        assert torch.equal(w, torch.zeros(1, 5)), mode


@pytest.mark.parametrize("kw,match", [
    (dict(), "exactly one of cu_seqlens and seq_ids"),
    (dict(cu_seqlens=torch.tensor([0, 2, 5]), seq_ids=torch.zeros(5, dtype=torch.long)), "exactly one"),
    (dict(cu_seqlens=torch.tensor([1, 2, 5])), "cu_seqlens must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 3, 2, 5])), "never decrease"),
    (dict(cu_seqlens=torch.tensor([0, 2, 4])), "end at the token count 5"),
    (dict(cu_seqlens=torch.tensor([0.0, 5.0])), "cu_seqlens must be a 1-D integer tensor"),
    (dict(cu_seqlens=torch.tensor([[0, 5]])), "cu_seqlens must be a 1-D integer tensor"),
    (dict(seq_ids=torch.tensor([0, 0, 1, 1])), "seq_ids has 4 entries for 5 tokens"),
    (dict(seq_ids=torch.tensor([0, 0, 1, 1, 5])), r"seq_ids must lie in \[0, 5\)"),
    (dict(seq_ids=torch.tensor([0, 0, 1, 1, -1])), r"seq_ids must lie in \[0, 5\)"),
    (dict(seq_ids=torch.zeros(5)), "seq_ids must be an integer tensor"),
    (dict(cu_seqlens=torch.tensor([0, 5]), loss_agg_mode="seq-mean"), "loss_agg_mode must be one of"),
    (dict(cu_seqlens=torch.tensor([0, 5]), loss_agg_mode="seq-mean-token-sum-norm"), "loss_scale_factor is required"),
    (dict(cu_seqlens=torch.tensor([0, 5]), loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=0.0),
     "loss_scale_factor must be a positive"),
    (dict(cu_seqlens=torch.tensor([0, 5]), num_tokens=-1), "num_tokens"),
    (dict(cu_seqlens=torch.tensor([0, 5]), num_sequences=float("nan")), "num_sequences"),
])
def test_packed_weights_errors_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        sk.packed_loss_weights(torch.ones(1, 5, dtype=torch.bool), **kw)


def test_mask_errors_name_the_argument():
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        sk.packed_loss_weights(torch.tensor([0.0, 0.5, 1.0]), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="mask must be a torch.Tensor"):
        sk.packed_loss_weights([1, 1], cu_seqlens=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="cu_seqlens must be given once per mask"):
        sk.global_counts([torch.ones(3), torch.ones(2)], cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="group was given but torch.distributed is not initialised"):
        sk.global_counts(torch.ones(3), group=object())
    with pytest.raises(ValueError, match="non-empty list"):
        sk.global_counts([])
