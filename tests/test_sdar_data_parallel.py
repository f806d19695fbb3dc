"""The training loop on 2 data-parallel processes (gloo, CPU, spawned here; DDP): GRPO groups normalised
across ranks, one update on a fixed batch equal to one process's, resume, and the torchrun command."""

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from sdar.distributed import DataParallel
from sdar.samples import grpo_advantages
from sdar.trainer import Trainer, TrainConfig

from spawn import run_on_ranks

WORLD = 2
MODES = [dict(loss_agg_mode="token-mean"), dict(loss_agg_mode="token-sum"),
         dict(loss_agg_mode="seq-mean-token-sum"), dict(loss_agg_mode="seq-mean-token-mean"),
         dict(loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=3.0),
         # one row per mini-batch: in every optimizer step one rank holds no row (a zero-weight pass)
         dict(loss_agg_mode="token-mean", mini_batches=64)]


def small(cache, **kw):
    # 3 groups of 2 episodes: on 2 ranks the middle group is split between them
    return TrainConfig(**{**dict(steps=1, tasks_per_step=3, group_size=2, eval_instances=2, eval_every=0,
                                 warmup_steps=20, cache_dir=cache, micro_batch=3, mini_batches=2), **kw})


def quiet(cfg, out, dp=None):
    return Trainer(cfg, out, progress=False, log=lambda m: None, dp=dp)


def sgd(t):
    """Plain SGD (see test_sdar_train.one_update: Adam's first step would magnify rounding differences)."""
    t.opt = torch.optim.SGD(t.model.parameters(), lr=0.5)
    return t


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sdar-dp-cache"))


def _split_update(rank, world, cfgs, samples, adv, want, out):
    dp = DataParallel(rank=rank, world=world)
    lo, hi = dp.shard(max(s.episode for s in samples) + 1)
    mine = [i for i, s in enumerate(samples) if lo <= s.episode < hi]
    assert mine == list(range(mine[0], mine[-1] + 1))
    for i, (cfg, expected) in enumerate(zip(cfgs, want)):
        t = sgd(quiet(cfg, os.path.join(out, f"{rank}-{i}"), dp=dp))
        metrics = t.update([samples[j] for j in mine], adv[mine])
        for k, v in params(t.model).items():
            torch.testing.assert_close(v, expected["params"][k], rtol=1e-4, atol=1e-6, msg=f"{cfg.loss_agg_mode} {k}")
        assert metrics["tokens"] == expected["tokens"]
        for k in ("pg_loss", "distill_loss", "kl_loss", "entropy", "grad_norm"):
            assert metrics[k] == pytest.approx(expected[k], rel=1e-4, abs=1e-6), (cfg.loss_agg_mode, k)


def test_update_on_two_ranks_equals_one_process(cache, tmp_path):
    cfgs = [small(cache, **m) for m in MODES]
    samples, adv, _ = quiet(cfgs[0], tmp_path / "rollout").collect()
    want = []
    for i, cfg in enumerate(cfgs):
        t = sgd(quiet(cfg, tmp_path / f"single-{i}"))
        before = params(t.model)
        m = t.update(samples, adv)
        want.append({"params": params(t.model), **m})
        assert max(float((v - before[k]).abs().max()) for k, v in want[-1]["params"].items()) > 1e-4
    run_on_ranks(_split_update, WORLD, tmp_path, cfgs, samples, adv, want, str(tmp_path))


def _collect_and_resume(rank, world, cache, out):
    dp = DataParallel(rank=rank, world=world)
    cfg = small(cache)
    samples, adv, stats = quiet(cfg, os.path.join(out, "collect"), dp=dp).collect()
    rows = dp.all_gather([(s.score, s.episode) for s in samples])
    all_adv = dp.all_gather(adv)
    scores, episodes = zip(*[r for part in rows for r in part])
    # every episode played once, by the rank that holds its share; groups normalised over all their rows
    assert sorted(set(episodes)) == list(range(cfg.tasks_per_step * cfg.group_size))
    assert {s.episode for s in samples} == set(range(*dp.shard(cfg.tasks_per_step * cfg.group_size)))
    groups = [e // cfg.group_size for e in episodes]
    owner = [r for r, part in enumerate(rows) for _ in part]
    assert {g for g, o in zip(groups, owner) if o == 0} & {g for g, o in zip(groups, owner) if o == 1}, \
        "no group is split between the ranks"
    torch.testing.assert_close(torch.cat(all_adv), grpo_advantages(list(scores), groups, list(episodes)))
    assert 0 <= stats["success"] <= 1 and stats["turns"] >= 1
    # resume: 2 steps straight == 1 step, then resumed to 2 (every rank's generator restored)
    cfg = replace(cfg, steps=2, eval_every=1)
    straight = quiet(cfg, os.path.join(out, "straight"), dp=dp)
    straight.run()
    quiet(replace(cfg, steps=1), os.path.join(out, "split"), dp=dp).run()
    resumed = quiet(cfg, os.path.join(out, "split"), dp=dp)
    resumed.run(resume=True)
    assert resumed.step == 2
    for k, v in params(straight.model).items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    if dp.main:
        lines = lambda d: [{k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "mem/"))}  # noqa: E731
                           for x in open(os.path.join(out, d, "metrics.jsonl")).read().splitlines()]
        assert lines("straight") == lines("split") and [r["step"] for r in lines("split")] == [0, 1, 2]
    # a checkpoint of 2 processes is not resumed by another number of processes
    if dp.main:
        with pytest.raises(ValueError, match="written by 2 process"):
            quiet(cfg, os.path.join(out, "split")).run(resume=True)


def test_collect_normalises_groups_across_ranks_and_resume_continues(cache, tmp_path):
    quiet(small(cache), tmp_path / "warm")      # build the warm-up cache once, before the ranks read it
    run_on_ranks(_collect_and_resume, WORLD, tmp_path, cache, str(tmp_path))


QUICK_SMALL = ["--quick", "--warmup-steps", "20", "--eval-instances", "4", "--tasks-per-step", "2",
               "--group-size", "4", "--no-progress"]


def sdar_train(args, *, nproc=1, cwd):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = launcher + ["-m", "sdar", "train"] + args
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def kinds(out):
    """What a run wrote: its files, and the keys of every metrics record (without the values)."""
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return files, [(r["step"], sorted(k for k in r if not k.startswith(("tokens/", "gate/", "gap/")))) for r in recs]


def test_torchrun_quick_writes_what_one_process_writes(cache, tmp_path):
    flags = QUICK_SMALL + ["--cache-dir", cache]
    one = sdar_train(flags + ["--out", str(tmp_path / "one"), "--steps", "2"], cwd=tmp_path)
    two = sdar_train(flags + ["--out", str(tmp_path / "two"), "--steps", "2"], nproc=2, cwd=tmp_path)
    assert kinds(tmp_path / "one") == kinds(tmp_path / "two")
    for p in (one, two):   # one summary line, from rank 0 only
        (line,) = [x for x in p.stdout.splitlines() if x.startswith("{")]
        assert json.loads(line)["step"] == 2
    recs = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["pg_loss"]) for r in recs if "pg_loss" in r)
    # --resume continues the 2-process run from its checkpoint
    again = sdar_train(flags + ["--out", str(tmp_path / "two"), "--resume"], nproc=2, cwd=tmp_path)
    assert "resumed from" in again.stderr and "at step 2" in again.stderr
    steps = [json.loads(x)["step"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


def test_leaving_meets_the_other_ranks_first_but_not_after_an_error(monkeypatch):
    # the barrier's handle, kept to the end, keeps a gloo worker from dropping the last reference to a
    # collective's tensors while the interpreter exits (an abort); after an error it would hang instead
    import sdar.distributed as sd
    calls = []

    class Work:
        def wait(self):
            calls.append("wait")

    def barrier(async_op=False):
        calls.append(("barrier", async_op))
        return Work()

    monkeypatch.setattr(sd.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sd.dist, "barrier", barrier)
    monkeypatch.setattr(sd.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(sd, "_KEPT_UNTIL_EXIT", [])
    with DataParallel(rank=1, world=2) as dp:
        assert dp.rank == 1
    assert calls == [("barrier", True), "wait", "destroy"]
    assert [type(w) for w in sd._KEPT_UNTIL_EXIT] == [Work]
    calls.clear()
    with pytest.raises(RuntimeError, match="this rank failed"), DataParallel(rank=1, world=2):
        raise RuntimeError("this rank failed")
    assert calls == ["destroy"]
    calls.clear()
    with DataParallel():        # alone: no group to leave
        pass
    assert calls == []


def test_shares_cover_every_item_once():
    for n in (0, 1, 5, 8):
        for world in (1, 2, 3):
            spans = [DataParallel(rank=r, world=world).shard(n) for r in range(world)]
            assert [i for lo, hi in spans for i in range(lo, hi)] == list(range(n))
            assert max(hi - lo for lo, hi in spans) - min(hi - lo for lo, hi in spans) <= 1
    # one process: its rows in order (or shuffled), cut into mini-batches of ceil(n / mini_batches)
    assert DataParallel().split_rows(5, 2) == ([0, 1, 2, 3, 4], [3, 2])
    own, shares = DataParallel().split_rows(7, 3, random.Random(0))
    assert sorted(own) == list(range(7)) and own != list(range(7)) and shares == [3, 3, 1]


def test_data_parallel_errors_name_the_argument(cache, tmp_path):
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        DataParallel(rank=0, world=2).place(torch.device("cuda", 1))
    assert DataParallel(rank=1, world=2, local_rank=1).place(torch.device("cuda")) == torch.device("cuda", 1)
    assert DataParallel(rank=1, world=2).place(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="cannot be shared by 8 processes"):
        quiet(small(cache, tasks_per_step=3, group_size=2), tmp_path, dp=DataParallel(rank=0, world=8))


@pytest.mark.parametrize("kw,match", [(dict(loss_agg_mode="seq-mean"), "loss_agg_mode"),
                                      (dict(loss_agg_mode="seq-mean-token-sum-norm"), "loss_scale_factor"),
                                      (dict(loss_scale_factor=0.0), "loss_scale_factor")])
def test_loss_aggregation_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)
