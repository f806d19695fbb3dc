"""The vocabulary-parallel (tensor-parallel) group of a call: which shard of the vocabulary this rank holds.

Megatron's layout: with a group of P ranks, every rank passes the same number V/P of vocabulary columns,
and rank r holds ids [r V/P, (r + 1) V/P). Labels are global ids in [0, V).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    group_name: str     # the process group's registered name (custom ops take it by name)
    offset: int         # first vocabulary id held here (rank * shard width)
    vocab: int          # the whole vocabulary, V = P * shard width


def vocab_shard(tp_group, shard_width: int) -> VocabShard | None:
    """The shard this rank holds in ``tp_group`` (None: no group, the whole vocabulary is here).

    ValueError naming ``tp_group`` when it is not a process group of an initialised torch.distributed."""
    if tp_group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("tp_group needs torch.distributed to be initialised (init_process_group)")
    if not isinstance(tp_group, dist.ProcessGroup):
        raise ValueError(f"tp_group must be a torch.distributed ProcessGroup, got {type(tp_group).__name__}")
    rank = dist.get_rank(tp_group)
    if rank < 0:
        raise ValueError("tp_group does not contain this rank")
    return VocabShard(tp_group.group_name, rank * shard_width, shard_width * dist.get_world_size(tp_group))


def group_of(shard: VocabShard | None):
    return None if shard is None else torch.distributed.distributed_c10d._resolve_process_group(shard.group_name)
