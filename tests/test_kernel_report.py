"""The code the Triton kernels compile to for the H100 (ahead of time, sm_90a, no GPU needed) keeps the
properties they are written for (csrc_notes/sdar_loss.md): no barrier or shuffle inside a pass's loop
(per-thread running statistics), no spills, at most 64 registers (4 CTAs of 256 threads per SM), 16-byte
loads and stores of the logits and the gradient, and the hardware log2 in jsd's passes. The report runs in
a fresh process (triton must not be in interpreter mode)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SDAR_KERNELS_SPLITS",
                                                            "SDAR_KERNELS_MAX_BLOCK_V")}
    p = subprocess.run([sys.executable, "-m", "bench.kernel_report", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    if "cuobjdump not found" in p.stdout + p.stderr:
        pytest.skip("no cuobjdump in this triton wheel")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows, "the registry must build the sdar_loss variants"
    return rows


def _row_kernels(report):
    """The streaming row kernels of sdar_loss (the matmul kernel of linear_logprobs has its own checks)."""
    rows = [r for r in report if r.get("op") == "sdar_loss"]
    assert rows, "the registry must build the sdar_loss variants"
    return rows


def test_every_variant_compiles_without_spills(report):
    for r in report:
        assert r["status"] == "ok", (r["name"], r["status"])   # includes: tensor cores in the matmul kernels
        assert r["local"] == 0, (r["name"], r["local"])
        assert not any(k.startswith(("LDL", "STL")) for k in r["ops"]), (r["name"], r["ops"])


def test_row_kernels_fit_in_64_registers(report):
    for r in _row_kernels(report):
        assert r["stack"] == 0 and r["reg"] <= 64 and r["ctas_per_sm"] >= 4, (r["name"], r["reg"], r["ctas_per_sm"])


def test_matmul_kernels_use_the_tensor_cores(report):
    matmuls = [r for r in report if r.get("op") == "linear_logprobs" and r["dtype"] != "fp32"]
    assert matmuls
    for r in matmuls:
        assert r["mma"]["HGMMA"] + r["mma"]["HMMA"] > 0, (r["name"], r["mma"])
    # the pipelined main loop at the headline tile: wgmma fed by 16-byte asynchronous copies
    head = next(r for r in matmuls if "N8k bf16 logp+lse]" in r["name"])
    assert head["mma"]["HGMMA"] > 0 and any(k.startswith("LDGSTS") and k.endswith(".128") for k in head["ops"]), head


def test_streaming_loops_have_no_barrier_or_shuffle(report):
    for r in _row_kernels(report):
        kinds = [lp["kind"] for lp in r["loops"]]
        assert "statistics" in kinds or "gradient" in kinds, (r["name"], kinds)
        for lp in r["loops"]:
            if lp["kind"] in ("statistics", "jsd-statistics", "gradient", "zero-fill"):
                assert lp["bar"] == 0 and lp["shfl"] == 0, (r["name"], lp["kind"], lp["bar"], lp["shfl"])


def test_logits_and_gradient_move_in_16_byte_vectors(report):
    for r in _row_kernels(report):
        for lp in r["loops"]:
            wide = {k for k in lp["memory"] if k.startswith(("LDG", "STG"))}
            assert wide and wide <= {"LDG.E.128", "STG.E.128"}, (r["name"], lp["kind"], lp["memory"])


def test_jsd_uses_the_hardware_log2_and_fewer_instructions(report):
    jsd = next(r for r in _row_kernels(report) if "jsd" in r["name"])
    loops = {lp["kind"]: lp for lp in jsd["loops"]}
    for kind in ("jsd-statistics", "gradient"):
        assert loops[kind]["mufu"].get("MUFU.LG2", 0) > 0, loops[kind]
        # libdevice's log2 was ~25 instructions per call: 53 and 56 per logit before (csrc_notes/perf.md)
        assert loops[kind]["instructions_per_element"] < 40, loops[kind]


def test_no_64_bit_index_arithmetic_per_logit(report):
    """int32 offsets inside a row: at most a few 64-bit carries per iteration (pointer increments), never
    one per element."""
    for r in _row_kernels(report):
        for lp in r["loops"]:
            assert lp["int64_carry"] <= 4, (r["name"], lp["kind"], lp["int64_carry"])


def test_committed_snapshot_matches_the_kernels(report):
    """bench/results/kernel_report_sm90a.json (what the bound model reads) is the report of these kernels:
    regenerate it with ``python -m bench.kernel_report --json bench/results/kernel_report_sm90a.json``."""
    from bench.model import load_report
    snapshot = load_report()
    assert set(snapshot) == {r["name"] for r in report}
    for r in report:
        s = snapshot[r["name"]]
        assert (s["reg"], s["ctas_per_sm"]) == (r["reg"], r["ctas_per_sm"]), r["name"]
        assert [(lp["kind"], lp["instructions"]) for lp in s["loops"]] == \
            [(lp["kind"], lp["instructions"]) for lp in r["loops"]], r["name"]


def test_bound_model_predictions():
    """The model of csrc_notes/perf.md: at N=8192 the fused schedules are memory-bound on both cards;
    at N=64 one program per row is latency-bound and the vocabulary splits bring it to the memory bound."""
    from bench.model import table, load_report
    rows = table(load_report())
    by = {(r["device"], r["N"], r["schedule"]): r for r in rows}
    for dev in ("H100 SXM", "H200 SXM"):
        for schedule in ("sampled fwd+grad (one program per row)", "fkl fwd+grad", "jsd fwd+grad"):
            assert by[(dev, 8192, schedule)]["bound"] == "memory"
        row64 = by[(dev, 64, "sampled fwd+grad (one program per row)")]
        split64 = by[(dev, 64, "sampled fwd+grad (vocabulary splits)")]
        assert row64["bound"] == "latency" and split64["bound"] == "memory"
        assert split64["predicted_ms"] < row64["predicted_ms"]
