"""Step time and peak memory of the loss backends in the same training loop.

``python -m sdar.measure [--vocab-size V] [--steps N] [--backends fused,eager,fused-linear]`` runs the
loop once per backend, each in a fresh process, and prints a markdown table: the median time of the
update phase (forward, loss, backward, optimizer; old / teacher / reference log-probs included) and of
the whole step, and the peak resident memory of the update phase above the memory held before it.
The peak is read from ``/proc/self/status`` (VmHWM) after resetting it through
``/proc/self/clear_refs`` just before the update (Linux); on CUDA, ``torch.cuda.max_memory_allocated``
after a reset. The first step is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch

BACKENDS = {"fused": dict(loss_backend="fused"), "eager": dict(loss_backend="eager"),
            "fused-linear": dict(loss_backend="fused", fused_linear=True)}


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args):
    from .models import ensure_tiny
    from .towers import Towers
    from .trainer import Trainer, TrainConfig

    torch.set_num_threads(args.threads)
    cfg = replace(TrainConfig(), method="sdar", steps=args.steps, eval_every=0, warmup_steps=args.warmup_steps,
                  vocab_size=args.vocab_size, cache_dir=args.cache_dir, tasks_per_step=args.tasks_per_step,
                  micro_batch=args.micro_batch, **BACKENDS[args.child])
    ensure_tiny(cfg.tiny_config(), Towers(cfg.towers_config()), cfg.history, cfg.cache_dir)
    t = Trainer(cfg, args.out + "/" + args.child, progress=False, log=lambda m: None)
    upd, step, extra, tokens = [], [], [], []
    cuda = t.device.type == "cuda"
    for _ in range(args.steps):
        t0 = time.perf_counter()
        samples, adv, _ = t.collect()
        base = _status_kb("VmRSS")
        ok = _reset_peak()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 1024
        t1 = time.perf_counter()
        m = t.update(samples, adv)
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated() / 1024 if cuda else (_status_kb("VmHWM") if ok else float("nan"))
        upd.append(t2 - t1)
        step.append(t2 - t0)
        extra.append((peak - base) / 1024)
        tokens.append(m["tokens"])
    keep = slice(1, None) if args.steps > 1 else slice(None)
    print(json.dumps({"backend": args.child, "update_s": statistics.median(upd[keep]),
                      "step_s": statistics.median(step[keep]), "update_peak_extra_mb": max(extra[keep]),
                      "tokens": statistics.median(tokens[keep]), "vocab": t.model.config.vocab_size,
                      "device": str(t.device), "threads": torch.get_num_threads()}))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sdar.measure", description=__doc__)
    p.add_argument("--backends", default="fused,eager,fused-linear")
    p.add_argument("--vocab-size", type=int, default=0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tasks-per-step", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=128)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="runs/measure")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    names = [b.strip() for b in a.backends.split(",") if b.strip()]
    for b in names:
        if b not in BACKENDS:
            p.error(f"backends: unknown backend {b!r}; choose from {tuple(BACKENDS)}")
    if a.steps < 1:
        p.error(f"steps must be >= 1, got {a.steps}")
    rows = []
    for b in names:
        cmd = [sys.executable, "-m", "sdar.measure", "--child", b] + [
            x for k, v in vars(a).items() if k not in ("child", "backends") and v is not None
            for x in (f"--{k.replace('_', '-')}", str(v))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    r0 = rows[0]
    print(f"device {r0['device']}, {r0['threads']} threads, vocab {r0['vocab']}, ~{r0['tokens']:.0f} loss "
          f"tokens per step, median over {max(a.steps - 1, 1)} steps\n")
    print("| loss backend | update s | step s | update peak memory above its start, MB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['update_s']:.3f} | {r['step_s']:.3f} | {r['update_peak_extra_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
