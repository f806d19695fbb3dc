"""Smoke test of the benchmark suite (bench/): every provider runs once at a tiny shape and matches the
reference, the harness pieces work, and the CLI prints its table. No timing is asserted.

Runs in the default CPU suite: conftest switches Triton to the interpreter, so the Triton kernel and
Liger-Kernel (when installed) are exercised too.
"""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench/ is not an installed package; `pytest` (not `python -m pytest`) lacks the cwd
    sys.path.insert(0, ROOT)

from bench import harness  # noqa: E402
from bench._case import run_case  # noqa: E402
from bench.cases import SETS, Case, all_cases, parse_case  # noqa: E402
from bench.run import run_check_step  # noqa: E402
from bench.providers import PROVIDERS  # noqa: E402


# numpy warnings of the Triton interpreter on masked lanes (-inf * 0 in lanes that are never stored)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_every_provider_matches_the_reference():
    # through the step `python -m bench` runs (a fresh interpreter with TRITON_INTERPRET=1), not in this
    # process: a check child forked from a process that had already imported triton could not switch to
    # the interpreter, and every Triton provider errored while this test, run in-process, still passed
    rows = run_check_step("cpu", list(PROVIDERS))
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    assert not bad, "\n".join(str(r) for r in bad)
    ran = {r["provider"] for r in rows if r["status"] == "ok"}
    assert {"eager", "sdar-torch"} <= ran
    if importlib.util.find_spec("triton") is not None:
        assert "sdar-triton" in ran, [r for r in rows if r["provider"] == "sdar-triton"]
    if importlib.util.find_spec("liger_kernel") is not None:
        assert "liger" in ran, [r for r in rows if r["provider"] == "liger"]
    assert "compile" in ran   # torch.compile of the eager loss, on CPU too (inductor's C++ backend)


@pytest.mark.parametrize("op", ["sdar_loss", "linear_sdar_loss"])
def test_case_runner_measures_memory(op):
    case = Case(op, "tiny", 16, V=515, H=32, dtype="float32")
    for name in ("eager", "sdar-torch"):
        res = run_case(case, name, device="cpu", timing=False)
        assert [r["mode"] for r in res] == ["fwd", "fwd_bwd"]
        assert all(r["status"] == "ok" and r["peak_bytes"] >= 0 and r["first_ms"] > 0 for r in res), res


def test_registry_names_round_trip_and_traffic():
    for name, case in all_cases().items():
        assert parse_case(name) == case
    assert SETS["quick"] and SETS["gpu-headline"]
    c = Case("sdar_loss", "qwen3", 1024)  # bf16: 4 B loss only, 10 B fused fwd+grad per element
    assert harness.min_traffic_bytes(c, "fwd") == 4 * 1024 * 151936
    assert harness.min_traffic_bytes(c, "fwd_bwd") == 10 * 1024 * 151936
    assert harness._quantiles([3.0, 1.0, 2.0, 4.0, 5.0])[0] == 3.0


def test_csv_is_appended_never_overwritten(tmp_path):
    path = str(tmp_path / "dev.csv")
    harness.append_csv([dict(provider="a", ms=1.0)], path)
    harness.append_csv([dict(provider="b", ms=2.0)], path)
    lines = open(path).read().splitlines()
    assert lines[0].startswith("date,device,op") and len(lines) == 3


def test_csv_from_before_a_new_column_gets_it(tmp_path):
    path = str(tmp_path / "dev.csv")
    old = harness.CSV_COLUMNS[:harness.CSV_COLUMNS.index("first_ms")]   # the header before first_ms, cpu_ms
    with open(path, "w") as f:
        f.write(",".join(old) + "\n" + ",".join("x" if c == "provider" else "" for c in old) + "\n")
    harness.append_csv([dict(provider="b", first_ms=5.0)], path)
    import csv
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == harness.CSV_COLUMNS
    assert [(r["provider"], r["first_ms"]) for r in rows] == [("x", ""), ("b", "5")]


def test_rounds_merge_into_medians():
    from bench.run import merge_rounds
    base = dict(case="c", provider="p", mode="fwd", status="ok", ms_p20=1.0, ms_p80=2.0, first_ms=9.0)
    rows = [dict(base, ms=ms, peak_bytes=pk, note=f" load1={ld}") for ms, pk, ld in [(3.0, 10, 1.0), (1.0, 30, 2.0),
                                                                                        (2.0, 20, 3.0)]]
    (merged,) = merge_rounds(rows)
    assert merged["ms"] == 2.0 and merged["peak_bytes"] == 20 and merged["first_ms"] == 9.0
    assert "median of 3 rounds; ms 3/1/2; load1 1.0/2.0/3.0" in merged["note"]
    failed = dict(base, status="error", note="boom")
    assert merge_rounds(rows + [failed]) == [failed]


def test_cli_prints_table_csv_and_plots(tmp_path, capsys):
    from bench.run import main
    rc = main(["--no-check", "--in-process", "--budget", "0", "--results", str(tmp_path),
               "--case", "sdar_loss:tiny:N16-V512:fp32:official", "--case", "sdar_loss:tiny:N16-V1024:fp32:official",
               "--provider", "eager", "--provider", "sdar-torch", "--provider", "sdar-triton"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "speed x eager" in out and "sdar-torch" in out and "far too slow to time" in out
    files = os.listdir(tmp_path)
    assert any(f.endswith(".csv") for f in files)
    assert importlib.util.find_spec("matplotlib") is None or any(f.endswith(".png") for f in files)


def test_providers_are_named_as_documented():
    assert set(PROVIDERS) == {"eager", "compile", "sdar-torch", "sdar-triton", "liger"}
