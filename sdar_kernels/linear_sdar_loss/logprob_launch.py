"""Launcher of the logits-free token log-probs (logprob_kernels.py): check -> pick tiles and vocabulary
splits -> allocate -> launch. No host syncs; no gradient (the old-policy, reference and teacher passes).

    out = linear_logprobs(hidden, weight, labels, bias=bias, mask=mask, temperature=1.0, entropy=True)
    out.logprobs, out.lse, out.entropy      # [N] fp32 each (entropy None unless asked); 0 on masked rows

Memory: the outputs, a [4, S, N] fp32 workspace of per-split partial statistics (S <= the SM count), and
nothing of size V except the weight itself. Tiles, splits and their reasoning: csrc_notes/linear_logprobs.md.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

from .._checks import FLOAT_DTYPES, check_tensor
from .._runtime import can_use_triton, is_interpreter
from .logprob_kernels import NUM_PARTIALS, combine_kernel, partials_kernel

# SM count assumed where the device cannot tell (the interpreter): an H100 SXM, so the CPU tests run the
# split schedule an H100 would.
DEFAULT_SM_COUNT = 132
COMBINE_BLOCK = 128


@dataclass(frozen=True)
class TileConfig:
    block_n: int        # rows per program (the MMA's M)
    block_v: int        # vocabulary columns per logit tile (N of the MMA)
    block_h: int        # hidden slice per main-loop step (K)
    group_rows: int     # row blocks whose programs are numbered together (L2 reuse of the weight)
    num_warps: int
    num_stages: int     # software-pipelined main-loop stages (shared-memory buffers)
    ctas_per_sm: int    # resident programs per SM at this tile (registers / shared memory, from the SASS)


# bf16 / fp16: one 128 x 256 fp32 accumulator over two warpgroups (128 registers a thread), 32-deep
# K steps, four stages of (128 + 256) x 32 x 2 B = 24 KiB of shared memory each (64-deep steps spill a
# few registers in the epilogue at this tile). Small N uses 64-row blocks (a 128-row block would be half
# padding) and one warpgroup. fp32 runs off the tensor cores ("ieee", _math.mma) in smaller tiles that fit
# the registers. Reasoning and the SASS facts: csrc_notes/linear_logprobs.md.
_CONFIGS = {
    "half": TileConfig(block_n=128, block_v=256, block_h=32, group_rows=8, num_warps=8, num_stages=4,
                       ctas_per_sm=1),     # 255 registers x 256 threads
    "half_small_n": TileConfig(block_n=64, block_v=256, block_h=64, group_rows=8, num_warps=4, num_stages=4,
                               ctas_per_sm=1),   # 160 KiB of shared memory
    "fp32": TileConfig(block_n=64, block_v=64, block_h=32, group_rows=8, num_warps=4, num_stages=2,
                       ctas_per_sm=2),     # 218 registers x 128 threads
}


def tile_config(n_rows: int, dtype: torch.dtype) -> TileConfig:
    if dtype == torch.float32:
        return _CONFIGS["fp32"]
    return _CONFIGS["half_small_n" if n_rows <= 64 else "half"]


@functools.lru_cache(maxsize=256)
def vocab_splits(num_row_blocks: int, num_vocab_tiles: int, group_rows: int, slots: int):
    """(splits S, vocabulary tiles per split) for a grid of row blocks x splits on ``slots`` resident
    programs (SMs x CTAs per SM).

    Start from S0 = ceil(slots / G), G = min(row blocks, group_rows): one wave of programs then covers one
    group of G row blocks, whose hidden blocks stay in L2 while each weight tile is read by G programs at
    about the same moment (one HBM read per group). Small N (G = 1) thus spreads the vocabulary over every
    SM instead of leaving one program to stream the whole weight. Every program does the same work, so
    the grid runs in ceil(R S / slots) full waves: among S in [S0 / 2, 4 S0] take the one with the least
    idle time (the largest R T / (waves x slots x tiles per split)), the fewest splits on a tie (less
    partial-statistics traffic). Every split gets at least one tile.
    """
    R, T = num_row_blocks, num_vocab_tiles
    s0 = math.ceil(slots / max(1, min(R, group_rows)))
    best = None
    for s in range(min(T, max(1, s0 // 2)), min(T, 4 * s0) + 1):
        per = math.ceil(T / s)
        splits = math.ceil(T / per)
        waves = math.ceil(R * splits / slots)
        efficiency = R * T / (waves * slots * per)
        if best is None or efficiency > best[0] + 1e-9:
            best = (efficiency, splits, per)
    return best[1], best[2]


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


class RowLogprobs(NamedTuple):
    logprobs: torch.Tensor          # [N] fp32: log softmax(z / tau)[label]; NaN for a label outside [0, V)
    lse: torch.Tensor               # [N] fp32: logsumexp(z / tau)
    entropy: torch.Tensor | None    # [N] fp32, or None when not asked for


def _check(hidden, weight, labels, bias, mask, temperature):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, allow_none=False)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    N, H = hidden.shape
    check_tensor("weight", weight, dtypes=(hidden.dtype,), allow_none=False)
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"weight must be [V, H] with V >= 1 and H = hidden.shape[1] = {H}, "
                         f"got shape {tuple(weight.shape)}")
    check_tensor("bias", bias, shape=weight.shape[:1], dtypes=FLOAT_DTYPES)
    check_tensor("labels", labels, shape=(N,), dtypes=(torch.int64, torch.int32), allow_none=False)
    check_tensor("mask", mask, shape=(N,), dtypes=(torch.bool,))
    for name, t in (("weight", weight), ("bias", bias), ("labels", labels), ("mask", mask)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if not can_use_triton(hidden):
        raise ValueError(f"hidden is on {hidden.device}: the Triton log-prob kernel needs a CUDA tensor "
                         "(or a CPU tensor with TRITON_INTERPRET=1)")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def _unit_stride_rows(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def linear_logprobs(hidden, weight, labels, *, bias=None, mask=None, temperature=1.0, entropy=False,
                    config: TileConfig | None = None, splits: int | None = None) -> RowLogprobs:
    """Per-row lse, log p(label) and (``entropy=True``) the entropy of z = hidden @ weight.T + bias at
    ``temperature``, without materialising z (see the module docstring). No gradient is tracked.

    hidden [N, H] and weight [V, H] in one dtype (fp32 / bf16 / fp16), bias [V] (any float dtype) or None,
    labels [N] int64 / int32, mask [N] bool or None (all rows). ``config`` / ``splits`` override the tile
    table and the split heuristic (tests, benchmarks).
    """
    _check(hidden, weight, labels, bias, mask, temperature)
    N = hidden.shape[0]
    V, H = weight.shape
    dev = hidden.device
    logprobs = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev) if entropy else None
    if N == 0:
        return RowLogprobs(logprobs, lse, ent)
    hidden, weight = _unit_stride_rows(hidden), _unit_stride_rows(weight)
    mask_u8 = (mask if mask is not None else torch.ones(N, dtype=torch.bool, device=dev)).view(torch.uint8)

    cfg = config or tile_config(N, hidden.dtype)
    row_blocks = triton.cdiv(N, cfg.block_n)
    vocab_tiles = triton.cdiv(V, cfg.block_v)
    if splits is None:
        n_splits, per_split = vocab_splits(row_blocks, vocab_tiles, cfg.group_rows,
                                           sm_count(dev) * cfg.ctas_per_sm)
    else:
        per_split = math.ceil(vocab_tiles / max(1, min(splits, vocab_tiles)))
        n_splits = math.ceil(vocab_tiles / per_split)
    partials = torch.empty(NUM_PARTIALS, n_splits, N, dtype=torch.float32, device=dev)
    k_scale = 1.0 / (temperature * math.log(2.0))

    partials_kernel[(row_blocks * n_splits,)](
        partials, hidden, weight, bias if bias is not None else hidden, labels, mask_u8,
        hidden.stride(0), weight.stride(0), N, V, H, per_split, n_splits, k_scale,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_R=cfg.group_rows,
        HAS_BIAS=bias is not None, ENTROPY=entropy,
        IN_FP32=hidden.dtype == torch.float32 or is_interpreter(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    combine_kernel[(triton.cdiv(N, COMBINE_BLOCK),)](
        logprobs, lse, ent if ent is not None else lse, partials, labels, mask_u8,
        N, V, n_splits, k_scale, 1.0 / temperature, BLOCK=COMBINE_BLOCK, ENTROPY=entropy, num_warps=4,
    )
    return RowLogprobs(logprobs, lse, ent)
