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

from .env import ACTIONS, COLORS, FAMILIES, TowerConfig, TowerEnv, TowerInstance, skill_text, vocabulary
from .samples import SKILL_TEMPLATE, concat_segment, left_pad, released_prompt

WARMUP_VERSION = 1
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


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(SPECIALS) + vocabulary())}
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
def warmup_example(rng: random.Random, codec: Codec, env_cfg: TowerConfig, history: int):
    """One supervised example (ids, loss_mask); see the module docstring for the two kinds."""
    family = rng.choice(FAMILIES)
    inst = TowerInstance("train", -1, family, tuple(rng.choice(COLORS) for _ in range(env_cfg.n_floors)),
                         "", True)
    env = TowerEnv(env_cfg, inst)
    for _ in range(rng.randrange(env_cfg.max_turns)):   # a random partial trajectory of valid doors
        if env.done or env.floor == env_cfg.n_floors - 1 and rng.random() < 0.5:
            break
        env.step(rng.choice(ACTIONS))
    if env.done:
        env = TowerEnv(env_cfg, inst)
    with_skill = rng.random() < 0.5
    if with_skill:
        target = rng.choice(ACTIONS)
        prefix = codec.skill_prefix(skill_text(rng.choice(FAMILIES), target))
    else:
        target, prefix = rng.choice(ACTIONS), []
    if rng.random() < 0.5:
        prompt = codec.encode(released_prompt(inst.task_text, env.turns, env.observation(), history))
    else:
        prompt, prev = [], None
        for t in env.turns:
            prompt += codec.encode(concat_segment(inst.task_text, prev, t.observation)) + codec.encode(t.action)
            prompt.append(codec.eos_id)
            prev = t.result
        prompt += codec.encode(concat_segment(inst.task_text, prev, env.observation()))
    resp = codec.encode(target) + [codec.eos_id]
    ids = prefix + prompt + resp
    return ids, [0] * (len(prefix) + len(prompt)) + [1] * len(resp), with_skill


def warmup_batch(rng, codec, env_cfg, n, history):
    seqs, masks, skills = zip(*(warmup_example(rng, codec, env_cfg, history) for _ in range(n)))
    ids, attn, pos, lm = left_pad(list(seqs), codec.pad_id, list(masks))
    return ids, attn, pos, lm, torch.tensor(skills)


def warmup(model, codec: Codec, cfg: TinyConfig, env_cfg: TowerConfig, history: int, log=None) -> dict:
    """Supervised warm-up (deterministic under ``cfg.seed``). Returns skill-reading accuracy etc."""
    rng = random.Random(f"warmup:{cfg.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    model.train()
    for step in range(cfg.warmup_steps):
        ids, attn, pos, lm, _ = warmup_batch(rng, codec, env_cfg, cfg.warmup_batch, history)
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
        if log is not None and (step % 50 == 0 or step == cfg.warmup_steps - 1):
            log(f"warm-up step {step}: loss {loss.item():.3f}")
    return warmup_eval(model, codec, env_cfg, history)


@torch.no_grad()
def warmup_eval(model, codec, env_cfg, history, n=256) -> dict:
    """Skill-reading accuracy (argmax door = the skill's door) and the no-skill door entropy."""
    model.eval()
    rng = random.Random("warmup-eval")
    ids, attn, pos, lm, skills = warmup_batch(rng, codec, env_cfg, n, history)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, :-1].float()
    sel = lm[:, 1:]
    first = sel & (sel.cumsum(-1) == 1)            # the door token of every example
    lg, target = logits[first], ids[:, 1:][first]
    door_ids = torch.tensor([codec.encode(a)[0] for a in ACTIONS])
    p = lg.softmax(-1)
    p_door = p[:, door_ids]
    ent = -(p_door / p_door.sum(-1, keepdim=True)).clamp_min(1e-12).log().mul(
        p_door / p_door.sum(-1, keepdim=True)).sum(-1)
    model.train()
    return {
        "skill_read_acc": float((lg.argmax(-1) == target)[skills].float().mean()),
        "no_skill_door_entropy": float(ent[~skills].mean()),
        "door_mass": float(p_door.sum(-1).mean()),
    }


# ----------------------------------------------------------------------------------------- loading
def default_cache_dir() -> Path:
    return Path(os.environ.get("SDAR_CACHE", Path.home() / ".cache" / "sdar"))


def tiny_key(cfg: TinyConfig, env_cfg: TowerConfig, history: int) -> str:
    blob = json.dumps({"v": WARMUP_VERSION, "tiny": asdict(cfg), "env": asdict(env_cfg), "history": history,
                       "vocab": vocabulary(), "template": SKILL_TEMPLATE}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def ensure_tiny(cfg: TinyConfig, env_cfg: TowerConfig, history: int, cache_dir=None, log=None) -> Path:
    """Path of the warmed-up tiny checkpoint, building and caching it if needed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"tiny-{tiny_key(cfg, env_cfg, history)}"
    if (path / "warmup.json").exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    quiet_transformers()
    tokenizer = build_tiny_tokenizer()
    codec = Codec(tokenizer)
    model = tiny_model(cfg, tokenizer)
    if log:
        log(f"building the tiny warm-up model ({cfg.warmup_steps} steps) in {path}")
    stats = warmup(model, codec, cfg, env_cfg, history, log=log)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "warmup.json").write_text(json.dumps({"tiny": asdict(cfg), "env": asdict(env_cfg),
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
