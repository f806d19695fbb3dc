"""The training loop on the tiny model: smoke test, fused vs eager update, the fidelity options, the gate
diagnostics, resume and safe checkpoints, the warm-up cache."""

import json
import math
import pickle
from dataclasses import replace

import pytest
import torch

import sdar_kernels
from sdar.checkpoint import STATE_FILE
from sdar.diagnostics import GateStats
from sdar.models import TinyConfig, ensure_tiny, load_model
from sdar.samples import Sample, collate
from sdar.towers import Towers, TowersConfig
from sdar.trainer import DISTILL_METRICS, Trainer, TrainConfig

TIME_KEYS = ("time/", "mem/", "eval/")   # eval: a run always evaluates its last step


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sdar-cache"))


@pytest.fixture
def cfg(cache):
    return TrainConfig(steps=2, tasks_per_step=2, group_size=4, eval_instances=4, eval_every=0,
                       warmup_steps=20, cache_dir=cache, micro_batch=16)


def quiet(cfg, out, **kw):
    return Trainer(cfg, out, progress=False, log=lambda m: None, **kw)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def strip(rec):
    return {k: v for k, v in rec.items() if not k.startswith(TIME_KEYS)}


def test_two_step_smoke(cfg, tmp_path):
    t = quiet(cfg, tmp_path)
    before = params(t.model)
    recs = t.run()
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        for k in ("pg_loss", "kl_loss", "distill_loss", "gate_mean", "gap_mean", "entropy", "grad_norm"):
            assert math.isfinite(r[k]), k
        assert 0.0 <= r["gate_mean"] <= 1.0 and r["tokens"] > 0
        # the action-token gate categories add up to every loss token
        assert sum(v for k, v in r.items() if k.startswith("tokens/")) == r["tokens"]
        assert 0 <= r["gate_active_action"] <= 1 and "gate/eos" in r
    moved = max(float((v - before[k]).abs().max()) for k, v in params(t.model).items())
    assert moved > 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    m2, _ = load_model(tmp_path / "checkpoint")
    for k, v in params(m2).items():
        torch.testing.assert_close(v, t.model.state_dict()[k], rtol=0, atol=0)


def test_grpo_logs_no_teacher_metrics(cfg, tmp_path):
    (rec,) = quiet(replace(cfg, method="grpo", steps=1), tmp_path).run()
    assert not [k for k in rec if k in DISTILL_METRICS or k.startswith(("gate", "gap/", "tokens/"))]
    assert math.isfinite(rec["pg_loss"]) and rec["pg_loss"] != 0.0


def test_gate_stats_split_tokens_by_category():
    # two released-layout rows: a right action under a correct skill, an invalid one under a wrong skill
    eos = 1
    samples = [Sample([5, 6, 20, eos], [0, 0, 1, 1], 0, steps=[-1, -1, 0, 0],
                      meta={"skill_kind": "correct", "outcomes": ["right"]}),
               Sample([5, 7, 8, 9, 21, 22], [0, 0, 0, 0, 1, 1], 1, steps=[-1, -1, -1, -1, 1, 1],
                      meta={"skill_kind": "wrong", "outcomes": ["wrong", "invalid"]})]
    b = collate(samples, 0, with_teacher=False)
    assert b.labels.tolist() == [20, eos, 21, 22]
    stats = GateStats(eos)
    stats.add(b, samples, torch.tensor([0.9, 0.5, 0.2, 0.4]), torch.tensor([2.0, 0.0, -1.0, -3.0]))
    m = stats.metrics()
    assert m["gate/right-correct"] == pytest.approx(0.9) and m["gap/right-correct"] == pytest.approx(2.0)
    assert m["gate/eos"] == pytest.approx(0.5) and m["tokens/eos"] == 1
    assert m["gate/invalid-wrong"] == pytest.approx(0.3) and m["gap/invalid-wrong"] == pytest.approx(-2.0)
    assert m["tokens/invalid-wrong"] == 2 and m["gate_active_action"] == pytest.approx(1 / 3)
    assert sorted(k for k in m if k.startswith("tokens/")) == ["tokens/eos", "tokens/invalid-wrong",
                                                                "tokens/right-correct"]


def one_update(cfg, tmp_path, other):
    """The same rollout batch, one update with ``cfg`` and one with ``other``: parameters after.

    Plain SGD here: Adam's first step is ~lr * sign(grad), which turns 1e-9 gradient differences on
    near-zero entries into lr-sized parameter differences; SGD keeps the comparison one of gradients."""
    a = quiet(cfg, tmp_path / "a")
    b = quiet(other, tmp_path / "b")
    a.opt = torch.optim.SGD(a.model.parameters(), lr=0.5)
    b.opt = torch.optim.SGD(b.model.parameters(), lr=0.5)
    samples, adv, _ = a.collect()
    ma, mb = a.update(samples, adv), b.update(samples, adv)
    return a, b, ma, mb


@pytest.mark.parametrize("change", [
    dict(loss_backend="eager"),
    pytest.param(dict(fused_linear=True), marks=pytest.mark.skipif(
        not hasattr(sdar_kernels, "linear_sdar_loss"), reason="sdar_kernels.linear_sdar_loss not available")),
], ids=["eager-reference", "fused-linear"])
@pytest.mark.parametrize("method", ["sdar", "grpo_opsd"])
def test_fused_and_reference_give_the_same_update(cfg, tmp_path, change, method):
    cfg = replace(cfg, method=method)
    a, b, ma, mb = one_update(cfg, tmp_path, replace(cfg, **change))
    for k in ("pg_loss", "kl_loss", "distill_loss", "gate_mean", "gap_mean", "entropy"):
        assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-6), k
    pb = b.model.state_dict()
    moved = 0.0
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, pb[k], rtol=1e-4, atol=1e-6, msg=k)
        moved = max(moved, float((v - a.ref.state_dict()[k]).abs().max()))
    assert moved > 1e-4


def test_live_teacher_reads_the_pre_update_weights(cfg, tmp_path):
    """fkl reads teacher logits in every micro-batch; with two mini-batches the second one must still
    see the weights from before the first optimizer step (the released teacher), not the current ones."""
    t = quiet(replace(cfg, distill="fkl", mini_batches=2), tmp_path)
    before = params(t.model)
    samples, adv, _ = t.collect()
    t.update(samples, adv)
    teacher = t.teacher_model.state_dict()
    for k, v in before.items():
        assert torch.equal(teacher[k], v), k
    assert any(not torch.equal(t.model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("change", [dict(distill="fkl"), dict(distill="jsd", fused_linear=True),
                                    dict(method="opsd"), dict(layout="concat"),
                                    dict(shuffle=False, cross_steps=False, penalty_per_step=False)],
                         ids=["fkl-live-teacher", "jsd-fused-linear", "opsd", "concat", "unshuffled-per-episode"])
def test_variants_update(cfg, tmp_path, change):
    if change.get("fused_linear") and not hasattr(sdar_kernels, "linear_sdar_loss"):
        pytest.skip("sdar_kernels.linear_sdar_loss not available")
    (rec,) = quiet(replace(cfg, steps=1, **change), tmp_path).run()
    assert all(math.isfinite(rec[k]) for k in ("pg_loss", "distill_loss", "kl_loss", "grad_norm"))
    if change.get("method") == "opsd":
        assert rec["pg_loss"] == 0.0 and rec["distill_loss"] != 0.0


@pytest.mark.parametrize("per_step", [True, False])
def test_invalid_penalty_lands_on_the_invalid_step(cfg, tmp_path, per_step):
    # one token per action and no room for end-of-sequence: every action is invalid, every episode fails
    t = quiet(replace(cfg, invalid_penalty=0.25, max_new_tokens=1, penalty_per_step=per_step), tmp_path)
    samples, adv, stats = t.collect()
    assert stats["invalid_rate"] == 1.0 and stats["success"] == 0.0
    turns = t.task.cfg.turn_limit
    for s in samples:   # released layout: one row per step
        assert s.meta["outcomes"][max(s.steps)] == "invalid"
        assert s.score == pytest.approx(-0.25 if per_step else -0.25 * turns)
    assert torch.all(adv == 0)   # every row of a group has the same score: no signal


def test_rows_are_shuffled_before_the_split(cfg, tmp_path):
    t = quiet(cfg, tmp_path)
    samples, adv, _ = t.collect()
    seen = []
    real = t.prepare
    t.prepare = lambda s: (seen.append(list(s)), real(s))[1]
    t.update(samples, adv)
    assert sorted(map(id, seen[0])) == sorted(map(id, samples)) and list(map(id, seen[0])) != list(map(id, samples))


def test_resume_gives_identical_continuation(cfg, tmp_path):
    cfg = replace(cfg, steps=2, eval_every=1, eval_instances=2)
    straight = quiet(cfg, tmp_path / "straight")
    straight.run()
    quiet(replace(cfg, steps=1), tmp_path / "split").run()
    resumed = quiet(cfg, tmp_path / "split")
    resumed.run(resume=True)
    assert resumed.step == 2
    pr = resumed.model.state_dict()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, pr[k]), k
    lines = lambda d: [strip(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(tmp_path / "straight") == lines(tmp_path / "split")


def test_resume_refuses_another_config(cfg, tmp_path):
    quiet(replace(cfg, steps=1), tmp_path).run()
    with pytest.raises(ValueError, match="different config"):
        quiet(replace(cfg, lr=5e-4), tmp_path).run(resume=True)


class Payload:
    """Unpickling this would call ``marker.write_text`` (stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (type(self.path).write_text, (self.path, "code ran"))


def test_resume_refuses_a_crafted_pickle(cfg, tmp_path):
    quiet(replace(cfg, steps=1), tmp_path).run()
    state = tmp_path / "checkpoint" / STATE_FILE
    marker = tmp_path / "marker.txt"
    with open(state, "wb") as f:   # a state file whose unpickling runs code
        pickle.dump({"format": 2, "step": Payload(marker)}, f, protocol=2)
    with pytest.raises(ValueError, match="refused"):
        quiet(cfg, tmp_path).run(resume=True)
    assert not marker.exists()
    # the same payload inside torch.save's zip format is refused too
    torch.save({"format": 2, "step": Payload(marker)}, state)
    with pytest.raises(ValueError, match="refused"):
        quiet(cfg, tmp_path).run(resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("kw,name", [(dict(method="ppo"), "method"), (dict(layout="flat"), "layout"),
                                     (dict(loss_backend="cuda"), "loss_backend"),
                                     (dict(loss_backend="eager", fused_linear=True), "fused_linear"),
                                     (dict(steps=0), "steps"), (dict(lr=-1.0), "lr"),
                                     (dict(invalid_penalty=float("nan")), "invalid_penalty"),
                                     (dict(method="grpo", distill_coef=0.1), "distill_coef"),
                                     (dict(eval_temperature=-1.0), "eval_temperature"),
                                     (dict(noise_kind="odd"), "noise_kind"), (dict(values=12), "values"),
                                     (dict(distill="kl"), "distill")])
def test_config_errors_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**kw)


def test_device_errors(cfg, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            Trainer(replace(cfg, device="cuda"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="device"):
        Trainer(replace(cfg, device="tpu"), tmp_path, progress=False)


def test_local_checkpoint_path_errors(cfg, tmp_path):
    with pytest.raises(ValueError, match="model"):
        Trainer(replace(cfg, model=str(tmp_path / "missing")), tmp_path, progress=False)


def test_warmup_cache_is_deterministic_reused_and_independent_of_the_noise(tmp_path):
    tiny = TinyConfig(warmup_steps=5)
    p1 = ensure_tiny(tiny, Towers(), 2, tmp_path / "one")
    p2 = ensure_tiny(tiny, Towers(TowersConfig(skill_noise=0.9, noise_kind="wrong")), 2, tmp_path / "two")
    assert p1.name == p2.name and (p1 / "warmup.json").exists()
    m1, _ = load_model(p1)
    m2, _ = load_model(p2)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    mtime = (p1 / "warmup.json").stat().st_mtime
    assert ensure_tiny(tiny, Towers(), 2, tmp_path / "one") == p1 and (p1 / "warmup.json").stat().st_mtime == mtime
    assert ensure_tiny(tiny, Towers(TowersConfig(floors=3)), 2, tmp_path / "one") != p1
