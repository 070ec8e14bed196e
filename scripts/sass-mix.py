#!/usr/bin/env python3
"""Static instruction mix of the tensor-core kernels, without a GPU.

    python3 scripts/sass-mix.py [--arch sm_90] [ENTRY_SUBSTRING ...]

Assembles kernels/*.ptx with the pinned ptxas of scripts/ptx-check.sh, disassembles the cubin
(cuobjdump + nvdisasm from PyPI, installed into .cache/sass-tools on first use) and prints, per
entry, its registers-free SASS totals (instructions, HMMA, HGMMA (wgmma), LDSM, LDGSTS, MUFU) and, for every
loop (a backward branch), the instructions and HMMA between its target and the branch. The
inner loop of a tensor-core kernel then reads directly as "H HMMA per N issued instructions":
an upper bound on how busy the tensor pipe can be per warp. A static figure, not a measurement:
it ignores latencies, stalls and memory, and both sides of a branch inside a loop are counted.

Default entries: those with `mma` or `attention_` in their name. A module declaring
`.target sm_90a` (the wgmma kernels) is assembled for sm_90a whatever --arch says. Python 3
standard library.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(ROOT, ".cache/cuda-tools/nvidia/cuda_nvcc/bin/ptxas")
TOOLS = os.path.join(ROOT, ".cache/sass-tools")
PKGS = ["nvidia-cuda-cuobjdump==13.5.37", "nvidia-cuda-nvdisasm==13.5.37"]
BIN = os.path.join(TOOLS, "nvidia/cu13/bin")
LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
ENTRY = re.compile(r"^\s+Function : (\S+)")


def tools():
    if not os.path.exists(PTXAS):
        subprocess.run(["bash", os.path.join(ROOT, "scripts/ptx-check.sh")], check=True, stdout=subprocess.DEVNULL)
    pinned = os.path.join(TOOLS, ".pinned")
    have = ""
    if os.path.exists(pinned) and os.path.exists(os.path.join(BIN, "cuobjdump")):
        with open(pinned) as f:
            have = f.read()
    if have != " ".join(PKGS):
        print(f"installing {' '.join(PKGS)} into {TOOLS}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--target", TOOLS, *PKGS], check=True,
                       env=dict(os.environ, PIP_ROOT_USER_ACTION="ignore"))
        with open(pinned, "w") as f:
            f.write(" ".join(PKGS))


def sass(ptx, arch):
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        subprocess.run([PTXAS, f"-arch={arch}", ptx, "-o", cubin], check=True)
        env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], check=True, env=env,
                             capture_output=True, text=True).stdout
    entries, name = {}, None
    for line in out.splitlines():
        m = ENTRY.match(line)
        if m:
            name = m.group(1)
            entries[name] = []
            continue
        m = LINE.match(line)
        if m and name:
            entries[name].append((int(m.group(1), 16), m.group(2)))
    return entries


def opcode(text):
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


def count(instrs, op):
    return sum(opcode(t).startswith(op) for _, t in instrs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("filters", nargs="*")
    args = ap.parse_args()
    tools()
    filters = args.filters or ["mma", "attention_"]
    for ptx in sorted(os.listdir(os.path.join(ROOT, "kernels"))):
        if not ptx.endswith(".ptx"):
            continue
        path = os.path.join(ROOT, "kernels", ptx)
        with open(path, encoding="utf-8") as f:
            arch = "sm_90a" if re.search(r"^\.target sm_90a$", f.read(), flags=re.M) else args.arch
        for name, instrs in sass(path, arch).items():
            if not any(f in name for f in filters):
                continue
            instrs = [(a, t) for a, t in instrs if opcode(t) != "NOP"]
            print(f"{name} ({arch}): {len(instrs)} instructions, {count(instrs, 'HMMA')} HMMA, "
                  f"{count(instrs, 'HGMMA')} HGMMA, {count(instrs, 'LDSM')} LDSM, {count(instrs, 'LDGSTS')} LDGSTS, "
                  f"{count(instrs, 'MUFU')} MUFU")
            for addr, text in instrs:
                m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
                if not m or not m.group(1):
                    continue
                target = int(m.group(1), 16)
                if target >= addr:
                    continue
                body = [(a, t) for a, t in instrs if target <= a <= addr]
                print(f"    loop {target:#06x}..{addr:#06x}: {len(body)} instructions, "
                      f"{count(body, 'HMMA')} HMMA, {count(body, 'HGMMA')} HGMMA, {count(body, 'LDSM')} LDSM, "
                      f"{count(body, 'MUFU')} MUFU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
