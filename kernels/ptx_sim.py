#!/usr/bin/env python3
"""A small, strict PTX interpreter for the subset kernels/gen_patchify.py,
kernels/gen_quant.py, kernels/gen_argmin.py, kernels/gen_merge.py and kernels/gen_attention.py
emit, run on their committed modules as they are (nothing patched).

It exists because the CUDA backend cannot be run on machines without a GPU: the Rust tests
`emulated_*` in tests/cuda_patchify.rs and tests/cuda_quant.rs build the real launch (parameter
struct bytes, grid, buffers) with the crate's host code, run the real PTX here, and compare the
result with the reference / cpu backend bit for bit; gen_argmin.py --emulate, gen_merge.py
--simulate and gen_attention.py --emulate run their committed modules here against Python
models of their contracts. Python 3 standard library only.

Strict on purpose: reading an undefined register, touching memory outside every buffer,
writing a read-only buffer, writing a byte twice (plain stores; `red` / `atom` may update a
byte many times), a misaligned access, a warp collective (`vote.sync`, `shfl.sync`, `bar.warp.sync`)
reached by the lanes of a warp at different instructions or with a member mask other than the
warp's live lanes, or an instruction it does not know is an error (exit status 2).

Threads run one warp at a time; within a warp each lane runs until it reaches a collective
(or exits), then the collective executes for all lanes at once, so warp-synchronous code
(ballot, shuffle, mma.sync) sees exactly what the hardware's converged warp would. The warps
of a block run in turn up to `bar.sync 0`, which they then pass together; each block has its
own `.shared` memory (entry-scoped `.shared .align A .T name[N]` variables, T any scalar
type: N elements; a variable's name is its offset in the block's window, usable as a `mov`
operand). Shared memory is undefined when a block starts: it reads as all ones (an f32 NaN)
until written, and with strict_shared (job key "shared_reads": "written") reading a byte the
block has not written is an error. Blocks never synchronise with each other, and atomics
(`red`, and `atom`, which also returns the old value) commute, so running them in order
gives every result a GPU may give. Registers are declared one by one or as ranges
(`.reg .b32 %r<48>`: %r0 .. %r47).

mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16} is a model: each D element is C plus the 16
exact products, rounded once (the hardware's accumulation order and rounding are not
specified), so it checks fragment layouts exactly but tensor-core arithmetic only up to
tolerances. fma.rn.ftz.f32 flushes subnormal inputs and results to zeros of their sign.

For kernels/gen_attention.py: ldmatrix.sync.aligned.m8n8.x{1,2,4}(.trans).shared.b16 (a warp
collective, PTX ISA fragment layout); cp.async.{ca,cg}.shared.global with src-size (zero-fill)
and commit_group / wait_group, the copies landing at the wait that completes their group (job
key "cp_async": "wait", the default, catches reads before the wait) or at issue ("issue":
catches overwrites of a buffer other warps still read before a barrier); ex2.approx(.ftz).f32
and lg2.approx.f32 modelled as correctly rounded 2^x / log2 x (through doubles; the hardware
is within 2 ulp / 2^-22.6 abs, so tests use tolerances); rcp.rn.f32; cvt.rn.{f16,bf16}x2.f32
(a to the upper half); cvt.u64.s32 (sign-extends); div.s32, min/max.s32; add/sub/mul.f32
without a rounding modifier as .rn (ptxas may contract mul+add into fma on hardware);
negated predicate sources (`and.pred p, q, !r`).

For the sm_90a modules (gen_argmin.py, gen_merge.py, gen_attention.py):
wgmma.{fence,mma_async,commit_group,wait_group} (see wgmma(): per warp, K-major operands
through 128-byte-swizzle descriptors, an MN-major B (trans-b), A from registers; accumulators
and register A operands in flight until their wait_group), fence.proxy.async(.shared::cta) (shared writes
of the generic proxy, st.shared and cp.async, must be fenced by their writer before a wgmma
reads them), and a module-scope `.extern .shared .align A .b8 name[]` (the launch's dynamic
shared memory, job key "dynamic_shared": bytes).

For kernels/gen_merge.py: red / atom .global.{add,min,max}.{u32,u64}; testp.{finite,
infinite,number,notanumber,normal,subnormal}.f32 (zeros are normal); abs.f32 (clears the sign;
a NaN input gives the canonical NaN, the ISA leaves which NaN unspecified); sqrt.rn.f32
correctly rounded (sqrt(-0) = -0, NaN for x < 0); div.u32 (division by zero, whose result
the ISA leaves unspecified, is an error); cvt.u32.u16 (zero-extends); ld / st .v2 / .v4.

The semantics follow the PTX ISA: add/sub/mul/div/fma .rn.f32 round once, to nearest even,
with subnormals (no .ftz); min/max return the non-NaN operand; cvt.rn.{f16,bf16}.f32 round to
nearest even; cvt.rni rounds half to even, cvt.rzi truncates, float-to-int conversions clamp
(NaN -> 0); loads of narrow types into wider registers zero-extend; a NaN result is the
canonical 0x7fffffff.

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


def fma_f32_fraction(x, a, b):
    """fma.rn.f32 through Fractions: the slow, obvious version (the self-test compares)."""
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


def f32_value(bits):
    """Python float of f32 bits (exact)."""
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def f32_bits_of(x):
    """f32 bits of a Python float that is exactly representable (or inf); NaN -> canonical."""
    if x != x:
        return F32_NAN
    return struct.unpack("<I", struct.pack("<f", x))[0]


def dyadic(bits):
    """(kind, sign, m, e) of f32 bits: a finite value is (-1)^sign * m * 2^e, m an integer."""
    sign = bits >> 31
    exp = (bits >> 23) & 0xFF
    man = bits & 0x7FFFFF
    if exp == 0xFF:
        return ("nan" if man else "inf", sign, 0, 0)
    if exp == 0:
        return ("fin", sign, man, -149)
    return ("fin", sign, man | 0x800000, exp - 150)


def round_dyadic(m, e, sticky=False):
    """Bits of the f32 nearest to m * 2^e (m a non-zero integer), ties to even, subnormals,
    overflow to infinity. `sticky`: the true value is a hair above |m| * 2^e (below half a unit
    of m), for quotients."""
    sign = 1 if m < 0 else 0
    n = -m if sign else m
    if sticky:
        n, e = (n << 1) | 1, e - 1
    top = n.bit_length() - 1 + e  # n * 2^e in [2^top, 2^(top+1))
    q = max(top, -126) - 23  # the quantum of the result
    shift = q - e
    if shift <= 0:
        r = n << -shift
    else:
        r = n >> shift
        rem = n & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and r & 1):
            r += 1
    if r == 1 << 24:
        r, q = r >> 1, q + 1
    if r >= 1 << 23:
        exp = q + 150
        if exp >= 0xFF:
            return (sign << 31) | 0x7F800000
        return (sign << 31) | (exp << 23) | (r - (1 << 23))
    return (sign << 31) | r  # subnormal


def f32_arith(op, a, b):
    """a op b for op in add, sub, mul, div: IEEE f32, round to nearest even, no ftz."""
    if op == "sub":
        b ^= 0x80000000
        op = "add"
    ka, sa, ma, ea = dyadic(a)
    kb, sb, mb, eb = dyadic(b)
    if ka == "nan" or kb == "nan":
        return F32_NAN
    if ka == "inf" or kb == "inf":
        # Special cases are exact in double arithmetic.
        fa, fb = f32_value(a), f32_value(b)
        if op == "div" and fb == 0:
            return ((sa ^ sb) << 31) | 0x7F800000
        r = fa + fb if op == "add" else fa * fb if op == "mul" else fa / fb
        return f32_bits_of(r)
    if op == "add":
        if ma == 0 and mb == 0:
            return (sa & sb) << 31
        lo = min(ea, eb)
        m = (-ma if sa else ma) << (ea - lo)
        m += (-mb if sb else mb) << (eb - lo)
        return round_dyadic(m, lo) if m else 0  # exact cancellation: +0
    if op == "mul":
        if ma == 0 or mb == 0:
            return (sa ^ sb) << 31
        return round_dyadic(-ma * mb if sa ^ sb else ma * mb, ea + eb)
    if op == "div":
        if mb == 0:
            return F32_NAN if ma == 0 else ((sa ^ sb) << 31) | 0x7F800000
        if ma == 0:
            return (sa ^ sb) << 31
        k = max(0, 26 + mb.bit_length() - ma.bit_length()) + 2
        qt, r = divmod(ma << k, mb)  # qt has >= 26 significant bits
        return round_dyadic(-qt if sa ^ sb else qt, ea - eb - k, sticky=r != 0)
    raise SimError(f"f32 {op}")


def fma_f32(x, a, b):
    """fma.rn.f32: x * a + b rounded once."""
    kx, sx, mx, ex = dyadic(x)
    ka, sa, ma, ea = dyadic(a)
    kb, sb, mb, eb = dyadic(b)
    if "nan" in (kx, ka, kb):
        return F32_NAN
    if "inf" in (kx, ka, kb):
        r = f32_value(x) * f32_value(a) + f32_value(b)
        return F32_NAN if r != r else f32_bits_of(r)
    sp = sx ^ sa
    mp, ep = mx * ma, ex + ea
    if mp == 0 and mb == 0:
        return (sp & sb) << 31
    if mp == 0:
        return b
    lo = min(ep, eb)
    m = (-mp if sp else mp) << (ep - lo)
    m += (-mb if sb else mb) << (eb - lo)
    return round_dyadic(m, lo) if m else 0


def flush_f32(x):
    """.ftz: a subnormal f32 becomes a zero of the same sign."""
    if x & 0x7F800000 == 0:
        return x & 0x80000000
    return x


def sqrt_f32(x):
    """sqrt.rn.f32: correctly rounded (the double square root of an f32, rounded to f32, is:
    53 >= 2 * 24 + 2 bits)."""
    kind, sign, v = decode(x, *F32)
    if kind == "nan" or (sign and not (kind == "fin" and v == 0)):
        return F32_NAN
    if kind == "inf" or v == 0:
        return x
    import math
    return struct.unpack("<I", struct.pack("<f", math.sqrt(float(v))))[0]


def f32_minmax(op, a, b):
    """min.f32 / max.f32: the non-NaN operand if one is NaN; -0 orders below +0."""
    ka, sa, va = decode(a, *F32)
    kb, sb, vb = decode(b, *F32)
    if ka == "nan" and kb == "nan":
        return F32_NAN
    if ka == "nan":
        return b
    if kb == "nan":
        return a

    def key(k, s, v):
        if k == "inf":
            return (Fraction(-1 if s else 1) * 10 ** 400, 0)
        return (v, -1 if s else 0)  # -0 < +0

    first = key(ka, sa, va) <= key(kb, sb, vb)
    if op == "min":
        return a if first else b
    return b if first else a


UNORDERED = {"equ", "neu", "ltu", "leu", "gtu", "geu"}
ORDERED_CMP = {"eq": lambda x, y: x == y, "ne": lambda x, y: x != y, "lt": lambda x, y: x < y,
               "le": lambda x, y: x <= y, "gt": lambda x, y: x > y, "ge": lambda x, y: x >= y}


def f32_compare(cmp, x, y):
    """setp.<cmp> on two Python floats (f32 and f16 values convert exactly): ordered
    comparisons are false when either operand is NaN, their u-suffixed (unordered) forms true;
    ne is ordered too."""
    unordered = x != x or y != y
    if cmp == "nan":
        return unordered
    if cmp == "num":
        return not unordered
    if unordered:
        return cmp in UNORDERED
    return ORDERED_CMP[cmp[:2] if cmp in UNORDERED else cmp](x, y)


def f16_value(bits):
    return struct.unpack("<e", struct.pack("<H", bits & 0xFFFF))[0]


def cvt_rni_f32_f32(x):
    """Round to an integral value, half to even, keeping the sign (and NaN / inf)."""
    kind, sign, v = decode(x, *F32)
    if kind == "nan":
        return F32_NAN
    if kind == "inf" or v == 0:
        return x
    n = v.numerator // v.denominator
    rem = v - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    if n == 0:
        return sign << 31
    return round_to_format(Fraction(n), *F32)


def cvt_rzi_u32_f32(x):
    kind, sign, v = decode(x, *F32)
    if kind == "nan":
        return 0
    if kind == "inf":
        return 0 if sign else 0xFFFFFFFF
    n = abs(v.numerator) // v.denominator
    n = -n if v < 0 else n
    return max(0, min(0xFFFFFFFF, n))


# ------------------------------------------------------------------------------------------
# Parsing.
# ------------------------------------------------------------------------------------------
WIDTH = {"u32": 32, "b32": 32, "s32": 32, "u64": 64, "b64": 64, "f32": 32, "b16": 16,
         "u16": 16, "f16": 16, "bf16": 16, "u8": 8, "b8": 8, "pred": 1}
SPECIAL = {"%tid.x", "%tid.y", "%tid.z", "%ntid.x", "%ntid.y", "%ntid.z", "%ctaid.x",
           "%ctaid.y", "%ctaid.z", "%nctaid.x", "%nctaid.y", "%nctaid.z", "%laneid"}
# Warp collectives: executed for all lanes of a warp together.
COLLECTIVE = {"vote", "shfl", "bar", "mma", "ldmatrix", "wgmma"}
M32, M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


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
    def __init__(self, name, params, regs, code, labels, shared=None, dynamic=None):
        self.name, self.params, self.regs, self.code, self.labels = name, params, regs, code, labels
        self.consts = {}  # operand text -> immediate value (cache)
        # .shared variables: name -> offset in the block's shared window, and its total size
        self.shared, self.shared_size = {}, 0
        for sname, size, align in shared or []:
            off = (self.shared_size + align - 1) // align * align
            self.shared[sname] = off
            self.shared_size = off + size
        # `.extern .shared .align A .b8 name[]`: the launch's dynamic shared memory, after the
        # static variables (aligned to A)
        if dynamic:
            dname, align = dynamic
            self.shared[dname] = (self.shared_size + align - 1) // align * align
            self.shared_size = self.shared[dname]
        self.dynamic = dynamic
        self.uses_wgmma = any(c[1][0] == "wgmma" for c in code)


def parse_module(text):
    text = strip_comments(text)
    kernels = {}
    # a module-scope `.extern .shared .align A .b8 name[]`: every entry's dynamic shared memory
    module_dynamic = None
    depth = 0
    for stmt in re.split(r"([{};])", text):
        if stmt == "{":
            depth += 1
        elif stmt == "}":
            depth -= 1
        elif depth == 0 and ".extern" in stmt:  # (directives without ';' may precede it)
            ext = stmt[stmt.index(".extern"):].strip()
            dm = re.fullmatch(r"\.extern\s+\.shared\s+\.align\s+(\d+)\s+\.b8\s+(\w+)\[\]", ext)
            if not dm or module_dynamic or int(dm.group(1)) & (int(dm.group(1)) - 1):
                raise SimError(f"unsupported dynamic shared declaration {ext!r}")
            module_dynamic = (dm.group(2), int(dm.group(1)))
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
        regs, code, labels, shared, dynamic = {}, [], {}, [], module_dynamic
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
            if stmt.startswith(".shared"):
                sm = re.fullmatch(r"\.shared\s+\.align\s+(\d+)\s+\.(\w+)\s+(\w+)\[(\d+)\]", stmt)
                if not sm or sm.group(2) not in WIDTH or sm.group(2) == "pred":
                    raise SimError(f"{name}: unsupported shared declaration {stmt!r}")
                align, elem = int(sm.group(1)), WIDTH[sm.group(2)] // 8
                if align & (align - 1) or align < elem:
                    raise SimError(f"{name}: bad alignment in {stmt!r}")
                shared.append((sm.group(3), elem * int(sm.group(4)), align))
                continue
            if stmt.startswith(".reg"):
                rm = re.fullmatch(r"\.reg\s+\.(\w+)\s+(.*)", stmt, flags=re.S)
                if not rm or rm.group(1) not in WIDTH:
                    raise SimError(f"{name}: unsupported register declaration {stmt!r}")
                for r in rm.group(2).split(","):
                    r = r.strip()
                    nm = re.fullmatch(r"(%\w+)<(\d+)>", r)  # %r<N>: %r0 .. %r{N-1}
                    names = [f"{nm.group(1)}{i}" for i in range(int(nm.group(2)))] if nm else [r]
                    for n in names:
                        if not re.fullmatch(r"%\w+", n) or n in regs:
                            raise SimError(f"{name}: bad or repeated register {n!r}")
                        regs[n] = rm.group(1)
                continue
            code.append(parse_instr(stmt))
        kernels[name] = Kernel(name, params, regs, code, labels, shared, dynamic)
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
    oparts = opcode.split(".")
    if guard is not None and oparts[0] in COLLECTIVE:
        raise SimError(f"guarded warp collective `{stmt}` is not supported")
    return (guard, oparts, ops, stmt)


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

    def write(self, addr, data, once=True):
        s, b, w, cnt, n = self.find(addr, len(data))
        if not w:
            raise SimError(f"write to read-only buffer {n} at {addr:#x}")
        if once:
            for k in range(len(data)):
                if cnt[addr - s + k]:
                    raise SimError(f"byte {addr - s + k} of {n} written twice")
                cnt[addr - s + k] = 1
        b[addr - s:addr - s + len(data)] = data


class Thread:
    __slots__ = ("regs", "special", "pc", "steps", "done", "lane", "cp_pending", "wid", "dirty")


class Ctx:
    """What the instructions of one launch need."""

    def __init__(self, kernel, param_bytes, mem):
        self.kernel, self.param_bytes, self.mem = kernel, param_bytes, mem
        self.pname = kernel.params[0]
        self.decl = kernel.regs
        self.smem = bytearray(kernel.shared_size)  # the running block's shared memory
        self.smem_set = bytearray(kernel.shared_size)  # 1: written since the block started
        self.strict_shared = False  # reading a byte the block has not written is an error
        self.track = kernel.uses_wgmma  # shared writes versioned and proxy-tracked (wgmma)
        self.wg, self.smem_ver, self.smem_dirty = {}, {}, {}

    def smem_written(self, th, addr, size):
        """Bookkeeping of a generic-proxy write of shared memory by `th` (for wgmma checks)."""
        if not self.track:
            return
        for c in range(addr >> 4, (addr + size + 15) >> 4):
            self.smem_ver[c] = self.smem_ver.get(c, 0) + 1
            self.smem_dirty[c] = th
            th.dirty.add(c)

    def operand(self, th, op):
        regs = th.regs
        if op in regs:
            return regs[op]
        if op in self.decl:
            raise SimError(f"register {op} read before it is written")
        if op in th.special:
            return th.special[op]
        if op.startswith("!") and self.decl.get(op[1:]) == "pred":  # negated predicate source
            return 0 if self.operand(th, op[1:]) else 1
        if op in self.kernel.shared:
            return self.kernel.shared[op]
        cache = self.kernel.consts
        if op in cache:
            return cache[op]
        if re.fullmatch(r"0[fF][0-9a-fA-F]{8}", op):
            v = int(op[2:], 16)
        elif re.fullmatch(r"-?0[xX][0-9a-fA-F]+", op):
            v = int(op, 16) & M64
        elif re.fullmatch(r"-?\d+", op):
            v = int(op) & M64
        else:
            raise SimError(f"unknown operand {op}")
        cache[op] = v
        return v

    def pred_operand(self, th, op):
        if op.startswith("!"):
            return not self.operand(th, op[1:])
        return bool(self.operand(th, op))

    def setreg(self, th, r, v):
        ty = self.decl.get(r)
        if ty is None:
            raise SimError(f"write to undeclared register {r}")
        if ty == "pred":
            th.regs[r] = bool(v)
        else:
            th.regs[r] = v & ((1 << WIDTH[ty]) - 1)

    def address(self, th, op):
        m = re.fullmatch(r"\[\s*(%?\w+)\s*(?:\+\s*(-?\d+))?\s*\]", op)
        if not m:
            raise SimError(f"bad address {op}")
        return m.group(1), int(m.group(2) or 0)


def run_kernel(kernel, grid, block, param_bytes, mem, stats, strict_shared=False, dynamic_shared=0):
    _, psize = kernel.params
    if len(param_bytes) != psize:
        raise SimError(f"{kernel.name}: param block is {len(param_bytes)} bytes, entry wants {psize}")
    if dynamic_shared and not kernel.dynamic:
        raise SimError(f"{kernel.name}: {dynamic_shared} bytes of dynamic shared memory for an entry without .extern .shared")
    smem_size = kernel.shared_size + dynamic_shared
    ctx = Ctx(kernel, param_bytes, mem)
    ctx.strict_shared = strict_shared
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                threads = []
                for tz in range(block[2]):
                    for ty_ in range(block[1]):
                        for tx in range(block[0]):
                            th = Thread()
                            th.regs, th.pc, th.steps, th.done = {}, 0, 0, False
                            th.cp_pending = None
                            th.lane = len(threads) % 32
                            th.wid = len(threads) // 32
                            th.dirty = set()
                            th.special = {
                                "%tid.x": tx, "%tid.y": ty_, "%tid.z": tz,
                                "%ntid.x": block[0], "%ntid.y": block[1], "%ntid.z": block[2],
                                "%ctaid.x": bx, "%ctaid.y": by, "%ctaid.z": bz,
                                "%nctaid.x": grid[0], "%nctaid.y": grid[1], "%nctaid.z": grid[2],
                                "%laneid": th.lane,
                            }
                            threads.append(th)
                # Shared memory is undefined at block start: poison it (all ones: an f32 NaN).
                ctx.smem = bytearray(b"\xff" * smem_size)
                ctx.smem_set = bytearray(smem_size)
                ctx.cp_groups = {}
                # wgmma: per-warp async state; per 16-byte shared chunk a write count and the
                # thread whose generic-proxy write is not yet fenced for the async proxy
                ctx.wg = {}
                ctx.smem_ver, ctx.smem_dirty = {}, {}
                warps = [threads[w:w + 32] for w in range(0, len(threads), 32)]
                # Each warp runs until it exits or waits at bar.sync; when every warp that has
                # not exited waits, they all pass the barrier together.
                while True:
                    waiting = []
                    for warp in warps:
                        try:
                            if run_warp(ctx, warp, stats) == "barrier":
                                waiting.append(warp)
                        except SimError as e:
                            raise SimError(f"{kernel.name}: {e}") from None
                    if not waiting:
                        break
                    for warp in waiting:
                        for th in warp:
                            if not th.done:
                                th.pc += 1
                                th.steps += 1


def advance(ctx, th, stats):
    """Runs `th` until it exits or reaches a warp collective (not executed yet)."""
    code, labels = ctx.kernel.code, ctx.kernel.labels
    while True:
        if th.pc >= len(code):
            raise SimError("fell off the end")
        guard, parts, ops, text = code[th.pc]
        if parts[0] in COLLECTIVE:
            return
        th.pc += 1
        th.steps += 1
        stats["instructions"] += 1
        if th.steps > 2_000_000:
            raise SimError("runaway thread")
        if guard is not None:
            neg, p = guard
            if ctx.operand(th, p) == neg:
                continue
        try:
            pc = step(ctx, th, parts, ops, th.pc, labels)
        except SimError as e:
            raise SimError(f"`{text}`: {e}") from None
        if pc is None:
            th.done = True
            stats["threads"] += 1
            return
        th.pc = pc


def run_warp(ctx, warp, stats):
    code = ctx.kernel.code
    while True:
        for th in warp:
            if not th.done:
                advance(ctx, th, stats)
        live = [th for th in warp if not th.done]
        if not live:
            if ctx.wg.get(warp[0].wid, {}).get("ops"):
                raise SimError("a warp exited with wgmma operations in flight (no wait_group)")
            for th in warp:  # ("wait" mode: copies are held until their wait_group)
                if getattr(th, "cp_pending", None) or any(ctx.cp_groups.get(id(th), [])):
                    raise SimError("a thread exited with cp.async copies it never waited for")
            return
        pcs = {th.pc for th in live}
        if len(pcs) != 1:
            where = sorted(code[pc][3] for pc in pcs)
            raise SimError(f"divergent warp: lanes wait at different collectives {where}")
        _, parts, ops, text = code[live[0].pc]
        if parts == ["bar", "sync"]:
            if len(ops) != 1 or ctx.operand(live[0], ops[0]) != 0:
                raise SimError(f"`{text}`: only bar.sync 0 is supported")
            return "barrier"
        try:
            collective(ctx, live, parts, ops)
        except SimError as e:
            raise SimError(f"`{text}`: {e}") from None
        for th in live:
            th.pc += 1
            th.steps += 1
        stats["instructions"] += len(live)


def widen16(h, fmt):
    """A bf16 / f16 value's f32 bits (exact; NaNs canonical)."""
    if fmt is BF16:
        return F32_NAN if (h & 0x7F80) == 0x7F80 and h & 0x7F else h << 16
    return F32_NAN if (h & 0x7C00) == 0x7C00 and h & 0x3FF else f32_bits_of(struct.unpack("<e", h.to_bytes(2, "little"))[0])


def exact_dots(A, B, C):
    """D[i][j] = C[i][j] + sum_k A[i][k] B[k][j], all f32 bits, each D element rounded once from
    the exact sum (the tensor-core model of mma.sync and wgmma)."""
    def sdy(v):
        _, sg, m, e = dyadic(v)
        return (-m if sg else m, e)
    kk = len(B)
    Ad = [[sdy(x) for x in row] for row in A]
    Bd = [[sdy(x) for x in row] for row in B]
    D = [[0] * len(C[0]) for _ in range(len(C))]
    for i in range(len(C)):
        for j in range(len(C[0])):
            vals = [A[i][k] for k in range(kk)] + [B[k][j] for k in range(kk)] + [C[i][j]]
            if any((v >> 23) & 0xFF == 0xFF for v in vals):  # a NaN or an infinity
                r = f32_value(C[i][j]) + sum(f32_value(A[i][k]) * f32_value(B[k][j]) for k in range(kk))
                D[i][j] = F32_NAN if r != r else f32_bits_of(r)
                continue
            # exact sum as an integer times a power of two (all inputs are dyadic)
            _, sc, mc, ec = dyadic(C[i][j])
            terms = [(-mc if sc else mc, ec)]
            for k in range(kk):
                ma, ea = Ad[i][k]
                mb, eb = Bd[k][j]
                terms.append((ma * mb, ea + eb))
            emin_ = min(e for _, e in terms)
            total = sum(m << (e - emin_) for m, e in terms)
            D[i][j] = round_dyadic(total, emin_) if total != 0 else 0
    return D


def mma(ctx, lanes, parts, ops):
    """mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 for a full warp. The
    PTX ISA leaves the accumulation order and intermediate rounding unspecified; this model
    rounds each D element once (exact C + sum of 16 products): real tensor cores may differ in
    the last bits, so tests compare with tolerances, not bit for bit."""
    if parts[1:] not in (["sync", "aligned", "m16n8k16", "row", "col", "f32", t, t, "f32"] for t in ("bf16", "f16")):
        raise SimError(opcode_text(parts))
    if len(lanes) != 32:
        raise SimError("mma.sync needs all 32 lanes")
    fmt = BF16 if parts[7] == "bf16" else F16
    regs = [[x.strip() for x in op[1:-1].split(",")] for op in ops]
    if [len(r) for r in regs] != [4, 4, 2, 4]:
        raise SimError("mma operand arity")
    d_, a_, b_, c_ = regs

    def halves(th, r):
        v = ctx.operand(th, r) & M32
        return [widen16(v & 0xFFFF, fmt), widen16(v >> 16, fmt)]

    A = [[None] * 16 for _ in range(16)]
    B = [[None] * 8 for _ in range(16)]
    C = [[None] * 8 for _ in range(16)]
    for lane, th in lanes.items():
        g, t = lane >> 2, lane & 3
        for i, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            A[row][col], A[row][col + 1] = halves(th, a_[i])
        for i, k in enumerate([2 * t, 2 * t + 8]):
            B[k][g], B[k + 1][g] = halves(th, b_[i])
        for i, (row, col) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
            C[row][col] = ctx.operand(th, c_[i]) & M32
    D = exact_dots(A, B, C)
    for lane, th in lanes.items():
        g, t = lane >> 2, lane & 3
        for i, (row, col) in enumerate([(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]):
            ctx.setreg(th, d_[i], D[row][col])


def wgmma_smem_address(desc, r, k):
    """Byte address in shared memory of element (r, k) (r: row of the M or N extent, k < 16) of
    a K-major 16-bit operand described by the 64-bit matrix descriptor `desc` (PTX ISA,
    "Matrix Descriptor Format"): start address bits 0-13, leading byte offset 16-29, stride
    byte offset 32-45 (each >> 4), base offset 49-51, swizzle mode 62-63. Only the 128-byte
    swizzle (mode 1) with base offset 0 is modelled, as CUTLASS's K-major SW128 atoms use it:
    8-row groups of 128-byte rows `stride` bytes apart, and the swizzle XORs address bits 4-6
    (the 16-byte chunk) with bits 7-9 (the row within a 1024-byte aligned group). The start
    address must lie in the first row of such a group (it carries the K offset inside the
    128-byte row, a multiple of 32 bytes for k16 steps)."""
    start = (desc & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    if desc >> 62 != 1 or (desc >> 49) & 7:
        raise SimError(f"wgmma descriptor {desc:#018x}: only 128-byte swizzle with base offset 0 is modelled")
    if sbo % 1024:
        raise SimError(f"wgmma descriptor stride byte offset {sbo} is not a multiple of the 1024-byte swizzle atom")
    if (start >> 7) & 7 or (start & 127) % 32:
        raise SimError(f"wgmma descriptor start {start:#x} is not a 32-byte step in the first row of a 1024-byte group")
    a = start + (r >> 3) * sbo + (r & 7) * 128 + 2 * k
    return a ^ (((a >> 7) & 7) << 4)


def wgmma_smem_address_mn(desc, n, k, nn):
    """Byte address of element (k, n) (k < 16 along K, n < nn along N) of an MN-major
    (transposed, imm-trans-b = 1) 16-bit B operand with 128-byte swizzle (PTX ISA canonical
    layout ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)), T = 8 elements of 16 bytes): K row k % 8 of an
    8-row group is a 128-byte line of 64 consecutive n, the 8-row groups along K are SBO apart
    and the 64-wide N blocks LBO apart; the same XOR of bits 4-6 with bits 7-9 as K-major. The
    start must be 1024-aligned in the swizzle atom (a k16 step is two 8-row groups: + 2 SBO);
    SBO, and LBO when nn > 64, multiples of 1024 (the layouts FlashAttention-3 and CUTLASS use
    for a row-major V; other offsets are not modelled)."""
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    if desc >> 62 != 1 or (desc >> 49) & 7:
        raise SimError(f"wgmma descriptor {desc:#018x}: only 128-byte swizzle with base offset 0 is modelled")
    if sbo % 1024 or (nn > 64 and lbo % 1024):
        raise SimError(f"wgmma MN-major descriptor offsets LBO {lbo}, SBO {sbo}: multiples of 1024 are modelled")
    if start % 1024:
        raise SimError(f"wgmma MN-major descriptor start {start:#x} is not 1024-aligned")
    a = start + (n >> 6) * lbo + (k >> 3) * sbo + (k & 7) * 128 + 2 * (n & 63)
    return a ^ (((a >> 7) & 7) << 4)


def wgmma(ctx, lanes, parts, ops):
    """wgmma (sm_90a) per warp: the warpgroup's four warps each issue it, and each warp's part
    of the result (accumulator rows 16 (warp % 4) .. +16) depends only on its own rows of A, so
    the model runs it warp by warp. Forms:

    - `wgmma.fence.sync.aligned`: required before a warp's first mma_async after a wait_group
      (and at the start): the registers the epilogue touched become the wgmma's again.
    - `wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}.{bf16,f16} {d}, descA, descB,
      scale-d, 1, 1, 0, trans-b`: A and B from shared memory (K-major, 128-byte swizzle
      descriptors, see wgmma_smem_address; trans-b = 1: B MN-major, wgmma_smem_address_mn), or
      `{d}, {a0, a1, a2, a3}, descB, scale-d, 1, 1, trans-b`: A from registers (K-major, the
      mma.sync m16n8k16 A fragment per warp; the registers are held like the accumulators until
      the wait_group, and must not be written between wgmma.fence and the op),
      D = A B + (scale-d ? D : 0), each element rounded once from the
      exact sum as mma.sync's model. The accumulator layout is mma.sync's m16n8 repeated over
      N / 8: d[4 j + e] holds row g + 8 (e >> 1), column 8 j + 2 t + (e & 1) of the warp's 16 rows
      (g = lane / 4, t = lane % 4). The operands are read at issue; the accumulators leave the
      registers (reading them is an error) until the wait_group that completes the op's group
      writes them back (writing them meanwhile is an error); a later mma_async on the same
      accumulators chains on the in-flight values, as the hardware's in-order pipe does. Every
      shared chunk read must have been fenced for the async proxy (fence.proxy.async) by the
      thread whose generic write (st.shared, cp.async) produced it, and must not be written
      again before the op completes.
    - `wgmma.commit_group.sync.aligned`, `wgmma.wait_group.sync.aligned N`."""
    if len(lanes) != 32:
        raise SimError("wgmma needs all 32 lanes of the warp")
    th0 = next(iter(lanes.values()))
    st = ctx.wg.setdefault(th0.wid, {"fenced": False, "ops": [], "latest": {}, "commits": 0})
    form = parts[1:]
    if form == ["fence", "sync", "aligned"]:
        st["fenced"] = True
        # the registers as fenced: an A-from-registers operand written after this is an error
        st["fence_regs"] = {lane: dict(th.regs) for lane, th in lanes.items()}
        return
    if form == ["commit_group", "sync", "aligned"]:
        for op in st["ops"]:
            if op["group"] is None:
                op["group"] = st["commits"]
        st["commits"] += 1
        return
    if form == ["wait_group", "sync", "aligned"]:
        n = ctx.operand(th0, ops[0])
        keep = []
        for op in st["ops"]:
            if op["group"] is None or op["group"] >= st["commits"] - n:
                keep.append(op)
                continue
            for c, ver in op["reads"].items():
                if ctx.smem_ver.get(c, 0) != ver:
                    raise SimError(f"shared memory at {16 * c:#x} written while a wgmma reading it was in flight")
            for name in op["vals"][next(iter(lanes))]:
                if st["latest"].get(name) is not op:
                    continue
                del st["latest"][name]
                for lane, th in lanes.items():
                    if name in th.regs:
                        raise SimError(f"{name} written while a wgmma holding it (accumulator or A) was in flight")
                    ctx.setreg(th, name, op["vals"][lane][name])
        st["ops"] = keep
        st["fenced"] = False
        return
    m = re.fullmatch(r"m64n(\d+)k16", form[3]) if len(form) == 7 else None
    if (not m or form[:3] != ["mma_async", "sync", "aligned"] or form[4] != "f32"
            or form[5] != form[6] or form[5] not in ("bf16", "f16")):
        raise SimError(opcode_text(parts))
    nn = int(m.group(1))
    if nn % 8 or not 8 <= nn <= 256:
        raise SimError(f"wgmma n = {nn}")
    if not st["fenced"]:
        raise SimError("wgmma.mma_async without a wgmma.fence since the last wait_group")
    fmt = BF16 if form[5] == "bf16" else F16
    rs = len(ops) == 7 and ops[1].startswith("{")
    if rs and ops[4:6] == ["1", "1"] and ops[6] in ("0", "1"):
        trans_b = ops[6] == "1"
    elif not rs and len(ops) == 8 and ops[4:7] == ["1", "1", "0"] and ops[7] in ("0", "1"):
        trans_b = ops[7] == "1"
    else:
        raise SimError("wgmma operands: {d}, descA, descB, scale-d, 1, 1, 0, trans-b or {d}, {a0..a3}, "
                       "descB, scale-d, 1, 1, trans-b (unscaled, A K-major) are modelled")
    names = [x.strip() for x in ops[0][1:-1].split(",")]
    if len(names) != nn // 2 or len(set(names)) != len(names):
        raise SimError("wgmma accumulator arity")
    a_names = [x.strip() for x in ops[1][1:-1].split(",")] if rs else []
    if rs and (len(a_names) != 4 or set(a_names) & set(names)):
        raise SimError("wgmma A registers: four, none of them an accumulator")
    descs = []
    for op_ in ops[1 + rs:3]:
        vals = {ctx.operand(th, op_) & M64 for th in lanes.values()}
        if len(vals) != 1:
            raise SimError("wgmma descriptors differ between the lanes of a warp")
        descs.append(vals.pop())
    if rs:
        descs.insert(0, None)
    scale = {ctx.pred_operand(th, ops[3]) for th in lanes.values()}
    if len(scale) != 1:
        raise SimError("wgmma scale-d differs between lanes")
    scale = scale.pop()
    q = th0.wid % 4
    reads = {}

    def load(desc, r, k, mn=False):
        a = wgmma_smem_address_mn(desc, r, k, nn) if mn else wgmma_smem_address(desc, r, k)
        if a + 2 > len(ctx.smem):
            raise SimError(f"wgmma operand at {a:#x} outside the block's {len(ctx.smem)} bytes of shared memory")
        check_smem_set(ctx, a, 2)
        c = a >> 4
        if c in ctx.smem_dirty:
            raise SimError(f"wgmma reads shared memory at {a:#x} written by the generic proxy and not fenced (fence.proxy.async)")
        reads[c] = ctx.smem_ver.get(c, 0)
        return widen16(int.from_bytes(ctx.smem[a:a + 2], "little"), fmt)

    if rs:
        # A from registers: register j of lane (g, t) holds a_{2j} (bits 0-15) and a_{2j+1};
        # a_i is row g + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2 t + (i & 1) of the warp's 16
        # rows (mma.sync's m16n8k16 A layout). A register still held by an in-flight wgmma (as
        # its A) is read from there; one that is an in-flight accumulator, or that was written
        # after the last wgmma.fence, is an error (PTX ISA: undefined).
        A = [[0] * 16 for _ in range(16)]
        for lane, th in lanes.items():
            g, t = lane >> 2, lane & 3
            for j, name in enumerate(a_names):
                prev = st["latest"].get(name)
                if prev is not None:
                    if name in prev["names"]:
                        raise SimError(f"wgmma A register {name} is the accumulator of a wgmma in flight")
                    v = prev["vals"][lane][name]
                else:
                    v = ctx.operand(th, name) & M32
                    fenced = st.get("fence_regs", {}).get(lane, {})
                    if fenced.get(name) != th.regs.get(name):
                        raise SimError(f"wgmma A register {name} written after the last wgmma.fence")
                for half in range(2):
                    i = 2 * j + half
                    row, col = g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * t + (i & 1)
                    A[row][col] = widen16((v >> (16 * half)) & 0xFFFF, fmt)
    else:
        A = [[load(descs[0], 16 * q + i, k) for k in range(16)] for i in range(16)]
    B = [[load(descs[1], j, k, trans_b) for j in range(nn)] for k in range(16)]
    C = [[0] * nn for _ in range(16)]
    slots = []
    for lane, th in lanes.items():
        g, t = lane >> 2, lane & 3
        for i, name in enumerate(names):
            row, col = g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * t + (i & 1)
            slots.append((lane, name, row, col))
            if not scale:
                continue
            prev = st["latest"].get(name)
            C[row][col] = prev["vals"][lane][name] if prev is not None else ctx.operand(th, name) & M32
    D = exact_dots(A, B, C)
    op = {"names": set(names), "vals": {lane: {} for lane in lanes}, "reads": reads, "group": None}
    for lane, name, row, col in slots:
        op["vals"][lane][name] = D[row][col]
    for lane, th in lanes.items():
        for name in a_names:  # held unchanged until the op's wait_group gives them back
            prev = st["latest"].get(name)
            op["vals"][lane][name] = prev["vals"][lane][name] if prev is not None else th.regs[name]
    for lane, th in lanes.items():
        for name in names + a_names:
            th.regs.pop(name, None)
    for name in names + a_names:
        st["latest"][name] = op
    st["ops"].append(op)


def ldmatrix(ctx, lanes, parts, ops):
    """ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16 for a full warp (PTX ISA
    fragment layout): lanes 8i..8i+7 give the 16-byte rows of matrix i; lane l receives in its
    i-th register the elements (row l/4, columns 2(l%4), 2(l%4)+1) of matrix i, first in the
    low half, or with .trans those of the transposed matrix (rows 2(l%4), 2(l%4)+1, column l/4)."""
    rest = parts[1:]
    trans = "trans" in rest
    rest = [x for x in rest if x != "trans"]
    if rest[:3] != ["sync", "aligned", "m8n8"] or rest[4:] != ["shared", "b16"] or rest[3] not in ("x1", "x2", "x4"):
        raise SimError(opcode_text(parts))
    if len(lanes) != 32:
        raise SimError("ldmatrix needs all 32 lanes")
    n = int(rest[3][1])
    names = [x.strip() for x in ops[0][1:-1].split(",")]
    if len(names) != n:
        raise SimError("ldmatrix operand arity")
    mats = []
    for i in range(n):
        rows = []
        for r in range(8):
            th = lanes[8 * i + r]
            b2, o2 = ctx.address(th, ops[1])
            addr = (ctx.operand(th, b2) + o2) & M64
            if addr % 16 or addr + 16 > len(ctx.smem):
                raise SimError(f"bad ldmatrix row address {addr:#x}")
            check_smem_set(ctx, addr, 16)
            raw = ctx.smem[addr:addr + 16]
            rows.append([int.from_bytes(raw[2 * c:2 * c + 2], "little") for c in range(8)])
        mats.append(rows)
    for lane, th in lanes.items():
        g, t = lane >> 2, lane & 3
        for i in range(n):
            m = mats[i]
            if trans:
                lo, hi = m[2 * t][g], m[2 * t + 1][g]
            else:
                lo, hi = m[g][2 * t], m[g][2 * t + 1]
            ctx.setreg(th, names[i], lo | (hi << 16))


def exp2_f32(x):
    """ex2.approx.f32 modelled as a correctly rounded 2^x (the hardware is within 2 ulp): the
    double 2^x rounded to f32 (double rounding is off by at most one f32 ulp in rare ties)."""
    kind, sign, _ = decode(x, *F32)
    if kind == "nan":
        return F32_NAN
    if kind == "inf":
        return 0 if sign else 0x7F800000
    v = f32_value(x)
    if v >= 128:
        return 0x7F800000
    r = 2.0 ** v
    return f32_bits_of_double(r)


def log2_f32(x):
    """lg2.approx.f32 modelled as a correctly rounded log2 (through double; the hardware's
    error is at most 2^-22.6 absolute on its range): log2(+-0) = -inf, log2(<0) = NaN."""
    kind, sign, v = decode(x, *F32)
    if kind == "nan" or (sign and v != 0):
        return F32_NAN
    if kind == "inf":
        return 0x7F800000
    if v == 0:
        return 0xFF800000
    import math
    return f32_bits_of_double(math.log2(f32_value(x)))


def f32_bits_of_double(r):
    """f32 bits nearest to the double r (ties to even, subnormals, overflow)."""
    if r != r:
        return F32_NAN
    if r == 0:
        return 0x80000000 if str(r).startswith("-") else 0
    if abs(r) == float("inf"):
        return 0xFF800000 if r < 0 else 0x7F800000
    return round_to_format(Fraction(r), *F32)


def collective(ctx, live, parts, ops):
    """Executes a warp collective for the live lanes (which all reached it)."""
    lanes = {th.lane: th for th in live}
    if parts[0] == "mma":
        mma(ctx, lanes, parts, ops)
        return
    if parts[0] == "ldmatrix":
        ldmatrix(ctx, lanes, parts, ops)
        return
    if parts[0] == "wgmma":
        wgmma(ctx, lanes, parts, ops)
        return
    live_mask = sum(1 << lane for lane in lanes)
    mask = ctx.operand(live[0], ops[-1]) & M32
    if any(ctx.operand(th, ops[-1]) & M32 != mask for th in live):
        raise SimError("lanes disagree on the member mask")
    if mask != live_mask:
        raise SimError(f"member mask {mask:#010x} is not the warp's live lanes {live_mask:#010x}")
    op = parts[0]
    if op == "bar":
        if parts[1:] != ["warp", "sync"]:
            raise SimError("only bar.warp.sync is supported")
        return
    if op == "vote":
        if parts[1] != "sync":
            raise SimError("vote without .sync")
        mode = parts[2]
        d, a = ops[0], ops[1]
        preds = {lane: ctx.pred_operand(th, a) for lane, th in lanes.items()}
        if mode == "ballot":
            r = sum(1 << lane for lane, p in preds.items() if p)
        elif mode == "any":
            r = any(preds.values())
        elif mode == "all":
            r = all(preds.values())
        else:
            raise SimError(f"vote.{mode}")
        for th in live:
            ctx.setreg(th, d, r)
        return
    if op == "shfl":
        if parts[1] != "sync" or parts[-1] != "b32" or len(ops) != 5 or "|" in ops[0]:
            raise SimError("unsupported shfl form")
        mode = parts[2]
        d, a, b, c = ops[0], ops[1], ops[2], ops[3]
        values = {lane: ctx.operand(th, a) for lane, th in lanes.items()}
        out = {}
        for lane, th in lanes.items():
            bval, cval = ctx.operand(th, b) & 31, ctx.operand(th, c)
            segmask = (cval >> 8) & 31
            clamp = cval & 31
            max_lane = (lane & segmask) | (clamp & ~segmask & 31)
            min_lane = lane & segmask
            if mode == "idx":
                j = min_lane | (bval & ~segmask & 31)
                ok = j <= max_lane
            elif mode == "up":
                j = lane - bval
                ok = j >= max_lane
            elif mode == "down":
                j = lane + bval
                ok = j <= max_lane
            elif mode == "bfly":
                j = lane ^ bval
                ok = j <= max_lane
            else:
                raise SimError(f"shfl.{mode}")
            if not ok:
                j = lane
            if j not in values:
                raise SimError(f"lane {lane} reads inactive lane {j}")
            out[lane] = values[j]
        for lane, th in lanes.items():
            ctx.setreg(th, d, out[lane])
        return
    raise SimError(f"collective {op}")


def step(ctx, th, parts, ops, pc, labels):
    op = parts[0]
    ty = parts[-1]
    operand, setreg = ctx.operand, ctx.setreg
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
        base, off = ctx.address(th, a)
        vec = 1
        if parts[-2] in ("v2", "v4"):
            vec = int(parts[-2][1])
        size = WIDTH[ty] // 8
        if space == "param":
            if base != ctx.pname:
                raise SimError(f"param {base} unknown")
            if off % size or off + size * vec > len(ctx.param_bytes):
                raise SimError(f"bad param access at {off}")
            raw = ctx.param_bytes[off:off + size * vec]
        elif space == "global":
            addr = (operand(th, base) + off) & M64
            if addr % (size * vec):
                raise SimError(f"misaligned {size * vec}-byte load at {addr:#x}")
            raw = ctx.mem.read(addr, size * vec)
        elif space == "shared":
            addr = (operand(th, base) + off) & M64
            if addr % (size * vec) or addr + size * vec > len(ctx.smem):
                raise SimError(f"bad {size * vec}-byte shared load at {addr:#x}")
            check_smem_set(ctx, addr, size * vec)
            raw = bytes(ctx.smem[addr:addr + size * vec])
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
        if parts[1] not in ("global", "shared"):
            raise SimError(f"store to {parts[1]}")
        base, off = ctx.address(th, a)
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
        if parts[1] == "shared":
            if addr + len(raw) > len(ctx.smem):
                raise SimError(f"shared store at {addr:#x} outside the block's {len(ctx.smem)} bytes")
            ctx.smem[addr:addr + len(raw)] = raw
            ctx.smem_set[addr:addr + len(raw)] = b"\x01" * len(raw)
            ctx.smem_written(th, addr, len(raw))
        else:
            ctx.mem.write(addr, raw)
        return pc
    if op == "red":
        if len(ops) != 2:
            raise SimError("red operand arity")
        global_rmw(ctx, th, parts, ops[0], ops[1])
        return pc
    if op == "atom":
        if len(ops) != 3:
            raise SimError("atom operand arity")
        setreg(th, ops[0], global_rmw(ctx, th, parts, ops[1], ops[2]))
        return pc
    if ty == "f32" and op in ("add", "sub", "mul", "div"):
        if not (len(parts) == 3 and parts[1] == "rn") and not (len(parts) == 2 and op != "div"):
            raise SimError(opcode_text(parts) + " (only the explicit .rn form)")
        d, a, b = ops
        setreg(th, d, f32_arith(op, operand(th, a) & M32, operand(th, b) & M32))
        return pc
    if ty == "f32" and op in ("min", "max"):
        if len(parts) != 2:
            raise SimError(opcode_text(parts))
        d, a, b = ops
        setreg(th, d, f32_minmax(op, operand(th, a) & M32, operand(th, b) & M32))
        return pc
    if op in ("add", "sub", "mul", "mad", "shr", "shl", "and", "or", "xor", "min", "max"):
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
                if parts[1] == "lo":
                    r = a * (vals[1] & m)
                elif parts[1] == "hi" and ty in ("u32", "u64"):
                    r = (a * (vals[1] & m)) >> w
                else:
                    raise SimError(opcode_text(parts))
            elif op == "mad":
                if parts[1] != "lo":
                    raise SimError(opcode_text(parts))
                r = a * (vals[1] & m) + (vals[2] & m)
            elif op == "shr":
                if ty.startswith("s"):
                    raise SimError(opcode_text(parts))
                r = a >> min(vals[1] & M32, w)
            elif op == "shl":
                r = a << min(vals[1] & M32, w)
            elif op == "and":
                r = a & vals[1]
            elif op == "or":
                r = a | (vals[1] & m)
            elif op == "xor":
                r = a ^ (vals[1] & m)
            else:  # min, max
                bb = vals[1] & m
                if ty == "s32":
                    sa, sb_ = (a - (1 << 32) if a >> 31 else a), (bb - (1 << 32) if bb >> 31 else bb)
                    r = min(sa, sb_) if op == "min" else max(sa, sb_)
                elif ty in ("u32", "u64"):
                    r = min(a, bb) if op == "min" else max(a, bb)
                else:
                    raise SimError(opcode_text(parts))
            r &= m
        setreg(th, d, r)
        return pc
    if op == "not":
        d, a = ops
        setreg(th, d, ~operand(th, a) & ((1 << WIDTH[ty]) - 1))
        return pc
    if op == "brev":
        d, a = ops
        if ty != "b32":
            raise SimError(opcode_text(parts))
        v = operand(th, a) & M32
        setreg(th, d, int(f"{v:032b}"[::-1], 2))
        return pc
    if op == "clz":
        d, a = ops
        if ty != "b32":
            raise SimError(opcode_text(parts))
        v = operand(th, a) & M32
        setreg(th, d, 32 - v.bit_length())
        return pc
    if op == "shf":
        d, a, b, c = ops
        if parts[1] not in ("r", "l") or parts[2] not in ("clamp", "wrap") or ty != "b32":
            raise SimError(opcode_text(parts))
        lo, hi = operand(th, a) & M32, operand(th, b) & M32
        n = operand(th, c) & M32
        n = min(n, 32) if parts[2] == "clamp" else n & 31
        both = (hi << 32) | lo
        r = (both >> n) & M32 if parts[1] == "r" else ((both << n) >> 32) & M32
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
        d, x, y = ops[0], operand(th, ops[1]), operand(th, ops[2])
        if ty in ("u32", "u64", "b32"):
            m = (1 << WIDTH[ty]) - 1
            a, b = x & m, y & m
            r = {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b, "eq": a == b,
                 "ne": a != b}[cmp]
        elif ty == "s32":
            a, b = x & M32, y & M32
            a, b = a - (1 << 32) if a >> 31 else a, b - (1 << 32) if b >> 31 else b
            r = {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b, "eq": a == b,
                 "ne": a != b}[cmp]
        elif ty == "f32":
            r = f32_compare(cmp, f32_value(x), f32_value(y))
        elif ty == "f16":
            r = f32_compare(cmp, f16_value(x), f16_value(y))
        else:
            raise SimError(opcode_text(parts))
        if boolop:
            cv = ctx.pred_operand(th, ops[3])
            if boolop == "and":
                r = r and cv
            elif boolop == "or":
                r = r or cv
            elif boolop == "xor":
                r = r != cv
            else:
                raise SimError(opcode_text(parts))
        setreg(th, d, r)
        return pc
    if op == "selp":
        d, a, b, c = ops
        setreg(th, d, operand(th, a) if ctx.pred_operand(th, c) else operand(th, b))
        return pc
    if op == "fma":
        ftz = parts[2:] == ["ftz", "f32"]
        if parts[1] != "rn" or ty != "f32" or (len(parts) != 3 and not ftz):
            raise SimError(opcode_text(parts))
        d, a, b, c = ops
        x, y, z = (operand(th, v) & M32 for v in (a, b, c))
        if ftz:
            x, y, z = flush_f32(x), flush_f32(y), flush_f32(z)
            setreg(th, d, flush_f32(fma_f32(x, y, z)))
        else:
            setreg(th, d, fma_f32(x, y, z))
        return pc
    if op == "testp":
        if len(parts) != 3 or ty != "f32" or len(ops) != 2:
            raise SimError(opcode_text(parts))
        setreg(th, ops[0], testp_f32(parts[1], operand(th, ops[1]) & M32))
        return pc
    if op == "abs" and ty == "f32":
        if len(parts) != 2 or len(ops) != 2:
            raise SimError(opcode_text(parts) + " (no .ftz)")
        x = operand(th, ops[1]) & M32
        # The PTX ISA: NaN inputs give an unspecified NaN (the canonical one here).
        setreg(th, ops[0], F32_NAN if testp_f32("notanumber", x) else x & 0x7FFFFFFF)
        return pc
    if op == "sqrt":
        if parts[1:] != ["rn", "f32"]:
            raise SimError(opcode_text(parts))
        d, a = ops
        setreg(th, d, sqrt_f32(operand(th, a) & M32))
        return pc
    if op == "div" and ty == "s32":
        d, a, b = ops
        av, bv = operand(th, a) & M32, operand(th, b) & M32
        av, bv = (av - (1 << 32) if av >> 31 else av), (bv - (1 << 32) if bv >> 31 else bv)
        if bv == 0:
            raise SimError("div.s32 by zero")
        q = abs(av) // abs(bv)
        setreg(th, d, -q if (av < 0) != (bv < 0) else q)  # truncates toward zero
        return pc
    if op in ("ex2", "lg2"):
        ftz = "ftz" in parts
        if parts[1] != "approx" or ty != "f32" or len(parts) != (4 if ftz else 3):
            raise SimError(opcode_text(parts))
        d, a = ops
        x = operand(th, a) & M32
        if ftz:
            x = flush_f32(x)
        r = exp2_f32(x) if op == "ex2" else log2_f32(x)
        setreg(th, d, flush_f32(r) if ftz else r)
        return pc
    if op == "rcp":
        if parts[1:] != ["rn", "f32"]:
            raise SimError(opcode_text(parts))
        d, a = ops
        setreg(th, d, f32_arith("div", 0x3F800000, operand(th, a) & M32))
        return pc
    if op == "fence":
        # fence.proxy.async(.shared::cta): this thread's generic-proxy shared writes become
        # visible to the async proxy (wgmma operands)
        if parts[1:3] != ["proxy", "async"] or parts[3:] not in ([], ["shared::cta"]) or ops:
            raise SimError(opcode_text(parts))
        for c in th.dirty:
            if ctx.smem_dirty.get(c) is th:
                del ctx.smem_dirty[c]
        th.dirty.clear()
        return pc
    if op == "cp":
        return cp_async(ctx, th, parts, ops, pc)
    if op == "div" and ty == "u32":
        d, a, b = ops
        bv = operand(th, b) & M32
        if bv == 0:
            raise SimError("div.u32 by zero")
        setreg(th, d, (operand(th, a) & M32) // bv)
        return pc
    if op == "cvt":
        d, a = ops[0], ops[1]
        key = ".".join(parts[1:])
        v = operand(th, a)
        if key in ("u32.u64", "u64.u32"):
            r = v & M32
        elif key == "u32.u16":  # zero-extends
            r = v & 0xFFFF
        elif key == "u64.s32":  # sign-extends
            r = v & M32
            r = r - (1 << 32) if r >> 31 else r
        elif key in ("rn.f16x2.f32", "rn.bf16x2.f32"):  # a -> upper half, b -> lower half
            fmt = F16 if key.startswith("rn.f16") else BF16
            r = (f32_to_format(v & M32, fmt) << 16) | f32_to_format(operand(th, ops[2]) & M32, fmt)
        elif key == "rn.f32.u32":
            r = cvt_rn_f32_u32(v & M32)
        elif key == "rni.u32.f32":
            r = cvt_rni_u32_f32(v & M32)
        elif key == "rzi.u32.f32":
            r = cvt_rzi_u32_f32(v & M32)
        elif key == "rni.f32.f32":
            r = cvt_rni_f32_f32(v & M32)
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


def global_rmw(ctx, th, parts, addr_op, val_op):
    """red / atom .global.{add,min,max}.{u32,u64}: one indivisible read-modify-write; returns
    the old value. A byte may be updated any number of times (atomics commute, so running the
    threads in turn gives every result a GPU may give)."""
    if len(parts) != 4 or parts[1] != "global" or parts[2] not in ("add", "min", "max") \
            or parts[3] not in ("u32", "u64"):
        raise SimError(opcode_text(parts))
    kind, ty = parts[2], parts[3]
    base, off = ctx.address(th, addr_op)
    addr = (ctx.operand(th, base) + off) & M64
    size = WIDTH[ty] // 8
    if addr % size:
        raise SimError(f"misaligned {size}-byte {parts[0]} at {addr:#x}")
    old = int.from_bytes(ctx.mem.read(addr, size), "little")
    v = ctx.operand(th, val_op) & ((1 << (8 * size)) - 1)
    if kind == "max":
        new = max(old, v)
    elif kind == "min":
        new = min(old, v)
    else:
        new = (old + v) & ((1 << (8 * size)) - 1)
    ctx.mem.write(addr, new.to_bytes(size, "little"), once=False)
    return old


def testp_f32(cls, x):
    """testp.<cls>.f32; zeros count as normal (PTX ISA)."""
    exp, man = (x >> 23) & 0xFF, x & 0x7FFFFF
    if cls == "finite":
        return exp != 0xFF
    if cls == "infinite":
        return exp == 0xFF and man == 0
    if cls == "number":
        return not (exp == 0xFF and man)
    if cls == "notanumber":
        return exp == 0xFF and man != 0
    if cls == "normal":
        return exp not in (0, 0xFF) or (exp == 0 and man == 0)
    if cls == "subnormal":
        return exp == 0 and man != 0
    raise SimError(f"testp.{cls}")


CP_ASYNC_MODE = ["wait"]  # "wait": copies land at cp.async.wait_group; "issue": at issue


def cp_async(ctx, th, parts, ops, pc):
    """cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size}; commit_group;
    wait_group N. Each thread keeps its uncommitted copies and its committed groups; a copy
    reads global memory and writes shared memory (bytes past src-size zero-filled; src-size 0
    reads nothing) when its group completes at wait_group (or, in "issue" mode, at once). A
    thread that exits with copies it never waited for is an error ("wait" mode)."""
    if parts[1] != "async":
        raise SimError(opcode_text(parts))
    parts = parts[1:]
    if parts[1:] == ["commit_group"]:
        pend = getattr(th, "cp_pending", None) or []
        groups = ctx.cp_groups.setdefault(id(th), [])
        groups.append(pend)
        th.cp_pending = []
        return pc
    if parts[1:] == ["wait_group"]:
        n = ctx.operand(th, ops[0])
        groups = ctx.cp_groups.setdefault(id(th), [])
        while len(groups) > n:
            for copy in groups.pop(0):
                do_copy(ctx, *copy)
        return pc
    if parts[1] not in ("ca", "cg") or parts[2:] != ["shared", "global"] or len(ops) not in (3, 4):
        raise SimError(opcode_text(parts))
    size = ctx.operand(th, ops[2])
    if size not in (4, 8, 16) or (parts[1] == "cg" and size != 16):
        raise SimError(f"cp.async size {size}")
    src_size = ctx.operand(th, ops[3]) & M32 if len(ops) == 4 else size
    if src_size > size:
        raise SimError(f"cp.async src-size {src_size} > {size}")
    b, o = ctx.address(th, ops[0])
    dst = (ctx.operand(th, b) + o) & M64
    b, o = ctx.address(th, ops[1])
    src = (ctx.operand(th, b) + o) & M64
    if dst % size or dst + size > len(ctx.smem):
        raise SimError(f"bad cp.async shared address {dst:#x}")
    if src_size and src % size:
        raise SimError(f"misaligned cp.async global address {src:#x}")
    copy = (dst, src, size, src_size, th)
    if CP_ASYNC_MODE[0] == "issue":
        do_copy(ctx, *copy)
    else:
        if getattr(th, "cp_pending", None) is None:
            th.cp_pending = []
        th.cp_pending.append(copy)
    return pc


def do_copy(ctx, dst, src, size, src_size, th):
    data = ctx.mem.read(src, src_size) if src_size else b""
    ctx.smem[dst:dst + size] = data + bytes(size - src_size)
    ctx.smem_set[dst:dst + size] = b"\x01" * size
    ctx.smem_written(th, dst, size)


def check_smem_set(ctx, addr, size):
    """Shared memory starts undefined in every block (poisoned with ones here); with
    strict_shared, reading a byte no store (or cp.async) of this block has written is an error
    (without it, such reads are allowed, as a kernel may load a value it then discards)."""
    if ctx.strict_shared and 0 in ctx.smem_set[addr:addr + size]:
        raise SimError(f"shared memory at {addr:#x} read before this block wrote it")


def opcode_text(parts):
    return "unsupported form " + ".".join(parts)


# ------------------------------------------------------------------------------------------
# Jobs.
# ------------------------------------------------------------------------------------------
_MODULES = {}


def run_job(path):
    """JOB.json: {"ptx": path, "kernel": name, "grid": [x, y, z], "block": [x, y, z],
    "params": hex string, "buffers": [{"name", "addr", "file", "writable", "out"?,
    "must_write"?}], "cp_async"?, "shared_reads"?, "dynamic_shared"?}, or {"jobs": [job, ...]} to run several
    launches in one process (each on its own buffers). "shared_reads": "written" makes reading
    shared memory the block has not written an error (default "any": such bytes read as ones).
    Paths are relative to the job file. Buffers with "out" are saved there
    after the run; "must_write" makes it an error if any of the buffer's bytes was not written
    by a plain store."""
    with open(path, encoding="utf-8") as f:
        job = json.load(f)
    root = os.path.dirname(os.path.abspath(path))
    for one in job.get("jobs", [job]):
        run_one(one, root)


def run_one(job, root):
    def p(x):
        return x if os.path.isabs(x) else os.path.join(root, x)

    ptx = p(job["ptx"])
    if ptx not in _MODULES:
        with open(ptx, encoding="utf-8") as f:
            _MODULES[ptx] = parse_module(f.read())
    kernels = _MODULES[ptx]
    if job["kernel"] not in kernels:
        raise SimError(f"entry {job['kernel']} not in the module")
    mem = Memory()
    for b in job["buffers"]:
        with open(p(b["file"]), "rb") as f:
            mem.add(b["name"], int(b["addr"]), f.read(), bool(b.get("writable")))
    stats = {"threads": 0, "instructions": 0}
    CP_ASYNC_MODE[0] = job.get("cp_async", "wait")
    run_kernel(kernels[job["kernel"]], job["grid"], job["block"], bytes.fromhex(job["params"]),
               mem, stats, strict_shared=job.get("shared_reads", "any") == "written",
               dynamic_shared=int(job.get("dynamic_shared", 0)))
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


def _f32(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


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
    assert cvt_rni_u32_f32(_f32(254.5)) == 254
    assert cvt_rni_u32_f32(_f32(255.5)) == 256
    assert cvt_rni_u32_f32(_f32(-3.0)) == 0
    assert cvt_rni_u32_f32(0x7FC00000) == 0
    one, mone = 0x3F800000, 0xBF800000
    assert fma_f32(0x80000000, one, 0x80000000) == 0x80000000  # -0*1 + -0 = -0
    assert fma_f32(0x00000000, one, 0x80000000) == 0x00000000  # +0*1 + -0 = +0
    assert fma_f32(one, one, mone) == 0  # exact cancellation -> +0
    # fma rounds once: (1 + 2^-23)^2 - 1 = 2^-22 + 2^-46 exactly; a rounded product loses 2^-46
    x = 0x3F800001
    assert fma_f32(x, x, mone) == round_to_format(Fraction(2) ** -22 + Fraction(2) ** -46, *F32)

    # the fast fma against the Fraction one, on random and on nearby operands
    for _ in range(3000):
        x, a, c = rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32)
        if rng.random() < 0.5:  # make the sum cancel: c near -x*a
            p = f32_value(x) * f32_value(a)
            if p == p and abs(p) < 3e38:
                c = f32_bits_of(-p) ^ rng.getrandbits(3)
        got, want = fma_f32(x, a, c), fma_f32_fraction(x, a, c)
        assert got == want or (got == F32_NAN and decode(want, *F32)[0] == "nan"), \
            (hex(x), hex(a), hex(c), hex(got), hex(want))
    # add / sub / mul / div .rn.f32: against numpy-free double arithmetic, which is exact for
    # f32 add/sub/mul (24 + 24 bits fit 53) and correctly rounded to f32 after one more
    # rounding only when no double rounding can occur, so compare with exact Fractions instead.
    def ref(op, a, b):
        fa, fb = f32_value(a), f32_value(b)
        if op == "div" and fb == 0:
            return None
        exact = {"add": Fraction(fa) + Fraction(fb), "sub": Fraction(fa) - Fraction(fb),
                 "mul": Fraction(fa) * Fraction(fb), "div": Fraction(fa) / Fraction(fb)
                 if fb else None}[op]
        return None if exact == 0 else round_to_format(exact, *F32)

    for _ in range(4000):
        a, b = rng.getrandbits(32), rng.getrandbits(32)
        if rng.random() < 0.5:  # nearby exponents, so additions cancel and round
            b = (a & 0xFF800000) ^ (rng.getrandbits(24) & 0x807FFFFF)
        if decode(a, *F32)[0] != "fin" or decode(b, *F32)[0] != "fin":
            continue
        for op in ("add", "sub", "mul", "div"):
            want = ref(op, a, b)
            if want is not None:
                assert f32_arith(op, a, b) == want, (op, hex(a), hex(b))
    inf, ninf = 0x7F800000, 0xFF800000
    assert f32_arith("add", inf, ninf) == F32_NAN
    assert f32_arith("sub", 0x80000000, 0x80000000) == 0  # -0 - -0 = +0
    assert f32_arith("add", 0x80000000, 0x80000000) == 0x80000000
    assert f32_arith("mul", 0x80000000, one) == 0x80000000
    assert f32_arith("div", one, 0x80000000) == ninf
    assert f32_arith("div", 0, 0) == F32_NAN
    assert f32_arith("div", one, inf) == 0
    assert f32_arith("div", _f32(1.0), _f32(3.0)) == _f32(1.0 / 3.0)  # 0x3eaaaaab
    assert f32_arith("mul", 0x00800000, _f32(0.5)) == 0x00400000  # subnormal result kept
    assert f32_arith("add", 0x7F7FFFFF, 0x7F7FFFFF) == inf  # overflow
    # min / max: NaN loses, -0 < +0
    qnan = 0x7FC00000
    assert f32_minmax("max", qnan, one) == one and f32_minmax("min", one, qnan) == one
    assert f32_minmax("max", 0x80000000, 0) == 0 and f32_minmax("min", 0, 0x80000000) == 0x80000000
    assert f32_minmax("max", ninf, mone) == mone and f32_minmax("min", inf, one) == one
    # comparisons: ordered ones are false on NaN, unordered ones true
    d = f32_value
    assert f32_compare("gt", d(one), d(0)) and not f32_compare("gt", d(0x80000000), d(0))
    assert not f32_compare("gt", d(qnan), d(0)) and f32_compare("gtu", d(qnan), d(0))
    assert f32_compare("nan", d(qnan), d(qnan)) and not f32_compare("nan", d(one), d(one))
    assert not f32_compare("ne", d(qnan), d(one)) and f32_compare("neu", d(qnan), d(one))
    assert f32_compare("eq", d(0x80000000), d(0)) and f32_compare("lt", d(ninf), d(mone))
    h = f16_value
    assert f32_compare("gt", h(0x0001), h(0)) and not f32_compare("gt", h(0x8001), h(0))
    assert not f32_compare("gt", h(0x7E00), h(0)) and f32_compare("nan", h(0x7C01), h(0x7C01))
    # round to integral, truncation
    assert cvt_rni_f32_f32(_f32(2.5)) == _f32(2.0) and cvt_rni_f32_f32(_f32(3.5)) == _f32(4.0)
    assert cvt_rni_f32_f32(_f32(-0.5)) == 0x80000000 and cvt_rni_f32_f32(_f32(-1.5)) == _f32(-2.0)
    assert cvt_rni_f32_f32(_f32(8388609.0)) == _f32(8388609.0) and cvt_rni_f32_f32(inf) == inf
    assert cvt_rzi_u32_f32(_f32(6.99)) == 6 and cvt_rzi_u32_f32(_f32(-0.9)) == 0
    assert cvt_rzi_u32_f32(_f32(5e9)) == M32 and cvt_rzi_u32_f32(qnan) == 0

    # A warp-collective kernel: ballot, any, shuffle, funnel shift, brev/clz, red.max.
    ptx = """
    .visible .entry t(.param .align 8 .b8 p[8])
    {
        .reg .pred %a, %b; .reg .b32 %x, %y, %z, %w; .reg .u32 %l, %q; .reg .u64 %o, %k;
        mov.u32 %l, %laneid;
        and.b32 %x, %l, 5;
        setp.ne.u32 %a, %x, 0;
        vote.sync.ballot.b32 %y, %a, 0xffffffff;
        vote.sync.any.pred %b, %a, 0xffffffff;
        add.u32 %q, %l, 3;
        shfl.sync.idx.b32 %z, %l, %q, 31, 0xffffffff;
        shf.r.clamp.b32 %w, %y, %z, %l;
        brev.b32 %x, %y;
        clz.b32 %x, %x;
        ld.param.u64 %o, [p+0];
        mad.wide.u32 %k, %l, 16, %o;
        st.global.v4.b32 [%k], {%y, %z, %w, %x};
        @%b red.global.max.u64 [%o+512], %o;
        ret;
    }
    """
    kern = parse_module(ptx)["t"]
    mem = Memory()
    mem.add("out", 0x1000, bytes(520), True)
    stats = {"threads": 0, "instructions": 0}
    run_kernel(kern, [1, 1, 1], [32, 1, 1], (0x1000).to_bytes(8, "little"), mem, stats)
    out = mem.read(0x1000, 512)
    ballot = sum(1 << l for l in range(32) if l & 5)
    for lane in range(32):
        y, z, w, x = struct.unpack("<4I", out[16 * lane:16 * lane + 16])
        assert y == ballot and z == (lane + 3) % 32, (lane, hex(y), z)
        assert w == (((z << 32) | y) >> lane) & M32
        assert x == (ballot & -ballot).bit_length() - 1  # count of trailing zeros
    assert int.from_bytes(mem.read(0x1000 + 512, 8), "little") == 0x1000
    # Divergence at a collective is an error.
    bad = parse_module("""
    .visible .entry t(.param .align 8 .b8 p[8])
    {
        .reg .pred %a; .reg .u32 %l; .reg .b32 %y;
        mov.u32 %l, %laneid;
        setp.lt.u32 %a, %l, 16;
        @%a bra $L1;
        vote.sync.ballot.b32 %y, %a, 0xffffffff;
        ret;
    $L1:
        vote.sync.ballot.b32 %y, %a, 0xffffffff;
        ret;
    }
    """)["t"]
    try:
        run_kernel(bad, [1, 1, 1], [32, 1, 1], bytes(8), Memory(), dict(stats))
        raise AssertionError("divergent collectives were accepted")
    except SimError as e:
        assert "divergent" in str(e), e
    # sqrt.rn.f32 against exact rationals: r is correctly rounded iff (r - ulp/2)^2 <= x <=
    # (r + ulp/2)^2 with ties impossible (an f32 square root is never halfway)
    for _ in range(3000):
        x = rng.getrandbits(31)
        if x >= 0x7F800000:
            continue
        r = sqrt_f32(x)
        v = decode(x, *F32)[2]
        lo, hi = decode(r - 1, *F32)[2] if r else 0, decode(r + 1, *F32)[2]
        rv = decode(r, *F32)[2]
        assert ((lo + rv) / 2) ** 2 <= v <= ((rv + hi) / 2) ** 2, hex(x)
    assert sqrt_f32(0x80000000) == 0x80000000 and sqrt_f32(mone) == F32_NAN
    assert sqrt_f32(inf) == inf and sqrt_f32(0xFFC00001) == F32_NAN and sqrt_f32(1) == 0x1A3504F3
    # testp classes (zeros are normal) and abs
    cases = {0: "finite number normal", 0x80000000: "finite number normal", 1: "finite number subnormal",
             one: "finite number normal", ninf: "infinite number", qnan: "notanumber",
             0xFF800001: "notanumber"}
    for x, want in cases.items():
        got = [c for c in ("finite", "infinite", "number", "notanumber", "normal", "subnormal") if testp_f32(c, x)]
        assert got == want.split(), (hex(x), got)

    # merge.ptx's forms: register ranges, typed .shared arrays, bar.sync between warps, atom,
    # testp, abs, cvt.u32.u16, div.u32.
    ptx = """
    .visible .entry t(.param .align 8 .b8 p[8])
    {
        .reg .pred %q<2>; .reg .b32 %r<8>; .reg .f32 %f<3>; .reg .b64 %rd<4>; .reg .b16 %h<2>;
        .shared .align 4 .f32 buf[64];
        ld.param.u64 %rd0, [p+0];
        mov.u32 %r0, %tid.x;
        cvt.rn.f32.u32 %f0, %r0;
        sub.f32 %f0, 0f41F80000, %f0;
        shl.b32 %r1, %r0, 2;
        mov.u32 %r2, buf;
        add.u32 %r2, %r2, %r1;
        st.shared.f32 [%r2], %f0;
        bar.sync 0;
        xor.b32 %r3, %r1, 128;
        mov.u32 %r2, buf;
        add.u32 %r2, %r2, %r3;
        ld.shared.f32 %f1, [%r2];
        abs.f32 %f2, %f1;
        testp.finite.f32 %q0, %f1;
        selp.u32 %r4, 1, 0, %q0;
        mov.b32 %r5, %f2;
        mov.b32 {%h0, %h1}, %r5;
        cvt.u32.u16 %r6, %h1;
        div.u32 %r7, %r0, 3;
        mul.wide.u32 %rd1, %r0, 16;
        add.u64 %rd1, %rd1, %rd0;
        st.global.v4.b32 [%rd1], {%r5, %r4, %r6, %r7};
        cvt.u64.u32 %rd2, %r0;
        atom.global.max.u64 %rd3, [%rd0+1024], %rd2;
        st.global.u64 [%rd1+1032], %rd3;
        ret;
    }
    """
    kern = parse_module(ptx)["t"]
    assert len(kern.regs) == 2 + 8 + 3 + 4 + 2 and kern.shared == {"buf": 0} and kern.shared_size == 256
    mem = Memory()
    mem.add("out", 0x1000, bytes(2048), True)
    run_kernel(kern, [1, 1, 1], [64, 1, 1], (0x1000).to_bytes(8, "little"), mem, dict(stats),
               strict_shared=True)
    out = mem.read(0x1000, 2048)
    for t in range(64):
        a, fin, hi, q = struct.unpack_from("<4I", out, 16 * t)
        assert a == _f32(abs(31.0 - (t ^ 32))) and fin == 1 and hi == a >> 16 and q == t // 3, t
        assert struct.unpack_from("<Q", out, 1032 + 16 * t)[0] == max(t - 1, 0)  # threads in order
    assert struct.unpack_from("<Q", out, 1024)[0] == 63
    # division by zero (the result is unspecified) is an error
    bad = parse_module(ptx.replace("div.u32 %r7, %r0, 3;", "div.u32 %r7, 3, %r0;"))["t"]
    mem = Memory()
    mem.add("out", 0x1000, bytes(2048), True)
    try:
        run_kernel(bad, [1, 1, 1], [64, 1, 1], (0x1000).to_bytes(8, "little"), mem, dict(stats))
        raise AssertionError("div.u32 by zero was accepted")
    except SimError as e:
        assert "by zero" in str(e), e
    # shared memory is undefined at block start: poisoned (all ones), or an error when strict
    early = ptx.replace("        bar.sync 0;\n", "", 1)  # warp 0 reads warp 1's bytes too early
    for strict in (False, True):
        mem = Memory()
        mem.add("out", 0x1000, bytes(2048), True)
        try:
            run_kernel(parse_module(early)["t"], [1, 1, 1], [64, 1, 1], (0x1000).to_bytes(8, "little"),
                       mem, dict(stats), strict_shared=strict)
            assert not strict, "a read of unwritten shared memory was accepted"
            a, fin = struct.unpack_from("<2I", mem.read(0x1000, 8))
            assert a == F32_NAN and fin == 0, (hex(a), fin)  # |poison| is a NaN
        except SimError as e:
            assert strict and "before this block wrote it" in str(e), e
    for decl in (".reg .b32 %r<2>, %r1;", ".reg .b32 %r<>;", ".shared .align 2 .f32 buf[4];"):
        try:
            parse_module(ptx.replace(".reg .f32 %f<3>;", ".reg .f32 %f<3>; " + decl))
            raise AssertionError(f"{decl} was accepted")
        except SimError:
            pass
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
