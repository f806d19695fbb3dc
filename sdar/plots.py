"""Plots of ``compare`` and ``gate``: curves with bootstrap bands, paired differences with intervals.

Every band and error bar is the same statistic as the tables: the 95% percentile-bootstrap interval of
the mean over seeds (:mod:`sdar.stats`). Every panel has a y-axis label; steps are integer ticks.
"""

from __future__ import annotations

from pathlib import Path

from .stats import bootstrap_ci, summarize


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    return plt, MaxNLocator


def mean_curve(runs, key: str):
    """(steps, mean, lo, hi) of ``key`` over runs, at the steps every run logged it."""
    per_run = [dict(zip(*r.evals(key))) for r in runs]
    steps = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    mean, lo, hi = [], [], []
    for s in steps:
        s_ = summarize([d[s] for d in per_run])
        mean.append(s_["mean"])
        lo.append(s_["lo"])
        hi.append(s_["hi"])
    return steps, mean, lo, hi


def _error_bars(ax, xs, stats, **kw):
    """Points at the means of ``stats`` (summaries with mean / lo / hi) with their intervals."""
    mean = [x["mean"] for x in stats]
    err = [[m - x["lo"] for x, m in zip(stats, mean)], [x["hi"] - m for x, m in zip(stats, mean)]]
    ax.errorbar(xs, mean, yerr=err, capsize=4, **kw)


def _finish(fig, axes, title, path):
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _band(ax, steps, mean, lo, hi, label, **kw):
    line = ax.plot(steps, mean, marker="o", ms=2.5, lw=1.4, label=label, **kw)[0]
    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    return line


def plot_comparison(runs, summary, path: Path, title: str, baseline: str):
    """Four panels: held-out success, teacher success (with the skill), the paired held-out difference
    against ``baseline`` per step, and the AUC / final differences with their intervals."""
    plt, MaxNLocator = _pyplot()
    arms = list(summary)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (a0, a1), (a2, a3) = axes
    for arm in arms:
        rs = [r for r in runs if r.arm == arm]
        _band(a0, *mean_curve(rs, "eval/success"), arm)
        _band(a1, *mean_curve(rs, "eval/teacher_success"), arm)
    a0.set(title="held-out success (student, no skill)", xlabel="step", ylabel="success rate", ylim=(-0.02, 1.02))
    a1.set(title="teacher success (same weights + retrieved skill)", xlabel="step", ylabel="success rate",
           ylim=(-0.02, 1.02))
    base_runs = {r.seed: dict(zip(*r.evals())) for r in runs if r.arm == baseline}
    a2.axhline(0, color="k", lw=0.8)
    for arm in arms:
        if arm == baseline:
            a2.plot([], [])   # keep each arm's colour the same in every panel
            continue
        diffs = {}
        for r in runs:
            if r.arm == arm and r.seed in base_runs:
                for s, v in zip(*r.evals()):
                    if s in base_runs[r.seed]:
                        diffs.setdefault(s, []).append(v - base_runs[r.seed][s])
        steps = sorted(diffs)
        cis = [bootstrap_ci(diffs[s]) for s in steps]
        mean = [sum(diffs[s]) / len(diffs[s]) for s in steps]
        _band(a2, steps, mean, [c[0] for c in cis], [c[1] for c in cis], f"{arm} - {baseline}")
    a2.set(title=f"paired held-out difference vs {baseline} (same seed)", xlabel="step",
           ylabel="success difference")
    others = [a for a in arms if "d_auc" in summary[a]]
    for i, key in enumerate(("d_auc", "d_final")):
        _error_bars(a3, [j + (i - 0.5) * 0.3 for j in range(len(others))], [summary[a][key] for a in others],
                    fmt="o", label="AUC" if key == "d_auc" else "final")
    a3.axhline(0, color="k", lw=0.8)
    a3.set_xticks(range(len(others)), [f"{a} - {baseline}" for a in others], fontsize=8)
    a3.set(title="paired differences, mean over seeds and 95% bootstrap CI", ylabel="success difference")
    for ax in (a0, a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(fig, (a0, a1, a2, a3), title, path)
    plt.close(fig)


def plot_gate(summary, path: Path, title: str):
    """Gated-minus-ungated AUC and final success against the skill noise, one line per distill form,
    with 95% bootstrap intervals of the paired (same-seed) difference."""
    plt, _ = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "d_auc", "AUC"), (axes[1], "d_final", "final held-out success")):
        for k, (form, rows) in enumerate(summary.items()):
            noises = sorted(rows)
            _error_bars(ax, [n + (k - 0.5) * 0.012 for n in noises], [rows[n][key] for n in noises],
                        fmt="o-", label=form)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(title=f"gated (beta 5) - ungated (beta 0): {name}", xlabel="skill noise (fraction of bad skills)",
               ylabel="success difference")
    _finish(fig, axes, title, path)
    plt.close(fig)
