#!/usr/bin/env python3
"""Generates kernels/lfq.ptx and kernels/fsq.ptx: the LFQ / BSQ and FSQ quantizer entries.

Python 3 standard library only. Usage:

    python3 kernels/gen_quant.py                 # (re)write kernels/lfq.ptx and kernels/fsq.ptx
    python3 kernels/gen_quant.py --check         # exit 1 if either committed file is stale
    python3 kernels/gen_quant.py --list          # print "<module> <entry> <param bytes>" per entry
    python3 kernels/gen_quant.py --stdout lfq    # print one module's PTX

One template per kernel, stamped per dtype. The design (warp steps, ballots, the status word)
is described in kernels/README.md; the parameter struct layouts below are the ABI shared with
src/cuda/lfq.rs and src/cuda/fsq.rs (tests/ptx_abi.rs compares them with the `// abi` lines
written into each PTX header).

Semantics are those of the cpu backend, bit for bit: LFQ's bit is the ordered `z > 0` (NaN and
both zeros give 0); FSQ evaluates `vistok::fsq::FsqDim::level` with the same correctly rounded
f32 operations in the same order (`add.rn`, `mul.rn`, `fma.rn`, `div.rn` never contract or
approximate; no `.ftz` anywhere).
"""

import os
import struct
import sys
from decimal import Decimal
from fractions import Fraction

sys.dont_write_bytecode = True  # no __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ptxgen  # noqa: E402

BLOCK = 256  # threads per block; .maxntid of every entry, BLOCK in src/cuda/{lfq,fsq}.rs
WARP = 32
FULL = "0xffffffff"  # member mask: every lane (the kernels keep warps converged)

DTYPES = {"f32": 4, "f16": 2, "bf16": 2}
FLOATS = ["f32", "f16", "bf16"]

# --------------------------------------------------------------------------------------------
# ABI: the parameter structs (#[repr(C)] on the Rust side, `.param .align 8 .b8 p[N]` here).
# --------------------------------------------------------------------------------------------
LFQ_FIELDS = [
    ("src", "u64"),  # encode: z [M*d]; decode: ids [M]
    ("dst", "u64"),  # encode: ids [M]; decode: codes [M*d]
    ("status", "u64"),  # one u64, zeroed by the host; see STATUS in kernels/README.md
    ("full", "u32"),  # M / 32: whole warp steps (32 ids each)
    ("tail", "u32"),  # M % 32: ids of the last, partial step
    ("d", "u32"),  # bits per id, 1..=32
    ("mask", "u32"),  # 2^d - 1
    ("msb", "u32"),  # 1: MsbFirst (channel 0 is the top bit), 0: LsbFirst
    ("magic", "u32"),  # decode: ceil(2^16 / d), so p / d = (p * magic) >> 16 for p < 1024
    ("code_pos", "u32"),  # decode: bits of +v in the output dtype
    ("code_neg", "u32"),  # decode: bits of -v in the output dtype
]
FSQ_FIELDS = [
    ("src", "u64"),  # encode: z [N*D]; decode: ids [N]
    ("dst", "u64"),  # encode: ids [N]; decode: codes [N*D]
    ("status", "u64"),  # one u64, zeroed by the host
    ("table", "u64"),  # TABLE_BYTES per dimension, see FSQ_TABLE
    ("n", "u32"),  # tokens N (< 2^31)
    ("dim", "u32"),  # dimensions D (1..=32)
    ("max_id", "u32"),  # decode: codebook size - 1
    ("pad", "u32"),
]
# One FSQ dimension in the table, 48 bytes: encode reads [0, 32), decode [32, 48).
FSQ_TABLE = [
    ("shift", 0),  # f32 atanh(offset / half_l)
    ("half_l", 4),  # f32
    ("neg_offset", 8),  # f32 -offset
    ("half_width", 12),  # f32 floor(L/2)
    ("max_level", 16),  # f32 L - 1
    ("basis", 20),  # u32 prod_{j<i} L_j
    ("levels", 32),  # u32 L (decode)
    ("div_magic", 36),  # u32 m' of Granlund-Montgomery figure 4.1 for L
    ("div_shift", 40),  # u32 sh2 = ceil(log2 L) - 1
    ("half_width_dec", 44),  # f32 floor(L/2) again, next to the decode fields
]
TABLE_BYTES = 48
SIZES = {"u64": 8, "u32": 4}


LFQ_OFF, LFQ_SIZE = ptxgen.layout(LFQ_FIELDS, SIZES)
FSQ_OFF, FSQ_SIZE = ptxgen.layout(FSQ_FIELDS, SIZES)


def entries(module):
    """(name, direction, dtype) in file order."""
    return [(f"{module}_{direction}_{t}", direction, t) for direction in ("encode", "decode") for t in FLOATS]


# --------------------------------------------------------------------------------------------
# The f32 constants of vistok::fsq::tanh, correctly rounded from the decimal literals of
# src/fsq.rs (tanh_coef), as Rust rounds them (one rounding, decimal -> f32).
# --------------------------------------------------------------------------------------------
TANH_LITERALS = [
    ("CLAMP", "7.90531110763549805"),
    ("A1", "4.89352455891786e-3"),
    ("A3", "6.37261928875436e-4"),
    ("A5", "1.48572235717979e-5"),
    ("A7", "5.12229709037114e-8"),
    ("A9", "-8.60467152213735e-11"),
    ("A11", "2.00018790482477e-13"),
    ("A13", "-2.76076847742355e-16"),
    ("B0", "4.89352518554385e-3"),
    ("B2", "2.26843463243900e-3"),
    ("B4", "1.18534705686654e-4"),
    ("B6", "1.19825839466702e-6"),
]


def f32_bits(literal):
    """Bits of the f32 nearest to the decimal `literal` (ties to even), normal range only."""
    x = Fraction(Decimal(literal))
    sign = 0
    if x < 0:
        sign, x = 1, -x
    e = x.numerator.bit_length() - x.denominator.bit_length()
    while Fraction(2) ** e > x:
        e -= 1
    while Fraction(2) ** (e + 1) <= x:
        e += 1
    assert -126 <= e <= 127, literal
    m = x / Fraction(2) ** (e - 23)
    n = m.numerator // m.denominator
    rem = m - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2):
        n += 1
    if n == 1 << 24:
        n, e = n >> 1, e + 1
    return (sign << 31) | ((e + 127) << 23) | (n - (1 << 23))


TANH = {name: f32_bits(lit) for name, lit in TANH_LITERALS}


def imm(bits):
    return f"0f{bits:08X}"


def warp_header(k):
    """lane, global warp index, warps in the grid (all warps are full: BLOCK % 32 == 0)."""
    tid, ctaid, ntid, nctaid = k.u32("tid"), k.u32("ctaid"), k.u32("ntid"), k.u32("nctaid")
    lane, gw, nw = k.u32("lane"), k.u32("gw"), k.u32("nw")
    k.op(f"mov.u32 {tid}, %tid.x")
    k.op(f"mov.u32 {ctaid}, %ctaid.x")
    k.op(f"mov.u32 {ntid}, %ntid.x")
    k.op(f"mov.u32 {nctaid}, %nctaid.x")
    k.op(f"and.b32 {lane}, {tid}, 31")
    k.op(f"mad.lo.u32 {gw}, {ctaid}, {ntid}, {tid}")
    k.op(f"shr.u32 {gw}, {gw}, 5", "global warp index")
    k.op(f"mul.lo.u32 {nw}, {nctaid}, {ntid}")
    k.op(f"shr.u32 {nw}, {nw}, 5", "warps in the grid (< 2^26)")
    return lane, gw, nw


def lfq_steps(k, gw):
    """S = full + (tail != 0) warp steps; exits warps without one (uniformly)."""
    full, tail = k.param("u32", "full"), k.param("u32", "tail")
    S, one, t = k.u32("S"), k.u32("one"), k.pred("t")
    k.op(f"setp.ne.u32 {t}, {tail}, 0")
    k.op(f"selp.u32 {one}, 1, 0, {t}")
    k.op(f"add.u32 {S}, {full}, {one}", "warp steps, < 2^27 (host-checked)")
    k.op(f"setp.ge.u32 {t}, {gw}, {S}")
    k.op(f"@{t} bra $L_done", "uniform per warp")
    return full, tail, S


# --------------------------------------------------------------------------------------------
# Element tests: value register(s) and the two predicates (z > 0, isnan z).
# --------------------------------------------------------------------------------------------
def load_elem(k, ty, j, addr, off, guard=None):
    """Loads element j's value at [addr+off] (0 when `guard` is false); returns the register
    the tests use: f32 for f32 and bf16 (widened by a shift, exactly), b16 for f16."""
    g = f"@{guard} " if guard else ""
    if ty == "f32":
        x = k.f32(f"x{j}")
        if guard:
            k.op(f"mov.f32 {x}, 0f00000000")
        k.op(f"{g}ld.global.nc.f32 {x}, [{addr}+{off}]")
        return x
    if ty == "f16":
        h = k.b16(f"x{j}")
        if guard:
            k.op(f"mov.b16 {h}, 0")
        k.op(f"{g}ld.global.nc.b16 {h}, [{addr}+{off}]")
        return h
    r = k.u32(f"x{j}")
    if guard:
        k.op(f"mov.u32 {r}, 0")
    k.op(f"{g}ld.global.nc.u16 {r}, [{addr}+{off}]")
    return r


def widen(k, ty, x, j):
    """The value to compare: bf16 bits -> f32 (exact); others as loaded."""
    if ty != "bf16":
        return x
    f = k.f32(f"x{j}")
    k.op(f"shl.b32 {x}, {x}, 16", "bf16 is the top half of an f32")
    k.op(f"mov.b32 {f}, {x}")
    return f


def tests(k, ty, v, gt, nan, hz):
    """gt = (v > 0) (ordered: NaN gives false); nan |= isnan(v)."""
    if ty == "f16":
        k.op(f"setp.gt.f16 {gt}, {v}, {hz}")
        k.op(f"setp.nan.or.f16 {nan}, {v}, {v}, {nan}")
    else:
        k.op(f"setp.gt.f32 {gt}, {v}, 0f00000000")
        k.op(f"setp.nan.or.f32 {nan}, {v}, {v}, {nan}")


def is_nan(k, ty, v, p):
    k.op(f"setp.nan.{'f16' if ty == 'f16' else 'f32'} {p}, {v}, {v}")


# --------------------------------------------------------------------------------------------
# LFQ encode.
# --------------------------------------------------------------------------------------------
UNROLL = [16, 8, 4, 2, 1]  # the word blocks of a full step: d = 16*a + 8*b + 4*c + 2*e + f


def lfq_encode(name, ty):
    sz = DTYPES[ty]
    k = ptxgen.Entry(name, LFQ_OFF)
    k.comment(
        "Warp step s covers ids [32s, 32s+32) = sign bits [32ds, 32ds+32d) of the flat z: d\n"
        "words. Lane l reads element 32w+l of word w (a warp load is 32 contiguous elements),\n"
        "ballot makes word w, lane w keeps it; lane l then cuts its id's d bits out of words\n"
        "(l*d)/32 and the next (two shuffles and a funnel shift).")
    lane, gw, nw = warp_header(k)
    full, tail, S = lfq_steps(k, gw)
    d, mask, msb = k.param("u32", "d"), k.param("u32", "mask"), k.param("u32", "msb")
    src, dst, status = k.param("u64", "src"), k.param("u64", "dst"), k.param("u64", "status")
    pmsb = k.pred("msb")
    k.op(f"setp.ne.u32 {pmsb}, {msb}, 0")
    pos, a, a1, sh, rs = (k.u32(x) for x in ("pos", "a", "a1", "sh", "rs"))
    k.op(f"mul.lo.u32 {pos}, {lane}, {d}", "first bit of this lane's id in the step")
    k.op(f"shr.u32 {a}, {pos}, 5")
    k.op(f"add.u32 {a1}, {a}, 1", "32 when d = 32 and l = 31: shfl wraps to lane 0, unused")
    k.op(f"and.b32 {sh}, {pos}, 31")
    k.op(f"sub.u32 {rs}, 32, {d}")
    stepb, ltail, d32 = k.u32("stepb"), k.u32("ltail"), k.u32("d32")
    k.op(f"mul.lo.u32 {stepb}, {d}, {WARP * sz}", "bytes of z per step")
    k.op(f"mul.lo.u32 {ltail}, {tail}, {d}", "elements of the tail step")
    k.op(f"shl.b32 {d32}, {d}, 5", "elements per step")
    laneoff = k.u64("laneoff")
    k.op(f"mul.wide.u32 {laneoff}, {lane}, {sz}")
    hz = None
    if ty == "f16":
        hz = k.b16("zero")
        k.op(f"mov.b16 {hz}, 0")
    s, base, addr = k.u32("s"), k.u64("base"), k.u64("addr")
    mine, pn, pfull = k.b32("mine"), k.pred("nan"), k.pred("full")
    gt, pl, p = k.pred("gt"), k.pred("lane"), k.pred("p")
    ballot = k.b32("ballot")
    rel, rem = k.u32("rel"), k.u32("rem")
    k.op(f"mov.u32 {s}, {gw}")

    k.label("$L_step")
    k.op(f"mad.wide.u32 {base}, {s}, {stepb}, {src}")
    k.op(f"add.u64 {base}, {base}, {laneoff}", "element l of step s")
    k.op(f"mov.b32 {mine}, 0")
    k.op(f"setp.ne.u32 {pn}, {lane}, {lane}", "no NaN yet")
    k.op(f"setp.lt.u32 {pfull}, {s}, {full}")
    k.op(f"@!{pfull} bra $L_tail", "uniform")

    k.comment("Full step: d words in unrolled blocks of 16, 8, 4, 2, 1 (loads first, so a\n"
              "block's loads are in flight together). rel = lane - first word of the block.")
    k.op(f"mov.u64 {addr}, {base}")
    k.op(f"mov.u32 {rel}, {lane}")
    k.op(f"mov.u32 {rem}, {d}")
    for n, u in enumerate(UNROLL):
        k.label(f"$L_b{u}")
        nxt = f"$L_b{UNROLL[n + 1]}" if n + 1 < len(UNROLL) else "$L_words"
        if u == 16:
            k.op(f"setp.lt.u32 {p}, {rem}, 16")
        else:
            t = k.u32("t")
            k.op(f"and.b32 {t}, {rem}, {u}")
            k.op(f"setp.eq.u32 {p}, {t}, 0")
        k.op(f"@{p} bra {nxt}")
        xs = [load_elem(k, ty, j, addr, j * WARP * sz) for j in range(u)]
        for j in range(u):
            v = widen(k, ty, xs[j], j)
            tests(k, ty, v, gt, pn, hz)
            k.op(f"vote.sync.ballot.b32 {ballot}, {gt}, {FULL}", f"word +{j}")
            k.op(f"setp.eq.u32 {pl}, {rel}, {j}")
            k.op(f"selp.b32 {mine}, {ballot}, {mine}, {pl}")
        if u > 1:
            k.op(f"add.u64 {addr}, {addr}, {u * WARP * sz}")
            k.op(f"sub.u32 {rel}, {rel}, {u}")
        if u == 16:
            k.op(f"sub.u32 {rem}, {rem}, 16")
            k.op(f"bra.uni $L_b16", "d = 32 takes two blocks of 16")
    k.op("bra.uni $L_words")

    k.label("$L_tail")
    k.comment("Tail step (once per kernel): word by word, elements past ltail read as 0 (their\n"
              "bits belong to ids that are not stored).")
    w, kl, pv = k.u32("w"), k.u32("kl"), k.pred("valid")
    k.op(f"mov.u64 {addr}, {base}")
    k.op(f"mov.u32 {w}, 0")
    k.op(f"mov.u32 {kl}, {lane}")
    k.label("$L_tloop")
    k.op(f"setp.lt.u32 {pv}, {kl}, {ltail}")
    x = load_elem(k, ty, 0, addr, 0, guard=pv)
    v = widen(k, ty, x, 0)
    tests(k, ty, v, gt, pn, hz)
    k.op(f"vote.sync.ballot.b32 {ballot}, {gt}, {FULL}")
    k.op(f"setp.eq.u32 {pl}, {w}, {lane}")
    k.op(f"selp.b32 {mine}, {ballot}, {mine}, {pl}")
    k.op(f"add.u32 {kl}, {kl}, 32")
    k.op(f"add.u64 {addr}, {addr}, {WARP * sz}")
    k.op(f"add.u32 {w}, {w}, 1")
    k.op(f"setp.lt.u32 {p}, {w}, {d}")
    k.op(f"@{p} bra $L_tloop")

    k.label("$L_words")
    pany = k.pred("any")
    k.op(f"vote.sync.any.pred {pany}, {pn}, {FULL}")
    k.op(f"@{pany} bra $L_nan", "rare: find the step's first NaN, then carry on")

    k.label("$L_ids")
    k.comment("Lane l's id: bits [l*d, l*d + d) of the step = words a, a+1 shifted by sh.")
    lo, hi, f, rv, idv, idx = (k.b32(x) for x in ("lo", "hi", "f", "rv", "id", "idx"))
    k.op(f"shfl.sync.idx.b32 {lo}, {mine}, {a}, 31, {FULL}")
    k.op(f"shfl.sync.idx.b32 {hi}, {mine}, {a1}, 31, {FULL}")
    k.op(f"shf.r.clamp.b32 {f}, {lo}, {hi}, {sh}", "(hi:lo) >> sh")
    k.op(f"and.b32 {f}, {f}, {mask}", "LsbFirst: channel k is bit k")
    k.op(f"brev.b32 {rv}, {f}")
    k.op(f"shr.b32 {rv}, {rv}, {rs}", "MsbFirst: channel k is bit d-1-k")
    k.op(f"selp.b32 {idv}, {rv}, {f}, {pmsb}")
    pst, oaddr = k.pred("store"), k.u64("oaddr")
    k.op(f"setp.lt.or.u32 {pst}, {lane}, {tail}, {pfull}", "id exists")
    k.op(f"mad.lo.u32 {idx}, {s}, 32, {lane}", "< 2^32: M < 2^32 (host-checked)")
    k.op(f"mad.wide.u32 {oaddr}, {idx}, 4, {dst}")
    k.op(f"@{pst} st.global.u32 [{oaddr}], {idv}", "a warp stores 128 contiguous bytes")
    k.op(f"add.u32 {s}, {s}, {nw}")
    k.op(f"setp.lt.u32 {p}, {s}, {S}")
    k.op(f"@{p} bra $L_step")
    k.op("bra.uni $L_done")

    k.label("$L_nan")
    k.comment("A NaN in this step: rescan it word by word; the first word with a NaN gives the\n"
              "step's first NaN, recorded as red.max of ~(flat element index) in the status word\n"
              "(the lowest index over all steps wins). Then the ids are finished as usual.")
    lim, bn, t2, c, jj = k.u32("lim"), k.b32("bn"), k.b32("t2"), k.u32("c"), k.u32("j")
    pz, pf, l0 = k.pred("z"), k.pred("found"), k.pred("l0")
    k.op(f"selp.u32 {lim}, {d32}, {ltail}, {pfull}")
    k.op(f"mov.u64 {addr}, {base}")
    k.op(f"mov.u32 {w}, 0")
    k.op(f"mov.u32 {kl}, {lane}")
    k.label("$L_nloop")
    k.op(f"setp.lt.u32 {pv}, {kl}, {lim}")
    x = load_elem(k, ty, 0, addr, 0, guard=pv)
    v = widen(k, ty, x, 0)
    is_nan(k, ty, v, pz)
    k.op(f"vote.sync.ballot.b32 {bn}, {pz}, {FULL}")
    k.op(f"setp.ne.u32 {pf}, {bn}, 0")
    k.op(f"@{pf} bra $L_nfound")
    k.op(f"add.u32 {kl}, {kl}, 32")
    k.op(f"add.u64 {addr}, {addr}, {WARP * sz}")
    k.op(f"add.u32 {w}, {w}, 1")
    k.op(f"setp.lt.u32 {p}, {w}, {d}")
    k.op(f"@{p} bra $L_nloop")
    k.op("bra.uni $L_ids", "unreachable: the step had a NaN")
    k.label("$L_nfound")
    e64, j64 = k.u64("e"), k.u64("j")
    k.op(f"brev.b32 {t2}, {bn}")
    k.op(f"clz.b32 {c}, {t2}", "lowest NaN lane")
    k.op(f"mad.lo.u32 {jj}, {w}, 32, {c}")
    k.op(f"mul.wide.u32 {e64}, {s}, {d32}")
    k.op(f"cvt.u64.u32 {j64}, {jj}")
    k.op(f"add.u64 {e64}, {e64}, {j64}", "flat index of the NaN")
    k.op(f"not.b64 {e64}, {e64}")
    k.op(f"setp.eq.u32 {l0}, {lane}, 0")
    k.op(f"@{l0} red.global.max.u64 [{status}], {e64}")
    k.op("bra.uni $L_ids")
    k.label("$L_done")
    k.op("ret")
    doc = [
        f"{name}: z {ty} [M*d] -> ids u32 [M]; warp-cooperative, {WARP} ids per warp step.",
        "A NaN sets status = max(status, ~(index of the first NaN)).",
    ]
    return k.render(doc, LFQ_SIZE, BLOCK)


# --------------------------------------------------------------------------------------------
# LFQ decode.
# --------------------------------------------------------------------------------------------
def lfq_decode(name, ty):
    sz = DTYPES[ty]
    k = ptxgen.Entry(name, LFQ_OFF)
    k.comment(
        "Warp step s: lane l loads id 32s+l (coalesced) and turns it into its d-bit field\n"
        "(channel k = bit k). Codes [32ds, 32ds+32d) are then written 32 at a time: lane l\n"
        "writes element p = 32w+l, whose bit is bit p%d of the field of id p/d (one shuffle).")
    lane, gw, nw = warp_header(k)
    full, tail, S = lfq_steps(k, gw)
    d, mask, msb = k.param("u32", "d"), k.param("u32", "mask"), k.param("u32", "msb")
    magic = k.param("u32", "magic")
    cpos, cneg = k.param("u32", "code_pos"), k.param("u32", "code_neg")
    src, dst, status = k.param("u64", "src"), k.param("u64", "dst"), k.param("u64", "status")
    pmsb = k.pred("msb")
    k.op(f"setp.ne.u32 {pmsb}, {msb}, 0")
    nd, notmask, rs, d32, ltail, stepb = (k.u32(x) for x in ("nd", "notmask", "rs", "d32", "ltail", "stepb"))
    k.op(f"sub.u32 {nd}, 0, {d}")
    k.op(f"not.b32 {notmask}, {mask}")
    k.op(f"sub.u32 {rs}, 32, {d}")
    k.op(f"shl.b32 {d32}, {d}, 5", "elements per step")
    k.op(f"mul.lo.u32 {ltail}, {tail}, {d}", "elements of the tail step")
    k.op(f"mul.lo.u32 {stepb}, {d}, {WARP * sz}", "bytes of codes per step")
    laneoff = k.u64("laneoff")
    k.op(f"mul.wide.u32 {laneoff}, {lane}, {sz}")
    s, idx, idv = k.u32("s"), k.u32("idx"), k.b32("id")
    pfull, pv, pbad, pany, p = k.pred("full"), k.pred("valid"), k.pred("bad"), k.pred("any"), k.pred("p")
    iaddr, oaddr = k.u64("iaddr"), k.u64("oaddr")
    t = k.b32("t")
    k.op(f"mov.u32 {s}, {gw}")

    k.label("$L_step")
    k.op(f"setp.lt.u32 {pfull}, {s}, {full}")
    k.op(f"setp.lt.or.u32 {pv}, {lane}, {tail}, {pfull}", "id exists")
    k.op(f"mad.lo.u32 {idx}, {s}, 32, {lane}", "< 2^32: M < 2^32 (host-checked)")
    k.op(f"mad.wide.u32 {iaddr}, {idx}, 4, {src}")
    k.op(f"mov.b32 {idv}, 0")
    k.op(f"@{pv} ld.global.nc.u32 {idv}, [{iaddr}]")
    k.op(f"and.b32 {t}, {idv}, {notmask}")
    k.op(f"setp.ne.u32 {pbad}, {t}, 0", "bits at or above d")
    k.op(f"vote.sync.any.pred {pany}, {pbad}, {FULL}")
    k.op(f"@{pany} bra $L_bad", "rare")

    k.label("$L_dec")
    f, rv, field = k.b32("f"), k.b32("rv"), k.b32("field")
    k.op(f"and.b32 {f}, {idv}, {mask}")
    k.op(f"brev.b32 {rv}, {f}")
    k.op(f"shr.b32 {rv}, {rv}, {rs}")
    k.op(f"selp.b32 {field}, {rv}, {f}, {pmsb}", "channel k of the id is bit k")
    lim, pp, w = k.u32("lim"), k.u32("pp"), k.u32("w")
    k.op(f"selp.u32 {lim}, {d32}, {ltail}, {pfull}", "elements to write in this step")
    k.op(f"mad.wide.u32 {oaddr}, {s}, {stepb}, {dst}")
    k.op(f"add.u64 {oaddr}, {oaddr}, {laneoff}")
    k.op(f"mov.u32 {pp}, {lane}")
    k.op(f"mov.u32 {w}, 0")
    pst = k.pred("store")
    k.op(f"@!{pfull} bra $L_etail", "uniform: the tail step stores under a guard")
    st = "st.global.b32" if sz == 4 else "st.global.b16"

    def element(j, guard=None):
        """Element p = pp + 32j of the step (lane l writes p = 32w + l)."""
        pj, qj, rj, gj, bj, cj = (k.u32(f"{x}{j}") for x in ("p", "q", "r", "g", "bit", "code"))
        pbj = k.pred(f"one{j}")
        if j:
            k.op(f"add.u32 {pj}, {pp}, {32 * j}")
        else:
            k.op(f"mov.u32 {pj}, {pp}")
        k.op(f"mul.lo.u32 {qj}, {pj}, {magic}")
        k.op(f"shr.u32 {qj}, {qj}, 16", "q = p / d (p < 1024)")
        k.op(f"mad.lo.u32 {rj}, {qj}, {nd}, {pj}", "r = p % d")
        k.op(f"shfl.sync.idx.b32 {gj}, {field}, {qj}, 31, {FULL}", "the field of id q")
        k.op(f"shr.b32 {bj}, {gj}, {rj}", "bit r (bfe with a variable position is 5 SASS ops)")
        k.op(f"and.b32 {bj}, {bj}, 1")
        k.op(f"setp.ne.u32 {pbj}, {bj}, 0")
        k.op(f"selp.b32 {cj}, {cpos}, {cneg}, {pbj}")
        if guard:
            k.op(f"setp.lt.u32 {guard}, {pj}, {lim}")
            k.op(f"@{guard} {st} [{oaddr}+{WARP * sz * j}], {cj}")
        else:
            k.op(f"{st} [{oaddr}+{WARP * sz * j}], {cj}", f"a warp stores {WARP * sz} contiguous bytes")

    U = 4
    k.comment(f"Full step: unrolled by {U} elements per lane (the loop is over d, a run-time value).")
    w4 = k.u32("w4")
    k.op(f"add.u32 {w4}, {w}, {U}")
    k.op(f"setp.gt.u32 {p}, {w4}, {d}")
    k.op(f"@{p} bra $L_erest")
    k.label("$L_efull")
    for j in range(U):
        element(j)
    k.op(f"add.u32 {pp}, {pp}, {32 * U}")
    k.op(f"add.u64 {oaddr}, {oaddr}, {U * WARP * sz}")
    k.op(f"add.u32 {w}, {w}, {U}")
    k.op(f"add.u32 {w4}, {w}, {U}")
    k.op(f"setp.le.u32 {p}, {w4}, {d}")
    k.op(f"@{p} bra $L_efull")
    k.label("$L_erest")
    k.op(f"setp.ge.u32 {p}, {w}, {d}")
    k.op(f"@{p} bra $L_next")
    element(0)
    k.op(f"add.u32 {pp}, {pp}, 32")
    k.op(f"add.u64 {oaddr}, {oaddr}, {WARP * sz}")
    k.op(f"add.u32 {w}, {w}, 1")
    k.op("bra.uni $L_erest")

    k.label("$L_etail")
    k.comment("Tail step: element by element, stores guarded by the element count.")
    element(0, guard=pst)
    k.op(f"add.u32 {pp}, {pp}, 32")
    k.op(f"add.u64 {oaddr}, {oaddr}, {WARP * sz}")
    k.op(f"add.u32 {w}, {w}, 1")
    k.op(f"setp.lt.u32 {p}, {w}, {d}")
    k.op(f"@{p} bra $L_etail")
    k.label("$L_next")
    k.op(f"add.u32 {s}, {s}, {nw}")
    k.op(f"setp.lt.u32 {p}, {s}, {S}")
    k.op(f"@{p} bra $L_step")
    k.op("bra.uni $L_done")

    k.label("$L_bad")
    k.comment("An id with bits at or above d: the step's first one is recorded as red.max of\n"
              "(~index << 32 | id) (indices < 2^32: the lowest index wins and brings its id).")
    bb, t2, c, v, hi = k.b32("bb"), k.b32("t2"), k.u32("c"), k.b32("v"), k.b32("hi")
    key, l0 = k.u64("key"), k.pred("l0")
    k.op(f"vote.sync.ballot.b32 {bb}, {pbad}, {FULL}")
    k.op(f"brev.b32 {t2}, {bb}")
    k.op(f"clz.b32 {c}, {t2}", "lowest bad lane")
    k.op(f"shfl.sync.idx.b32 {v}, {idv}, {c}, 31, {FULL}", "its id")
    k.op(f"mad.lo.u32 {hi}, {s}, 32, {c}")
    k.op(f"not.b32 {hi}, {hi}")
    k.op(f"mov.b64 {key}, {{{v}, {hi}}}")
    k.op(f"setp.eq.u32 {l0}, {lane}, 0")
    k.op(f"@{l0} red.global.max.u64 [{status}], {key}")
    k.op("bra.uni $L_dec")
    k.label("$L_done")
    k.op("ret")
    doc = [
        f"{name}: ids u32 [M] -> codes {ty} [M*d] (+-v); {WARP} ids per warp step.",
        "An id >= 2^d sets status = max(status, ~index << 32 | id).",
    ]
    return k.render(doc, LFQ_SIZE, BLOCK)


# --------------------------------------------------------------------------------------------
# FSQ encode / decode: one thread per token (D elements, D <= 32), dimension loop inside.
# --------------------------------------------------------------------------------------------
def thread_header(k):
    tid, ctaid, ntid, nctaid = k.u32("tid"), k.u32("ctaid"), k.u32("ntid"), k.u32("nctaid")
    i, nt = k.u32("i"), k.u32("nt")
    k.op(f"mov.u32 {tid}, %tid.x")
    k.op(f"mov.u32 {ctaid}, %ctaid.x")
    k.op(f"mov.u32 {ntid}, %ntid.x")
    k.op(f"mov.u32 {nctaid}, %nctaid.x")
    k.op(f"mad.lo.u32 {i}, {ctaid}, {ntid}, {tid}")
    k.op(f"mul.lo.u32 {nt}, {nctaid}, {ntid}", "threads in the grid (< 2^31)")
    n = k.param("u32", "n")
    p = k.pred("p")
    k.op(f"setp.ge.u32 {p}, {i}, {n}")
    k.op(f"@{p} bra $L_done")
    return i, nt, n


def fsq_encode(name, ty):
    sz = DTYPES[ty]
    k = ptxgen.Entry(name, FSQ_OFF)
    k.comment(
        "Thread i takes tokens i, i + threads, ...; per dimension, FsqDim::level's f32\n"
        "operations in order: t = z + shift, clamp, tanh (Eigen's rational, fma), v = fma(y,\n"
        "half_l, -offset), round half to even, + half_width, clamp to [0, L-1]; id += level*basis.")
    t, nt, n = thread_header(k)
    dim = k.param("u32", "dim")
    src, dst, status, table = (k.param("u64", x) for x in ("src", "dst", "status", "table"))
    rowb = k.u32("rowb")
    k.op(f"mul.lo.u32 {rowb}, {dim}, {sz}", "bytes per token")
    addr, cp, oaddr = k.u64("addr"), k.u64("cp"), k.u64("oaddr")
    acc, i, i2 = k.u32("acc"), k.u32("dimi"), k.u32("dimi2")
    pn, p, pz = k.pred("nan"), k.pred("p"), k.pred("z")
    T = TANH

    def level(j, off):
        """acc += level * basis of dimension i + j (element [addr + j*sz], constants at
        [cp + j*TABLE_BYTES]): FsqDim::level, operation for operation."""
        shift, half_l, noff, hw = (k.f32(f"{x}{j}") for x in ("shift", "half_l", "noff", "hw"))
        maxl, basis, lvl = k.f32(f"maxl{j}"), k.b32(f"basis{j}"), k.u32(f"level{j}")
        x0, tt, c, s2, pp, qq, y, v, rr, lv = (
            k.f32(f"{x}{j}") for x in ("x", "t", "c", "s", "p", "q", "y", "v", "r", "lv"))
        if ty == "f32":
            k.op(f"ld.global.nc.f32 {x0}, [{addr}+{off * sz}]")
        elif ty == "f16":
            h = k.b16(f"x{j}")
            k.op(f"ld.global.nc.b16 {h}, [{addr}+{off * sz}]")
            k.op(f"cvt.f32.f16 {x0}, {h}", "exact")
        else:
            r = k.u32(f"x{j}")
            k.op(f"ld.global.nc.u16 {r}, [{addr}+{off * sz}]")
            k.op(f"shl.b32 {r}, {r}, 16", "bf16 is the top half of an f32")
            k.op(f"mov.b32 {x0}, {r}")
        co = off * TABLE_BYTES
        k.op(f"ld.global.nc.v4.f32 {{{shift}, {half_l}, {noff}, {hw}}}, [{cp}+{co}]", "uniform: L1 hits")
        k.op(f"ld.global.nc.v2.b32 {{{maxl}, {basis}}}, [{cp}+{co + 16}]")
        k.op(f"setp.nan.or.f32 {pn}, {x0}, {x0}, {pn}")
        k.op(f"add.rn.f32 {tt}, {x0}, {shift}")
        k.op(f"max.f32 {c}, {tt}, {imm(TANH['CLAMP'] | 0x80000000)}", "clamp to +-CLAMP (t is not NaN")
        k.op(f"min.f32 {c}, {c}, {imm(TANH['CLAMP'])}", "when it matters)")
        k.op(f"mul.rn.f32 {s2}, {c}, {c}")
        k.op(f"fma.rn.f32 {pp}, {s2}, {imm(T['A13'])}, {imm(T['A11'])}")
        for a in ("A9", "A7", "A5", "A3", "A1"):
            k.op(f"fma.rn.f32 {pp}, {s2}, {pp}, {imm(T[a])}", a)
        k.op(f"mul.rn.f32 {pp}, {pp}, {c}")
        k.op(f"fma.rn.f32 {qq}, {s2}, {imm(T['B6'])}, {imm(T['B4'])}")
        k.op(f"fma.rn.f32 {qq}, {s2}, {qq}, {imm(T['B2'])}")
        k.op(f"fma.rn.f32 {qq}, {s2}, {qq}, {imm(T['B0'])}")
        k.op(f"div.rn.f32 {y}, {pp}, {qq}", "IEEE division")
        k.op(f"fma.rn.f32 {v}, {y}, {half_l}, {noff}")
        k.op(f"cvt.rni.f32.f32 {rr}, {v}", "round half to even")
        k.op(f"add.rn.f32 {lv}, {rr}, {hw}")
        k.op(f"max.f32 {lv}, {lv}, 0f00000000")
        k.op(f"min.f32 {lv}, {lv}, {maxl}")
        k.op(f"cvt.rzi.u32.f32 {lvl}, {lv}", "exact: an integer in [0, L)")
        k.op(f"mad.lo.u32 {acc}, {lvl}, {basis}, {acc}", "< prod L <= 2^32: no wrap")

    k.label("$L_token")
    k.op(f"mad.wide.u32 {addr}, {t}, {rowb}, {src}")
    k.op(f"mov.u64 {cp}, {table}")
    k.op(f"mov.u32 {acc}, 0")
    k.op(f"mov.u32 {i}, 0")
    k.op(f"setp.ne.u32 {pn}, {i}, {i}", "no NaN yet")
    k.comment("Two dimensions per iteration (independent work in flight, half the loop overhead),\n"
              "then the odd one.")
    k.label("$L_dim2")
    k.op(f"add.u32 {i2}, {i}, 2")
    k.op(f"setp.gt.u32 {p}, {i2}, {dim}")
    k.op(f"@{p} bra $L_dim1")
    level(0, 0)
    level(1, 1)
    k.op(f"add.u64 {addr}, {addr}, {2 * sz}")
    k.op(f"add.u64 {cp}, {cp}, {2 * TABLE_BYTES}")
    k.op(f"mov.u32 {i}, {i2}")
    k.op("bra.uni $L_dim2")
    k.label("$L_dim1")
    k.op(f"setp.ge.u32 {p}, {i}, {dim}")
    k.op(f"@{p} bra $L_store")
    level(0, 0)
    k.label("$L_store")
    k.op(f"mad.wide.u32 {oaddr}, {t}, 4, {dst}")
    k.op(f"st.global.u32 [{oaddr}], {acc}")
    k.op(f"@{pn} bra $L_nan", "rare")
    k.label("$L_next")
    k.op(f"add.u32 {t}, {t}, {nt}", "< 2^31 + 2^31: no wrap")
    k.op(f"setp.lt.u32 {p}, {t}, {n}")
    k.op(f"@{p} bra $L_token")
    k.op("bra.uni $L_done")

    k.label("$L_nan")
    k.comment("This token holds a NaN: its first one, status = max(status, ~(flat index)).")
    e64, j64 = k.u64("e"), k.u64("j")
    k.op(f"mad.wide.u32 {addr}, {t}, {rowb}, {src}")
    k.op(f"mov.u32 {i}, 0")
    k.label("$L_nloop")
    x0 = k.f32("x0")
    if ty == "f32":
        k.op(f"ld.global.nc.f32 {x0}, [{addr}]")
    elif ty == "f16":
        h = k.b16("x0")
        k.op(f"ld.global.nc.b16 {h}, [{addr}]")
        k.op(f"cvt.f32.f16 {x0}, {h}")
    else:
        r = k.u32("x0")
        k.op(f"ld.global.nc.u16 {r}, [{addr}]")
        k.op(f"shl.b32 {r}, {r}, 16")
        k.op(f"mov.b32 {x0}, {r}")
    k.op(f"setp.nan.f32 {pz}, {x0}, {x0}")
    k.op(f"@{pz} bra $L_nfound")
    k.op(f"add.u64 {addr}, {addr}, {sz}")
    k.op(f"add.u32 {i}, {i}, 1")
    k.op(f"bra.uni $L_nloop", "ends: the token has a NaN")
    k.label("$L_nfound")
    k.op(f"mul.wide.u32 {e64}, {t}, {dim}")
    k.op(f"cvt.u64.u32 {j64}, {i}")
    k.op(f"add.u64 {e64}, {e64}, {j64}")
    k.op(f"not.b64 {e64}, {e64}")
    k.op(f"red.global.max.u64 [{status}], {e64}")
    k.op("bra.uni $L_next")
    k.label("$L_done")
    k.op("ret")
    doc = [
        f"{name}: z {ty} [N*D] -> ids u32 [N]; one thread per token.",
        "A NaN sets status = max(status, ~(index of the token's first NaN)).",
    ]
    return k.render(doc, FSQ_SIZE, BLOCK)


def fsq_decode(name, ty):
    sz = DTYPES[ty]
    k = ptxgen.Entry(name, FSQ_OFF)
    k.comment(
        "Thread i takes tokens i, i + threads, ...: digit by digit, level = rem % L and\n"
        "rem = rem / L (Granlund-Montgomery: exact for every u32), code = (level - hw) / hw in\n"
        "f32 (div.rn), rounded to the output dtype.")
    t, nt, n = thread_header(k)
    dim, max_id = k.param("u32", "dim"), k.param("u32", "max_id")
    src, dst, status, table = (k.param("u64", x) for x in ("src", "dst", "status", "table"))
    rowb = k.u32("rowb")
    k.op(f"mul.lo.u32 {rowb}, {dim}, {sz}", "bytes per token")
    iaddr, oaddr, cp = k.u64("iaddr"), k.u64("oaddr"), k.u64("cp")
    idv, rem, i = k.u32("id"), k.u32("rem"), k.u32("dimi")
    L, m, sh2 = (k.b32(x) for x in ("L", "m", "sh2"))
    t1, t2, q, lvl = (k.u32(x) for x in ("t1", "t2", "q", "level"))
    hw, fl, cf = k.f32("hw"), k.f32("fl"), k.f32("code")
    p, pbad = k.pred("p"), k.pred("bad")
    k.label("$L_token")
    k.op(f"mad.wide.u32 {iaddr}, {t}, 4, {src}")
    k.op(f"ld.global.nc.u32 {idv}, [{iaddr}]")
    k.op(f"setp.gt.u32 {pbad}, {idv}, {max_id}")
    k.op(f"@{pbad} bra $L_bad", "rare")
    k.label("$L_dec")
    k.op(f"mad.wide.u32 {oaddr}, {t}, {rowb}, {dst}")
    k.op(f"mov.u64 {cp}, {table}")
    k.op(f"mov.u32 {rem}, {idv}")
    k.op(f"mov.u32 {i}, 0")
    k.label("$L_dim")
    k.op(f"ld.global.nc.v4.b32 {{{L}, {m}, {sh2}, {hw}}}, [{cp}+32]", "uniform: L1 hits")
    k.op(f"mul.hi.u32 {t1}, {m}, {rem}")
    k.op(f"sub.u32 {t2}, {rem}, {t1}")
    k.op(f"shr.u32 {t2}, {t2}, 1")
    k.op(f"add.u32 {t2}, {t1}, {t2}")
    k.op(f"shr.u32 {q}, {t2}, {sh2}", "q = rem / L")
    k.op(f"mul.lo.u32 {t1}, {q}, {L}")
    k.op(f"sub.u32 {lvl}, {rem}, {t1}", "level = rem % L")
    k.op(f"mov.u32 {rem}, {q}")
    k.op(f"cvt.rn.f32.u32 {fl}, {lvl}", "exact (L <= 2^24)")
    k.op(f"sub.rn.f32 {fl}, {fl}, {hw}", "exact")
    k.op(f"div.rn.f32 {cf}, {fl}, {hw}")
    if ty == "f32":
        k.op(f"st.global.f32 [{oaddr}], {cf}")
    else:
        h = k.b16("code")
        k.op(f"cvt.rn.{ty}.f32 {h}, {cf}", "nearest, ties to even")
        k.op(f"st.global.b16 [{oaddr}], {h}")
    k.op(f"add.u64 {oaddr}, {oaddr}, {sz}")
    k.op(f"add.u64 {cp}, {cp}, {TABLE_BYTES}")
    k.op(f"add.u32 {i}, {i}, 1")
    k.op(f"setp.lt.u32 {p}, {i}, {dim}")
    k.op(f"@{p} bra $L_dim")
    k.op(f"add.u32 {t}, {t}, {nt}", "< 2^31 + 2^31: no wrap")
    k.op(f"setp.lt.u32 {p}, {t}, {n}")
    k.op(f"@{p} bra $L_token")
    k.op("bra.uni $L_done")
    k.label("$L_bad")
    k.comment("Id >= codebook size: status = max(status, ~index << 32 | id) (index < 2^31).")
    hi, key = k.b32("hi"), k.u64("key")
    k.op(f"not.b32 {hi}, {t}")
    k.op(f"mov.b64 {key}, {{{idv}, {hi}}}")
    k.op(f"red.global.max.u64 [{status}], {key}")
    k.op("bra.uni $L_dec", "decode it anyway (codes are unspecified on error)")
    k.label("$L_done")
    k.op("ret")
    doc = [
        f"{name}: ids u32 [N] -> codes {ty} [N*D]; one thread per token.",
        "An id > max_id sets status = max(status, ~index << 32 | id).",
    ]
    return k.render(doc, FSQ_SIZE, BLOCK)


# --------------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------------
def abi_lines(module):
    lines = [f"// abi block {BLOCK}"]
    lines += ptxgen.abi_params(module, *((LFQ_OFF, LFQ_SIZE) if module == "lfq" else (FSQ_OFF, FSQ_SIZE)))
    if module == "fsq":
        lines.append(f"// abi table size {TABLE_BYTES}")
        for field, off in FSQ_TABLE:
            lines.append(f"// abi table {field} {off}")
        for name, bits in TANH.items():
            lines.append(f"// abi tanh {name} {bits}")
    return lines


def generate(module):
    what = {
        "lfq": ["// lfq_encode_{f32,f16,bf16}: z [M*d] -> ids u32 [M] (M = N*G, bit = z > 0)",
                "// lfq_decode_{f32,f16,bf16}: ids u32 [M] -> codes [M*d] (+-v)"],
        "fsq": ["// fsq_encode_{f32,f16,bf16}: z [N*D] -> ids u32 [N] (vistok::fsq::FsqDim::level)",
                "// fsq_decode_{f32,f16,bf16}: ids u32 [N] -> codes [N*D]"],
    }[module]
    head = ["// and commit the result. Design and ABI: kernels/README.md.", "//"] + what + ["//"] + abi_lines(module)
    gen = {("lfq", "encode"): lfq_encode, ("lfq", "decode"): lfq_decode,
           ("fsq", "encode"): fsq_encode, ("fsq", "decode"): fsq_decode}
    parts = [ptxgen.module_header("gen_quant.py", head)]
    for name, direction, ty in entries(module):
        parts.append(gen[(module, direction)](name, ty))
    return "\n".join(parts)


MODULES = ["lfq", "fsq"]


def main():
    args = ptxgen.parser(__doc__, check_help="fail if a committed PTX file is stale",
                         stdout_help="print one module's PTX instead of writing", stdout_choices=MODULES).parse_args()
    if args.list:
        for module in MODULES:
            size = LFQ_SIZE if module == "lfq" else FSQ_SIZE
            for name, _, _ in entries(module):
                print(module, name, size)
        return 0
    return ptxgen.emit("gen_quant.py", {m: (lambda m=m: generate(m)) for m in MODULES}, args)


if __name__ == "__main__":
    sys.exit(main())
