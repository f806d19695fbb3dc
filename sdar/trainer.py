"""The thin SDAR training loop: rollouts -> advantages / old / teacher / reference log-probs -> updates.

One step:
1. sample ``tasks_per_step`` train instances of the task; play ``group_size`` episodes of each
   (temperature sampling);
2. every training row (an environment step in the released layout) gets the episode's reward, minus
   the invalid-action penalty on the row of the invalid step (verl-agent); GRPO normalises the rows'
   scores within the group, counting every row (``cross_steps``, verl-agent's default) or one per episode;
3. with the pre-update weights (no grad): old log-probs, teacher log-probs (the same weights with the
   skill prefix, on the student's tokens; the released form) and reference log-probs (the frozen start
   model) of every loss token; the full-vocabulary divergences (distill fkl / rkl / jsd) read teacher
   logits from a copy of the pre-update weights in each micro-batch, so every distill form has the same
   ("old") teacher;
4. the rows are shuffled (seeded) and split into ``mini_batches`` AdamW steps (one epoch, micro-batched,
   token-mean over the whole mini-batch): ``sdar_kernels.sdar_loss`` on the loss rows' logits, or
   ``linear_sdar_loss`` on hidden states and the lm_head weight (``fused_linear``), or the eager reference
   (``loss_backend="eager"``); gradient clipping.

Only the rows that carry loss (the response tokens) are projected to the vocabulary: hidden states of the
decoder's final norm are gathered first, so the [N, V] logits never include prompt or padding positions.
Those rows are a packed layout (``Batch.token_row`` names each token's sample), so every ``loss_agg_mode``
is applied as ``loss_weights`` from ``sdar_kernels.packed_loss_weights``, normalised by the mini-batch's
global counts (``sdar_kernels.global_counts``).

Data parallel (``torchrun``, :mod:`sdar.distributed`): each rank plays its share of the episodes, GRPO
normalises every group over all ranks' rows, each mini-batch is the one a single process would form and
each rank runs its own rows of it under DDP; rank 0 evaluates and writes metrics and checkpoints.
The task is any object with the :mod:`sdar.task` protocol; the default is the embedded towers task.
"""

from __future__ import annotations

import contextlib
import copy
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

from .checkpoint import STATE_FILE, load_state, python_rng_state, save_state, set_python_rng_state
from .config import SDARConfig
from .diagnostics import GateStats, outcome
from .distributed import DataParallel
from .models import TinyConfig, ensure_tiny, load_model
from .rollout import autocast_for, run_episodes
from .samples import LAYOUTS, collate, grpo_advantages, shifted_rows, step_samples
from .task import check_task
from .towers import NOISE_KINDS, Towers, TowersConfig

METHODS = ("grpo", "grpo_opsd", "sdar", "opsd")
FULL_VOCAB = ("fkl", "rkl", "jsd")
# metrics that only exist when a teacher is in the loss; a run without distillation does not log them
DISTILL_METRICS = ("gate_mean", "gate_active_ratio", "gap_mean", "distill_loss")


@dataclass(frozen=True)
class TrainConfig:
    method: str = "sdar"
    steps: int = 200
    tasks_per_step: int = 8
    group_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    mini_batches: int = 4          # optimizer steps per rollout batch (one epoch over it)
    micro_batch: int = 128         # samples per forward/backward
    shuffle: bool = True           # shuffle the rows before splitting them into mini-batches
    cross_steps: bool = True       # GRPO group statistics over every step row (verl-agent's default)
    invalid_penalty: float = 0.1   # verl-agent's invalid_action_penalty_coef
    penalty_per_step: bool = True  # on the invalid step's row (verl-agent); False: on the whole episode
    layout: str = "released"
    history: int = 2
    max_new_tokens: int = 3
    # the towers task (ignored when a task object is passed to the Trainer)
    floors: int = 2
    max_turns: int | None = None   # None: floors + 1
    features: int = 2
    values: int = 6
    skill_noise: float = 0.25
    noise_kind: str = "mixed"
    holdout: int = 4
    world_seed: int = 0
    signs: bool = True
    train_instances: int = 1024
    eval_instances: int = 128
    eval_temperature: float = 0.4  # verl-agent's validation temperature; 0: greedy
    eval_every: int = 5
    save_every: int = 0            # 0: checkpoint at the end only
    seed: int = 0
    model: str | None = None       # local HF checkpoint; None: the embedded tiny model
    warmup_steps: int = 600        # tiny model only
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
    loss_agg_mode: str | None = None       # None: token-mean (the released code's)
    loss_scale_factor: float | None = None  # S of seq-mean-token-sum-norm (verl's response length)

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
        for name in ("lr", "weight_decay", "max_grad_norm", "invalid_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and (v > 0 if name in ("lr", "max_grad_norm") else v >= 0)):
                raise ValueError(f"{name} must be a finite number {'> 0' if name in ('lr', 'max_grad_norm') else '>= 0'}, "
                                 f"got {v}")
        if self.method == "grpo" and self.distill_coef not in (None, 0, 0.0):
            raise ValueError(f"distill_coef: method 'grpo' has no distillation term, got {self.distill_coef}")
        if not (self.eval_temperature >= 0 and math.isfinite(self.eval_temperature)):
            raise ValueError(f"eval_temperature must be >= 0, got {self.eval_temperature}")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {self.noise_kind!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        self.towers_config()   # the task's own checks (floors, turns, features, values, noise)
        mode = self.loss_config().loss_agg_mode   # and the loss's (distill, gate_beta, distill_coef, mode)
        if self.loss_scale_factor is not None and not (math.isfinite(self.loss_scale_factor)
                                                       and self.loss_scale_factor > 0):
            raise ValueError(f"loss_scale_factor must be a finite number > 0, got {self.loss_scale_factor}")
        if mode == "seq-mean-token-sum-norm" and self.loss_scale_factor is None:
            raise ValueError("loss_scale_factor is required with loss_agg_mode 'seq-mean-token-sum-norm' (the fixed "
                             "length S every sequence's token sum is divided by, e.g. max_new_tokens)")

    def loss_config(self) -> SDARConfig:
        over = {k: v for k, v in (("distill", self.distill), ("distill_coef", self.distill_coef),
                                  ("gate_beta", self.gate_beta), ("loss_agg_mode", self.loss_agg_mode))
                if v is not None}
        return SDARConfig.for_method(self.method, group_size=self.group_size, **over)

    def towers_config(self) -> TowersConfig:
        return TowersConfig(floors=self.floors, max_turns=self.max_turns, features=self.features,
                            values=self.values, skill_noise=self.skill_noise, noise_kind=self.noise_kind,
                            holdout=self.holdout, world_seed=self.world_seed, signs=self.signs)

    def tiny_config(self) -> TinyConfig:
        return TinyConfig(warmup_steps=self.warmup_steps, vocab_size=self.vocab_size)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"device {name!r} requested but {why} (torch {torch.__version__}); "
                         f"use --device cpu or --device auto")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return dev


def masked_rows(model, ids, attn, pos, select, width):
    """Final-norm hidden states of the rows that predict the loss tokens: [N, H]."""
    h = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
    return shifted_rows(h, width)[select]


class LossRows(torch.nn.Module):
    """:func:`masked_rows` of the policy as a module: the unit DDP wraps (gradients are averaged over the
    ranks only for a forward that runs inside DDP's call; the lm_head used after it is one of its
    parameters, so its gradient is averaged too)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, attn, pos, select, width):
        return masked_rows(self.model, ids, attn, pos, select, width)


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
    """Holds the task, the policy, the frozen reference, the optimizer and every RNG; ``run()`` trains."""

    def __init__(self, cfg: TrainConfig, out_dir, *, task=None, log=print, progress=True, dp=None):
        self.dp = dp if dp is not None else DataParallel()
        self.cfg, self.out = cfg, Path(out_dir)
        self.log = log if self.dp.main else (lambda m: None)   # rank 0 speaks and writes for the group
        self.progress = progress and self.dp.main
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = self.dp.place(pick_device(cfg.device))
        if cfg.tasks_per_step * cfg.group_size < self.dp.world:
            raise ValueError(f"tasks_per_step * group_size = {cfg.tasks_per_step * cfg.group_size} episodes per step "
                             f"cannot be shared by {self.dp.world} processes")
        self.task = task if task is not None else Towers(cfg.towers_config())
        check_task(self.task)
        self.loss_cfg = cfg.loss_config()
        self.distills = self.loss_cfg.distill_coef > 0
        self.live_teacher = self.distills and self.loss_cfg.distill in FULL_VOCAB
        if cfg.fused_linear and not hasattr(sdar_kernels, "linear_sdar_loss"):
            raise ValueError("fused_linear: this sdar_kernels has no linear_sdar_loss")
        if cfg.model is None:   # rank 0 builds the warm-up cache, the others then read it
            self.source = self.dp.main_first(
                lambda: ensure_tiny(cfg.tiny_config(), self.task, cfg.history, cfg.cache_dir, log=self.log))
        else:
            self.source = Path(cfg.model)
        self.model, self.codec = load_model(self.source, self.device)
        self.ref = None
        if self.loss_cfg.kl_coef > 0:
            self.ref, _ = load_model(self.source, self.device)
            self.ref.requires_grad_(False).eval()
        self.teacher_model = None     # the pre-update weights, for the live-teacher forms
        self.policy, self.policy_of = None, None   # LossRows(model), under DDP when data-parallel
        self.opt = self.new_optimizer()
        self.step = 0
        self.task_rng = random.Random(f"tasks:{cfg.seed}")
        self.shuffle_rng = random.Random(f"shuffle:{cfg.seed}")
        self.gen = torch.Generator(device=self.device)
        # the rollouts' sampling: a stream per rank (rank 0's is the single-process one)
        self.gen.manual_seed(cfg.seed + 1_000_003 * self.dp.rank)
        self.eval_set = [self.task.instance("eval", i) for i in range(cfg.eval_instances)]

    def new_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    # ------------------------------------------------------------------------------------ state
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def save(self):
        """Rank 0 writes the checkpoint; every rank must call this (it gathers their sampling generators)."""
        generators = self.dp.all_gather(self.gen.get_state())
        torch_rngs = self.dp.all_gather(torch.get_rng_state())
        cuda_rngs = self.dp.all_gather(torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        if not self.dp.main:
            return
        ck = self.checkpoint_dir()
        tmp = self.out / "checkpoint.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(tmp)
        self.codec.tokenizer.save_pretrained(tmp)
        save_state(tmp / STATE_FILE, {
            "step": self.step, "config": asdict(self.cfg), "source": str(self.source),
            "optimizer": self.opt.state_dict(),
            "task_rng": python_rng_state(self.task_rng), "shuffle_rng": python_rng_state(self.shuffle_rng),
            "world_size": self.dp.world, "generators": generators, "torch_rngs": torch_rngs,
            "cuda_rngs": cuda_rngs,
        })
        if ck.exists():
            import shutil
            old = self.out / "checkpoint.old"
            ck.rename(old)
            tmp.rename(ck)
            shutil.rmtree(old)
        else:
            tmp.rename(ck)

    def resume(self) -> bool:
        """Continue from ``out/checkpoint`` if there is one (same config up to ``steps`` and logging)."""
        ck = self.checkpoint_dir()
        if not (ck / STATE_FILE).exists():
            return False
        st = load_state(ck / STATE_FILE)
        saved, mine = dict(st["config"]), asdict(self.cfg)
        for k in ("steps", "eval_every", "save_every", "device", "cache_dir"):
            saved.pop(k, None)
            mine.pop(k, None)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError(f"resume: the checkpoint was trained with a different config: {diff}")
        world = st.get("world_size", 1)
        if world != self.dp.world:
            raise ValueError(f"resume: the checkpoint was written by {world} process(es), this run has {self.dp.world} "
                             f"(every process's rollout generator is restored); resume with as many processes")
        self.model, self.codec = load_model(ck, self.device)
        self.opt = self.new_optimizer()
        self.opt.load_state_dict(st["optimizer"])
        self.step = st["step"]
        set_python_rng_state(self.task_rng, st["task_rng"])
        set_python_rng_state(self.shuffle_rng, st["shuffle_rng"])
        rank = self.dp.rank
        self.gen.set_state(st["generators"][rank])
        torch.set_rng_state(st["torch_rngs"][rank])
        if st["cuda_rngs"][rank] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(st["cuda_rngs"][rank], self.device)
        if self.dp.main:
            self._truncate_metrics()
        self.log(f"resumed from {ck} at step {self.step}")
        return True

    def _truncate_metrics(self):
        path = self.out / "metrics.jsonl"
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict):
        if not self.dp.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------ pieces
    def collect(self):
        """Roll out one step's groups. Returns (samples with their GRPO scores, advantages, stats).

        Data-parallel: every rank draws the same instances and plays its contiguous share of the episodes;
        the rows' scores are gathered so that each GRPO group is normalised over all of its episodes,
        whichever rank played them (the same advantages as one process playing them all)."""
        cfg = self.cfg
        idx = [self.task_rng.randrange(cfg.train_instances) for _ in range(cfg.tasks_per_step)]
        instances = [self.task.instance("train", i) for i in idx for _ in range(cfg.group_size)]
        lo, hi = self.dp.shard(len(instances))
        mine = instances[lo:hi]
        self.model.eval()
        episodes, envs = run_episodes(
            self.model, self.codec, self.task, mine, layout=cfg.layout, history=cfg.history,
            max_new_tokens=cfg.max_new_tokens, temperature=self.loss_cfg.temperature, generator=self.gen,
            device=self.device)
        samples = step_samples(episodes, cfg.layout)
        per_episode_penalty = not cfg.penalty_per_step or cfg.layout == "concat"
        for s in samples:
            env = envs[s.episode]
            invalid = [not t.valid for t in env.turns]
            if per_episode_penalty:
                s.score = env.reward - cfg.invalid_penalty * sum(invalid)
            else:      # released layout: one row per step; the penalty lands on the invalid step's row
                s.score = env.reward - cfg.invalid_penalty * invalid[max(s.steps)]
            s.meta = {"skill_kind": mine[s.episode].skill_kind,
                      "outcomes": [outcome(t) for t in env.turns]}
            s.episode += lo   # the episode's index in the whole step: its GRPO group is episode // group_size
        totals = [sum(e.reward for e in envs), sum(e.success for e in envs),
                  sum(not t.valid for e in envs for t in e.turns), sum(len(e.turns) for e in envs),
                  sum(i.skill_kind == "correct" for i in mine)]
        parts = self.dp.all_gather(([(s.score, s.episode) for s in samples], totals))
        rows = [r for part, _ in parts for r in part]
        adv = grpo_advantages([sc for sc, _ in rows], [e // cfg.group_size for _, e in rows], [e for _, e in rows],
                              cross_steps=cfg.cross_steps)
        first = sum(len(part) for part, _ in parts[:self.dp.rank])
        adv = adv[first:first + len(samples)]
        reward, success, invalid, n_turns, skill_correct = (sum(t[k] for _, t in parts) for k in range(5))
        n = len(instances)
        stats = {"reward": reward / n, "success": success / n, "invalid_rate": invalid / max(n_turns, 1),
                 "turns": n_turns / n, "skill_correct": skill_correct / n}
        return samples, adv, stats

    def batches(self, samples, with_teacher):
        mb = self.cfg.micro_batch
        for i in range(0, len(samples), mb):
            yield samples[i:i + mb], collate(samples[i:i + mb], self.codec.pad_id, with_teacher=with_teacher,
                                             max_teacher_len=self.cfg.max_teacher_len,
                                             max_skill_tokens=self.cfg.max_skill_tokens).to(self.device)

    @torch.no_grad()
    def prepare(self, samples):
        """old / teacher / reference log-probs of every loss token, with the pre-update weights
        (teacher and reference are None when the loss does not use them)."""
        tau = self.loss_cfg.temperature
        old, teacher, ref = [], [], []
        self.model.eval()
        want_teacher = self.distills and not self.live_teacher
        for _, b in self.batches(samples, with_teacher=want_teacher):
            width = b.input_ids.shape[1]
            with autocast_for(self.device):
                h = masked_rows(self.model, b.input_ids, b.attention_mask, b.position_ids, b.select, width)
                old.append(row_logprobs(self.model, h, b.labels, tau))
                if want_teacher:
                    ht = masked_rows(self.model, *b.teacher, b.select, width)
                    teacher.append(row_logprobs(self.model, ht, b.labels, tau))
                if self.ref is not None:
                    hr = masked_rows(self.ref, b.input_ids, b.attention_mask, b.position_ids, b.select, width)
                    ref.append(row_logprobs(self.ref, hr, b.labels, tau))
        cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
        return cat(old), cat(teacher), cat(ref)

    def loss_fn(self):
        if self.cfg.loss_backend == "eager":
            return sdar_loss_reference
        return sdar_kernels.sdar_loss

    def micro_loss(self, policy, b, adv_tok, old, tlp, ref, weights):
        """The loss of one micro-batch; ``weights``: its tokens' aggregation weights (``loss_weights``)."""
        cfg, lc = self.cfg, self.loss_cfg
        width = b.input_ids.shape[1]
        kw = lc.loss_kwargs()
        tensors = {}
        if ref is not None:
            tensors["ref_logprobs"] = ref
        if lc.use_policy_gradient:
            tensors.update(advantages=adv_tok, old_logprobs=old)
        if not self.distills:
            kw["distill_coef"] = 0.0
        with autocast_for(self.device):
            h = policy(b.input_ids, b.attention_mask, b.position_ids, b.select, width)
            th = None
            if self.live_teacher:
                with torch.no_grad():
                    th = masked_rows(self.teacher_model, *b.teacher, b.select, width).detach()
            elif tlp is not None:
                tensors["teacher_logprobs"] = tlp
            kw.update(loss_weights=weights, dp_size=self.dp.world, **tensors)
            if cfg.fused_linear:
                head = self.model.get_output_embeddings()
                if th is not None:  # the pre-update lm_head projects the teacher; no gradient flows to it
                    kw["teacher_hidden"] = th
                    t_head = self.teacher_model.get_output_embeddings()
                    kw["teacher_weight"] = t_head.weight.to(h.dtype)
                    kw["teacher_bias"] = getattr(t_head, "bias", None)
                return sdar_kernels.linear_sdar_loss(h, head.weight.to(h.dtype), b.labels,
                                                     bias=getattr(head, "bias", None), **kw)
            logits = project(self.model, h)
            if th is not None:
                kw["teacher_logits"] = project(self.teacher_model, th).detach()
            return self.loss_fn()(logits, b.labels, **kw)

    def snapshot_teacher(self):
        """The live-teacher forms read the pre-update weights: copy them before the first update."""
        if self.teacher_model is None:
            self.teacher_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        else:
            self.teacher_model.load_state_dict(self.model.state_dict())

    def policy_rows(self):
        """LossRows of the current model, under DDP when data-parallel (rebuilt when resume() loads weights)."""
        if self.policy_of is not self.model:
            self.policy, self.policy_of = self.dp.wrap(LossRows(self.model), self.device), self.model
        return self.policy

    def mini_batch_counts(self, mbs) -> dict:
        """Global token and sequence counts of a mini-batch (``sdar_kernels.global_counts``): its loss rows
        are a packed layout, every token in the loss and ``token_row`` naming its sequence."""
        if not mbs:   # this rank holds none of the mini-batch's rows; it still joins the all-reduce
            return sdar_kernels.global_counts(torch.zeros(0, dtype=torch.bool, device=self.device),
                                              seq_ids=torch.zeros(0, dtype=torch.long, device=self.device))
        return sdar_kernels.global_counts([torch.ones(b.num_tokens, dtype=torch.bool, device=self.device)
                                           for _, b in mbs], seq_ids=[b.token_row for _, b in mbs])

    def token_weights(self, b, counts, active=True):
        """``loss_weights`` of one micro-batch (any loss_agg_mode, normalised by the global counts); all 0
        when not ``active``."""
        return sdar_kernels.packed_loss_weights(
            torch.full((b.num_tokens,), active, dtype=torch.bool, device=self.device), seq_ids=b.token_row,
            loss_agg_mode=self.loss_cfg.loss_agg_mode, num_tokens=counts["num_tokens"],
            num_sequences=counts["num_sequences"], loss_scale_factor=self.cfg.loss_scale_factor)

    def update(self, samples, adv):
        """One epoch of ``mini_batches`` optimizer steps over the step's rows (of every rank).

        Each rank runs its own rows of each mini-batch, weighted by the mini-batch's global token and
        sequence counts (one all-reduce), and DDP averages the gradients: the update one process makes
        with all rows, up to the order of floating-point sums."""
        own, shares = self.dp.split_rows(len(samples), self.cfg.mini_batches,
                                         self.shuffle_rng if self.cfg.shuffle else None)
        samples, adv = [samples[i] for i in own], adv[own]
        old, tlp, ref = self.prepare(samples)
        if self.live_teacher:
            self.snapshot_teacher()
        self.model.train()
        offsets = [0]
        for s in samples:
            offsets.append(offsets[-1] + sum(s.loss_mask[1:]))
        stats = {"agg": {}, "count": 0, "gates": GateStats(self.codec.eos_id) if self.distills else None}
        gnorms, start = [], 0
        for share in shares:
            gnorm = self.mini_batch(samples, adv, (old, tlp, ref), offsets, range(start, start + share), stats)
            start += share
            if gnorm is not None:
                gnorms.append(gnorm)
        return self.update_metrics(stats, gnorms)

    def mini_batch(self, samples, adv, per_token, offsets, rows, stats):
        """One optimizer step on this rank's ``rows`` of a mini-batch. Returns the gradient norm, or None
        when the mini-batch has no loss token on any rank (skipped by every rank alike)."""
        cfg = self.cfg
        mbs = list(self.batches(samples[rows.start:rows.stop], with_teacher=self.live_teacher))
        counts = self.mini_batch_counts(mbs)
        if float(counts["num_tokens"]) == 0:
            return None
        active = bool(mbs)
        if not active:   # a zero-weight pass on one of its rows, so that DDP's gradient all-reduce has this rank
            j = next((i for i in range(len(samples)) if offsets[i + 1] > offsets[i]), 0)
            rows = range(j, j + 1)
            mbs = list(self.batches(samples[j:j + 1], with_teacher=self.live_teacher))
        policy = self.policy_rows()
        self.opt.zero_grad(set_to_none=True)
        lo = offsets[rows.start]
        for k, (sub, b) in enumerate(mbs):
            hi = lo + b.num_tokens
            first = rows.start + k * cfg.micro_batch
            adv_tok = adv[first:first + len(sub)][b.token_row].to(self.device)
            old, tlp, ref = (None if x is None else x[lo:hi] for x in per_token)
            sync = k == len(mbs) - 1 or not self.dp.distributed    # accumulate locally, all-reduce once
            with contextlib.nullcontext() if sync else policy.no_sync():
                out = self.micro_loss(policy, b, adv_tok, old, tlp, ref, self.token_weights(b, counts, active))
                out.loss.backward()
            if active:
                for key, v in out.metrics.items():
                    stats["agg"][key] = stats["agg"].get(key, 0.0) + float(v) * b.num_tokens
                if stats["gates"] is not None:
                    stats["gates"].add(b, sub, out.gate, out.gap)
                stats["count"] += b.num_tokens
            lo = hi
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
        self.opt.step()
        return gnorm

    def update_metrics(self, stats, gnorms) -> dict:
        """The step's loss metrics, token-weighted over every rank's rows, and its gate diagnostics."""
        agg, count, gates = stats["agg"], stats["count"], stats["gates"]
        if self.dp.distributed:
            parts = self.dp.all_gather((agg, count, gates))
            agg = {k: sum(a.get(k, 0.0) for a, _, _ in parts) for k in dict.fromkeys(k for a, _, _ in parts for k in a)}
            count = sum(c for _, c, _ in parts)
            gates = GateStats.merged([g for _, _, g in parts]) if gates is not None else None
        metrics = {k: v / max(count, 1) for k, v in agg.items() if self.distills or k not in DISTILL_METRICS}
        if gates is not None:
            metrics.update(gates.metrics())
        metrics["grad_norm"] = sum(gnorms) / max(len(gnorms), 1)
        metrics["tokens"] = count
        return metrics

    @torch.no_grad()
    def evaluate(self, with_skill=False) -> float:
        """Success rate on the held-out instances (the student: no skill in its context; ``with_skill``:
        the same weights acting with the retrieved skill, i.e. the teacher). Sampled at
        ``eval_temperature`` from a generator with a fixed seed, the same for every run and step (common
        random numbers), so differences between runs are differences between policies."""
        self.model.eval()
        t = self.cfg.eval_temperature
        gen = torch.Generator(device=self.device)
        gen.manual_seed(1234)
        _, envs = run_episodes(self.model, self.codec, self.task, self.eval_set, layout=self.cfg.layout,
                               history=self.cfg.history, max_new_tokens=self.cfg.max_new_tokens,
                               greedy=t == 0, temperature=t if t > 0 else 1.0, generator=gen,
                               with_skill=with_skill, device=self.device)
        return sum(e.success for e in envs) / len(envs)

    def eval_record(self) -> dict:
        return {"eval/success": self.evaluate(), "eval/teacher_success": self.evaluate(with_skill=True)}

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
        if self.step == 0 and cfg.eval_every and self.dp.main:
            rec = {"step": 0, **self.eval_record()}
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
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or last) and self.dp.main:
                rec.update(self.eval_record())
            self.write(rec)
            records.append(rec)
            if bar is not None:
                bar.update(1)
                post = {"reward": f"{rec['reward']:.2f}", "succ": f"{rec['success']:.2f}",
                        "entropy": f"{rec['entropy']:.2f}"}
                if "gate/right-correct" in rec:
                    post["gate_right"] = f"{rec['gate/right-correct']:.2f}"
                bar.set_postfix(post, refresh=False)
            if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                self.save()
        if bar is not None:
            bar.close()
        return records


def train(cfg: TrainConfig, out_dir, *, task=None, resume=False, log=print, progress=True, dp=None) -> list:
    """Train one run; ``dp``: this process's data-parallel place (sdar.distributed), default alone."""
    return Trainer(cfg, out_dir, task=task, log=log, progress=progress, dp=dp).run(resume=resume)


def config_from_dict(d: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
    return replace(TrainConfig(), **d)
