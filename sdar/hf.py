"""Hugging Face glue for the fused-linear SDAR loss: the lm_head's input and weight, without logits.

``lm_head_inputs(model, input_ids, attention_mask=...)`` runs the causal LM's decoder (``model.base_model``:
embeddings, blocks, final norm) but not its lm_head, and returns the final hidden states together with
the lm_head weight and bias, ready for ``sdar_kernels.linear_sdar_loss``. The [B, T, V] logits are never
computed.

Tied embeddings (``config.tie_word_embeddings``, e.g. Qwen2.5-0.5B/1.5B/3B, Gemma, the tiny test model):
the lm_head weight *is* the input embedding Parameter. The helper returns that very Parameter (no copy,
no detach), so the loss's grad_weight is added by autograd to the same ``.grad`` as the embedding
lookup's gradient -- exactly what the eager ``lm_head(hidden)`` would do. ``LMHeadInputs.tied`` says
which case you are in.

Heads that post-process the logits: a constant logit scale (Cohere ``logit_scale``, Granite
``logits_scaling``) is folded into the hidden states (logits = (s * h) @ W.T); a logit soft-cap
(Gemma-2 ``final_logit_softcapping``) is not linear in the logits and raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LMHeadInputs:
    """What ``lm_head_inputs`` returns: a dataclass (read the fields by name), not a tuple."""

    hidden: torch.Tensor          # [B, T, H]: the lm_head's input (after the final norm, scale folded in)
    weight: torch.Tensor          # [V, H]: the lm_head weight Parameter itself
    bias: torch.Tensor | None     # [V] or None
    tied: bool                    # weight is the input-embedding Parameter (tied embeddings)

    def as_kwargs(self) -> dict:
        """``linear_sdar_loss(**inputs.as_kwargs(), labels=...)`` (hidden, weight, bias)."""
        return {"hidden": self.hidden, "weight": self.weight, "bias": self.bias}


def _logit_scale(config) -> float:
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        raise ValueError(f"{type(config).__name__} soft-caps its logits (final_logit_softcapping={softcap}); "
                         "the fused-linear loss takes linear logits only -- use sdar_loss on model logits")
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:        # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:     # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    return scale


def lm_head_weight(model):
    """(weight, bias, tied) of a causal LM's output projection (``model.get_output_embeddings()``)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) with a weight")
    weight, bias = head.weight, getattr(head, "bias", None)
    emb = model.get_input_embeddings()
    tied = emb is not None and getattr(emb, "weight", None) is weight
    return weight, bias, tied


def lm_head_inputs(model, input_ids=None, *, attention_mask=None, **kwargs) -> LMHeadInputs:
    """Run ``model``'s decoder (not its lm_head) and return the lm_head's inputs (see module docstring).

    ``kwargs`` go to the decoder's forward (``position_ids``, ``inputs_embeds``, ...). Call it under
    ``torch.no_grad()`` for the teacher branch. Position t of ``hidden`` predicts token t + 1: pair
    ``hidden[:, :-1]`` with ``input_ids[:, 1:]`` (or build labels / masks accordingly).
    """
    decoder = getattr(model, "base_model", None)
    if (decoder is None or decoder is model) and hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
    if decoder is None or decoder is model:
        raise ValueError(f"cannot find the decoder of {type(model).__name__} (base_model / get_decoder())")
    kwargs.setdefault("use_cache", False)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    scale = _logit_scale(model.config)
    if scale != 1.0:
        hidden = hidden * scale
    weight, bias, tied = lm_head_weight(model)
    return LMHeadInputs(hidden=hidden, weight=weight, bias=bias, tied=tied)
