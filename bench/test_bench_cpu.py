"""pytest-benchmark entry points for the CPU cases: ``pytest bench/ --benchmark-only``.

Kept out of the default test run (pyproject's testpaths is tests/). The same cases, providers and
call bodies as ``python -m bench --quick``; pytest-benchmark does the timing and its own statistics
(no peak-memory column here: that needs the fresh process per case of ``python -m bench``).
"""

import pytest

from bench._case import make_fn
from bench.cases import QUICK
from bench.inputs import make_inputs
from bench.providers import PROVIDERS

pytest.importorskip("pytest_benchmark")


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", QUICK, ids=lambda c: c.name)
def test_cpu_case(benchmark, case, provider, mode):
    p = PROVIDERS[provider]
    reason = p.unavailable(case, "cpu")
    if reason:
        pytest.skip(reason)
    fn = make_fn(p, make_inputs(case, "cpu"), case, mode)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(case=case.name, provider=provider, mode=mode, N=case.N, V=case.V)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
