"""``python -m bench``: correctness check, copy bandwidth, every (case, provider, mode), table, CSV, plots.

    python -m bench --quick          # CPU-sized set, with the correctness check
    python -m bench                  # the full set of this device (cpu, or gpu on CUDA)
    python -m bench --op sdar_loss --provider eager --provider sdar-torch --set cpu

Rows are appended to <results>/<device>.csv (never overwritten) and plots go next to it as PNG. By default
<results> is bench/results/local/, which git ignores, so a run leaves the checkout clean; --record writes
into the tracked bench/results/ instead (the project's measured history), --results DIR anywhere else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


from . import harness
from .cases import SETS, parse_case
from .providers import OPS, PROVIDERS

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
# the tracked results (CSV history, the plots the README shows): written only with --record
RESULTS = os.path.join(BENCH_DIR, "results")
# a user's own runs: git-ignored (.gitignore), so `python -m bench` never modifies tracked files
LOCAL_RESULTS = os.path.join(RESULTS, "local")


def _progress(total, desc):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    except ImportError:  # tqdm is in the [bench] extra; the run works without it
        class _Bar:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                print(file=sys.stderr)
        return _Bar()


# ---------------------------------------------------------------- correctness step
def run_check_step(device, providers):
    """Check each provider against the reference. On CPU in a fresh interpreter started with
    TRITON_INTERPRET=1, so the Triton kernels and Liger are checked too (they cannot be timed there).
    A fresh interpreter, not a child of the case zygote: the interpreter switch only takes effect if it is
    set before triton is first imported, and the zygote imports it (torch._dynamo does)."""
    t0 = time.time()
    if device == "cuda":
        from .check import run_check
        rows = run_check(device, providers)
    else:
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
        p = subprocess.run([sys.executable, "-m", "bench.check", "--json"], cwd=os.path.dirname(BENCH_DIR),
                           env=env, capture_output=True, text=True)
        try:
            rows = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"correctness check process exited with {p.returncode}:\n{p.stderr[-3000:]}") from None
        rows = [r for r in rows if r["provider"] in providers]
    from .check import format_rows
    print(f"\n== correctness vs sdar_kernels.reference (fp32, loss and gradient; {time.time() - t0:.1f} s"
          f"{', Triton interpreter' if device != 'cuda' else ''})")
    print(format_rows(rows))
    return rows


# ---------------------------------------------------------------- one job
_FORKSERVER = None


def _forkserver():
    """A zygote that has imported torch and the benchmark modules but run no torch op, so each case
    gets a fresh process (its own heap and peak RSS, a fresh OpenMP pool) without paying the ~2.5 s
    import each time. Forking this process itself is not an option: after a parallel torch op,
    OpenMP deadlocks in a forked child."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing as mp
        _FORKSERVER = mp.get_context("forkserver")
        # torch._dynamo: the first call of any torch.library custom op (the sdar ops are) imports it
        # (~150 MiB RSS once per process), which is not the op's working memory
        _FORKSERVER.set_forkserver_preload(["torch", "torch._dynamo", "sdar_kernels", "bench._case"])
    return _FORKSERVER


def run_job(case, provider, modes, device, in_process, budget_s):
    if in_process or device == "cuda":
        # CUDA: allocator statistics are exact per call, one process is enough
        from ._case import run_case
        return run_case(case, provider, modes, device, budget_s=budget_s)
    from ._case import child_main
    ctx = _forkserver()
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=child_main, args=(case.name, provider, modes, device, send, budget_s))
    p.start()
    send.close()
    try:
        res = recv.recv()
    except EOFError:
        res = None
    p.join()
    if res is None:
        # a killed child (the kernel's OOM killer) is an OOM row, anything else an error row
        st = "oom" if p.exitcode in (-9, 137) else "error"
        return [dict(mode=m, status=st, note=f"case process exited with {p.exitcode}") for m in modes]
    return res


def derive(rows, copy_bw):
    """GB/s, % of copy bandwidth, TFLOP/s and the ratios against eager (same case and mode)."""
    eager = {(r["case"], r["mode"]): r for r in rows if r["provider"] == "eager" and r["status"] == "ok"}
    for r in rows:
        r["copy_bw_gbps"] = copy_bw
        if r["status"] != "ok":
            continue
        case = parse_case(r["case"])
        r["peak_mb"] = r["peak_bytes"] / 2**20
        tb = harness.min_traffic_bytes(case, r["mode"])
        r["traffic_gb"] = tb / 1e9
        if r.get("ms"):
            r["gbps"] = tb / (r["ms"] * 1e-3) / 1e9
            r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_bw
            fl = harness.flops(case, r["mode"])
            r["tflops"] = fl / (r["ms"] * 1e-3) / 1e12 if fl else ""
        e = eager.get((r["case"], r["mode"]))
        if e and e.get("ms") and r.get("ms"):
            r["speedup_vs_eager"] = e["ms"] / r["ms"]
        if e and e.get("peak_bytes") and r.get("peak_bytes") is not None:
            r["mem_ratio_vs_eager"] = r["peak_bytes"] / e["peak_bytes"]
    return rows


# ---------------------------------------------------------------- table
def _f(v, fmt):
    return "" if v in (None, "") else format(v, fmt)


def format_table(rows, markdown=False):
    hdr = ["case", "mode", "provider", "ms", "p20-p80", "peak MB", "GB/s", "% copy BW", "TFLOP/s",
           "speed x eager", "mem x eager", "note"]
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        ms = _f(r.get("ms"), ".2f") if ok else r["status"].upper()
        spread = f"{r['ms_p20']:.2f}-{r['ms_p80']:.2f}" if ok and r.get("ms_p20") is not None else ""
        lines.append([r["case"], r["mode"], r["provider"], ms, spread, _f(r.get("peak_mb"), ".0f"),
                      _f(r.get("gbps"), ".1f"), _f(r.get("pct_copy_bw"), ".1f"), _f(r.get("tflops") or None, ".2f"),
                      _f(r.get("speedup_vs_eager"), ".2f"), _f(r.get("mem_ratio_vs_eager"), ".2f"),
                      "" if ok else r.get("note", "")])
    if markdown:
        out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        out += ["| " + " | ".join(x.replace("|", "/") for x in ln) + " |" for ln in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) if lines else len(h) for i, h in enumerate(hdr)]
    widths[-1] = len(hdr[-1])
    out, prev = [], None
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 or i == len(hdr) - 1 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out.append(fmt.format(*hdr))
    out.append("-" * (sum(widths) + 2 * len(widths)))
    for ln in lines:
        if prev is not None and ln[0] != prev:
            out.append("")
        prev = ln[0]
        out.append(fmt.format(*ln))
    return "\n".join(out)


# ---------------------------------------------------------------- main
def select_cases(a, device):
    set_name = a.set or ("quick" if a.quick else ("gpu" if device == "cuda" else "cpu"))
    if a.case:
        return "custom", [parse_case(c) for c in a.case]
    cases = list(SETS[set_name])
    if a.op:
        cases = [c for c in cases if c.op in a.op]
    return set_name, cases


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the CPU-sized case set (4 small cases)")
    ap.add_argument("--set", choices=sorted(SETS), help="case set (default: quick with --quick, else cpu/gpu)")
    ap.add_argument("--case", action="append", help="case name(s) from bench/cases.py (or ad-hoc, same format); "
                    "repeat the flag for several")
    ap.add_argument("--op", action="append", choices=OPS, help="only the cases of this op (repeatable)")
    ap.add_argument("--provider", action="append", choices=sorted(PROVIDERS),
                    help="only this provider (repeatable; default: every provider available here)")
    ap.add_argument("--modes", default="fwd,fwd_bwd", help="comma-separated: fwd (loss only), fwd_bwd (loss and "
                    "gradient); default both")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness step")
    ap.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    ap.add_argument("--no-csv", action="store_true", help="do not append the rows to <results>/<device>.csv")
    ap.add_argument("--results", help="folder of the CSV and PNG files (default: bench/results/local/, "
                    "ignored by git)")
    ap.add_argument("--record", action="store_true", help="write into the tracked bench/results/ (the "
                    "project's CSV history and the README's plots) instead of bench/results/local/")
    ap.add_argument("--markdown", help="also write the table as Markdown to this file")
    ap.add_argument("--jsonl", help="append each raw row to this file as soon as it is measured "
                    "(survives a timeout that kills the run before the table)")
    ap.add_argument("--budget", type=float, help="CPU: seconds of timed calls per case and mode "
                    "(default 0.3 quick, 1.0 otherwise; at least 3 calls)")
    ap.add_argument("--in-process", action="store_true",
                    help="CPU: run cases in this process instead of a fresh one each (peak RSS less isolated)")
    a = ap.parse_args(argv)
    if a.record and a.results:
        ap.error("--record writes into bench/results/; drop --results (or drop --record to write elsewhere)")
    a.results = a.results or (RESULTS if a.record else LOCAL_RESULTS)

    t_start = time.time()
    device = harness.device_kind()
    if device == "cpu" and not a.in_process:
        from multiprocessing import forkserver
        _forkserver()
        forkserver.ensure_running()  # the zygote imports torch while this process prints and checks git
    set_name, cases = select_cases(a, device)
    providers = a.provider or list(PROVIDERS)
    modes = a.modes.split(",")
    env = harness.environment(device)
    load = os.getloadavg()[0] if device == "cpu" else None
    print(f"sdar-kernels benchmark | device: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"liger {env['liger'] or '-'} | git {env['git_sha']} | set {set_name}"
          + (f" | load avg {load:.2f}" if load is not None else ""))
    if device == "cpu":
        print("CPU timing: wall clock, median of >= 3 calls after a warm-up; peak = extra RSS over the inputs, "
              "fresh process per case")

    failed = False
    if not a.no_check:
        check = run_check_step(device, providers)
        failed = any(r["status"] in ("FAIL", "error") for r in check)

    copy_bw = harness.copy_bandwidth_gbps(device)
    print(f"\n== copy bandwidth ({device}, same run): {copy_bw:.1f} GB/s (read + write)")

    jobs, rows, skipped = [], [], {}
    for case in cases:
        for name in providers:
            reason = PROVIDERS[name].unavailable(case, device)
            if reason:
                skipped.setdefault((name, reason), []).append(case.name)
            else:
                jobs.append((case, name))
    if skipped:
        print("\n== skipped")
        for (name, reason), names in skipped.items():
            print(f"  {name:<12} ({len(names)} cases): {reason}")

    budget = a.budget if a.budget is not None else (0.3 if set_name == "quick" else 1.0)
    bar = _progress(len(jobs), "bench")
    for case, name in jobs:
        bar.set_postfix_str(f"{case.name} {name}")
        for r in run_job(case, name, modes, device, a.in_process, budget):
            rows.append(dict(env, op=case.op, case=case.name, model=case.model, N=case.N, V=case.V,
                             H=case.H if case.op == "linear_sdar_loss" else "", dtype=case.dtype,
                             config=case.config, provider=name, set=set_name, **r))
            if load is not None:
                rows[-1]["note"] = (rows[-1].get("note") or "") + f" load1={load:.1f}"
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
        bar.update(1)
    bar.close()
    derive(rows, copy_bw)
    order = {n: i for i, n in enumerate(PROVIDERS)}
    rows.sort(key=lambda r: (r["op"], r["case"], r["mode"], order[r["provider"]]))

    print(f"\n== results on {env['device']} ({time.time() - t_start:.0f} s so far); speed x eager = eager ms / ms, "
          f"mem x eager = peak / eager peak; GB/s of minimal traffic (harness.min_traffic_bytes)")
    print(format_table(rows))
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['status']}: {r['case']} {r['provider']} {r['mode']}: {r.get('note', '').strip()}")

    slug = harness.device_slug(device)
    if not a.no_csv:
        path = os.path.join(a.results, f"{slug}.csv")
        harness.append_csv(rows, path)
        print(f"\nappended {len(rows)} rows to {os.path.relpath(path)}")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}, "
                    f"{env['date']}, set {set_name}" + (f", load average {load:.1f} at the start" if load is not None
                                                        else "") + ".\n\n" + format_table(rows, markdown=True) + "\n")
    if not a.no_plots:
        try:
            from .plots import plot_rows
            for p in plot_rows(rows, a.results, slug, set_name):
                print(f"plot: {os.path.relpath(p)}")
        except ImportError as e:
            print(f"plots skipped: {e} (pip install matplotlib)")
    if not a.record and os.path.abspath(a.results) == LOCAL_RESULTS and not (a.no_csv and a.no_plots):
        print("(results are local and ignored by git; --record adds them to the tracked bench/results/)")
    print(f"total {time.time() - t_start:.1f} s")
    return 1 if failed else 0
