"""The embedded multi-turn task: "towers", a text game with imperfectly retrieved skills.

An instance is a tower of ``n_floors`` floors of one of four *families* (ash, oak, elm, fir). On every floor
exactly one of four doors (north, south, east, west) opens: the family's door, a fixed rule drawn once
from ``world_seed`` (a permutation: one door per family). Each floor also shows a lamp colour, which is a
distractor: it varies between instances and never matters. Each turn the agent sees an observation
("floor 2 lamp gold tower ash") and answers with one word:

- a correct door: "open", the agent climbs one floor; the top floor ends the episode with success;
- a wrong door: "locked", the agent stays (the turn is used up);
- anything else (not exactly one door word): "invalid", the agent stays and the episode reward loses
  ``invalid_penalty`` (verl-agent's invalid-action penalty, 0.1);
- after ``max_turns`` turns the episode ends, failed.

The reward is sparse: ``1{success} - invalid_penalty * #invalid`` at the end of the episode, 0 before.
A uniform random valid policy succeeds ~17% of the time (3 floors in 6 turns), so groups of 8 carry
signal from the first step; the rule is learnable from the task text alone, and within an episode the
history shows which door opened (a policy can reuse it on the next floor).

Each instance carries a retrieved *skill* text stating its family's rule; it is the teacher's privileged
context and is never shown to the student. With probability ``skill_noise`` the retrieval is wrong:
half of those skills are another family's skill (irrelevant retrieval), half name the right family with
a wrong door (wrong content). Instances are a pure function of (seed, split, index); the train and eval
splits partition the instance contents (family, lamp colours), so no held-out instance is trained on
(the rule itself is shared: evaluation measures the learned rule on unseen observation sequences).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

FAMILIES = ("ash", "oak", "elm", "fir")
COLORS = ("red", "blue", "green", "gold")
ACTIONS = ("north", "south", "east", "west")
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class TowerConfig:
    n_floors: int = 3
    max_turns: int = 6
    skill_noise: float = 0.25      # fraction of instances whose retrieved skill is wrong or irrelevant
    invalid_penalty: float = 0.1
    world_seed: int = 0           # fixes the per-family rules (the "world"), shared by every split
    eval_every_kth: int = 5       # contents with content_id % eval_every_kth == 0 belong to "eval"

    def __post_init__(self):
        if not (1 <= self.n_floors <= 9):
            raise ValueError(f"n_floors must be in [1, 9], got {self.n_floors}")
        if not (self.n_floors <= self.max_turns <= 9):
            raise ValueError(f"max_turns must be in [n_floors, 9], got {self.max_turns}")
        if not (0.0 <= self.skill_noise <= 1.0):
            raise ValueError(f"skill_noise must be in [0, 1], got {self.skill_noise}")
        if not (self.invalid_penalty >= 0.0):
            raise ValueError(f"invalid_penalty must be >= 0, got {self.invalid_penalty}")
        if self.eval_every_kth < 2:
            raise ValueError(f"eval_every_kth must be >= 2, got {self.eval_every_kth}")

    def rules(self) -> dict:
        """family -> its door (each door used by len(FAMILIES) / len(ACTIONS) families)."""
        rng = random.Random(f"towers-world:{self.world_seed}")
        doors = list(ACTIONS) * (len(FAMILIES) // len(ACTIONS))
        rng.shuffle(doors)
        return dict(zip(FAMILIES, doors))


def skill_text(family: str, door: str) -> str:
    """The skill as retrieved, e.g. "skill ash : door-north ." (the door as one word)."""
    return f"skill {family} : door-{door} ."


@dataclass(frozen=True)
class TowerInstance:
    split: str
    index: int
    family: str
    colors: tuple          # lamp colour of each floor
    skill: str             # the retrieved (possibly wrong) skill text
    skill_correct: bool

    @property
    def task_text(self) -> str:
        return f"task {self.family} ."


def content_id(family: str, colors) -> int:
    cid = FAMILIES.index(family)
    for c in colors:
        cid = cid * len(COLORS) + COLORS.index(c)
    return cid


def make_instance(cfg: TowerConfig, split: str, index: int, seed: int = 0) -> TowerInstance:
    """Instance ``index`` of ``split``: deterministic in (cfg, seed, split, index)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = random.Random(f"towers:{seed}:{split}:{index}")
    want_eval = split == "eval"
    while True:  # rejection sampling keeps the two splits' contents disjoint
        family = rng.choice(FAMILIES)
        colors = tuple(rng.choice(COLORS) for _ in range(cfg.n_floors))
        if (content_id(family, colors) % cfg.eval_every_kth == 0) == want_eval:
            break
    rules = cfg.rules()
    correct = rng.random() >= cfg.skill_noise
    if correct:
        skill = skill_text(family, rules[family])
    elif rng.random() < 0.5:  # irrelevant: another family's skill
        other = rng.choice([f for f in FAMILIES if f != family])
        skill = skill_text(other, rules[other])
    else:  # wrong: right family, another door
        skill = skill_text(family, rng.choice([d for d in ACTIONS if d != rules[family]]))
    return TowerInstance(split, index, family, colors, skill, correct)


@dataclass
class Turn:
    observation: str
    action: str = ""
    result: str = ""        # "open" | "locked" | "invalid"


@dataclass
class TowerEnv:
    """One episode. ``observation()`` -> text; ``step(action_text)`` -> (result, done)."""

    cfg: TowerConfig
    inst: TowerInstance
    floor: int = 0
    turns: list = field(default_factory=list)
    invalid: int = 0
    done: bool = False
    success: bool = False

    def __post_init__(self):
        self._rules = self.cfg.rules()

    def observation(self) -> str:
        return f"floor {self.floor + 1} lamp {self.inst.colors[self.floor]} tower {self.inst.family}"

    def correct_action(self) -> str:
        return self._rules[self.inst.family]

    def step(self, action_text: str):
        if self.done:
            raise ValueError("step called on a finished episode")
        turn = Turn(self.observation(), " ".join(action_text.split()))
        if turn.action not in ACTIONS:
            turn.result = "invalid"
            self.invalid += 1
        elif turn.action == self.correct_action():
            turn.result = "open"
            self.floor += 1
        else:
            turn.result = "locked"
        self.turns.append(turn)
        if self.floor == self.cfg.n_floors:
            self.done = self.success = True
        elif len(self.turns) >= self.cfg.max_turns:
            self.done = True
        return turn.result, self.done

    @property
    def reward(self) -> float:
        """Sparse episode reward (0 until the episode is done)."""
        if not self.done:
            return 0.0
        return float(self.success) - self.cfg.invalid_penalty * self.invalid


def turn_text(turn: Turn) -> str:
    """A past turn as the history shows it, e.g. "floor 1 lamp red north locked ;"."""
    action = turn.action if turn.action in ACTIONS else "?"
    return f"{turn.observation} {action} {turn.result} ;"


def vocabulary() -> list:
    """Every word the task's texts can contain (the embedded tokenizer's vocabulary)."""
    words = "task . ; : ? floor lamp tower now open locked invalid skill privileged end".split()
    words += list(FAMILIES) + list(COLORS) + list(ACTIONS) + [str(i) for i in range(1, 10)]
    words += [f"door-{d}" for d in ACTIONS]
    return list(dict.fromkeys(words))
