"""SDAR's privileged teacher in verl, end to end on CPU: ``python -m sdar.integrations.verl_recipe``.

The chain a verl trainer runs each step (the released SDAR code's order), with a tiny model built in code
standing in for the actor worker group:

  1. the student's rollout: prompts -> responses (verl's DataProto: left-padded prompts, right-padded
     responses);
  2. ``build_teacher_batch``: privileged text (the retrieved skill) + the prompt + the *student's* response;
  3. the actor's log-prob pass on those inputs (in a real trainer: ``actor_rollout_wg.compute_log_prob``;
     here ``actor_log_prob``, the same computation) -> teacher log-probs [B, R];
  4. ``attach_teacher_logprobs``: stored where verl's estimator distillation losses read them;
  5. the actor update: verl's own ``left_right_2_no_padding`` and ``distillation_ppo_loss`` with
     ``loss_mode="sdar"``, the student's statistics from ``token_logprobs``, one optimizer step.

It checks the loss against ``sdar_kernels.sdar_loss`` on the same tensors and writes a JSON summary.
The verl configuration it stands for: distillation.distillation_loss.loss_mode=sdar,
use_policy_gradient=False, distillation_loss_coef=0.01 (SDAR's lambda), loss_max_clamp=null.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from sdar.integrations.verl import attach_teacher_logprobs, build_teacher_batch
from sdar.models import TinyConfig, build_tiny_tokenizer, tiny_model
from sdar_kernels import sdar_loss, token_logprobs

PROMPTS = ["task tower red : north ?", "task lamp blue : south ?"]
SKILLS = ["skill red door-north", "skill blue door-south"]
GROUP = 4           # GRPO group size
LAMBDA = 0.01       # distill_coef


def rollout(model, tok, max_new_tokens=6, seed=0):
    """Sampled responses in verl's trainer layout (a DataProto)."""
    from verl import DataProto

    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS for _ in range(GROUP)]
    width = max(len(e) for e in enc)
    prompts = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in enc])
    prompt_mask = (torch.arange(width)[None] >= torch.tensor([width - len(e) for e in enc])[:, None]).long()
    torch.manual_seed(seed)
    out = model.generate(input_ids=prompts, attention_mask=prompt_mask, do_sample=True, max_new_tokens=max_new_tokens,
                         min_new_tokens=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    responses = out[:, width:]
    # right padding after the first eos (kept as the last scored token)
    after_eos = (responses == tok.eos_token_id).long().cumsum(-1) - (responses == tok.eos_token_id).long() > 0
    responses = responses.masked_fill(after_eos, tok.pad_token_id)
    response_mask = (~after_eos).long()
    attention = torch.cat([prompt_mask, response_mask], 1)
    return DataProto.from_dict(tensors={
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention, "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
        "response_mask": response_mask})


def actor_log_prob(model, batch):
    """What verl's actor computes in compute_log_prob: log p(response_j) [B, R] (0 on padding)."""
    t = batch.batch
    P, R = t["prompts"].shape[1], t["responses"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                       position_ids=t["position_ids"]).logits
    return token_logprobs(logits[:, P - 1:P + R - 1], t["responses"], mask=t["attention_mask"][:, P:].bool(),
                          entropy=False).logprobs


def grpo_advantages(batch, tok):
    """Outcome rewards (the response names a door) normalised within each group, per token."""
    text = [tok.decode(r[m.bool()]) for r, m in zip(batch.batch["responses"], batch.batch["response_mask"])]
    reward = torch.tensor([float("door" in s) + 0.1 * len(s.split()) for s in text]).view(-1, GROUP)
    adv = ((reward - reward.mean(-1, keepdim=True)) / (reward.std(-1, keepdim=True) + 1e-6)).view(-1)
    return adv[:, None].expand_as(batch.batch["response_mask"]).float()


def actor_update(model, batch, optimizer):
    """verl's actor update for one micro-batch: no-padding layout, model statistics, distillation_ppo_loss."""
    from tensordict import TensorDict
    from verl.trainer.distillation.losses import distillation_ppo_loss
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import DistillationConfig, DistillationLossConfig
    from verl.workers.config.actor import FSDPActorConfig
    from verl.workers.utils.padding import left_right_2_no_padding

    t = batch.batch
    data = TensorDict({k: t[k] for k in t.keys()}, batch_size=[t["prompts"].shape[0]])
    data = left_right_2_no_padding(data)
    for key, value in (("dp_size", 1), ("batch_num_tokens", None), ("global_batch_size", None)):
        tu.assign_non_tensor_data(data, key, value)

    # the student's forward: packed logits of every real token, statistics from token_logprobs
    logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], position_ids=t["position_ids"]).logits
    keep = t["attention_mask"].bool()
    packed, ids = logits[keep], t["input_ids"][keep]
    stats = token_logprobs(packed, torch.roll(ids, -1))
    offsets = data["input_ids"].offsets()
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(stats.logprobs, offsets),
                    "entropy": torch.nested.nested_tensor_from_jagged(stats.entropy, offsets)}

    config = FSDPActorConfig(strategy="fsdp", rollout_n=GROUP, ppo_mini_batch_size=len(PROMPTS) * GROUP,
                             ppo_micro_batch_size_per_gpu=len(PROMPTS) * GROUP, entropy_coeff=0.001,
                             use_kl_loss=False, loss_agg_mode="token-mean")
    distill = DistillationConfig(enabled=False, distillation_loss=DistillationLossConfig(
        loss_mode="sdar", use_policy_gradient=False, distillation_loss_coef=LAMBDA, loss_max_clamp=None))
    loss, metrics = distillation_ppo_loss(config, distill, model_output, data)

    # the same loss from the fused SDAR op on the response rows (a check, not part of the recipe)
    P, R = t["prompts"].shape[1], t["responses"].shape[1]
    reference = sdar_loss(logits[:, P - 1:P + R - 1], t["responses"], mask=t["response_mask"].bool(),
                          teacher_logprobs=t["teacher_logprobs"][:, P - 1:P + R - 1, 0],
                          advantages=t["advantages"], old_logprobs=t["old_log_probs"], distill_coef=LAMBDA,
                          entropy_coef=0.001)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach(), reference.loss.detach(), metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for summary.json (default: print only)")
    args = parser.parse_args(argv)

    import sdar.integrations.verl  # noqa: F401  registers "sdar" (what VERL_USE_EXTERNAL_MODULES does)

    tok = build_tiny_tokenizer(" ".join(PROMPTS + SKILLS).split())
    model = tiny_model(TinyConfig(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64), tok)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    batch = rollout(model, tok)                                                   # 1
    teacher_batch = build_teacher_batch(batch, [s for s in SKILLS for _ in range(GROUP)], tok)  # 2
    teacher_lp = actor_log_prob(model, teacher_batch)                             # 3
    attach_teacher_logprobs(batch, teacher_lp)                                    # 4
    batch.batch["old_log_probs"] = actor_log_prob(model, batch)
    batch.batch["advantages"] = grpo_advantages(batch, tok)
    loss, reference, metrics = actor_update(model, batch, optimizer)              # 5

    t = teacher_batch.batch
    first_prompt = t["prompts"][0][t["attention_mask"][0, :t["prompts"].shape[1]].bool()]
    summary = {"loss": loss.item(), "sdar_loss": reference.item(),
               **{k: v.aggregate() for k, v in metrics.items() if k.startswith("sdar/")},
               "teacher_prompt": tok.decode(first_prompt)}
    print(json.dumps(summary, indent=1))
    if not torch.allclose(loss, reference, rtol=1e-5, atol=1e-7):
        raise SystemExit(f"verl's distillation_ppo_loss {loss.item()} != sdar_loss {reference.item()}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
