"""sdar.integrations.verl against verl's own installed code (verl 0.9.x; CI runs this file in a venv of its
own because verl pins transformers < 5.11; the main venv skips it).

- the patched engine step (token_logprobs) gives verl's own log-probs / entropy and gradients;
- every registered policy loss gives the same loss and gradient on fused statistics as on verl's own;
- the registered "sdar" distillation loss through verl's distillation_ppo_loss equals sdar_loss, for every
  loss_agg_mode, also split into micro-batches that carry global token / sequence counts.
"""

import os
import subprocess
import sys

import pytest
import torch

verl = pytest.importorskip("verl", reason="verl is an optional extra ([verl]); .ci/run tests it in its own venv")

import sdar.integrations.verl as sv  # noqa: E402
from sdar_kernels import sdar_loss  # noqa: E402
from verl.trainer.distillation.losses import distillation_ppo_loss  # noqa: E402
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY  # noqa: E402
from verl.workers.config import DistillationConfig, DistillationLossConfig  # noqa: E402
from verl.workers.config.actor import FSDPActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl_helpers import engine_step, make_packed  # noqa: E402

V = 97
# five sequences, the third with its whole response masked (an empty sequence: seq-* modes skip it)
PROMPTS, RESPONSES, EMPTY = [3, 5, 2, 4, 3], [6, 4, 7, 5, 3], (2,)
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def verl_own(*args):
    return sv._ORIGINAL["prepare_model_outputs"](*args)


def actor_config(**kw):
    base = dict(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=4,
                clip_ratio_low=0.2, clip_ratio_high=0.28, entropy_coeff=0.01, use_kl_loss=True,
                kl_loss_coef=0.05, kl_loss_type="low_var_kl")
    return FSDPActorConfig(**{**base, **kw})


def grads_of(loss, packed):
    return torch.autograd.grad(loss, packed.logits)[0]


def test_engine_is_patched_on_import():
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    assert FSDPEngineWithLMHead.prepare_model_outputs is sv.fused_prepare_model_outputs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("pad", [0, 3])
def test_fused_engine_step_equals_verl_own(temperature, entropy, pad):
    packed = make_packed(PROMPTS, RESPONSES, V, seed=1)
    own = engine_step(verl_own, packed, temperature=temperature, calculate_entropy=entropy, pad=pad)
    fused = engine_step(sv.fused_prepare_model_outputs, packed, temperature=temperature,
                        calculate_entropy=entropy, pad=pad)
    assert set(own) == set(fused)
    g = torch.Generator().manual_seed(2)
    ups = {k: torch.randn(v.values().shape, generator=g) for k, v in own.items()}
    for k in own:
        assert fused[k].is_nested and torch.equal(fused[k].offsets(), own[k].offsets())
        torch.testing.assert_close(fused[k].values(), own[k].values(), atol=2e-6, rtol=1e-5)

    def total(out):
        return sum((out[k].values() * ups[k]).sum() for k in out)

    torch.testing.assert_close(grads_of(total(fused), packed), grads_of(total(own), packed), atol=1e-6, rtol=1e-5)


def test_unhandled_configurations_run_verl_own_code(monkeypatch):
    calls = []
    monkeypatch.setitem(sv._ORIGINAL, "prepare_model_outputs", lambda *a: calls.append(a) or "verl")
    packed = make_packed(PROMPTS, RESPONSES, V)
    from verl.utils import tensordict_utils as tu
    out = engine_step(sv.fused_prepare_model_outputs, packed)      # handled: goes through the fused branch
    assert out == "verl" and tu.get_non_tensor_data(calls[-1][3], "use_fused_kernels", False) is True
    for flag in ("use_fused_kernels", "calculate_sum_pi_squared", "distillation_use_topk", "distillation_only"):
        calls.clear()

        def prepare(self, output, args, mb, fn, flag=flag):
            tu.assign_non_tensor_data(mb, flag, True)
            return sv.fused_prepare_model_outputs(self, output, args, mb, fn)

        engine_step(prepare, packed)
        assert calls[-1][1].logits is not None, flag         # verl's own call, with the model's logits


# every registered policy loss; those needing inputs a plain PPO batch does not carry are listed with why
NEEDS_MORE = {"bypass_mode": "needs rollout_log_probs from the inference engine"}
POLICY_LOSS_KWARGS = {"dro": {"dro_beta": 0.1}}     # options a mode requires


@pytest.mark.parametrize("loss_mode", sorted(set(POLICY_LOSS_REGISTRY) - set(NEEDS_MORE)))
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_every_policy_loss_runs_unchanged_on_fused_statistics(loss_mode, agg):
    packed = make_packed(PROMPTS, RESPONSES, V, seed=3, empty=EMPTY)
    config = actor_config(policy_loss=PolicyLossConfig(loss_mode=loss_mode, **POLICY_LOSS_KWARGS.get(loss_mode, {})),
                          loss_agg_mode=agg)
    own = engine_step(verl_own, packed)
    fused = engine_step(sv.fused_prepare_model_outputs, packed)
    torch.manual_seed(0)      # clip_cov / kl_cov pick tokens at random: the same draw for both
    loss_own, _ = ppo_loss(config, own, packed.data)
    torch.manual_seed(0)
    loss_fused, _ = ppo_loss(config, fused, packed.data)
    torch.testing.assert_close(loss_fused, loss_own, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads_of(loss_fused, packed), grads_of(loss_own, packed), atol=1e-6, rtol=1e-5)


def distill_config(coef=0.3, **kw):
    loss = DistillationLossConfig(loss_mode="sdar", use_policy_gradient=False, loss_max_clamp=None,
                                  distillation_loss_coef=coef, use_task_rewards=True, **kw)
    return DistillationConfig(enabled=False, distillation_loss=loss)


def sdar_loss_of(packed, config, coef, **counts):
    """sdar_loss on the same micro-batch, options mapped from verl's actor / distillation config."""
    logits, labels = packed.response_view()
    d = packed.data
    teacher = sv.no_padding_2_padding(d["teacher_logprobs"], d).squeeze(-1)
    return sdar_loss(
        logits, labels, mask=d["response_mask"].bool(), teacher_logprobs=teacher, advantages=d["advantages"],
        old_logprobs=d["old_log_probs"], ref_logprobs=d["ref_log_prob"], gate_beta=5.0, distill_coef=coef,
        clip_low=config.clip_ratio_low, clip_high=config.clip_ratio_high, clip_ratio_c=config.clip_ratio_c,
        kl_coef=config.kl_loss_coef, entropy_coef=config.entropy_coeff, loss_agg_mode=config.loss_agg_mode,
        **counts)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_sdar_distillation_through_verl_equals_sdar_loss(agg):
    packed = make_packed(PROMPTS, RESPONSES, V, seed=4, empty=EMPTY)
    config = actor_config(loss_agg_mode=agg)
    out = engine_step(sv.fused_prepare_model_outputs, packed)
    loss, metrics = distillation_ppo_loss(config, distill_config(0.3), out, packed.data)
    ref = sdar_loss_of(packed, config, 0.3)
    torch.testing.assert_close(loss, ref.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads_of(loss, packed), grads_of(ref.loss, packed), atol=1e-6, rtol=1e-5)
    for k in ("gate_mean", "gate_active_ratio", "gap_mean", "distill_loss"):
        assert metrics[f"sdar/{k}"].aggregate() == pytest.approx(ref.metrics[k].item(), abs=1e-6, rel=1e-5), k


def _micro_batches(agg):
    """Two micro-batches of one global batch, each carrying the global counts verl gives it."""
    whole = make_packed(PROMPTS, RESPONSES, V, seed=5, empty=EMPTY)
    mask = whole.data["response_mask"].bool()
    tokens, seqs = int(mask.sum()), int(mask.any(-1).sum())
    splits = (slice(0, 2), slice(2, 5))
    parts = [make_packed(PROMPTS[s], RESPONSES[s], V, seed=5) for s in splits]
    # the same tensors as the whole batch, split along the batch
    for part, s in zip(parts, splits):
        with torch.no_grad():
            part.logits.copy_(whole.logits[int(whole.cu_seqlens[s.start]): int(whole.cu_seqlens[s.stop])])
        part.input_ids.copy_(whole.input_ids[int(whole.cu_seqlens[s.start]): int(whole.cu_seqlens[s.stop])])
        for k in ("response_mask", "old_log_probs", "ref_log_prob", "advantages"):
            part.data[k] = whole.data[k][s, : part.data[k].shape[1]]
        t0, t1 = int(whole.cu_seqlens[s.start]), int(whole.cu_seqlens[s.stop])
        part.data["teacher_logprobs"] = part.nested(whole.data["teacher_logprobs"].values()[t0:t1])
        from verl.utils import tensordict_utils as tu
        tu.assign_non_tensor_data(part.data, "batch_num_tokens", tokens)
        tu.assign_non_tensor_data(part.data, "global_batch_size", seqs)
    return whole, parts, tokens, seqs


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_with_global_counts_sum_to_the_whole_batch(agg):
    whole, parts, tokens, seqs = _micro_batches(agg)
    config = actor_config(loss_agg_mode=agg, loss_scale_factor=11 if agg == "seq-mean-token-sum-norm" else None)
    total = 0.0
    for part in parts:
        out = engine_step(sv.fused_prepare_model_outputs, part)
        loss, _ = distillation_ppo_loss(config, distill_config(0.3), out, part.data)
        # each micro-batch equals sdar_loss given the same global counts (its loss_agg_mode weights)
        ref = sdar_loss_of(part, config, 0.3, num_tokens=tokens, num_sequences=seqs, dp_size=1,
                           loss_scale_factor=config.loss_scale_factor)
        torch.testing.assert_close(loss, ref.loss, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grads_of(loss, part), grads_of(ref.loss, part), atol=1e-6, rtol=1e-5)
        total = total + loss.detach()
    whole_ref = sdar_loss_of(whole, config, 0.3, loss_scale_factor=config.loss_scale_factor)
    torch.testing.assert_close(total, whole_ref.loss.detach(), atol=1e-6, rtol=1e-5)


def test_sdar_loss_refuses_the_policy_gradient_mode():
    packed = make_packed(PROMPTS, RESPONSES, V)
    out = engine_step(sv.fused_prepare_model_outputs, packed)
    cfg = DistillationConfig(enabled=False, distillation_loss=DistillationLossConfig(
        loss_mode="sdar", use_policy_gradient=True))
    with pytest.raises(ValueError, match="use_policy_gradient=False"):
        distillation_ppo_loss(actor_config(), cfg, out, packed.data)


def test_register_variant_and_opsd_baseline():
    from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY
    assert {"sdar", "sdar_opsd"} <= set(DISTILLATION_LOSS_REGISTRY)
    fn = sv.register_sdar_loss("sdar_test_b2", gate_beta=2.0, distill="reinforce")
    assert DISTILLATION_LOSS_REGISTRY["sdar_test_b2"] is fn
    with pytest.raises(ValueError, match="gate_beta"):
        sv.register_sdar_loss("sdar_bad", gate_beta=-1.0)


def test_verl_external_module_hook_registers_and_patches():
    code = ("import verl\n"
            "from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY as R\n"
            "from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead as E\n"
            "assert 'sdar' in R and E.prepare_model_outputs.__name__ == 'fused_prepare_model_outputs'\n")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "sdar.integrations.verl"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
