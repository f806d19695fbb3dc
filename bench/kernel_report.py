"""Ahead-of-time code-generation report of the Triton kernels for the H100 (sm_90a), on a machine
without a GPU: registers, spills, occupancy, shared memory, global load/store widths and, loop by loop,
what one iteration issues (bench/sass.py), per kernel variant.

    python -m bench.kernel_report                  # every entry of REGISTRY
    python -m bench.kernel_report --json FILE      # also write every variant's facts as JSON
    python -m bench.kernel_report --sass DIR       # also keep the PTX and SASS of each variant in DIR

Each variant is compiled with ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", 90, 32))`` (no driver involved) and the cubin is read with the ``cuobjdump``
bundled in the triton wheel (``--dump-resource-usage``, ``--dump-sass``). Regressions to look for:
LOCAL > 0 / LDL-STL (register spills), and the logits loads falling from LDG.E.128 (16-byte vectors,
8 bf16 per thread-load) to LDG.E.U16 (one element per load).

The loop table gives the counts of one iteration of each streaming loop (pass 1 statistics, jsd's pass
1b, pass 2 gradient, a masked row's zero fill) and, from the tile the variant launches with, the
instructions, MUFU ops and 16-byte accesses per logit. ``tests/test_kernel_report.py`` asserts the
properties the kernels are written to keep (no barrier or shuffle inside a pass's loop, no spills,
<= 64 registers, 128-bit accesses).

Kernel authors extend ``REGISTRY``: one ``Variant`` per interesting specialization, with the argument
values of a representative launch. Like Triton's JIT, pointers are taken as 16-byte aligned (torch
allocations are), integers become i32 or i64 by range and carry ``tt.divisibility = 16`` when divisible
by 16 (every real vocabulary size is), so the compiled code is the one the launch would get.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from . import sass as sass_tools

TARGET_ARCH = 90  # sm_90a (H100 / H200)


@dataclass
class Ptr:
    dtype: str            # triton type name: bf16, fp16, fp32, i64, u8, ...
    aligned: bool = True  # 16-byte aligned base address


@dataclass
class Variant:
    name: str
    kernel: str                      # "module:function"
    args: dict                       # runtime argument name -> Ptr / int / float / bool
    constexprs: dict                 # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    expect: dict = field(default_factory=dict)  # optional checks, e.g. {"max_local": 0}
    meta: dict = field(default_factory=dict)    # op, mode, dtype, N, V, grid, elements per thread per iteration


_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def _sdar_rows_variants():
    """sdar_kernels/sdar_loss/kernels.py at the launches of the headline benchmark (N=8192, one program per
    row), the gradient kernel of the two-phase backward, and the vocabulary-split kernels at N=64."""
    import torch

    from sdar_kernels.sdar_loss.kernels import DISTILL_CODES
    from sdar_kernels.sdar_loss.launch import plan_launch

    def plan(N, V, dt, distill, splits=None):
        # one program per row (N=8192), or the vocabulary splits an H100 (132 SMs) gets at N=64
        return plan_launch(N, V, getattr(torch, _DTYPES[dt]), 132 if splits else None)

    def meta(op, mode, dt, N, V, P, grid):
        return dict(op=op, mode=mode, dtype=dt, N=N, V=V, grid=grid, num_warps=P.warps, BLOCK_R=P.block_r,
                    VEC=P.vec, elements_per_thread=P.block // (P.warps * 32))

    strides = lambda N, V, names: {n: (N * V if n.endswith("_b") else V) for n in names}  # noqa: E731
    in_strides = ("stride_logits_b", "stride_logits_t", "stride_teacher_b", "stride_teacher_t")
    out = []
    for label, N, V, dt, distill, fused in [
        ("qwen3 N8k bf16 official fwd+grad", 8192, 151936, "bf16", "sampled", True),
        ("qwen3 N8k bf16 official loss only", 8192, 151936, "bf16", "sampled", False),
        ("gemma3 N8k bf16 official fwd+grad (i64 strides)", 8192, 262144, "bf16", "sampled", True),
        ("qwen3 N8k bf16 fkl fwd+grad", 8192, 151936, "bf16", "fkl", True),
        ("qwen3 N8k bf16 rkl fwd+grad", 8192, 151936, "bf16", "rkl", True),
        ("qwen3 N8k bf16 jsd fwd+grad", 8192, 151936, "bf16", "jsd", True),
        ("qwen3 N8k fp32 official fwd+grad", 8192, 151936, "fp32", "sampled", True),
    ]:
        P = plan(N, V, dt, distill)
        entropy = distill == "sampled"
        args = dict(
            grad_ptr=Ptr(dt), out_ptr=Ptr("fp32"), stats_ptr=Ptr("fp32"),
            logits_ptr=Ptr(dt), teacher_ptr=Ptr(dt), labels_ptr=Ptr("i64"), mask_ptr=Ptr("u8"),
            weights_ptr=Ptr("fp32"), teacher_logp_ptr=Ptr("fp32"), adv_ptr=Ptr("fp32"), old_ptr=Ptr("fp32"),
            ref_ptr=Ptr("fp32"), **strides(N, V, in_strides + ("stride_grad_b", "stride_grad_t")),
            seq_len=N, N=N, V=V,
            k_scale=1.4426950408889634, inv_tau=1.0, gate_beta=5.0, distill_coef=0.01, jsd_beta=0.5,
            log2_b=-1.0, log2_1mb=-1.0, clip_low=0.2, clip_high=0.2, clip_c=3.0, kl_coef=0.01,
            entropy_coef=0.001 if entropy else 0.0,
        )
        cx = dict(BLOCK_R=P.block_r, VEC=P.vec, HAS_TEACHER_LOGITS=True, HAS_TEACHER_LOGPROBS=False,
                  DISTILL=DISTILL_CODES[distill], HAS_ADV=True, HAS_OLD=True, HAS_DUAL_CLIP=True, HAS_KL=True,
                  HAS_ENTROPY=entropy, STORE_STATS=not fused, WRITE_GRAD=fused)
        out.append(Variant(f"sdar_rows_kernel [{label}]", "sdar_kernels.sdar_loss.kernels:sdar_rows_kernel",
                           args, cx, num_warps=P.warps, expect={"max_local": 0},
                           meta=meta("sdar_loss", distill, dt, N, V, P, f"({N},)")))

    # the two-phase backward (reduction "none", inplace_backward), and the vocabulary splits at N=64
    for label, N, V, dt, distill, splits in [
        ("qwen3 N8k bf16 sampled+entropy backward", 8192, 151936, "bf16", "sampled", False),
        ("qwen3 N8k bf16 rkl backward", 8192, 151936, "bf16", "rkl", False),
        ("qwen3 N64 bf16 sampled+entropy split gradient", 64, 151936, "bf16", "sampled", True),
    ]:
        P = plan(N, V, dt, distill, splits)
        args = dict(grad_ptr=Ptr(dt), logits_ptr=Ptr(dt), teacher_ptr=Ptr(dt), labels_ptr=Ptr("i64"),
                    mask_ptr=Ptr("u8"), weights_ptr=Ptr("fp32"), stats_ptr=Ptr("fp32"), ent_rows_ptr=Ptr("fp32"),
                    **strides(N, V, in_strides + ("stride_grad_b", "stride_grad_t")), seq_len=N, V=V,
                    V_SPLIT=P.v_split, k_scale=1.4426950408889634, inv_tau=1.0, distill_coef=0.01, jsd_beta=0.5,
                    log2_b=-1.0, log2_1mb=-1.0, entropy_coef=0.001)
        cx = dict(BLOCK_R=P.block_r, VEC=P.vec, HAS_ENTROPY=True, DISTILL=DISTILL_CODES[distill], ENT_PER_ROW=False)
        out.append(Variant(f"sdar_grad_kernel [{label}]", "sdar_kernels.sdar_loss.kernels:sdar_grad_kernel",
                           args, cx, num_warps=P.warps, expect={"max_local": 0},
                           meta=meta("sdar_loss", distill, dt, N, V, P, f"({N}, {P.splits})")))
    for label, N, V, dt, distill, splits in [
        ("qwen3 N64 bf16 sampled split statistics", 64, 151936, "bf16", "sampled", True),
        ("qwen3 N64 bf16 fkl split statistics", 64, 151936, "bf16", "fkl", True),
    ]:
        P = plan(N, V, dt, distill, splits)
        args = dict(part_ptr=Ptr("fp32"), logits_ptr=Ptr(dt), teacher_ptr=Ptr(dt), mask_ptr=Ptr("u8"),
                    **strides(N, V, in_strides), seq_len=N, V=V, V_SPLIT=P.v_split, k_scale=1.4426950408889634)
        cx = dict(BLOCK_R=P.block_r, VEC=P.vec, HAS_TEACHER_LOGITS=True, DISTILL=DISTILL_CODES[distill])
        out.append(Variant(f"partial_kernel [{label}]", "sdar_kernels.sdar_loss.kernels:partial_kernel",
                           args, cx, num_warps=P.warps, expect={"max_local": 0},
                           meta=meta("sdar_loss", distill, dt, N, V, P, f"({N}, {P.splits})")))
    return out


def _linear_logprob_variants():
    """sdar_kernels/linear_sdar_loss/logprob_kernels.py:partials_kernel (the matmul + online-LSE main loop)
    at the launches the tile table picks for Qwen3-8B-sized heads (H=4096, V=151936)."""
    import torch

    from sdar_kernels.linear_sdar_loss.logprob_launch import tile_config, vocab_splits
    out = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    H, V = 4096, 151936
    for label, N, dt, entropy in [
        ("N8k bf16 logp+lse", 8192, "bf16", False),
        ("N8k bf16 logp+lse+entropy", 8192, "bf16", True),
        ("N8k fp16 logp+lse", 8192, "fp16", False),
        ("N64 bf16 logp+lse (small-N tiles)", 64, "bf16", False),
        ("N8k fp32 logp+lse (ieee, no tensor cores)", 8192, "fp32", False),
    ]:
        cfg = tile_config(N, dtypes[dt])
        splits, per_split = vocab_splits(-(-N // cfg.block_n), -(-V // cfg.block_v), cfg.group_rows,
                                         132 * cfg.ctas_per_sm)
        args = dict(part_ptr=Ptr("fp32"), hidden_ptr=Ptr(dt), weight_ptr=Ptr(dt), bias_ptr=Ptr("fp32"),
                    labels_ptr=Ptr("i64"), mask_ptr=Ptr("u8"), stride_hidden=H, stride_weight=H, N=N, V=V, H=H,
                    tiles_per_split=per_split, num_splits=splits, k_scale=1.4426950408889634)
        cx = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_R=cfg.group_rows,
                  HAS_BIAS=False, ENTROPY=entropy, IN_FP32=dt == "fp32")
        expect = {"max_local": 0} if dt == "fp32" else {"max_local": 0, "mma": True}
        out.append(Variant(f"linear_logprobs partials_kernel [{label}]",
                           "sdar_kernels.linear_sdar_loss.logprob_kernels:partials_kernel", args, cx,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages, expect=expect,
                           meta=dict(op="linear_logprobs", mode="entropy" if entropy else "logp", dtype=dt,
                                     N=N, V=V, H=H, grid=f"({-(-N // cfg.block_n)} row blocks, {splits} splits)")))
    return out


# Builders of the registry; add one per kernel file.
REGISTRY = [_sdar_rows_variants, _linear_logprob_variants]


# ---------------------------------------------------------------- compile
def _sig_and_attrs(fn, v: Variant):
    names = list(fn.arg_names)
    missing = [n for n in names if n not in v.args and n not in v.constexprs]
    extra = [n for n in list(v.args) + list(v.constexprs) if n not in names]
    if missing or extra:
        raise ValueError(f"{v.name}: registry out of date with the kernel signature; missing {missing}, "
                         f"unknown {extra}")
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        if n in v.constexprs:
            sig[n] = "constexpr"
            continue
        a = v.args[n]
        div16 = False
        if isinstance(a, Ptr):
            sig[n] = "*" + a.dtype
            div16 = a.aligned
        elif isinstance(a, bool):
            sig[n] = "i1"
        elif isinstance(a, int):
            sig[n] = "i32" if -2**31 <= a < 2**31 else "i64"
            div16 = a % 16 == 0
        elif isinstance(a, float):
            sig[n] = "fp32"
        else:
            raise TypeError(f"{v.name}: argument {n} has unsupported value {a!r}")
        if div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _resolve(path):
    mod, fn = path.split(":")
    return getattr(__import__(mod, fromlist=[fn]), fn)


def compile_variant(v: Variant):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _resolve(v.kernel)
    sig, attrs = _sig_and_attrs(fn, v)
    src = ASTSource(fn, sig, constexprs=dict(v.constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32),
                          options=dict(num_warps=v.num_warps, num_stages=v.num_stages))


def cuobjdump_path():
    import triton
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(p):
        return p
    from shutil import which
    return which("cuobjdump")


def analyse(cubin: bytes, keep_dir=None, name="kernel", elements_per_thread=None, threads=256):
    """Registers, stack, shared, local bytes, occupancy, counts of global/local memory instructions by width,
    and the loop table (bench/sass.py)."""
    tool = cuobjdump_path()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (bundled in triton's backends/nvidia/bin)")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    info = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", res)
        info[key.lower()] = int(m.group(1)) if m else None
    instrs = sass_tools.parse(sass)
    ops = {}
    for i in instrs:
        if i.op.startswith(("LDG", "STG", "LDL", "STL", "LDS", "STS")):
            op = sass_tools.memory_op(i.op)
            ops[op] = ops.get(op, 0) + 1
    info["ops"] = dict(sorted(ops.items()))
    info["sass_lines"] = len(instrs)
    info["ctas_per_sm"] = sass_tools.occupancy(info["reg"] or 0, threads, info["shared"] or 0)
    info["loops"] = sass_tools.analyse_loops(sass, elements_per_thread)
    # tensor-core matmul instructions: HGMMA (sm_90 warpgroup MMA, "wgmma") or HMMA (warp-level mma.sync)
    info["mma"] = {op: sum(i.op.startswith(op + ".") for i in instrs) for op in ("HGMMA", "HMMA")}
    if keep_dir:
        os.makedirs(keep_dir, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
        with open(os.path.join(keep_dir, safe + ".sass"), "w") as f:
            f.write(sass)
    return info


def report(keep_dir=None, stream=sys.stdout, only=None):
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("triton was imported under TRITON_INTERPRET=1; run kernel_report in a fresh process")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of the JIT (and of triton 3.6)
    variants = [v for build in REGISTRY for v in build()]
    if only:
        variants = [v for v in variants if only in v.name]
    if not variants:
        print("no Triton kernels registered/importable in this checkout", file=stream)
        return []
    import triton
    print(f"Triton {triton.__version__}, target sm_{TARGET_ARCH}a, cuobjdump: {cuobjdump_path()}", file=stream)
    rows = []
    for v in variants:
        cx = v.constexprs
        row = dict(name=v.name, kernel=v.kernel.split(":")[1], warps=v.num_warps,
                   block=cx.get("BLOCK_R", 0) * cx.get("VEC", 0) or cx.get("BLOCK_V"), **v.meta)
        try:
            k = compile_variant(v)
            row.update(analyse(k.asm["cubin"], keep_dir, v.name, v.meta.get("elements_per_thread"),
                               threads=32 * v.num_warps))
            row["shared_meta"] = getattr(k.metadata, "shared", None)
            if keep_dir:
                safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", v.name).strip("_")
                with open(os.path.join(keep_dir, safe + ".ptx"), "w") as f:
                    f.write(k.asm["ptx"])
            bad = []
            # spills show as LOCAL bytes or as stack-frame LDL / STL (with LOCAL 0)
            local_ops = sum(n for op, n in row["ops"].items() if op.startswith(("LDL", "STL")))
            if "max_local" in v.expect and (row["local"] or 0) > v.expect["max_local"]:
                bad.append(f"LOCAL {row['local']} > {v.expect['max_local']} (spills)")
            if "max_local" in v.expect and v.expect["max_local"] == 0 and local_ops:
                bad.append(f"{local_ops} LDL/STL instructions (register spills to the stack)")
            if v.expect.get("mma") and not any(row["mma"].values()):
                bad.append("no HGMMA / HMMA (the matmul is not on the tensor cores)")
            row["status"] = "REGRESSION: " + "; ".join(bad) if bad else "ok"
        except Exception as e:
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        _print_row(row, stream)
    return rows


def _print_row(r, stream):
    print(f"\n{r['name']}  (num_warps={r['warps']}, tile={r['block']} logits): {r['status']}", file=stream)
    if "reg" in r:
        print(f"  registers {r['reg']}/thread ({r['ctas_per_sm']} CTAs/SM), stack {r['stack']} B, "
              f"local (spill) {r['local']} B, shared {r['shared']} B, {r['sass_lines']} SASS instructions",
              file=stream)
        g = {k: n for k, n in r["ops"].items() if k.startswith(("LDG", "STG"))}
        loc = {k: n for k, n in r["ops"].items() if k.startswith(("LDL", "STL"))}
        print("  global loads/stores: " + (", ".join(f"{k} x{n}" for k, n in g.items()) or "none"), file=stream)
        if any(r["mma"].values()):
            print("  tensor-core instructions: " + ", ".join(f"{k} x{n}" for k, n in r["mma"].items() if n),
                  file=stream)
        if loc:
            print("  local loads/stores (spills): " + ", ".join(f"{k} x{n}" for k, n in loc.items()), file=stream)
        for lp in r["loops"]:
            per = (f", {lp['instructions_per_element']} instr/logit, {lp['mufu_per_element']} MUFU/logit"
                   if "instructions_per_element" in lp else "")
            mem = ", ".join(f"{k} x{n}" for k, n in lp["memory"].items())
            print(f"  loop {lp['start']} {lp['kind']:<14} {lp['instructions']} instr/iteration{per}; "
                  f"BAR {lp['bar']}, SHFL {lp['shfl']}, MUFU {lp['mufu'] or 0}, int64 carries "
                  f"{lp['int64_carry']}; {mem}", file=stream)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sass", metavar="DIR", help="write the SASS and PTX of each variant into DIR")
    ap.add_argument("--only", metavar="TEXT", help="only the variants whose name contains TEXT")
    ap.add_argument("--json", metavar="FILE", help="write every variant's facts (and its loop table) to FILE")
    a = ap.parse_args(argv)
    rows = report(a.sass, only=a.only)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
