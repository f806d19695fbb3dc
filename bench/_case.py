"""Measure one (case, provider) in all requested modes; as ``python -m bench._case`` it is the fresh
process that each CPU case runs in (peak RSS is per process) and prints one JSON line.

    python -m bench._case --case 'sdar_loss:tiny:N256-V32000:fp32:official' --provider eager
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import harness
from .cases import parse_case
from .inputs import grad_targets, make_inputs
from .providers import PROVIDERS

MODES = ("fwd", "fwd_bwd")


def make_fn(provider, inp, case, mode):
    """fwd: the loss alone, no autograd graph (inputs do not require grad).
    fwd_bwd: loss and its gradient w.r.t. the student logits (or hidden and weight), as a trainer's
    backward would produce them. Liger writes the logits gradient into the logits in place, so after the
    first call it runs on gradient values: same work, same time."""
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return provider.loss(inp, case)
        return fn
    targets = grad_targets(inp, case.op)
    for t in targets:
        t.requires_grad_(True)

    def fn():
        return torch.autograd.grad(provider.loss(inp, case), targets)
    return fn


def _is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower() or isinstance(e, MemoryError)


def run_case(case, provider_name, modes=MODES, device="cpu", timing=True, budget_s=1.0):
    """List of result dicts (one per mode): status ok/oom/error, ms, ms_p20, ms_p80, peak_bytes, note."""
    provider = PROVIDERS[provider_name]
    results = []
    try:
        inp = make_inputs(case, device)
    except Exception as e:
        st = "oom" if _is_oom(e) else "error"
        return [dict(mode=m, status=st, note=f"inputs: {type(e).__name__}: {str(e)[:160]}") for m in modes]
    for mode in modes:
        r = dict(mode=mode, status="ok", note="")
        try:
            fn = make_fn(provider, inp, case, mode)
            if device == "cuda":
                fn()  # warm-up: compiles, autotune and lazy init are not part of the peak or the time
                harness.sync(device)
            # On CPU the measured call is also the warm-up (nothing is compiled there; saves one call).
            r["peak_bytes"] = harness.peak_extra_bytes(fn, device)
            if timing:
                r["ms"], r["ms_p20"], r["ms_p80"] = harness.time_ms(fn, device, warmup=device == "cuda", budget_s=budget_s)
        except Exception as e:  # one failing provider must not stop the table
            r["status"] = "oom" if _is_oom(e) else "error"
            r["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        results.append(r)
        if device == "cuda":
            torch.cuda.empty_cache()
    del inp
    return results


def child_main(case_name, provider, modes, device, conn, budget_s=1.0):
    """Entry of a forked case process (bench/run.py): results go back through ``conn``."""
    try:
        conn.send(run_case(parse_case(case_name), provider, modes, device, budget_s=budget_s))
    finally:
        conn.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--case", required=True)
    ap.add_argument("--provider", required=True)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default=harness.device_kind())
    ap.add_argument("--budget", type=float, default=1.0, help="CPU: seconds of timed calls per mode")
    a = ap.parse_args(argv)
    res = run_case(parse_case(a.case), a.provider, a.modes.split(","), a.device, budget_s=a.budget)
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
