"""Data parallel with the global counts: one update on a batch split unevenly over 2 DDP ranks (gloo, CPU,
spawned here) gives the gradient and parameters of one process on the whole batch, for every
loss_agg_mode, padded and packed, with and without gradient accumulation."""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import sdar_kernels as sk
from sdar_kernels.sdar_loss.options import LOSS_AGG_MODES

from spawn import run_on_ranks

B, T, V, H = 5, 7, 29, 8
ROWS = {0: [0, 1, 2], 1: [3, 4]}            # an uneven split; rank 1 also holds the fully masked row
OPTIONS = dict(distill="fkl", distill_coef=0.3, kl_coef=0.05, entropy_coef=0.01)
LR = 0.5


REAL = [7, 4, 5, 2, 6]                        # tokens of each row; the rest of the row is padding


def batch():
    g = torch.Generator().manual_seed(0)
    real = torch.arange(T)[None, :] < torch.tensor(REAL)[:, None]
    mask = real & (torch.arange(T)[None, :] >= 1)   # the first token of every row is prompt
    mask[0, 3] = False
    mask[3] = False                                 # row 3: a prompt without loss tokens (an empty sequence)
    return {
        "ids": torch.randint(0, V, (B, T), generator=g),
        "labels": torch.randint(0, V, (B, T), generator=g),
        "mask": mask,
        "teacher_logits": torch.randn(B, T, V, generator=g),
        "advantages": torch.randn(B, T, generator=g),
        "old_logprobs": -torch.rand(B, T, generator=g) * 4,
        "ref_logprobs": -torch.rand(B, T, generator=g) * 4,
    }


def model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Embedding(V, H), torch.nn.Tanh(), torch.nn.Linear(H, V))


def scale_for(mode):
    return dict(loss_scale_factor=float(T)) if mode == "seq-mean-token-sum-norm" else {}


def loss_padded(net, rows, mode, counts):
    """sdar_loss on the [b, T, V] logits of ``rows``; counts: global_counts' keyword arguments."""
    x = {k: v[rows] for k, v in batch().items()}
    return sk.sdar_loss(net(x["ids"]), x["labels"], mask=x["mask"], teacher_logits=x["teacher_logits"],
                        advantages=x["advantages"], old_logprobs=x["old_logprobs"], ref_logprobs=x["ref_logprobs"],
                        loss_agg_mode=mode, **scale_for(mode), **counts, **OPTIONS).loss


def pack(rows):
    """The real tokens of ``rows`` concatenated into one row (verl's remove-padding), and cu_seqlens."""
    lengths = torch.tensor([REAL[r] for r in rows])
    real = torch.arange(T)[None, :] < lengths[:, None]
    x = {k: v[rows][real].unsqueeze(0) for k, v in batch().items()}
    return x, torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def loss_packed(net, rows, mode, counts):
    x, cu = pack(rows)
    w = sk.packed_loss_weights(x["mask"], cu_seqlens=cu, loss_agg_mode=mode, num_tokens=counts["num_tokens"],
                               num_sequences=counts["num_sequences"], **scale_for(mode))
    return sk.sdar_loss(net(x["ids"]), x["labels"], mask=x["mask"], teacher_logits=x["teacher_logits"],
                        advantages=x["advantages"], old_logprobs=x["old_logprobs"], ref_logprobs=x["ref_logprobs"],
                        loss_weights=w, dp_size=counts["dp_size"], **OPTIONS).loss


def sgd_step(net):
    with torch.no_grad():
        for p in net.parameters():
            p -= LR * p.grad


def one_process_update(mode):
    net = model()
    loss_padded(net, list(range(B)), mode, {}).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    sgd_step(net)
    return grads, [p.detach().clone() for p in net.parameters()]


def _update_matches_one_process(rank, world):
    mine = ROWS[rank]
    for mode in LOSS_AGG_MODES:
        want_grads, want_params = one_process_update(mode)
        for layout in ("padded", "packed-accumulated"):
            net = model()
            ddp = DDP(net, broadcast_buffers=False)
            if layout == "padded":
                counts = sk.global_counts(batch()["mask"][mine])
                loss_padded(ddp, mine, mode, counts).backward()
            else:   # rank 0 accumulates two micro-batches (the first without the gradient all-reduce)
                micro = [mine[:1], mine[1:]] if rank == 0 else [mine]
                packs = [pack(r) for r in micro]
                counts = sk.global_counts([x["mask"] for x, _ in packs], cu_seqlens=[cu for _, cu in packs])
                for i, rows in enumerate(micro):
                    if i < len(micro) - 1:
                        with ddp.no_sync():
                            loss_packed(ddp, rows, mode, counts).backward()
                    else:
                        loss_packed(ddp, rows, mode, counts).backward()
            assert counts["dp_size"] == world
            assert counts["num_tokens"].item() == batch()["mask"].sum().item()
            assert counts["num_sequences"].item() == 4          # row 3 is empty
            for p, g in zip(net.parameters(), want_grads):
                torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7, msg=f"{mode} {layout} rank {rank}")
            sgd_step(net)
            for p, w in zip(net.parameters(), want_params):
                torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-7, msg=f"{mode} {layout}")
    # the control: with this rank's own token count the averaged gradient is not the batch's
    net = model()
    loss_padded(DDP(net, broadcast_buffers=False), mine, "token-mean", {}).backward()
    want_grads, _ = one_process_update("token-mean")
    assert not torch.allclose(net[0].weight.grad, want_grads[0], rtol=1e-3, atol=1e-6)


def test_split_update_equals_the_whole_batch_update(tmp_path):
    run_on_ranks(_update_matches_one_process, 2, tmp_path)


def _counts_are_global(rank, world):
    # rank 0: 3 tokens in 2 sequences; rank 1: a packed row of 4 sequences (one empty, one all masked)
    if rank == 0:
        c = sk.global_counts(torch.tensor([[1, 1, 0], [0, 1, 0]]))
    else:
        c = sk.global_counts(torch.tensor([[1, 0, 0, 1, 1, 0]]), cu_seqlens=torch.tensor([0, 1, 1, 3, 6]))
    assert c["dp_size"] == 2 and c["num_tokens"].item() == 6 and c["num_sequences"].item() == 4
    # a subgroup of one rank: its own counts
    solo = dist.new_group([0]), dist.new_group([1])
    c = sk.global_counts(torch.ones(2, 2), group=solo[rank])
    assert c["dp_size"] == 1 and c["num_tokens"].item() == 4


def test_global_counts_sum_over_the_group(tmp_path):
    run_on_ranks(_counts_are_global, 2, tmp_path)

