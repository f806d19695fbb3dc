"""``python -m sdar compare``: arms x seeds on the towers task, a powered comparison against GRPO.

Per run: the held-out success curve (evaluated every ``eval_every`` steps), its area divided by the step
range (``auc``: the average held-out success over training) and the final held-out success. Per arm:
the mean over seeds with a 95% percentile-bootstrap interval, and the *paired* difference against the
baseline arm (GRPO) at the same seed, with its own interval. An interval that excludes 0 is starred.
The ``placebo`` arm (SDAR with every retrieved skill bad, the same lambda) is the noise floor: what the
distillation term does when the teacher knows nothing.

``--quick`` is a smoke test (a few steps, two seeds): it checks that every arm runs end to end and
prints what each run reached, with no table of means and no ranking, since a few steps cannot separate
the methods.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from .runs import Arm, run_grid
from .stats import curve_area, fmt_ci, fmt_diff, paired_difference, summarize
from .trainer import METHODS, TrainConfig

ARMS = {m: {"method": m} for m in METHODS}
ARMS["placebo"] = {"method": "sdar", "skill_noise": 1.0}
DEFAULT_ARMS = ("grpo", "grpo_opsd", "sdar", "placebo")
BASELINE = "grpo"


def make_arms(names) -> list:
    arms = []
    for n in names:
        if n not in ARMS:
            raise ValueError(f"methods: unknown arm {n!r}; choose from {tuple(ARMS)}")
        arms.append(Arm(n, ARMS[n]))
    return arms


def run_scores(run) -> dict:
    steps, values = run.evals()
    _, teacher = run.evals("eval/teacher_success")
    return {"auc": curve_area(steps, values), "final": values[-1], "start": values[0],
            "teacher_final": teacher[-1] if teacher else float("nan"), "wall_s": run.wall_s}


def summarize_arms(runs, arm_names, baseline=BASELINE) -> dict:
    """{arm: {"seeds", per-seed "scores", "auc"/"final"/"teacher_final" summaries, paired "d_auc" /
    "d_final" against ``baseline`` when it ran with the same seeds}}."""
    by_arm = {a: sorted((r for r in runs if r.arm == a), key=lambda r: r.seed) for a in arm_names}
    scores = {a: [run_scores(r) for r in rs] for a, rs in by_arm.items()}
    out = {}
    for a, rs in by_arm.items():
        sc = scores[a]
        s = {"seeds": [r.seed for r in rs], "scores": sc,
             **{k: summarize([x[k] for x in sc]) for k in ("auc", "final", "start", "teacher_final", "wall_s")}}
        base = by_arm.get(baseline)
        if a != baseline and base and [r.seed for r in base] == s["seeds"]:
            for k in ("auc", "final"):
                s[f"d_{k}"] = paired_difference([x[k] for x in sc], [x[k] for x in scores[baseline]])
        out[a] = s
    return out


def write_table(summary, cfg: TrainConfig, command: str, path: Path, baseline=BASELINE):
    n = max(s["auc"]["n"] for s in summary.values())
    how = "greedy" if cfg.eval_temperature == 0 else f"sampled at T = {cfg.eval_temperature}"
    lines = [
        f"Held-out success on {cfg.eval_instances} eval instances (rules never trained on; {how}), "
        f"evaluated every {cfg.eval_every} steps over {cfg.steps} steps, {n} seeds per arm. "
        "AUC = area under the held-out curve / steps (the average held-out success over training). "
        f"Mean over seeds [95% bootstrap CI of the mean]; the differences are paired by seed against "
        f"{baseline}; * = the interval excludes 0.",
        "",
        f"| arm | AUC | final | AUC - {baseline} | final - {baseline} | teacher final | start | wall s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a, s in summary.items():
        d_auc = fmt_diff(s["d_auc"]) if "d_auc" in s else "-"
        d_fin = fmt_diff(s["d_final"]) if "d_final" in s else "-"
        lines.append(f"| {a} | {fmt_ci(s['auc'])} | {fmt_ci(s['final'])} | {d_auc} | {d_fin} | "
                     f"{s['teacher_final']['mean']:.3f} | {s['start']['mean']:.3f} | {s['wall_s']['mean']:.0f} |")
    lines += ["", "Per seed (AUC / final):", ""]
    for a, s in summary.items():
        per = ", ".join(f"{x['auc']:.2f}/{x['final']:.2f}" for x in s["scores"])
        lines.append(f"- {a}: {per}")
    lines += ["", f"Command: `{command}`", "",
              "Config: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()
                                     if k not in ("method", "seed", "cache_dir", "device"))]
    path.write_text("\n".join(lines) + "\n")


def write_smoke(runs, cfg: TrainConfig, command: str, path: Path):
    lines = [f"SMOKE TEST ({cfg.steps} steps): every arm ran end to end. This is not a comparison: a few "
             "steps cannot separate the methods, so there is no table of means and no ranking. The full "
             "comparison is `python -m sdar compare` without --quick (see sdar/README.md).", ""]
    for r in runs:
        _, ev = r.evals()
        lines.append(f"- {r.arm} seed {r.seed}: held-out success {ev[0]:.3f} -> {ev[-1]:.3f}, "
                     f"{len(r.metrics)} records, {r.wall_s:.0f} s")
    lines += ["", f"Command: `{command}`"]
    path.write_text("\n".join(lines) + "\n")


def compare(cfg: TrainConfig, arm_names, seeds, out, *, jobs=2, threads_per_job=1, progress=True,
            smoke=False, command=None, fresh=False) -> dict:
    out = Path(out)
    arms = make_arms(arm_names)
    command = command or "python -m sdar " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    runs = run_grid(cfg, arms, list(seeds), out, jobs=jobs, threads=threads_per_job, progress=progress,
                    log=lambda m: print(m, file=sys.stderr), fresh=fresh)
    if smoke:
        write_smoke(runs, cfg, command, out / "smoke.md")
        print((out / "smoke.md").read_text())
        return {}
    summary = summarize_arms(runs, [a.name for a in arms])
    write_table(summary, cfg, command, out / "results.md")
    from .plots import plot_comparison
    plot_comparison(runs, summary, out / "results.png",
                    f"towers: {cfg.features} features x {cfg.values} values, {cfg.floors} floors, "
                    f"skill_noise {cfg.skill_noise}; {cfg.steps} steps x {cfg.tasks_per_step} tasks x "
                    f"{cfg.group_size}; {len(seeds)} seeds per arm", baseline=BASELINE)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print((out / "results.md").read_text())
    return summary
