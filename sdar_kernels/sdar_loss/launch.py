"""Launchers of the SDAR row kernels: check constraints -> allocate -> pick the tile -> launch.

No host syncs: every decision below uses shapes, dtypes and Python option values only.
"""

from __future__ import annotations

import math
import os

import torch
import triton

from .kernels import DISTILL_CODES, NUM_FIELDS, NUM_STATS, scale_kernel, sdar_grad_kernel, sdar_rows_kernel
from .output import PER_TOKEN_FIELDS

# A tile is [BLOCK_R, VEC]: VEC logits make one 16-byte vector load, BLOCK_R tile rows are spread over the
# threads (one or more per thread). The largest tile streams MAX_TILE_BYTES of logits per tensor per
# iteration: 8 KiB = two 16-byte vectors per thread per tensor at 8 warps, wide loads with registers to
# spare (csrc_notes/sdar_loss.md). SDAR_KERNELS_MAX_BLOCK_V caps the tile in elements (the tests lower it
# to cross tile boundaries at small V).
MAX_TILE_BYTES = 8192
VECTOR_BYTES = 16


def tile_config(V: int, dtype: torch.dtype):
    """(BLOCK_R, VEC, num_warps) for rows of V logits of ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    max_block = MAX_TILE_BYTES // itemsize
    env = os.environ.get("SDAR_KERNELS_MAX_BLOCK_V")
    if env:
        max_block = min(max_block, int(env))
    block = max(min(triton.next_power_of_2(V), triton.next_power_of_2(max_block)), 2)
    vec = min(VECTOR_BYTES // itemsize, block)
    rows = block // vec
    warps = max(1, min(8, rows // 32))   # at least one tile row per thread
    return rows, vec, warps


def _row_strides(t, t_rows):
    """(stride between leading indices, stride between tokens) of a [B, T, V] or [N, V] tensor."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1)
    return t.stride(0) * t_rows, t.stride(0)


def _jsd_logs(o):
    """log2(b), log2(1 - b) of the JSD mixture weight (finite: b = 0 / 1 run as fkl / rkl)."""
    b = o.jsd_beta
    if o.divergence != "jsd":
        return 0.0, 0.0
    return math.log2(b), math.log2(1.0 - b)


class _Launch:
    """Pointers, strides and scalars shared by the forward and backward launches of one call."""

    def __init__(self, x, grad):
        self.x = x
        self.N, self.V = x.labels.shape[0], x.logits.shape[-1]
        logits = x.logits
        self.teacher = x.teacher_logits if x.teacher_logits is not None else logits
        self.grad = grad if grad is not None else logits
        t_rows = next((t.shape[1] for t in (logits, self.teacher, self.grad) if t.dim() == 3), self.N)
        self.t_rows = t_rows
        self.strides = (*_row_strides(logits, t_rows), *_row_strides(self.teacher, t_rows),
                        *_row_strides(self.grad, t_rows))
        self.block_r, self.vec, self.warps = tile_config(self.V, logits.dtype)
        o = x.options
        self.k_scale = 1.0 / (o.temperature * math.log(2.0))
        self.inv_tau = 1.0 / o.temperature
        self.log2_b, self.log2_1mb = _jsd_logs(o)


def _or(t, fallback):
    return t if t is not None else fallback


def sdar_rows_triton(x, weights, grad=None, *, save_stats=False):
    """Forward launch: per-token outputs (dict of [N] fp32) and, if ``grad`` is given, w_t * dl_t/dz
    written into it (the fused schedule). With ``save_stats`` the row statistics are kept for
    :func:`sdar_rows_triton_grad` (the two-phase schedule)."""
    N = x.labels.shape[0]
    dev = x.logits.device
    out = torch.empty(NUM_FIELDS, N, dtype=torch.float32, device=dev)
    stats = torch.empty(N, NUM_STATS, dtype=torch.float32, device=dev) if save_stats else out
    if N > 0:
        L, o = _Launch(x, grad), x.options
        sdar_rows_kernel[(N,)](
            L.grad, out, stats,
            x.logits, L.teacher, x.labels, x.mask.view(torch.uint8), weights,
            _or(x.teacher_logprobs, weights), _or(x.advantages, weights), _or(x.old_logprobs, weights),
            _or(x.ref_logprobs, weights),   # absent optional pointers: any fp32 tensor, never read
            *L.strides, L.t_rows, N, L.V,
            L.k_scale, L.inv_tau, o.gate_beta, o.distill_coef, o.jsd_beta, L.log2_b, L.log2_1mb,
            o.clip_low, o.clip_high, o.clip_ratio_c if o.clip_ratio_c is not None else 0.0, o.kl_coef,
            o.entropy_coef,
            BLOCK_R=L.block_r, VEC=L.vec,
            HAS_TEACHER_LOGITS=x.teacher_logits is not None,
            HAS_TEACHER_LOGPROBS=x.teacher_logprobs is not None,
            DISTILL=DISTILL_CODES[o.divergence],
            HAS_ADV=x.advantages is not None, HAS_OLD=x.old_logprobs is not None,
            HAS_DUAL_CLIP=o.clip_ratio_c is not None, HAS_KL=o.kl_coef > 0, HAS_ENTROPY=o.entropy_coef != 0.0,
            STORE_STATS=save_stats, WRITE_GRAD=grad is not None,
            num_warps=L.warps,
        )
    return dict(zip(PER_TOKEN_FIELDS, out.unbind(0))), (stats if save_stats else None)


def sdar_rows_triton_grad(x, weights, grad, stats):
    """Backward launch of the two-phase schedule: one pass writing w_t * dl_t/dz from the saved statistics."""
    N = x.labels.shape[0]
    if N == 0:
        return
    L, o = _Launch(x, grad), x.options
    sdar_grad_kernel[(N,)](
        L.grad, x.logits, L.teacher, x.labels, x.mask.view(torch.uint8), weights, stats,
        *L.strides, L.t_rows, L.V,
        L.k_scale, L.inv_tau, o.distill_coef, o.jsd_beta, L.log2_b, L.log2_1mb, o.entropy_coef,
        BLOCK_R=L.block_r, VEC=L.vec, HAS_ENTROPY=o.entropy_coef != 0.0, DISTILL=DISTILL_CODES[o.divergence],
        num_warps=L.warps,
    )


SCALE_BLOCK = 4096


def scale_triton_(t, scale):
    """t *= scale (``scale``: a one-element fp32 tensor on t's device), skipped on the device when it is 1."""
    n = t.numel()
    if n == 0:
        return
    flat = t.view(-1) if t.is_contiguous() else None
    if flat is None:   # a strided gradient buffer (never produced by the ops; kept correct anyway)
        t.mul_(scale.to(t.dtype))
        return
    scale_kernel[(triton.cdiv(n, SCALE_BLOCK),)](flat, scale, n, BLOCK=SCALE_BLOCK, num_warps=8)
