"""sdar.integrations.trl.SDARGRPOTrainer against TRL's own installed GRPOTrainer (TRL 1.16).

Distillation off: the same parameters as TRL's GRPOTrainer after 3 optimizer steps from the same seed,
for every loss_type, importance-sampling level, KL setting, num_iterations and gradient accumulation.
Distillation on: it trains, logs the sdar/* metrics, and its loss is TRL's policy loss plus a hand-built
distillation term on a captured batch.
"""

import json
import os

import pytest
import torch

pytest.importorskip("trl", reason="trl is an optional extra ([trl]); the test extra installs it")

import trl_helpers as h  # noqa: E402
from sdar import SDARConfig  # noqa: E402
from sdar.integrations.trl import SDARGRPOTrainer  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

h.quiet()

# (id, GRPOConfig overrides): every TRL 1.16 loss_type; token / sequence IS; beta 0 and 0.04 with the
# bias-corrected KL on and off; num_iterations 1 and 2; gradient_accumulation_steps 1 and 2; delta
PARITY = [
    ("grpo-seq-b.04bc-it2-ga2", dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04,
                                     use_bias_correction_kl=True, num_iterations=2, gradient_accumulation_steps=2)),
    ("bnpo-token-b.04-ga2-entropy-bonus", dict(loss_type="bnpo", beta=0.04, gradient_accumulation_steps=2,
                                               entropy_coef=0.01, top_entropy_quantile=0.5)),
    ("dr_grpo-token-b.04bc-it2", dict(loss_type="dr_grpo", beta=0.04, use_bias_correction_kl=True,
                                      num_iterations=2)),
    ("dapo-token-b0-it1-ga1-delta", dict(loss_type="dapo", delta=1.5)),
    ("cispo-token-b0-it2", dict(loss_type="cispo", epsilon_high=1.2, num_iterations=2)),
    ("sapo-token-b.04-it2-ga2", dict(loss_type="sapo", beta=0.04, gradient_accumulation_steps=2, num_iterations=2)),
    ("luspo-seq-b0-it2", dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2)),
    ("vespo-token-b0-it2-ga2", dict(loss_type="vespo", num_iterations=2, gradient_accumulation_steps=2)),
]
# Plain SGD: a parameter difference is lr times a gradient difference, so the comparison sees the gradients
# themselves. (Adam's first steps divide each gradient entry by its own magnitude: an entry whose gradient
# is at fp32 noise level, ~1e-9, moves by ~lr in a direction rounding decides; one Adam case below.)
SGD = dict(optim="sgd", learning_rate=0.1)
TOL = 1e-6    # fp32: the fused statistics differ from TRL's chunked head in the last bits only
ADAM_TOL = 1e-4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return h.saved_model(tmp_path_factory.mktemp("tiny"))


def _train(cls, model_path, overrides, **kw):
    tok = h.tokenizer()
    out = os.path.join(os.path.dirname(model_path), "out")
    trainer = cls(model_path, h.reward, args=h.config(out, **overrides), train_dataset=h.dataset(),
                  processing_class=tok, **kw)
    trainer.train()
    return trainer


def _record(name, value):
    """With SDAR_PARITY_LOG=path, append the measured delta (the parity table of the notes)."""
    path = os.environ.get("SDAR_PARITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"trainer": "trl", "case": name, "max_abs_delta": value}) + "\n")


@pytest.mark.parametrize("name,overrides", [pytest.param(n, o, id=n) for n, o in PARITY])
def test_distillation_off_matches_grpo_trainer(name, overrides, model_path):
    overrides = {**SGD, **overrides}
    stock = _train(GRPOTrainer, model_path, overrides)
    ours = _train(SDARGRPOTrainer, model_path, overrides, sdar_config=SDARConfig(distill_coef=0.0))
    delta = h.max_param_delta(stock.model, ours.model)
    _record(name, delta)
    assert h.params_moved(stock)
    assert delta <= TOL, f"{name}: max |delta param| {delta:.3e} > {TOL}"
    # the logged TRL metrics agree too (same completions, rewards and losses)
    for a, b in zip(stock.state.log_history, ours.state.log_history):
        for k in ("reward", "completions/mean_length"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_adam_matches_grpo_trainer_to_a_fraction_of_the_step(model_path):
    overrides = dict(loss_type="bnpo", beta=0.04, gradient_accumulation_steps=2)      # AdamW, lr 1e-2
    stock = _train(GRPOTrainer, model_path, overrides)
    ours = _train(SDARGRPOTrainer, model_path, overrides, sdar_config=SDARConfig(distill_coef=0.0))
    delta = h.max_param_delta(stock.model, ours.model)
    _record("bnpo-token-b.04-ga2-adamw", delta)
    assert delta <= ADAM_TOL


def test_linear_head_matches_grpo_trainer(model_path):
    overrides = dict(loss_type="grpo", beta=0.04, num_iterations=2, **SGD)
    stock = _train(GRPOTrainer, model_path, overrides)
    ours = _train(SDARGRPOTrainer, model_path, overrides, sdar_config=SDARConfig(distill_coef=0.0), head="linear")
    delta = h.max_param_delta(stock.model, ours.model)
    _record("grpo-linear-head-b.04-it2", delta)
    assert delta <= TOL


SDAR_ON = [
    ("logits-linear-reinforce", dict(teacher="logits", head="linear"),
     SDARConfig(distill_coef=0.5, distill="reinforce", gate_beta=2.0)),
    ("logits-logits-fkl", dict(teacher="logits", head="logits"), SDARConfig(distill_coef=0.5, distill="fkl")),
    ("logits-linear-jsd", dict(teacher="logits", head="linear"), SDARConfig(distill_coef=0.5, distill="jsd")),
]


@pytest.mark.parametrize("name,kw,cfg", [pytest.param(*c, id=c[0]) for c in SDAR_ON])
def test_distillation_on_trains_and_logs_metrics(name, kw, cfg, model_path):
    trainer = _train(SDARGRPOTrainer, model_path, dict(loss_type="dapo", num_iterations=2), sdar_config=cfg, **kw)
    logged = [e for e in trainer.state.log_history if "sdar/gate_mean" in e]
    assert len(logged) == 3
    for e in logged:
        for k in ("sdar/gate_mean", "sdar/gate_active_ratio", "sdar/gap_mean", "sdar/distill_loss"):
            assert k in e and e[k] == e[k]      # present and not NaN
        assert 0.0 <= e["sdar/gate_mean"] <= 1.0
    assert h.params_moved(trainer)
    if name == "logits-logits-fkl":      # evaluation runs the same loss step under no_grad
        assert "eval_sdar/gate_mean" in trainer.evaluate(h.dataset(4))


def _hand_distillation(trainer, inputs, coef, gate_beta):
    """coef * sum_t w_t D_t built by hand: eager log-softmax of student and teacher, TRL's normaliser."""
    model, tok, T = trainer.model, trainer.processing_class, trainer.temperature
    prompt_ids, completion = inputs["prompt_ids"], inputs["completion_ids"]
    mask = inputs["completion_mask"].float()
    K = completion.shape[1]

    def logps(ids, attention):
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -K - 1:-1].float() / T
        return torch.log_softmax(logits, -1).gather(-1, completion[..., None]).squeeze(-1)

    student = logps(torch.cat([prompt_ids, completion], 1),
                    torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1))
    privileged = dict(zip(h.PROMPTS, h.PRIVILEGED))
    rows = [tok(privileged[tok.decode(p[m.bool()])] + "\n\n" + tok.decode(p[m.bool()]))["input_ids"]
            for p, m in zip(prompt_ids, inputs["prompt_mask"])]
    width = max(len(r) for r in rows)
    t_ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    t_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        teacher = logps(torch.cat([t_ids, completion], 1), torch.cat([t_mask, inputs["completion_mask"]], 1))
    gate = torch.sigmoid(gate_beta * (teacher - student.detach()))
    d = gate * (teacher - student)
    B, acc = mask.shape[0], trainer.current_gradient_accumulation_steps
    if trainer.loss_type == "grpo":
        w = mask / mask.sum(-1, keepdim=True).clamp(min=1) / B / acc
    else:  # dapo: num_items_in_batch spans the generation batch
        w = mask / (inputs["num_items_in_batch"] * acc / trainer.args.steps_per_generation)
    return coef * (w * d).sum()


@pytest.mark.parametrize("loss_type,ga", [("grpo", 2), ("dapo", 1)])
def test_loss_is_trl_policy_loss_plus_hand_built_distillation(loss_type, ga, model_path, monkeypatch):
    """On a captured batch: our loss = TRL's own policy loss (its own fused log-probs) + the hand-built term."""
    import copy
    import types

    captured = []
    original = SDARGRPOTrainer._compute_loss

    def spy(self, model, inputs):
        state = copy.deepcopy(model.state_dict())
        loss = original(self, model, inputs)
        captured.append((inputs, loss.detach(), state, self.current_gradient_accumulation_steps))
        return loss

    monkeypatch.setattr(SDARGRPOTrainer, "_compute_loss", spy)
    cfg = SDARConfig(distill_coef=0.5, gate_beta=5.0)
    trainer = _train(SDARGRPOTrainer, model_path, dict(loss_type=loss_type, gradient_accumulation_steps=ga,
                                                       max_steps=1, **SGD), sdar_config=cfg)
    inputs, loss, state, acc = captured[-1]
    trainer.model.load_state_dict(state)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = acc
    stock = types.MethodType(GRPOTrainer._get_per_token_logps_and_entropies, trainer)
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", stock)
    policy = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    expected = policy + _hand_distillation(trainer, inputs, 0.5, 5.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    _record(f"sdar-on-{loss_type}-ga{ga}-hand-composition-loss", abs(loss.item() - expected.item()))

    # and the gradient: our loss step (monkeypatch undone) against the hand composition
    monkeypatch.undo()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(original(trainer, trainer.model, inputs), params)
    trainer._get_per_token_logps_and_entropies = stock
    hand = torch.autograd.grad(GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
                               + _hand_distillation(trainer, inputs, 0.5, 5.0), params)
    for a, b in zip(ours, hand):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_refusals_name_the_option(model_path):
    tok = h.tokenizer()
    args = h.config(os.path.join(os.path.dirname(model_path), "out"))
    with pytest.raises(ValueError, match="sdar_config.kl_coef.*beta"):
        SDARGRPOTrainer(model_path, h.reward, args=args, train_dataset=h.dataset(), processing_class=tok,
                        sdar_config=SDARConfig(kl_coef=0.05))
    with pytest.raises(ValueError, match="teacher='logits'"):
        SDARGRPOTrainer(model_path, h.reward, args=args, train_dataset=h.dataset(), processing_class=tok,
                        sdar_config=SDARConfig(distill="fkl"))
    with pytest.raises(ValueError, match="teacher must be one of"):
        SDARGRPOTrainer(model_path, h.reward, args=args, train_dataset=h.dataset(), processing_class=tok,
                        teacher="model")
    trainer = SDARGRPOTrainer(model_path, h.reward, args=args, train_dataset=h.dataset().remove_columns("privileged"),
                              processing_class=tok)
    with pytest.raises(ValueError, match="privileged_key='privileged'"):
        trainer.train()
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="pixel_values"):
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, ids, 2, pixel_values=torch.zeros(1))
