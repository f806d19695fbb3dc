"""Time and peak memory against V and against N, one PNG per (op, mode, dtype, config), with the
roofline: the time the minimal traffic takes at the copy bandwidth measured in the same run.

``python -m bench`` draws them after a run; ``python -m bench.plots CSV [--set cpu]`` redraws them from
the latest run of a set recorded in a results CSV.
"""

from __future__ import annotations

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


def plot_rows(rows, folder, slug, tag=""):
    """One PNG per (op, mode, dtype, config) with a V or N sweep; ``tag`` (the case set) goes in the name."""
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
        if not axes_todo:
            continue
        fig, axs = plt.subplots(2, len(axes_todo), figsize=(6 * len(axes_todo), 8), squeeze=False)
        for j, (axis, (fixed, sweep)) in enumerate(axes_todo):
            other = "N" if axis == "V" else "V"
            for i, (metric, label) in enumerate((("ms", "time per call (ms)"), ("peak_mb", "peak extra memory (MB)"))):
                ax = axs[i][j]
                by_p = defaultdict(list)
                for r in sweep:
                    by_p[r["provider"]].append(r)
                for prov, pr in by_p.items():
                    pr.sort(key=lambda r: r[axis])
                    ax.plot([r[axis] for r in pr], [r[metric] for r in pr], "o-", label=prov)
                if metric == "ms" and op == "sdar_loss":
                    xs = sorted({r[axis] for r in sweep})
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
                    xs = sorted({r[axis] for r in sweep})
                    r0 = sweep[0]
                    item = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
                    ax.plot(xs, [(x if axis == "N" else r0["N"]) * (x if axis == "V" else r0["V"]) * item / 2**20
                                 for x in xs], "k:", label="gradient buffer (minimum)")
                ax.set_xlabel(f"{axis} ({other} = {fixed})")
                ax.set_ylabel(label)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        dev = rs[0]["device"]
        fig.suptitle(f"{op} {mode} {dtype} config={config}\n{dev}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(folder, f"{slug}_{tag + '_' if tag else ''}{op}_{mode}_{dtype}_{config}.png")
        os.makedirs(folder, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


NUMERIC = ("N", "V", "ms", "ms_p20", "ms_p80", "peak_mb", "copy_bw_gbps")


def rows_from_csv(path, set_name=None):
    """Rows of the latest run (same date stamp) of ``set_name`` (any set if None) in a results CSV."""
    import csv
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if set_name is None or r["set"] == set_name]
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
    a = ap.parse_args(argv)
    rows = rows_from_csv(a.csv, a.set)
    if not rows:
        raise SystemExit(f"no rows for set {a.set!r} in {a.csv}")
    slug = os.path.splitext(os.path.basename(a.csv))[0]
    for p in plot_rows(rows, os.path.dirname(os.path.abspath(a.csv)), slug, rows[0]["set"]):
        print(f"plot: {os.path.relpath(p)}")


if __name__ == "__main__":
    main()
