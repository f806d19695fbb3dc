"""Peak host memory of the fused-linear SDAR loss on the torch path does not grow with N.

How it is measured: every configuration runs in a fresh Python process (``python -m`` this file with
arguments). After the inputs exist, the process resets the kernel's resident-set high-water mark
(``echo 5 > /proc/self/clear_refs``), records VmRSS, runs forward + backward, and reads VmHWM from
/proc/self/status; "extra" = VmHWM - VmRSS before the call. The CPU allocator returns large blocks to
the OS (mmap), so RSS follows the live tensors. Gradients of hidden / weight are part of "extra".

``python tests/test_linear_sdar_loss_memory.py --report`` prints the table in csrc_notes/linear_sdar_loss.md
(fused-linear vs eager matmul + sdar_loss / sdar_loss_reference at N=8192, V=32000, H=256, fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

MIB = 1 << 20


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _child(mode, N, V, H):
    import torch
    # The first call of any torch.library custom op imports torch's compiler stack (~150 MiB of RSS, once
    # per process); import it up front so the measurement is the op's working memory, not that import.
    import torch._dynamo  # noqa: F401

    import sdar_kernels as sk
    from sdar_kernels.reference import sdar_loss_reference

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).requires_grad_(True)
    teacher_hidden = hidden.detach() + 0.5 * torch.randn(N, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    advantages = torch.randn(N, generator=g)
    mask = torch.ones(N, dtype=torch.bool)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if mode == "fused":
        out = sk.linear_sdar_loss(hidden, weight, labels, teacher_hidden=teacher_hidden, mask=mask,
                                  advantages=advantages, backend="torch")
    else:
        logits = hidden @ weight.T
        with torch.no_grad():
            teacher_logits = teacher_hidden @ weight.T
        fn = sk.sdar_loss if mode == "eager" else sdar_loss_reference
        extra = {"backend": "torch"} if mode == "eager" else {}
        out = fn(logits, labels, teacher_logits=teacher_logits, mask=mask, advantages=advantages, **extra)
    loss = out.loss.detach()
    out.loss.backward()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    print(json.dumps({"mode": mode, "N": N, "V": V, "H": H, "base": base, "peak": peak,
                      "extra": peak - base, "hwm_reset": reset, "loss": loss.item(), "seconds": seconds}))


def measure(mode, N, V, H):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("SDAR_LINEAR_CHUNK_ROWS", None)
    env.pop("SDAR_LINEAR_CHUNK_BYTES", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, str(N), str(V), str(H)],
                       capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_memory_bounded_in_N():
    V, H = 32000, 256
    small, big = measure("fused", 1024, V, H), measure("fused", 8192, V, H)
    logits_fp32 = 8192 * V * 4                     # one [N, V] fp32 buffer: 1000 MiB
    msg = f"small={small['extra'] / MIB:.0f} MiB, big={big['extra'] / MIB:.0f} MiB"
    assert big["extra"] < 0.25 * logits_fp32, msg
    # from N=1024 to 8192 only grad_hidden (N*H*4) and [N] per-token outputs grow: 7 MiB, plus slack
    assert big["extra"] - small["extra"] < (8192 - 1024) * H * 4 + 48 * MIB, msg
    assert abs(small["loss"]) < 1e3 and abs(big["loss"]) < 1e3


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        _child(sys.argv[2], *map(int, sys.argv[3:6]))
    elif sys.argv[1] == "--report":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        for mode in ("fused", "eager", "reference"):
            for N in ((1024, 8192) if mode == "fused" else (8192,)):
                r = measure(mode, N, 32000, 256)
                print(f"{mode:9s} N={N:5d}: peak extra {r['extra'] / MIB:7.0f} MiB "
                      f"(base {r['base'] / MIB:.0f} MiB, hwm reset {r['hwm_reset']}), fwd+bwd {r['seconds']:.1f} s", flush=True)
