"""The one benchmark harness: timing, peak memory, copy bandwidth, minimal traffic, device and versions.

Definitions (the same on every device, so rows compare):
- time: median with p20 / p80 of one call. CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed
  between calls). CPU: a wall-clock loop after a warm-up call, at least ``CPU_MIN_REPS`` calls and about
  ``budget_s`` seconds.
- CPU time (CPU only): the median process CPU time of the timed calls, all threads together; on a
  machine shared with other jobs it is much less inflated by the load than the wall clock.
- first call: wall-clock time of the first call in the case's process (compiles, lazy initialisation),
  measured apart; the peak and the time above are taken after it.
- peak memory: the extra memory one call needs over its live inputs, its outputs included (the gradient
  buffer in fwd_bwd). CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats`` minus
  ``memory_allocated`` before the call. CPU: the process's peak RSS (VmHWM, reset through
  /proc/self/clear_refs after ``malloc_trim``) minus its RSS before the call; each case runs in a fresh
  process (bench/_case.py), so no other case's heap is in the number.
- minimal traffic: bytes an ideal fused kernel must move (``min_traffic_bytes``); GB/s = that / time,
  compared with the copy bandwidth measured in the same run on the same device.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import functools
import gc
import os
import platform
import re
import statistics
import subprocess
import time

import torch

CPU_MIN_REPS = 3
CPU_MAX_REPS = 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


# ---------------------------------------------------------------- device, versions
def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def device_slug(device: str) -> str:
    """File-name form of the device: ``cpu-amd-epyc-2c``, ``nvidia-h100-80gb-hbm3``."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = "cpu-" + device_name(device).split(" (")[0] + f"-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return ""


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """Short sha of HEAD (+dirty when sdar_kernels/ or bench/ have local changes); BENCH_GIT_SHA overrides
    it where the checkout has no .git (the GPU machine gets a copy of the working tree)."""
    if os.environ.get("BENCH_GIT_SHA"):
        return os.environ["BENCH_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sdar_kernels", "bench"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else "unknown"
    except Exception:
        return "unknown"


def environment(device: str) -> dict:
    """Columns every CSV row carries."""
    return dict(
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=device_name(device), torch=torch.__version__,
        triton=_version("triton") if device == "cuda" else _pip_version("triton"),
        liger=_pip_version("liger_kernel"), python=platform.python_version(), git_sha=git_sha(),
    )


def _pip_version(dist):
    """Installed version without importing the package (importing triton on CPU is not free)."""
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return ""


# ---------------------------------------------------------------- timing
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def first_call_ms(fn, device: str) -> float:
    """Wall-clock milliseconds of one call (the warm-up: torch.compile's compile happens here)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    del out
    return ms


def time_ms(fn, device: str, warmup: bool = True, budget_s: float = 1.0,
            cpu_ms: list | None = None) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of one call of ``fn`` (CPU: ``warmup=False`` when it just ran).

    CPU: if ``cpu_ms`` is a list, the process CPU time of each timed call is appended to it (all threads;
    on a machine shared with other jobs it moves much less than the wall clock)."""
    if device == "cuda":
        import triton.testing
        # do_bench repeats for `rep` ms: at least ~10 calls for slow providers (eager at 64k tokens takes
        # 100+ ms a call), so p20/p80 are not read off one or two samples.
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = (time.perf_counter() - t0) * 1e3
        rep = int(min(max(100.0, 10 * est_ms), 2000.0))
        q = triton.testing.do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(x) for x in q)
    if warmup:
        fn()  # lazy initialisation, first-touch page faults
    times = []
    start = time.perf_counter()
    while len(times) < CPU_MAX_REPS and (len(times) < CPU_MIN_REPS or time.perf_counter() - start < budget_s):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if cpu_ms is not None:
            cpu_ms.append((time.process_time() - c0) * 1e3)
    return _quantiles(times)


def _quantiles(times):
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(times), q[1], q[7]


# ---------------------------------------------------------------- memory
def _proc_status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _trim_heap():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def peak_extra_bytes(fn, device: str) -> int:
    """Extra memory of one call of ``fn`` over what is live before it (see the module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return peak
    _trim_heap()
    before = _proc_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # the HWM then includes the input building: an over-estimate, never an under-estimate
    out = fn()
    peak = _proc_status_kb("VmHWM") - before
    del out
    return max(peak, 0) * 1024


# ---------------------------------------------------------------- bandwidth and traffic
def copy_bandwidth_gbps(device: str) -> float:
    """Device-to-same-device copy bandwidth (read + write bytes per second), GB/s (1e9)."""
    nbytes = (1 << 30) if device == "cuda" else (1 << 27)  # 1 GiB on GPU, 128 MiB on CPU (>> caches)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, budget_s=0.3)[0]
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def min_traffic_bytes(case, mode: str) -> int:
    """Bytes an ideal fused implementation must move.

    sdar_loss: per (token, vocab) element, loss only = read student + teacher once (2 * itemsize);
    fwd+grad = read both twice (a row of 150k-260k logits does not fit on chip, so the gradient pass
    re-reads it) + write the gradient once (5 * itemsize). [N]-sized side inputs are left out (< 0.01%).
    linear_sdar_loss: hidden states (student and teacher) and the weight once, plus the gradients of
    hidden and weight in fwd_bwd. It is compute bound: see ``flops``.
    """
    s = ITEMSIZE[case.dtype]
    N, V, H = case.N, case.V, case.H
    if case.op == "sdar_loss":
        return N * V * s * (2 if mode == "fwd" else 5)
    base = (2 * N * H + V * H) * s
    return base if mode == "fwd" else base + (N * H + V * H) * s


def flops(case, mode: str) -> int:
    """Matmul FLOPs of the fused-linear op (student + teacher logits; fwd_bwd adds d_hidden and d_weight)."""
    if case.op != "linear_sdar_loss":
        return 0
    mm = 2 * case.N * case.H * case.V
    return 2 * mm if mode == "fwd" else 4 * mm


# ---------------------------------------------------------------- CSV
CSV_COLUMNS = [
    "date", "device", "op", "case", "model", "N", "V", "H", "dtype", "config", "provider", "mode", "status",
    "ms", "ms_p20", "ms_p80", "peak_mb", "traffic_gb", "gbps", "pct_copy_bw", "copy_bw_gbps", "tflops",
    "speedup_vs_eager", "mem_ratio_vs_eager", "note", "torch", "triton", "liger", "python", "git_sha", "set",
    "first_ms", "cpu_ms",
]


def append_csv(rows: list[dict], path: str):
    """Append rows (never overwrite); writes the header only for a new file. A file written before a
    column was added (CSV_COLUMNS only grows, at the end) gets the new header, its rows the empty cells."""
    import csv
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        _add_new_columns(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in CSV_COLUMNS})


def _add_new_columns(path):
    import csv
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if header == CSV_COLUMNS:
        return
    if header != CSV_COLUMNS[:len(header)]:
        raise ValueError(f"{path}: unexpected header {header}; expected a prefix of {CSV_COLUMNS}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    print(f"{path}: added the column(s) {CSV_COLUMNS[len(header):]} (empty in its {len(rows)} earlier rows)")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
