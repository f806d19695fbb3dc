"""The thin SDAR training loop: rollouts -> advantages / old / teacher / reference log-probs -> updates.

One step:
1. sample ``tasks_per_step`` train instances; play ``group_size`` episodes of each (temperature sampling);
2. episode reward -> GRPO advantage normalised within the group, broadcast to every token of every step;
3. with the pre-update policy (no grad): old log-probs, teacher log-probs (the same model with the skill
   prefix, on the student's tokens; the released form) and reference log-probs (the frozen start model);
4. ``mini_batches`` updates over the step's samples (one epoch, micro-batched, token-mean over the whole
   mini-batch): ``sdar_kernels.sdar_loss`` on the loss rows' logits, or ``linear_sdar_loss`` on hidden
   states and the lm_head weight (``fused_linear``), or the eager reference (``loss_backend="eager"``);
   full-vocabulary divergences (distill fkl / rkl / jsd) take live teacher logits instead; AdamW, clipping.

Only the rows that carry loss (the response tokens) are projected to the vocabulary: hidden states of the
decoder's final norm are gathered first, so the [N, V] logits never include prompt or padding positions.
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

import sdar_kernels
from sdar_kernels.reference import sdar_loss_reference

from .config import SDARConfig
from .env import TowerConfig, make_instance
from .models import TinyConfig, ensure_tiny, load_model
from .rollout import autocast_for, run_episodes
from .samples import LAYOUTS, collate, grpo_advantages, shifted_rows, step_samples

METHODS = ("grpo", "grpo_opsd", "sdar", "opsd")
FULL_VOCAB = ("fkl", "rkl", "jsd")


@dataclass(frozen=True)
class TrainConfig:
    method: str = "sdar"
    steps: int = 40
    tasks_per_step: int = 8
    group_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    mini_batches: int = 2          # optimizer steps per rollout batch (one epoch over it)
    micro_batch: int = 128         # samples per forward/backward
    layout: str = "released"
    history: int = 2
    max_new_tokens: int = 3
    skill_noise: float = 0.25
    train_instances: int = 1024
    eval_instances: int = 128
    eval_temperature: float = 0.4  # verl-agent's validation temperature; 0: greedy
    eval_every: int = 10
    save_every: int = 0            # 0: checkpoint at the end only
    seed: int = 0
    model: str | None = None       # local HF checkpoint; None: the embedded tiny model
    warmup_steps: int = 300        # tiny model only
    vocab_size: int = 0            # tiny model only: >0 pads its vocabulary (to measure the loss at scale)
    cache_dir: str | None = None
    loss_backend: str = "fused"    # "fused" (sdar_kernels) | "eager" (the plain eager reference)
    fused_linear: bool = False
    max_teacher_len: int | None = None
    max_skill_tokens: int | None = None
    device: str = "auto"
    # loss overrides (None: the method's official default)
    distill: str | None = None
    distill_coef: float | None = None
    gate_beta: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.loss_backend not in ("fused", "eager"):
            raise ValueError(f"loss_backend must be 'fused' or 'eager', got {self.loss_backend!r}")
        if self.fused_linear and self.loss_backend == "eager":
            raise ValueError("fused_linear needs loss_backend='fused'")
        for name in ("steps", "tasks_per_step", "group_size", "mini_batches", "micro_batch",
                     "max_new_tokens", "train_instances", "eval_instances"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps", "history"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if self.method == "grpo" and self.distill_coef not in (None, 0, 0.0):
            raise ValueError(f"distill_coef: method 'grpo' has no distillation term, got {self.distill_coef}")
        if not (self.eval_temperature >= 0 and math.isfinite(self.eval_temperature)):
            raise ValueError(f"eval_temperature must be >= 0, got {self.eval_temperature}")

    def loss_config(self) -> SDARConfig:
        over = {k: v for k, v in (("distill", self.distill), ("distill_coef", self.distill_coef),
                                  ("gate_beta", self.gate_beta)) if v is not None}
        return SDARConfig.for_method(self.method, group_size=self.group_size, **over)

    def env_config(self) -> TowerConfig:
        return TowerConfig(skill_noise=self.skill_noise)

    def tiny_config(self) -> TinyConfig:
        return TinyConfig(warmup_steps=self.warmup_steps, vocab_size=self.vocab_size)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def masked_rows(model, ids, attn, pos, select, width):
    """Final-norm hidden states of the rows that predict the loss tokens: [N, H]."""
    h = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
    return shifted_rows(h, width)[select]


def project(model, hidden):
    head = model.get_output_embeddings()
    return torch.nn.functional.linear(hidden, head.weight, getattr(head, "bias", None))


def token_logprobs(logits, labels, temperature):
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return lp.gather(-1, labels[:, None]).squeeze(-1)


def row_logprobs(model, hidden, labels, temperature, max_elems=1 << 24):
    """log p(label) of every row, projecting ``max_elems // V`` rows at a time, so the no-grad passes
    (old / teacher / reference) never hold more than ~64 MB of fp32 logits whatever N and V are."""
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, max_elems // vocab)
    return torch.cat([token_logprobs(project(model, hidden[i:i + step]), labels[i:i + step], temperature)
                      for i in range(0, hidden.shape[0], step)]) if hidden.shape[0] else hidden.new_zeros(0)


class Trainer:
    """Holds the policy, the frozen reference, the optimizer and every RNG; ``run()`` trains."""

    def __init__(self, cfg: TrainConfig, out_dir, *, log=print, progress=True):
        self.cfg, self.out, self.log, self.progress = cfg, Path(out_dir), log, progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(cfg.device)
        self.loss_cfg = cfg.loss_config()
        self.env_cfg = cfg.env_config()
        if cfg.model is None:
            self.source = ensure_tiny(cfg.tiny_config(), self.env_cfg, cfg.history, cfg.cache_dir, log=log)
        else:
            self.source = Path(cfg.model)
        self.model, self.codec = load_model(self.source, self.device)
        self.ref, _ = load_model(self.source, self.device)
        self.ref.requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.task_rng = random.Random(f"tasks:{cfg.seed}")
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(cfg.seed)
        self.eval_set = [make_instance(self.env_cfg, "eval", i) for i in range(cfg.eval_instances)]
        self.live_teacher = self.loss_cfg.distill in FULL_VOCAB
        if cfg.fused_linear and not hasattr(sdar_kernels, "linear_sdar_loss"):
            raise ValueError("fused_linear: this sdar_kernels has no linear_sdar_loss")

    # ------------------------------------------------------------------------------------ state
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def save(self):
        ck = self.checkpoint_dir()
        tmp = self.out / "checkpoint.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(tmp)
        self.codec.tokenizer.save_pretrained(tmp)
        torch.save({
            "step": self.step, "config": asdict(self.cfg), "source": str(self.source),
            "optimizer": self.opt.state_dict(), "task_rng": self.task_rng.getstate(),
            "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }, tmp / "trainer_state.pt")
        if ck.exists():
            old = self.out / "checkpoint.old"
            ck.rename(old)
            tmp.rename(ck)
            import shutil
            shutil.rmtree(old)
        else:
            tmp.rename(ck)

    def resume(self) -> bool:
        """Continue from ``out/checkpoint`` if there is one (same config up to ``steps``)."""
        ck = self.checkpoint_dir()
        if not (ck / "trainer_state.pt").exists():
            return False
        st = torch.load(ck / "trainer_state.pt", weights_only=False)
        saved = dict(st["config"])
        mine = asdict(self.cfg)
        for k in ("steps", "eval_every", "save_every", "device", "cache_dir"):
            saved.pop(k, None)
            mine.pop(k, None)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"resume: the checkpoint was trained with a different config: {diff}")
        self.model, self.codec = load_model(ck, self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.opt.load_state_dict(st["optimizer"])
        self.step = st["step"]
        self.task_rng.setstate(st["task_rng"])
        self.gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        if st["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        self._truncate_metrics()
        self.log(f"resumed from {ck} at step {self.step}")
        return True

    def _truncate_metrics(self):
        path = self.out / "metrics.jsonl"
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict):
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------ pieces
    def collect(self):
        cfg = self.cfg
        idx = [self.task_rng.randrange(cfg.train_instances) for _ in range(cfg.tasks_per_step)]
        instances = [make_instance(self.env_cfg, "train", i) for i in idx for _ in range(cfg.group_size)]
        groups = [g for g in range(cfg.tasks_per_step) for _ in range(cfg.group_size)]
        self.model.eval()
        episodes, envs = run_episodes(
            self.model, self.codec, self.env_cfg, instances, layout=cfg.layout, history=cfg.history,
            max_new_tokens=cfg.max_new_tokens, temperature=self.loss_cfg.temperature, generator=self.gen,
            device=self.device)
        rewards = [e.reward for e in envs]
        adv = grpo_advantages(rewards, groups)
        stats = {
            "reward": sum(rewards) / len(rewards),
            "success": sum(e.success for e in envs) / len(envs),
            "invalid_rate": sum(e.invalid for e in envs) / max(sum(len(e.turns) for e in envs), 1),
            "turns": sum(len(e.turns) for e in envs) / len(envs),
            "skill_correct": sum(i.skill_correct for i in instances) / len(instances),
        }
        return step_samples(episodes, cfg.layout), adv, stats

    def batches(self, samples, with_teacher=True):
        mb = self.cfg.micro_batch
        for i in range(0, len(samples), mb):
            yield collate(samples[i:i + mb], self.codec.pad_id, with_teacher=with_teacher,
                          max_teacher_len=self.cfg.max_teacher_len,
                          max_skill_tokens=self.cfg.max_skill_tokens).to(self.device)

    @torch.no_grad()
    def prepare(self, samples):
        """old / teacher / reference log-probs of every loss token, with the pre-update weights."""
        tau = self.loss_cfg.temperature
        old, teacher, ref = [], [], []
        self.model.eval()
        for b in self.batches(samples):
            width = b.input_ids.shape[1]
            with autocast_for(self.device):
                h = masked_rows(self.model, b.input_ids, b.attention_mask, b.position_ids, b.select, width)
                ht = masked_rows(self.model, *b.teacher, b.select, width)
                hr = masked_rows(self.ref, b.input_ids, b.attention_mask, b.position_ids, b.select, width)
                old.append(row_logprobs(self.model, h, b.labels, tau))
                teacher.append(row_logprobs(self.model, ht, b.labels, tau))
                ref.append(row_logprobs(self.ref, hr, b.labels, tau))
        return torch.cat(old), torch.cat(teacher), torch.cat(ref)

    def loss_fn(self):
        if self.cfg.loss_backend == "eager":
            return sdar_loss_reference
        return sdar_kernels.sdar_loss

    def micro_loss(self, b, adv_tok, old, tlp, ref, num_tokens):
        cfg, lc = self.cfg, self.loss_cfg
        width = b.input_ids.shape[1]
        tensors = {"ref_logprobs": ref} if lc.kl_coef > 0 else {}
        if lc.use_policy_gradient:
            tensors.update(advantages=adv_tok, old_logprobs=old)
        with autocast_for(self.device):
            h = masked_rows(self.model, b.input_ids, b.attention_mask, b.position_ids, b.select, width)
            th = None
            if self.live_teacher:
                with torch.no_grad():
                    th = masked_rows(self.model, *b.teacher, b.select, width).detach()
            else:
                tensors["teacher_logprobs"] = tlp
            kw = dict(lc.loss_kwargs(), num_tokens=num_tokens, **tensors)
            if cfg.fused_linear:
                head = self.model.get_output_embeddings()
                if th is not None:  # the teacher shares the lm_head weight; no gradient flows to it
                    kw["teacher_hidden"] = th
                return sdar_kernels.linear_sdar_loss(h, head.weight.to(h.dtype), b.labels,
                                                     bias=getattr(head, "bias", None), **kw)
            logits = project(self.model, h)
            if th is not None:
                kw["teacher_logits"] = project(self.model, th).detach()
            return self.loss_fn()(logits, b.labels, **kw)

    def update(self, samples, adv):
        cfg = self.cfg
        old, tlp, ref = self.prepare(samples)
        self.model.train()
        # split the step's samples into mini-batches (whole samples; token offsets tracked)
        n_tok = [sum(s.loss_mask[1:]) for s in samples]
        offsets = [0]
        for n in n_tok:
            offsets.append(offsets[-1] + n)
        per = math.ceil(len(samples) / cfg.mini_batches)
        agg, count, gnorms = {}, 0, []
        for m in range(0, len(samples), per):
            chunk = samples[m:m + per]
            total = offsets[m + len(chunk)] - offsets[m]
            if total == 0:
                continue
            self.opt.zero_grad(set_to_none=True)
            t0 = offsets[m]
            for j in range(0, len(chunk), cfg.micro_batch):
                sub = chunk[j:j + cfg.micro_batch]
                b = next(iter(self.batches(sub, with_teacher=self.live_teacher)))
                lo = t0
                hi = lo + b.num_tokens
                t0 = hi
                adv_tok = adv.to(self.device)[b.token_episode]
                out = self.micro_loss(b, adv_tok, old[lo:hi], tlp[lo:hi], ref[lo:hi], float(total))
                out.loss.backward()
                for k, v in out.metrics.items():
                    agg[k] = agg.get(k, 0.0) + float(v) * b.num_tokens
                count += b.num_tokens
            gnorms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)))
            self.opt.step()
        metrics = {k: v / max(count, 1) for k, v in agg.items()}
        metrics["grad_norm"] = sum(gnorms) / max(len(gnorms), 1)
        metrics["tokens"] = count
        return metrics

    @torch.no_grad()
    def evaluate(self, with_skill=False) -> float:
        """Success rate on the held-out instances (the student: no skill in its context; ``with_skill``:
        the same model acting with the retrieved skill, i.e. the teacher). Sampled at
        ``eval_temperature`` from a generator with a fixed seed, the same for every run and step (common
        random numbers), so differences between runs are differences between policies."""
        self.model.eval()
        t = self.cfg.eval_temperature
        gen = torch.Generator(device=self.device)
        gen.manual_seed(1234)
        _, envs = run_episodes(self.model, self.codec, self.env_cfg, self.eval_set, layout=self.cfg.layout,
                               history=self.cfg.history, max_new_tokens=self.cfg.max_new_tokens,
                               greedy=t == 0, temperature=t if t > 0 else 1.0, generator=gen,
                               with_skill=with_skill, device=self.device)
        return sum(e.success for e in envs) / len(envs)

    # ------------------------------------------------------------------------------------ loop
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        samples, adv, stats = self.collect()
        t1 = time.perf_counter()
        metrics = self.update(samples, adv)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        self.step += 1
        rec = {"step": self.step, **stats, **metrics, "time/rollout_s": t1 - t0, "time/update_s": t2 - t1,
               "time/step_s": t2 - t0,
               "mem/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.device.type == "cuda":
            rec["mem/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return rec

    def run(self, resume=False) -> list:
        cfg = self.cfg
        if resume:
            self.resume()
        records = []
        if self.step == 0 and cfg.eval_every:
            rec = {"step": 0, "eval/success": self.evaluate(), "eval/teacher_success": self.evaluate(True)}
            self.write(rec)
            records.append(rec)
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method} seed {cfg.seed}",
                       dynamic_ncols=True)
        while self.step < cfg.steps:
            rec = self.train_step()
            last = self.step == cfg.steps
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                rec["eval/success"] = self.evaluate()
                if last:
                    rec["eval/teacher_success"] = self.evaluate(True)
            self.write(rec)
            records.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{rec['reward']:.2f}", succ=f"{rec['success']:.2f}",
                                gate=f"{rec['gate_mean']:.2f}", active=f"{rec['gate_active_ratio']:.2f}",
                                refresh=False)
            if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                self.save()
        if bar is not None:
            bar.close()
        return records


def train(cfg: TrainConfig, out_dir, *, resume=False, log=print, progress=True) -> list:
    return Trainer(cfg, out_dir, log=log, progress=progress).run(resume=resume)


def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
    return replace(TrainConfig(), **d)
