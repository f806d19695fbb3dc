"""Global counts for data-parallel training: ``num_tokens``, ``num_sequences`` and ``dp_size`` with one
all-reduce.

Under DDP / FSDP each rank holds part of a mini-batch and the gradients are averaged over the ranks. A
mean over the *global* mini-batch is then a sum of per-rank losses, each normalised by the global count
and multiplied by the number of ranks (which undoes the average), as verl 0.9's ``agg_loss`` does:

    loss_r = dp_size * sum_{t on rank r} m_t * l_t / N_global        (token-mean)

so the averaged gradient is the gradient of the global mean whatever the split. :func:`global_counts`
counts the local unmasked tokens and non-empty sequences of every micro-batch of the rank's part of one
optimizer step, sums them over the data-parallel group with one ``all_reduce`` of two integers, and
returns the keyword arguments of the ops (``sdar_loss(..., **counts)``). The counts stay tensors on the
mask's device: no host synchronisation besides the collective itself.
"""

from __future__ import annotations

import torch

from .packed import loss_mask_as_bool, sequence_ids, sequence_token_counts


def _listify(name, value, n):
    """A per-micro-batch argument as a list of length ``n`` (None -> [None] * n)."""
    if value is None:
        return [None] * n
    if n == 1 and isinstance(value, torch.Tensor):
        return [value]
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{name} must be given once per mask: a list of {n} tensors when mask is a list")
    return list(value)


def local_counts(mask, *, cu_seqlens=None, seq_ids=None) -> torch.Tensor:
    """[unmasked tokens, non-empty sequences] of one micro-batch, int64 on the mask's device.

    Padded masks ([B, T], or any [..., T]): every row of the last dimension is a sequence (a 1-D mask is
    one sequence). Packed masks: give ``cu_seqlens`` or ``seq_ids`` (as for ``packed_loss_weights``).
    """
    m = loss_mask_as_bool(mask)
    tokens = m.sum(dtype=torch.int64)
    if cu_seqlens is None and seq_ids is None:
        rows = m.reshape(-1, m.shape[-1]) if m.dim() and m.numel() else m.reshape(1, -1)
        sequences = rows.any(-1).sum(dtype=torch.int64)
    else:
        flat = m.reshape(-1)
        ids = sequence_ids(flat.numel(), cu_seqlens=cu_seqlens, seq_ids=seq_ids, device=m.device)
        sequences = (sequence_token_counts(flat, ids) > 0).sum(dtype=torch.int64)
    return torch.stack([tokens, sequences])


def global_counts(mask, *, cu_seqlens=None, seq_ids=None, group=None) -> dict:
    """``{"num_tokens", "num_sequences", "dp_size"}`` of one optimizer step over the data-parallel group.

    mask: this rank's loss mask (bool or 0/1), or a list of them, one per micro-batch of the step
        (gradient accumulation): the counts must cover everything the step's gradient averages over.
        Padded [B, T] masks count their non-empty rows as sequences; packed ones need ``cu_seqlens`` or
        ``seq_ids`` (a tensor, or a list matching ``mask``).
    group: the data-parallel process group (default: the whole world). Without an initialised
        ``torch.distributed``, the local counts and ``dp_size`` 1.

    The counts are 0-dim fp32 tensors on the mask's device (exact: summed as int64), ``dp_size`` the
    group's size. With NCCL the masks must be CUDA tensors (the collective runs on their device).
    Every rank of the group must call this the same number of times (it is a collective).
    """
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    if not masks:
        raise ValueError("mask must be a tensor or a non-empty list of tensors (one per micro-batch)")
    cus = _listify("cu_seqlens", cu_seqlens, len(masks))
    sids = _listify("seq_ids", seq_ids, len(masks))
    parts = [local_counts(m, cu_seqlens=c, seq_ids=s) for m, c, s in zip(masks, cus, sids)]
    if len({p.device for p in parts}) != 1:
        raise ValueError(f"mask: every micro-batch's mask must be on one device, got {sorted({str(p.device) for p in parts})}")
    total = torch.stack(parts).sum(0)
    dp_size = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dp_size = torch.distributed.get_world_size(group)
        if dp_size > 1:
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=group)
    elif group is not None:
        raise ValueError("group was given but torch.distributed is not initialised")
    total = total.to(torch.float32)
    return {"num_tokens": total[0], "num_sequences": total[1], "dp_size": dp_size}
