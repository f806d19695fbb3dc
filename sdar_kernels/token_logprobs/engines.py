"""The row engines of ``token_logprobs``: the chunked torch engine (torch_impl.py) and the Triton engine,
which runs the ``sdar_loss`` kernels with no loss term.

Interface (both engines):
  forward(x, save_stats) -> ({"logprobs", "entropy" (None when x.entropy is False), "teacher_logprobs"
      (None without teacher logits)}: flat [N] fp32, 0 on masked rows; stats for backward or None)
  backward(x, grad_logprobs, grad_entropy, stats, grad): write dL/dz into ``grad`` (the logits' shape and
      dtype; it may be the logits themselves). grad_* are flat [N] fp32, 0 on masked rows; grad_entropy
      may be None (no entropy term).

The Triton engine's gradient is the ``sdar_loss`` gradient pass with the sampled-token coefficient
c_t = g_lp and the entropy weight -g_H per row:
    (1/tau) [g_lp (1{v=y} - p) - g_H p (log p + H)]  =  (1/tau) [c (1{v=y} - p) + ent_w p (log p + H)]
"""

from __future__ import annotations

import torch

from .._checks import PreparedInputs
from ..sdar_loss.engines import pick_engine
from ..sdar_loss.options import SDAROptions
from .torch_impl import TorchTokenRows

F32 = torch.float32


def _as_sdar_inputs(x, entropy_coef=0.0) -> PreparedInputs:
    """token_logprobs inputs as sdar_loss's prepared inputs with no loss term (the kernels' per-token
    outputs include the log-prob, the entropy and the teacher's log-prob of the label)."""
    return PreparedInputs(
        logits=x.logits, labels=x.labels, mask=x.mask, weights=x.mask.to(F32), teacher_logits=x.teacher_logits,
        teacher_logprobs=None, advantages=None, old_logprobs=None, ref_logprobs=None, token_shape=x.token_shape,
        options=SDAROptions(temperature=x.temperature, entropy_coef=entropy_coef, reduction="none",
                            backend="triton"))


class TritonTokenRows:
    """The Triton engine: sdar_loss's row kernels (one program per row, or vocabulary splits); imported
    lazily so CPU-only users never load the kernels. Its statistics are the kernels' [N, 9] rows."""

    name = "triton"

    @staticmethod
    def forward(x, save_stats):
        from ..sdar_loss.launch import sdar_rows_triton
        xs = _as_sdar_inputs(x)
        per_token, stats = sdar_rows_triton(xs, xs.weights, None, save_stats=save_stats)
        # rows of one [F, N] buffer: copied out ([N] each) so that the op's outputs do not alias
        out = {"logprobs": per_token["logprobs"].clone(),
               "entropy": per_token["entropy"].clone() if x.entropy else None,
               "teacher_logprobs": per_token["logp_teacher"].clone() if x.teacher_logits is not None else None}
        return out, stats

    @staticmethod
    def backward(x, grad_logprobs, grad_entropy, stats, grad):
        from ..sdar_loss.launch import sdar_rows_triton_grad
        xs = _as_sdar_inputs(x, entropy_coef=1.0 if grad_entropy is not None else 0.0)
        rows = stats.clone()          # the saved statistics stay as they are (a second backward may follow)
        rows[:, 7] = grad_logprobs    # the sampled-token coefficient c_t
        rows[:, 8] = 0.0              # no divergence
        sdar_rows_triton_grad(xs, xs.weights, grad, rows,
                              entropy_rows=None if grad_entropy is None else -grad_entropy)


TOKEN_ENGINES = {"torch": TorchTokenRows, "triton": TritonTokenRows}


def vocab_parallel_forward(x, engine, group, offset):
    """token_logprobs of a vocabulary shard (either engine): sdar_loss's vocabulary-parallel rows with no
    loss term. Returns (outputs as the engines return them, the whole row's [N, 9] statistics)."""
    from ..sdar_loss.engines import ENGINES
    from ..sdar_loss.vocab_parallel import vocab_parallel_rows
    per_token, stats = vocab_parallel_rows(_as_sdar_inputs(x), ENGINES[engine], group, offset)
    return {"logprobs": per_token["logprobs"],
            "entropy": per_token["entropy"] if x.entropy else None,
            "teacher_logprobs": per_token["logp_teacher"] if x.teacher_logits is not None else None}, stats


def vocab_parallel_backward(x, engine, grad_logprobs, grad_entropy, stats, grad, offset):
    """The shard's gradient from the whole row's statistics: c_t = g_lp, entropy weight -g_H per row."""
    from ..sdar_loss.engines import ENGINES
    xs = _as_sdar_inputs(x, entropy_coef=1.0 if grad_entropy is not None else 0.0)
    rows = stats.clone()
    rows[:, 7] = grad_logprobs
    rows[:, 8] = 0.0
    ENGINES[engine].grad_from_stats(xs, xs.weights, grad, rows, offset,
                                    None if grad_entropy is None else -grad_entropy)


def pick_token_engine(backend: str, tensor) -> str:
    """The engine name for ``backend`` and the device of ``tensor`` (as sdar_loss picks it)."""
    return pick_engine(backend, tensor)
