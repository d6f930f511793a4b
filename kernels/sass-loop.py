#!/usr/bin/env python3
"""Instructions per iteration of a kernel's 16-byte-load loop, read from its SASS.

    ckpt-device-check --cubin k.cubin --arch 90       # NVRTC only, no GPU needed
    cuobjdump -sass -fun fingerprint_chunks k.cubin | kernels/sass-loop.py

The loop is the one closed by the first backward branch after the first LDG.E.128; each
16-byte load in it is four 32-bit words, so an unrolled loop is counted per load. A projection of speed from this count is only that: the
GPU table in BENCHMARKS.md is the measurement.
"""
import re
import sys

INSN = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")


def main() -> int:
    insns = [(int(m.group(1), 16), m.group(2)) for m in map(INSN.match, sys.stdin) if m]
    loads = [k for k, (_, text) in enumerate(insns) if "LDG.E.128" in text]
    if not loads:
        print("no 16-byte load in this SASS", file=sys.stderr)
        return 1
    for addr, text in insns[loads[0]:]:
        branch = re.search(r"BRA (0x[0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < addr:
            start = int(branch.group(1), 16)
            body = [t for a, t in insns if start <= a <= addr]
            ops = {}
            for t in body:
                op = re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
                ops[op] = ops.get(op, 0) + 1
            loads = sum(1 for t in body if "LDG.E.128" in t)
            mix = ", ".join(f"{n} {op}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1]))
            print(f"{len(body) / loads:g} instructions per 16-byte load (4 words); the loop: {mix}")
            return 0
    print("no backward branch closes the load's loop", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
