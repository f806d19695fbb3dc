"""Run a test function on K local processes that form a torch.distributed group (gloo, CPU).

The group meets through a file in the test's temporary directory (no port to pick, nothing beyond the
machine). A rank that raises fails the test with its traceback; a collective that never completes fails
after ``timeout_s`` instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdar.distributed import DataParallel


def _entry(rank, fn, world, init_file, timeout_s, args):
    torch.set_num_threads(1)        # K processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    with DataParallel(rank=rank, world=world):     # leaves the group as the training CLI does
        fn(rank, world, *args)


def run_on_ranks(fn, world, tmp_path, *args, timeout_s=300):
    """``fn(rank, world, *args)`` on ``world`` spawned processes; ``fn`` must be a module-level function."""
    init_file = os.path.join(str(tmp_path), "dist-init")
    mp.spawn(_entry, args=(fn, world, init_file, timeout_s, args), nprocs=world, join=True)
