"""The embedded multi-turn task: "towers", a text game whose held-out split holds out whole rules.

A tower shows ``features`` features (lamp colour, wall material, roof shape), each with one of ``values``
values, and a *rule sign* naming the feature that decides: "task rule wall lamp red wall clay ." Every
feature value has a door (north / south / east / west), drawn once per world (``world_seed``) so that
each door belongs to about as many values as the others. The tower's door is the door of the value of
the feature its sign names (here: clay's door), the same on every floor. The instance's *rule* is the
pair (its feature values, its sign): with the defaults 6 x 6 value pairs x 2 signs = 72 rules.

Each turn the agent sees the prompt and answers with one word:

- the tower's door: "open", one floor up; the top floor ends the episode with success;
- another door: "locked", the turn is spent;
- anything else: "invalid", the turn is spent (the trainer charges the invalid-action penalty).

At most ``max_turns`` turns (default ``floors + 1``: one wrong door is affordable). The environment's
reward is 1 for success, 0 otherwise, read at the end of the episode.

Train and eval are disjoint in the *rules*: a rule belongs to eval when (sum of its value indices + its
sign index) % ``holdout`` == 0 (a quarter of the rules by default). Every single (feature, value) ->
door association still occurs in training, under other combinations, so a policy that learned to read
the sign and look the value up generalises to the held-out rules, and one that memorised whole
mappings does not. Within an episode the history shows which door opened, so floors after the first
are easy once the agent repeats it; the first floor is where the rule matters.

Each instance has a retrieved *skill*, the teacher's privileged context: "skill wall clay : door-east ."
With probability ``skill_noise`` the retrieval is bad, of kind ``noise_kind``:
``"wrong"`` names the right value with a wrong door; ``"irrelevant"`` is a tip that names no door
("skill tip : gold reed ."), text the model should ignore (its warm-up teaches it to act as it would
without a skill); ``"mixed"`` is half of each.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

from .task import Instance, Turn, WarmupExample

DOORS = ("north", "south", "east", "west")
FEATURE_VALUES = {
    "lamp": ("red", "blue", "green", "gold", "grey", "pink", "teal", "plum"),
    "wall": ("stone", "wood", "iron", "glass", "clay", "reed", "bone", "jade"),
    "roof": ("flat", "dome", "spire", "gable", "arch", "tent", "step", "cone"),
}
FEATURES = tuple(FEATURE_VALUES)
NOISE_KINDS = ("mixed", "wrong", "irrelevant")
MAX_FLOORS = 9
TOWERS_VERSION = 4     # bump when the texts change: the cached warm-up depends on them


@dataclass(frozen=True)
class Rule:
    values: tuple        # value index of each feature
    sign: int            # index of the deciding feature

    def key(self) -> tuple:
        """(feature, value word) that decides the door."""
        f = FEATURES[self.sign]
        return f, FEATURE_VALUES[f][self.values[self.sign]]


@dataclass(frozen=True)
class TowersConfig:
    floors: int = 2
    max_turns: int | None = None   # None: floors + 1
    features: int = 2              # how many of lamp / wall / roof a tower shows
    values: int = 6                # values per feature (at most 8)
    skill_noise: float = 0.25      # fraction of instances whose retrieved skill is bad
    noise_kind: str = "mixed"      # "wrong" | "irrelevant" | "mixed" (half each)
    holdout: int = 4               # one rule in `holdout` is held out for eval
    world_seed: int = 0            # fixes every value's door
    signs: bool = True             # False: the first feature always decides (no rule sign)

    def __post_init__(self):
        if not 1 <= self.floors <= MAX_FLOORS:
            raise ValueError(f"floors must be in [1, {MAX_FLOORS}], got {self.floors}")
        if self.max_turns is not None and not self.floors <= self.max_turns <= MAX_FLOORS:
            raise ValueError(f"max_turns must be in [floors, {MAX_FLOORS}], got {self.max_turns}")
        if not 2 <= self.features <= len(FEATURES):
            raise ValueError(f"features must be in [2, {len(FEATURES)}], got {self.features}")
        if not 2 <= self.values <= len(FEATURE_VALUES["lamp"]):
            raise ValueError(f"values must be in [2, {len(FEATURE_VALUES['lamp'])}], got {self.values}")
        if not 0.0 <= self.skill_noise <= 1.0:
            raise ValueError(f"skill_noise must be in [0, 1], got {self.skill_noise}")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {self.noise_kind!r}")
        if self.holdout < 2:
            raise ValueError(f"holdout must be >= 2, got {self.holdout}")

    @property
    def turn_limit(self) -> int:
        return self.max_turns if self.max_turns is not None else self.floors + 1


def skill_text(feature: str, value: str, door: str) -> str:
    return f"skill {feature} {value} : door-{door} ."


class Towers:
    """The towers task (implements :class:`sdar.task.Task`)."""

    def __init__(self, cfg: TowersConfig | None = None):
        self.cfg = cfg or TowersConfig()
        rng = random.Random(f"towers-world:{self.cfg.world_seed}")
        self.doors = {}                          # (feature, value word) -> door
        n = self.cfg.values
        for k, f in enumerate(FEATURES[:self.cfg.features]):
            # the doors in turn, continuing where the last feature stopped: within a feature and over all
            # features every door is as frequent as the others (to within one)
            pool = [DOORS[(k * n + i) % len(DOORS)] for i in range(n)]
            rng.shuffle(pool)
            self.doors.update({(f, v): d for v, d in zip(FEATURE_VALUES[f], pool)})

    # ------------------------------------------------------------------------------- rules
    def rules(self, split: str | None = None) -> list:
        """Every rule (of ``split``, when given), in a fixed order."""
        c = self.cfg
        out = [Rule(vals, s) for vals in itertools.product(range(c.values), repeat=c.features)
               for s in range(c.features if c.signs else 1)]
        return out if split is None else [r for r in out if self.split_of(r) == split]

    def random_rule(self, rng: random.Random) -> Rule:
        c = self.cfg
        return Rule(tuple(rng.randrange(c.values) for _ in range(c.features)),
                    rng.randrange(c.features) if c.signs else 0)

    def split_of(self, rule: Rule) -> str:
        return "eval" if (sum(rule.values) + rule.sign) % self.cfg.holdout == 0 else "train"

    def door(self, rule: Rule) -> str:
        return self.doors[rule.key()]

    def describe(self, rule: Rule) -> str:
        """e.g. "rule wall lamp red wall clay": the sign first, so that (in a causal model) every value
        token can already see which feature decides."""
        parts = [f"{f} {FEATURE_VALUES[f][v]}" for f, v in zip(FEATURES, rule.values)]
        return (f"rule {FEATURES[rule.sign]} " if self.cfg.signs else "") + " ".join(parts)

    # ------------------------------------------------------------------------------- protocol
    def instance(self, split: str, index: int) -> Instance:
        """Instance ``index`` of ``split``: a rule of that split and a retrieved skill, deterministic."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        c = self.cfg
        rng = random.Random(f"towers:{c.world_seed}:{split}:{index}")
        while True:   # rejection sampling keeps the splits' rules disjoint
            rule = self.random_rule(rng)
            if self.split_of(rule) == split:
                break
        feature, value = rule.key()
        door = self.door(rule)
        if rng.random() >= c.skill_noise:
            kind, skill = "correct", skill_text(feature, value, door)
        else:
            kind = c.noise_kind if c.noise_kind != "mixed" else ("wrong" if rng.random() < 0.5 else "irrelevant")
            if kind == "wrong":
                skill = skill_text(feature, value, rng.choice([d for d in DOORS if d != door]))
            else:
                skill = self.irrelevant_skill(rng)
        return Instance(split, index, f"task {self.describe(rule)} .", skill, kind, rule)

    def irrelevant_skill(self, rng: random.Random) -> str:
        words = [v for f in FEATURES[:self.cfg.features] for v in FEATURE_VALUES[f][:self.cfg.values]]
        return f"skill tip : {rng.choice(words)} {rng.choice(words)} ."

    def env(self, instance: Instance) -> "TowersEnv":
        return TowersEnv(self.cfg, self.door(instance.data))

    def prompt(self, instance: Instance, env: "TowersEnv", history: int) -> str:
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history}")
        recent = env.turns[-history:] if history else []
        return " ".join([instance.task_text] + [turn_text(t) for t in recent] + [f"now {env.observation()}"])

    def segment(self, instance: Instance, env: "TowersEnv") -> str:
        head = instance.task_text if not env.turns else env.turns[-1].feedback
        return f"{head} now {env.observation()}"

    def vocabulary(self) -> list:
        words = "task . ; : ? floor now open locked invalid skill privileged end rule tip".split()
        words += list(FEATURES) + [v for f in FEATURES for v in FEATURE_VALUES[f]]
        words += list(DOORS) + [f"door-{d}" for d in DOORS] + [str(i) for i in range(1, MAX_FLOORS + 1)]
        return list(dict.fromkeys(words))

    # ------------------------------------------------------------------------------- warm-up
    def warmup_key(self) -> dict:
        """The settings the warm-up depends on (not the skill noise: warm-up skills are drawn apart)."""
        c = self.cfg
        return {"version": TOWERS_VERSION, "floors": c.floors, "max_turns": c.turn_limit,
                "features": c.features, "values": c.values, "world_seed": c.world_seed, "signs": c.signs}

    def warmup_example(self, rng: random.Random) -> WarmupExample:
        """A random rule, a partial trajectory that reaches a uniformly random floor (right doors to
        climb, a few wrong ones on the way), and one of: no skill (target: a uniformly random door), a
        door skill for the tower's deciding value naming a random door (target: that door), an
        irrelevant tip (target: a uniformly random door). The targets never follow the rules, so the
        warm-up teaches the format and skill reading, not the world."""
        c = self.cfg
        rule = self.random_rule(rng)
        inst = Instance("train", -1, f"task {self.describe(rule)} .", "", "correct", rule)
        env = self.env(inst)
        floor = rng.randrange(c.floors)
        wrong = rng.randrange(c.turn_limit - floor)       # wrong doors spent on the way; one turn is left
        steps = ["right"] * floor + ["wrong"] * wrong
        rng.shuffle(steps)
        door = env.door
        for kind in steps:
            env.step(door if kind == "right" else rng.choice([d for d in DOORS if d != door]))
        u = rng.random()
        if u < 0.4:
            return WarmupExample(inst, env, None, rng.choice(DOORS), {"kind": "none"})
        if u < 0.8:
            target = rng.choice(DOORS)
            return WarmupExample(inst, env, skill_text(*rule.key(), target), target, {"kind": "door"})
        return WarmupExample(inst, env, self.irrelevant_skill(rng), rng.choice(DOORS), {"kind": "irrelevant"})


def turn_text(turn: Turn) -> str:
    """A past turn as the history shows it, e.g. "floor 1 north locked ;"."""
    action = turn.action if turn.valid else "?"
    return f"{turn.observation} {action} {turn.feedback} ;"


@dataclass
class TowersEnv:
    """One episode. ``observation()`` -> text; ``step(action_text)`` -> :class:`Turn`."""

    cfg: TowersConfig
    door: str
    floor: int = 0
    turns: list = field(default_factory=list)
    done: bool = False
    success: bool = False

    def observation(self) -> str:
        return f"floor {self.floor + 1}"

    def step(self, action: str) -> Turn:
        if self.done:
            raise ValueError("step called on a finished episode")
        action = " ".join(action.split())
        valid = action in DOORS
        correct = valid and action == self.door
        turn = Turn(self.observation(), action, "open" if correct else "locked" if valid else "invalid",
                    valid, correct)
        if correct:
            self.floor += 1
        self.turns.append(turn)
        if self.floor == self.cfg.floors:
            self.done = self.success = True
        elif len(self.turns) >= self.cfg.turn_limit:
            self.done = True
        return turn

    @property
    def reward(self) -> float:
        """1 for success, read at the end of the episode (0 before)."""
        return float(self.success) if self.done else 0.0
