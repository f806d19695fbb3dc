"""verl (0.9.x) integration: the SDAR distillation loss in verl's registry and fused token statistics.

Importing this module (directly, or in every verl process through verl's hook
``VERL_USE_EXTERNAL_MODULES=sdar.integrations.verl``) does two things:

1. Registers a distillation loss ``"sdar"`` in verl's distillation-loss registry (released SDAR
   semantics: the gated sampled-token term, gate_beta 5), and ``"sdar_opsd"`` (gate_beta 0: the
   ungated GRPO+OPSD baseline). Other variants: ``register_sdar_loss(name, gate_beta=..., distill=...)``
   in your own external module (verl's structured configs accept no extra keys, so a gate_beta cannot
   ride in the YAML). Use it with ``distillation.distillation_loss.loss_mode=sdar``,
   ``use_policy_gradient=False`` (the term is backpropagated, not used as a reward),
   ``distillation_loss_coef`` = SDAR's lambda and ``loss_max_clamp=null`` (verl clamps the per-token
   loss to +-10 by default; SDAR does not). The teacher's log-probs of the sampled tokens arrive as
   ``teacher_logprobs`` in the batch, as for verl's other estimator losses.

2. Patches ``FSDPEngineWithLMHead.prepare_model_outputs`` (verl 0.9.x, ``verl.workers.engine.fsdp``)
   so that the engine's logits -> (log_probs, entropy) step runs through ``sdar_kernels.token_logprobs``
   (one streaming forward pass, one fused backward pass) instead of verl's ``logprobs_from_logits`` plus
   ``entropy_from_logits``: every registered policy loss (vanilla, gspo, cispo, sapo, clip_cov, ...) then
   runs unchanged on fused statistics. The patch covers the default path (``use_remove_padding=True``,
   no fused kernels, no top-k distillation in the logits processor, no Σπ², non-DTensor logits); every
   other configuration runs verl's own code untouched. It hands the statistics to verl's own
   ``use_fused_kernels`` branch, so unpadding, Ulysses gathering and nesting stay verl's. A temperature
   other than 1 is applied to the logits first, as verl does (one [N, V] copy). Set
   ``SDAR_VERL_FUSED_STATS=0`` to import without patching; ``unpatch_engine()`` undoes it.

SDAR's privileged teacher in verl (the released code's recipe): ``build_teacher_batch`` gives the teacher
inputs (privileged text + prompt + the student's response), the actor's own log-prob pass scores them
(``actor_rollout_wg.compute_log_prob``), and ``attach_teacher_logprobs`` puts the result where the "sdar"
loss reads it. ``python -m sdar.integrations.verl_recipe`` runs the whole chain on CPU with a tiny model.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from verl.trainer.distillation import losses as _distill_losses
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from sdar_kernels import token_logprobs
from sdar_kernels.token_logprobs import gated_distill

SUPPORTED_VERL = "0.9"
SDAR_LOSS = "sdar"


# ---- 1. the distillation loss -------------------------------------------------------------------------
def register_sdar_loss(name: str = SDAR_LOSS, *, gate_beta: float = 5.0, distill: str = "sampled"):
    """Register the gated SDAR term under ``name`` in verl's distillation-loss registry (once per name)."""
    gated_distill(torch.zeros(1), torch.zeros(1), gate_beta=gate_beta, distill=distill)  # validate now
    if name in _distill_losses.DISTILLATION_LOSS_REGISTRY:
        return _distill_losses.DISTILLATION_LOSS_REGISTRY[name]

    def sdar_distillation_loss(config, distillation_config, model_output, data):
        if distillation_config.distillation_loss.use_policy_gradient:
            raise ValueError(f"distillation loss {name!r} is a supervised term: set distillation.distillation_loss."
                             "use_policy_gradient=False (with True, verl would turn it into a reward instead)")
        logp = no_padding_2_padding(model_output["log_probs"], data)
        teacher = no_padding_2_padding(data["teacher_logprobs"], data).squeeze(-1)
        mask = data["response_mask"]
        mask = (mask.to_padded_tensor(False) if mask.is_nested else mask).bool()
        d, gate, gap = gated_distill(logp, teacher, gate_beta=gate_beta, distill=distill)
        metrics = {f"sdar/{k}": Metric(AggregationType.MEAN, _masked_mean(v, mask))
                   for k, v in (("gate_mean", gate), ("gate_active_ratio", (gate > 0.5).float()),
                                ("gap_mean", gap), ("distill_loss", d.detach()))}
        return d, metrics

    settings = _distill_losses.DistillationLossSettings(names=[name], use_estimator=True)
    return _distill_losses.register_distillation_loss(settings)(sdar_distillation_loss)


def _masked_mean(v, mask):
    return (torch.where(mask, v, 0.0).sum() / mask.sum().clamp_min(1)).detach()


# ---- the privileged teacher (SDAR's recipe; README "verl" and verl_recipe.py) ----------------------------
def build_teacher_batch(batch, privileged, tokenizer, *, template="{privileged}\n\n", teacher_prompt_ids_fn=None):
    """The teacher's inputs for the actor's log-prob pass, as SDAR's released code builds them: the
    privileged text (the retrieved skill) + the student's prompt, followed by the student's response.

    ``batch``: verl's trainer-side DataProto (``prompts`` [B, P] left-padded, ``responses`` [B, R],
    ``attention_mask`` [B, P + R]); ``privileged``: B strings. The teacher prompt's tokens are
    ``tokenizer(template.format(privileged=...))`` + the prompt's tokens, or
    ``teacher_prompt_ids_fn(prompt_ids: list[int], privileged: str) -> list[int]``. Returns a DataProto
    with ``prompts``, ``responses``, ``input_ids``, ``attention_mask``, ``position_ids``, ``response_mask``
    ready for ``actor_rollout_wg.compute_log_prob``.
    """
    from verl import DataProto

    t = batch.batch
    prompts, responses = t["prompts"], t["responses"]
    B, P = prompts.shape
    if len(privileged) != B:
        raise ValueError(f"privileged must hold one text per sequence ({B}), got {len(privileged)}")
    prompt_mask, response_attention = t["attention_mask"][:, :P], t["attention_mask"][:, P:]
    rows = []
    for ids, m, text in zip(prompts, prompt_mask, privileged):
        prompt_ids = ids[m.bool()].tolist()
        if teacher_prompt_ids_fn is not None:
            rows.append(list(teacher_prompt_ids_fn(prompt_ids, text)))
        else:
            rows.append(tokenizer(template.format(privileged=text), add_special_tokens=False)["input_ids"]
                        + prompt_ids)
    width = max(len(r) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    teacher_prompts = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=prompts.dtype)
    teacher_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=prompt_mask.dtype)
    attention = torch.cat([teacher_mask, response_attention.cpu()], 1)
    tensors = {
        "prompts": teacher_prompts, "responses": responses.cpu(),
        "input_ids": torch.cat([teacher_prompts, responses.cpu()], 1), "attention_mask": attention,
        "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "response_mask": t["response_mask"].cpu() if "response_mask" in t.keys() else response_attention.cpu(),
    }
    return DataProto.from_dict(tensors={k: v.to(prompts.device) for k, v in tensors.items()},
                               meta_info=dict(batch.meta_info))


def attach_teacher_logprobs(batch, teacher_log_probs):
    """Store the teacher's response log-probs [B, R] (``old_log_probs`` of the actor's pass on
    ``build_teacher_batch``) in ``batch`` as verl's estimator distillation losses read them:
    ``teacher_logprobs`` / ``teacher_ids`` [B, P + R, 1], aligned with ``input_ids``, where position
    P + j - 1 (the logit that scores response token j) holds log p_T(response_j)."""
    t = batch.batch
    B, P = t["prompts"].shape
    R = t["responses"].shape[1]
    if tuple(teacher_log_probs.shape) != (B, R):
        raise ValueError(f"teacher_log_probs must be [B, R] = {(B, R)} (response-aligned), "
                         f"got {tuple(teacher_log_probs.shape)}")
    logprobs = torch.zeros(B, P + R, 1, dtype=torch.float32, device=teacher_log_probs.device)
    ids = torch.zeros(B, P + R, 1, dtype=t["responses"].dtype, device=teacher_log_probs.device)
    logprobs[:, P - 1:P + R - 1, 0] = teacher_log_probs.float() * t["attention_mask"][:, P:].to(logprobs.device)
    ids[:, P - 1:P + R - 1, 0] = t["responses"].to(ids.device)
    t["teacher_logprobs"], t["teacher_ids"] = logprobs, ids
    return batch


# ---- 2. fused token statistics in the FSDP engine -----------------------------------------------------
_ORIGINAL = {}


def _engine_cls():
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    return FSDPEngineWithLMHead


def _handled(micro_batch, output) -> bool:
    """The configurations the fused path covers; anything else runs verl's own code."""
    def flag(key, default):
        return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)

    from torch.distributed.tensor import DTensor
    return (flag("use_remove_padding", True) and not flag("use_fused_kernels", False)
            and not flag("calculate_sum_pi_squared", False) and not flag("distillation_use_topk", False)
            and not flag("distillation_only", False) and not isinstance(output.logits, DTensor))


def fused_prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
    """``prepare_model_outputs`` with the log-probs and entropy from ``token_logprobs``."""
    original = _ORIGINAL.get("prepare_model_outputs", _engine_cls().prepare_model_outputs)
    if not _handled(micro_batch, output):
        return original(self, output, output_args, micro_batch, logits_processor_func)
    from verl.workers.engine.fsdp.transformer_impl import _scale_logits_by_temperature

    calculate_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
    logits = output.logits.squeeze(0)                                  # (total_nnz [+ pad], V)
    if not output_args.get("temperature_is_one", False):
        temperature = output_args["temperature_rmpad"].unsqueeze(-1)
        logits = _scale_logits_by_temperature(logits, temperature, is_unit_temperature=False)
    stats = token_logprobs(logits, output_args["input_ids_rmpad_rolled"], entropy=bool(calculate_entropy))
    fused = SimpleNamespace(log_probs=stats.logprobs.unsqueeze(0),
                            entropy=None if stats.entropy is None else stats.entropy.unsqueeze(0))
    # verl's fused-kernel branch unpads, gathers (Ulysses) and nests per-token outputs exactly as it does
    # for its own fused kernels; a shallow copy of the micro-batch carries the flag that selects it
    fused_batch = micro_batch.copy()
    tu.assign_non_tensor_data(fused_batch, "use_fused_kernels", True)
    return original(self, fused, output_args, fused_batch, logits_processor_func)


def patch_engine():
    """Route FSDPEngineWithLMHead's log-prob / entropy step through ``token_logprobs`` (idempotent)."""
    cls = _engine_cls()
    if "prepare_model_outputs" not in _ORIGINAL:
        _ORIGINAL["prepare_model_outputs"] = cls.prepare_model_outputs
        cls.prepare_model_outputs = fused_prepare_model_outputs


def unpatch_engine():
    """Restore verl's own ``prepare_model_outputs``."""
    if "prepare_model_outputs" in _ORIGINAL:
        _engine_cls().prepare_model_outputs = _ORIGINAL.pop("prepare_model_outputs")


def _check_version():
    import verl
    if not verl.__version__.startswith(SUPPORTED_VERL + "."):
        raise ImportError(f"sdar.integrations.verl supports verl {SUPPORTED_VERL}.x (its loss registry and "
                          f"engine hooks), found verl {verl.__version__}")


_check_version()
register_sdar_loss(SDAR_LOSS, gate_beta=5.0)
register_sdar_loss("sdar_opsd", gate_beta=0.0)
if os.environ.get("SDAR_VERL_FUSED_STATS", "1") not in ("", "0"):
    patch_engine()
