#!/usr/bin/env python3
"""Generates kernels/patchify.ptx: the patchify / unpatchify PTX entries, one per dtype pair.

Python 3 standard library only. Usage:

    python3 kernels/gen_patchify.py            # (re)write kernels/patchify.ptx
    python3 kernels/gen_patchify.py --check    # exit 1 if kernels/patchify.ptx is stale
    python3 kernels/gen_patchify.py --list     # print "<entry> <param bytes>" per entry
    python3 kernels/gen_patchify.py --stdout   # print the PTX

Candle-style: one template per direction, stamped once per (input dtype, output dtype). The
kernel design (thread mapping, fast division, vector widths) is described in kernels/README.md;
the parameter struct layouts below are the ABI shared with src/cuda/patchify.rs (the Rust side
asserts the same offsets, and tests/ptx_abi.rs compares them with the `// abi` lines written
into the PTX header).
"""

import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ptxgen  # noqa: E402

BLOCK = 256  # threads per block; .maxntid of every entry, BLOCK in src/cuda/patchify.rs
# .minnctapersm for entries that fit in 32 registers without spilling (full occupancy: 8 blocks
# of 256 threads per SM); scripts/ptx-check.sh fails on any spill, so a wrong entry here shows.
MIN_CTAS_PER_SM = 2048 // BLOCK

# name -> size in bytes
DTYPES = {"u8": 1, "f32": 4, "f16": 2, "bf16": 2}
IMAGE_DTYPES = ["u8", "f32", "f16", "bf16"]
TOKEN_DTYPES = ["f32", "f16", "bf16"]

# flags (bit values), shared by both directions
FLAG_VLOAD = 1  # vector path: the lanes' sources are contiguous and aligned: one vector load
FLAG_ROLE = 2  # patchify: order is Pqc; unpatchify: layout is channels-last
FLAG_ROWS = 4  # patchify: row-run thread mapping (see header_patchify_rows)


# --------------------------------------------------------------------------------------------
# ABI: the parameter structs (#[repr(C)] on the Rust side, `.param .align 8 .b8 p[N]` here).
# A FastDiv is {d, m, s, pad}: q = (n * m) >> s for n < 2^31 (see fastdiv below).
# --------------------------------------------------------------------------------------------
COMMON = [
    ("src", "u64", 1),  # input base address (image / tokens)
    ("dst", "u64", 1),  # output base address (tokens / image)
    ("coef", "u64", 1),  # (a, b) f32 pairs, one per channel
    ("src_batch", "u64", 1),  # input elements per sample
    ("dst_batch", "u64", 1),  # output elements per sample
    ("batch", "u32", 1),  # B
    ("n_vec", "u32", 1),  # threads per sample = output elements per sample / lanes
    ("lanes", "u32", 1),  # output elements per thread: V (vector path) or 1 (scalar path)
    ("flags", "u32", 1),  # FLAG_VLOAD | FLAG_ROLE | FLAG_ROWS
]
PATCHIFY_FIELDS = COMMON + [
    # flat mapping: P, gw, gh, n0, n1, n2 (token-element digits, innermost first);
    # row-run mapping (FLAG_ROWS): nq, gw, gh, nr, ph, pt (Cpq) or C (Pqc)
    ("div", "fastdiv", 6),
    ("patch", "u32", 3),  # pt, ph, pw
    ("extent", "u32", 3),  # T, H, W
    ("stride", "u32", 4),  # image element strides of c, t, h, w
]
UNPATCHIFY_FIELDS = COMMON + [
    ("div", "fastdiv", 6),  # n0, n1, n2 (image digits, innermost first), pt, ph, pw
    ("grid", "u32", 3),  # gh, gw, P
    ("tstride", "u32", 4),  # token element strides of c, dt, dh, dw
    ("pad", "u32", 1),
]
SIZES = {"u64": 8, "u32": 4, "fastdiv": 16}
ALIGNS = {"u64": 8, "u32": 4, "fastdiv": 4}


PATCHIFY_OFF, PATCHIFY_SIZE = ptxgen.layout(PATCHIFY_FIELDS, SIZES, ALIGNS)
UNPATCHIFY_OFF, UNPATCHIFY_SIZE = ptxgen.layout(UNPATCHIFY_FIELDS, SIZES, ALIGNS)


def entries():
    """(name, direction, in dtype, out dtype, param bytes) for every entry, in file order."""
    out = []
    for i in IMAGE_DTYPES:
        for o in TOKEN_DTYPES:
            out.append((f"patchify_{i}_{o}", "patchify", i, o, PATCHIFY_SIZE))
    for i in TOKEN_DTYPES:
        for o in IMAGE_DTYPES:
            out.append((f"unpatchify_{i}_{o}", "unpatchify", i, o, UNPATCHIFY_SIZE))
    return out


def lanes_for(i, o):
    """Elements per thread in the vector path: no access wider than 16 bytes."""
    return 16 // max(DTYPES[i], DTYPES[o])


class Entry(ptxgen.Entry):
    """ptxgen.Entry with array fields and FastDiv slots in its parameter block."""

    def __init__(self, name, offsets):
        super().__init__(name, offsets, width=60)

    def param(self, ty, field, index=0, name=None, elem=None):
        """Loads param field[index] (elem: byte offset inside a FastDiv) into a register."""
        off = self.off[field]
        if elem is not None:
            off += 16 * index + elem
        else:
            off += (8 if ty == "u64" else 4) * index
        reg = self.reg(ty, name or f"{field}{index}")
        self.op(f"ld.param.{ty} {reg}, [p+{off}]")
        return reg

    def fastdiv(self, n, slot, q, r):
        """q = n / d, r = n % d with d = div[slot], for n < 2^31 (host-checked).

        The host stores m = ceil(2^s / d) with s = 31 + ceil(log2 d); then
        floor(n * m / 2^s) = floor(n / d) for all 0 <= n < 2^31 (Granlund-Montgomery), and m
        fits in 32 bits. d = 1 gives m = 2^31, s = 31: q = n."""
        assert n not in (q, r) and q != r
        d = self.param("u32", "div", slot, name="dd", elem=0)
        m = self.param("u32", "div", slot, name="dm", elem=4)
        s = self.param("u32", "div", slot, name="ds", elem=8)
        wide = self.u64("wide")
        self.op(f"mul.wide.u32 {wide}, {n}, {m}")
        self.op(f"shr.u64 {wide}, {wide}, {s}")
        self.op(f"cvt.u32.u64 {q}, {wide}")
        t = self.u32("qd")
        self.op(f"mul.lo.u32 {t}, {q}, {d}")
        self.op(f"sub.u32 {r}, {n}, {t}")


# --------------------------------------------------------------------------------------------
# Headers: thread -> (first output element e0, source offset o of lane 0, lane stride ls,
# channel c of lane 0, channel step cs per lane, number of valid lanes nv).
# --------------------------------------------------------------------------------------------
def prologue(k):
    k.comment("Thread -> first output element e0 = i * lanes of its run, inside one sample.")
    tid, ctaid, ntid, i = k.u32("tid"), k.u32("ctaid"), k.u32("ntid"), k.u32("i")
    k.op(f"mov.u32 {tid}, %tid.x")
    k.op(f"mov.u32 {ctaid}, %ctaid.x")
    k.op(f"mov.u32 {ntid}, %ntid.x")
    k.op(f"mad.lo.u32 {i}, {ctaid}, {ntid}, {tid}")
    nvec = k.param("u32", "n_vec", name="nvec")
    done = k.pred("done")
    k.op(f"setp.ge.u32 {done}, {i}, {nvec}")
    k.op(f"@{done} bra $L_done", "past the end of the sample")
    lanes = k.param("u32", "lanes", name="lanes")
    e0 = k.u32("e0")
    k.op(f"mul.lo.u32 {e0}, {i}, {lanes}", "< 2^31 (host-checked)")
    flags = k.param("u32", "flags", name="flags")
    role = k.pred("role")
    t = k.u32("t")
    k.op(f"and.b32 {t}, {flags}, {FLAG_ROLE}")
    k.op(f"setp.ne.u32 {role}, {t}, 0")
    return e0, lanes, flags, role


def digits(k, n, first_slot):
    """n -> (d0, d1, d2, d3) with radices div[first_slot .. first_slot+2], d0 innermost."""
    d0, d1, d2, d3 = (k.u32(f"d{j}") for j in range(4))
    q0, q1 = k.u32("q0"), k.u32("q1")
    k.fastdiv(n, first_slot, q0, d0)
    k.fastdiv(q0, first_slot + 1, q1, d1)
    k.fastdiv(q1, first_slot + 2, d3, d2)
    return d0, d1, d2, d3


def header_patchify(k):
    e0, lanes, flags, role = prologue(k)
    rows, t = k.pred("rows"), k.u32("t")
    k.op(f"and.b32 {t}, {flags}, {FLAG_ROWS}")
    k.op(f"setp.ne.u32 {rows}, {t}, 0")
    k.op(f"@{rows} bra $L_rows", "uniform: the host picks the mapping")
    h = header_patchify_flat(k, e0, lanes, role)
    k.op("bra.uni $L_body")
    k.label("$L_rows")
    h2 = header_patchify_rows(k, e0, lanes, role)
    assert h == h2, "both mappings must leave their results in the same registers"
    k.label("$L_body")
    return dict(h, lanes=lanes, flags=flags)


def header_patchify_flat(k, e0, lanes, role):
    """Flat mapping: thread i writes token elements [i*lanes, i*lanes + lanes) of a sample."""
    k.comment("Flat mapping. e0 -> token l and element j0 inside it; l -> grid position.")
    l, j0 = k.u32("l"), k.u32("j0")
    k.fastdiv(e0, 0, l, j0)
    lq, iw, ih, it = k.u32("lq"), k.u32("iw"), k.u32("ih"), k.u32("it")
    k.fastdiv(l, 1, lq, iw)
    k.fastdiv(lq, 2, it, ih)

    k.comment("j0 -> digits: Cpq (dw, dh, dt, c), Pqc (c, dw, dh, dt), innermost first.")
    d0, d1, d2, d3 = digits(k, j0, 3)
    c, dw, dh, dt = k.u32("c"), k.u32("dw"), k.u32("dh"), k.u32("dt")
    k.op(f"selp.u32 {c}, {d0}, {d3}, {role}")
    k.op(f"selp.u32 {dw}, {d1}, {d0}, {role}")
    k.op(f"selp.u32 {dh}, {d2}, {d1}, {role}")
    k.op(f"selp.u32 {dt}, {d3}, {d2}, {role}")

    k.comment("Image coordinates of lane 0; inside the image unless padding.")
    pt = k.param("u32", "patch", 0, name="pt")
    ph = k.param("u32", "patch", 1, name="ph")
    pw = k.param("u32", "patch", 2, name="pw")
    tt, h, w = k.u32("tt"), k.u32("h"), k.u32("w")
    k.op(f"mad.lo.u32 {tt}, {it}, {pt}, {dt}")
    k.op(f"mad.lo.u32 {h}, {ih}, {ph}, {dh}")
    k.op(f"mad.lo.u32 {w}, {iw}, {pw}, {dw}")
    T = k.param("u32", "extent", 0, name="T")
    H = k.param("u32", "extent", 1, name="H")
    W = k.param("u32", "extent", 2, name="W")
    inb = k.pred("inb")
    k.op(f"setp.lt.u32 {inb}, {tt}, {T}")
    k.op(f"setp.lt.and.u32 {inb}, {h}, {H}, {inb}")
    k.op(f"setp.lt.and.u32 {inb}, {w}, {W}, {inb}", "lane 0 is inside the image")

    k.comment("Valid lanes nv: Cpq lanes walk along w (stop at the right edge), Pqc lanes")
    k.body.append("    // share the pixel (all or none). Padded lanes are +0.0.")
    nv = k.u32("nv")
    k.op(f"sub.u32 {nv}, {W}, {w}", "meaningful when w < W")
    k.op(f"min.u32 {nv}, {nv}, {lanes}")
    k.op(f"selp.u32 {nv}, {lanes}, {nv}, {role}")
    k.op(f"selp.u32 {nv}, {nv}, 0, {inb}")

    k.comment("Image offset of lane 0 (garbage when padded: never dereferenced).")
    sc = k.param("u32", "stride", 0, name="sc")
    st = k.param("u32", "stride", 1, name="st")
    sh = k.param("u32", "stride", 2, name="sh")
    sw = k.param("u32", "stride", 3, name="sw")
    o = k.u32("o")
    k.op(f"mul.lo.u32 {o}, {c}, {sc}")
    k.op(f"mad.lo.u32 {o}, {tt}, {st}, {o}")
    k.op(f"mad.lo.u32 {o}, {h}, {sh}, {o}")
    k.op(f"mad.lo.u32 {o}, {w}, {sw}, {o}")
    ls, cs, cw = k.u32("ls"), k.u32("cs"), k.u32("cw")
    k.op(f"selp.u32 {ls}, {sc}, {sw}, {role}", "source elements between lanes")
    k.op(f"selp.u32 {cs}, 1, 0, {role}", "channel step between lanes")
    C = k.param("u32", "div", 3, name="C", elem=0)
    k.op(f"selp.u32 {cw}, {C}, 0xFFFFFFFF, {role}", "Pqc: n0 = C (lanes never wrap here)")
    return dict(e0=e0, o=o, ls=ls, c=c, cs=cs, cw=cw, nv=nv)


def header_patchify_rows(k, e0, lanes, role):
    """Row-run mapping, for images whose token runs are contiguous: a run is the R = nq * lanes
    elements of one token that lie in one image row (Cpq: pw pixels of one channel, NCHW;
    Pqc: pw pixels of all C channels, NHWC). Thread i of a sample is
    i = q + nq * (iw + gw * (r + nr * (ih + gh * it))): nq threads share a run, the next nq
    take the next token along the same row. A warp then reads one contiguous span of a row
    and writes whole runs (full 32-byte sectors on both sides)."""
    k.comment("Row-run mapping. i -> (q, iw, r, ih, it): vector q of run r of token (it, ih, iw).")
    i = k.u32("i")
    q, a, iw, a2 = k.u32("q"), k.u32("ra"), k.u32("iw"), k.u32("ra2")
    k.fastdiv(i, 0, a, q)
    k.fastdiv(a, 1, a2, iw)
    r, lt, ih, it = k.u32("r"), k.u32("lt"), k.u32("ih"), k.u32("it")
    k.fastdiv(a2, 3, lt, r)
    k.fastdiv(lt, 2, it, ih)

    k.comment("Run r -> Cpq (dh, dt, c) with radices (ph, pt); Pqc (dh, dt), c0 = q*lanes mod C.")
    dh, r2 = k.u32("dh"), k.u32("r2")
    k.fastdiv(r, 4, r2, dh)
    qv, n5, q5, m5 = k.u32("qv"), k.u32("n5"), k.u32("q5"), k.u32("m5")
    k.op(f"mul.lo.u32 {qv}, {q}, {lanes}", "element of lane 0 inside the run")
    k.op(f"selp.u32 {n5}, {qv}, {r2}, {role}")
    k.fastdiv(n5, 5, q5, m5)
    c, dt = k.u32("c"), k.u32("dt")
    k.op(f"selp.u32 {dt}, {r2}, {m5}, {role}")
    k.op(f"selp.u32 {c}, {m5}, {q5}, {role}", "channel of lane 0")

    k.comment("Output element of lane 0: e0 = (((it*gh + ih)*gw + iw)*nr + r)*nq + q) * lanes.")
    gw = k.param("u32", "div", 1, name="gw", elem=0)
    nr = k.param("u32", "div", 3, name="nr", elem=0)
    nq = k.param("u32", "div", 0, name="nq", elem=0)
    k.op(f"mad.lo.u32 {e0}, {lt}, {gw}, {iw}", "token l")
    k.op(f"mad.lo.u32 {e0}, {e0}, {nr}, {r}")
    k.op(f"mad.lo.u32 {e0}, {e0}, {nq}, {q}")
    k.op(f"mul.lo.u32 {e0}, {e0}, {lanes}")

    k.comment("Image coordinates of the run's start; its valid elements are a prefix.")
    pt = k.param("u32", "patch", 0, name="pt")
    ph = k.param("u32", "patch", 1, name="ph")
    pw = k.param("u32", "patch", 2, name="pw")
    tt, h, w = k.u32("tt"), k.u32("h"), k.u32("w")
    k.op(f"mad.lo.u32 {tt}, {it}, {pt}, {dt}")
    k.op(f"mad.lo.u32 {h}, {ih}, {ph}, {dh}")
    k.op(f"mul.lo.u32 {w}, {iw}, {pw}")
    T = k.param("u32", "extent", 0, name="T")
    H = k.param("u32", "extent", 1, name="H")
    W = k.param("u32", "extent", 2, name="W")
    inb = k.pred("inb")
    k.op(f"setp.lt.u32 {inb}, {tt}, {T}")
    k.op(f"setp.lt.and.u32 {inb}, {h}, {H}, {inb}")
    k.op(f"setp.lt.and.u32 {inb}, {w}, {W}, {inb}", "the run starts inside the image")

    k.comment("Valid lanes nv = clamp((W - w) * (Pqc ? C : 1) - q*lanes, 0, lanes): the image")
    k.body.append("    // elements of a run are a prefix of it. Padded lanes are +0.0.")
    Cr = k.param("u32", "div", 5, name="C", elem=0)
    nv, t = k.u32("nv"), k.u32("t")
    k.op(f"selp.u32 {t}, {Cr}, 1, {role}", "elements per pixel in the run")
    k.op(f"sub.u32 {nv}, {W}, {w}", "meaningful when w < W")
    k.op(f"mul.lo.u32 {nv}, {nv}, {t}", "<= W*C < 2^31; past the run end is capped below")
    more = k.pred("nvq")
    k.op(f"setp.gt.u32 {more}, {nv}, {qv}")
    k.op(f"sub.u32 {nv}, {nv}, {qv}")
    k.op(f"min.u32 {nv}, {nv}, {lanes}")
    k.op(f"selp.u32 {nv}, {nv}, 0, {more}")
    k.op(f"selp.u32 {nv}, {nv}, 0, {inb}")

    k.comment("Image offset of lane 0 (garbage when padded: never dereferenced); lanes are")
    k.body.append("    // contiguous (Cpq: along w, Pqc: along (w, c)).")
    sc = k.param("u32", "stride", 0, name="sc")
    st = k.param("u32", "stride", 1, name="st")
    sh = k.param("u32", "stride", 2, name="sh")
    sw = k.param("u32", "stride", 3, name="sw")
    o = k.u32("o")
    k.op(f"mul.lo.u32 {o}, {c}, {sc}")
    k.op(f"selp.u32 {o}, 0, {o}, {role}", "Pqc: the channel is part of the run")
    k.op(f"mad.lo.u32 {o}, {tt}, {st}, {o}")
    k.op(f"mad.lo.u32 {o}, {h}, {sh}, {o}")
    k.op(f"mad.lo.u32 {o}, {w}, {sw}, {o}")
    k.op(f"add.u32 {o}, {o}, {qv}")
    ls, cs, cw = k.u32("ls"), k.u32("cs"), k.u32("cw")
    k.op(f"mov.u32 {ls}, 1", "source elements between lanes")
    k.op(f"selp.u32 {cs}, 1, 0, {role}", "channel step between lanes")
    k.op(f"selp.u32 {cw}, {Cr}, 0xFFFFFFFF, {role}", "Pqc lanes wrap to channel 0 at C")
    return dict(e0=e0, o=o, ls=ls, c=c, cs=cs, cw=cw, nv=nv)


def header_unpatchify(k):
    e0, lanes, flags, role = prologue(k)

    k.comment("e0 -> image digits: NCHW (w, h, t, c), NHWC (c, w, h, t), innermost first.")
    d0, d1, d2, d3 = digits(k, e0, 0)
    c, w, h, tt = k.u32("c"), k.u32("w"), k.u32("h"), k.u32("tt")
    k.op(f"selp.u32 {c}, {d0}, {d3}, {role}")
    k.op(f"selp.u32 {w}, {d1}, {d0}, {role}")
    k.op(f"selp.u32 {h}, {d2}, {d1}, {role}")
    k.op(f"selp.u32 {tt}, {d3}, {d2}, {role}")

    k.comment("Pixel -> grid position (it, ih, iw) and offset (dt, dh, dw) inside the patch.")
    it, ih, iw = k.u32("it"), k.u32("ih"), k.u32("iw")
    dt, dh, dw = k.u32("dt"), k.u32("dh"), k.u32("dw")
    k.fastdiv(tt, 3, it, dt)
    k.fastdiv(h, 4, ih, dh)
    k.fastdiv(w, 5, iw, dw)

    k.comment("Token element of lane 0: l * P + c*jc + dt*jt + dh*jh + dw*jw (< 2^31).")
    gh = k.param("u32", "grid", 0, name="gh")
    gw = k.param("u32", "grid", 1, name="gw")
    P = k.param("u32", "grid", 2, name="P")
    l = k.u32("l")
    k.op(f"mad.lo.u32 {l}, {it}, {gh}, {ih}")
    k.op(f"mad.lo.u32 {l}, {l}, {gw}, {iw}")
    jc = k.param("u32", "tstride", 0, name="jc")
    jt = k.param("u32", "tstride", 1, name="jt")
    jh = k.param("u32", "tstride", 2, name="jh")
    jw = k.param("u32", "tstride", 3, name="jw")
    o = k.u32("o")
    k.op(f"mul.lo.u32 {o}, {l}, {P}")
    k.op(f"mad.lo.u32 {o}, {c}, {jc}, {o}")
    k.op(f"mad.lo.u32 {o}, {dt}, {jt}, {o}")
    k.op(f"mad.lo.u32 {o}, {dh}, {jh}, {o}")
    k.op(f"mad.lo.u32 {o}, {dw}, {jw}, {o}")
    ls, cs = k.u32("ls"), k.u32("cs")
    k.op(f"selp.u32 {ls}, {jc}, {jw}, {role}", "NHWC lanes walk c, NCHW lanes walk w")
    k.op(f"selp.u32 {cs}, 1, 0, {role}", "channel step between lanes")
    cw = k.u32("cw")
    k.op(f"mov.u32 {cw}, 0xFFFFFFFF", "NHWC lanes stay inside one pixel: no wrap")
    return dict(e0=e0, lanes=lanes, flags=flags, o=o, ls=ls, c=c, cs=cs, cw=cw, nv=lanes)


# --------------------------------------------------------------------------------------------
# Element conversions.
# --------------------------------------------------------------------------------------------
F32_ZERO = "0f00000000"  # +0.0


def load_scalar(k, ty, addr, pred, x):
    """x (f32) = source element at addr as f32 if pred, else 0 (exact widening)."""
    f = k.f32(f"x{x}")
    if ty == "f32":
        k.op(f"mov.f32 {f}, {F32_ZERO}")
        k.op(f"@{pred} ld.global.nc.f32 {f}, [{addr}]")
    elif ty == "u8":
        r = k.u32(f"x{x}")
        k.op(f"mov.u32 {r}, 0")
        k.op(f"@{pred} ld.global.nc.u8 {r}, [{addr}]")
        k.op(f"and.b32 {r}, {r}, 255")
        k.op(f"cvt.rn.f32.u32 {f}, {r}", "exact")
    elif ty == "f16":
        hreg = k.b16(f"x{x}")
        k.op(f"mov.b16 {hreg}, 0")
        k.op(f"@{pred} ld.global.nc.b16 {hreg}, [{addr}]")
        k.op(f"cvt.f32.f16 {f}, {hreg}", "exact")
    elif ty == "bf16":
        r = k.u32(f"x{x}")
        k.op(f"mov.u32 {r}, 0")
        k.op(f"@{pred} ld.global.nc.u16 {r}, [{addr}]")
        k.op(f"shl.b32 {r}, {r}, 16", "bf16 bits are the high half of f32")
        k.op(f"mov.b32 {f}, {r}")
    else:
        raise ValueError(ty)
    return f


def load_vector(k, ty, lanes, addr):
    """lanes contiguous source elements at addr (aligned to lanes * size) as f32 registers."""
    xs = [k.f32(f"x{j}") for j in range(lanes)]
    nbytes = lanes * DTYPES[ty]
    if ty == "f32":
        assert lanes == 4
        k.op(f"ld.global.nc.v4.f32 {{{', '.join(xs)}}}, [{addr}]")
        return xs
    words = [k.u32(f"w{j}") for j in range(nbytes // 4)]
    vec = {1: "", 2: ".v2", 4: ".v4"}[len(words)]
    dst = words[0] if len(words) == 1 else "{" + ", ".join(words) + "}"
    k.op(f"ld.global.nc{vec}.u32 {dst}, [{addr}]", f"{nbytes} bytes")
    if ty == "u8":
        for j, f in enumerate(xs):
            r = k.u32(f"x{j}")
            k.op(f"bfe.u32 {r}, {words[j // 4]}, {8 * (j % 4)}, 8", f"byte {j} of the run")
            k.op(f"cvt.rn.f32.u32 {f}, {r}", "exact")
    elif ty == "f16":
        for wi, word in enumerate(words):
            lo, hi = k.b16(f"x{2 * wi}"), k.b16(f"x{2 * wi + 1}")
            k.op(f"mov.b32 {{{lo}, {hi}}}, {word}", "low half is the lower address")
            k.op(f"cvt.f32.f16 {xs[2 * wi]}, {lo}")
            k.op(f"cvt.f32.f16 {xs[2 * wi + 1]}, {hi}")
    elif ty == "bf16":
        for wi, word in enumerate(words):
            lo, hi = k.u32(f"x{2 * wi}"), k.u32(f"x{2 * wi + 1}")
            k.op(f"shl.b32 {lo}, {word}, 16", "low half -> f32 bits")
            k.op(f"and.b32 {hi}, {word}, 0xFFFF0000", "high half -> f32 bits")
            k.op(f"mov.b32 {xs[2 * wi]}, {lo}")
            k.op(f"mov.b32 {xs[2 * wi + 1]}, {hi}")
    else:
        raise ValueError(ty)
    return xs


def to_u8(k, y, j):
    """Round half to even, clamp to [0, 255], NaN -> 0 (cvt float-to-int saturates, NaN -> 0)."""
    r = k.u32(f"y{j}")
    k.op(f"cvt.rni.u32.f32 {r}, {y}", "ties to even; < 0 and NaN -> 0")
    k.op(f"min.u32 {r}, {r}, 255")
    return r


def to_half(k, ty, y, j):
    hreg = k.b16(f"y{j}")
    k.op(f"cvt.rn.{ty}.f32 {hreg}, {y}", "nearest, ties to even")
    return hreg


def store_scalar(k, ty, addr, y):
    if ty == "f32":
        k.op(f"st.global.f32 [{addr}], {y}")
    elif ty in ("f16", "bf16"):
        k.op(f"st.global.b16 [{addr}], {to_half(k, ty, y, 0)}")
    elif ty == "u8":
        k.op(f"st.global.u8 [{addr}], {to_u8(k, y, 0)}")
    else:
        raise ValueError(ty)


def store_vector(k, ty, lanes, addr, ys):
    """Stores lanes values (f32 registers) as contiguous ty elements at addr (aligned)."""
    if ty == "f32":
        assert lanes == 4
        k.op(f"st.global.v4.f32 [{addr}], {{{', '.join(ys)}}}")
        return
    words = [k.u32(f"ow{j}") for j in range(lanes * DTYPES[ty] // 4)]
    if ty in ("f16", "bf16"):
        hs = [to_half(k, ty, y, j) for j, y in enumerate(ys)]
        for wi, word in enumerate(words):
            k.op(f"mov.b32 {word}, {{{hs[2 * wi]}, {hs[2 * wi + 1]}}}", "first is the low half")
    elif ty == "u8":
        bs = [to_u8(k, y, j) for j, y in enumerate(ys)]
        for wi, word in enumerate(words):
            k.op(f"mov.b32 {word}, {bs[4 * wi]}")
            for b in range(1, 4):
                k.op(f"bfi.b32 {word}, {bs[4 * wi + b]}, {word}, {8 * b}, 8")
    else:
        raise ValueError(ty)
    vec = {1: "", 2: ".v2", 4: ".v4"}[len(words)]
    src = words[0] if len(words) == 1 else "{" + ", ".join(words) + "}"
    k.op(f"st.global{vec}.u32 [{addr}], {src}")


# --------------------------------------------------------------------------------------------
# The body shared by both directions: coefficients, batch loop, vector and scalar paths.
# --------------------------------------------------------------------------------------------
def body(k, h, src_ty, dst_ty, V):
    si, so = DTYPES[src_ty], DTYPES[dst_ty]
    e0, lanes, flags, o, ls, c, cs, cw, nv = (
        h[x] for x in ("e0", "lanes", "flags", "o", "ls", "c", "cs", "cw", "nv"))

    k.comment("Batch loop setup: b = ctaid.y, step nctaid.y; 64-bit sample bases.")
    b, B = k.u32("b"), k.param("u32", "batch", name="B")
    k.op(f"mov.u32 {b}, %ctaid.y")
    out = k.pred("out")
    k.op(f"setp.ge.u32 {out}, {b}, {B}")
    k.op(f"@{out} bra $L_done")
    gy = k.u32("gy")
    k.op(f"mov.u32 {gy}, %nctaid.y")
    src, dst = k.param("u64", "src", name="src"), k.param("u64", "dst", name="dst")
    sb, db = k.param("u64", "src_batch", name="sb"), k.param("u64", "dst_batch", name="db")
    b64, gy64, t64 = k.u64("b"), k.u64("gy"), k.u64("t")
    sstep, dstep = k.u64("sstep"), k.u64("dstep")
    k.op(f"cvt.u64.u32 {b64}, {b}")
    k.op(f"cvt.u64.u32 {gy64}, {gy}")
    k.op(f"mul.lo.u64 {t64}, {b64}, {sb}")
    k.op(f"mad.lo.u64 {src}, {t64}, {si}, {src}", "src = input sample b")
    k.op(f"mul.lo.u64 {t64}, {b64}, {db}")
    k.op(f"mad.lo.u64 {dst}, {t64}, {so}, {dst}")
    k.op(f"mad.wide.u32 {dst}, {e0}, {so}, {dst}", "dst = output element e0 of sample b")
    k.op(f"mul.lo.u64 {sstep}, {gy64}, {sb}")
    k.op(f"mul.lo.u64 {sstep}, {sstep}, {si}", "input bytes between iterations")
    k.op(f"mul.lo.u64 {dstep}, {gy64}, {db}")
    k.op(f"mul.lo.u64 {dstep}, {dstep}, {so}", "output bytes between iterations")
    coef = k.param("u64", "coef", name="coef")
    scalar = k.pred("scalar")
    k.op(f"setp.eq.u32 {scalar}, {lanes}, 1")
    k.op(f"@{scalar} bra $L_scalar")

    # ---- vector path: V lanes per thread ----
    k.comment(f"Vector path: {V} lanes; lane k has source o + k*ls and channel c + k*cs,")
    k.body.append("    // wrapping to 0 at cw (row-run Pqc with C not a multiple of the lanes).")
    a_s, b_s = [], []
    ck, ca, ct = k.u32("ck"), k.u64("ca"), k.u32("ct")
    wrap = k.pred("wrap")
    k.op(f"mov.u32 {ck}, {c}")
    for j in range(V):
        a, bb = k.f32(f"a{j}"), k.f32(f"b{j}")
        if j:
            k.op(f"add.u32 {ck}, {ck}, {cs}")
            k.op(f"setp.ge.u32 {wrap}, {ck}, {cw}")
            k.op(f"sub.u32 {ct}, {ck}, {cw}")
            k.op(f"selp.u32 {ck}, {ct}, {ck}, {wrap}", "ck < cw again: it grows by at most 1")
        k.op(f"mad.wide.u32 {ca}, {ck}, 8, {coef}")
        k.op(f"ld.global.nc.v2.f32 {{{a}, {bb}}}, [{ca}]", f"(a, b) of lane {j}")
        a_s.append(a)
        b_s.append(bb)
    vload = k.pred("vload")
    t = k.u32("t")
    k.op(f"and.b32 {t}, {flags}, {FLAG_VLOAD}")
    k.op(f"setp.ne.u32 {vload}, {t}, 0")
    k.op(f"setp.eq.and.u32 {vload}, {nv}, {V}, {vload}", "all lanes valid")
    addr = k.u64("addr")
    ys = [k.f32(f"y{j}") for j in range(V)]
    k.label("$L_vloop")
    k.op(f"@!{vload} bra $L_vgather")
    k.comment(f"One {V * si}-byte load of {V} contiguous {src_ty} values.")
    k.op(f"mad.wide.u32 {addr}, {o}, {si}, {src}")
    xs = load_vector(k, src_ty, V, addr)
    for j in range(V):
        k.op(f"fma.rn.f32 {ys[j]}, {xs[j]}, {a_s[j]}, {b_s[j]}", "one rounding")
    k.op("bra.uni $L_vstore")
    k.label("$L_vgather")
    k.comment("Gather: one predicated load per lane; invalid (padded) lanes are +0.0.")
    lp, ok = k.pred("lane"), k.u32("ok")
    for j in range(V):
        k.op(f"setp.gt.u32 {lp}, {nv}, {j}", f"lane {j} valid")
        k.op(f"mad.lo.u32 {ok}, {ls}, {j}, {o}")
        k.op(f"mad.wide.u32 {addr}, {ok}, {si}, {src}")
        x = load_scalar(k, src_ty, addr, lp, j)
        k.op(f"fma.rn.f32 {ys[j]}, {x}, {a_s[j]}, {b_s[j]}")
        k.op(f"selp.f32 {ys[j]}, {ys[j]}, {F32_ZERO}, {lp}")
    k.label("$L_vstore")
    k.comment(f"One {V * so}-byte store of {V} {dst_ty} values; next sample.")
    store_vector(k, dst_ty, V, dst, ys)
    more = k.pred("more")
    k.op(f"add.u32 {b}, {b}, {gy}")
    k.op(f"add.u64 {src}, {src}, {sstep}")
    k.op(f"add.u64 {dst}, {dst}, {dstep}")
    k.op(f"setp.lt.u32 {more}, {b}, {B}")
    k.op(f"@{more} bra $L_vloop")
    k.op("bra.uni $L_done")

    # ---- scalar path: one element per thread ----
    k.label("$L_scalar")
    k.comment("Scalar path: one element per thread (unaligned or non-divisible shapes).")
    a, bb = k.f32("a0"), k.f32("b0")
    k.op(f"mad.wide.u32 {ca}, {c}, 8, {coef}")
    k.op(f"ld.global.nc.v2.f32 {{{a}, {bb}}}, [{ca}]")
    k.op(f"setp.ne.u32 {lp}, {nv}, 0", "not padded")
    k.label("$L_sloop")
    k.op(f"mad.wide.u32 {addr}, {o}, {si}, {src}")
    x = load_scalar(k, src_ty, addr, lp, 0)
    y = ys[0]
    k.op(f"fma.rn.f32 {y}, {x}, {a}, {bb}")
    k.op(f"selp.f32 {y}, {y}, {F32_ZERO}, {lp}")
    store_scalar(k, dst_ty, dst, y)
    k.op(f"add.u32 {b}, {b}, {gy}")
    k.op(f"add.u64 {src}, {src}, {sstep}")
    k.op(f"add.u64 {dst}, {dst}, {dstep}")
    k.op(f"setp.lt.u32 {more}, {b}, {B}")
    k.op(f"@{more} bra $L_sloop")
    k.label("$L_done")
    k.op("ret")


def gen_entry(name, direction, i, o):
    V = lanes_for(i, o)
    if direction == "patchify":
        k = Entry(name, PATCHIFY_OFF)
        h = header_patchify(k)
        doc = [
            f"{name}: image {i} -> tokens {o}; vector path {V} lanes "
            f"({V * DTYPES[i]}-byte loads, {V * DTYPES[o]}-byte stores).",
            "Thread i of grid row ctaid.y writes token elements [i*lanes, i*lanes + lanes) of",
            "samples ctaid.y, ctaid.y + nctaid.y, ...",
        ]
        size = PATCHIFY_SIZE
    else:
        k = Entry(name, UNPATCHIFY_OFF)
        h = header_unpatchify(k)
        doc = [
            f"{name}: tokens {i} -> image {o}; vector path {V} lanes "
            f"({V * DTYPES[i]}-byte loads, {V * DTYPES[o]}-byte stores).",
            "Thread i of grid row ctaid.y writes image elements [i*lanes, i*lanes + lanes) of",
            "samples ctaid.y, ctaid.y + nctaid.y, ...",
        ]
        size = UNPATCHIFY_SIZE
    body(k, h, i, o, V)
    # The 8-lane patchify entries hold 16 coefficient registers across the loop: they would
    # spill at 32 registers, so they run at 40 registers (6 blocks per SM) instead.
    min_ctas = None if (direction == "patchify" and V == 8) else MIN_CTAS_PER_SM
    return k.render(doc, size, BLOCK, min_ctas)


def abi_lines():
    lines = [f"// abi block {BLOCK}", f"// abi flag vload {FLAG_VLOAD}", f"// abi flag role {FLAG_ROLE}",
             f"// abi flag rows {FLAG_ROWS}"]
    return lines + ptxgen.abi_params("patchify", PATCHIFY_OFF, PATCHIFY_SIZE) + ptxgen.abi_params(
        "unpatchify", UNPATCHIFY_OFF, UNPATCHIFY_SIZE)


def generate():
    head = [
        "// and commit the result. Design and ABI: kernels/README.md.",
        "//",
        "// patchify_{in}_{out}:   image {u8,f32,f16,bf16} -> tokens {f32,f16,bf16}",
        "// unpatchify_{in}_{out}: tokens {f32,f16,bf16} -> image {u8,f32,f16,bf16}",
        "// y = fma.rn.f32(x, a[c], b[c]), then round to the output dtype (ties to even).",
        "//",
    ] + abi_lines()
    parts = [ptxgen.module_header("gen_patchify.py", head)]
    for name, direction, i, o, _ in entries():
        parts.append(gen_entry(name, direction, i, o))
    return "\n".join(parts)


def main():
    args = ptxgen.parser(__doc__).parse_args()
    if args.list:
        for name, _, _, _, size in entries():
            print(name, size)
        return 0
    return ptxgen.emit("gen_patchify.py", {"patchify": generate}, args)


if __name__ == "__main__":
    sys.exit(main())
