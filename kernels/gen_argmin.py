#!/usr/bin/env python3
"""Generates kernels/argmin.ptx: the codebook argmin (nearest entry) and lookup entries.

Python 3 standard library only. Usage:

    python3 kernels/gen_argmin.py             # (re)write kernels/argmin.ptx, kernels/argmin_sm90.ptx
    python3 kernels/gen_argmin.py --check     # exit 1 if a committed file is stale
    python3 kernels/gen_argmin.py --list      # print "<module> <entry> <param bytes>" per entry
    python3 kernels/gen_argmin.py --stdout argmin|argmin_sm90   # print one module
    python3 kernels/gen_argmin.py --emulate quick|full   # run it on kernels/ptx_sim.py (no GPU)

Entries (all take one parameter block, ARGMIN_FIELDS below; src/cuda/argmin.rs mirrors it):

- `argmin_check_{T}`: x [count] -> status: the first NaN / +-inf, as
  `status = max(status, (~index) << 32 | bits)` (0: none). T in {f32, f16, bf16}.
- `argmin_search_{T}_{l2,cos}_bd{4,8,16}`: x [N, D] against the packed codebook -> ws [N]
  (u64, zeroed by the host): `ws[row] = max(ws[row], ~key)` with key = (ordered score) << 32 |
  code, so the least key is the least score, then the lowest code. The f32 arithmetic of
  src/argmin.rs bit for bit: p = fma(x_d, e_d, p) over d ascending from +0 (`fma.rn`, and
  `fma.rn.ftz` for bf16, which is the contract's bf16 chain), s = h - p (`sub.rn`) or s = p * c
  (`mul.rn`), a code is taken when s < best (strict, codes in ascending order per thread), and
  threads merge by (score, code). -0 is made +0 before the key is formed (they compare equal).
- `argmin_finish_{T}`: ws [N] -> indices [N] (u32) and, when `dist != 0`, the contract's
  distance of the chosen entry (plain f32, no ftz) -> dist [N].
- `argmin_lookup_{O}`: ids [N] -> out [N, D] (entries rounded to O with cvt.rn); an id >= K
  sets `status = max(status, (~row) << 32 | id)` and its row is not written.
- `argmin_mma_{f16,bf16}_{l2,cos}` (sm_80+) and, in the sm_90a module argmin_sm90.ptx,
  `argmin_wgmma_{f16,bf16}_{l2,cos}`: the tensor-core searches (mma_entry, wgmma_entry).

The search tiling (kernels/README.md has the picture): a block of 256 threads (16 x 16) owns
BM = 128 rows and sweeps code tiles of BN = 128 codes (the codes of tile t are
[128 t, 128 t + 128); the host pads K with zero entries whose bias is +inf, so padding never
wins: inf - 0 = inf is never < best, 0 * inf = NaN never compares). Per code tile, D is walked
in chunks of BD dims: the block stages x [BM rows][BD] (transposed, row stride 132 floats: no
bank conflicts) and the codebook chunk [BD][BN] (pre-packed by the host as [tile][D_pad][128],
one contiguous 16-byte-per-thread copy) in shared memory; each thread keeps an 8 x 8 register
tile of dot products (rows ty*4 + {0..3}, 64 + ty*4 + {0..3}; codes tx*4 + {0..3},
64 + tx*4 + {0..3}) and 8 running (best, code) pairs. Dims past D are zero in both tiles:
fma(0, 0, p) = p exactly (p is never -0). Grid: (row tiles, K splits); split y handles code
tiles [y * tiles_per_split, ...) and all splits merge through the u64 max in ws.
"""

import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ptxgen  # noqa: E402

BLOCK = 256
FULL = "0xffffffff"
BM = 128  # rows per block
BN = 128  # codes per tile
XS = BM + 4  # x tile row stride in floats (bank-conflict free transposed stores)
MAX_REGS = 128  # .minnctapersm 2 with 256 threads: ptxas keeps the search entries at <= 128
BDS = [4, 8, 16]
FLOATS = ["f32", "f16", "bf16"]
SIZE = {"f32": 4, "f16": 2, "bf16": 2}
METRICS = ["l2", "cos"]
MMA_TYPES = ["f16", "bf16"]

ARGMIN_FIELDS = [
    ("x", "u64"),  # x [N, D] (T)
    ("packed", "u64"),  # search: [tiles][d_pad][128] f32
    ("bias", "u64"),  # search: [tiles * 128] f32 (h_k or c_k; +inf for padding codes)
    ("ws", "u64"),  # search / finish: u64 [N], zeroed by the host
    ("rows", "u64"),  # finish / lookup: entries [K, D] f32
    ("norms", "u64"),  # finish: ||e_k||^2 [K] f32
    ("out", "u64"),  # finish: indices u32 [N]; lookup: out [N, D] (O)
    ("dist", "u64"),  # finish: distances f32 [N], or 0 for none
    ("ids", "u64"),  # lookup: u32 [N]
    ("status", "u64"),  # check / lookup: one u64, zeroed by the host
    ("n", "u32"),  # rows N
    ("d", "u32"),  # D
    ("k", "u32"),  # K
    ("d_pad", "u32"),  # D rounded up to the entry's BD
    ("tiles", "u32"),  # ceil(K / 128)
    ("tiles_per_split", "u32"),  # code tiles per grid.y
    ("count", "u32"),  # check / lookup: N * D (< 2^32, host-checked)
    ("metric", "u32"),  # finish: 0 L2, 1 cosine
]
SIZES = {"u64": 8, "u32": 4}


OFF, PARAM_SIZE = ptxgen.layout(ARGMIN_FIELDS, SIZES)


def entries():
    """(name, kind, dtype, metric, bd) in file order."""
    out = [(f"argmin_check_{t}", "check", t, None, None) for t in FLOATS]
    for t in FLOATS:
        for m in METRICS:
            for bd in BDS:
                out.append((f"argmin_search_{t}_{m}_bd{bd}", "search", t, m, bd))
    out += [(f"argmin_finish_{t}", "finish", t, None, None) for t in FLOATS]
    out += [(f"argmin_lookup_{t}", "lookup", t, None, None) for t in FLOATS]
    out += [(f"argmin_mma_{t}_{m}", "mma", t, m, 16) for t in MMA_TYPES for m in METRICS]
    out += [("argmin_pad_b16", "pad", None, None, None)]
    return out


class Entry(ptxgen.Entry):
    def __init__(self, name, minctas=None):
        super().__init__(name, OFF)
        self.shared = []
        self.minctas = minctas

    def render(self, doc):
        return super().render(doc, PARAM_SIZE, BLOCK, self.minctas, self.shared)


def grid_stride(k):
    """i = global thread index, step = threads in the grid (< 2^31: grid capped by the host)."""
    tid, ctaid, ntid, nctaid = k.u32("tid"), k.u32("ctaid"), k.u32("ntid"), k.u32("nctaid")
    i, step = k.u32("i"), k.u32("step")
    k.op(f"mov.u32 {tid}, %tid.x")
    k.op(f"mov.u32 {ctaid}, %ctaid.x")
    k.op(f"mov.u32 {ntid}, %ntid.x")
    k.op(f"mov.u32 {nctaid}, %nctaid.x")
    k.op(f"mad.lo.u32 {i}, {ctaid}, {ntid}, {tid}")
    k.op(f"mul.lo.u32 {step}, {nctaid}, {ntid}")
    return i, step


def load_widen(k, ty, dst, addr, guard=None, off=0):
    """dst (f32) = element of type ty at [addr+off], widened exactly (0 when guard is false)."""
    g = f"@{guard} " if guard else ""
    if guard:
        k.op(f"mov.f32 {dst}, 0f00000000")
    if ty == "f32":
        k.op(f"{g}ld.global.nc.f32 {dst}, [{addr}+{off}]")
        return
    if ty == "f16":
        h = k.b16("ld")
        if guard:
            k.op(f"mov.b16 {h}, 0")
        k.op(f"{g}ld.global.nc.b16 {h}, [{addr}+{off}]")
        k.op(f"cvt.f32.f16 {dst}, {h}", "exact")
    else:
        r = k.u32("ld")
        if guard:
            k.op(f"mov.u32 {r}, 0")
        k.op(f"{g}ld.global.nc.u16 {r}, [{addr}+{off}]")
        k.op(f"shl.b32 {r}, {r}, 16", "bf16 is the top half of an f32: exact")
        k.op(f"mov.b32 {dst}, {r}")


# --------------------------------------------------------------------------------------------
# check: the first non-finite element of x.
# --------------------------------------------------------------------------------------------
def check_entry(name, ty):
    k = Entry(name)
    k.comment("Grid-stride over the count elements; a NaN or +-inf at flat index i sets\n"
              "status = max(status, (~i) << 32 | bits): the lowest index wins.")
    i, step = grid_stride(k)
    count, x, status = k.param("u32", "count"), k.param("u64", "x"), k.param("u64", "status")
    sz = SIZE[ty]
    p, bad = k.pred("p"), k.pred("bad")
    a, bits, e, ni = k.u64("a"), k.u32("bits"), k.u32("e"), k.u32("ni")
    w, lo = k.u64("w"), k.u64("lo")
    mask = {"f32": "0x7f800000", "f16": "0x7c00", "bf16": "0x7f80"}[ty]
    k.label("$L_loop")
    k.op(f"setp.ge.u32 {p}, {i}, {count}")
    k.op(f"@{p} bra $L_done")
    k.op(f"mul.wide.u32 {a}, {i}, {sz}")
    k.op(f"add.u64 {a}, {a}, {x}")
    if ty == "f32":
        k.op(f"ld.global.nc.u32 {bits}, [{a}]")
    else:
        k.op(f"ld.global.nc.u16 {bits}, [{a}]")
    k.op(f"and.b32 {e}, {bits}, {mask}")
    k.op(f"setp.eq.u32 {bad}, {e}, {mask}", "exponent all ones: NaN or +-inf")
    k.op(f"@!{bad} bra $L_next")
    k.op(f"not.b32 {ni}, {i}")
    k.op(f"cvt.u64.u32 {w}, {ni}")
    k.op(f"shl.b64 {w}, {w}, 32")
    k.op(f"cvt.u64.u32 {lo}, {bits}")
    k.op(f"or.b64 {w}, {w}, {lo}")
    k.op(f"red.global.max.u64 [{status}], {w}")
    k.label("$L_next")
    k.op(f"add.u32 {i}, {i}, {step}")
    k.op("bra $L_loop")
    k.label("$L_done")
    k.op("ret")
    return k.render([f"{name}: x {ty} [count] -> status (first NaN / +-inf)."])


# --------------------------------------------------------------------------------------------
# search: the tiled FFMA kernel.
# --------------------------------------------------------------------------------------------
def search_entry(name, ty, metric, bd):
    k = Entry(name, minctas=2)
    k.shared = [("sx", bd * XS * 4), ("se", bd * BN * 4)]
    sz = SIZE[ty]
    fma = "fma.rn.ftz.f32" if ty == "bf16" else "fma.rn.f32"
    k.comment(f"BD = {bd}: D is walked {bd} dims per shared-memory chunk; see the file header.")
    tid, tx, ty_, row0 = k.u32("tid"), k.u32("tx"), k.u32("ty"), k.u32("row0")
    k.op(f"mov.u32 {tid}, %tid.x")
    k.op(f"and.b32 {tx}, {tid}, 15")
    k.op(f"shr.u32 {ty_}, {tid}, 4")
    k.op(f"mov.u32 {row0}, %ctaid.x")
    k.op(f"shl.b32 {row0}, {row0}, 7", "first row of the block (BM = 128)")
    n, d, d_pad = k.param("u32", "n"), k.param("u32", "d"), k.param("u32", "d_pad")
    tiles, tps = k.param("u32", "tiles"), k.param("u32", "tiles_per_split")
    x, packed, bias, ws = k.param("u64", "x"), k.param("u64", "packed"), k.param("u64", "bias"), k.param("u64", "ws")
    t, t_end = k.u32("t"), k.u32("t_end")
    k.op(f"mov.u32 {t}, %ctaid.y")
    k.op(f"mul.lo.u32 {t}, {t}, {tps}", "first code tile of this split")
    k.op(f"add.u32 {t_end}, {t}, {tps}")
    k.op(f"min.u32 {t_end}, {t_end}, {tiles}")

    # x staging: element j = tid + 256 m of the [BM][bd] chunk is row r0 + m * (256 / bd),
    # dim dd (the same for every m because 256 % bd == 0).
    per = BM * bd // BLOCK
    rstep = BLOCK // bd
    dd, r0, xoff = k.u32("dd"), k.u32("r0"), k.u32("xoff")
    shift = bd.bit_length() - 1
    k.op(f"and.b32 {dd}, {tid}, {bd - 1}")
    k.op(f"shr.u32 {r0}, {tid}, {shift}")
    grow = k.u32("grow")
    k.op(f"add.u32 {grow}, {row0}, {r0}")
    k.op(f"mad.lo.u32 {xoff}, {grow}, {d}, {dd}", "x element of (row r0, dim dd), < 2^32 (host-checked)")
    rows_ok = []
    for m in range(per):
        pm = k.pred(f"row{m}")
        gm = k.u32("gm")
        k.op(f"add.u32 {gm}, {grow}, {m * rstep}")
        k.op(f"setp.lt.u32 {pm}, {gm}, {n}")
        rows_ok.append(pm)
    rstep_b = k.u64("rstep_b")
    k.op(f"mul.wide.u32 {rstep_b}, {d}, {rstep * sz}", "bytes between staged rows m and m+1")
    sx, se, sxw, sew, sxr, ser = (k.u32(v) for v in ("sx", "se", "sxw", "sew", "sxr", "ser"))
    k.op(f"mov.u32 {sx}, sx")
    k.op(f"mov.u32 {se}, se")
    k.op(f"mad.lo.u32 {sxw}, {dd}, {XS * 4}, {sx}")
    k.op(f"shl.b32 {r0}, {r0}, 2")
    k.op(f"add.u32 {sxw}, {sxw}, {r0}", "where this thread's staged x values go")
    k.op(f"shl.b32 {sew}, {tid}, 4")
    k.op(f"add.u32 {sew}, {sew}, {se}", "where this thread's codebook float4 goes")
    k.op(f"shl.b32 {sxr}, {ty_}, 4")
    k.op(f"add.u32 {sxr}, {sxr}, {sx}", "x values of rows ty*4.. (and +64)")
    k.op(f"shl.b32 {ser}, {tx}, 4")
    k.op(f"add.u32 {ser}, {ser}, {se}", "codes tx*4.. (and +64)")

    best = [k.f32(f"best{i}") for i in range(8)]
    bidx = [k.u32(f"bidx{i}") for i in range(8)]
    for i in range(8):
        k.op(f"mov.f32 {best[i]}, 0f7F800000")
        k.op(f"mov.u32 {bidx[i]}, 0")
    acc = [[k.f32(f"a{i}_{j}") for j in range(8)] for i in range(8)]
    xv = [k.f32(f"x{i}") for i in range(8)]
    ev = [k.f32(f"e{j}") for j in range(8)]
    p = k.pred("p")
    c, dg = k.u32("c"), k.u32("dg")
    a, ea = k.u64("a"), k.u64("ea")
    pd = k.pred("dok")
    k.op(f"setp.ge.u32 {p}, {t}, {t_end}")
    k.op(f"@{p} bra $L_reduce", "an empty split (only when tiles_per_split overshoots)")

    k.label("$L_tile")
    for i in range(8):
        for j in range(8):
            k.op(f"mov.f32 {acc[i][j]}, 0f00000000")
    k.op(f"mov.u32 {c}, 0", "first dim of the chunk")
    k.label("$L_chunk")
    k.op("bar.sync 0", "the previous chunk's readers are done")
    # Stage x: per elements of rows r0 + m*rstep, dim c + dd.
    k.op(f"add.u32 {dg}, {c}, {dd}")
    k.op(f"setp.lt.u32 {pd}, {dg}, {d}")
    k.op(f"add.u32 {dg}, {xoff}, {c}")
    k.op(f"mul.wide.u32 {a}, {dg}, {sz}")
    k.op(f"add.u64 {a}, {a}, {x}")
    v = k.f32("v")
    g = k.pred("g")
    for m in range(per):
        k.op(f"and.pred {g}, {pd}, {rows_ok[m]}")
        load_widen(k, ty, v, a, guard=g)
        k.op(f"st.shared.f32 [{sxw}+{m * rstep * 4}], {v}")
        if m + 1 < per:
            k.op(f"add.u64 {a}, {a}, {rstep_b}")
    # Stage the codebook chunk: [bd][128] floats, contiguous in the packed layout.
    k.op(f"mad.lo.u32 {dg}, {t}, {d_pad}, {c}")
    k.op(f"mul.wide.u32 {ea}, {dg}, {BN * 4}")
    k.op(f"add.u64 {ea}, {ea}, {packed}")
    k.op(f"mul.wide.u32 {a}, {tid}, 16")
    k.op(f"add.u64 {ea}, {ea}, {a}")
    q4 = [k.f32(f"q{j}") for j in range(4)]
    vec = "{" + ", ".join(q4) + "}"
    if bd == 4:
        pl = k.pred("lo")
        k.op(f"setp.lt.u32 {pl}, {tid}, 128", "a [4][128] chunk is 128 float4")
        k.op(f"@{pl} ld.global.nc.v4.f32 {vec}, [{ea}]")
        k.op(f"@{pl} st.shared.v4.f32 [{sew}], {vec}")
    else:
        for q in range(bd // 8):
            k.op(f"ld.global.nc.v4.f32 {vec}, [{ea}+{q * BLOCK * 16}]")
            k.op(f"st.shared.v4.f32 [{sew}+{q * BLOCK * 16}], {vec}")
    k.op("bar.sync 0", "the chunk is staged")
    for j in range(bd):
        xo, eo = j * XS * 4, j * BN * 4
        k.op(f"ld.shared.v4.f32 {{{', '.join(xv[:4])}}}, [{sxr}+{xo}]")
        k.op(f"ld.shared.v4.f32 {{{', '.join(xv[4:])}}}, [{sxr}+{xo + 256}]")
        k.op(f"ld.shared.v4.f32 {{{', '.join(ev[:4])}}}, [{ser}+{eo}]")
        k.op(f"ld.shared.v4.f32 {{{', '.join(ev[4:])}}}, [{ser}+{eo + 256}]")
        for i in range(8):
            for jj in range(8):
                k.op(f"{fma} {acc[i][jj]}, {xv[i]}, {ev[jj]}, {acc[i][jj]}")
    k.op(f"add.u32 {c}, {c}, {bd}")
    k.op(f"setp.lt.u32 {p}, {c}, {d_pad}")
    k.op(f"@{p} bra $L_chunk")

    k.comment("Scores of the tile, folded into the running best of each row in ascending code order.")
    cb, ba = k.u32("cb"), k.u64("ba")
    k.op(f"shl.b32 {cb}, {t}, 7")
    k.op(f"shl.b32 {dg}, {tx}, 2")
    k.op(f"add.u32 {cb}, {cb}, {dg}", "code of slot 0: 128 t + 4 tx")
    k.op(f"mul.wide.u32 {ba}, {cb}, 4")
    k.op(f"add.u64 {ba}, {ba}, {bias}")
    k.op(f"ld.global.nc.v4.f32 {{{', '.join(ev[:4])}}}, [{ba}]")
    k.op(f"ld.global.nc.v4.f32 {{{', '.join(ev[4:])}}}, [{ba}+256]")
    codes = [k.u32(f"code{j}") for j in range(8)]
    for j in range(8):
        k.op(f"add.u32 {codes[j]}, {cb}, {j if j < 4 else 60 + j}")
    for i in range(8):
        for j in range(8):
            s = acc[i][j]
            if metric == "l2":
                k.op(f"sub.rn.f32 {s}, {ev[j]}, {s}", "s = h - p")
            else:
                k.op(f"mul.rn.f32 {s}, {s}, {ev[j]}", "s = p * c")
            k.op(f"setp.lt.f32 {p}, {s}, {best[i]}", "NaN never wins")
            k.op(f"@{p} mov.f32 {best[i]}, {s}")
            k.op(f"@{p} mov.u32 {bidx[i]}, {codes[j]}")
    k.op(f"add.u32 {t}, {t}, 1")
    k.op(f"setp.lt.u32 {p}, {t}, {t_end}")
    k.op(f"@{p} bra $L_tile")

    k.label("$L_reduce")
    k.comment("Keys (ordered score, code); the 16 threads of a row (tx) merge by shuffles, then\n"
              "tx = 0 folds the row's key into ws with one red.max of ~key.")
    hi, lo, ohi, olo, tmp = k.u32("hi"), k.u32("lo"), k.u32("ohi"), k.u32("olo"), k.u32("tmp")
    neg, less, eq, lt2, lead, rv = k.pred("neg"), k.pred("less"), k.pred("eq"), k.pred("lt2"), k.pred("lead"), k.pred("rv")
    key, klo = k.u64("key"), k.u64("klo")
    rr = k.u32("rr")
    k.op(f"setp.eq.u32 {lead}, {tx}, 0")
    for i in range(8):
        k.op(f"mov.b32 {hi}, {best[i]}")
        k.op(f"setp.eq.u32 {p}, {hi}, 0x80000000")
        k.op(f"selp.u32 {hi}, 0, {hi}, {p}", "-0 -> +0: they compare equal")
        k.op(f"setp.lt.s32 {neg}, {hi}, 0")
        k.op(f"not.b32 {tmp}, {hi}")
        k.op(f"or.b32 {hi}, {hi}, 0x80000000")
        k.op(f"selp.u32 {hi}, {tmp}, {hi}, {neg}", "order-preserving bits: unsigned order = float order")
        k.op(f"mov.u32 {lo}, {bidx[i]}")
        for sh in (1, 2, 4, 8):
            k.op(f"shfl.sync.bfly.b32 {ohi}, {hi}, {sh}, 31, {FULL}")
            k.op(f"shfl.sync.bfly.b32 {olo}, {lo}, {sh}, 31, {FULL}")
            k.op(f"setp.lt.u32 {less}, {ohi}, {hi}")
            k.op(f"setp.eq.u32 {eq}, {ohi}, {hi}")
            k.op(f"setp.lt.u32 {lt2}, {olo}, {lo}")
            k.op(f"and.pred {eq}, {eq}, {lt2}")
            k.op(f"or.pred {less}, {less}, {eq}")
            k.op(f"selp.u32 {hi}, {ohi}, {hi}, {less}")
            k.op(f"selp.u32 {lo}, {olo}, {lo}, {less}")
        roff = i if i < 4 else 60 + i
        k.op(f"shl.b32 {rr}, {ty_}, 2")
        k.op(f"add.u32 {rr}, {rr}, {row0}")
        k.op(f"add.u32 {rr}, {rr}, {roff}")
        k.op(f"setp.lt.u32 {rv}, {rr}, {n}")
        k.op(f"and.pred {rv}, {rv}, {lead}")
        k.op(f"cvt.u64.u32 {key}, {hi}")
        k.op(f"shl.b64 {key}, {key}, 32")
        k.op(f"cvt.u64.u32 {klo}, {lo}")
        k.op(f"or.b64 {key}, {key}, {klo}")
        k.op(f"not.b64 {key}, {key}")
        k.op(f"mul.wide.u32 {a}, {rr}, 8")
        k.op(f"add.u64 {a}, {a}, {ws}")
        k.op(f"@{rv} red.global.max.u64 [{a}], {key}")
    k.op("ret")
    return k.render([f"{name}: x {ty} [N, D] x packed codebook -> ws [N] (see the file header)."])


# --------------------------------------------------------------------------------------------
# finish: indices and distances.
# --------------------------------------------------------------------------------------------
def finish_entry(name, ty):
    k = Entry(name)
    k.comment("Row i: the code is the low half of ~ws[i]; the distance (if dist != 0) is the\n"
              "contract's: L2 sum (x - e)^2 as an fma chain; cosine 1 - clamp(p / (sqrt(xx) *\n"
              "sqrt(n_k)), -1, 1), 1 when either norm is 0. Plain f32 (no ftz) for every dtype.")
    i, step = grid_stride(k)
    n, d, metric = k.param("u32", "n"), k.param("u32", "d"), k.param("u32", "metric")
    ws, out, dist = k.param("u64", "ws"), k.param("u64", "out"), k.param("u64", "dist")
    x, rows, norms = k.param("u64", "x"), k.param("u64", "rows"), k.param("u64", "norms")
    sz = SIZE[ty]
    p, hasd, cos = k.pred("p"), k.pred("hasd"), k.pred("cos")
    k.op(f"setp.ne.u64 {hasd}, {dist}, 0")
    k.op(f"setp.ne.u32 {cos}, {metric}, 0")
    a, w, xa, ea = k.u64("a"), k.u64("w"), k.u64("xa"), k.u64("ea")
    code, j = k.u32("code"), k.u32("j")
    xv, ev, t, acc, xx, nk, r, r2 = (k.f32(v) for v in ("xv", "ev", "t", "acc", "xx", "nk", "r", "r2"))
    k.label("$L_loop")
    k.op(f"setp.ge.u32 {p}, {i}, {n}")
    k.op(f"@{p} bra $L_done")
    k.op(f"mul.wide.u32 {a}, {i}, 8")
    k.op(f"add.u64 {a}, {a}, {ws}")
    k.op(f"ld.global.u64 {w}, [{a}]")
    k.op(f"not.b64 {w}, {w}")
    k.op(f"cvt.u32.u64 {code}, {w}", "the low half")
    k.op(f"mul.wide.u32 {a}, {i}, 4")
    k.op(f"add.u64 {a}, {a}, {out}")
    k.op(f"st.global.u32 [{a}], {code}")
    k.op(f"@!{hasd} bra $L_next")
    k.op(f"mul.wide.u32 {xa}, {i}, {d}")
    k.op(f"mul.lo.u64 {xa}, {xa}, {sz}")
    k.op(f"add.u64 {xa}, {xa}, {x}")
    k.op(f"mul.wide.u32 {ea}, {code}, {d}")
    k.op(f"shl.b64 {ea}, {ea}, 2")
    k.op(f"add.u64 {ea}, {ea}, {rows}")
    k.op(f"mov.f32 {acc}, 0f00000000")
    k.op(f"mov.f32 {xx}, 0f00000000")
    k.op(f"mov.u32 {j}, 0")
    k.op(f"@{cos} bra $L_cos")
    k.label("$L_l2")
    load_widen(k, ty, xv, xa)
    k.op(f"ld.global.nc.f32 {ev}, [{ea}]")
    k.op(f"sub.rn.f32 {t}, {xv}, {ev}")
    k.op(f"fma.rn.f32 {acc}, {t}, {t}, {acc}")
    k.op(f"add.u64 {xa}, {xa}, {sz}")
    k.op(f"add.u64 {ea}, {ea}, 4")
    k.op(f"add.u32 {j}, {j}, 1")
    k.op(f"setp.lt.u32 {p}, {j}, {d}")
    k.op(f"@{p} bra $L_l2")
    k.op("bra $L_store")
    k.label("$L_cos")
    load_widen(k, ty, xv, xa)
    k.op(f"ld.global.nc.f32 {ev}, [{ea}]")
    k.op(f"fma.rn.f32 {xx}, {xv}, {xv}, {xx}")
    k.op(f"fma.rn.f32 {acc}, {xv}, {ev}, {acc}")
    k.op(f"add.u64 {xa}, {xa}, {sz}")
    k.op(f"add.u64 {ea}, {ea}, 4")
    k.op(f"add.u32 {j}, {j}, 1")
    k.op(f"setp.lt.u32 {p}, {j}, {d}")
    k.op(f"@{p} bra $L_cos")
    k.op(f"mul.wide.u32 {a}, {code}, 4")
    k.op(f"add.u64 {a}, {a}, {norms}")
    k.op(f"ld.global.nc.f32 {nk}, [{a}]")
    pz, pz2 = k.pred("pz"), k.pred("pz2")
    k.op(f"setp.eq.f32 {pz}, {xx}, 0f00000000")
    k.op(f"setp.eq.f32 {pz2}, {nk}, 0f00000000")
    k.op(f"or.pred {pz}, {pz}, {pz2}")
    k.op(f"sqrt.rn.f32 {r}, {xx}")
    k.op(f"sqrt.rn.f32 {r2}, {nk}")
    k.op(f"mul.rn.f32 {r}, {r}, {r2}")
    k.op(f"div.rn.f32 {r}, {acc}, {r}")
    k.op(f"setp.lt.f32 {p}, {r}, 0fBF800000")
    k.op(f"selp.f32 {r}, 0fBF800000, {r}, {p}", "clamp as Rust does: NaN stays NaN")
    k.op(f"setp.gt.f32 {p}, {r}, 0f3F800000")
    k.op(f"selp.f32 {r}, 0f3F800000, {r}, {p}")
    k.op(f"sub.rn.f32 {acc}, 0f3F800000, {r}")
    k.op(f"selp.f32 {acc}, 0f3F800000, {acc}, {pz}")
    k.label("$L_store")
    k.op(f"mul.wide.u32 {a}, {i}, 4")
    k.op(f"add.u64 {a}, {a}, {dist}")
    k.op(f"st.global.f32 [{a}], {acc}")
    k.label("$L_next")
    k.op(f"add.u32 {i}, {i}, {step}")
    k.op("bra $L_loop")
    k.label("$L_done")
    k.op("ret")
    return k.render([f"{name}: ws [N] -> indices u32 [N] (+ dist f32 [N] from x {ty})."])


# --------------------------------------------------------------------------------------------
# lookup: entries by index.
# --------------------------------------------------------------------------------------------
def lookup_entry(name, ty):
    k = Entry(name)
    k.comment("Element i of out [N, D]: row i / D, dim i % D; consecutive threads write consecutive\n"
              "elements. An id >= K sets status = max(status, (~row) << 32 | id) and is not written.")
    i, step = grid_stride(k)
    count, d, kk = k.param("u32", "count"), k.param("u32", "d"), k.param("u32", "k")
    ids, rows, out, status = k.param("u64", "ids"), k.param("u64", "rows"), k.param("u64", "out"), k.param("u64", "status")
    p, bad = k.pred("p"), k.pred("bad")
    row, col, code, nr = k.u32("row"), k.u32("col"), k.u32("code"), k.u32("nr")
    a, w, lo = k.u64("a"), k.u64("w"), k.u64("lo")
    v = k.f32("v")
    k.label("$L_loop")
    k.op(f"setp.ge.u32 {p}, {i}, {count}")
    k.op(f"@{p} bra $L_done")
    k.op(f"div.u32 {row}, {i}, {d}")
    k.op(f"mul.lo.u32 {col}, {row}, {d}")
    k.op(f"sub.u32 {col}, {i}, {col}")
    k.op(f"mul.wide.u32 {a}, {row}, 4")
    k.op(f"add.u64 {a}, {a}, {ids}")
    k.op(f"ld.global.nc.u32 {code}, [{a}]")
    k.op(f"setp.ge.u32 {bad}, {code}, {kk}")
    k.op(f"@!{bad} bra $L_ok")
    k.op(f"not.b32 {nr}, {row}")
    k.op(f"cvt.u64.u32 {w}, {nr}")
    k.op(f"shl.b64 {w}, {w}, 32")
    k.op(f"cvt.u64.u32 {lo}, {code}")
    k.op(f"or.b64 {w}, {w}, {lo}")
    k.op(f"red.global.max.u64 [{status}], {w}")
    k.op("bra $L_next")
    k.label("$L_ok")
    k.op(f"mul.wide.u32 {a}, {code}, {d}")
    k.op(f"cvt.u64.u32 {w}, {col}")
    k.op(f"add.u64 {a}, {a}, {w}")
    k.op(f"shl.b64 {a}, {a}, 2")
    k.op(f"add.u64 {a}, {a}, {rows}")
    k.op(f"ld.global.nc.f32 {v}, [{a}]")
    k.op(f"mul.wide.u32 {a}, {i}, {SIZE[ty]}")
    k.op(f"add.u64 {a}, {a}, {out}")
    if ty == "f32":
        k.op(f"st.global.f32 [{a}], {v}")
    else:
        h = k.b16("h")
        k.op(f"cvt.rn.{ty}.f32 {h}, {v}", "round to nearest even, as half::from_f32")
        k.op(f"st.global.b16 [{a}], {h}")
    k.label("$L_next")
    k.op(f"add.u32 {i}, {i}, {step}")
    k.op("bra $L_loop")
    k.label("$L_done")
    k.op("ret")
    return k.render([f"{name}: ids u32 [N] -> out {ty} [N, D] (entries, checked ids)."])


# --------------------------------------------------------------------------------------------
# mma: the tensor-core search for f16 / bf16 (m16n8k16, f32 accumulation).
# --------------------------------------------------------------------------------------------
TC_K = ptxgen.TC_K  # tensor-core search: dims per cp.async stage (and the codebook's row padding)


def mma_entry(name, ty, metric):
    """argmin_mma_{ty}_{metric}: a block of 256 threads (8 warps) owns BM = 128 rows and sweeps
    its split's code tiles of BN = 128 codes. Warp (wm, wn) = (warp & 3, warp >> 2) computes the
    dot products of rows 32 wm .. +32 with codes 64 wn .. +64 of the tile: 2 x 8 mma.sync
    m16n8k16 accumulators, D in stages of TC_K = 32 dims through shared memory (cp.async.cg
    16-byte chunks, two stages: the next stage loads while this one computes; 64-byte rows, the
    four chunks XOR-swizzled by (row >> 1) & 3 so that ldmatrix phases hit distinct banks).
    x: rows of `d` elements (the host passes d % 8 = 0 and a 16-byte aligned x, padding a copy
    when the caller's is not), chunks past d or rows past n zero-filled (src-size 0). Codebook:
    the host's [tiles * 128][d_pad] copy (d_pad = D rounded up to 32, zero rows and dims past K
    and D). After the last stage of a tile: scores from the bias exactly as the FFMA search
    (s = h - p or s = p * c, rounded once), folded into the running best of the thread's 4 rows
    in ascending code order with strict <; at the end the 4 lanes of a row merge by
    (score, code) and lane 0 of each warp does red.max of ~key into ws."""
    STAGE = ptxgen.TC_STAGE  # the tile, its stages and registers: ptxgen.tc_*
    assert BM == BN == 128 and TC_K == ptxgen.TC_K

    def prm(reg, field):
        return f"    ld.param.{dict(ARGMIN_FIELDS)[field]} {reg}, [p+{OFF[field]}];"

    doc = [f"{name}: x {ty} [N, D] x codebook {ty} [tiles * 128][d_pad] -> ws [N] (tensor cores,",
           "cp.async + ldmatrix + mma.sync on 128 x 128 tiles; see the generator)."]
    s = [f"// {line}" for line in doc] + ptxgen.signature(name, PARAM_SIZE, BLOCK) + [
        ".minnctapersm 2", "{",
        ".reg .pred %p<16>;", ".reg .b32 %r<64>;", ".reg .f32 %f<8>;", ".reg .b64 %rd<24>;",
        ".reg .f32 %acc<64>;", ".reg .b32 %fa<8>;", ".reg .b32 %fb<4>;",
        ".reg .f32 %bs<4>;", ".reg .b32 %bj<4>;", f".shared .align 128 .b8 smem[{2 * STAGE}];",
        prm("%rd1", "x"), prm("%rd2", "packed"), prm("%rd3", "bias"), prm("%rd4", "ws"),
        prm("%r1", "n"), prm("%r2", "d"), prm("%r3", "d_pad"), prm("%r4", "tiles"), prm("%r5", "tiles_per_split"),
    ] + ptxgen.tc_warp_layout() + [
        "    mov.u32 %r15, %ctaid.x;",
        "    shl.b32 %r15, %r15, 7;  // row0",
    ] + ptxgen.tc_copy_slot() + [
        "    shl.b32 %r24, %r20, 3;  // first dim of the chunk",
        "    // x rows row0 + cr (+ 64): valid below n; their chunk addresses at dim 0",
        "    add.u32 %r25, %r15, %r21;",
        "    setp.lt.u32 %p8, %r25, %r1;",
        "    mul.wide.u32 %rd5, %r25, %r2;",
        "    cvt.u64.u32 %rd6, %r24;",
        "    add.u64 %rd5, %rd5, %rd6;",
        "    shl.b64 %rd5, %rd5, 1;",
        "    add.u64 %rd5, %rd5, %rd1;",
        "    add.u32 %r25, %r25, 64;",
        "    setp.lt.u32 %p9, %r25, %r1;",
        "    mul.wide.u32 %rd6, %r25, %r2;",
        "    cvt.u64.u32 %rd7, %r24;",
        "    add.u64 %rd6, %rd6, %rd7;",
        "    shl.b64 %rd6, %rd6, 1;",
        "    add.u64 %rd6, %rd6, %rd1;",
        "    // codebook rows: (128 t + cr) * d_pad + 8 cc, tile stride 128 d_pad (elements)",
        "    cvt.u64.u32 %rd7, %r3;",
        "    shl.b64 %rd7, %rd7, 1;  // codebook row bytes",
        "    cvt.u64.u32 %rd8, %r21;",
        "    mul.lo.u64 %rd8, %rd8, %rd7;",
        "    cvt.u64.u32 %rd9, %r20;",
        "    shl.b64 %rd9, %rd9, 4;",
        "    add.u64 %rd8, %rd8, %rd9;",
        "    add.u64 %rd8, %rd8, %rd2;  // this thread's chunk in tile 0, dim 0",
        "    shl.b64 %rd9, %rd7, 6;  // 64 codebook rows",
        "    shl.b64 %rd10, %rd7, 7;  // one code tile",
    ] + ptxgen.tc_ldmatrix_addresses()
    for r in range(4):
        s += [f"    mov.f32 %bs{r}, 0f7F800000;", f"    mov.u32 %bj{r}, 0;"]
    s += ptxgen.tc_zero_accumulators()
    s += [
        "    // code tiles [t, t_end) of this split",
        "    mov.u32 %r26, %ctaid.y;",
        "    mul.lo.u32 %r26, %r26, %r5;  // t",
        "    add.u32 %r27, %r26, %r5;",
        "    min.u32 %r27, %r27, %r4;  // t_end",
    ]

    def copy(stage_reg):
        return [
            "    add.u32 %r33, %r29, %r24;",
            "    setp.lt.u32 %p10, %r33, %r2;  // the chunk's dims are inside d",
            "    cvt.u64.u32 %rd11, %r29;",
            "    shl.b64 %rd11, %rd11, 1;",
            "    and.pred %p11, %p10, %p8;",
            "    add.u64 %rd12, %rd5, %rd11;",
            "    selp.u64 %rd12, %rd12, %rd1, %p11;",
            "    selp.u32 %r46, 16, 0, %p11;",
            "    and.pred %p11, %p10, %p9;",
            "    add.u64 %rd13, %rd6, %rd11;",
            "    selp.u64 %rd13, %rd13, %rd1, %p11;",
            "    selp.u32 %r47, 16, 0, %p11;",
            "    cvt.u64.u32 %rd14, %r28;",
            "    mul.lo.u64 %rd14, %rd14, %rd10;",
            "    add.u64 %rd14, %rd14, %rd8;",
            "    add.u64 %rd14, %rd14, %rd11;",
            "    add.u64 %rd15, %rd14, %rd9;",
            f"    add.u32 %r33, %r23, {stage_reg};",
        ] + ptxgen.tc_copy_issue(("%r46", "%r47"), "%r3")

    s += ptxgen.tc_main_loop(copy, ty, "%r2", "%r3")

    def score(a, c):
        if metric == "l2":
            return [f"    sub.rn.f32 %f3, %f{1 + c}, %acc{a};"], "%f3"
        return [f"    mul.rn.f32 %f3, %acc{a}, %f{1 + c};"], "%f3"
    # Epilogue: scores from the bias as the FFMA search computes them, folded by
    # ptxgen.tile_fold (rows r = 2 mt + h, their least score in %f4..7).
    s += ["    mul.wide.u32 %rd16, %r50, 4;", "    add.u64 %rd16, %rd16, %rd3;  // &bias[column 0]"]
    groups = [([f"    ld.global.nc.v2.f32 {{%f1, %f2}}, [%rd16+{32 * n}];"],
               [(8 * n + c, lambda r, n=n, c=c: score((r // 2 * 8 + n) * 4 + 2 * (r % 2) + c, c)) for c in range(2)])
              for n in range(8)]
    s += ptxgen.tile_fold("min", groups, [(f"%f{4 + r}", f"%bs{r}", f"%bj{r}") for r in range(4)],
                          "%r50", "%p12", "%r54", "M")
    s += ptxgen.tc_next_tile("%r27") + [
        "FINAL:",
        "    // key = ordered score << 32 | code (-0 as +0); the quad keeps the least, lane 0 of",
        "    // the quad does red.max of ~key",
        "    setp.eq.u32 %p13, %r12, 0;",
        "    mad.lo.u32 %r56, %r13, 32, %r15;",
        "    add.u32 %r56, %r56, %r11;  // row of slot 0",
    ]
    for mt in range(2):
        for h in range(2):
            r = 2 * mt + h
            s += quad_key_red(f"%bs{r}", f"%bj{r}", 16 * mt + 8 * h, "%r56", "%p13",
                              ("%p14", "%p15"), ("%r57", "%r58", "%r59", "%r60", "%r61"), ("%rd17", "%rd18"))
    s += ["    ret;", "}", ""]
    return "\n".join(s)


def quad_key_red(best, code, row_off, row0, lane0, preds, regs, rds):
    """The end of a tensor-core search for one row slot: key = (ordered score) << 32 | code
    (-0 as +0; ordered: the f32 bits with the sign bit flipped, or all bits for negatives), the
    quad (lanes 4 g .. +4) keeps the least key by two butterfly shuffles (equal scores: the
    lower code), then lane `lane0` (a predicate) does red.max of ~key into ws[row] for row =
    `row0` + `row_off` below n (%r1; ws at %rd4). preds / regs / rds: scratch registers."""
    p, q = preds
    k, j, k2, j2, row = regs
    key, addr = rds
    out = [
        f"    mov.b32 {k}, {best};",
        f"    setp.eq.u32 {p}, {k}, 0x80000000;",
        f"    selp.u32 {k}, 0, {k}, {p};",
        f"    setp.lt.s32 {p}, {k}, 0;",
        f"    not.b32 {j}, {k};",
        f"    or.b32 {k}, {k}, 0x80000000;",
        f"    selp.u32 {k}, {j}, {k}, {p};",
        f"    mov.u32 {j}, {code};",
    ]
    for w in (1, 2):
        out += [
            f"    shfl.sync.bfly.b32 {k2}, {k}, {w}, 31, {FULL};",
            f"    shfl.sync.bfly.b32 {j2}, {j}, {w}, 31, {FULL};",
            f"    setp.eq.u32 {p}, {k2}, {k};",
            f"    setp.lt.and.u32 {p}, {j2}, {j}, {p};",
            f"    setp.lt.or.u32 {p}, {k2}, {k}, {p};",
            f"    selp.u32 {k}, {k2}, {k}, {p};",
            f"    selp.u32 {j}, {j2}, {j}, {p};",
        ]
    return out + [
        f"    add.u32 {row}, {row0}, {row_off};",
        f"    setp.lt.and.u32 {q}, {row}, %r1, {lane0};",
        f"    mov.b64 {key}, {{{j}, {k}}};",
        f"    not.b64 {key}, {key};",
        f"    mul.wide.u32 {addr}, {row}, 8;",
        f"    add.u64 {addr}, {addr}, %rd4;",
        f"    @{q} red.global.max.u64 [{addr}], {key};",
    ]


def pad_entry(name):
    """argmin_pad_b16: x [n, d] (16-bit) -> out [n, d_pad] with zeros in dims >= d: the
    tensor-core search's copy of an x whose rows are not 16-byte aligned. count = n * d_pad."""
    k = Entry(name)
    i, step = grid_stride(k)
    x, out = k.param("u64", "x"), k.param("u64", "out")
    d, d_pad, count = k.param("u32", "d"), k.param("u32", "d_pad"), k.param("u32", "count")
    row, col, tmp = k.u32("row"), k.u32("col"), k.u32("tmp")
    h = k.b16("h")
    a = k.u64("a")
    p = k.pred("p")
    k.label("$L_loop")
    k.op(f"setp.ge.u32 {p}, {i}, {count}")
    k.op(f"@{p} bra $L_done")
    k.op(f"div.u32 {row}, {i}, {d_pad}")
    k.op(f"mul.lo.u32 {tmp}, {row}, {d_pad}")
    k.op(f"sub.u32 {col}, {i}, {tmp}")
    k.op(f"mov.b16 {h}, 0")
    k.op(f"setp.lt.u32 {p}, {col}, {d}")
    k.op(f"mad.lo.u32 {tmp}, {row}, {d}, {col}")
    k.op(f"mul.wide.u32 {a}, {tmp}, 2")
    k.op(f"add.u64 {a}, {a}, {x}")
    k.op(f"@{p} ld.global.nc.b16 {h}, [{a}]")
    k.op(f"mul.wide.u32 {a}, {i}, 2")
    k.op(f"add.u64 {a}, {a}, {out}")
    k.op(f"st.global.b16 [{a}], {h}")
    k.op(f"add.u32 {i}, {i}, {step}")
    k.op(f"bra $L_loop")
    k.label("$L_done")
    k.op("ret")
    return k.render([f"{name}: x [n, d] (16-bit) -> out [n, d_pad], zeros past d."])


def abi_lines():
    return [f"// abi block {BLOCK}", f"// abi bm {BM}", f"// abi bn {BN}"] + ptxgen.abi_params("argmin", OFF, PARAM_SIZE)


def generate():
    head = [
        "// and commit the result. Design: the header of kernels/gen_argmin.py.",
        f"// vistok: max-regs {MAX_REGS}",
        "//",
        "// argmin_check_{f32,f16,bf16}: x -> status (first NaN / +-inf)",
        "// argmin_search_{f32,f16,bf16}_{l2,cos}_bd{4,8,16}: x, packed codebook -> ws u64 [N]",
        "// argmin_finish_{f32,f16,bf16}: ws -> indices u32 [N], distances f32 [N]",
        "// argmin_lookup_{f32,f16,bf16}: ids u32 [N] -> out [N, D]",
        "// argmin_mma_{f16,bf16}_{l2,cos}: x, fragment-packed codebook -> ws u64 [N] (tensor cores)",
        "//",
    ] + abi_lines()
    parts = [ptxgen.module_header("gen_argmin.py", head)]
    for name, kind, ty, metric, bd in entries():
        if kind == "check":
            parts.append(check_entry(name, ty))
        elif kind == "search":
            parts.append(search_entry(name, ty, metric, bd))
        elif kind == "finish":
            parts.append(finish_entry(name, ty))
        elif kind == "lookup":
            parts.append(lookup_entry(name, ty))
        elif kind == "pad":
            parts.append(pad_entry(name))
        else:
            parts.append(mma_entry(name, ty, metric))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# argmin_sm90.ptx: the Hopper (sm_90a) tensor-core search with wgmma.
# --------------------------------------------------------------------------------------------
WG_KB = 64  # dims per k-block: one 128-byte swizzle row
WG_BLOCK_BYTES = 128 * WG_KB * 2  # 128 rows of one k-block: 16 KB (sixteen 1024-byte atoms)
WG_STAGES = 4  # codebook ring buffers
WG_AHEAD = WG_STAGES - 2  # stages copied ahead (one more stage's wgmma may still be reading)
WG_MAX_D = 256  # x rows stay in shared memory: at most 4 k-blocks
WG_MAX_REGS = 240  # two sets of 64 accumulators: one 256-thread block per SM (by design)
WG_SLACK = 1024  # the dynamic window is aligned up to 1024 bytes inside the launch's bytes
WG_TYPES = MMA_TYPES


def wgmma_entries():
    return [(f"argmin_wgmma_{t}_{m}", t, m) for t in WG_TYPES for m in METRICS]


def wgmma_shared_bytes(d8):
    """Dynamic shared memory of a launch for x rows of d8 elements (the host mirrors it)."""
    ka = (d8 + WG_KB - 1) // WG_KB
    return WG_SLACK + (ka + WG_STAGES) * WG_BLOCK_BYTES


def wgmma_entry(name, ty, metric):
    """argmin_wgmma_{ty}_{metric} (sm_90a): a block of 256 threads = two warpgroups owns BM =
    128 rows (warpgroup w: rows 64 w .. +64) and sweeps its split's code tiles of BN = 128
    codes with wgmma.mma_async m64n128k16 (f32 accumulators, 64 per thread), both operands
    from shared memory in K-major 128-byte-swizzled layout (CUTLASS's SW128 K-major atom: 8
    rows of 128 bytes per 1024-byte group, 16-byte chunk c of row r stored at chunk c ^ (r & 7)).

    Shared memory (dynamic, the base aligned up to 1024): the block's x rows, copied once as
    ka = ceil(d / 64) k-blocks of [128 rows][64 dims] (16 KB each, rows past n and dims past
    d zero-filled), then a ring of WG_STAGES codebook buffers of [128 codes][64 dims]. The
    codebook streams in stages (tile, k-block) in order, WG_AHEAD stages ahead with cp.async
    (zero-fill past d_pad); per stage: wait for its copy, fence.proxy.async (the generic-proxy
    cp.async writes become visible to wgmma), barrier, issue the copy WG_AHEAD ahead into the
    buffer whose wgmma completed (wait_group 1 at the end of every stage leaves only that
    stage's wgmma in flight), then wgmma.fence and four k16 wgmma, straight-line (steps past d
    multiply zeros; the first of a tile with scale-d = 0, so the accumulators need no zeroing).
    Two sets of accumulators (%acc, %accy) alternate between tiles, so a tile's epilogue runs
    after the next tile's first stage is issued, while its wgmma compute (the code is the tile
    loop twice, one per set; after the last tile wait_group 0 and its epilogue). Epilogue:
    scores s = h - p or s = p * c from the bias, as the FFMA search computes them; per row the
    tile's least score m (min.f32), and only when m < best a second pass for the lowest column
    scoring m: the strict < fold over ascending codes (each thread holds rows g, g + 8 of its
    warp's 16 and columns 8 j + 2 t4 + {0, 1}). At the end the quad of a row merges by
    (score, code) and red.max of ~key into ws. 228 registers: one block per SM."""
    def prm(reg, field):
        return f"    ld.param.{dict(ARGMIN_FIELDS)[field]} {reg}, [p+{OFF[field]}];"

    mma = f"wgmma.mma_async.sync.aligned.m64n128k16.f32.{ty}.{ty}"
    doc = [f"{name}: x {ty} [N, d] x codebook {ty} [tiles * 128][d_pad] -> ws [N] (sm_90a wgmma,",
           "x resident in shared memory, the codebook streamed through a cp.async ring; see the generator)."]
    s = [f"// {line}" for line in doc] + ptxgen.signature(name, PARAM_SIZE, BLOCK) + [
        "{",
        ".reg .pred %p<20>;", ".reg .b32 %r<80>;", ".reg .f32 %f<8>;", ".reg .b64 %rd<32>;",
        ".reg .f32 %acc<64>;", ".reg .f32 %accy<64>;", ".reg .f32 %bs<2>;", ".reg .b32 %bj<2>;", ".reg .f32 %m<2>;",
        prm("%rd1", "x"), prm("%rd2", "packed"), prm("%rd3", "bias"), prm("%rd4", "ws"),
        prm("%r1", "n"), prm("%r2", "d"), prm("%r3", "d_pad"), prm("%r4", "tiles"), prm("%r5", "tiles_per_split"),
        "    mov.u32 %r8, %tid.x;",
        "    shr.u32 %r9, %r8, 5;  // warp",
        "    and.b32 %r10, %r8, 31;  // lane",
        "    shr.u32 %r11, %r10, 2;  // g: accumulator rows g, g + 8",
        "    and.b32 %r12, %r10, 3;  // t4: accumulator columns 8 j + 2 t4 + {0, 1}",
        "    shr.u32 %r13, %r9, 2;  // warpgroup",
        "    and.b32 %r14, %r9, 3;  // warp in the warpgroup: rows 16 q .. +16 of its 64",
        "    mov.u32 %r15, %ctaid.x;",
        "    shl.b32 %r15, %r15, 7;  // row0",
        "    mov.u32 %r16, dsmem;",
        f"    add.u32 %r16, %r16, {WG_SLACK - 1};",
        f"    and.b32 %r16, %r16, {-WG_SLACK & 0xFFFFFFFF};  // the 1024-aligned base: x k-blocks",
        "    add.u32 %r17, %r2, 63;",
        "    shr.u32 %r17, %r17, 6;  // ka: k-blocks of d",
        f"    mad.lo.u32 %r21, %r17, {WG_BLOCK_BYTES}, %r16;  // the codebook ring",
        "    // copies: chunk cc = tid & 7 of rows r0 + 32 j (r0 = tid >> 3), stored at",
        "    // (r >> 3) * 1024 + (r & 7) * 128 + (cc ^ (r & 7)) * 16 of a k-block (r & 7 = r0 & 7)",
        "    and.b32 %r18, %r8, 7;  // cc",
        "    shr.u32 %r19, %r8, 3;  // r0",
        "    and.b32 %r20, %r19, 7;",
        "    xor.b32 %r22, %r20, %r18;",
        "    shl.b32 %r22, %r22, 4;",
        "    shl.b32 %r20, %r20, 7;",
        "    add.u32 %r20, %r20, %r22;",
        "    shr.u32 %r22, %r19, 3;",
        "    shl.b32 %r22, %r22, 10;",
        "    add.u32 %r20, %r20, %r22;  // the thread's slot in a k-block",
        "    shl.b32 %r23, %r18, 3;  // first dim of the chunk in a k-block",
        "    // code tiles [t, t_end) of this split",
        "    mov.u32 %r26, %ctaid.y;",
        "    mul.lo.u32 %r26, %r26, %r5;",
        "    add.u32 %r27, %r26, %r5;",
        "    min.u32 %r27, %r27, %r4;",
        "    mov.f32 %bs0, 0f7F800000;", "    mov.f32 %bs1, 0f7F800000;",
        "    mov.u32 %bj0, 0;", "    mov.u32 %bj1, 0;",
        "    setp.ge.u32 %p1, %r26, %r27;",
        "    @%p1 bra.uni FINAL;",
        "    // x: k-blocks 0 .. ka of rows row0 + r0 + 32 j, one cp.async group",
    ]
    for j in range(4):
        s += [
            f"    add.u32 %r24, %r15, %r19;",
            f"    add.u32 %r24, %r24, {32 * j};",
            f"    setp.lt.u32 %p{2 + j}, %r24, %r1;  // row j inside n",
            f"    mul.wide.u32 %rd{5 + j}, %r24, %r2;",
            f"    cvt.u64.u32 %rd9, %r23;",
            f"    add.u64 %rd{5 + j}, %rd{5 + j}, %rd9;",
            f"    shl.b64 %rd{5 + j}, %rd{5 + j}, 1;",
            f"    add.u64 %rd{5 + j}, %rd{5 + j}, %rd1;  // &x[row][cc * 8]",
        ]
    s += [
        "    mov.u32 %r24, 0;  // k-block",
        "    add.u32 %r25, %r16, %r20;  // destination in k-block 0",
        "XCOPY:",
        "    shl.b32 %r28, %r24, 6;",
        "    add.u32 %r28, %r28, %r23;",
        "    setp.lt.u32 %p6, %r28, %r2;  // the chunk's dims are inside d",
        "    cvt.u64.u32 %rd9, %r24;",
        "    shl.b64 %rd9, %rd9, 7;  // k-block byte offset in a row",
    ]
    for j in range(4):
        s += [
            f"    and.pred %p7, %p6, %p{2 + j};",
            f"    add.u64 %rd10, %rd{5 + j}, %rd9;",
            "    selp.u64 %rd10, %rd10, %rd1, %p7;",
            "    selp.u32 %r29, 16, 0, %p7;",
            f"    cp.async.cg.shared.global [%r25+{4096 * j}], [%rd10], 16, %r29;",
        ]
    s += [
        "    add.u32 %r24, %r24, 1;",
        f"    add.u32 %r25, %r25, {WG_BLOCK_BYTES};",
        "    setp.lt.u32 %p6, %r24, %r17;",
        "    @%p6 bra.uni XCOPY;",
        "    cp.async.commit_group;",
        "    // codebook chunk addresses: packed + ((128 t + r0 + 32 j) d_pad + 64 kb + 8 cc) * 2",
        "    cvt.u64.u32 %rd11, %r3;",
        "    shl.b64 %rd11, %rd11, 1;  // codebook row bytes",
        "    cvt.u64.u32 %rd12, %r19;",
        "    mul.lo.u64 %rd12, %rd12, %rd11;",
        "    cvt.u64.u32 %rd13, %r23;",
        "    shl.b64 %rd13, %rd13, 1;",
        "    add.u64 %rd12, %rd12, %rd13;",
        "    add.u64 %rd12, %rd12, %rd2;  // row r0, chunk cc of tile 0, k-block 0",
        "    shl.b64 %rd13, %rd11, 5;  // 32 rows",
        "    shl.b64 %rd14, %rd11, 7;  // one code tile",
        "    // stages: S = (t_end - t) * ka; the next copy (tile %r30, k-block %r31, stage %r32)",
        "    sub.u32 %r33, %r27, %r26;",
        "    mul.lo.u32 %r33, %r33, %r17;",
        "    mov.u32 %r30, %r26;",
        "    mov.u32 %r31, 0;",
        "    mov.u32 %r32, 0;",
    ]

    def copy_stage(tag):
        """The copy of stage %r32 (tile %r30, k-block %r31) into ring buffer %r32 % STAGES when
        %r32 < S, one cp.async group either way; then the position advances."""
        return [
            "    setp.ge.u32 %p8, %r32, %r33;",
            f"    @%p8 bra.uni NOCOPY_{tag};",
            f"    and.b32 %r34, %r32, {WG_STAGES - 1};",
            f"    mad.lo.u32 %r34, %r34, {WG_BLOCK_BYTES}, %r21;",
            "    add.u32 %r34, %r34, %r20;  // destination",
            "    shl.b32 %r35, %r31, 6;",
            "    add.u32 %r35, %r35, %r23;",
            "    setp.lt.u32 %p9, %r35, %r3;  // the chunk's dims are inside d_pad",
            "    selp.u32 %r36, 16, 0, %p9;",
            "    cvt.u64.u32 %rd15, %r30;",
            "    mul.lo.u64 %rd15, %rd15, %rd14;",
            "    add.u64 %rd15, %rd15, %rd12;",
            "    cvt.u64.u32 %rd16, %r31;",
            "    shl.b64 %rd16, %rd16, 7;",
            "    add.u64 %rd15, %rd15, %rd16;",
            "    selp.u64 %rd15, %rd15, %rd2, %p9;",
        ] + [line for j in range(4) for line in (
            f"    cp.async.cg.shared.global [%r34+{4096 * j}], [%rd15], 16, %r36;",
            "    add.u64 %rd15, %rd15, %rd13;" if j < 3 else "",
        ) if line] + ptxgen.wg_copy_advance(tag)

    for a in range(WG_AHEAD):
        s += copy_stage(f"P{a}")
    s += [
        "    // descriptors (PTX ISA matrix descriptor): start >> 4 | LBO 16 >> 4 << 16, SBO 1024 >> 4",
        "    // << 32, 128-byte swizzle (1 << 62). A: this warpgroup's 64 rows of k-block 0.",
        f"    mad.lo.u32 %r37, %r13, {WG_BLOCK_BYTES // 2}, %r16;",
    ] + ptxgen.wg_descriptor("%rd17", "%r37", "%r37") + ["    // B: ring buffer 0"] + ptxgen.wg_descriptor("%rd18", "%r21", "%r38") + [
        "    mov.u32 %r40, %r26;  // tile being issued",
        "    mov.u32 %r41, 0;  // its k-block",
        "    mov.u32 %r42, 0;  // stages issued",
        "    shl.b32 %r53, %r12, 1;  // 2 t4",
        "    setp.ne.u32 %p19, %r40, %r40;  // false: no tile awaits its epilogue yet",
    ]

    def epilogue(acc, tag):
        """Folds the tile %r46 held in the accumulators `acc` into the running bests
        (ptxgen.tile_fold: the strict < fold over ascending codes; NaN scores, those of padding
        codes under the cosine metric, never win)."""
        def score(a, c):
            if metric == "l2":
                return [f"    sub.rn.f32 %f3, %f{1 + c}, %{acc}{a};"], "%f3"
            return [f"    mul.rn.f32 %f3, %{acc}{a}, %f{1 + c};"], "%f3"
        groups = [([f"    ld.global.nc.v2.f32 {{%f1, %f2}}, [%rd21+{32 * j}];"],
                   [(8 * j + c, lambda h, j=j, c=c: score(4 * j + 2 * h + c, c)) for c in range(2)])
                  for j in range(16)]
        return [
            f"    // epilogue of tile %r46 (accumulators %{acc}): columns 128 t + 8 j + 2 t4 + c",
            "    shl.b32 %r50, %r46, 7;",
            "    add.u32 %r50, %r50, %r53;",
            "    mul.wide.u32 %rd21, %r50, 4;",
            "    add.u64 %rd21, %rd21, %rd3;  // &bias[column of j = c = 0]",
        ] + ptxgen.tile_fold("min", groups, [(f"%m{h}", f"%bs{h}", f"%bj{h}") for h in range(2)],
                             "%r50", "%p14", "%r54", tag)

    descriptors = [
        "    // this stage's descriptors: A + 1024 * kb (16 KB >> 4), B + 1024 * buffer",
        "    shl.b32 %r43, %r41, 10;",
        "    cvt.u64.u32 %rd19, %r43;",
        "    add.u64 %rd19, %rd19, %rd17;",
        f"    and.b32 %r43, %r42, {WG_STAGES - 1};",
        "    shl.b32 %r43, %r43, 10;",
        "    cvt.u64.u32 %rd20, %r43;",
        "    add.u64 %rd20, %rd20, %rd18;",
    ]
    s += ptxgen.wg_tile_loops(mma, WG_AHEAD, copy_stage, descriptors, epilogue)
    s += [
        "DONE:",
        "    cp.async.wait_group 0;  // the empty trailing groups",
        "FINAL:",
        "    // key = ordered score << 32 | code (-0 as +0); the quad keeps the least, lane 0 of",
        "    // the quad does red.max of ~key",
        "    setp.eq.u32 %p16, %r12, 0;",
        "    shl.b32 %r56, %r13, 6;",
        "    add.u32 %r56, %r56, %r15;",
        "    shl.b32 %r57, %r14, 4;",
        "    add.u32 %r56, %r56, %r57;",
        "    add.u32 %r56, %r56, %r11;  // row of h = 0",
    ]
    for h in range(2):
        s += quad_key_red(f"%bs{h}", f"%bj{h}", 8 * h, "%r56", "%p16",
                          ("%p17", "%p18"), ("%r57", "%r58", "%r59", "%r60", "%r61"), ("%rd22", "%rd23"))
    s += ["    ret;", "}", ""]
    return "\n".join(s)


def generate_sm90():
    head = [
        "// and commit the result. Design: wgmma_entry in kernels/gen_argmin.py.",
        f"// vistok: max-regs {WG_MAX_REGS}",
        "//",
        "// argmin_wgmma_{f16,bf16}_{l2,cos}: x, tensor-core codebook -> ws u64 [N] (sm_90a only:",
        "// wgmma; the other entries, and the sm_80+ tensor-core search, are in argmin.ptx)",
        "//",
        f"// abi block {BLOCK}",
        f"// abi bm {BM}",
        f"// abi bn {BN}",
        f"// abi wgmma_kb {WG_KB}",
        f"// abi wgmma_stages {WG_STAGES}",
        f"// abi wgmma_max_d {WG_MAX_D}",
        f"// abi wgmma_slack {WG_SLACK}",
    ] + ptxgen.abi_params("argmin", OFF, PARAM_SIZE)
    parts = [ptxgen.sm90_module_header("gen_argmin.py", head)]
    for name, ty, metric in wgmma_entries():
        parts.append(wgmma_entry(name, ty, metric))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# --emulate: the committed PTX on kernels/ptx_sim.py against an independent model of the
# contract (src/argmin.rs), without a GPU. The host side (packing, padding, grid) is modelled
# as src/cuda/argmin.rs does it.
# --------------------------------------------------------------------------------------------
def emulate(quick):
    import random
    import struct
    import time
    import ptx_sim as S

    with open(os.path.join(ptxgen.HERE, "argmin.ptx"), encoding="utf-8") as f:
        mods = S.parse_module(f.read())
    with open(os.path.join(ptxgen.HERE, "argmin_sm90.ptx"), encoding="utf-8") as f:
        mods.update(S.parse_module(f.read()))

    def fbits(v):
        return struct.unpack("<I", struct.pack("<f", v))[0]

    def in_dtype(v, ty):
        b = fbits(v)
        return b if ty == "f32" else S.f32_to_format(b, S.BF16 if ty == "bf16" else S.F16)

    def widen(b, ty):
        return b if ty == "f32" else (b << 16 if ty == "bf16" else S.format_to_f32(b, S.F16))

    def params(**kw):
        b = bytearray(PARAM_SIZE)
        for name, t in ARGMIN_FIELDS:
            struct.pack_into("<Q" if t == "u64" else "<I", b, OFF[name], kw.get(name, 0))
        return bytes(b)

    def u32s(vals):
        return b"".join(struct.pack("<I", v) for v in vals)

    def lt(a, b):
        return S.f32_compare("lt", S.f32_value(a), S.f32_value(b))

    def model(xw, ew, n, k, d, metric, ty, tc=False):
        """Indices and distances (bits) by the contract, and the norms / biases. tc: the dot
        products as ptx_sim's mma model computes them (rounded once per k-step of 16 dims)."""
        fl = S.flush_f32 if ty == "bf16" else (lambda v: v)

        def dot_tc(xs, es):
            p = 0
            for k0 in range(0, d, 16):
                exact = S.decode(p, *S.F32)[2] + sum(S.decode(a, *S.F32)[2] * S.decode(b, *S.F32)[2]
                                                     for a, b in zip(xs[k0:k0 + 16], es[k0:k0 + 16]))
                p = S.round_to_format(exact, *S.F32) if exact != 0 else 0
            return p
        norms, bias = [], []
        for c in range(k):
            nn = 0
            for j in range(d):
                nn = S.fma_f32(ew[c * d + j], ew[c * d + j], nn)
            norms.append(nn)
            if metric == "l2":
                bias.append(S.f32_arith("mul", 0x3F000000, nn))
            else:
                inv = S.f32_arith("div", 0x3F800000, S.sqrt_f32(nn))
                bias.append(0 if nn == 0 else inv ^ 0x80000000)
        idx, dist = [], []
        for r in range(n):
            xs = xw[r * d:(r + 1) * d]
            best, bi = 0x7F800000, 0
            for c in range(k):
                p = 0
                if tc:
                    p = dot_tc(xs, ew[c * d:(c + 1) * d])
                for j in range(0 if tc else d):
                    p = fl(S.fma_f32(fl(xs[j]), fl(ew[c * d + j]), p))
                s = S.f32_arith("sub", bias[c], p) if metric == "l2" else S.f32_arith("mul", p, bias[c])
                if lt(s, best):
                    best, bi = s, c
            idx.append(bi)
            es = ew[bi * d:(bi + 1) * d]
            if metric == "l2":
                acc = 0
                for a, b in zip(xs, es):
                    t = S.f32_arith("sub", a, b)
                    acc = S.fma_f32(t, t, acc)
            else:
                xx = p = 0
                for a, b in zip(xs, es):
                    xx = S.fma_f32(a, a, xx)
                    p = S.fma_f32(a, b, p)
                if S.f32_value(xx) == 0 or S.f32_value(norms[bi]) == 0:
                    acc = 0x3F800000
                else:
                    q = S.f32_arith("div", p, S.f32_arith("mul", S.sqrt_f32(xx), S.sqrt_f32(norms[bi])))
                    q = 0xBF800000 if lt(q, 0xBF800000) else (0x3F800000 if lt(0x3F800000, q) else q)
                    acc = S.f32_arith("sub", 0x3F800000, q)
            dist.append(acc)
        return idx, dist, norms, bias

    def search(n, k, d, ty, metric, seed, lattice, splits_target, tc=False, wg=False, modules=None):
        rng = random.Random(seed)

        def val():
            if lattice:
                return float(rng.randrange(5) - 2)
            u = rng.random()
            if u < 0.08:
                return [0.0, -0.0, 1e-39][int(u * 100) % 3]
            return rng.uniform(-1, 1)

        xb = [in_dtype(val(), ty) for _ in range(n * d)]
        eb = [in_dtype(val(), ty) for _ in range(k * d)]
        xw, ew = [widen(b, ty) for b in xb], [widen(b, ty) for b in eb]
        want, wdist, norms, bias = model(xw, ew, n, k, d, metric, ty, tc)
        bd = 16 if tc else (4 if d <= 4 else (16 if d % 16 == 0 else 8))
        d_pad, tiles = (d + bd - 1) // bd * bd, (k + BN - 1) // BN
        if tc:
            # [tiles * 128][d_pad] 16-bit entries, d_pad = D rounded up to TC_K, zeros past K, D.
            d_pad = (d + TC_K - 1) // TC_K * TC_K
            packed = [0] * (tiles * BN * d_pad)
            for c in range(k):
                for j in range(d):
                    packed[c * d_pad + j] = eb[c * d + j]
        else:
            packed = [0] * (tiles * d_pad * BN)
            for c in range(k):
                for j in range(d):
                    packed[((c // BN) * d_pad + j) * BN + c % BN] = ew[c * d + j]
        biasp = bias + [0x7F800000] * (tiles * BN - k)
        sz = SIZE[ty]
        A = dict(x=1 << 20, packed=2 << 20, bias=3 << 20, ws=4 << 20, rows=5 << 20, norms=6 << 20,
                 out=7 << 20, dist=8 << 20, status=9 << 20)
        mem = S.Memory()
        mem.add("x", A["x"], b"".join(v.to_bytes(sz, "little") for v in xb), False)
        if tc:
            mem.add("packed", A["packed"], b"".join(v.to_bytes(2, "little") for v in packed), False)
        else:
            mem.add("packed", A["packed"], u32s(packed), False)
        mem.add("bias", A["bias"], u32s(biasp), False)
        mem.add("ws", A["ws"], bytes(8 * n), True)
        mem.add("rows", A["rows"], u32s(ew), False)
        mem.add("norms", A["norms"], u32s(norms), False)
        mem.add("out", A["out"], bytes(4 * n), True)
        mem.add("dist", A["dist"], bytes(4 * n), True)
        mem.add("status", A["status"], bytes(8), True)
        row_tiles = (n + BM - 1) // BM
        splits = max(1, min(tiles, -(-splits_target // row_tiles)))
        per = -(-tiles // splits)
        splits = -(-tiles // per)
        pb = params(n=n, d=d, k=k, d_pad=d_pad, tiles=tiles, tiles_per_split=per, count=n * d,
                    metric=int(metric == "cos"), **A)
        st = {"threads": 0, "instructions": 0}
        t0 = time.time()
        S.run_kernel(mods[f"argmin_check_{ty}"], [2, 1, 1], [BLOCK, 1, 1], pb, mem, st)
        entry = f"argmin_mma_{ty}_{metric}" if tc else f"argmin_search_{ty}_{metric}_bd{bd}"
        if wg:
            entry = f"argmin_wgmma_{ty}_{metric}"
        sp = pb
        d8 = (d + 7) // 8 * 8
        if tc and d % 8:  # rows not 16-byte aligned: the host's padded copy of x
            XP = 10 << 20
            mem.add("xpad", XP, bytes(2 * n * d8), True)
            S.run_kernel(mods["argmin_pad_b16"], [2, 1, 1], [BLOCK, 1, 1],
                         params(x=A["x"], out=XP, d=d, d_pad=d8, count=n * d8), mem, st)
            sp = params(n=n, d=d8, k=k, d_pad=d_pad, tiles=tiles, tiles_per_split=per, **dict(A, x=XP))
        S.run_kernel((modules or mods)[entry], [row_tiles, splits, 1], [BLOCK, 1, 1], sp, mem, st, strict_shared=True,
                     dynamic_shared=wgmma_shared_bytes(d8) if wg else 0)
        S.run_kernel(mods[f"argmin_finish_{ty}"], [1, 1, 1], [BLOCK, 1, 1], pb, mem, st)
        got = list(struct.unpack(f"<{n}I", mem.read(A["out"], 4 * n)))
        gdist = list(struct.unpack(f"<{n}I", mem.read(A["dist"], 4 * n)))
        status = struct.unpack("<Q", mem.read(A["status"], 8))[0]
        what = f"{entry} n={n} k={k} d={d} (grid {row_tiles}x{splits})"
        assert status == 0, f"{what}: status {status:#x}"
        bad = [(r, got[r], want[r]) for r in range(n) if got[r] != want[r]]
        assert not bad, f"{what}: {len(bad)} indices differ from the contract, first {bad[0]}"
        assert gdist == wdist, f"{what}: distances differ from the contract"
        print(f"{what}: indices and distances as the contract ({time.time() - t0:.1f} s)")

    def check(ty, count, bad):
        sz = SIZE[ty]
        xb = [in_dtype(0.5 * (i % 7) - 1, ty) for i in range(count)]
        special = {"f32": [0x7FC00000, 0x7F800000, 0xFF800000], "bf16": [0x7FC0, 0x7F80, 0xFF80],
                   "f16": [0x7E00, 0x7C00, 0xFC00]}[ty]
        for i, pos in enumerate(bad):
            xb[pos] = special[i % 3]
        mem = S.Memory()
        mem.add("x", 1 << 20, b"".join(v.to_bytes(sz, "little") for v in xb), False)
        mem.add("status", 2 << 20, bytes(8), True)
        S.run_kernel(mods[f"argmin_check_{ty}"], [2, 1, 1], [BLOCK, 1, 1],
                     params(x=1 << 20, status=2 << 20, count=count), mem, {"threads": 0, "instructions": 0})
        w = struct.unpack("<Q", mem.read(2 << 20, 8))[0]
        want = 0 if not bad else ((~min(bad) & 0xFFFFFFFF) << 32) | xb[min(bad)]
        assert w == want, f"check {ty} {bad}: status {w:#x}, want {want:#x}"
        print(f"check {ty} count={count} bad={bad}: status as expected")

    def lookup(ty, k, d, ids):
        rng = random.Random(k * d)
        rows = [fbits(rng.uniform(-3, 3)) for _ in range(k * d)]
        n, sz = len(ids), SIZE[ty]
        mem = S.Memory()
        mem.add("rows", 1 << 20, u32s(rows), False)
        mem.add("ids", 2 << 20, u32s(ids), False)
        mem.add("out", 3 << 20, bytes(sz * n * d), True)
        mem.add("status", 4 << 20, bytes(8), True)
        S.run_kernel(mods[f"argmin_lookup_{ty}"], [1, 1, 1], [BLOCK, 1, 1],
                     params(rows=1 << 20, ids=2 << 20, out=3 << 20, status=4 << 20, n=n, d=d, k=k, count=n * d),
                     mem, {"threads": 0, "instructions": 0})
        w = struct.unpack("<Q", mem.read(4 << 20, 8))[0]
        bad = [i for i, c in enumerate(ids) if c >= k]
        want = 0 if not bad else ((~bad[0] & 0xFFFFFFFF) << 32) | ids[bad[0]]
        assert w == want, f"lookup {ty}: status {w:#x}, want {want:#x}"
        out = mem.read(3 << 20, sz * n * d)
        for r, c in enumerate(ids):
            for j in range(d if c < k else 0):
                v = rows[c * d + j]
                e = v if ty == "f32" else S.f32_to_format(v, S.BF16 if ty == "bf16" else S.F16)
                g = int.from_bytes(out[(r * d + j) * sz:(r * d + j + 1) * sz], "little")
                assert g == e, f"lookup {ty}: out[{r}, {j}] = {g:#x}, want {e:#x}"
        print(f"lookup {ty} k={k} d={d} n={n}: values and status as expected")

    # (n, k, d, dtype, metric, seed, lattice, K splits wanted): one row tile and two, K split
    # across the grid, every depth, ties (lattice), subnormals (bf16 flushes them).
    cases = [(3, 5, 3, "f32", "l2", 1, False, 1), (6, 140, 2, "f32", "l2", 5, True, 2),
             (5, 130, 5, "f32", "cos", 2, False, 2), (3, 129, 4, "bf16", "cos", 6, True, 3)]
    if not quick:
        cases += [(130, 7, 16, "bf16", "l2", 3, False, 1), (4, 300, 9, "f16", "l2", 4, False, 3),
                  (2, 260, 17, "bf16", "cos", 7, False, 2), (129, 3, 1, "f16", "cos", 8, True, 1)]
    # tc: x padded (d % 8 != 0) or read in place (d = 40: chunks past d zero-filled; d = 72:
    # three stages), two row tiles, K splits, lattice ties.
    tc_cases = [(3, 9, 33, "f16", "cos", 10, True, 1), (140, 150, 40, "bf16", "l2", 13, True, 2)]
    if not quick:
        tc_cases += [(7, 130, 72, "f16", "cos", 14, False, 1)]
        tc_cases += [(20, 130, 5, "bf16", "l2", 9, False, 2), (130, 40, 16, "f16", "l2", 11, False, 1),
                     (5, 260, 20, "bf16", "cos", 12, False, 3)]
    for c in cases:
        search(*c)
    for c in tc_cases:
        search(*c, tc=True)
    # wgmma (sm_90a): two k-blocks (d = 72, the second mostly zero-filled), x padded (d = 67),
    # two row tiles and a partial one, K splits, lattice ties (also across the four tiles of
    # one block: both accumulator sets twice); full: four k-blocks (d = 256).
    wg_cases = [(70, 150, 72, "bf16", "l2", 15, True, 2), (3, 20, 67, "f16", "cos", 16, False, 1),
                (9, 400, 64, "f16", "l2", 20, True, 1)]
    if not quick:
        wg_cases += [(140, 130, 64, "f16", "l2", 17, False, 1), (5, 9, 256, "bf16", "cos", 18, False, 1)]
    for c in wg_cases:
        search(*c, tc=True, wg=True)
    # Copies landing at issue: a copy into a ring buffer that a wgmma still reads is caught
    # (three k-blocks per tile, so stages of one tile overlap in flight).
    deep = (20, 150, 200, "bf16", "l2", 19, False, 1)
    mode = S.CP_ASYNC_MODE[0]
    S.CP_ASYNC_MODE[0] = "issue"
    try:
        search(*deep, tc=True, wg=True)
        # The interpreter's wgmma checks can fail: each broken variant of the module must be
        # refused (a missing proxy fence or wgmma.fence, a ring buffer refilled while read).
        with open(os.path.join(ptxgen.HERE, "argmin_sm90.ptx"), encoding="utf-8") as f:
            text = f.read()
        for what, old, new in [
            ("no fence.proxy.async", "    fence.proxy.async.shared::cta;\n", ""),
            ("no wgmma.fence", "    wgmma.fence.sync.aligned;\n", ""),
            ("two stages left in flight", "wgmma.wait_group.sync.aligned 1;", "wgmma.wait_group.sync.aligned 2;"),
        ]:
            assert old in text, what
            try:
                search(*deep, tc=True, wg=True, modules=S.parse_module(text.replace(old, new)))
            except S.SimError as e:
                print(f"broken wgmma module ({what}) refused: {str(e)[-90:]}")
            else:
                raise AssertionError(f"the interpreter ran a broken wgmma module ({what})")
    finally:
        S.CP_ASYNC_MODE[0] = mode
    for ty in FLOATS:
        check(ty, 700, [])
        check(ty, 700, [650, 3, 699])
        lookup(ty, 5, 7, [0, 4, 5, 1, 0xFFFFFFFF, 3, 9] * 10)
    print("argmin emulation passed")
    return 0


def main():
    ap = ptxgen.parser(__doc__, check_help="fail if the committed PTX files are stale",
                       stdout_help="print one module's PTX instead of writing", stdout_choices=["argmin", "argmin_sm90"])
    ap.add_argument("--emulate", choices=["quick", "full"],
                    help="run the committed PTX on kernels/ptx_sim.py against a model of the contract")
    args = ap.parse_args()
    if args.emulate:
        return emulate(args.emulate == "quick")
    if args.list:
        for name, *_ in entries():
            print("argmin", name, PARAM_SIZE)
        for name, *_ in wgmma_entries():
            print("argmin_sm90", name, PARAM_SIZE)
        return 0
    return ptxgen.emit("gen_argmin.py", {"argmin": generate, "argmin_sm90": generate_sm90}, args)


if __name__ == "__main__":
    sys.exit(main())
