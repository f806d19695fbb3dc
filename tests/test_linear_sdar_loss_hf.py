"""``sdar.hf.lm_head_inputs`` + ``linear_sdar_loss`` on a tiny random Hugging Face causal LM equals
``sdar_loss`` on the model's own logits: loss, and the gradient of every model parameter (tied and untied
embeddings; under tied embeddings the lm_head gradient lands in the embedding's .grad)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import sdar_kernels as sk
from sdar.hf import _logit_scale, lm_head_inputs

transformers = pytest.importorskip("transformers")


def tiny_qwen2(tied):
    cfg = transformers.Qwen2Config(vocab_size=211, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).float()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lm_head_inputs_match_model_logits(monkeypatch, tied):
    monkeypatch.setenv("SDAR_LINEAR_CHUNK_ROWS", "8")
    model = tiny_qwen2(tied)
    B, T, V = 2, 13, 211
    ids = torch.randint(0, V, (B, T))
    teacher_ids = torch.randint(0, V, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, :3] = 0                                    # left padding
    labels, mask = ids[:, 1:], attn[:, 1:].bool()
    adv = torch.randn(B)
    opts = dict(advantages=adv, mask=mask, distill="jsd", entropy_coef=0.01, backend="torch")

    inputs = lm_head_inputs(model, ids, attention_mask=attn)
    assert inputs.tied is tied
    assert inputs.weight is model.get_output_embeddings().weight
    if tied:
        assert inputs.weight is model.get_input_embeddings().weight
    with torch.no_grad():
        teacher = lm_head_inputs(model, teacher_ids, attention_mask=attn)
    out = sk.linear_sdar_loss(inputs.hidden[:, :-1], inputs.weight, labels, bias=inputs.bias,
                              teacher_hidden=teacher.hidden[:, :-1], **opts)
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(ids, attention_mask=attn).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = model(teacher_ids, attention_mask=attn).logits[:, :-1]
    ref = sk.sdar_loss(logits, labels, teacher_logits=teacher_logits, **opts)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-7)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_logit_post_processing():
    assert _logit_scale(SimpleNamespace()) == 1.0
    assert _logit_scale(SimpleNamespace(logit_scale=0.0625)) == 0.0625         # Cohere multiplies
    assert _logit_scale(SimpleNamespace(logits_scaling=4.0)) == 0.25           # Granite divides
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        _logit_scale(SimpleNamespace(final_logit_softcapping=30.0))            # Gemma-2 soft-cap
