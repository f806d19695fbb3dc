"""``python -m sdar train | compare | gate``: the command line of the training loop.

train     one method, one seed: metrics.jsonl, checkpoint/, the final held-out success
compare   arms x seeds against GRPO: bootstrap CIs, paired differences, a placebo arm (results.md/.png)
gate      the gate experiment: gated vs ungated distillation across skill noise (results.md/.png)

Every command needs the training extra: pip install "sdar-kernels[training]".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

from sdar_kernels.sdar_loss.options import LOSS_AGG_MODES

# --quick: a few steps on a small warm-up, to check that everything runs (not to measure anything)
QUICK = dict(steps=3, tasks_per_step=2, eval_instances=8, eval_every=3, warmup_steps=100, micro_batch=64)
QUICK_SEEDS = 2
# the modules of the "training" extra; a missing one gets a one-line install hint instead of a traceback
TRAINING_MODULES = ("transformers", "tokenizers", "tqdm", "matplotlib", "safetensors")
INSTALL_HINT = 'pip install "sdar-kernels[training]"'

# (flag, TrainConfig field, type, help); the default shown in --help is TrainConfig's
TRAIN_FLAGS = {
    "task (the embedded towers game)": [
        ("--floors", "floors", int, "floors per tower (1-9); success = reaching the top"),
        ("--max-turns", "max_turns", int, "turn limit per episode (default: floors + 1)"),
        ("--features", "features", int, "features a tower shows, 2 or 3 (lamp, wall, roof)"),
        ("--values", "values", int, "values per feature, 2-8 (rules = values^features x features)"),
        ("--skill-noise", "skill_noise", float, "fraction of retrieved skills that are bad, in [0, 1]"),
        ("--noise-kind", "noise_kind", str, "what a bad skill is: wrong (names a wrong door), irrelevant (a tip "
                                            "naming no door) or mixed (half each)"),
        ("--holdout", "holdout", int, "one rule in HOLDOUT is held out for evaluation"),
        ("--world-seed", "world_seed", int, "fixes which door each feature value opens"),
        ("--train-instances", "train_instances", int, "size of the pool training instances are drawn from"),
    ],
    "training": [
        ("--steps", "steps", int, "training steps (one rollout batch and its updates each)"),
        ("--tasks-per-step", "tasks_per_step", int, "instances per step (GRPO groups)"),
        ("--group-size", "group_size", int, "episodes per instance (GRPO group size)"),
        ("--lr", "lr", float, "AdamW learning rate (constant)"),
        ("--mini-batches", "mini_batches", int, "optimizer steps per rollout batch (one epoch over it)"),
        ("--micro-batch", "micro_batch", int, "samples per forward/backward (memory, not math)"),
        ("--layout", "layout", str, "released: one sample per environment step (verl-agent); concat: the "
                                    "whole trajectory as one sequence"),
        ("--history", "history", int, "past turns shown in the released layout's prompt"),
        ("--invalid-penalty", "invalid_penalty", float, "reward lost per invalid action"),
        ("--max-new-tokens", "max_new_tokens", int, "token budget of one action (no end-of-sequence within "
                                                     "it: an invalid action)"),
    ],
    "loss (defaults: the method's official values)": [
        ("--distill", "distill", str, "distillation form (default: sampled, the released one)"),
        ("--distill-coef", "distill_coef", float, "lambda, the distillation weight (default: 0.01, official)"),
        ("--gate-beta", "gate_beta", float, "gate sharpness beta (default: the method's, 5 for sdar; 0 = a "
                                            "constant gate 0.5)"),
        ("--loss-backend", "loss_backend", str, "fused: sdar_kernels.sdar_loss; eager: the plain reference"),
        ("--loss-agg-mode", "loss_agg_mode", str, "how token losses are averaged over the mini-batch of every "
                                                  "process (verl's loss_agg_mode; default: token-mean, the released one)"),
        ("--loss-scale-factor", "loss_scale_factor", float, "S of seq-mean-token-sum-norm, which divides each "
                                                            "sequence's token sum by it (required with that mode)"),
        ("--max-teacher-len", "max_teacher_len", int, "cut the teacher input to this many tokens (the skill "
                                                       "is kept, the prompt cut from the left; default: no cut)"),
    ],
    "model": [
        ("--model", "model", str, "local Hugging Face causal-LM checkpoint directory (default: the embedded "
                                  "tiny model with its warm-up)"),
        ("--cache-dir", "cache_dir", str, "where the tiny model's warm-up is cached (default: $SDAR_CACHE or "
                                          "~/.cache/sdar, with and without --quick)"),
        ("--warmup-steps", "warmup_steps", int, "supervised warm-up steps of the tiny model"),
        ("--vocab-size", "vocab_size", int, "pad the tiny model's vocabulary to this size (to measure the "
                                            "loss at scale)"),
    ],
    "evaluation": [
        ("--eval-instances", "eval_instances", int, "held-out instances per evaluation"),
        ("--eval-every", "eval_every", int, "evaluate every N steps (and at the end); 0: never"),
        ("--eval-temperature", "eval_temperature", float, "held-out sampling temperature (0: greedy)"),
        ("--save-every", "save_every", int, "also checkpoint every N steps (0: at the end only)"),
    ],
}
CHOICES = {"noise_kind": ("mixed", "wrong", "irrelevant"), "layout": ("released", "concat"),
           "distill": ("sampled", "reinforce", "fkl", "rkl", "jsd"), "loss_backend": ("fused", "eager"),
           "loss_agg_mode": LOSS_AGG_MODES}
# on/off fidelity switches: (flag, field, value when given, help)
SWITCHES = [
    ("--fused-linear", "fused_linear", True, "call sdar_kernels.linear_sdar_loss on hidden states (no logits)"),
    ("--no-shuffle", "shuffle", False, "split the rows into mini-batches in rollout order (default: shuffled)"),
    ("--no-cross-steps", "cross_steps", False, "GRPO statistics over one score per episode (default: every "
                                               "step row counts, as verl-agent)"),
    ("--penalty-per-episode", "penalty_per_step", False, "charge the invalid-action penalty to the whole "
                                                         "episode (default: to the invalid step's row)"),
    ("--no-signs", "signs", False, "towers without rule signs: the lamp always decides (an easier world; "
                                   "default: a sign per tower names the deciding feature)"),
]


def add_train_args(p: argparse.ArgumentParser):
    from .trainer import TrainConfig
    d = asdict(TrainConfig())
    run = p.add_argument_group("run")
    run.add_argument("--out", default=None, help="output directory (metrics, checkpoints, tables, plots)")
    run.add_argument("--quick", action="store_true",
                     help=f"a smoke test: {QUICK['steps']} steps, a {QUICK['warmup_steps']}-step warm-up "
                          f"(checks that everything runs; measures nothing)")
    run.add_argument("--device", default=None, help="auto (CUDA when available), cpu, cuda or cuda:N")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    for group, flags in TRAIN_FLAGS.items():
        g = p.add_argument_group(group)
        for flag, name, typ, text in flags:
            default = d[name]   # None: the text says what happens by default
            g.add_argument(flag, dest=name, type=typ, default=None, choices=CHOICES.get(name),
                           help=text if default is None else f"{text} (default: {default})")
    g = p.add_argument_group("fidelity switches")
    for flag, name, value, text in SWITCHES:
        g.add_argument(flag, dest=name, action="store_const", const=value, default=None, help=text)


def config_from_args(a, **fixed):
    from .trainer import TrainConfig, config_from_dict
    base = config_from_dict(json.loads(Path(a.config).read_text())) if getattr(a, "config", None) else TrainConfig()
    over = dict(QUICK) if a.quick else {}
    names = [n for flags in TRAIN_FLAGS.values() for _, n, _, _ in flags] + [n for _, n, _, _ in SWITCHES]
    for name in names + ["device"]:
        v = getattr(a, name, None)
        if v is not None:
            over[name] = v
    over.update({k: v for k, v in fixed.items() if v is not None})
    return replace(base, **over)


def set_threads(n):
    import torch
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def check_device(cfg):
    from .trainer import pick_device
    pick_device(cfg.device)


def cmd_train(a):
    from .distributed import from_environment
    from .trainer import pick_device, train
    set_threads(a.threads)
    cfg = config_from_args(a, method=a.method, seed=a.seed)
    # under torchrun: this process's rank in the group, left together at the end (see DataParallel.close)
    with from_environment(pick_device(cfg.device)) as dp:
        out = Path(a.out or f"runs/{cfg.method}-seed{cfg.seed}")
        out.mkdir(parents=True, exist_ok=True)
        if dp.main:
            (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        recs = train(cfg, out, resume=a.resume, progress=not a.no_progress, dp=dp,
                     log=lambda m: print(m, file=sys.stderr))
        final = [r for r in recs if "eval/success" in r]
        if final:
            print(json.dumps({"out": str(out), "step": final[-1]["step"], "eval/success": final[-1]["eval/success"],
                              "eval/teacher_success": final[-1]["eval/teacher_success"]}))
    return 0


def parse_list(text: str, name: str, typ=str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{name}: give a comma-separated list, got {text!r}")
    try:
        return [typ(x) for x in items]
    except ValueError:
        raise ValueError(f"{name}: every item must be a {typ.__name__}, got {text!r}") from None


def grid_settings(a):
    seeds = a.seeds if a.seeds is not None else (QUICK_SEEDS if a.quick else a.full_seeds)
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    jobs = a.jobs if a.jobs is not None else (1 if a.quick else max(1, min(2, os.cpu_count() or 1)))
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if a.threads_per_job < 1:
        raise ValueError(f"threads_per_job must be >= 1, got {a.threads_per_job}")
    return list(range(seeds)), jobs


def cmd_compare(a):
    from .compare import compare, make_arms
    set_threads(a.threads)
    arms = parse_list(a.methods, "methods")
    make_arms(arms)
    cfg = config_from_args(a)
    check_device(cfg)
    seeds, jobs = grid_settings(a)
    compare(cfg, arms, seeds, Path(a.out or "runs/compare"), jobs=jobs, threads_per_job=a.threads_per_job,
            progress=not a.no_progress, smoke=a.quick, fresh=a.fresh)
    return 0


def cmd_gate(a):
    from .gate_experiment import gate_experiment
    set_threads(a.threads)
    forms = parse_list(a.forms, "forms")
    noises = parse_list(a.noises, "noises", float)
    cfg = config_from_args(a, method="sdar")
    check_device(cfg)
    seeds, jobs = grid_settings(a)
    gate_experiment(cfg, forms, noises, seeds, Path(a.out or "runs/gate"), jobs=jobs,
                    threads_per_job=a.threads_per_job, progress=not a.no_progress, fresh=a.fresh)
    return 0


def add_grid_args(p, *, full_seeds: int):
    g = p.add_argument_group("runs")
    g.add_argument("--seeds", type=int, default=None,
                   help=f"number of seeds per arm, a count: seeds 0..N-1 are run (default: {full_seeds}; "
                        f"{QUICK_SEEDS} with --quick)")
    g.add_argument("--jobs", type=int, default=None,
                   help="runs in parallel, each a `python -m sdar train` subprocess (default: min(2, cores); "
                        "1 with --quick: every run in this process)")
    g.add_argument("--threads-per-job", type=int, default=1, help="torch CPU threads of each parallel run")
    g.add_argument("--fresh", action="store_true",
                   help="retrain every run (default: a run directory under --out that already holds a finished "
                        "run of the same configuration is reused, so an interrupted command continues)")
    p.set_defaults(full_seeds=full_seeds)


def build_parser() -> argparse.ArgumentParser:
    from .compare import ARMS, DEFAULT_ARMS
    from .trainer import METHODS
    p = argparse.ArgumentParser(prog="python -m sdar", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one method with one seed")
    t.add_argument("--method", default=None, choices=METHODS,
                   help="grpo (no distillation), grpo_opsd (gate_beta 0: constant gate 0.5), sdar (gate_beta 5), "
                        "opsd (no policy gradient) (default: sdar)")
    t.add_argument("--seed", type=int, default=None, help="run seed: task order and sampling (default: 0)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    t.add_argument("--config", default=None, help="JSON file of TrainConfig fields (the flags override it)")
    add_train_args(t)
    c = sub.add_parser("compare", help="arms x seeds against GRPO: CIs, paired differences, placebo")
    add_train_args(c)
    c.add_argument("--methods", default=",".join(DEFAULT_ARMS),
                   help=f"comma-separated arms from {', '.join(ARMS)}; placebo = sdar with every skill bad "
                        f"(skill noise 1.0, the same lambda) (default: %(default)s)")
    add_grid_args(c, full_seeds=10)
    g = sub.add_parser("gate", help="gated (beta 5) vs ungated (beta 0) distillation across skill noise")
    add_train_args(g)
    g.add_argument("--forms", default="reinforce,fkl",
                   help="comma-separated distill forms to test (default: %(default)s)")
    g.add_argument("--noises", default="0,0.5,0.9",
                   help="comma-separated skill-noise levels, at least two (default: %(default)s)")
    add_grid_args(g, full_seeds=6)
    return p


def main(argv=None):
    try:
        p = build_parser()
        a = p.parse_args(argv)
        return {"train": cmd_train, "compare": cmd_compare, "gate": cmd_gate}[a.cmd](a)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in TRAINING_MODULES:
            print(f"python -m sdar: the training extra is not installed (no module {e.name!r}): {INSTALL_HINT}",
                  file=sys.stderr)
            return 1
        raise
    except ValueError as e:
        print(f"python -m sdar: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
