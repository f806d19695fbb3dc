"""``python -m sdar train|compare``: the command line of the training loop."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

from .trainer import METHODS, TrainConfig

# --quick: about a minute on 2 CPU cores (including building the small warm-up once)
QUICK = dict(steps=3, tasks_per_step=2, eval_instances=8, eval_every=3, warmup_steps=100, micro_batch=64)


def add_train_args(p: argparse.ArgumentParser, *, compare=False):
    d = TrainConfig()
    if not compare:
        p.add_argument("--method", default=d.method, choices=METHODS)
        p.add_argument("--seed", type=int, default=d.seed)
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
        p.add_argument("--config", default=None, help="JSON of TrainConfig fields (flags override it)")
    p.add_argument("--out", default=None, help="directory for metrics, checkpoints, table and plot")
    p.add_argument("--quick", action="store_true", help="a tiny run (~1 minute on 2 CPU cores)")
    p.add_argument("--model", default=None, help="local Hugging Face causal-LM checkpoint directory "
                                                 "(default: the embedded tiny model with its warm-up)")
    p.add_argument("--cache-dir", default=None, help="warm-up cache (default $SDAR_CACHE or ~/.cache/sdar)")
    p.add_argument("--steps", type=int)
    p.add_argument("--tasks-per-step", type=int)
    p.add_argument("--group-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--mini-batches", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--layout", choices=("released", "concat"))
    p.add_argument("--history", type=int)
    p.add_argument("--skill-noise", type=float, help="fraction of retrieved skills that are wrong")
    p.add_argument("--eval-instances", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-temperature", type=float, help="held-out sampling temperature (0: greedy)")
    p.add_argument("--save-every", type=int)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--vocab-size", type=int, help="pad the tiny model's vocabulary to this size")
    p.add_argument("--loss-backend", choices=("fused", "eager"))
    p.add_argument("--fused-linear", action="store_true", help="sdar_kernels.linear_sdar_loss on hidden states")
    p.add_argument("--distill", choices=("sampled", "reinforce", "fkl", "rkl", "jsd"))
    p.add_argument("--distill-coef", type=float)
    p.add_argument("--gate-beta", type=float)
    p.add_argument("--max-teacher-len", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(a, **fixed) -> TrainConfig:
    base = TrainConfig()
    if getattr(a, "config", None):
        from .trainer import config_from_dict
        base = config_from_dict(json.loads(Path(a.config).read_text()))
    over = dict(QUICK) if a.quick else {}
    for name in ("steps", "tasks_per_step", "group_size", "lr", "mini_batches", "micro_batch", "layout",
                 "history", "skill_noise", "eval_instances", "eval_every", "eval_temperature", "save_every",
                 "warmup_steps", "vocab_size",
                 "loss_backend", "distill", "distill_coef", "gate_beta", "max_teacher_len", "model",
                 "cache_dir", "device"):
        v = getattr(a, name, None)
        if v is not None:
            over[name] = v
    if a.fused_linear:
        over["fused_linear"] = True
    over.update(fixed)
    return replace(base, **over)


def set_threads(n):
    import torch
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def cmd_train(a):
    from .trainer import train
    set_threads(a.threads)
    cfg = config_from_args(a, method=a.method, seed=a.seed)
    out = Path(a.out or f"runs/{cfg.method}-seed{cfg.seed}")
    if cfg.cache_dir is None and a.out is not None and a.quick:
        cfg = replace(cfg, cache_dir=str(out / "cache"))
    (out).mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    recs = train(cfg, out, resume=a.resume, progress=not a.no_progress,
                 log=lambda m: print(m, file=sys.stderr))
    final = [r for r in recs if "eval/success" in r]
    if final:
        print(json.dumps({"out": str(out), "step": final[-1]["step"], "eval/success": final[-1]["eval/success"]}))
    return 0


def cmd_compare(a):
    from .compare import compare
    set_threads(a.threads)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r}; choose from {METHODS}")
    if a.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {a.seeds}")
    cfg = config_from_args(a)
    out = Path(a.out or "runs/compare")
    if cfg.cache_dir is None and a.out is not None and a.quick:
        cfg = replace(cfg, cache_dir=str(out / "cache"))
    jobs = a.jobs if a.jobs is not None else (1 if a.quick else max(1, min(2, os.cpu_count() or 1)))
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    compare(cfg, methods, a.seeds, out, jobs=jobs, threads_per_job=a.threads_per_job, progress=not a.no_progress)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sdar", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one method with one seed")
    add_train_args(t)
    c = sub.add_parser("compare", help="train several methods x seeds, evaluate, write a table and a plot")
    add_train_args(c, compare=True)
    c.add_argument("--methods", default="grpo,grpo_opsd,sdar")
    c.add_argument("--seeds", type=int, default=3)
    c.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel as subprocesses (default: min(2, cores); 1 with --quick: "
                        "every run in this process)")
    c.add_argument("--threads-per-job", type=int, default=1)
    a = p.parse_args(argv)
    try:
        return cmd_train(a) if a.cmd == "train" else cmd_compare(a)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    sys.exit(main())
