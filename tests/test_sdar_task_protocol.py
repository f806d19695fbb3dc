"""The task protocol: a second, unrelated text task trains through the same rollout, warm-up and trainer."""

import json
import math
import random
from dataclasses import dataclass, field, replace

import pytest

from sdar.task import Instance, Turn, WarmupExample, check_task
from sdar.trainer import Trainer, TrainConfig

WORDS = ("red", "blue", "green", "gold")


@dataclass
class LockEnv:
    """Say the two code words in order; a wrong word costs a turn; 3 turns."""

    code: tuple
    turns: list = field(default_factory=list)
    done: bool = False
    success: bool = False
    said: int = 0

    def observation(self) -> str:
        return f"slot {self.said + 1}"

    def step(self, action: str) -> Turn:
        valid = action in WORDS
        correct = valid and action == self.code[self.said]
        t = Turn(self.observation(), action, "click" if correct else "buzz" if valid else "invalid", valid, correct)
        self.said += correct
        self.turns.append(t)
        self.success = self.said == len(self.code)
        self.done = self.success or len(self.turns) >= 3
        return t

    @property
    def reward(self) -> float:
        return float(self.success) if self.done else 0.0


class Lock:
    """A second task: a two-word combination lock; the skill tells the code (wrong half the time)."""

    def instance(self, split, index):
        rng = random.Random(f"lock:{split}:{index}")
        code = (rng.choice(WORDS), rng.choice(WORDS))
        right = rng.random() < 0.5
        told = code if right else tuple(reversed(code)) if code[0] != code[1] else (code[0], "red")
        kind = "correct" if told == code else "wrong"
        return Instance(split, index, f"open lock {index % 3} .", f"code {told[0]} {told[1]} .", kind, code)

    def env(self, instance):
        return LockEnv(instance.data)

    def prompt(self, instance, env, history):
        past = [f"{t.action} {t.feedback} ;" for t in env.turns[-history:]] if history else []
        return " ".join([instance.task_text, *past, "now", env.observation()])

    def segment(self, instance, env):
        return f"{instance.task_text if not env.turns else env.turns[-1].feedback} now {env.observation()}"

    def vocabulary(self):
        return "open lock 0 1 2 . ; now slot code click buzz invalid privileged end".split() + list(WORDS)

    def warmup_example(self, rng):
        inst = self.instance("train", rng.randrange(100))
        return WarmupExample(inst, self.env(inst), None, rng.choice(WORDS), {"kind": "none"})


@pytest.fixture
def cfg(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lock-cache")
    return TrainConfig(steps=2, tasks_per_step=2, group_size=4, eval_instances=4, eval_every=1, warmup_steps=3,
                       cache_dir=str(cache), micro_batch=16)


def test_a_second_task_trains_through_the_protocol(cfg, tmp_path):
    task = Lock()
    check_task(task)
    t = Trainer(cfg, tmp_path, task=task, progress=False, log=lambda m: None)
    assert t.codec.encode("code red blue .") and t.eval_set[0].task_text.startswith("open lock")
    recs = t.run()
    assert [r["step"] for r in recs] == [0, 1, 2]
    for r in recs[1:]:
        assert math.isfinite(r["pg_loss"]) and r["tokens"] > 0 and 0 <= r["eval/success"] <= 1
        # per-category gate metrics name this task's outcomes and skill kinds
        cats = {k.split("/", 1)[1] for k in r if k.startswith("gate/")}
        assert cats and cats <= {f"{o}-{k}" for o in ("right", "wrong", "invalid") for k in ("correct", "wrong")} | {"eos"}
    warm = json.loads((t.source / "warmup.json").read_text())
    assert warm["task"]["task"] == "Lock" and "acc_none" in warm
    resumed = Trainer(replace(cfg, steps=3), tmp_path, task=task, progress=False, log=lambda m: None)
    assert resumed.run(resume=True)[-1]["step"] == 3
    # the concatenated layout drives the same task: one sample per episode, its action tokens in the loss
    resumed.cfg = replace(cfg, layout="concat")
    samples, adv, stats = resumed.collect()
    assert len(samples) == cfg.tasks_per_step * cfg.group_size and adv.shape == (len(samples),)
    for s in samples:   # one observation segment ("... now slot k") per turn of the episode
        text = resumed.codec.decode(s.ids)
        assert text.startswith("open lock") and text.count("slot") == len(s.meta["outcomes"]) >= 1


def test_a_task_without_the_protocol_is_refused(cfg, tmp_path):
    class Half:
        def instance(self, split, index): ...

    with pytest.raises(ValueError, match="task protocol"):
        Trainer(cfg, tmp_path, task=Half(), progress=False)
