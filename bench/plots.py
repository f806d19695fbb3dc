"""Time and peak memory against V and against N, one PNG per (op, mode, dtype, config), with the
roofline: the time the minimal traffic takes at the copy bandwidth measured in the same run."""

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


def plot_rows(rows, folder, slug):
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
        path = os.path.join(folder, f"{slug}_{op}_{mode}_{dtype}_{config}.png")
        os.makedirs(folder, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
