"""Aggregation weights for packed sequences (the remove-padding layout).

Trainers that drop padding (verl's ``use_remove_padding``, flash-attention varlen, TRL's padding-free
collator) run the model on one row of concatenated sequences: logits [1, total_tokens, V] (or
[total_tokens, V]) plus the sequence boundaries, as ``cu_seqlens`` [S + 1] (cumulative lengths, starting
at 0) or as a sequence id per token. The loss sees a single row there, so the ``seq-*`` modes of
``loss_agg_mode``, which average over the rows of a padded [B, T] batch, would average over one
"sequence". :func:`packed_loss_weights` writes the per-token weights w_t of every mode from the real
boundaries instead; passed as ``loss_weights``, they give the loss and gradient of the padded layout.

The weights follow the padded definitions (sdar_loss README, "Aggregation"), with a sequence in place of
a row of the padded batch (m = mask, n_tok / n_seq = the counts, given or local):

    token-mean                w = m / n_tok
    token-sum                 w = m
    seq-mean-token-sum        w = m / n_seq
    seq-mean-token-mean       w = m / (n_seq * L_s)      L_s = unmasked tokens of the token's sequence s
    seq-mean-token-sum-norm   w = m / (n_seq * S)        S = loss_scale_factor (required here)

``dp_size`` is not applied: the ops multiply ``loss_weights`` by their own ``dp_size`` argument.
Nothing here synchronises with a CUDA device (value checks run on CPU tensors only, as in the ops).
"""

from __future__ import annotations

import torch

from ._checks import _check_scale_factor, _values_checked_here, check_count
from .sdar_loss.options import LOSS_AGG_MODES

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def loss_mask_as_bool(mask):
    """A loss mask (bool, or numeric 0/1: checked on CPU) as bool."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not (mask.dtype.is_floating_point or mask.dtype in INT_DTYPES):
        raise ValueError(f"mask must be bool or a 0/1 numeric tensor, got dtype {mask.dtype}")
    if _values_checked_here(mask) and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("mask must hold only 0 and 1 (or be bool)")
    return mask != 0


def sequence_ids(num_tokens: int, *, cu_seqlens=None, seq_ids=None, device=None) -> torch.Tensor:
    """The sequence of every token of a packed row, [num_tokens] int64 in [0, num_tokens).

    Exactly one of ``cu_seqlens`` ([S + 1] integers: 0, then the cumulative sequence lengths, ending at
    ``num_tokens``; empty sequences allowed) and ``seq_ids`` (num_tokens integers in [0, num_tokens),
    any shape; tokens with the same id form one sequence, contiguous or not) must be given.
    """
    if (cu_seqlens is None) == (seq_ids is None):
        raise ValueError("give exactly one of cu_seqlens and seq_ids (the packed sequence boundaries)")
    if seq_ids is not None:
        if not isinstance(seq_ids, torch.Tensor) or seq_ids.dtype not in INT_DTYPES:
            raise ValueError(f"seq_ids must be an integer tensor, got "
                             f"{seq_ids.dtype if isinstance(seq_ids, torch.Tensor) else type(seq_ids).__name__}")
        if seq_ids.numel() != num_tokens:
            raise ValueError(f"seq_ids has {seq_ids.numel()} entries for {num_tokens} tokens "
                             f"(shape {tuple(seq_ids.shape)})")
        ids = seq_ids.reshape(-1).to(device=device, dtype=torch.int64)
        if _values_checked_here(ids) and num_tokens and bool(((ids < 0) | (ids >= num_tokens)).any()):
            raise ValueError(f"seq_ids must lie in [0, {num_tokens}) (one id per sequence, at most one "
                             f"sequence per token), got values in [{int(ids.min())}, {int(ids.max())}]")
        return ids
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in INT_DTYPES or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [S + 1]: 0, then the cumulative sequence lengths")
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    if _values_checked_here(cu):
        if int(cu[0]) != 0 or int(cu[-1]) != num_tokens or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0, never decrease and end at the token count "
                             f"{num_tokens}, got {cu.tolist() if cu.numel() <= 16 else tuple(cu.shape)}")
    # token i belongs to the sequence s with cu[s] <= i < cu[s + 1]: the number of ends cu[1:] <= i
    return torch.searchsorted(cu[1:], torch.arange(num_tokens, device=cu.device), right=True)


def sequence_token_counts(mask_flat, ids) -> torch.Tensor:
    """Unmasked tokens of every sequence id, [num_tokens] fp32 (0 for ids no token carries)."""
    return torch.zeros(mask_flat.numel(), dtype=torch.float32, device=mask_flat.device).index_add_(
        0, ids, mask_flat.to(torch.float32))


def packed_loss_weights(mask, *, cu_seqlens=None, seq_ids=None, loss_agg_mode: str = "token-mean",
                        num_tokens=None, num_sequences=None, loss_scale_factor=None) -> torch.Tensor:
    """Per-token aggregation weights of a packed row, fp32 with the shape of ``mask``; pass them as
    ``loss_weights`` (with the op's ``dp_size``) to get the padded layout's loss and gradient.

    mask: [total_tokens] or [1, total_tokens] (any shape; flattened in order), bool or 0/1, the tokens
        that get loss. cu_seqlens / seq_ids: the sequence boundaries (see :func:`sequence_ids`).
    num_tokens / num_sequences: global counts under data parallelism (``global_counts``); default: this
        row's unmasked tokens / non-empty sequences (a sequence with no unmasked token is not counted).
    loss_scale_factor: S of "seq-mean-token-sum-norm", required for that mode: the padded layout's
        default is its padded length T, which a packed row does not have.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    m = loss_mask_as_bool(mask)
    flat = m.reshape(-1).to(torch.float32)
    ids = sequence_ids(flat.numel(), cu_seqlens=cu_seqlens, seq_ids=seq_ids, device=m.device)
    n_tok = check_count("num_tokens", num_tokens, m.device)
    n_seq = check_count("num_sequences", num_sequences, m.device)
    scale = _check_scale_factor(loss_scale_factor)
    if loss_agg_mode == "seq-mean-token-sum-norm" and scale is None:
        raise ValueError("loss_scale_factor is required for loss_agg_mode='seq-mean-token-sum-norm' on packed "
                         "sequences: give the padded length T the padded layout would divide by (verl's "
                         "response length)")
    if loss_agg_mode == "token-sum":
        return flat.reshape(m.shape)
    if loss_agg_mode == "token-mean":
        denom = n_tok if n_tok is not None else flat.sum().clamp_min(1.0)
        return (flat / denom).reshape(m.shape)
    per_seq = sequence_token_counts(flat, ids)
    if n_seq is None:
        n_seq = (per_seq > 0).sum().to(torch.float32).clamp_min(1.0)
    w = flat / n_seq
    if loss_agg_mode == "seq-mean-token-mean":
        w = w / per_seq[ids].clamp_min(1.0)       # masked tokens are 0 already; clamp only avoids 0/0
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        w = w / scale
    return w.reshape(m.shape)
