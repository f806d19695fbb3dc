"""The embedded towers task: rules from features, held-out rules, skills and their noise, the episode."""

import collections
import random

import pytest

from sdar.models import Codec, build_tiny_tokenizer
from sdar.task import Env, Task
from sdar.towers import DOORS, FEATURE_VALUES, FEATURES, Rule, Towers, TowersConfig


def episode(task=None, split="train", index=0):
    task = task or Towers()
    inst = task.instance(split, index)
    return task, inst, task.env(inst)


def test_towers_implements_the_protocol():
    task, _, env = episode()
    assert isinstance(task, Task) and isinstance(env, Env)


def test_the_door_is_the_signed_features_door():
    task = Towers()
    for rule in task.rules():
        feature, value = rule.key()
        assert feature == FEATURES[rule.sign] and value == FEATURE_VALUES[feature][rule.values[rule.sign]]
        assert task.door(rule) == task.doors[(feature, value)]
        assert task.describe(rule).startswith(f"rule {feature} ") and f"{feature} {value}" in task.describe(rule)


def test_every_door_belongs_to_as_many_values():
    for kw in (dict(), dict(values=8), dict(features=3, values=4), dict(values=5)):
        doors = Towers(TowersConfig(**kw)).doors
        for group in [list(doors)] + [[k for k in doors if k[0] == f] for f in FEATURES]:
            counts = collections.Counter(doors[k] for k in group)
            if group:
                assert max(counts.values()) - min(counts.get(d, 0) for d in DOORS) <= 1, (kw, group)


def test_splits_are_disjoint_in_rules_and_train_covers_every_value():
    task = Towers()
    train, held = set(task.rules("train")), set(task.rules("eval"))
    assert len(train) + len(held) == len(task.rules()) == 6 * 6 * 2 and not train & held
    assert 0.15 < len(held) / len(task.rules()) < 0.35
    # every (deciding feature, value) -> door association occurs in training under other combinations
    assert {r.key() for r in train} == {r.key() for r in task.rules()}
    # instances are drawn from their split's rules only
    assert {task.instance("train", i).data for i in range(300)} <= train
    assert {task.instance("eval", i).data for i in range(200)} <= held


def test_instances_are_deterministic():
    task = Towers()
    assert task.instance("train", 7) == task.instance("train", 7)
    assert Towers(TowersConfig(world_seed=1)).doors != task.doors


def test_right_doors_climb_and_succeed():
    task, inst, env = episode()
    door = task.door(inst.data)
    for floor in range(task.cfg.floors):
        assert env.observation() == f"floor {floor + 1}"
        turn = env.step(door)
        assert turn.feedback == "open" and turn.valid and turn.correct
        assert env.done == (floor == task.cfg.floors - 1)
    assert env.success and env.reward == 1.0
    with pytest.raises(ValueError, match="finished"):
        env.step(door)


def test_wrong_doors_fail_at_the_turn_limit():
    task, inst, env = episode()
    wrong = next(d for d in DOORS if d != task.door(inst.data))
    for _ in range(task.cfg.turn_limit):
        assert env.reward == 0.0   # sparse: nothing before the end
        turn = env.step(wrong)
        assert turn.feedback == "locked" and turn.valid and not turn.correct
    assert env.done and not env.success and env.reward == 0.0 and task.cfg.turn_limit == task.cfg.floors + 1


@pytest.mark.parametrize("action", ["", "north east", "red", "door-north", "floor"])
def test_invalid_actions(action):
    _, _, env = episode()
    turn = env.step(action)
    assert turn.feedback == "invalid" and not turn.valid and not turn.correct and env.floor == 0


def test_prompt_shows_the_task_the_history_and_the_observation():
    task, inst, env = episode()
    wrong = next(d for d in DOORS if d != task.door(inst.data))
    env.step(wrong)
    env.step("bogus")
    env.step(task.door(inst.data))
    p = task.prompt(inst, env, history=2)
    assert p == f"{inst.task_text} floor 1 ? invalid ; floor 1 {task.door(inst.data)} open ; now floor 2"
    assert task.prompt(inst, env, history=0) == f"{inst.task_text} now floor 2"
    assert task.segment(inst, env) == "open now floor 2"


@pytest.mark.parametrize("kind", ["mixed", "wrong", "irrelevant"])
@pytest.mark.parametrize("noise", [0.0, 0.5, 1.0])
def test_skill_noise_fraction_and_kinds(noise, kind):
    task = Towers(TowersConfig(skill_noise=noise, noise_kind=kind))
    insts = [task.instance("train", k) for k in range(400)]
    bad = [i for i in insts if i.skill_kind != "correct"]
    assert abs(len(bad) / len(insts) - noise) < 0.07
    for i in insts:
        feature, value = i.data.key()
        door = task.door(i.data)
        if i.skill_kind == "correct":
            assert i.skill == f"skill {feature} {value} : door-{door} ."
        elif i.skill_kind == "wrong":   # the right value, a wrong door
            assert i.skill.startswith(f"skill {feature} {value} : door-") and f"door-{door}" not in i.skill
        else:                           # a tip that names no door at all
            assert i.skill.startswith("skill tip : ") and "door-" not in i.skill
    kinds = collections.Counter(i.skill_kind for i in bad)
    if bad and kind != "mixed":
        assert set(kinds) == {kind}
    if noise == 1.0 and kind == "mixed":
        assert 0.35 < kinds["wrong"] / len(bad) < 0.65


def test_warmup_examples_never_teach_the_rules():
    task = Towers()
    rng = random.Random(0)
    hits = collections.Counter()
    n = collections.Counter()
    for _ in range(2000):
        ex = task.warmup_example(rng)
        kind = ex.meta["kind"]
        n[kind] += 1
        hits[kind] += ex.target == task.door(ex.instance.data)
        if kind == "door":
            assert ex.skill.endswith(f"door-{ex.target} .")
        assert not ex.env.done
    for kind in ("none", "door", "irrelevant"):   # the target is right only by chance (1 in 4)
        assert 0.18 < hits[kind] / n[kind] < 0.32, kind


@pytest.mark.parametrize("kw", [dict(floors=0), dict(max_turns=1, floors=2), dict(features=1), dict(values=9),
                                dict(skill_noise=1.5), dict(noise_kind="random"), dict(holdout=1)])
def test_config_errors_name_the_argument(kw):
    name = next(k for k in kw if k != "floors" or len(kw) == 1)
    with pytest.raises(ValueError, match=name):
        TowersConfig(**kw)


def test_instance_errors():
    with pytest.raises(ValueError, match="split"):
        Towers().instance("test", 0)
    with pytest.raises(ValueError, match="index"):
        Towers().instance("train", -1)


def test_tiny_tokenizer_covers_every_text():
    task = Towers(TowersConfig(features=3, values=8, skill_noise=0.5))
    codec = Codec(build_tiny_tokenizer(task.vocabulary()))
    unk = codec.tokenizer.unk_token_id
    for k in range(60):
        inst = task.instance("train", k)
        env = task.env(inst)
        env.step("bogus")
        env.step(task.door(inst.data))
        for text in (inst.task_text, inst.skill, task.prompt(inst, env, 2), task.segment(inst, env)):
            ids = codec.encode(text)
            assert unk not in ids, text
            assert codec.decode(ids) == " ".join(text.split())
    assert len(task.vocabulary()) == len(set(task.vocabulary()))


def test_rule_key_and_split_formula():
    task = Towers(TowersConfig(holdout=3))
    r = Rule((1, 2), 1)
    assert r.key() == ("wall", FEATURE_VALUES["wall"][2])
    assert task.split_of(r) == ("eval" if (1 + 2 + 1) % 3 == 0 else "train")
