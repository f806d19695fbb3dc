"""``python -m sdar compare``: train methods x seeds, evaluate on held-out instances, table + plot."""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from .trainer import TrainConfig

PLOT_KEYS = (("gate_mean", "gate mean"), ("gate_active_ratio", "gate-active ratio (gate > 0.5)"),
             ("gap_mean", "gap mean (log p_T - log p_S)"))


def read_metrics(path) -> list:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def run_one(cfg: TrainConfig, method: str, seed: int, out: Path, threads: int, in_process=False) -> dict:
    """Train one (method, seed) into ``out/<method>-seed<seed>``: in this process, or as a subprocess
    (``python -m sdar train``) so that several runs use the cores in parallel. A distill_coef override
    applies to the distilling methods only (GRPO stays GRPO)."""
    if method == "grpo":
        cfg = replace(cfg, distill_coef=None)
    run_dir = out / f"{method}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if in_process:
        from .trainer import train
        t0 = time.perf_counter()
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        train(replace(cfg, method=method, seed=seed), run_dir, progress=False, log=lambda m: None)
        return {"method": method, "seed": seed, "dir": run_dir, "wall_s": time.perf_counter() - t0,
                "metrics": read_metrics(run_dir / "metrics.jsonl")}
    base = run_dir / "base_config.json"
    base.write_text(json.dumps(asdict(replace(cfg, method=method, seed=seed)), indent=1))
    cmd = [sys.executable, "-m", "sdar", "train", "--config", str(base), "--method", method, "--seed", str(seed),
           "--out", str(run_dir), "--threads", str(threads), "--no-progress"]
    t0 = time.perf_counter()
    with open(run_dir / "log.txt", "w") as logf:
        rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"run {method} seed {seed} failed (exit {rc}); see {run_dir / 'log.txt'}")
    return {"method": method, "seed": seed, "dir": run_dir, "wall_s": time.perf_counter() - t0,
            "metrics": read_metrics(run_dir / "metrics.jsonl")}


def summarize(runs, methods) -> dict:
    out = {}
    for m in methods:
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        finals, teach, train_last = [], [], []
        for r in rs:
            ev = [x for x in r["metrics"] if "eval/success" in x]
            finals.append(ev[-1]["eval/success"] if ev else float("nan"))
            tv = [x["eval/teacher_success"] for x in r["metrics"] if "eval/teacher_success" in x]
            teach.append(tv[-1] if tv else float("nan"))
            tr = [x["success"] for x in r["metrics"] if "success" in x]
            train_last.append(statistics.fmean(tr[-5:]) if tr else float("nan"))
        start = [x["eval/success"] for r in rs for x in r["metrics"][:1] if x.get("step") == 0]
        out[m] = {
            "final": finals, "mean": statistics.fmean(finals),
            "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "train_last5": statistics.fmean(train_last), "teacher_final": statistics.fmean(teach),
            "start": statistics.fmean(start) if start else float("nan"),
            "wall_s": statistics.fmean(r["wall_s"] for r in rs),
        }
    return out


def write_table(summary, cfg: TrainConfig, n_seeds: int, command: str, path: Path):
    how = "greedy" if cfg.eval_temperature == 0 else f"sampled at T={cfg.eval_temperature}"
    lines = [
        f"Held-out success ({cfg.eval_instances} eval instances, {how}) after {cfg.steps} steps, "
        f"{n_seeds} seed(s); mean +- std over seeds (sample std).",
        "",
        "| method | final held-out success | per seed | start (step 0) | train success, last 5 steps "
        "| teacher success (with skill) | wall s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, s in summary.items():
        per = ", ".join(f"{v:.3f}" for v in s["final"])
        lines.append(f"| {m} | {s['mean']:.3f} +- {s['std']:.3f} | {per} | {s['start']:.3f} | "
                     f"{s['train_last5']:.3f} | {s['teacher_final']:.3f} | {s['wall_s']:.0f} |")
    lines += ["", f"Command: `{command}`", "",
              "Config: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()
                                     if k not in ("method", "seed", "cache_dir", "device"))]
    path.write_text("\n".join(lines) + "\n")


def _mean_curve(runs, key):
    by_step = {}
    for r in runs:
        for x in r["metrics"]:
            if key in x:
                by_step.setdefault(x["step"], []).append(x[key])
    steps = sorted(by_step)
    mean = [statistics.fmean(by_step[s]) for s in steps]
    std = [statistics.pstdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
    return steps, mean, std


def _smooth(y, k=3):
    return [statistics.fmean(y[max(0, i - k + 1): i + 1]) for i in range(len(y))]


def write_plot(runs, methods, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        s, mu, sd = _mean_curve(rs, "eval/success")
        line = ax.plot(s, mu, marker="o", ms=3, label=f"{m} held-out")[0]
        ax.fill_between(s, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)],
                        color=line.get_color(), alpha=0.15)
        s2, mu2, _ = _mean_curve(rs, "success")
        ax.plot(s2, _smooth(mu2), ls="--", lw=1, color=line.get_color(), label=f"{m} train (smoothed)")
    ax.set(title="success rate", xlabel="step", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    for ax, (key, name) in zip([axes[0][1], axes[1][0], axes[1][1]], PLOT_KEYS):
        for m in methods:
            s, mu, _ = _mean_curve([r for r in runs if r["method"] == m], key)
            ax.plot(s, _smooth(mu), label=m)
        ax.set(title=name, xlabel="step")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(cfg: TrainConfig, methods, seeds: int, out, *, jobs=2, threads_per_job=1, progress=True,
            command=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.model is None:  # build the warm-up once, here, so parallel runs never race on the cache
        from .models import ensure_tiny
        path = ensure_tiny(cfg.tiny_config(), cfg.env_config(), cfg.history, cfg.cache_dir,
                           log=lambda m: print(m, file=sys.stderr))
        cfg = replace(cfg, cache_dir=str(path.parent))
    todo = [(m, s) for m in methods for s in range(seeds)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc="compare runs", dynamic_ncols=True)
    runs = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = [pool.submit(run_one, cfg, m, s, out, threads_per_job, jobs <= 1) for m, s in todo]
        for f in futs:
            r = f.result()
            runs.append(r)
            if bar is not None:
                ev = [x for x in r["metrics"] if "eval/success" in x]
                bar.update(1)
                bar.set_postfix(last=f"{r['method']}/{r['seed']}", success=f"{ev[-1]['eval/success']:.2f}")
    if bar is not None:
        bar.close()
    summary = summarize(runs, methods)
    command = command or "python -m sdar " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_table(summary, cfg, seeds, command, out / "results.md")
    write_plot(runs, methods, out / "results.png",
               f"towers, skill_noise={cfg.skill_noise}, {cfg.steps} steps x {cfg.tasks_per_step} tasks x "
               f"{cfg.group_size}, {seeds} seed(s), layout={cfg.layout}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print((out / "results.md").read_text())
    return summary
