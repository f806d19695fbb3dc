"""Rollouts: batched sampling of short actions from a causal LM, driving many episodes of any task at once."""

from __future__ import annotations

import contextlib
import inspect

import torch

from .samples import LAYOUTS, left_pad


def autocast_for(device):
    """bf16 autocast on CUDA, nothing on CPU (the tiny model trains in fp32 there)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _cache_api(model):
    """(name of the KV-cache argument / output field, extra kwargs): transformers 5 renamed
    ``past_key_values`` to ``cache``; ``logits_to_keep=1`` skips the prompt's logits where supported."""
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return ("cache" if "cache" in params else "past_key_values"), extra


@torch.no_grad()
def sample_tokens(model, contexts, codec, *, max_new_tokens: int, temperature: float = 1.0,
                  generator: torch.Generator | None = None, greedy: bool = False, device="cpu"):
    """Sample up to ``max_new_tokens`` tokens after each context (KV-cached, left-padded batch).

    A row stops after its end-of-sequence token; the returned lists include that token when it was
    sampled. Sampling draws from ``softmax(logits / temperature)`` over the full vocabulary, the same
    distribution the loss scores, so rollouts are on-policy for the loss.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids, attn, pos, _ = left_pad(contexts, codec.pad_id)
    ids, attn, pos = ids.to(device), attn.to(device), pos.to(device)
    out_tokens = [[] for _ in contexts]
    finished = torch.zeros(len(contexts), dtype=torch.bool, device=device)
    cache_kw, extra = _cache_api(model)
    with autocast_for(device):
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **extra)
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if greedy:
            tok = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        for i, (v, done) in enumerate(zip(tok.tolist(), finished.tolist())):
            if not done:
                out_tokens[i].append(v)
        finished |= tok == codec.eos_id
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        with autocast_for(device):
            out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos,
                        use_cache=True, **{cache_kw: getattr(out, cache_kw)}, **extra)
    return out_tokens


def action_text(codec, response) -> str:
    """The action a response encodes: its text before end-of-sequence ("" if out of the vocabulary)."""
    toks = list(response)
    if codec.eos_id in toks:
        toks = toks[:toks.index(codec.eos_id)]
    else:
        return ""            # no end-of-sequence within the budget: an invalid (overlong) action
    if any(t >= codec.size for t in toks):
        return ""
    return codec.decode(toks)


def run_episodes(model, codec, task, instances, *, layout="released", history=2, max_new_tokens=3,
                 temperature=1.0, generator=None, greedy=False, with_skill=False, device="cpu"):
    """Play one episode of ``task`` per instance, all in lock-step batches. Returns (episodes, envs).

    ``episodes[i] = {"steps": [(prompt_ids, response_ids), ...], "skill_ids": [...]}`` in the layout's
    form (see samples.step_samples); ``envs[i]`` holds the outcome (``turns``, ``success``, ``reward``).
    ``with_skill`` puts the privileged prefix in the acting context (the teacher acting; evaluation only).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    envs = [task.env(inst) for inst in instances]
    episodes = [{"steps": [], "skill_ids": codec.skill_prefix(inst.skill)} for inst in instances]
    concat_ctx = [[] for _ in instances]
    while True:
        active = [i for i, e in enumerate(envs) if not e.done]
        if not active:
            break
        prompts, contexts = [], []
        for i in active:
            if layout == "released":
                p = codec.encode(task.prompt(instances[i], envs[i], history))
                ctx = p
            else:
                p = codec.encode(task.segment(instances[i], envs[i]))
                ctx = concat_ctx[i] + p
            prompts.append(p)
            contexts.append(episodes[i]["skill_ids"] + ctx if with_skill else ctx)
        responses = sample_tokens(model, contexts, codec, max_new_tokens=max_new_tokens,
                                  temperature=temperature, generator=generator, greedy=greedy, device=device)
        for i, p, r in zip(active, prompts, responses):
            envs[i].step(action_text(codec, r))
            episodes[i]["steps"].append((p, r))
            if layout == "concat":
                concat_ctx[i] += p + r
    return episodes, envs
