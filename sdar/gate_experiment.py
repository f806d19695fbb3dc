"""``python -m sdar gate``: does the gate protect against bad skills? Gated vs ungated across skill noise.

The claim under test: the sigmoid gate (gate_beta 5) discounts the teacher where it rejects the
student's token, so with more wrong skills the gated loss should lose less than the ungated one
(gate_beta 0, a constant 0.5): the gated-minus-ungated difference should *grow* with the noise.

In the released ``sampled`` form the ungated gradient is -0.5 * lambda * grad log p(y), whatever the
teacher says, so there the gate can only add the teacher's preferences, never remove harm; the test is
therefore run where a teacher's rejection pushes probability *down*: ``reinforce`` (the gated REINFORCE
form, d/dlogp = -gate * gap) and ``fkl`` (full-vocabulary forward KL, live teacher logits from the
pre-update weights). Grid: forms x gate_beta {0, 5} x skill noise levels x seeds, every cell paired by
seed. Per (form, noise): the mean AUC / final held-out success of each beta with 95% bootstrap CIs and
the paired difference beta 5 - beta 0; per form, the *trend*: that difference at the highest noise
minus at the lowest, paired by seed, with its CI. The claim predicts a positive trend.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from .compare import run_scores
from .runs import Arm, run_grid
from .stats import fmt_ci, fmt_diff, paired_difference, summarize
from .trainer import TrainConfig

BETAS = (0.0, 5.0)


def arm_name(form: str, beta: float, noise: float) -> str:
    return f"{form}-beta{beta:g}-noise{noise:g}"


def make_arms(forms, noises) -> list:
    return [Arm(arm_name(f, b, n), {"method": "sdar", "distill": f, "gate_beta": b, "skill_noise": n})
            for f in forms for n in noises for b in BETAS]


def summarize_gate(runs, forms, noises) -> dict:
    """{form: {noise: {"beta0", "beta5": auc/final summaries, "d_auc", "d_final": paired beta5 - beta0}},
    and {form: {"trend_auc", "trend_final"}} under key "trend"."""
    scores = {}
    for r in runs:
        scores.setdefault(r.arm, {})[r.seed] = run_scores(r)
    out, trend = {}, {}
    for f in forms:
        out[f] = {}
        for n in noises:
            lo, hi = scores[arm_name(f, BETAS[0], n)], scores[arm_name(f, BETAS[1], n)]
            seeds = sorted(set(lo) & set(hi))
            cell = {}
            for k in ("auc", "final"):
                a, b = [lo[s][k] for s in seeds], [hi[s][k] for s in seeds]
                cell["beta0_" + k], cell["beta5_" + k] = summarize(a), summarize(b)
                cell["d_" + k] = paired_difference(b, a)
                cell["per_seed_d_" + k] = dict(zip(seeds, [y - x for x, y in zip(a, b)]))
            cell["teacher_final_beta0"] = summarize([lo[s]["teacher_final"] for s in seeds])["mean"]
            cell["teacher_final_beta5"] = summarize([hi[s]["teacher_final"] for s in seeds])["mean"]
            out[f][n] = cell
        n0, n1 = min(noises), max(noises)
        trend[f] = {}
        for k in ("auc", "final"):
            d0, d1 = out[f][n0]["per_seed_d_" + k], out[f][n1]["per_seed_d_" + k]
            seeds = sorted(set(d0) & set(d1))
            trend[f][k] = paired_difference([d1[s] for s in seeds], [d0[s] for s in seeds])
    return {"cells": out, "trend": trend}


def write_table(summary, cfg: TrainConfig, n_seeds: int, command: str, path: Path):
    noise_kind = cfg.noise_kind
    lines = [
        f"Gate experiment: distill_coef {cfg.distill_coef}, {cfg.steps} steps, {n_seeds} seeds per cell, "
        f"bad skills of kind '{noise_kind}'. AUC = area under the held-out success curve / steps. "
        "Mean over seeds [95% bootstrap CI]; differences paired by seed; * = the interval excludes 0.",
        "",
        "| form | skill noise | AUC, beta 0 | AUC, beta 5 | AUC: beta 5 - beta 0 | final: beta 5 - beta 0 "
        "| teacher final (beta 0 / 5) |",
        "|---|---|---|---|---|---|---|",
    ]
    for f, rows in summary["cells"].items():
        for n, c in sorted(rows.items()):
            lines.append(f"| {f} | {n:g} | {fmt_ci(c['beta0_auc'])} | {fmt_ci(c['beta5_auc'])} | "
                         f"{fmt_diff(c['d_auc'])} | {fmt_diff(c['d_final'])} | "
                         f"{c['teacher_final_beta0']:.3f} / {c['teacher_final_beta5']:.3f} |")
    noises = sorted(next(iter(summary["cells"].values())))
    lines += ["", f"Trend (the gated-minus-ungated difference at noise {noises[-1]:g} minus at noise "
                  f"{noises[0]:g}, paired by seed; the claim predicts > 0):", "",
              "| form | AUC trend | final trend |", "|---|---|---|"]
    for f, t in summary["trend"].items():
        lines.append(f"| {f} | {fmt_diff(t['auc'])} | {fmt_diff(t['final'])} |")
    lines += ["", f"Command: `{command}`", "",
              "Config: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()
                                     if k not in ("method", "seed", "cache_dir", "device", "distill",
                                                  "gate_beta", "skill_noise"))]
    path.write_text("\n".join(lines) + "\n")


def gate_experiment(cfg: TrainConfig, forms, noises, seeds, out, *, jobs=2, threads_per_job=1, progress=True,
                    command=None, fresh=False) -> dict:
    out = Path(out)
    noises = sorted(set(noises))
    if len(noises) < 2:
        raise ValueError(f"noises: the experiment needs at least two noise levels, got {noises}")
    for f in forms:
        if f not in ("sampled", "reinforce", "fkl", "rkl", "jsd"):
            raise ValueError(f"forms: unknown distill form {f!r}")
    command = command or "python -m sdar " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    runs = run_grid(cfg, make_arms(forms, noises), list(seeds), out, jobs=jobs, threads=threads_per_job,
                    progress=progress, log=lambda m: print(m, file=sys.stderr), fresh=fresh)
    summary = summarize_gate(runs, forms, noises)
    write_table(summary, cfg, len(seeds), command, out / "results.md")
    from .plots import plot_gate
    plot_gate(summary["cells"], out / "results.png",
              f"gate experiment: lambda {cfg.distill_coef}, {cfg.steps} steps, {len(seeds)} seeds, "
              f"bad skills '{cfg.noise_kind}'")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print((out / "results.md").read_text())
    return summary
