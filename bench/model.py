"""A bound model of the SDAR row kernels on Hopper GPUs, from the ahead-of-time code-generation facts.

For each schedule (which passes run, over which tensors) and shape (N rows of V logits) it computes four
lower bounds on the time and predicts the largest, plus the launch overheads:

  memory   bytes moved / HBM bandwidth                                       (the floor the kernel aims at)
  issue    warp instructions / (SMs x 4 schedulers x clock)                  (instructions per logit, SASS)
  MUFU     special-function ops / (SMs x 16 per clock x clock)               (exp2 / log2 per logit, SASS)
  latency  waves x iterations per program x max(DRAM latency, one iteration's issue time with its CTA
           alone on the SM)                                                   (a row's serial chain)

The per-logit counts come from ``python -m bench.kernel_report --json`` (a snapshot is committed as
bench/results/kernel_report_sm90a.json; regenerate it with that command). Device numbers are the vendor
figures for SXM parts, the DRAM latency an assumption (800 cycles); both are printed. These are
estimates, not measurements: ``bench/gpu_check.sh`` prints them next to the measured times.

    python -m bench.model                      # the table of csrc_notes/perf.md
    python -m bench.model --json FILE          # another kernel_report JSON
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
SNAPSHOT = os.path.join(HERE, "results", "kernel_report_sm90a.json")


@dataclass(frozen=True)
class Device:
    name: str
    sms: int
    clock_ghz: float
    hbm_tbs: float
    dram_latency_cycles: int = 800     # assumption: a loaded HBM access on Hopper, in SM cycles
    launch_us: float = 4.0             # assumption: one kernel launch in a stream of launches


DEVICES = {
    "H100": Device("H100 SXM", 132, 1.755, 3.35),
    "H200": Device("H200 SXM", 132, 1.755, 4.8),
}


@dataclass(frozen=True)
class Pass:
    kernel_variant: str     # name in the kernel report
    loop: str               # loop kind in that variant ("statistics", "jsd-statistics", "gradient")
    bytes_per_logit: float  # bytes of logits / gradient moved per logit of the row


# schedule -> (passes, launches); bf16 logits, teacher logits, the official terms
SCHEDULES = {
    "sampled fwd+grad (one program per row)": (
        [Pass("sdar_rows_kernel [qwen3 N8k bf16 official fwd+grad]", "statistics", 4),
         Pass("sdar_rows_kernel [qwen3 N8k bf16 official fwd+grad]", "gradient", 4)], 1),
    "sampled loss only": (
        [Pass("sdar_rows_kernel [qwen3 N8k bf16 official loss only]", "statistics", 4)], 1),
    "fkl fwd+grad": (
        [Pass("sdar_rows_kernel [qwen3 N8k bf16 fkl fwd+grad]", "statistics", 4),
         Pass("sdar_rows_kernel [qwen3 N8k bf16 fkl fwd+grad]", "gradient", 6)], 1),
    "jsd fwd+grad": (
        [Pass("sdar_rows_kernel [qwen3 N8k bf16 jsd fwd+grad]", "statistics", 4),
         Pass("sdar_rows_kernel [qwen3 N8k bf16 jsd fwd+grad]", "jsd-statistics", 4),
         Pass("sdar_rows_kernel [qwen3 N8k bf16 jsd fwd+grad]", "gradient", 6)], 1),
    "sampled fwd+grad (vocabulary splits)": (
        [Pass("partial_kernel [qwen3 N64 bf16 sampled split statistics]", "statistics", 4),
         Pass("sdar_grad_kernel [qwen3 N64 bf16 sampled+entropy split gradient]", "gradient", 4)], 3),
}


def load_report(path=SNAPSHOT):
    with open(path) as f:
        return {row["name"]: row for row in json.load(f)}


def _loop(row, kind):
    for lp in row["loops"]:
        if lp["kind"] == kind:
            return lp
    raise KeyError(f"{row['name']}: no {kind} loop")


def predict(schedule: str, N: int, V: int, device: Device, report: dict, splits: int = 1) -> dict:
    """The four bounds and the prediction (ms) of one schedule at N x V on ``device``."""
    passes, launches = SCHEDULES[schedule]
    E = N * V
    f = device.clock_ghz * 1e9
    mem = issue = mufu = latency = 0.0
    for p in passes:
        row = report[p.kernel_variant]
        lp = _loop(row, p.loop)
        threads = 32 * row["warps"]
        mem += p.bytes_per_logit * E / (device.hbm_tbs * 1e12)
        issue += lp["instructions_per_element"] * E / 32 / (device.sms * 4 * f)
        mufu += lp["mufu_per_element"] * E / (device.sms * 16 * f)
        # a program walks V / splits logits in tiles; programs run in waves over the SMs
        programs = N * splits
        waves = math.ceil(programs / (device.sms * max(row["ctas_per_sm"], 1)))
        iterations = math.ceil(V / splits / row["block"])
        alone = lp["instructions"] * threads / 32 / 4 / f            # one iteration, its CTA alone on an SM
        t_iter = max(device.dram_latency_cycles / f, alone)
        latency += waves * iterations * t_iter
    bounds = {"memory": mem, "issue": issue, "MUFU": mufu, "latency": latency}
    limit = max(bounds, key=bounds.get)
    ms = 1e3 * (bounds[limit] + launches * device.launch_us * 1e-6)
    return {"schedule": schedule, "N": N, "V": V, "device": device.name,
            **{k: round(v * 1e3, 4) for k, v in bounds.items()}, "bound": limit, "predicted_ms": round(ms, 4),
            "floor_ms": round(mem * 1e3, 4)}


def table(report, V=151936):
    import torch

    from sdar_kernels.sdar_loss.launch import plan_launch

    """Every schedule at N in {64, 1024, 8192} on each device; the split schedule cuts the rows as
    launch.plan_launch does on that device."""
    rows = []
    for dev in DEVICES.values():
        for N in (64, 1024, 8192):
            for schedule in SCHEDULES:
                splits = plan_launch(N, V, torch.bfloat16, dev.sms).splits if "splits" in schedule else 1
                rows.append(predict(schedule, N, V, dev, report, splits))
    return rows


def compare_measured(report, jsonl_path):
    """Predicted next to measured for the sdar-triton rows of a benchmark run (``python -m bench --jsonl``):
    sdar_loss, bf16, the official configuration (sampled teacher logits, entropy)."""
    import torch

    from sdar_kernels.sdar_loss.launch import plan_launch
    out = []
    with open(jsonl_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        if (r.get("provider"), r.get("op"), r.get("dtype"), r.get("config"), r.get("status")) != \
                ("sdar-triton", "sdar_loss", "bf16", "official", "ok") or not r.get("ms"):
            continue
        dev = DEVICES["H200" if "H200" in str(r.get("device", "")) else "H100"]
        N, V = int(r["N"]), int(r["V"])
        splits = plan_launch(N, V, torch.bfloat16, dev.sms).splits
        if r["mode"] == "fwd":
            schedule = "sampled loss only"
        else:
            schedule = f"sampled fwd+grad ({'vocabulary splits' if splits > 1 else 'one program per row'})"
        p = predict(schedule, N, V, dev, report, splits)
        out.append(dict(p, measured_ms=r["ms"], measured_over_predicted=round(r["ms"] / p["predicted_ms"], 2)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=SNAPSHOT, help="kernel_report JSON (default: the committed snapshot)")
    ap.add_argument("--measured", metavar="JSONL", help="print predictions next to the sdar-triton rows of a "
                                                        "benchmark run (python -m bench --jsonl FILE)")
    a = ap.parse_args(argv)
    if a.measured:
        print("| device | N | V | schedule | predicted ms | measured ms | measured / predicted |")
        print("|---|---|---|---|---|---|---|")
        for r in compare_measured(load_report(a.json), a.measured):
            print(f"| {r['device']} | {r['N']} | {r['V']} | {r['schedule']} | {r['predicted_ms']:.3f} | "
                  f"{r['measured_ms']:.3f} | {r['measured_over_predicted']} |")
        return
    rows = table(load_report(a.json))
    print("| device | N | schedule | memory | issue | MUFU | latency | bound | predicted ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['device']} | {r['N']} | {r['schedule']} | {r['memory']:.3f} | {r['issue']:.3f} | "
              f"{r['MUFU']:.3f} | {r['latency']:.3f} | {r['bound']} | {r['predicted_ms']:.3f} |")
    d = DEVICES["H100"]
    print(f"\nassumptions: DRAM latency {d.dram_latency_cycles} cycles, {d.launch_us} us per launch, clock "
          f"{d.clock_ghz} GHz, 4 warp-instructions and 16 MUFU ops per SM per clock")


if __name__ == "__main__":
    main()
