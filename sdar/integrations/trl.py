"""TRL (1.16) integration: ``SDARGRPOTrainer``, TRL's own GRPOTrainer with the SDAR distillation term.

Everything GRPO is TRL's code, untouched: generation, rewards, advantages, ``loss_type`` (every one),
``epsilon`` / ``epsilon_high`` / ``delta``, ``importance_sampling_level``, ``beta`` and
``use_bias_correction_kl``, the entropy bonus, ``top_entropy_quantile``, off-policy masks, vLLM
corrections, gradient accumulation, multi-process gathering. This subclass changes three things:

1. The per-token log-probs and entropies (``_get_per_token_logps_and_entropies``, every place TRL calls
   it: old, reference and current policy) come from ``sdar_kernels.token_logprobs`` on the model's
   logits (``head="logits"``) or ``linear_token_logprobs`` on its final hidden states and lm_head
   (``head="linear"``, never [B, T, V] logits): one streaming forward, one fused backward pass.
2. With ``sdar_config.distill_coef > 0``, each generation batch also gets a teacher: the policy itself,
   under no_grad, given the privileged text of the dataset column ``privileged_key`` (the retrieved
   skill) in its prompt, scoring exactly the student's completion tokens. ``teacher="logprobs"`` scores
   once per generation batch (the released SDAR form); ``teacher="logits"`` scores in each loss step
   (the current policy as teacher; needed for the full-vocabulary ``distill`` modes fkl / rkl / jsd).
3. The loss step adds ``distill_coef * sum_t w_t D_t``: the gated SDAR term D (``sdar_config``:
   gate_beta, distill, jsd_beta), aggregated with the very normaliser TRL's policy term uses for that
   ``loss_type`` (``token_weights``), over TRL's completion (and tool) mask.

An SDARConfig field that TRL's own configuration governs here (clip, KL, entropy, temperature,
aggregation, group size) must keep its default; setting it raises a ValueError naming the GRPOConfig
option to use instead. Text-only causal LMs; vision inputs and MoE router losses raise a ValueError.
"""

from __future__ import annotations

import functools
import types
from dataclasses import fields

import torch
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import pad

from sdar_kernels import linear_sdar_loss, linear_token_logprobs, sdar_loss, token_logprobs
from sdar_kernels.token_logprobs import gated_distill

from ..config import SDARConfig
from ..hf import lm_head_inputs

TEACHERS = ("logprobs", "logits")
HEADS = ("logits", "linear")
DISTILL_FIELDS = ("gate_beta", "distill_coef", "distill", "jsd_beta")
# SDARConfig fields that TRL's GRPOConfig governs in this trainer, and the option to set instead
GOVERNED_BY_TRL = {
    "clip_low": "epsilon", "clip_high": "epsilon_high", "clip_ratio_c": "delta / loss_type",
    "kl_coef": "beta", "entropy_coef": "entropy_coef", "temperature": "temperature",
    "loss_agg_mode": "loss_type", "group_size": "num_generations",
    "use_policy_gradient": "(no TRL equivalent: GRPO's policy term is always on)",
}
FULL_VOCAB = ("fkl", "rkl", "jsd")
VISION_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                 "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def default_teacher_prompt(prompt, privileged):
    """The teacher's prompt: the privileged text before a plain prompt, or as the system message of a
    conversational one (merged into an existing system message, which chat templates expect first)."""
    if is_conversational({"prompt": prompt}):
        if prompt and prompt[0].get("role") == "system":
            return [{**prompt[0], "content": f"{privileged}\n\n{prompt[0]['content']}"}] + list(prompt[1:])
        return [{"role": "system", "content": privileged}] + list(prompt)
    return f"{privileged}\n\n{prompt}"


def check_sdar_config(config: SDARConfig, teacher: str) -> SDARConfig:
    if not isinstance(config, SDARConfig):
        raise ValueError(f"sdar_config must be an sdar.SDARConfig, got {type(config).__name__}")
    default = SDARConfig()
    for f in fields(SDARConfig):
        if f.name not in DISTILL_FIELDS and getattr(config, f.name) != getattr(default, f.name):
            raise ValueError(f"sdar_config.{f.name}={getattr(config, f.name)!r} is not used by SDARGRPOTrainer: "
                             f"TRL's GRPOConfig governs it (set {GOVERNED_BY_TRL[f.name]}); sdar_config adds "
                             f"only the distillation ({', '.join(DISTILL_FIELDS)})")
    if config.distill in FULL_VOCAB and teacher != "logits":
        raise ValueError(f"sdar_config.distill={config.distill!r} is a full-vocabulary divergence: it needs "
                         "teacher='logits' (teacher logits in the loss step)")
    return config


def token_weights(trainer, mask, num_items_in_batch):
    """w_t such that TRL's policy loss for ``trainer.loss_type`` is sum_t w_t * per_token_loss_t.

    Mirrors TRL 1.16's ``_compute_loss`` normalisers (including its gradient-accumulation scaling), so
    the distillation term is aggregated exactly like the policy term it is added to."""
    m = mask.to(torch.float32)
    B = m.shape[0]
    train = trainer.model.training
    accumulation = trainer.current_gradient_accumulation_steps if train else 1.0
    loss_type = trainer.loss_type
    if loss_type in ("grpo", "sapo"):
        return m / m.sum(-1, keepdim=True).clamp(min=1.0) / B / accumulation
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return m / (B * trainer.max_completion_length) / accumulation
    if loss_type in ("cispo", "dapo", "vespo"):
        normalizer = num_items_in_batch.clamp(min=1.0) / trainer.accelerator.num_processes
        if train:
            normalizer = normalizer * accumulation / trainer.args.steps_per_generation
        return m / normalizer
    if loss_type == "luspo":
        return m / B / accumulation
    raise ValueError(f"loss_type={loss_type!r} has no known normaliser in SDARGRPOTrainer (TRL 1.16 types)")


def _add_lm_head_inputs_forward(model):
    """``model(..., sdar_lm_head_inputs=True)`` returns the lm_head's inputs (``sdar.hf.LMHeadInputs``)
    instead of logits. A flag on the model's own forward, so a DDP / FSDP wrapper's forward still runs."""
    original = model.forward

    @functools.wraps(type(model).forward)   # keep the signature: generate() validates kwargs against it
    def forward(self, *args, sdar_lm_head_inputs=False, **kwargs):
        if not sdar_lm_head_inputs:
            return original(*args, **kwargs)
        return lm_head_inputs(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)


class SDARGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` plus SDAR's gated self-distillation (module docstring).

    Args (beyond GRPOTrainer's): ``sdar_config`` (sdar.SDARConfig; only its distillation fields are
    used), ``privileged_key`` (dataset column with the privileged / skill text), ``teacher``
    ("logprobs" | "logits"), ``head`` ("logits" | "linear"), ``teacher_prompt_fn(prompt, privileged)``
    (the teacher prompt; default ``default_teacher_prompt``).
    """

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, *, sdar_config=None, privileged_key="privileged", teacher="logprobs",
                 head="logits", teacher_prompt_fn=None, **kwargs):
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if teacher_prompt_fn is not None and not callable(teacher_prompt_fn):
            raise ValueError("teacher_prompt_fn must be callable(prompt, privileged) -> teacher prompt")
        self.sdar_config = check_sdar_config(sdar_config if sdar_config is not None else SDARConfig(), teacher)
        self.privileged_key, self.teacher, self.head = privileged_key, teacher, head
        self.teacher_prompt_fn = teacher_prompt_fn or default_teacher_prompt
        self._sdar_capture = None     # set in the loss step: what the current policy's scoring keeps
        super().__init__(model, reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("SDARGRPOTrainer does not support MoE router auxiliary losses "
                             "(model config output_router_logits=True)")
        if head == "linear":     # policy (its PEFT base model, as TRL patches its fused head) and reference
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            for m in (base, self.ref_model):
                if m is not None:
                    _add_lm_head_inputs_forward(m)

    # ---- distillation on? ---------------------------------------------------------------------------
    @property
    def distilling(self) -> bool:
        return self.sdar_config.distill_coef != 0.0

    # ---- 1. per-token statistics through token_logprobs ---------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **multimodal):
        given = sorted(k for k, v in multimodal.items() if v is not None)
        if given:
            raise ValueError(f"SDARGRPOTrainer scores text-only models; got vision inputs {given}")
        if compute_aux_loss:
            raise ValueError("SDARGRPOTrainer does not support MoE router auxiliary losses")
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            stats = self._score(model, input_ids[rows], attention_mask[rows], logits_to_keep, compute_entropy)
            logps.append(stats.logprobs)
            entropies.append(stats.entropy)
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    def _model_outputs(self, model, input_ids, attention_mask, logits_to_keep):
        """Logits [B, K, V] (a strided view) or LMHeadInputs with hidden [B, K, H], position t predicting
        completion token t."""
        with self.accelerator.autocast():
            if self.head == "logits":
                out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1,
                            use_cache=False)
                return out.logits[:, :-1]
            inputs = model(input_ids=input_ids, attention_mask=attention_mask, sdar_lm_head_inputs=True)
        inputs.hidden = inputs.hidden[:, -logits_to_keep - 1:-1]
        if inputs.hidden.dtype != inputs.weight.dtype:      # e.g. cast_lm_head_to_fp32
            inputs.hidden = inputs.hidden.to(inputs.weight.dtype)
        return inputs

    def _score(self, model, input_ids, attention_mask, logits_to_keep, compute_entropy):
        labels = input_ids[:, -logits_to_keep:]
        mask = attention_mask[:, -logits_to_keep:].bool()
        out = self._model_outputs(model, input_ids, attention_mask, logits_to_keep)
        capture = self._sdar_capture      # set only inside the loss step (train or eval)
        teacher = None if capture is None else capture.get("teacher_outputs")
        if self.sdar_config.distill in FULL_VOCAB:
            teacher = None      # the divergence term reads the teacher's outputs itself (_distill_term)
        kw = dict(mask=mask, temperature=self.temperature, entropy=compute_entropy)
        if self.head == "logits":
            stats = token_logprobs(out, labels, teacher_logits=teacher, **kw)
        else:
            stats = linear_token_logprobs(out.hidden, out.weight, labels, bias=out.bias,
                                          teacher_hidden=None if teacher is None else teacher.hidden, **kw)
        if capture is not None:
            capture.update(logps=stats.logprobs, labels=labels, student_outputs=out,
                           teacher_logps=stats.teacher_logprobs)
        return stats

    # ---- 2. the teacher -----------------------------------------------------------------------------
    def _teacher_inputs(self, inputs, completion_ids, completion_mask):
        """Teacher prompt (privileged text + the student's prompt) + the student's completion tokens."""
        try:
            privileged = [x[self.privileged_key] for x in inputs]
        except KeyError:
            raise ValueError(f"the dataset has no column privileged_key={self.privileged_key!r} (the privileged "
                             "text the teacher sees); add it or set privileged_key") from None
        prompts = [self.teacher_prompt_fn(x["prompt"], p) for x, p in zip(inputs, privileged)]
        ids, _, _ = self._tokenize_prompts(prompts)
        device = completion_ids.device
        ids = [torch.tensor(i, device=device) for i in ids]
        prompt_ids = pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left")
        prompt_mask = pad([torch.ones_like(i) for i in ids], padding_value=0, padding_side="left")
        return (torch.cat([prompt_ids, completion_ids], 1),
                torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], 1))

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self.distilling:
            return output
        ids, mask = self._teacher_inputs(inputs, output["completion_ids"], output["completion_mask"])
        if self.teacher == "logits":      # scored in each loss step by the current policy
            output["sdar_teacher_ids"], output["sdar_teacher_mask"] = ids, mask
            return output
        K = output["completion_ids"].size(1)
        batch_size = self.args.per_device_train_batch_size if self.model.training else \
            self.args.per_device_eval_batch_size
        with torch.no_grad():
            output["sdar_teacher_logps"], _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, mask, K, batch_size=batch_size)
        return output

    # ---- 3. the loss step ---------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        if not self.distilling:
            return super()._compute_loss(model, inputs)
        capture = {}
        if self.teacher == "logits":
            K = inputs["completion_ids"].size(1)
            with torch.no_grad():
                capture["teacher_outputs"] = self._model_outputs(model, inputs["sdar_teacher_ids"],
                                                                 inputs["sdar_teacher_mask"], K)
        self._sdar_capture = capture
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._sdar_capture = None
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else \
            inputs["completion_mask"] * inputs["tool_mask"]
        weights = token_weights(self, mask, inputs["num_items_in_batch"]).to(capture["logps"].device)
        distill_loss, per_token = self._distill_term(capture, inputs, mask.bool(), weights)
        self._log_distill_metrics(per_token, mask.bool())
        return loss + self.sdar_config.distill_coef * distill_loss

    def _distill_term(self, capture, inputs, mask, weights):
        """(sum_t w_t D_t, {gate, gap: per-token, detached; distill_sum: sum of D over the mask})."""
        c = self.sdar_config
        if c.distill not in FULL_VOCAB:
            teacher = capture["teacher_logps"] if self.teacher == "logits" else inputs["sdar_teacher_logps"]
            d, gate, gap = gated_distill(capture["logps"], teacher, gate_beta=c.gate_beta, distill=c.distill)
            d = torch.where(mask, d, 0.0)
            return (weights * d).sum(), {"gate": gate, "gap": gap, "distill_sum": d.detach().sum()}
        # full-vocabulary divergences: the fused loss on the same outputs, distillation only, TRL's weights
        kw = dict(mask=mask, loss_weights=weights, gate_beta=c.gate_beta, distill_coef=1.0, distill=c.distill,
                  jsd_beta=c.jsd_beta, temperature=self.temperature)
        student, teacher = capture["student_outputs"], capture["teacher_outputs"]
        if self.head == "logits":
            out = sdar_loss(student, capture["labels"], teacher_logits=teacher, **kw)
        else:
            out = linear_sdar_loss(student.hidden, student.weight, capture["labels"], bias=student.bias,
                                   teacher_hidden=teacher.hidden, **kw)
        count = mask.sum().clamp(min=1).to(torch.float32)
        return out.loss, {"gate": out.gate, "gap": out.gap, "distill_sum": out.metrics["distill_loss"] * count}

    def _log_distill_metrics(self, per_token, mask):
        """sdar/* metrics: masked token means over every process (as TRL's own global_masked_mean)."""
        mode = "train" if self.model.training else "eval"
        count = mask.sum().to(torch.float32)

        def global_mean(local_sum):
            totals = self.accelerator.reduce(torch.stack([local_sum.to(torch.float32), count]).detach(),
                                             reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_sum(v):
            return torch.where(mask, v.to(torch.float32), 0.0).sum()

        gate = per_token["gate"]
        self._metrics[mode]["sdar/gate_mean"].append(global_mean(masked_sum(gate)))
        self._metrics[mode]["sdar/gate_active_ratio"].append(global_mean(masked_sum((gate > 0.5).float())))
        self._metrics[mode]["sdar/gap_mean"].append(global_mean(masked_sum(per_token["gap"])))
        self._metrics[mode]["sdar/distill_loss"].append(global_mean(per_token["distill_sum"]))

__all__ = ["SDARGRPOTrainer", "default_teacher_prompt", "token_weights", "check_sdar_config"]
