"""Launchers of the SDAR row kernel: check constraints -> allocate -> pick block/warps -> launch.

No host syncs: every decision below uses shapes, dtypes and Python option values only.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from .kernels import DISTILL_CODES, NUM_FIELDS, NUM_STATS, sdar_rows_kernel
from .output import PER_TOKEN_FIELDS

# Largest vocabulary block one program streams at a time. 4096 fp32 lanes over 8 warps is 16 elements
# (two 16-byte bf16 loads) per thread per tensor: wide loads, no spills (csrc_notes/sdar_loss.md).
# SDAR_KERNELS_MAX_BLOCK_V lowers it (tests use it to cross block boundaries at small V).
DEFAULT_MAX_BLOCK_V = 4096


def _block_and_warps(V: int):
    max_block = int(os.environ.get("SDAR_KERNELS_MAX_BLOCK_V", DEFAULT_MAX_BLOCK_V))
    block = min(triton.next_power_of_2(V), triton.next_power_of_2(max_block))
    block = max(block, 16)
    warps = 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1
    return block, warps


def _launch(x, weights, grad, out, stats, *, compute_stats, store_stats, write_grad, write_outputs):
    o = x.options
    N, V = x.labels.shape[0], x.logits.shape[-1]
    if N == 0:
        return
    block, warps = _block_and_warps(V)
    logits = x.logits
    dummy = weights  # any fp32 device tensor: stands in for absent optional pointers (never read)
    teacher = x.teacher_logits if x.teacher_logits is not None else logits
    grad_t = grad if grad is not None else logits
    inv_tau = 1.0 / o.temperature
    t_rows = next((t.shape[1] for t in (logits, teacher, grad_t) if t.dim() == 3), N)
    sdar_rows_kernel[(N,)](
        grad_t, out, stats,
        logits, teacher, x.labels, x.mask.view(torch.uint8), weights,
        _or(x.teacher_logprobs, dummy), _or(x.advantages, dummy), _or(x.old_logprobs, dummy),
        _or(x.ref_logprobs, dummy),
        *_row_strides(logits, t_rows), *_row_strides(teacher, t_rows), *_row_strides(grad_t, t_rows),
        t_rows, N, V,
        inv_tau / math.log(2.0), inv_tau, o.gate_beta, o.distill_coef, o.jsd_beta, o.clip_low, o.clip_high,
        o.clip_ratio_c if o.clip_ratio_c is not None else 0.0, o.kl_coef, o.entropy_coef,
        BLOCK_V=block,
        HAS_TEACHER_LOGITS=x.teacher_logits is not None,
        HAS_TEACHER_LOGPROBS=x.teacher_logprobs is not None,
        DISTILL=DISTILL_CODES[o.divergence],
        HAS_ADV=x.advantages is not None, HAS_OLD=x.old_logprobs is not None,
        HAS_DUAL_CLIP=o.clip_ratio_c is not None, HAS_KL=o.kl_coef > 0, HAS_ENTROPY=o.entropy_coef != 0.0,
        COMPUTE_STATS=compute_stats, STORE_STATS=store_stats, WRITE_GRAD=write_grad,
        WRITE_OUTPUTS=write_outputs,
        num_warps=warps,
    )


def _row_strides(t, t_rows):
    """(stride between leading indices, stride between tokens) of a [B, T, V] or [N, V] tensor."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1)
    return t.stride(0) * t_rows, t.stride(0)


def _or(t, fallback):
    return t if t is not None else fallback


def sdar_rows_triton(x, weights, grad=None, *, save_stats=False):
    """Forward launch: per-token outputs (dict of [N] fp32) and, if ``grad`` is given, w_t * dl_t/dz
    written into it (it may be ``x.logits`` itself). With ``save_stats`` the row statistics are kept
    for :func:`sdar_rows_triton_grad`."""
    N = x.labels.shape[0]
    dev = x.logits.device
    out = torch.empty(NUM_FIELDS, N, dtype=torch.float32, device=dev)
    stats = torch.empty(N, NUM_STATS, dtype=torch.float32, device=dev) if save_stats else out
    _launch(x, weights, grad, out, stats, compute_stats=True, store_stats=save_stats,
            write_grad=grad is not None, write_outputs=True)
    return dict(zip(PER_TOKEN_FIELDS, out.unbind(0))), (stats if save_stats else None)


def sdar_rows_triton_grad(x, weights, grad, stats):
    """Backward launch for reduction="none": one pass writing w_t * dl_t/dz from the saved statistics."""
    _launch(x, weights, grad, weights, stats, compute_stats=False, store_stats=False,
            write_grad=True, write_outputs=False)
