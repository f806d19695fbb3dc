"""Time and peak memory against V and against N, one PNG per (op, mode, dtype, config), with the
roofline: the time the minimal traffic takes at the copy bandwidth measured in the same run. Cases
measured at a single shape (nothing to sweep) are drawn as bars, so every measured case is plotted.

``python -m bench`` draws them after a run; ``python -m bench.plots CSV [--set cpu] [--date STAMP]`` redraws
them, next to the CSV, from the latest (or the named) run of a set recorded in a results CSV.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

from .cases import parse_case
from .harness import min_traffic_bytes


def _sweeps(rows, axis):
    """{fixed value: rows} for the fixed other axis with >= 2 distinct values of ``axis``; best first."""
    other = "N" if axis == "V" else "V"
    by = defaultdict(list)
    for r in rows:
        by[r[other]].append(r)
    ok = {k: v for k, v in by.items() if len({r[axis] for r in v}) >= 2}
    return sorted(ok.items(), key=lambda kv: -len({r[axis] for r in kv[1]}))


METRICS = (("ms", "time per call (ms)"), ("peak_mb", "peak extra memory (MB)"))


def _number(v):
    """A tick label a reader parses at a glance: "16,384", "40", "2.5", "0.05" (not "4x10^1" or "2^14")."""
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:g}" if v >= 1 else f"{v:.2g}"


def _readable_log_axis(axis, values=None):
    """Plain-number ticks on a log axis. ``values``: put the ticks exactly there (the swept N or V);
    otherwise 1-2-5 steps of each decade the axis spans (every 1-2-3-..-9 step on an axis within one
    decade, only the decades on an axis over four)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    if values is not None:
        ticks = sorted(set(values))
    else:
        lo, hi = sorted(axis.get_view_interval())
        first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        span = math.log10(hi / lo)
        steps = (1,) if span > 4 else (1, 2, 5) if span > 1 else (1, 2, 3, 4, 5, 6, 8)
        ticks = [m * 10.0 ** k for k in range(first, last + 1) for m in steps if lo <= m * 10.0 ** k <= hi]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: _number(v)))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _sweep_figure(plt, op, mode, dtype, config, axes_todo):
    """Time (top) and peak memory (bottom) against each swept axis (columns), one line per provider."""
    fig, axs = plt.subplots(2, len(axes_todo), figsize=(6 * len(axes_todo), 8), squeeze=False)
    for j, (axis, (fixed, sweep)) in enumerate(axes_todo):
        other = "N" if axis == "V" else "V"
        xs = sorted({r[axis] for r in sweep})
        for i, (metric, label) in enumerate(METRICS):
            ax = axs[i][j]
            by_p = defaultdict(list)
            for r in sweep:
                by_p[r["provider"]].append(r)
            for prov, pr in by_p.items():
                pr.sort(key=lambda r: r[axis])
                ax.plot([r[axis] for r in pr], [r[metric] for r in pr], "o-", label=prov)
            if metric == "ms" and op == "sdar_loss":
                bw = sweep[0]["copy_bw_gbps"]
                case0 = parse_case(sweep[0]["case"])
                roof = []
                for x in xs:
                    c = type(case0)(op, case0.model, **{"N": x if axis == "N" else case0.N},
                                    dtype=dtype, config=config, V=x if axis == "V" else case0.V, H=case0.H)
                    roof.append(min_traffic_bytes(c, mode) / (bw * 1e9) * 1e3)
                ax.plot(xs, roof, "k--", label=f"roofline ({bw:.0f} GB/s copy)")
            if metric == "peak_mb" and op == "sdar_loss" and mode == "fwd_bwd":
                # the gradient buffer itself is the least extra memory a fwd+grad can need
                r0 = sweep[0]
                item = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
                ax.plot(xs, [(x if axis == "N" else r0["N"]) * (x if axis == "V" else r0["V"]) * item / 2**20
                             for x in xs], "k:", label="gradient buffer (minimum)")
            ax.set_xlabel(f"{axis} ({other} = {fixed})")
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _readable_log_axis(ax.xaxis, xs)
            _readable_log_axis(ax.yaxis)
            if len(xs) > 2:   # close values (128,256 and 151,936) would print over each other
                ax.tick_params(axis="x", labelrotation=30)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=8)
    return fig


def _bar_figure(plt, rs):
    """Cases measured at a single shape (nothing to sweep, e.g. the fused-linear case of the quick set):
    time and peak memory per case as bars, one bar per provider."""
    cases = sorted({r["case"] for r in rs}, key=lambda c: (parse_case(c).N, parse_case(c).V))
    providers = list(dict.fromkeys(r["provider"] for r in rs))
    width = 0.6 / len(providers)
    fig, axs = plt.subplots(2, 1, figsize=(max(6, 2.5 * len(cases) + 2), 8), squeeze=False)
    for i, (metric, label) in enumerate(METRICS):
        ax = axs[i][0]
        for k, prov in enumerate(providers):
            xs, ys = [], []
            for c, case in enumerate(cases):
                r = next((r for r in rs if r["case"] == case and r["provider"] == prov), None)
                if r is not None and r.get(metric) is not None:
                    xs.append(c + (k - (len(providers) - 1) / 2) * width)
                    ys.append(r[metric])
            bars = ax.bar(xs, ys, width, label=prov)
            ax.bar_label(bars, labels=[_number(float(f"{y:.3g}")) for y in ys], fontsize=8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([_case_label(case) for case in cases])
        ax.set_ylabel(label)
        ax.margins(y=0.15)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _case_label(name):
    c = parse_case(name)
    return f"N = {c.N}, V = {c.V}" + (f", H = {c.H}" if c.op == "linear_sdar_loss" else "")


def plot_rows(rows, folder, slug, tag=""):
    """One PNG per measured (op, mode, dtype, config): lines against V and N where the cases sweep them,
    bars per case where they do not. ``tag`` (the case set) goes in the file name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r.get("ms"):
            groups[(r["op"], r["mode"], r["dtype"], r["config"])].append(r)
    paths = []
    for (op, mode, dtype, config), rs in sorted(groups.items()):
        axes_todo = [(ax, sw) for ax in ("V", "N") for sw in _sweeps(rs, ax)[:1]]
        fig = _sweep_figure(plt, op, mode, dtype, config, axes_todo) if axes_todo else _bar_figure(plt, rs)
        fig.suptitle(f"{op} {mode} {dtype} config={config}\n{rs[0]['device']}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(folder, f"{slug}_{tag + '_' if tag else ''}{op}_{mode}_{dtype}_{config}.png")
        os.makedirs(folder, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


NUMERIC = ("N", "V", "ms", "ms_p20", "ms_p80", "peak_mb", "copy_bw_gbps")


def rows_from_csv(path, set_name=None, date=None):
    """Rows of one run (same date stamp) of ``set_name`` (any set if None) in a results CSV: the latest,
    or the one whose date stamp starts with ``date``."""
    import csv
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if set_name is None or r["set"] == set_name]
    if date is not None:
        rows = [r for r in rows if r["date"].startswith(date)]
    if not rows:
        return []
    last = max(r["date"] for r in rows)
    rows = [r for r in rows if r["date"] == last]
    for r in rows:
        for k in NUMERIC:
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
        r["N"], r["V"] = int(r["N"]), int(r["V"])
    return rows


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--set", help="case set to plot (default: the latest run of any set)")
    ap.add_argument("--date", help="the run whose date stamp starts with this, e.g. 2026-11-25T18:13 "
                    "(default: the latest run)")
    a = ap.parse_args(argv)
    rows = rows_from_csv(a.csv, a.set, a.date)
    if not rows:
        raise SystemExit(f"no rows for set {a.set!r}" + (f" and date {a.date!r}" if a.date else "") + f" in {a.csv}")
    slug = os.path.splitext(os.path.basename(a.csv))[0]
    for p in plot_rows(rows, os.path.dirname(os.path.abspath(a.csv)), slug, rows[0]["set"]):
        print(f"plot: {os.path.relpath(p)}")


if __name__ == "__main__":
    main()
