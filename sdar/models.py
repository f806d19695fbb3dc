"""Policy model and tokenizer: any local Hugging Face causal LM, or the embedded tiny default.

The tiny default is a 2-layer Qwen3-style model (hidden 64, ~80k parameters) and a word-level tokenizer
over the task's vocabulary, both built in code. A random-init model cannot read its context, so the
default comes with a short supervised *warm-up* (the role the instruct checkpoint plays in the paper):

- without a skill in the context, the target is a uniformly random door: the warm-up teaches the action
  format (one door word, then end-of-sequence) but *not* the task's rules, so RL starts near chance;
- with a privileged skill prefix, the target is the door that skill names (skills with random families
  and doors, so the model learns to read the skill rather than memorise the rules). This is what makes the same
  model a useful, and fallible, teacher when it is handed a retrieved skill.

The warm-up is deterministic (seeded data, seeded init) and cached under ``cache_dir/tiny-<hash>``, the
hash covering every setting it depends on; it is built once, written atomically, and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .samples import SKILL_TEMPLATE, left_pad

WARMUP_VERSION = 2
SPECIALS = ("<pad>", "<eos>", "<unk>")


class Codec:
    """The few tokenizer operations the loop needs, over any Hugging Face tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos_token_id; the loop needs one to end actions")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.size = len(tokenizer)      # ids at or above this (padded vocabulary rows) decode to nothing

    def encode(self, text: str) -> list:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def skill_prefix(self, skill: str) -> list:
        return self.encode(SKILL_TEMPLATE.format(skill=skill))


def build_tiny_tokenizer(words=None):
    """A word-level tokenizer over ``words`` (a task's ``vocabulary()``; None: the embedded towers task's)
    and the special tokens."""
    if words is None:
        from .towers import Towers
        words = Towers().vocabulary()
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(dict.fromkeys(list(SPECIALS) + list(words))))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


@dataclass(frozen=True)
class TinyConfig:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab_size: int = 0        # 0: the tokenizer's size rounded up to 64; larger pads the vocabulary
    warmup_steps: int = 300
    warmup_batch: int = 32
    warmup_lr: float = 3e-3
    seed: int = 0


def tiny_model(cfg: TinyConfig, tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    n = len(tokenizer)
    vocab = cfg.vocab_size or (n + 63) // 64 * 64
    if vocab < n:
        raise ValueError(f"vocab_size must be >= the tokenizer size {n}, got {vocab}")
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.hidden // cfg.heads, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return Qwen3ForCausalLM(config)


# ----------------------------------------------------------------------------------------- warm-up data
def warmup_example(rng: random.Random, codec: Codec, task, history: int):
    """One supervised example (ids, loss_mask, kind) from ``task.warmup_example``, in the released or
    the concatenated layout (half each), with the skill as a privileged prefix when it has one."""
    ex = task.warmup_example(rng)
    prefix = codec.skill_prefix(ex.skill) if ex.skill is not None else []
    if rng.random() < 0.5:
        prompt = codec.encode(task.prompt(ex.instance, ex.env, history))
    else:   # replay the partial episode as the concatenated layout writes it
        replay, prompt = task.env(ex.instance), []
        for t in ex.env.turns:
            prompt += codec.encode(task.segment(ex.instance, replay)) + codec.encode(t.action) + [codec.eos_id]
            replay.step(t.action)
        prompt += codec.encode(task.segment(ex.instance, replay))
    resp = codec.encode(ex.target) + [codec.eos_id]
    ids = prefix + prompt + resp
    return ids, [0] * (len(prefix) + len(prompt)) + [1] * len(resp), ex.meta.get("kind", "example")


def warmup_batch(rng, codec, task, n, history):
    seqs, masks, kinds = zip(*(warmup_example(rng, codec, task, history) for _ in range(n)))
    ids, attn, pos, lm = left_pad(list(seqs), codec.pad_id, list(masks))
    return ids, attn, pos, lm, list(kinds)


def warmup(model, codec: Codec, cfg: TinyConfig, task, history: int, log=None) -> dict:
    """Supervised warm-up (deterministic under ``cfg.seed``). Returns :func:`warmup_eval`'s report."""
    rng = random.Random(f"warmup:{cfg.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    model.train()
    for step in range(cfg.warmup_steps):
        ids, attn, pos, lm, _ = warmup_batch(rng, codec, task, cfg.warmup_batch, history)
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, :-1]
        sel = lm[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[sel].float(), ids[:, 1:][sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr_scale = min(1.0, (step + 1) / 20) * (1.0 - step / max(cfg.warmup_steps, 1)) + 0.05
        for g in opt.param_groups:
            g["lr"] = cfg.warmup_lr * lr_scale
        opt.step()
        if log is not None and (step % 100 == 0 or step == cfg.warmup_steps - 1):
            log(f"warm-up step {step}: loss {loss.item():.3f}")
    return warmup_eval(model, codec, task, history)


@torch.no_grad()
def warmup_eval(model, codec, task, history, n=512) -> dict:
    """Per kind of warm-up example: how often the argmax first response token is the target's
    (``acc_<kind>``: ~1 where the target is what a skill names, chance where it is random) and the
    entropy of the first response token in nats (``entropy_<kind>``)."""
    model.eval()
    rng = random.Random("warmup-eval")
    ids, attn, pos, lm, kinds = warmup_batch(rng, codec, task, n, history)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, :-1].float()
    sel = lm[:, 1:]
    first = sel & (sel.cumsum(-1) == 1)            # the first response token of every example
    lg, target = logits[first], ids[:, 1:][first]
    logp = lg.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    hit = (lg.argmax(-1) == target).float()
    model.train()
    out = {}
    for kind in sorted(set(kinds)):
        m = torch.tensor([k == kind for k in kinds])
        out[f"acc_{kind}"] = float(hit[m].mean())
        out[f"entropy_{kind}"] = float(entropy[m].mean())
    return out


# ----------------------------------------------------------------------------------------- loading
def default_cache_dir() -> Path:
    return Path(os.environ.get("SDAR_CACHE", Path.home() / ".cache" / "sdar"))


def warmup_key(task) -> dict:
    """What of the task the warm-up depends on: ``task.warmup_key()`` when it has one (the towers task
    leaves out its skill-noise settings, which the warm-up never reads), else the task's class name."""
    key = task.warmup_key() if callable(getattr(task, "warmup_key", None)) else {}
    return {"task": type(task).__name__, **key}


def tiny_key(cfg: TinyConfig, task, history: int) -> str:
    blob = json.dumps({"v": WARMUP_VERSION, "tiny": asdict(cfg), "task": warmup_key(task), "history": history,
                       "vocab": task.vocabulary(), "template": SKILL_TEMPLATE}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def ensure_tiny(cfg: TinyConfig, task, history: int, cache_dir=None, log=None) -> Path:
    """Path of the warmed-up tiny checkpoint for ``task``, building and caching it if needed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"tiny-{tiny_key(cfg, task, history)}"
    if (path / "warmup.json").exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    quiet_transformers()
    tokenizer = build_tiny_tokenizer(task.vocabulary())
    codec = Codec(tokenizer)
    model = tiny_model(cfg, tokenizer)
    if log:
        log(f"building the tiny warm-up model ({cfg.warmup_steps} steps) in {path}")
    stats = warmup(model, codec, cfg, task, history, log=log) if cfg.warmup_steps else {}
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "warmup.json").write_text(json.dumps({"tiny": asdict(cfg), "task": warmup_key(task),
                                                 "history": history, **stats}, indent=1))
    try:
        os.replace(tmp, path)
    except OSError:          # another process built it first: keep theirs (identical by determinism)
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def attn_implementation(device) -> str:
    import importlib.util
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def quiet_transformers():
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_model(path, device="cpu"):
    """(model, codec) from a local Hugging Face checkpoint directory (weights kept in fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model must be a local checkpoint directory, got {str(path)!r}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=attn_implementation(device))
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("model: checkpoints with final logit soft-capping are not supported by this loop")
    return model.to(device), Codec(tokenizer)
