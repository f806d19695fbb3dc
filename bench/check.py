"""Correctness of every provider against ``sdar_kernels.reference.sdar_loss_reference`` (loss and gradient).

Runs each provider once at small odd shapes in fp32 (no timing) and compares the token-mean loss and the
gradient w.r.t. the student logits (fused-linear op: hidden states and weight, through ``logits = h W^T``)
with the eager reference. On CPU it is meant to run under ``TRITON_INTERPRET=1`` (``python -m bench``
starts it that way), so the Triton kernels and Liger-Kernel are checked there too. It is also the CI smoke
test (tests/test_bench_smoke.py).

    TRITON_INTERPRET=1 python -m bench.check [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .cases import Case
from .inputs import grad_targets, make_inputs
from .providers import PROVIDERS

# Odd sizes; V crosses a power-of-two block boundary.
CHECK_CASES = [
    Case("sdar_loss", "tiny", 7, V=1037, dtype="float32", config="official"),
    Case("sdar_loss", "tiny", 7, V=1037, dtype="float32", config="no-entropy"),
    Case("linear_sdar_loss", "tiny", 7, V=1037, H=48, dtype="float32", config="no-entropy"),
]
RTOL = 2e-4
ATOL = 1e-6


def reference_loss(inp, case):
    from sdar_kernels.reference import sdar_loss_reference
    if case.op == "sdar_loss":
        logits, teacher = inp["logits"], inp["teacher_logits"]
    else:
        logits = inp["hidden"] @ inp["weight"].t()
        teacher = (inp["teacher_hidden"] @ inp["weight"].t()).detach()
    return sdar_loss_reference(logits, inp["labels"], teacher_logits=teacher, mask=inp["mask"],
                               advantages=inp["advantages"], old_logprobs=inp["old_logprobs"],
                               ref_logprobs=inp["ref_logprobs"], **case.options).loss


def _loss_and_grads(fn, case, device):
    inp = make_inputs(case, device, seed=1)
    targets = grad_targets(inp, case.op)
    for t in targets:
        t.requires_grad_(True)
    loss = fn(inp, case)
    grads = torch.autograd.grad(loss, targets)
    return loss.detach().double(), [g.double() for g in grads]


def check_provider(name, case, device, ref=None):
    """dict(provider, case, status ok/FAIL/skip/error, loss_err, grad_err, note)."""
    row = dict(provider=name, case=case.name, status="ok", loss_err=None, grad_err=None, note="")
    p = PROVIDERS[name]
    reason = p.unavailable(case, device, timing=False)
    if reason:
        row.update(status="skip", note=reason)
        return row
    try:
        ref_loss, ref_grads = ref or _loss_and_grads(reference_loss, case, device)
        loss, grads = _loss_and_grads(p.loss, case, device)
    except Exception as e:
        row.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return row
    row["loss_err"] = float((loss - ref_loss).abs())
    row["grad_err"] = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(grads, ref_grads))
    ok = row["loss_err"] <= RTOL * float(ref_loss.abs()) + ATOL and row["grad_err"] <= RTOL
    if not torch.isfinite(loss) or not ok:
        row["status"] = "FAIL"
        row["note"] = f"tolerance rtol={RTOL} (loss) / {RTOL} of max|grad|"
    return row


def run_check(device=None, providers=None, cases=None):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for case in cases or CHECK_CASES:
        ref = _loss_and_grads(reference_loss, case, device)
        for name in providers or PROVIDERS:
            rows.append(check_provider(name, case, device, ref))
    return rows


def format_rows(rows):
    out = [f"{'case':<50} {'provider':<12} {'status':<6} {'|dloss|':>9} {'grad err':>9}  note"]
    for r in rows:
        le = "" if r["loss_err"] is None else f"{r['loss_err']:.1e}"
        ge = "" if r["grad_err"] is None else f"{r['grad_err']:.1e}"
        out.append(f"{r['case']:<50} {r['provider']:<12} {r['status']:<6} {le:>9} {ge:>9}  {r['note']}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON line (for python -m bench)")
    a = ap.parse_args(argv)
    rows = run_check()
    if a.json:
        sys.stdout.write(json.dumps(rows) + "\n")
    else:
        print(format_rows(rows))
    sys.exit(1 if any(r["status"] in ("FAIL", "error") for r in rows) else 0)


if __name__ == "__main__":
    main()
