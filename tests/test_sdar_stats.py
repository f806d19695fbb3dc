"""Comparison statistics on known data: curve areas, bootstrap intervals, paired differences, the compare
and gate summaries, and their plots (on synthetic runs, no training)."""

import math
import random
from pathlib import Path

import pytest

from sdar.compare import summarize_arms, write_table
from sdar.gate_experiment import arm_name, summarize_gate
from sdar.plots import plot_comparison, plot_gate
from sdar.runs import Run
from sdar.stats import bootstrap_ci, curve_area, excludes_zero, fmt_diff, paired_difference, summarize
from sdar.trainer import TrainConfig


def test_curve_area_is_the_average_over_training():
    assert curve_area([0, 5, 10], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert curve_area([10, 0, 5], [1.0, 0.0, 1.0]) == pytest.approx(0.75)      # order does not matter
    assert curve_area([0, 10], [0.2, 0.6]) == pytest.approx(0.4)
    assert curve_area([3], [0.5]) == 0.5
    with pytest.raises(ValueError, match="no points"):
        curve_area([], [])


def test_bootstrap_of_two_points_is_the_exact_distribution():
    # resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5%
    # quantiles are 0 and 1
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    assert bootstrap_ci([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    assert all(math.isnan(x) for x in bootstrap_ci([]))


def test_bootstrap_width_matches_the_normal_theory():
    # n = 400 draws of N(0, 1): the 95% interval of the mean is about mean +- 1.96 / 20
    rng = random.Random(1)
    xs = [rng.gauss(0.0, 1.0) for _ in range(400)]
    lo, hi = bootstrap_ci(xs)
    mean = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = 1.96 * sd / 20
    assert lo < mean < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (mean - lo) == pytest.approx(hi - mean, rel=0.25)      # symmetric for symmetric data
    assert bootstrap_ci(xs) == (lo, hi)                          # fixed seed: reproducible


def test_bootstrap_coverage_on_repeated_experiments():
    # 200 experiments of 12 Bernoulli(0.5) seeds: the interval holds 0.5 in most of them (percentile
    # intervals under-cover a little at n = 12; far below 80% would mean a broken interval)
    rng = random.Random(2)
    hits = sum(lo <= 0.5 <= hi for lo, hi in (bootstrap_ci([float(rng.random() < 0.5) for _ in range(12)],
                                                           n_boot=2000, seed=k) for k in range(200)))
    assert 0.85 <= hits / 200 <= 0.99


def test_paired_differences_remove_what_seeds_share():
    base = [0.1, 0.5, 0.9, 0.3, 0.7]
    arm = [b + 0.05 for b in base]          # the same seeds, a constant improvement
    d = paired_difference(arm, base)
    assert d["mean"] == pytest.approx(0.05) and d["lo"] == pytest.approx(0.05) and d["hi"] == pytest.approx(0.05)
    assert excludes_zero(d) and fmt_diff(d).endswith("*")
    unpaired = summarize(arm)
    assert unpaired["hi"] - unpaired["lo"] > 0.3             # unpaired, the seed spread hides it
    same = paired_difference(base, base)
    assert (same["lo"], same["hi"]) == (0.0, 0.0) and not excludes_zero(same)
    with pytest.raises(ValueError, match="paired_difference"):
        paired_difference([1.0], [1.0, 2.0])


def synthetic_runs(arms, seeds, level, slope=0.0):
    """Runs whose held-out curve rises linearly to ``level[arm] + seed effect``."""
    runs = []
    for a in arms:
        for s in seeds:
            end = level[a] + 0.05 * s + slope * s * (a != arms[0])
            ms = [{"step": t, "eval/success": end * t / 20, "eval/teacher_success": 0.8} for t in range(0, 21, 5)]
            runs.append(Run(a, s, Path("."), 1.0, ms))
    return runs


def test_compare_summary_table_and_plot(tmp_path):
    arms = ["grpo", "sdar", "placebo"]
    runs = synthetic_runs(arms, range(4), {"grpo": 0.4, "sdar": 0.5, "placebo": 0.4})
    s = summarize_arms(runs, arms)
    assert s["grpo"]["final"]["mean"] == pytest.approx(0.4 + 0.05 * 1.5)
    assert s["sdar"]["auc"]["mean"] == pytest.approx(s["sdar"]["final"]["mean"] / 2)    # a linear ramp
    assert s["sdar"]["d_final"]["mean"] == pytest.approx(0.1) and excludes_zero(s["sdar"]["d_final"])
    assert s["placebo"]["d_auc"]["mean"] == pytest.approx(0.0) and "d_auc" not in s["grpo"]
    write_table(s, TrainConfig(steps=20), "python -m sdar compare", tmp_path / "t.md")
    table = (tmp_path / "t.md").read_text()
    assert "| sdar |" in table and "+0.100 [+0.100, +0.100] *" in table
    plot_comparison(runs, s, tmp_path / "p.png", "synthetic", baseline="grpo")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_gate_summary_trend_and_plot(tmp_path):
    # gated - ungated = 0 at noise 0 and 0.1 per seed at noise 0.9: a trend of +0.1 (final)
    runs = []
    for form in ("reinforce",):
        for noise, gain in ((0.0, 0.0), (0.9, 0.1)):
            for beta in (0.0, 5.0):
                for seed in range(3):
                    end = 0.5 + 0.1 * seed + (gain if beta else 0.0)
                    ms = [{"step": t, "eval/success": end, "eval/teacher_success": 0.5} for t in (0, 10)]
                    runs.append(Run(arm_name(form, beta, noise), seed, Path("."), 1.0, ms))
    s = summarize_gate(runs, ["reinforce"], [0.0, 0.9])
    assert s["cells"]["reinforce"][0.9]["d_final"]["mean"] == pytest.approx(0.1)
    assert s["cells"]["reinforce"][0.0]["d_final"]["mean"] == pytest.approx(0.0)
    assert s["trend"]["reinforce"]["final"]["mean"] == pytest.approx(0.1)
    plot_gate(s["cells"], tmp_path / "g.png", "synthetic")
    assert (tmp_path / "g.png").stat().st_size > 10_000


def test_grid_reuses_finished_runs_of_the_same_config(tmp_path, monkeypatch):
    """An interrupted grid continues: a finished run of the same config is read, not retrained; a run that
    stopped early, or one trained with another config, is trained again; ``fresh`` retrains everything."""
    import json
    from dataclasses import asdict, replace

    import sdar.runs as runs_mod
    import sdar.trainer as trainer_mod

    trained = []

    def fake_train(cfg, run_dir, progress=False, log=None):
        trained.append((cfg.seed, cfg.lr))
        lines = [{"step": t, "eval/success": 0.5} for t in range(0, cfg.steps + 1, 5)]
        (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    monkeypatch.setattr(trainer_mod, "train", fake_train)
    monkeypatch.setattr(runs_mod, "prepare_warmup", lambda cfg, log=None: None)
    base = TrainConfig(steps=10)
    arms = [runs_mod.Arm("grpo", {"method": "grpo"})]
    first = runs_mod.run_grid(base, arms, [0, 1], tmp_path, jobs=1, progress=False)
    assert trained == [(0, base.lr), (1, base.lr)] and [r.metrics[-1]["step"] for r in first] == [10, 10]

    # seed 1 stopped at step 5: only it is trained again
    m1 = tmp_path / "grpo-seed1" / "metrics.jsonl"
    m1.write_text("".join(m1.read_text().splitlines(keepends=True)[:2]))
    trained.clear()
    again = runs_mod.run_grid(base, arms, [0, 1], tmp_path, jobs=1, progress=False)
    assert trained == [(1, base.lr)] and again[0].metrics == first[0].metrics

    # another configuration (lr) in the same directories: retrained, and so is everything under fresh
    trained.clear()
    runs_mod.run_grid(replace(base, lr=2 * base.lr), arms, [0], tmp_path, jobs=1, progress=False)
    assert trained == [(0, 2 * base.lr)]
    assert json.loads((tmp_path / "grpo-seed0" / "base_config.json").read_text()) == \
        json.loads(json.dumps(asdict(replace(base, lr=2 * base.lr, method="grpo", seed=0))))
    trained.clear()
    runs_mod.run_grid(base, arms, [0, 1], tmp_path, jobs=1, progress=False, fresh=True)
    assert trained == [(0, base.lr), (1, base.lr)]
