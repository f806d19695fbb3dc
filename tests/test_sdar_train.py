"""The training loop on the tiny model: smoke test, fused vs eager update, resume, warm-up cache, CLI."""

import json
import math
from dataclasses import replace

import pytest
import torch

import sdar_kernels
from sdar.cli import main
from sdar.env import TowerConfig
from sdar.models import TinyConfig, ensure_tiny, load_model
from sdar.trainer import Trainer, TrainConfig

TIME_KEYS = ("time/", "mem/", "eval/")   # eval: a run always evaluates its last step


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sdar-cache"))


@pytest.fixture
def cfg(cache):
    return TrainConfig(steps=2, tasks_per_step=2, group_size=4, eval_instances=4, eval_every=0,
                       warmup_steps=20, cache_dir=cache, micro_batch=16)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def strip(rec):
    return {k: v for k, v in rec.items() if not k.startswith(TIME_KEYS)}


def test_two_step_smoke(cfg, tmp_path):
    t = Trainer(cfg, tmp_path, progress=False, log=lambda m: None)
    before = params(t.model)
    recs = t.run()
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        for k in ("pg_loss", "kl_loss", "distill_loss", "gate_mean", "gap_mean", "entropy", "grad_norm"):
            assert math.isfinite(r[k]), k
        assert 0.0 <= r["gate_mean"] <= 1.0 and r["tokens"] > 0
    moved = max(float((v - before[k]).abs().max()) for k, v in params(t.model).items())
    assert moved > 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    m2, _ = load_model(tmp_path / "checkpoint")
    for k, v in params(m2).items():
        torch.testing.assert_close(v, t.model.state_dict()[k], rtol=0, atol=0)


def one_update(cfg, tmp_path, other):
    """The same rollout batch, one update with ``cfg`` and one with ``other``: parameters after.

    Plain SGD here: Adam's first step is ~lr * sign(grad), which turns 1e-9 gradient differences on
    near-zero entries into lr-sized parameter differences; SGD keeps the comparison one of gradients."""
    a = Trainer(cfg, tmp_path / "a", progress=False, log=lambda m: None)
    b = Trainer(other, tmp_path / "b", progress=False, log=lambda m: None)
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


@pytest.mark.parametrize("change", [dict(distill="fkl"), dict(distill="jsd", fused_linear=True),
                                    dict(method="opsd"), dict(method="grpo"), dict(layout="concat")],
                         ids=["fkl-live-teacher", "jsd-fused-linear", "opsd", "grpo", "concat"])
def test_variants_update(cfg, tmp_path, change):
    if change.get("fused_linear") and not hasattr(sdar_kernels, "linear_sdar_loss"):
        pytest.skip("sdar_kernels.linear_sdar_loss not available")
    t = Trainer(replace(cfg, steps=1, **change), tmp_path, progress=False, log=lambda m: None)
    (rec,) = t.run()
    assert all(math.isfinite(rec[k]) for k in ("pg_loss", "distill_loss", "kl_loss", "grad_norm"))
    if change.get("method") == "opsd":
        assert rec["pg_loss"] == 0.0 and rec["distill_loss"] != 0.0
    if change.get("method") == "grpo":  # distill_loss is reported (a diagnostic) but weighted by 0
        assert rec["pg_loss"] != 0.0


def test_resume_gives_identical_continuation(cfg, tmp_path):
    cfg = replace(cfg, steps=2, eval_every=1, eval_instances=2)
    straight = Trainer(cfg, tmp_path / "straight", progress=False, log=lambda m: None)
    straight.run()
    Trainer(replace(cfg, steps=1), tmp_path / "split", progress=False, log=lambda m: None).run()
    resumed = Trainer(cfg, tmp_path / "split", progress=False, log=lambda m: None)
    resumed.run(resume=True)
    assert resumed.step == 2
    pr = resumed.model.state_dict()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, pr[k]), k
    lines = lambda d: [strip(json.loads(x)) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(tmp_path / "straight") == lines(tmp_path / "split")


def test_resume_refuses_another_config(cfg, tmp_path):
    Trainer(replace(cfg, steps=1), tmp_path, progress=False, log=lambda m: None).run()
    with pytest.raises(ValueError, match="different config"):
        Trainer(replace(cfg, lr=5e-4), tmp_path, progress=False, log=lambda m: None).run(resume=True)


@pytest.mark.parametrize("kw,name", [(dict(method="ppo"), "method"), (dict(layout="flat"), "layout"),
                                     (dict(loss_backend="cuda"), "loss_backend"),
                                     (dict(loss_backend="eager", fused_linear=True), "fused_linear"),
                                     (dict(steps=0), "steps"), (dict(lr=-1.0), "lr"),
                                     (dict(method="grpo", distill_coef=0.1), "distill_coef"),
                                     (dict(eval_temperature=-1.0), "eval_temperature")])
def test_config_errors_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**kw)


def test_local_checkpoint_path_errors(cfg, tmp_path):
    with pytest.raises(ValueError, match="model"):
        Trainer(replace(cfg, model=str(tmp_path / "missing")), tmp_path, progress=False)


def test_warmup_cache_is_deterministic_and_reused(tmp_path):
    tiny, env = TinyConfig(warmup_steps=5), TowerConfig()
    p1 = ensure_tiny(tiny, env, 2, tmp_path / "one")
    p2 = ensure_tiny(tiny, env, 2, tmp_path / "two")
    assert p1.name == p2.name and (p1 / "warmup.json").exists()
    m1, _ = load_model(p1)
    m2, _ = load_model(p2)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    mtime = (p1 / "warmup.json").stat().st_mtime
    assert ensure_tiny(tiny, env, 2, tmp_path / "one") == p1 and (p1 / "warmup.json").stat().st_mtime == mtime


def test_cli_train_quick(tmp_path, cache, capsys):
    out = tmp_path / "run"
    # --warmup-steps 20 reuses this module's warm-up cache (the real --quick builds a 100-step one)
    assert main(["train", "--quick", "--out", str(out), "--cache-dir", cache, "--warmup-steps", "20",
                 "--no-progress"]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == 0 and "eval/success" in recs[-1]
    assert (out / "checkpoint" / "config.json").exists() and (out / "config.json").exists()
    assert '"eval/success"' in capsys.readouterr().out


def test_cli_compare_quick(tmp_path, cache):
    out = tmp_path / "cmp"
    assert main(["compare", "--quick", "--methods", "grpo,sdar", "--seeds", "2", "--out", str(out),
                 "--cache-dir", cache, "--warmup-steps", "20", "--no-progress"]) == 0
    table = (out / "results.md").read_text()
    assert "| grpo |" in table and "| sdar |" in table and "+-" in table
    assert (out / "results.png").stat().st_size > 10_000
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and "seed" in p.name) == [
        "grpo-seed0", "grpo-seed1", "sdar-seed0", "sdar-seed1"]


def test_cli_errors_name_the_argument(tmp_path):
    with pytest.raises(SystemExit):
        main(["compare", "--quick", "--methods", "grpo,ppo", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["train", "--method", "ppo"])
