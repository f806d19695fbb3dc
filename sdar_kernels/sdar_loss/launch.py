"""Launchers of the SDAR row kernels: check constraints -> plan the launch -> allocate -> launch.

No host syncs: every decision below uses shapes, dtypes, the device's SM count (a cached property, not a
sync) and Python option values only. The launch table and its reasoning: csrc_notes/sdar_loss.md,
"Launch table".
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton

from .kernels import (DISTILL_CODES, NUM_FIELDS, NUM_PARTIALS, NUM_STATS, finish_kernel, jsd_partial_kernel,
                      partial_kernel, scale_kernel, sdar_grad_kernel, sdar_rows_kernel)
from .output import PER_TOKEN_FIELDS

# A tile is [BLOCK_R, VEC]: VEC logits make one 16-byte vector load, and each of the MAX_WARPS * 32 threads
# owns one tile row. One row per thread keeps every variant at <= 64 registers (32 for the sampled
# schedules: 8 CTAs of 256 threads per SM), while the prefetch of the next tile keeps a 16-byte load per
# tensor in flight per thread: 64 KiB per SM, several times what covers HBM latency. Two rows per thread
# gave the same instructions per logit at 64-68 registers (csrc_notes/sdar_loss.md, "Launch table").
# SDAR_KERNELS_MAX_BLOCK_V caps the tile in elements (the tests lower it to cross tile boundaries at small V).
VECTOR_BYTES = 16
MAX_WARPS = 8
# Vocabulary splits: below PROGRAMS_PER_SM * SMs rows the GPU is not filled by one program per row, so rows
# are cut into S = floor(PROGRAMS_PER_SM * SMs / N) stretches (one wave of programs) of at least
# MIN_TILES_PER_SPLIT tiles each (README.md, "Kernels and launch").
PROGRAMS_PER_SM = 4
MIN_TILES_PER_SPLIT = 4


@dataclass(frozen=True)
class LaunchPlan:
    block_r: int      # tile rows
    vec: int          # logits per tile row (one 16-byte vector)
    warps: int
    splits: int       # stretches per row (1: one program per row, the fused kernel)
    v_split: int      # logits per stretch (a multiple of the tile)

    @property
    def block(self) -> int:
        return self.block_r * self.vec


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device):
    """The SM count of a CUDA device (a cached property, no sync); None elsewhere (nothing to fill: the
    interpreter runs programs one at a time)."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def plan_launch(N: int, V: int, dtype: torch.dtype, sms=None) -> LaunchPlan:
    """The tile, warps and vocabulary splits for N rows of V logits of ``dtype`` on a GPU with ``sms`` SMs
    (None: no splits). The tile is the same for every distill mode: one tile row per thread keeps them
    all within 64 registers."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    vec = VECTOR_BYTES // itemsize
    max_block = MAX_WARPS * 32 * vec
    env = os.environ.get("SDAR_KERNELS_MAX_BLOCK_V")
    if env:
        max_block = min(max_block, int(env))
    block = max(min(triton.next_power_of_2(V), triton.next_power_of_2(max_block)), 2)
    vec = min(vec, block)
    block_r = block // vec
    warps = max(1, min(MAX_WARPS, block_r // 32))

    tiles = -(-V // block)
    forced = os.environ.get("SDAR_KERNELS_SPLITS")
    if forced:
        splits = int(forced)
    elif sms and N > 0:
        # as many stretches per row as keep all N * S programs in one wave of PROGRAMS_PER_SM per SM
        splits = min(PROGRAMS_PER_SM * sms // N, tiles // MIN_TILES_PER_SPLIT)
    else:
        splits = 1
    splits = max(1, min(splits, tiles))
    # whole tiles per stretch (aligned 16-byte vectors), balanced: the last stretch is never a sliver
    v_split = -(-tiles // splits) * block
    return LaunchPlan(block_r, vec, warps, -(-V // v_split), v_split)


def _row_strides(t, t_rows):
    """(stride between leading indices, stride between tokens) of a [B, T, V] or [N, V] tensor."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1)
    return t.stride(0) * t_rows, t.stride(0)


def _jsd_logs(o):
    """log2(b), log2(1 - b) of the JSD mixture weight (finite: b = 0 / 1 run as fkl / rkl)."""
    if o.divergence != "jsd":
        return 0.0, 0.0
    return math.log2(o.jsd_beta), math.log2(1.0 - o.jsd_beta)


class _Launch:
    """Pointers, strides, scalars and the plan shared by the launches of one call."""

    def __init__(self, x, grad):
        self.x = x
        self.N, self.V = x.labels.shape[0], x.logits.shape[-1]
        logits = x.logits
        self.teacher = x.teacher_logits if x.teacher_logits is not None else logits
        self.grad = grad if grad is not None else logits
        t_rows = next((t.shape[1] for t in (logits, self.teacher, self.grad) if t.dim() == 3), self.N)
        self.t_rows = t_rows
        self.in_strides = (*_row_strides(logits, t_rows), *_row_strides(self.teacher, t_rows))
        self.grad_strides = _row_strides(self.grad, t_rows)
        o = x.options
        self.plan = plan_launch(self.N, self.V, logits.dtype, sm_count(logits.device))
        self.k_scale = 1.0 / (o.temperature * math.log(2.0))
        self.inv_tau = 1.0 / o.temperature
        self.log2_b, self.log2_1mb = _jsd_logs(o)
        self.mask = x.mask.view(torch.uint8)
        self.distill = DISTILL_CODES[o.divergence]

    def switches(self):
        x, o = self.x, self.x.options
        return dict(HAS_TEACHER_LOGITS=x.teacher_logits is not None,
                    HAS_TEACHER_LOGPROBS=x.teacher_logprobs is not None, DISTILL=self.distill,
                    HAS_ADV=x.advantages is not None, HAS_OLD=x.old_logprobs is not None,
                    HAS_DUAL_CLIP=o.clip_ratio_c is not None, HAS_KL=o.kl_coef > 0)

    def side(self, fallback):
        """The optional per-token inputs; absent ones are any fp32 tensor (never read)."""
        x = self.x
        return [t if t is not None else fallback
                for t in (x.teacher_logprobs, x.advantages, x.old_logprobs, x.ref_logprobs)]

    def term_scalars(self):
        o = self.x.options
        return (self.inv_tau, o.gate_beta, o.distill_coef, o.jsd_beta, o.clip_low, o.clip_high,
                o.clip_ratio_c if o.clip_ratio_c is not None else 0.0, o.kl_coef, o.entropy_coef)

    def gradient(self, weights, stats, entropy_rows=None):
        """sdar_grad_kernel over (N, S): the gradient from stored row statistics and weights w_t (and, per
        row, the entropy term's weight: ``entropy_rows`` [N], times entropy_coef)."""
        o, P = self.x.options, self.plan
        sdar_grad_kernel[(self.N, P.splits)](
            self.grad, self.x.logits, self.teacher, self.x.labels, self.mask, weights, stats,
            entropy_rows if entropy_rows is not None else weights,
            *self.in_strides, *self.grad_strides, self.t_rows, self.V, P.v_split,
            self.k_scale, self.inv_tau, o.distill_coef, o.jsd_beta, self.log2_b, self.log2_1mb, o.entropy_coef,
            BLOCK_R=P.block_r, VEC=P.vec, HAS_ENTROPY=o.entropy_coef != 0.0, DISTILL=self.distill,
            ENT_PER_ROW=entropy_rows is not None, num_warps=P.warps,
        )


def sdar_rows_triton(x, weights, grad=None, *, save_stats=False):
    """Forward: per-token outputs (dict of [N] fp32) and, if ``grad`` is given, w_t * dl_t/dz written into
    it (the fused schedule; it may be ``x.logits`` itself). With ``save_stats`` the row statistics are kept
    for :func:`sdar_rows_triton_grad` (the two-phase schedules)."""
    N = x.labels.shape[0]
    dev = x.logits.device
    out = torch.empty(NUM_FIELDS, N, dtype=torch.float32, device=dev)
    stats = None
    if N > 0:
        L = _Launch(x, grad)
        if L.plan.splits == 1:
            stats = torch.empty(N, NUM_STATS, dtype=torch.float32, device=dev) if save_stats else out
            _one_program_per_row(L, weights, out, stats, save_stats, grad is not None)
        else:
            stats = torch.empty(N, NUM_STATS, dtype=torch.float32, device=dev)
            _vocabulary_splits(L, out, stats)
            if grad is not None:
                L.gradient(weights, stats)
    return dict(zip(PER_TOKEN_FIELDS, out.unbind(0))), (stats if save_stats else None)


def _one_program_per_row(L, weights, out, stats, store_stats, write_grad):
    x, o, P = L.x, L.x.options, L.plan
    sdar_rows_kernel[(L.N,)](
        L.grad, out, stats,
        x.logits, L.teacher, x.labels, L.mask, weights, *L.side(weights),
        *L.in_strides, *L.grad_strides, L.t_rows, L.N, L.V,
        L.k_scale, L.inv_tau, o.gate_beta, o.distill_coef, o.jsd_beta, L.log2_b, L.log2_1mb,
        o.clip_low, o.clip_high, o.clip_ratio_c if o.clip_ratio_c is not None else 0.0, o.kl_coef,
        o.entropy_coef,
        BLOCK_R=P.block_r, VEC=P.vec, **L.switches(), HAS_ENTROPY=o.entropy_coef != 0.0,
        STORE_STATS=store_stats, WRITE_GRAD=write_grad,
        num_warps=P.warps,
    )


def _vocabulary_splits(L, out, stats):
    """partial_kernel over (N, S), then finish_kernel over N (with jsd's extra stage)."""
    x, P = L.x, L.plan
    dev = x.logits.device
    part = torch.empty(L.N, P.splits, NUM_PARTIALS, dtype=torch.float32, device=dev)
    tile = dict(BLOCK_R=P.block_r, VEC=P.vec)
    partial_kernel[(L.N, P.splits)](
        part, x.logits, L.teacher, L.mask, *L.in_strides, L.t_rows, L.V, P.v_split, L.k_scale,
        **tile, HAS_TEACHER_LOGITS=x.teacher_logits is not None, DISTILL=L.distill, num_warps=P.warps)

    def finish(stage, jsd_part):
        (inv_tau, gate_beta, distill_coef, jsd_beta, clip_low, clip_high, clip_c, kl_coef,
         entropy_coef) = L.term_scalars()
        finish_kernel[(L.N,)](
            out, stats, part, jsd_part, x.logits, L.teacher, x.labels, L.mask, *L.side(stats),
            *L.in_strides, L.t_rows, L.N, L.V, P.splits,
            L.k_scale, inv_tau, gate_beta, distill_coef, jsd_beta, clip_low, clip_high, clip_c, kl_coef,
            entropy_coef, S_BLOCK=triton.next_power_of_2(P.splits), **L.switches(), STAGE=stage, num_warps=1)

    if L.distill != DISTILL_CODES["jsd"]:
        finish(0, part)
        return
    finish(1, part)
    jsd_part = torch.empty(L.N, P.splits, 2, dtype=torch.float32, device=dev)
    jsd_partial_kernel[(L.N, P.splits)](
        jsd_part, x.logits, L.teacher, L.mask, stats, *L.in_strides, L.t_rows, L.V, P.v_split, L.k_scale,
        L.log2_b, L.log2_1mb, **tile, num_warps=P.warps)
    finish(2, jsd_part)


def partials_triton(x):
    """[N, 7] partial statistics of each row of ``x``'s logits (one vocabulary shard), masked rows the
    identity (max -1e30, sums 0): partial_kernel with one stretch per row."""
    from .passes import NEG_BIG
    N = x.labels.shape[0]
    part = torch.zeros(N, 1, NUM_PARTIALS, dtype=torch.float32, device=x.logits.device)
    part[..., 0] = NEG_BIG.value
    part[..., 3] = NEG_BIG.value
    if N > 0:
        L = _Launch(x, None)
        P = L.plan
        partial_kernel[(N, 1)](
            part, x.logits, L.teacher, L.mask, *L.in_strides, L.t_rows, L.V, L.V, L.k_scale,
            BLOCK_R=P.block_r, VEC=P.vec, HAS_TEACHER_LOGITS=x.teacher_logits is not None, DISTILL=L.distill,
            num_warps=P.warps)
    return part.view(N, NUM_PARTIALS)


def jsd_partials_triton(x, stats):
    """[N, 2] jsd row sums (base 2) of each row's logits from the normalizers in ``stats`` [N, 9]."""
    N = x.labels.shape[0]
    out = torch.zeros(N, 1, 2, dtype=torch.float32, device=x.logits.device)
    if N > 0:
        L = _Launch(x, None)
        P = L.plan
        jsd_partial_kernel[(N, 1)](
            out, x.logits, L.teacher, L.mask, stats, *L.in_strides, L.t_rows, L.V, L.V, L.k_scale,
            L.log2_b, L.log2_1mb, BLOCK_R=P.block_r, VEC=P.vec, num_warps=P.warps)
    return out.view(N, 2)


def sdar_rows_triton_grad(x, weights, grad, stats, entropy_rows=None):
    """Backward of the two-phase schedules: one pass writing w_t * dl_t/dz from the saved statistics."""
    if x.labels.shape[0] == 0:
        return
    _Launch(x, grad).gradient(weights, stats, entropy_rows)


SCALE_BLOCK = 4096


def scale_triton_(t, scale):
    """t *= scale (``scale``: a one-element fp32 tensor on t's device), skipped on the device when it is 1."""
    n = t.numel()
    if n == 0:
        return
    if not t.is_contiguous():   # a strided gradient buffer (never produced by the ops; kept correct anyway)
        t.mul_(scale.to(t.dtype))
        return
    scale_kernel[(triton.cdiv(n, SCALE_BLOCK),)](t.view(-1), scale, n, BLOCK=SCALE_BLOCK, num_warps=8)
