"""Statistics for comparing training runs over seeds: curve areas, bootstrap confidence intervals.

Every interval here is a percentile bootstrap of the *mean over seeds* (resampling seeds with
replacement, ``n_boot`` resamples from a fixed-seed generator, so a table is reproducible). Paired
differences resample the per-seed differences (arm minus baseline at the same seed: the same task
sequence, the same sampling seed, the same start model), which removes what the seeds share.
"""

from __future__ import annotations

import math
import random
import statistics

LEVEL = 0.95
N_BOOT = 10_000


def curve_area(steps, values) -> float:
    """Area under a curve sampled at ``steps`` (trapezoids), divided by the step range: the average
    value over training. A single point is its own value."""
    pts = sorted(zip(steps, values))
    if not pts:
        raise ValueError("curve_area: no points")
    if len(pts) == 1 or pts[-1][0] == pts[0][0]:
        return float(pts[-1][1])
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])


def bootstrap_ci(values, *, level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> tuple:
    """Percentile bootstrap interval (lo, hi) of the mean of ``values``; (v, v) for a single value,
    (nan, nan) for none or for non-finite values."""
    xs = [float(v) for v in values]
    if not xs or not all(math.isfinite(x) for x in xs):
        return float("nan"), float("nan")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if len(xs) == 1:
        return xs[0], xs[0]
    rng = random.Random(seed)
    n = len(xs)
    means = sorted(sum(rng.choices(xs, k=n)) / n for _ in range(n_boot))
    alpha = (1 - level) / 2
    return _quantile(means, alpha), _quantile(means, 1 - alpha)


def _quantile(sorted_xs, q: float) -> float:
    """Linear-interpolation quantile of an already sorted list (numpy's default method)."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(values, **kw) -> dict:
    """mean, sample std, bootstrap CI of the mean, n."""
    xs = [float(v) for v in values]
    lo, hi = bootstrap_ci(xs, **kw)
    return {"mean": statistics.fmean(xs) if xs else float("nan"),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "lo": lo, "hi": hi, "n": len(xs)}


def paired_difference(values, baseline, **kw) -> dict:
    """:func:`summarize` of the per-seed differences ``values[i] - baseline[i]``."""
    if len(values) != len(baseline):
        raise ValueError(f"paired_difference: {len(values)} values for {len(baseline)} baseline values")
    return summarize([a - b for a, b in zip(values, baseline)], **kw)


def excludes_zero(s: dict) -> bool:
    """The interval lies entirely above or below 0 (a difference distinguishable at the CI's level)."""
    return (s["lo"] > 0 or s["hi"] < 0) and s["n"] > 1


def fmt_ci(s: dict, digits: int = 3) -> str:
    """e.g. "0.512 [0.470, 0.551]"."""
    return f"{s['mean']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]"


def fmt_diff(s: dict, digits: int = 3) -> str:
    """e.g. "+0.041 [-0.010, +0.093]", starred when the interval excludes 0."""
    star = " *" if excludes_zero(s) else ""
    return f"{s['mean']:+.{digits}f} [{s['lo']:+.{digits}f}, {s['hi']:+.{digits}f}]{star}"
