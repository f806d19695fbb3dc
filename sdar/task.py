"""The task protocol: what the rollout, the trainer and the warm-up need from an environment.

The loop never names a particular task. A task is an object with five methods (``typing.Protocol``, so
any class with these methods qualifies; nothing to inherit):

- ``instance(split, index)`` -> :class:`Instance`: the *instance sampler*, a pure function of
  ``(split, index)``; ``split`` is ``"train"`` or ``"eval"`` and the two splits should differ in what
  the policy has to generalise over (the towers task holds out whole rules);
- ``env(instance)`` -> an :class:`Env`: one episode (observation, step, done / success / reward);
- ``prompt(instance, env, history)`` -> str: the *prompt builder* of the released layout (one sample
  per environment step: task text, the last ``history`` turns, the current observation);
- ``segment(instance, env)`` -> str: the observation segment appended for the next turn in the
  concatenated layout (the whole trajectory as one sequence);
- ``vocabulary()`` -> list of words: every word the task's texts can contain (the embedded tiny
  model builds its word-level tokenizer from it; a task used with a real checkpoint may return []).

The *skill provider* is the instance's ``skill`` text (retrieved, possibly wrong or irrelevant), the
teacher's privileged context; ``skill_kind`` says which, so the trainer can report the gate per kind.
The embedded tiny model's supervised warm-up also needs ``warmup_example(rng)`` (see
:class:`WarmupExample`); a task trained from a real checkpoint does not.

Rewards follow verl-agent: the environment's episode reward (``env.reward``, read once the episode is
done) is given to every step of the episode, and an invalid action (``Turn.valid`` False) costs the
trainer's ``invalid_penalty`` on that step's row (or on the episode, see ``TrainConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

SPLITS = ("train", "eval")
SKILL_KINDS = ("correct", "wrong", "irrelevant")


@dataclass(frozen=True)
class Instance:
    split: str
    index: int
    task_text: str            # the task statement every prompt starts with
    skill: str                # the retrieved skill text (teacher only; never shown to the student)
    skill_kind: str           # "correct" | "wrong" | "irrelevant"
    data: Any = None          # task-specific (the towers task keeps its rule here)

    def __post_init__(self):
        if self.skill_kind not in SKILL_KINDS:
            raise ValueError(f"skill_kind must be one of {SKILL_KINDS}, got {self.skill_kind!r}")


@dataclass
class Turn:
    observation: str
    action: str               # the action text as parsed from the response ("" when none)
    feedback: str             # what the environment answered, e.g. "open" / "locked" / "invalid"
    valid: bool               # False: not a well-formed action (invalid-action penalty)
    correct: bool             # the action was the right one (False for invalid actions)


@runtime_checkable
class Env(Protocol):
    done: bool
    success: bool
    turns: list

    def observation(self) -> str: ...

    def step(self, action: str) -> Turn: ...

    @property
    def reward(self) -> float: ...


@runtime_checkable
class Task(Protocol):
    def instance(self, split: str, index: int) -> Instance: ...

    def env(self, instance: Instance) -> Env: ...

    def prompt(self, instance: Instance, env: Env, history: int) -> str: ...

    def segment(self, instance: Instance, env: Env) -> str: ...

    def vocabulary(self) -> list: ...


@dataclass
class WarmupExample:
    """One supervised warm-up example: a partly played episode and the response to teach.

    ``skill`` None: the model sees no skill; ``target`` is then a uniformly random action, which
    teaches the format but not the rules. With a skill, ``target`` is what the skill says to do (a
    random action when the skill text says nothing usable, so the model learns to ignore such text).
    """

    instance: Instance
    env: Any
    skill: str | None
    target: str
    meta: dict = field(default_factory=dict)   # e.g. {"kind": "skill-door"} for the warm-up's report


def check_task(task) -> None:
    """ValueError naming what is missing when ``task`` does not implement the protocol."""
    missing = [m for m in ("instance", "env", "prompt", "segment", "vocabulary")
               if not callable(getattr(task, m, None))]
    if missing:
        raise ValueError(f"task: {type(task).__name__} lacks the task protocol's {missing} (see sdar.task)")
