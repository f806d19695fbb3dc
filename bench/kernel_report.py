"""Ahead-of-time code-generation report of the Triton kernels for the H100 (sm_90a), on a machine
without a GPU: registers, spills, shared memory and global load/store widths per kernel variant.

    python -m bench.kernel_report              # every entry of REGISTRY
    python -m bench.kernel_report --sass DIR   # also keep the PTX and SASS of each variant in DIR

Each variant is compiled with ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", 90, 32))`` (no driver involved) and the cubin is read with the ``cuobjdump``
bundled in the triton wheel (``--dump-resource-usage``, ``--dump-sass``). Regressions to look for:
LOCAL > 0 / LDL-STL (register spills), and the logits loads falling from LDG.E.128 (16-byte vectors,
8 bf16 per thread-load) to LDG.E.U16 (one element per load).

Instruction counts are static (SASS lines), not per iteration: read the loops with ``--sass``.

Kernel authors extend ``REGISTRY``: one ``Variant`` per interesting specialization, with the argument
values of a representative launch. Like Triton's JIT, pointers are taken as 16-byte aligned (torch
allocations are), integers become i32 or i64 by range and carry ``tt.divisibility = 16`` when divisible
by 16 (every real vocabulary size is), so the compiled code is the one the launch would get.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

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


def _sdar_rows_variants():
    """sdar_kernels/sdar_loss/kernels.py:sdar_rows_kernel at the launches of the headline benchmark."""
    import torch

    from sdar_kernels.sdar_loss.kernels import DISTILL_CODES
    from sdar_kernels.sdar_loss.launch import tile_config
    out = []
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for label, N, V, dt, distill, fused in [
        ("qwen3 N8k bf16 official fwd+grad", 8192, 151936, "bf16", "sampled", True),
        ("qwen3 N8k bf16 official loss only", 8192, 151936, "bf16", "sampled", False),
        ("gemma3 N8k bf16 official fwd+grad (i64 strides)", 8192, 262144, "bf16", "sampled", True),
        ("qwen3 N8k bf16 fkl fwd+grad", 8192, 151936, "bf16", "fkl", True),
        ("qwen3 N8k bf16 rkl fwd+grad", 8192, 151936, "bf16", "rkl", True),
        ("qwen3 N8k bf16 jsd fwd+grad", 8192, 151936, "bf16", "jsd", True),
        ("qwen3 N8k fp32 official fwd+grad", 8192, 151936, "fp32", "sampled", True),
    ]:
        block_r, vec, warps = tile_config(V, dtypes[dt])
        entropy = distill == "sampled"
        args = dict(
            grad_ptr=Ptr(dt), out_ptr=Ptr("fp32"), stats_ptr=Ptr("fp32"),
            logits_ptr=Ptr(dt), teacher_ptr=Ptr(dt), labels_ptr=Ptr("i64"), mask_ptr=Ptr("u8"),
            weights_ptr=Ptr("fp32"), teacher_logp_ptr=Ptr("fp32"), adv_ptr=Ptr("fp32"), old_ptr=Ptr("fp32"),
            ref_ptr=Ptr("fp32"),
            stride_logits_b=N * V, stride_logits_t=V, stride_teacher_b=N * V, stride_teacher_t=V,
            stride_grad_b=N * V, stride_grad_t=V, seq_len=N, N=N, V=V,
            k_scale=1.4426950408889634, inv_tau=1.0, gate_beta=5.0, distill_coef=0.01, jsd_beta=0.5,
            log2_b=-1.0, log2_1mb=-1.0, clip_low=0.2, clip_high=0.2, clip_c=3.0, kl_coef=0.01,
            entropy_coef=0.001 if entropy else 0.0,
        )
        cx = dict(BLOCK_R=block_r, VEC=vec, HAS_TEACHER_LOGITS=True, HAS_TEACHER_LOGPROBS=False,
                  DISTILL=DISTILL_CODES[distill], HAS_ADV=True, HAS_OLD=True, HAS_DUAL_CLIP=True, HAS_KL=True,
                  HAS_ENTROPY=entropy, STORE_STATS=not fused, WRITE_GRAD=fused)
        out.append(Variant(f"sdar_rows_kernel [{label}]", "sdar_kernels.sdar_loss.kernels:sdar_rows_kernel",
                           args, cx, num_warps=warps, expect={"max_local": 0}))
    return out


# Builders of the registry; add one per kernel file.
REGISTRY = [_sdar_rows_variants]


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


_OP = re.compile(r"\b((?:LDG|STG|LDL|STL|LDS|STS)(?:\.[A-Z0-9_]+)*)\b")


def analyse(cubin: bytes, keep_dir=None, name="kernel"):
    """Registers, stack, shared, local bytes and counts of global/local memory instructions by width."""
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
    ops = {}
    for m in _OP.finditer(sass):
        op = m.group(1)
        # drop cache/eviction/scope qualifiers that do not change the width (.64/.128/.U16 stay)
        op = re.sub(r"\.(EF|EL|LU|NA|LTC\d+B|CONSTANT|STRONG|SYS|GPU|SM|CTA|ZFILL)(?=\.|$)", "", op)
        ops[op] = ops.get(op, 0) + 1
    info["ops"] = dict(sorted(ops.items()))
    info["sass_lines"] = sum(1 for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln))
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
        row = dict(name=v.name, warps=v.num_warps, block=cx.get("BLOCK_R", 0) * cx.get("VEC", 0) or cx.get("BLOCK_V"))
        try:
            k = compile_variant(v)
            row.update(analyse(k.asm["cubin"], keep_dir, v.name))
            row["shared_meta"] = getattr(k.metadata, "shared", None)
            if keep_dir:
                safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", v.name).strip("_")
                with open(os.path.join(keep_dir, safe + ".ptx"), "w") as f:
                    f.write(k.asm["ptx"])
            bad = []
            if "max_local" in v.expect and (row["local"] or 0) > v.expect["max_local"]:
                bad.append(f"LOCAL {row['local']} > {v.expect['max_local']} (spills)")
            row["status"] = "REGRESSION: " + "; ".join(bad) if bad else "ok"
        except Exception as e:
            row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        _print_row(row, stream)
    return rows


def _print_row(r, stream):
    print(f"\n{r['name']}  (num_warps={r['warps']}, BLOCK_V={r['block']}): {r['status']}", file=stream)
    if "reg" in r:
        print(f"  registers {r['reg']}/thread, stack {r['stack']} B, local (spill) {r['local']} B, "
              f"shared {r['shared']} B, {r['sass_lines']} SASS instructions", file=stream)
        g = {k: n for k, n in r["ops"].items() if k.startswith(("LDG", "STG"))}
        loc = {k: n for k, n in r["ops"].items() if k.startswith(("LDL", "STL"))}
        print("  global loads/stores: " + (", ".join(f"{k} x{n}" for k, n in g.items()) or "none"), file=stream)
        if loc:
            print("  local loads/stores (spills): " + ", ".join(f"{k} x{n}" for k, n in loc.items()), file=stream)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sass", metavar="DIR", help="write the SASS and PTX of each variant into DIR")
    ap.add_argument("--only", metavar="TEXT", help="only the variants whose name contains TEXT")
    a = ap.parse_args(argv)
    rows = report(a.sass, only=a.only)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
