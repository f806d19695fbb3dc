"""A tiny GRPO setup for TRL parity tests: a 1-layer Qwen3 and a word-level tokenizer built in code, a
4-prompt dataset with privileged text, a reward that depends on the completion."""

from __future__ import annotations

import torch

from sdar.models import TinyConfig, build_tiny_tokenizer, tiny_model

PROMPTS = ["task tower red : north ?", "task lamp blue : south ?", "task oak gold : east ?",
           "task elm green : west ?"]
PRIVILEGED = ["skill red door-north", "skill blue door-south", "skill gold door-east", "skill green door-west"]


def tokenizer():
    # the towers task's words and the prompts' own: a vocabulary of ~60 words, so that most logits of the
    # tiny model get gradient (the Adam comparison's tolerance assumes it)
    from sdar.towers import Towers
    return build_tiny_tokenizer(Towers().vocabulary() + " ".join(PROMPTS + PRIVILEGED).split())


def model(tok):
    return tiny_model(TinyConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, seed=0), tok)


def saved_model(directory):
    """The tiny model saved to ``directory`` (TRL builds its reference model from the policy's path when
    beta > 0): returns the path to pass as ``model``."""
    tok = tokenizer()
    model(tok).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def dataset(n=8):
    from datasets import Dataset
    return Dataset.from_dict({"prompt": [PROMPTS[i % 4] for i in range(n)],
                              "privileged": [PRIVILEGED[i % 4] for i in range(n)]})


def reward(completions, **kwargs):
    """Distinct rewards within a group (so advantages are non-zero)."""
    return [float(c.count("door-north")) + 0.1 * len(c.split()) + 0.05 * c.count("red") for c in completions]


def config(out_dir, **overrides):
    from trl import GRPOConfig
    base = dict(output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                max_steps=3, learning_rate=1e-2, logging_steps=1, report_to="none", seed=7, use_cpu=True,
                save_strategy="no", bf16=False, disable_tqdm=True)
    return GRPOConfig(**{**base, **overrides})


def max_param_delta(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def params_moved(trainer):
    return max_param_delta(trainer.model, model(tokenizer())) > 0


def quiet():
    import warnings

    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(max(1, torch.get_num_threads()))
