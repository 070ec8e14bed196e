#!/usr/bin/env python3
"""A small, strict PTX interpreter for the subset kernels/gen_patchify.py emits.

It exists because the CUDA backend cannot be run on machines without a GPU: the Rust test
`emulated_*` in tests/cuda_patchify.rs builds the real launch (parameter struct bytes, grid,
buffers) with the crate's host code, runs the real PTX here, and compares the result with the
reference backend bit for bit. Python 3 standard library only.

Strict on purpose: reading an undefined register, touching memory outside every buffer,
writing a read-only buffer, writing a byte twice, a misaligned access, or an instruction it does
not know is an error (exit status 2). The semantics follow the PTX ISA: fma.rn.f32 rounds once,
cvt.rn.{f16,bf16}.f32 round to nearest even, cvt.rni.u32.f32 rounds half to even and clamps
(NaN -> 0), loads of narrow types into wider registers zero-extend.

Usage: python3 kernels/ptx_sim.py JOB.json     (the format is in run_job's docstring)
       python3 kernels/ptx_sim.py --self-test
"""

import json
import os
import re
import struct
import sys
from fractions import Fraction


class SimError(Exception):
    pass


# ------------------------------------------------------------------------------------------
# Floating point, exactly.
# ------------------------------------------------------------------------------------------
def round_to_format(x, ebits, mbits):
    """Bits of the IEEE value (ebits exponent, mbits mantissa) nearest to the non-zero finite
    rational x, ties to even, with subnormals and overflow to infinity."""
    assert x != 0
    sign = 1 if x < 0 else 0
    x = abs(Fraction(x))
    bias = (1 << (ebits - 1)) - 1
    emin, emax = 1 - bias, bias
    e = x.numerator.bit_length() - x.denominator.bit_length()
    while Fraction(2) ** e > x:
        e -= 1
    while Fraction(2) ** (e + 1) <= x:
        e += 1
    if e < emin:
        e = emin
    m = x / Fraction(2) ** (e - mbits)
    n = m.numerator // m.denominator
    rem = m - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    if n == 1 << (mbits + 1):
        n >>= 1
        e += 1
    if e > emax:
        return (sign << (ebits + mbits)) | (((1 << ebits) - 1) << mbits)  # infinity
    if n < (1 << mbits):  # subnormal (only when e == emin)
        return (sign << (ebits + mbits)) | n
    return (sign << (ebits + mbits)) | ((e + bias) << mbits) | (n - (1 << mbits))


def decode(bits, ebits, mbits):
    """('nan' | 'inf' | 'fin', sign, Fraction value or None)."""
    sign = (bits >> (ebits + mbits)) & 1
    exp = (bits >> mbits) & ((1 << ebits) - 1)
    man = bits & ((1 << mbits) - 1)
    bias = (1 << (ebits - 1)) - 1
    if exp == (1 << ebits) - 1:
        return ("nan" if man else "inf", sign, None)
    if exp == 0:
        v = Fraction(man) * Fraction(2) ** (1 - bias - mbits)
    else:
        v = Fraction((1 << mbits) | man) * Fraction(2) ** (exp - bias - mbits)
    return ("fin", sign, -v if sign else v)


F32 = (8, 23)
F16 = (5, 10)
BF16 = (8, 7)
F32_NAN = 0x7FFFFFFF  # the canonical NaN the GPU produces


def f32_to_format(bits, fmt):
    """cvt.rn.{f16,bf16}.f32 (and f32 identity)."""
    kind, sign, v = decode(bits, *F32)
    eb, mb = fmt
    width = 1 + eb + mb
    if kind == "nan":
        return (1 << (width - 1)) - 1  # canonical 0x7fff
    if kind == "inf":
        return (sign << (width - 1)) | (((1 << eb) - 1) << mb)
    if v == 0:
        return sign << (width - 1)
    return round_to_format(v, eb, mb)


def format_to_f32(bits, fmt):
    """Exact widening (cvt.f32.f16)."""
    kind, sign, v = decode(bits, *fmt)
    if kind == "nan":
        return F32_NAN
    if kind == "inf":
        return (sign << 31) | 0x7F800000
    if v == 0:
        return sign << 31
    return round_to_format(v, *F32)


def fma_f32(x, a, b):
    kx, sx, vx = decode(x, *F32)
    ka, sa, va = decode(a, *F32)
    kb, sb, vb = decode(b, *F32)
    if "nan" in (kx, ka, kb):
        return F32_NAN
    if "inf" in (kx, ka, kb):
        fx, fa, fb = (struct.unpack("<f", struct.pack("<I", u))[0] for u in (x, a, b))
        r = fx * fa + fb
        if r != r:
            return F32_NAN
        return struct.unpack("<I", struct.pack("<f", r))[0]
    exact = vx * va + vb
    if exact == 0:
        prod_zero = vx * va == 0
        if prod_zero and vb == 0:
            return ((sx ^ sa) & sb) << 31
        return 0  # exact cancellation: +0 when rounding to nearest
    return round_to_format(exact, *F32)


def cvt_rni_u32_f32(x):
    kind, sign, v = decode(x, *F32)
    if kind == "nan":
        return 0
    if kind == "inf":
        return 0 if sign else 0xFFFFFFFF
    n = v.numerator // v.denominator  # floor
    rem = v - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    return max(0, min(0xFFFFFFFF, n))


def cvt_rn_f32_u32(n):
    return 0 if n == 0 else round_to_format(Fraction(n), *F32)


# ------------------------------------------------------------------------------------------
# Parsing.
# ------------------------------------------------------------------------------------------
WIDTH = {"u32": 32, "b32": 32, "s32": 32, "u64": 64, "b64": 64, "f32": 32, "b16": 16,
         "u16": 16, "f16": 16, "u8": 8, "pred": 1}
SPECIAL = {"%tid.x", "%tid.y", "%tid.z", "%ntid.x", "%ntid.y", "%ntid.z", "%ctaid.x",
           "%ctaid.y", "%ctaid.z", "%nctaid.x", "%nctaid.y", "%nctaid.z"}


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//", 1)[0] for line in text.splitlines())


def split_operands(s):
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


class Kernel:
    def __init__(self, name, params, regs, code, labels):
        self.name, self.params, self.regs, self.code, self.labels = name, params, regs, code, labels


def parse_module(text):
    text = strip_comments(text)
    kernels = {}
    for m in re.finditer(r"\.visible\s+\.entry\s+(\w+)\s*\((.*?)\)(.*?)\{", text, flags=re.S):
        name, params_src = m.group(1), m.group(2)
        start = m.end()
        depth, pos = 1, start
        while depth:
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
            pos += 1
        body = text[start:pos - 1]
        pm = re.fullmatch(r"\s*\.param\s+\.align\s+\d+\s+\.b8\s+(\w+)\[(\d+)\]\s*", params_src)
        if not pm:
            raise SimError(f"{name}: unsupported parameter list {params_src!r}")
        params = (pm.group(1), int(pm.group(2)))
        regs, code, labels = {}, [], {}
        for stmt in body.split(";"):
            stmt = stmt.strip()
            while True:  # labels may precede a statement
                lm = re.match(r"^(\$?\w+):\s*", stmt)
                if not lm:
                    break
                labels[lm.group(1)] = len(code)
                stmt = stmt[lm.end():].strip()
            if not stmt:
                continue
            if stmt.startswith(".reg"):
                rm = re.match(r"\.reg\s+\.(\w+)\s+(.*)", stmt, flags=re.S)
                for r in rm.group(2).split(","):
                    regs[r.strip()] = rm.group(1)
                continue
            code.append(parse_instr(stmt))
        kernels[name] = Kernel(name, params, regs, code, labels)
    return kernels


def parse_instr(stmt):
    guard = None
    gm = re.match(r"^@(!?)(%\w+)\s+", stmt)
    if gm:
        guard = (gm.group(1) == "!", gm.group(2))
        stmt = stmt[gm.end():]
    parts = stmt.split(None, 1)
    opcode = parts[0]
    ops = split_operands(parts[1]) if len(parts) > 1 else []
    return (guard, opcode, ops, stmt)


# ------------------------------------------------------------------------------------------
# Execution.
# ------------------------------------------------------------------------------------------
class Memory:
    def __init__(self):
        self.buffers = []  # (start, bytearray, writable, written counts or None, name)

    def add(self, name, addr, data, writable):
        for s, b, _, _, n in self.buffers:
            if addr < s + len(b) and s < addr + len(data):
                raise SimError(f"buffer {name} overlaps {n}")
        self.buffers.append((addr, bytearray(data), writable,
                             bytearray(len(data)) if writable else None, name))

    def find(self, addr, size):
        for s, b, w, cnt, n in self.buffers:
            if s <= addr and addr + size <= s + len(b):
                return s, b, w, cnt, n
        raise SimError(f"access of {size} bytes at {addr:#x} is outside every buffer")

    def read(self, addr, size):
        s, b, _, _, _ = self.find(addr, size)
        return bytes(b[addr - s:addr - s + size])

    def write(self, addr, data):
        s, b, w, cnt, n = self.find(addr, len(data))
        if not w:
            raise SimError(f"write to read-only buffer {n} at {addr:#x}")
        for k in range(len(data)):
            if cnt[addr - s + k]:
                raise SimError(f"byte {addr - s + k} of {n} written twice")
            cnt[addr - s + k] = 1
        b[addr - s:addr - s + len(data)] = data


class Thread:
    __slots__ = ("regs", "special")


def run_kernel(kernel, grid, block, param_bytes, mem, stats):
    pname, psize = kernel.params
    if len(param_bytes) != psize:
        raise SimError(f"{kernel.name}: param block is {len(param_bytes)} bytes, entry wants {psize}")
    code, labels, decl = kernel.code, kernel.labels, kernel.regs

    def operand(th, op):
        if op in th.regs:
            return th.regs[op]
        if op in decl:
            raise SimError(f"{kernel.name}: register {op} read before it is written")
        if op in th.special:
            return th.special[op]
        if re.fullmatch(r"0[fF][0-9a-fA-F]{8}", op):
            return int(op[2:], 16)
        if re.fullmatch(r"-?0[xX][0-9a-fA-F]+", op):
            return int(op, 16) & 0xFFFFFFFFFFFFFFFF
        if re.fullmatch(r"-?\d+", op):
            return int(op) & 0xFFFFFFFFFFFFFFFF
        raise SimError(f"{kernel.name}: unknown operand {op}")

    def setreg(th, r, v):
        ty = decl.get(r)
        if ty is None:
            raise SimError(f"{kernel.name}: write to undeclared register {r}")
        if ty == "pred":
            th.regs[r] = bool(v)
        else:
            th.regs[r] = v & ((1 << WIDTH[ty]) - 1)

    def address(th, op):
        m = re.fullmatch(r"\[\s*(%?\w+)\s*(?:\+\s*(-?\d+))?\s*\]", op)
        if not m:
            raise SimError(f"bad address {op}")
        base, off = m.group(1), int(m.group(2) or 0)
        return base, off

    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                for tz in range(block[2]):
                    for ty_ in range(block[1]):
                        for tx in range(block[0]):
                            th = Thread()
                            th.regs = {}
                            th.special = {
                                "%tid.x": tx, "%tid.y": ty_, "%tid.z": tz,
                                "%ntid.x": block[0], "%ntid.y": block[1], "%ntid.z": block[2],
                                "%ctaid.x": bx, "%ctaid.y": by, "%ctaid.z": bz,
                                "%nctaid.x": grid[0], "%nctaid.y": grid[1], "%nctaid.z": grid[2],
                            }
                            execute(kernel, th, code, labels, param_bytes, pname, mem, operand,
                                    setreg, address, stats)


def execute(kernel, th, code, labels, param_bytes, pname, mem, operand, setreg, address, stats):
    pc, steps = 0, 0
    while True:
        if pc >= len(code):
            raise SimError(f"{kernel.name}: fell off the end")
        guard, opcode, ops, text = code[pc]
        pc += 1
        steps += 1
        if steps > 100000:
            raise SimError(f"{kernel.name}: runaway thread")
        if guard is not None:
            neg, p = guard
            v = operand(th, p)
            if v == neg:
                continue
        parts = opcode.split(".")
        op = parts[0]
        try:
            pc = step(kernel, th, op, parts, ops, pc, labels, param_bytes, pname, mem, operand,
                      setreg, address)
        except SimError as e:
            raise SimError(f"{kernel.name}: `{text}`: {e}") from None
        if pc is None:
            stats["threads"] += 1
            stats["instructions"] += steps
            return


def step(kernel, th, op, parts, ops, pc, labels, param_bytes, pname, mem, operand, setreg, address):
    M32, M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
    ty = parts[-1]
    if op == "ret":
        return None
    if op == "bra":
        if ops[0] not in labels:
            raise SimError(f"unknown label {ops[0]}")
        return labels[ops[0]]
    if op == "mov":
        d, a = ops
        if d.startswith("{"):  # unpack
            names = [x.strip() for x in d[1:-1].split(",")]
            v = operand(th, a)
            w = WIDTH[ty] // len(names)
            for k, n in enumerate(names):
                setreg(th, n, (v >> (w * k)) & ((1 << w) - 1))
        elif a.startswith("{"):  # pack: first element in the low bits
            names = [x.strip() for x in a[1:-1].split(",")]
            w = WIDTH[ty] // len(names)
            v = 0
            for k, n in enumerate(names):
                v |= (operand(th, n) & ((1 << w) - 1)) << (w * k)
            setreg(th, d, v)
        else:
            setreg(th, d, operand(th, a))
        return pc
    if op == "ld":
        d, a = ops
        space = parts[1]
        base, off = address(th, a)
        vec = 1
        if parts[-2] in ("v2", "v4"):
            vec = int(parts[-2][1])
        size = WIDTH[ty] // 8
        if space == "param":
            if base != pname:
                raise SimError(f"param {base} unknown")
            if off % size or off + size * vec > len(param_bytes):
                raise SimError(f"bad param access at {off}")
            raw = param_bytes[off:off + size * vec]
        elif space == "global":
            addr = (operand(th, base) + off) & M64
            if addr % (size * vec):
                raise SimError(f"misaligned {size * vec}-byte load at {addr:#x}")
            raw = mem.read(addr, size * vec)
        else:
            raise SimError(f"state space {space}")
        vals = [int.from_bytes(raw[k * size:(k + 1) * size], "little") for k in range(vec)]
        if vec == 1:
            setreg(th, d, vals[0])  # zero-extends into a wider register
        else:
            names = [x.strip() for x in d[1:-1].split(",")]
            if len(names) != vec:
                raise SimError("vector arity")
            for n, v in zip(names, vals):
                setreg(th, n, v)
        return pc
    if op == "st":
        a, s = ops
        if parts[1] != "global":
            raise SimError(f"store to {parts[1]}")
        base, off = address(th, a)
        addr = (operand(th, base) + off) & M64
        vec = 1
        if parts[-2] in ("v2", "v4"):
            vec = int(parts[-2][1])
        size = WIDTH[ty] // 8
        if addr % (size * vec):
            raise SimError(f"misaligned {size * vec}-byte store at {addr:#x}")
        names = [x.strip() for x in s[1:-1].split(",")] if vec > 1 else [s]
        raw = b"".join((operand(th, n) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                       for n in names)
        mem.write(addr, raw)
        return pc
    if op in ("add", "sub", "mul", "mad", "shr", "shl", "and", "min"):
        d = ops[0]
        vals = [operand(th, x) for x in ops[1:]]
        if op == "mul" and parts[1] == "wide":
            r = (vals[0] & M32) * (vals[1] & M32)
        elif op == "mad" and parts[1] == "wide":
            r = (vals[0] & M32) * (vals[1] & M32) + vals[2]
        else:
            w = WIDTH[ty]
            m = (1 << w) - 1
            a = vals[0] & m
            if op == "add":
                r = a + (vals[1] & m)
            elif op == "sub":
                r = a - (vals[1] & m)
            elif op == "mul":
                if parts[1] != "lo":
                    raise SimError(opcode_text(parts))
                r = a * (vals[1] & m)
            elif op == "mad":
                if parts[1] != "lo":
                    raise SimError(opcode_text(parts))
                r = a * (vals[1] & m) + (vals[2] & m)
            elif op == "shr":
                r = a >> min(vals[1] & M32, w)
            elif op == "shl":
                r = a << min(vals[1] & M32, w)
            elif op == "and":
                r = a & vals[1]
            else:  # min, unsigned
                if ty not in ("u32", "u64"):
                    raise SimError(opcode_text(parts))
                r = min(a, vals[1] & m)
            r &= m
        setreg(th, d, r)
        return pc
    if op == "bfe":
        d, a, b, c = ops
        pos, ln = operand(th, b) & 0xFF, operand(th, c) & 0xFF
        if ty != "u32":
            raise SimError(opcode_text(parts))
        v = operand(th, a) & M32
        r = 0 if ln == 0 or pos > 31 else (v >> pos) & ((1 << ln) - 1)
        setreg(th, d, r)
        return pc
    if op == "bfi":
        f, a, b, c, dd = ops
        pos, ln = operand(th, c) & 0xFF, operand(th, dd) & 0xFF
        r = operand(th, b) & M32
        av = operand(th, a)
        for k in range(ln):
            if pos + k > 31:
                break
            bit = (av >> k) & 1
            r = (r & ~(1 << (pos + k))) | (bit << (pos + k))
        setreg(th, f, r)
        return pc
    if op == "setp":
        cmp = parts[1]
        boolop = parts[2] if len(parts) == 4 else None
        if ty not in ("u32", "u64"):
            raise SimError(opcode_text(parts))
        d, a, b = ops[0], operand(th, ops[1]), operand(th, ops[2])
        r = {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b, "eq": a == b,
             "ne": a != b}[cmp]
        if boolop:
            c = ops[3]
            cv = (not operand(th, c[1:])) if c.startswith("!") else operand(th, c)
            r = (r and cv) if boolop == "and" else (r or cv) if boolop == "or" else None
            if r is None:
                raise SimError(opcode_text(parts))
        setreg(th, d, r)
        return pc
    if op == "selp":
        d, a, b, c = ops
        setreg(th, d, operand(th, a) if operand(th, c) else operand(th, b))
        return pc
    if op == "fma":
        if parts[1] != "rn" or ty != "f32" or len(parts) != 3:
            raise SimError(opcode_text(parts))
        d, a, b, c = ops
        setreg(th, d, fma_f32(operand(th, a), operand(th, b), operand(th, c)))
        return pc
    if op == "cvt":
        d, a = ops
        key = ".".join(parts[1:])
        v = operand(th, a)
        if key == "u32.u64":
            r = v & M32
        elif key == "u64.u32":
            r = v & M32
        elif key == "rn.f32.u32":
            r = cvt_rn_f32_u32(v & M32)
        elif key == "rni.u32.f32":
            r = cvt_rni_u32_f32(v & M32)
        elif key == "rn.f16.f32":
            r = f32_to_format(v & M32, F16)
        elif key == "rn.bf16.f32":
            r = f32_to_format(v & M32, BF16)
        elif key == "f32.f16":
            r = format_to_f32(v & 0xFFFF, F16)
        else:
            raise SimError(f"cvt.{key} not supported")
        setreg(th, d, r)
        return pc
    raise SimError(f"unsupported instruction {'.'.join(parts)}")


def opcode_text(parts):
    return "unsupported form " + ".".join(parts)


# ------------------------------------------------------------------------------------------
# Jobs.
# ------------------------------------------------------------------------------------------
def run_job(path):
    """JOB.json: {"ptx": path, "kernel": name, "grid": [x, y, z], "block": [x, y, z],
    "params": hex string, "buffers": [{"name", "addr", "file", "writable", "out"?,
    "must_write"?}]}. Paths are relative to the job file. Buffers with "out" are saved there
    after the run; "must_write" makes it an error if any of the buffer's bytes was not written."""
    with open(path, encoding="utf-8") as f:
        job = json.load(f)
    root = os.path.dirname(os.path.abspath(path))

    def p(x):
        return x if os.path.isabs(x) else os.path.join(root, x)

    with open(p(job["ptx"]), encoding="utf-8") as f:
        kernels = parse_module(f.read())
    if job["kernel"] not in kernels:
        raise SimError(f"entry {job['kernel']} not in the module")
    mem = Memory()
    for b in job["buffers"]:
        with open(p(b["file"]), "rb") as f:
            mem.add(b["name"], int(b["addr"]), f.read(), bool(b.get("writable")))
    stats = {"threads": 0, "instructions": 0}
    run_kernel(kernels[job["kernel"]], job["grid"], job["block"], bytes.fromhex(job["params"]),
               mem, stats)
    for b in job["buffers"]:
        for _, data, _, counts, n in mem.buffers:
            if n != b["name"]:
                continue
            if b.get("must_write"):
                missing = [k for k, c in enumerate(counts) if not c]
                if missing:
                    raise SimError(f"{len(missing)} bytes of {n} never written (first: {missing[0]})")
            if b.get("out"):
                with open(p(b["out"]), "wb") as f:
                    f.write(bytes(data))
    print(f"{job['kernel']}: {stats['threads']} threads, {stats['instructions']} instructions")


def self_test():
    # rounding helpers against struct's IEEE conversions and hand-checked values
    import random
    rng = random.Random(1)
    for _ in range(20000):
        bits = rng.getrandbits(32)
        kind, _, v = decode(bits, *F32)
        if kind != "fin":
            continue
        f = struct.unpack("<f", struct.pack("<I", bits))[0]
        if v != 0:
            assert round_to_format(v, *F32) == bits
            try:
                h = struct.unpack("<H", struct.pack("<e", f))[0]
            except OverflowError:
                h = 0x7C00 | ((bits >> 31) << 15)
            assert f32_to_format(bits, F16) == h, (hex(bits), hex(h))
    assert f32_to_format(0x3F808000, BF16) == 0x3F80  # tie to even (down)
    assert f32_to_format(0x3F818000, BF16) == 0x3F82  # tie to even (up)
    assert f32_to_format(0x7F7FFFFF, BF16) == 0x7F80  # overflow to inf
    assert cvt_rni_u32_f32(struct.unpack("<I", struct.pack("<f", 254.5))[0]) == 254
    assert cvt_rni_u32_f32(struct.unpack("<I", struct.pack("<f", 255.5))[0]) == 256
    assert cvt_rni_u32_f32(struct.unpack("<I", struct.pack("<f", -3.0))[0]) == 0
    assert cvt_rni_u32_f32(0x7FC00000) == 0
    one, mone = 0x3F800000, 0xBF800000
    assert fma_f32(0x80000000, one, 0x80000000) == 0x80000000  # -0*1 + -0 = -0
    assert fma_f32(0x00000000, one, 0x80000000) == 0x00000000  # +0*1 + -0 = +0
    assert fma_f32(one, one, mone) == 0  # exact cancellation -> +0
    # fma rounds once: (1 + 2^-23)^2 - 1 = 2^-22 + 2^-46 exactly; a rounded product loses 2^-46
    x = 0x3F800001
    assert fma_f32(x, x, mone) == round_to_format(Fraction(2) ** -22 + Fraction(2) ** -46, *F32)
    print("ptx_sim self-test passed")


def main():
    if len(sys.argv) == 2 and sys.argv[1] == "--self-test":
        self_test()
        return 0
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 64
    try:
        run_job(sys.argv[1])
    except SimError as e:
        print(f"ptx_sim: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
