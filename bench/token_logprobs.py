"""Benchmark of the trainer seam ``sdar_kernels.token_logprobs`` / ``linear_token_logprobs``:
``python -m bench.token_logprobs [--set quick|cpu|gpu] [--provider NAME ...] [--no-csv]``.

Every trainer turns logits into per-token log p(y) and entropy before its own loss; this times that step
and its backward (for random upstream gradients of both outputs, as a trainer's loss sends) against:

- eager        fp32 ``log_softmax`` + ``gather`` + verl's ``entropy_from_logits`` (what trainers write);
               the linear op first forms the fp32 logits ``hidden @ W.T``
- sdar-torch   ``token_logprobs`` / ``linear_token_logprobs`` (chunked torch engine, one fused backward)
- trl-chunked  TRL's own fused LM head (``trl.trainer.utils._ChunkedLogProbFunction``, TRL >= 1.16),
               linear op only (it takes hidden states), where TRL is installed
- liger        Liger-Kernel's fused (linear) cross-entropy for log p(y); it has no entropy, so it runs at
               config ``lp`` only, on CUDA (where liger-kernel is installed)

Measured like bench/harness.py defines (median / p20 / p80 ms; peak memory over live inputs, each
(case, provider) in a fresh process on CPU). Rows are appended (never overwritten) to
``<results>/<device>_token_logprobs.csv``: ``bench/results/local/`` (git-ignored) by default, the tracked
``bench/results/`` with ``--record``, as ``python -m bench`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from . import harness

RESULTS = os.path.join(harness.ROOT, "bench", "results")
LOCAL_RESULTS = os.path.join(RESULTS, "local")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
MODES = ("fwd", "fwd_bwd")
CONFIGS = {"lp+H": True, "lp": False}     # config name -> entropy on


@dataclass(frozen=True)
class TokenCase:
    op: str              # "token_logprobs" | "linear_token_logprobs"
    N: int
    V: int
    H: int = 0
    dtype: str = "float32"
    config: str = "lp+H"

    @property
    def name(self):
        dt = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[self.dtype]
        shape = f"N{self.N}-V{self.V}" + (f"-H{self.H}" if self.H else "")
        return f"{self.op}:{shape}:{dt}:{self.config}"

    @classmethod
    def parse(cls, name):
        op, shape, dt, config = name.split(":")
        dims = {p[0]: int(p[1:]) for p in shape.split("-")}
        dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dt]
        return cls(op, dims["N"], dims["V"], dims.get("H", 0), dtype, config)


SETS = {
    "quick": [TokenCase("token_logprobs", 128, 32000), TokenCase("linear_token_logprobs", 128, 32000, 256)],
    "cpu": [TokenCase("token_logprobs", 512, 32000), TokenCase("token_logprobs", 512, 32000, config="lp"),
            TokenCase("token_logprobs", 256, 151936), TokenCase("token_logprobs", 256, 151936, dtype="bfloat16"),
            TokenCase("linear_token_logprobs", 512, 32000, 256),
            TokenCase("linear_token_logprobs", 512, 32000, 256, config="lp")],
    "gpu": [TokenCase("token_logprobs", 8192, 151936, dtype="bfloat16"),
            TokenCase("token_logprobs", 8192, 151936, dtype="bfloat16", config="lp"),
            TokenCase("token_logprobs", 8192, 128256, dtype="bfloat16"),
            TokenCase("linear_token_logprobs", 8192, 151936, 4096, dtype="bfloat16"),
            TokenCase("linear_token_logprobs", 8192, 151936, 4096, dtype="bfloat16", config="lp")],
}


def make_inputs(case, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[case.dtype]
    N, V, H = case.N, case.V, case.H
    inp = dict(labels=torch.randint(0, V, (N,), generator=g, device=device),
               mask=torch.rand(N, generator=g, device=device) > 0.1,
               g_lp=torch.randn(N, generator=g, device=device), g_h=torch.randn(N, generator=g, device=device))
    if case.op == "token_logprobs":
        inp["logits"] = torch.randn(N, V, generator=g, device=device, dtype=dt).mul_(2.0)
    else:
        inp["hidden"] = torch.randn(N, H, generator=g, device=device, dtype=dt)
        inp["weight"] = torch.randn(V, H, generator=g, device=device, dtype=dt).mul_(2.0 / H ** 0.5)
    return inp


def _trainer_loss(logp, entropy, inp):
    """What a trainer's loss sends back: a per-token upstream gradient for each statistic."""
    m = inp["mask"].to(torch.float32)
    loss = (inp["g_lp"] * logp.float() * m).sum()
    return loss if entropy is None else loss + (inp["g_h"] * entropy.float() * m).sum()


def eager(inp, case):
    from .eager import entropy_from_logits
    z = inp["logits"] if case.op == "token_logprobs" else inp["hidden"].float() @ inp["weight"].float().T
    z = z.float()
    logp = torch.log_softmax(z, -1).gather(-1, inp["labels"][:, None]).squeeze(-1)
    return _trainer_loss(logp, entropy_from_logits(z) if CONFIGS[case.config] else None, inp)


def sdar_torch(inp, case):
    import sdar_kernels as sk
    kw = dict(mask=inp["mask"], entropy=CONFIGS[case.config], backend="torch")
    if case.op == "token_logprobs":
        st = sk.token_logprobs(inp["logits"], inp["labels"], **kw)
    else:
        st = sk.linear_token_logprobs(inp["hidden"], inp["weight"], inp["labels"], **kw)
    return _trainer_loss(st.logprobs, st.entropy, inp)


def trl_chunked(inp, case):
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction
    outputs = ("entropy",) if CONFIGS[case.config] else ()
    logp, entropy, *_ = _ChunkedLogProbFunction.apply(inp["hidden"], inp["weight"], None, inp["labels"], 1.0,
                                                      _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, outputs)
    return _trainer_loss(logp, entropy, inp)


def liger(inp, case):
    if case.op == "token_logprobs":
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction as CE
        logp = -CE.apply(inp["logits"], inp["labels"], None, -100, 0.0, 0.0, "none")[0]
    else:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as FLCE
        logp = -FLCE.apply(inp["hidden"], inp["weight"], inp["labels"], None, None, -100, 0.0, 0.0, "none")[0]
    return _trainer_loss(logp, None, inp)


PROVIDERS = {"eager": eager, "sdar-torch": sdar_torch, "trl-chunked": trl_chunked, "liger": liger}


def unavailable(provider, case, device):
    if provider == "trl-chunked":
        if case.op != "linear_token_logprobs":
            return "TRL's fused head takes hidden states (linear op only)"
        try:
            from trl.trainer.utils import _ChunkedLogProbFunction  # noqa: F401
        except Exception as e:
            return f"TRL >= 1.16 not installed ({type(e).__name__})"
    if provider == "liger":
        if device != "cuda":
            return "Liger-Kernel's Triton kernels need CUDA"
        if CONFIGS[case.config]:
            return "Liger-Kernel has no entropy; compared at config lp"
        try:
            import liger_kernel  # noqa: F401
        except Exception as e:
            return f"liger-kernel not installed ({type(e).__name__})"
    return None


def measure(case, provider, device, budget_s):
    """Result dicts (one per mode) for one (case, provider), in this process."""
    inp = make_inputs(case, device)
    targets = [inp["logits"]] if case.op == "token_logprobs" else [inp["hidden"], inp["weight"]]
    fn_loss = PROVIDERS[provider]
    rows = []
    for mode in MODES:
        r = dict(mode=mode, status="ok", note="")
        try:
            for t in targets:
                t.requires_grad_(mode == "fwd_bwd")
            if mode == "fwd":
                def fn():
                    with torch.no_grad():
                        return fn_loss(inp, case)
            else:
                def fn():
                    return torch.autograd.grad(fn_loss(inp, case), targets)
            if device == "cuda":
                fn()
                harness.sync(device)
            r["peak_bytes"] = harness.peak_extra_bytes(fn, device)
            r["ms"], r["ms_p20"], r["ms_p80"] = harness.time_ms(fn, device, warmup=device == "cuda", budget_s=budget_s)
        except Exception as e:
            oom = isinstance(e, MemoryError) or "out of memory" in str(e).lower()
            r.update(status="oom" if oom else "error", note=f"{type(e).__name__}: {str(e)[:160]}")
        rows.append(r)
    return rows


def run_one(case, provider, device, budget_s, in_process):
    if in_process or device == "cuda":
        return measure(case, provider, device, budget_s)
    cmd = [sys.executable, "-m", "bench.token_logprobs", "--one", case.name, "--provider", provider,
           "--budget", str(budget_s)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=harness.ROOT)
    if out.returncode != 0:
        return [dict(mode=m, status="error", note=out.stderr.strip().splitlines()[-1][:160]) for m in MODES]
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default=None, choices=list(SETS), help="default: quick on CPU, gpu on CUDA")
    ap.add_argument("--provider", action="append", choices=list(PROVIDERS))
    ap.add_argument("--budget", type=float, default=1.0, help="CPU: seconds of timed calls per mode")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--results", default=None, help="CSV folder (default bench/results/local/, git-ignored)")
    ap.add_argument("--record", action="store_true", help="append to the tracked bench/results/ instead")
    ap.add_argument("--in-process", action="store_true", help="CPU: no fresh process per case (peaks mix)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)   # child: one case, JSON on stdout
    a = ap.parse_args(argv)
    device = harness.device_kind()
    if a.one:
        print(json.dumps(measure(TokenCase.parse(a.one), a.provider[0], device, a.budget)))
        return 0
    set_name = a.set or ("gpu" if device == "cuda" else "quick")
    env = harness.environment(device)
    rows = []
    for case in SETS[set_name]:
        for provider in a.provider or list(PROVIDERS):
            why = unavailable(provider, case, device)
            if why:
                print(f"skip {provider:12s} {case.name}: {why}")
                continue
            for r in run_one(case, provider, device, a.budget, a.in_process):
                rows.append(dict(env, op=case.op, case=case.name, N=case.N, V=case.V, H=case.H or "",
                                 dtype=case.dtype, config=case.config, provider=provider, set=set_name,
                                 peak_mb=r.pop("peak_bytes", 0) / 2 ** 20 if r["status"] == "ok" else "", **r))
    for r in rows:
        base = next((e for e in rows if e["case"] == r["case"] and e["mode"] == r["mode"]
                     and e["provider"] == "eager" and e["status"] == "ok"), None)
        if base and r["status"] == "ok":
            r["speedup_vs_eager"] = base["ms"] / r["ms"]
            r["mem_ratio_vs_eager"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] else ""
    print(f"\n{env['device']}, torch {env['torch']}, {env['date']}, set {set_name}")
    print(f"{'case':44s} {'mode':8s} {'provider':12s} {'ms':>9s} {'p20-p80':>17s} {'peak MB':>9s} "
          f"{'x eager':>8s} {'mem x':>6s}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['case']:44s} {r['mode']:8s} {r['provider']:12s} {r['status']}: {r['note']}")
            continue
        print(f"{r['case']:44s} {r['mode']:8s} {r['provider']:12s} {r['ms']:9.2f} "
              f"{r['ms_p20']:8.2f}-{r['ms_p80']:<8.2f} {r['peak_mb']:9.1f} "
              f"{r.get('speedup_vs_eager', 0):8.2f} {r.get('mem_ratio_vs_eager') or 0:6.2f}")
    if not a.no_csv:
        folder = a.results or (RESULTS if a.record else LOCAL_RESULTS)
        harness.append_csv(rows, os.path.join(folder, f"{harness.device_slug(device)}_token_logprobs.csv"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
