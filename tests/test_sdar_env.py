"""The embedded towers task: rules, determinism, splits, retrieval noise, vocabulary."""

import pytest

from sdar.env import ACTIONS, FAMILIES, TowerConfig, TowerEnv, content_id, make_instance, vocabulary
from sdar.models import Codec, build_tiny_tokenizer


def env_for(cfg=TowerConfig(), split="train", index=0):
    return TowerEnv(cfg, make_instance(cfg, split, index))


def wrong_door(env):
    return next(a for a in ACTIONS if a != env.correct_action())


def test_correct_doors_climb_and_succeed():
    env = env_for()
    for floor in range(env.cfg.n_floors):
        assert env.observation().startswith(f"floor {floor + 1} lamp ") and env.observation().endswith(env.inst.family)
        result, done = env.step(env.correct_action())
        assert result == "open"
        assert done == (floor == env.cfg.n_floors - 1)
    assert env.success and env.reward == 1.0
    with pytest.raises(ValueError, match="finished"):
        env.step("north")


def test_wrong_door_stays_and_turn_limit_fails():
    env = env_for()
    for t in range(env.cfg.max_turns):
        assert env.reward == 0.0  # sparse: nothing before the end
        result, done = env.step(wrong_door(env))
        assert result == "locked" and env.floor == 0
    assert done and not env.success and env.reward == 0.0


@pytest.mark.parametrize("action", ["", "north east", "red", "door-north", "floor"])
def test_invalid_action_is_penalised(action):
    env = env_for(TowerConfig(invalid_penalty=0.1))
    result, _ = env.step(action)
    assert result == "invalid" and env.floor == 0 and env.invalid == 1
    for _ in range(env.cfg.n_floors):
        env.step(env.correct_action())
    assert env.success and env.reward == pytest.approx(0.9)


def test_action_whitespace_is_normalised():
    env = env_for()
    assert env.step(f"  {env.correct_action()} ")[0] == "open"


def test_deterministic_and_splits_disjoint():
    cfg = TowerConfig()
    assert make_instance(cfg, "train", 7) == make_instance(cfg, "train", 7)
    assert make_instance(cfg, "train", 7, seed=1) != make_instance(cfg, "train", 7)
    train = {content_id(i.family, i.colors) for i in (make_instance(cfg, "train", k) for k in range(300))}
    held = {content_id(i.family, i.colors) for i in (make_instance(cfg, "eval", k) for k in range(100))}
    assert train and held and not train & held


def test_rules_are_fixed_per_family():
    rules = TowerConfig().rules()
    assert set(rules) == set(FAMILIES) and set(rules.values()) == set(ACTIONS)
    assert rules == TowerConfig().rules() and rules != TowerConfig(world_seed=1).rules()


@pytest.mark.parametrize("noise", [0.0, 0.3, 1.0])
def test_skill_noise_fraction(noise):
    cfg = TowerConfig(skill_noise=noise)
    rules = cfg.rules()
    insts = [make_instance(cfg, "train", k) for k in range(400)]
    wrong = [i for i in insts if not i.skill_correct]
    assert abs(len(wrong) / len(insts) - noise) < 0.07
    for i in insts:  # a correct skill names the family's door; a wrong one names another door or family
        right = i.skill == f"skill {i.family} : door-{rules[i.family]} ."
        assert right == i.skill_correct


@pytest.mark.parametrize("kw", [dict(n_floors=0), dict(max_turns=2), dict(skill_noise=1.5),
                                dict(invalid_penalty=-1.0), dict(eval_every_kth=1)])
def test_config_errors_name_the_argument(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        TowerConfig(**kw)


def test_make_instance_errors():
    with pytest.raises(ValueError, match="split"):
        make_instance(TowerConfig(), "test", 0)
    with pytest.raises(ValueError, match="index"):
        make_instance(TowerConfig(), "train", -1)


def test_tiny_tokenizer_covers_every_text():
    codec = Codec(build_tiny_tokenizer())
    unk = codec.tokenizer.unk_token_id
    cfg = TowerConfig(skill_noise=0.5)
    for k in range(50):
        inst = make_instance(cfg, "train", k)
        env = TowerEnv(cfg, inst)
        texts = [inst.task_text, inst.skill, env.observation()]
        env.step("bogus")
        env.step(env.correct_action())
        from sdar.samples import released_prompt
        texts.append(released_prompt(inst.task_text, env.turns, env.observation(), 2))
        for t in texts:
            ids = codec.encode(t)
            assert unk not in ids, t
            assert codec.decode(ids) == " ".join(t.split())
    assert len(vocabulary()) == len(set(vocabulary()))
