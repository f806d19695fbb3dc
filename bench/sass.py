"""Reading SASS (``cuobjdump --dump-sass``) loop by loop: what one iteration of each streaming loop issues.

A loop is the address range of a backward branch (``BRA`` to a lower address). For each loop this counts
the instructions of one iteration and the ones that decide a streaming kernel's speed: block barriers
(``BAR``), warp shuffles (``SHFL``), special-function ops (``MUFU.EX2`` / ``LG2`` / ``RCP``), global loads
and stores by width (``LDG.E.128`` is a 16-byte vector), local memory (``LDL`` / ``STL``: spills),
tensor-core ops (``HMMA`` / ``HGMMA``) and 64-bit integer arithmetic (the ``.X`` carry half of an add).
Dividing by the elements one thread handles per iteration gives instructions per element, the number
the bound model in csrc_notes/perf.md uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
# qualifiers that do not change what an access moves (cache / eviction / scope hints)
_HINTS = re.compile(r"\.(EF|EL|LU|NA|LTC\d+B|CONSTANT|STRONG|SYS|GPU|SM|CTA|ZFILL)(?=\.|$)")


@dataclass
class Instr:
    addr: int
    op: str        # opcode with qualifiers, e.g. "LDG.E.128", "MUFU.EX2"
    operands: str


def parse(sass: str) -> list[Instr]:
    out = []
    for m in _LINE.finditer(sass):
        out.append(Instr(int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def loops(instrs: list[Instr]) -> list[list[Instr]]:
    """The instructions of each loop (innermost first when nested), in address order."""
    found = []
    for ins in instrs:
        if ins.op.split(".")[0] != "BRA":
            continue
        t = _BRANCH_TARGET.search(ins.operands)
        if t and int(t.group(1), 16) < ins.addr:
            start = int(t.group(1), 16)
            found.append([i for i in instrs if start <= i.addr <= ins.addr])
    return sorted(found, key=len)


def memory_op(op: str) -> str:
    return _HINTS.sub("", op)


def loop_stats(body: list[Instr]) -> dict:
    """Counts of one iteration of ``body``."""
    ops = [i.op for i in body]
    mem = {}
    for op in ops:
        if op.startswith(("LDG", "STG", "LDL", "STL", "LDS", "STS")):
            key = memory_op(op)
            mem[key] = mem.get(key, 0) + 1
    mufu = {}
    for op in ops:
        if op.startswith("MUFU"):
            mufu[op] = mufu.get(op, 0) + 1
    return {
        "instructions": len(ops),
        "bar": sum(op.startswith("BAR") for op in ops),
        "shfl": sum(op.startswith("SHFL") for op in ops),
        "mufu": dict(sorted(mufu.items())),
        "memory": dict(sorted(mem.items())),
        "local": sum(v for k, v in mem.items() if k.startswith(("LDL", "STL"))),
        "tensor_core": sum(op.startswith(("HMMA", "HGMMA", "WGMMA")) for op in ops),
        "int64_carry": sum(op.split(".")[0] in ("IADD3", "IMAD", "LEA") and ".X" in op for op in ops),
    }


def classify(stats: dict) -> str:
    """Name a loop of the SDAR kernels by what it does: statistics passes read and exponentiate, the
    gradient pass also stores, a masked row's pass only stores, a matmul loop uses tensor cores."""
    mem = stats["memory"]
    loads = sum(v for k, v in mem.items() if k.startswith("LDG"))
    stores = sum(v for k, v in mem.items() if k.startswith("STG"))
    mufu = sum(stats["mufu"].values())
    if stats["tensor_core"]:
        return "matmul"
    if stores and not loads:
        return "zero-fill"
    if stores and mufu:
        return "gradient"
    if stores:
        return "scale"
    if "MUFU.LG2" in stats["mufu"] and loads:
        return "jsd-statistics"
    if mufu and loads:
        return "statistics"
    return "other"


def occupancy(registers: int, threads_per_cta: int, shared_bytes: int = 0) -> int:
    """CTAs per SM on sm_90 (H100 / H200): 64K registers allocated per warp in units of 256, 2048 threads,
    32 CTAs and 228 KiB of shared memory (1 KiB reserved per CTA) per SM."""
    warps = -(-threads_per_cta // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (65536 // regs_per_warp) // warps
    by_threads = 2048 // threads_per_cta
    by_smem = (228 * 1024) // (shared_bytes + 1024)
    return max(0, min(by_regs, by_threads, by_smem, 32))


def analyse_loops(sass: str, elements_per_thread: int | None = None) -> list[dict]:
    """Per loop: its kind, the counts of one iteration and, given the elements one thread handles per
    iteration, the per-element instruction and MUFU counts."""
    out = []
    for body in loops(parse(sass)):
        st = loop_stats(body)
        st["kind"] = classify(st)
        st["start"] = f"0x{body[0].addr:04x}"
        if elements_per_thread:
            st["elements_per_thread"] = elements_per_thread
            st["instructions_per_element"] = round(st["instructions"] / elements_per_thread, 2)
            st["mufu_per_element"] = round(sum(st["mufu"].values()) / elements_per_thread, 3)
        out.append(st)
    out = sorted(out, key=lambda s: s["start"])
    # jsd's second statistics pass (the log-space mixture) uses MUFU.LG2; under an accurate software log2
    # it would not, so name the second statistics loop by its order too
    stats = [s for s in out if s["kind"] == "statistics"]
    if len(stats) == 2:
        stats[1]["kind"] = "jsd-statistics"
    return out
