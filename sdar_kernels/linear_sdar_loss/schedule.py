"""The chunk loop of the fused-linear SDAR loss (README.md in this folder, "Schedule").

For each chunk of C token rows:
  1. z_S = h @ W.T (+ b) in fp32 [C, V]; z_T = h_T @ W_T.T (+ b_T) in fp32 unless the teacher is given
     as log-probs (then no teacher matmul at all);
  2. the row engine (Triton or torch, the same ones ``sdar_loss`` uses) computes the per-token terms and,
     when asked, writes G = w_t * dl_t/dz_S: over z_S in place (fp32 GEMMs), or straight into a [C, V]
     buffer in the weight's dtype (bf16 / fp16 GEMMs on CUDA);
  3. grad_hidden[chunk] = g @ W ; grad_W += g.T @ h ; grad_b += g.sum(0)   (chunks in order).
Nothing of size [N, V] is ever allocated: the live extra memory is one chunk's buffers (chunking.py).

Teacher given as hidden states for a sampled-token distillation ("sampled" / "reinforce") on the Triton
engine: only log p_T(y) is needed, so there is no teacher matmul in the chunk loop and no [C, V] teacher
buffer. One logits-free pass (``Head.label_logprobs``: GEMM tiles folded into an online log-sum-exp on
chip) gives log p_T(y) for every row before the loop, and the row engine takes it as teacher log-probs.
The Triton engine's two-phase backward reads only its saved row statistics for these modes, so backward
needs no teacher at all.

Masked rows: on CPU they are dropped before chunking (``mask.nonzero()`` is free there), so they cost
no matmul work. On CUDA that would be a host sync, so every row is computed: its hidden row is zeroed
first (a [C, H] select, so non-finite hidden states of padding cannot reach grad_W through 0 * NaN),
and the row engine gives it w_t = 0, an exact-zero gradient and 0 outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..sdar_loss.output import PER_TOKEN_FIELDS
from .chunking import chunk_rows
from .heads import Head

F32 = torch.float32

# Drop masked rows before chunking where that is free (CPU). Tests switch it off to run the CUDA schedule.
COMPACT_MASKED_ROWS_ON_CPU = True


@dataclass
class Plan:
    """Everything the chunk loop needs, built once per call (and kept for the "none" backward)."""

    inputs: object                      # LinearInputs
    rows: object                        # row engine: TorchRows / TritonRows
    head: Head
    teacher_head: Head | None
    active: torch.Tensor | None         # [n] int64 rows that carry loss (CPU compaction), None = all
    chunk: int                          # rows per chunk
    zero_masked_rows: bool              # rows are not compacted and some may be masked
    teacher_label_only: bool = False    # teacher_head is used only for log p_T(y): the logits-free pass

    @property
    def n_rows(self) -> int:
        return self.inputs.hidden.shape[0] if self.active is None else self.active.numel()

    def chunks(self):
        """The rows of each chunk, in order: a slice, or an index tensor when masked rows are dropped."""
        n = self.n_rows
        for r0 in range(0, n, self.chunk):
            sl = slice(r0, min(n, r0 + self.chunk))
            yield sl if self.active is None else self.active[sl]


def make_plan(inputs, rows, vocab_parallel=False) -> Plan:
    x = inputs.x
    head = Head(inputs.weight, inputs.bias)
    teacher_head = None
    if inputs.teacher_hidden is not None:
        if inputs.shared_weight and inputs.teacher_bias is inputs.bias:
            teacher_head = head
        else:
            teacher_head = Head(inputs.teacher_weight, inputs.teacher_bias,
                                share_weight_with=head if inputs.shared_weight else None)
    active = None
    all_kept = False if x.mask.is_cuda else bool(x.mask.all())   # a host sync only on CPU, where it is free
    if COMPACT_MASKED_ROWS_ON_CPU and not x.mask.is_cuda and not all_kept:
        active = x.mask.nonzero().reshape(-1)
    N, H = inputs.hidden.shape
    V = inputs.weight.shape[0]
    n = N if active is None else active.numel()
    # the logits-free teacher pass needs the whole vocabulary on this rank
    label_only = (teacher_head is not None and not x.options.full_vocab_distill and rows.name == "triton"
                  and not vocab_parallel)
    chunk = chunk_rows(n, V, H, device_type=inputs.hidden.device.type,
                       teacher_logits=teacher_head is not None and not label_only,
                       low_precision_grad_copy=head.low_precision_grad_copy)
    return Plan(inputs=inputs, rows=rows, head=head, teacher_head=teacher_head, active=active, chunk=chunk,
                zero_masked_rows=active is None and not all_kept, teacher_label_only=label_only)


def _take(t, sel):
    if t is None:
        return None
    return t[sel] if isinstance(sel, slice) else t.index_select(0, sel)


def _put(dst, sel, rows):
    if isinstance(sel, slice):
        dst[sel] = rows
    else:
        dst.index_copy_(0, sel, rows)


def _chunk_inputs(plan, sel, z_student, z_teacher, weights, teacher_logprobs):
    x = plan.inputs.x
    return replace(
        x, logits=z_student, labels=_take(x.labels, sel), mask=_take(x.mask, sel),
        weights=weights, teacher_logits=z_teacher, teacher_logprobs=_take(teacher_logprobs, sel),
        advantages=_take(x.advantages, sel), old_logprobs=_take(x.old_logprobs, sel),
        ref_logprobs=_take(x.ref_logprobs, sel), token_shape=torch.Size([z_student.shape[0]]),
    )


def accumulate_grads(plan, sel, g, h, grad_hidden, grad_weight, grad_bias):
    """The gradient GEMMs of one chunk: grad_hidden[sel] = g @ W, grad_W += g.T @ h, grad_b += g.sum(0)."""
    if grad_hidden is not None:
        if isinstance(sel, slice):
            plan.head.grad_input(g, grad_hidden[sel])
        else:
            tmp = torch.empty(h.shape, dtype=grad_hidden.dtype, device=h.device)
            plan.head.grad_input(g, tmp)
            grad_hidden.index_copy_(0, sel, tmp)
    if grad_weight is not None:
        plan.head.accumulate_grad_weight(grad_weight, g, h)
    if grad_bias is not None:
        grad_bias.add_(g.sum(0, dtype=F32))


def run_chunks(plan: Plan, weights: torch.Tensor, **kwargs):
    """See ``_run_chunks``. Autocast is off inside: an enclosing ``torch.autocast`` would otherwise turn
    the fp32 logit GEMMs into bf16 ones and round the logits, which is what this op exists to avoid."""
    with torch.autocast(device_type=plan.inputs.hidden.device.type, enabled=False):
        return _run_chunks(plan, weights, **kwargs)


def _run_chunks(plan: Plan, weights: torch.Tensor, *, grad_hidden=None, grad_weight=None, grad_bias=None,
                save_stats=False, stats=None, backward=False):
    """One pass over all chunks.

    Forward (``backward=False``): returns (per_token dict of [N] fp32, the engine's row statistics as one
    [N, NUM_ROW_STATS] tensor, or None where the engine keeps none or ``save_stats`` is off); if any grad
    buffer is given the gradient for ``weights`` is accumulated into it (fused).
    Backward (``backward=True``): gradient only, using the engine's ``backward`` with the saved ``stats``.
    grad_hidden: [N, H] hidden dtype (fully written: masked / dropped rows get 0); grad_weight: [V, H]
    fp32 and grad_bias: [V] fp32 accumulators (added to).
    """
    inp = plan.inputs
    h_all, th_all = inp.hidden.detach(), inp.teacher_hidden
    N = h_all.shape[0]
    want_grad = grad_hidden is not None or grad_weight is not None or grad_bias is not None
    out = None
    if not backward:
        out = {k: torch.zeros(N, dtype=F32, device=h_all.device) for k in PER_TOKEN_FIELDS}
    if grad_hidden is not None and plan.active is not None:
        grad_hidden.zero_()                      # dropped (masked) rows are never visited
    saved = None
    teacher_logprobs, teacher_nonfinite = inp.x.teacher_logprobs, None
    if plan.teacher_label_only and not backward:
        x = inp.x
        teacher_logprobs, teacher_lse = plan.teacher_head.label_logprobs(th_all, x.labels, x.mask,
                                                                         x.options.temperature)
        # the row engine flags a row whose teacher logits hold a NaN / +inf; here that is a non-finite lse
        teacher_nonfinite = (~torch.isfinite(teacher_lse) & x.mask).to(F32)
    teacher_in_loop = plan.teacher_head is not None and not plan.teacher_label_only

    for sel in plan.chunks():
        h = _take(h_all, sel)
        if plan.zero_masked_rows:
            h = torch.where(_take(inp.x.mask, sel)[:, None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        z = plan.head.logits(h)
        zt = plan.teacher_head.logits(_take(th_all, sel)) if teacher_in_loop else None
        xc = _chunk_inputs(plan, sel, z, zt, _take(weights, sel), teacher_logprobs)
        # the engine writes the gradient straight in the dtype the gradient GEMMs take: over the fp32 logits
        # in place, or (bf16 / fp16 GEMMs on CUDA) into its own buffer: no fp32 gradient and cast pass
        grad = plan.head.grad_buffer(z) if want_grad else None
        if backward:
            plan.rows.backward(xc, xc.weights, grad, _take(stats, sel))
        else:
            per_token, st = plan.rows.forward(xc, xc.weights, grad, save_stats)
            if st is not None:
                if saved is None:
                    saved = st.new_zeros(N, st.shape[1])
                _put(saved, sel, st)
            for k in PER_TOKEN_FIELDS:
                _put(out[k], sel, per_token[k])
        del zt, xc
        if not want_grad:
            continue
        accumulate_grads(plan, sel, grad, h, grad_hidden, grad_weight, grad_bias)
        del grad, z
    if teacher_nonfinite is not None:
        out["nonfinite"] = torch.maximum(out["nonfinite"], teacher_nonfinite)
    return out, saved
