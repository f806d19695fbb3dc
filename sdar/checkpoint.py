"""Trainer checkpoints that load without running code.

A checkpoint directory holds the policy as ``save_pretrained`` writes it (safetensors weights, JSON
config and tokenizer) and ``trainer_state.pt``: the step, the TrainConfig, the optimizer state and every
RNG state, as plain containers of tensors, numbers, strings and tuples. It is read with
``torch.load(weights_only=True)``, whose unpickler only rebuilds those types: a file that asks for
anything else (a pickled object whose reconstruction would call arbitrary code) is refused with a
``ValueError`` before any of it runs. ``weights_only=False`` is never used.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
FORMAT_VERSION = 3   # 3: a rollout generator (and torch RNG states) per data-parallel rank, and world_size


def save_state(path, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, tuples, dicts, None) to ``path``."""
    torch.save({"format": FORMAT_VERSION, **state}, Path(path))


def load_state(path) -> dict:
    """Read a state written by :func:`save_state`; ValueError for anything that is not plain data."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint {path} refused: it is not plain tensor/number data that torch.load(weights_only=True) "
            f"can read without running code ({first}); only load checkpoints written by this trainer") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"checkpoint {path}: trainer state format {found!r}, expected {FORMAT_VERSION} "
                         f"(written by another version of sdar)")
    return state


def python_rng_state(rng) -> list:
    """``random.Random.getstate()`` as plain lists (JSON-able, weights_only-loadable)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(rng, state) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))
