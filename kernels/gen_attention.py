#!/usr/bin/env python3
"""Generates kernels/attention.ptx: the fused attention forward entries (FlashAttention-2 style).

Python 3 standard library only. Usage:

    python3 kernels/gen_attention.py            # (re)write kernels/attention.ptx, attention_sm90.ptx
    python3 kernels/gen_attention.py --check    # exit 1 if a committed file is stale
    python3 kernels/gen_attention.py --list     # print "<entry> <param bytes>" per entry
    python3 kernels/gen_attention.py --stdout attention|attention_sm90   # print one module
    python3 kernels/gen_attention.py --emulate quick   # run it on kernels/ptx_sim.py (no GPU),
                                                       # strict: no read of unwritten shared memory

Entries (all take one parameter block, ATTN_FIELDS below, shared with src/cuda/attention.rs):

- `attention_{bf16,f16}_d{32,64,128}`: tensor cores. One CTA per (query tile of BM = 16*WARPS
  rows, head, batch); each warp owns 16 query rows whose Q fragments stay in registers (loaded
  once with ldmatrix). Key tiles of BN = 64 keys stream through shared memory: K and V have one
  buffer each and overlap as in FlashAttention-2 (V[t] loads while S = Q*K[t]^T computes, K[t+1]
  loads while O += P*V[t] computes), cp.async.cg 16-byte copies, tails zero-filled (src-size 0).
  Shared rows are 16-byte chunks XOR-swizzled by row (chunk ^ (row & 7); D = 32: ^ ((row >> 1) & 3))
  so that ldmatrix phases and cp.async stores hit 8 distinct bank groups. mma.sync m16n8k16
  (f32 accumulators) for S and for O; P is rounded to the input type in registers (the S
  accumulator layout is the A-operand layout of the next mma). Online softmax in f32 in the
  log2 domain: x = s * (scale * log2 e) + bias * log2 e, p = ex2.approx(x - m) (PTX: at most
  2 ulp relative error; ex2(-inf) = 0), row max by two quad shuffles, row sums kept per thread
  and reduced once at the end. O = acc / l rounded to the input type, lse = (m + lg2 l) * ln 2.
- `attention_f32`: CUDA cores, any D <= 256 (runtime). 4 warps x 4 query rows, key tiles of 16;
  Q in shared memory, K then V through one padded shared buffer; scores s * scale + bias in
  natural units, p = ex2.approx((x - m) * log2 e) as the cpu backend does (no systematic error
  from rounding scale * log2 e).

Masks (both kernels, same rule as vistok::attention): key j is visible to query i iff
lo <= j - i <= hi (the host folds none / causal / window into lo, hi, with the bottom-right
offset Nk - Nq) and, with segment ids, kseg[j] <= qseg[i]. Key tiles outside the band of the
CTA's rows are never visited; with segment ids, tiles whose smallest key id exceeds the CTA's
largest query id (host-computed per tile: `kmin`, `qmax`) are skipped. Tiles fully inside the
band without bias or segments take a path without per-element masking. A row with no visible
key (or only -inf biases) ends with l = 0: O = 0 and lse = -inf, never NaN.
"""

import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ptxgen  # noqa: E402

LOG2E = 0x3FB8AA3B  # f32 bits of log2(e)
LN2 = 0x3F317218  # f32 bits of ln(2)
NEG_INF = "0fFF800000"

# --------------------------------------------------------------------------------------------
# ABI: one parameter struct for every entry (#[repr(C)] AttentionParams in src/cuda/attention.rs).
# --------------------------------------------------------------------------------------------
ATTN_FIELDS = [
    ("q", "u64"),  # Q base (element 0)
    ("k", "u64"),
    ("v", "u64"),
    ("o", "u64"),  # O: same dims, dtype and strides as Q
    ("lse", "u64"),  # f32 [B, H, Nq] (flags bit 0)
    ("bias", "u64"),  # f32, element (b, h, i, j) at b*bias_sb + h*bias_sh + i*bias_si + 4j bytes
    ("qseg", "u64"),  # u32 [Nq] (flags bit 2)
    ("kseg", "u64"),  # u32 [Nk]
    ("qmax", "u64"),  # u32 per query tile of the entry's BM: max qseg
    ("kmin", "u64"),  # u32 per key tile of the entry's BN: min kseg
    ("q_sb", "u64"),  # byte strides of Q (and O): batch, head, token
    ("q_sh", "u64"),
    ("q_sn", "u64"),
    ("kv_sb", "u64"),  # byte strides of K and V
    ("kv_sh", "u64"),
    ("kv_sn", "u64"),
    ("bias_sb", "u64"),  # byte strides of the bias (0: broadcast)
    ("bias_sh", "u64"),
    ("bias_si", "u64"),
    ("nq", "u32"),
    ("nk", "u32"),
    ("d", "u32"),  # head dimension (the f32 entry; tensor entries have it built in)
    ("group", "u32"),  # H / Hkv
    ("lo", "s32"),  # visible iff lo <= j - i <= hi (clamped to [-Nq-1, Nk+1])
    ("hi", "s32"),
    ("scale", "f32"),  # the score scale
    ("scale_log2", "f32"),  # scale * log2(e)
    ("flags", "u32"),  # bit 0: write lse, bit 1: bias, bit 2: segment ids
    ("pad", "u32"),
]
SIZES = {"u64": 8, "u32": 4, "s32": 4, "f32": 4}
FLAG_LSE, FLAG_BIAS, FLAG_SEG = 1, 2, 4


OFF, SIZE = ptxgen.layout(ATTN_FIELDS, SIZES)

# Kernel traits: every compile-time choice of the tensor-core entries.
BN = 64  # keys per tile
TC_CONFIGS = [  # (dtype, D, warps)
    (t, d, w) for t in ("bf16", "f16") for (d, w) in ((32, 4), (64, 4), (128, 8))
]
F32_WARPS, F32_ROWS, F32_BN, F32_DMAX = 4, 4, 16, 256
F32_BM = F32_WARPS * F32_ROWS
F32_KSTRIDE = F32_DMAX + 1  # padded row of the K / V buffer (floats)

for _t, _d, _w in TC_CONFIGS:
    assert _d % 16 == 0 and _d // 8 in (4, 8, 16)
    assert 16 * _w <= 2 * BN  # the Q tile fits in the K + V buffers it aliases
    assert (32 * _w) % (_d // 8) == 0
    assert 2 * BN * _d * 2 <= 48 * 1024  # static shared memory


def entries():
    """(name, dtype, D, warps) in file order; D = 0 and warps = F32_WARPS for the f32 entry."""
    out = [(f"attention_{t}_d{d}", t, d, w) for t, d, w in TC_CONFIGS]
    out.append(("attention_f32", "f32", 0, F32_WARPS))
    return out


def f32imm(bits):
    return f"0f{bits:08X}"


class Kernel:
    """Collects virtual register declarations and instructions of one entry."""

    def __init__(self):
        self.decls = {}
        self.body = []
        self.labels = 0

    def r(self, ty, name):
        prev = self.decls.setdefault(name, ty)
        assert prev == ty, (name, prev, ty)
        return name

    def __call__(self, line):
        self.body.append("    " + line)

    def label(self, name):
        self.body.append(f"{name}:")

    def new_label(self, stem):
        self.labels += 1
        return f"{stem}_{self.labels}"

    def param(self, ty, field, name=None):
        name = name or f"%p_{field}"
        self.r(ty, name)
        self(f"ld.param.{ty} {name}, [p+{OFF[field]}];")
        return name

    def render(self, name, threads, shared):
        head = ptxgen.signature(name, SIZE, threads) + [".maxnreg 255", "{"]
        decl = []
        for reg, ty in sorted(self.decls.items()):
            decl.append(f"    .reg .{ty} {reg};")
        decl += shared
        return "\n".join(head + decl + self.body + ["}", ""])


# --------------------------------------------------------------------------------------------
# Pieces shared by both kernels.
# --------------------------------------------------------------------------------------------
def common_prologue(k, bm, bn):
    """Loads the parameters, derives the block's query tile, head, batch and base addresses,
    the key-tile range [t, t_end) of the band and the segment skip state."""
    for f in ("q", "k", "v", "o", "lse", "bias", "qseg", "kseg", "qmax", "kmin",
              "q_sb", "q_sh", "q_sn", "kv_sb", "kv_sh", "kv_sn", "bias_sb", "bias_sh", "bias_si"):
        k.param("u64", f)
    for f in ("nq", "nk", "d", "group", "flags"):
        k.param("u32", f)
    k.param("s32", "lo")
    k.param("s32", "hi")
    k.param("f32", "scale")
    k.param("f32", "scale_log2")
    k.r("u32", "%tx"); k.r("u32", "%lane"); k.r("u32", "%warp")
    k("mov.u32 %tx, %tid.x;")
    k("and.b32 %lane, %tx, 31;")
    k("shr.u32 %warp, %tx, 5;")
    k.r("u32", "%qt"); k.r("u32", "%h"); k.r("u32", "%b"); k.r("u32", "%nqt"); k.r("u32", "%hk"); k.r("u32", "%nh")
    # Heaviest query tiles (causal: the last) first.
    k("mov.u32 %nqt, %nctaid.x;")
    k("mov.u32 %qt, %ctaid.x;")
    k("sub.u32 %qt, %nqt, %qt;")
    k("sub.u32 %qt, %qt, 1;")
    k("mov.u32 %h, %ctaid.y;")
    k("mov.u32 %nh, %nctaid.y;")
    k("mov.u32 %b, %ctaid.z;")
    k("div.u32 %hk, %h, %p_group;")
    k.r("s32", "%i0")
    k(f"mul.lo.s32 %i0, %qt, {bm};")
    # Base addresses (bytes).
    k.r("u64", "%bw"); k.r("u64", "%hw"); k.r("u64", "%hkw"); k.r("u64", "%tmp64")
    k("cvt.u64.u32 %bw, %b;")
    k("cvt.u64.u32 %hw, %h;")
    k("cvt.u64.u32 %hkw, %hk;")
    for base, ptr, sb, sh, hh in (("%qbase", "%p_q", "%p_q_sb", "%p_q_sh", "%hw"),
                                  ("%obase", "%p_o", "%p_q_sb", "%p_q_sh", "%hw"),
                                  ("%kbase", "%p_k", "%p_kv_sb", "%p_kv_sh", "%hkw"),
                                  ("%vbase", "%p_v", "%p_kv_sb", "%p_kv_sh", "%hkw"),
                                  ("%bbase", "%p_bias", "%p_bias_sb", "%p_bias_sh", "%hw")):
        k.r("u64", base)
        k(f"mad.lo.u64 {base}, %bw, {sb}, {ptr};")
        k(f"mad.lo.u64 {base}, {hh}, {sh}, {base};")
    k.r("pred", "%has_seg"); k.r("pred", "%has_bias"); k.r("pred", "%has_lse"); k.r("u32", "%ftmp")
    for pred, bit in (("%has_lse", FLAG_LSE), ("%has_bias", FLAG_BIAS), ("%has_seg", FLAG_SEG)):
        k(f"and.b32 %ftmp, %p_flags, {bit};")
        k(f"setp.ne.u32 {pred}, %ftmp, 0;")
    # Band: keys [max(0, i0 + lo), min(nk, imax + hi + 1)).
    k.r("s32", "%imax"); k.r("s32", "%nqs"); k.r("s32", "%nks"); k.r("s32", "%jfirst"); k.r("s32", "%jend")
    k.r("s32", "%t"); k.r("s32", "%tend")
    k("mov.b32 %nqs, %p_nq;")
    k("mov.b32 %nks, %p_nk;")
    k(f"add.s32 %imax, %i0, {bm - 1};")
    k("sub.s32 %jfirst, %nqs, 1;")
    k("min.s32 %imax, %imax, %jfirst;")
    k("add.s32 %jfirst, %i0, %p_lo;")
    k("max.s32 %jfirst, %jfirst, 0;")
    k(f"div.s32 %t, %jfirst, {bn};")
    k("add.s32 %jend, %imax, %p_hi;")
    k("add.s32 %jend, %jend, 1;")
    k("min.s32 %jend, %jend, %nks;")
    k("max.s32 %jend, %jend, 0;")
    k(f"add.s32 %tend, %jend, {bn - 1};")
    k(f"div.s32 %tend, %tend, {bn};")
    # Segment skip state: the tile's largest query id.
    k.r("u32", "%qmaxv")
    k("mov.u32 %qmaxv, 0;")
    k("@%has_seg cvt.u64.u32 %tmp64, %qt;")
    k("@%has_seg mad.lo.u64 %tmp64, %tmp64, 4, %p_qmax;")
    k("@%has_seg ld.global.nc.u32 %qmaxv, [%tmp64];")


def seg_skip(k):
    """Advances %t past key tiles that no query of the block sees by segment ids."""
    top, done = k.new_label("SKIP"), k.new_label("SKIPPED")
    k.r("pred", "%pskip"); k.r("u32", "%kminv"); k.r("u64", "%skip64")
    k(f"@!%has_seg bra.uni {done};")
    k.label(top)
    k("setp.ge.s32 %pskip, %t, %tend;")
    k(f"@%pskip bra.uni {done};")
    k("cvt.u64.s32 %skip64, %t;")
    k("mad.lo.u64 %skip64, %skip64, 4, %p_kmin;")
    k("ld.global.nc.u32 %kminv, [%skip64];")
    k("setp.le.u32 %pskip, %kminv, %qmaxv;")
    k(f"@%pskip bra.uni {done};")
    k("add.s32 %t, %t, 1;")
    k(f"bra.uni {top};")
    k.label(done)


def next_tile(k, bn):
    """%t advances to the next key tile (past segment-skipped ones); %pmore says whether there
    is one, and then %jn is its first key; without one the code branches to the returned
    label, which the caller places after its copy of that tile."""
    k("add.s32 %t, %t, 1;")
    seg_skip(k)
    k.r("pred", "%pmore")
    k("setp.lt.s32 %pmore, %t, %tend;")
    nok = k.new_label("NOK")
    k(f"@!%pmore bra.uni {nok};")
    k.r("s32", "%jn")
    k(f"mul.lo.s32 %jn, %t, {bn};")
    return nok


def row_state(k, rows, row_index):
    """Per owned row: clamped index, its bias row address and its segment id."""
    for r in range(rows):
        i, ic = f"%i_{r}", f"%ic_{r}"
        k.r("s32", i); k.r("s32", ic)
        row_index(i, r)
        k(f"sub.s32 {ic}, %nqs, 1;")
        k(f"min.s32 {ic}, {i}, {ic};")
        k.r("u64", f"%brow_{r}"); k.r("u32", f"%qs_{r}")
        k(f"cvt.u64.s32 %tmp64, {ic};")
        k(f"mad.lo.u64 %brow_{r}, %tmp64, %p_bias_si, %bbase;")
        k(f"mov.u32 %qs_{r}, -1;")
        k(f"@%has_seg mad.lo.u64 %tmp64, %tmp64, 4, %p_qseg;")
        k(f"@%has_seg ld.global.nc.u32 %qs_{r}, [%tmp64];")


def masked_logit(k, s, x, j, r, natural):
    """x = visible(i_r, j) ? logit(s) : -inf, with the per-key segment id in %ks_j loaded."""
    k.r("pred", "%pv"); k.r("s32", "%dd"); k.r("f32", "%bv")
    k(f"sub.s32 %dd, {j}, %i_{r};")
    k("setp.ge.s32 %pv, %dd, %p_lo;")
    k("setp.le.and.s32 %pv, %dd, %p_hi, %pv;")
    k(f"setp.lt.and.s32 %pv, {j}, %nks, %pv;")
    k(f"setp.le.and.u32 %pv, %ks, %qs_{r}, %pv;")
    k("mov.f32 %bv, 0f00000000;")
    k.r("u64", "%baddr"); k.r("pred", "%pb")
    k("and.pred %pb, %pv, %has_bias;")
    k(f"cvt.u64.s32 %tmp64, {j};")
    k(f"mad.lo.u64 %baddr, %tmp64, 4, %brow_{r};")
    k("@%pb ld.global.nc.f32 %bv, [%baddr];")
    if natural:
        k(f"fma.rn.f32 {x}, {s}, %p_scale, %bv;")
    else:
        k(f"mul.f32 %bv, %bv, {f32imm(LOG2E)};")
        k(f"fma.rn.f32 {x}, {s}, %p_scale_log2, %bv;")
    k(f"selp.f32 {x}, {x}, {NEG_INF}, %pv;")


def key_segment(k, j):
    """%ks = kseg[min(j, nk - 1)] with segment ids, else 0 (then every key passes)."""
    k.r("u32", "%ks"); k.r("s32", "%jc")
    k("mov.u32 %ks, 0;")
    k("sub.s32 %jc, %nks, 1;")
    k(f"min.s32 %jc, {j}, %jc;")
    k("@%has_seg cvt.u64.s32 %tmp64, %jc;")
    k("@%has_seg mad.lo.u64 %tmp64, %tmp64, 4, %p_kseg;")
    k("@%has_seg ld.global.nc.u32 %ks, [%tmp64];")


# --------------------------------------------------------------------------------------------
# Tile steps shared by the tensor-core kernels (mma.sync and wgmma): S[n][e] holds row g + 8 (e >> 1)
# and key column 8 n + 2 t4 + (e & 1) of the tile (the m16n8 accumulator layout, which wgmma's
# m64nN layout repeats per warp); O[n][e] the same for head dimensions.
# --------------------------------------------------------------------------------------------
def warp_rows_setup(k, DB):
    """The two rows a thread owns, i0 + 16 warp + g (+ 8) (row_state: clamped index, bias row,
    segment id), the running max %m_r = -inf and sum %l_r = 0, and the O accumulators
    %o{n}_{e} (DB n-blocks of 8 head dimensions) zeroed; returns O."""
    def row_index(i, r):
        k(f"mad.lo.s32 {i}, %warp, 16, %i0;")
        k(f"add.s32 {i}, {i}, %g;")
        if r:
            k(f"add.s32 {i}, {i}, 8;")

    row_state(k, 2, row_index)
    for r in range(2):
        k.r("f32", f"%m_{r}"); k.r("f32", f"%l_{r}")
        k(f"mov.f32 %m_{r}, {NEG_INF};")
        k(f"mov.f32 %l_{r}, 0f00000000;")
    O = [[k.r("f32", f"%o{n}_{e}") for e in range(4)] for n in range(DB)]
    for n in range(DB):
        for e in range(4):
            k(f"mov.f32 {O[n][e]}, 0f00000000;")
    return O


def tile_logits(k, S, BN):
    """S (raw dot products of key tile %j0) -> logits in the log2 domain, masked to -inf:
    a fast path when the tile lies inside the band, inside Nk, without bias or segments."""
    NB = len(S)
    k.r("pred", "%pfast"); k.r("s32", "%jt")
    k("sub.s32 %jt, %j0, %imax;")
    k("setp.ge.s32 %pfast, %jt, %p_lo;")
    k(f"add.s32 %jt, %j0, {BN - 1};")
    k("sub.s32 %jt, %jt, %i0;")
    k("setp.le.and.s32 %pfast, %jt, %p_hi, %pfast;")
    k(f"add.s32 %jt, %j0, {BN};")
    k("setp.le.and.s32 %pfast, %jt, %nks, %pfast;")
    k.r("pred", "%pany")
    k("or.pred %pany, %has_bias, %has_seg;")
    k("and.pred %pfast, %pfast, !%pany;")
    slow, joined = k.new_label("SLOW"), k.new_label("LOGITS")
    k(f"@!%pfast bra.uni {slow};")
    for n in range(NB):
        for e in range(4):
            k(f"mul.f32 {S[n][e]}, {S[n][e]}, %p_scale_log2;")
    k(f"bra.uni {joined};")
    k.label(slow)
    k.r("s32", "%jb"); k.r("s32", "%j")
    k("shl.b32 %jb, %t4, 1;")
    k("add.s32 %jb, %jb, %j0;")
    for n in range(NB):
        for c in range(2):
            k(f"add.s32 %j, %jb, {n * 8 + c};")
            key_segment(k, "%j")
            for r in range(2):
                masked_logit(k, S[n][2 * r + c], S[n][2 * r + c], "%j", r, natural=False)
    k.label(joined)


def online_softmax(k, S, O):
    """Rows r = 0 (g) and 1 (g + 8): the running max %m_r and sum %l_r absorb the tile; S
    becomes p = 2^(x - m); O is rescaled by 2^(m_old - m)."""
    NB, DB = len(S), len(O)
    # Online softmax, rows g (r = 0) and g + 8 (r = 1).
    k.r("f32", "%mx"); k.r("f32", "%sh"); k.r("f32", "%muse"); k.r("f32", "%alpha"); k.r("pred", "%pinf"); k.r("f32", "%rs")
    for r in range(2):
        vals = [S[n][2 * r + c] for n in range(NB) for c in range(2)]
        k(f"max.f32 %mx, {vals[0]}, {vals[1]};")
        for v in vals[2:]:
            k(f"max.f32 %mx, %mx, {v};")
        for sh in (1, 2):
            k(f"shfl.sync.bfly.b32 %sh, %mx, {sh}, 31, -1;")
            k("max.f32 %mx, %mx, %sh;")
        k(f"max.f32 %mx, %mx, %m_{r};")
        k(f"setp.eq.f32 %pinf, %mx, {NEG_INF};")
        k("selp.f32 %muse, 0f00000000, %mx, %pinf;")
        k(f"sub.f32 %alpha, %m_{r}, %muse;")
        k("ex2.approx.ftz.f32 %alpha, %alpha;")
        k(f"mov.f32 %m_{r}, %mx;")
        k("mov.f32 %rs, 0f00000000;")
        for v in vals:
            k(f"sub.f32 {v}, {v}, %muse;")
            k(f"ex2.approx.ftz.f32 {v}, {v};")
            k(f"add.f32 %rs, %rs, {v};")
        k(f"fma.rn.f32 %l_{r}, %l_{r}, %alpha, %rs;")
        for n in range(DB):
            for c in range(2):
                k(f"mul.f32 {O[n][2 * r + c]}, {O[n][2 * r + c]}, %alpha;")


def pack_p(k, S, pack):
    """P in the input type, pairs (e, e + 1) of S per register: the A fragments of P*V."""
    NB = len(S)
    P = [[k.r("b32", f"%pk{n}_{r}") for r in range(2)] for n in range(NB)]
    for n in range(NB):
        for r in range(2):
            k(f"{pack} {P[n][r]}, {S[n][2 * r + 1]}, {S[n][2 * r]};")
    return P


def epilogue(k, O, pack):
    """Label-free end of a tensor-core entry: the quad sums %l_r, O / l rounded to the input
    type and stored (rows < Nq), the log-sum-exp (with FLAG_LSE) by the quad's first lane."""
    DB = len(O)
    k.r("f32", "%inv"); k.r("pred", "%plz"); k.r("pred", "%prow"); k.r("u64", "%oaddr"); k.r("b32", "%ov")
    k.r("u32", "%dcol"); k.r("u64", "%dcol64"); k.r("f32", "%lse"); k.r("u64", "%laddr"); k.r("pred", "%pl")
    k.r("u32", "%li")
    k("shl.b32 %dcol, %t4, 2;")
    k("cvt.u64.u32 %dcol64, %dcol;")
    for r in range(2):
        for sh in (1, 2):
            k(f"shfl.sync.bfly.b32 %sh, %l_{r}, {sh}, 31, -1;")
            k(f"add.f32 %l_{r}, %l_{r}, %sh;")
        k(f"setp.gt.f32 %plz, %l_{r}, 0f00000000;")
        k(f"rcp.rn.f32 %inv, %l_{r};")
        k("selp.f32 %inv, %inv, 0f00000000, %plz;")
        k(f"setp.lt.s32 %prow, %i_{r}, %nqs;")
        k(f"cvt.u64.s32 %tmp64, %i_{r};")
        k("mad.lo.u64 %oaddr, %tmp64, %p_q_sn, %obase;")
        k("add.u64 %oaddr, %oaddr, %dcol64;")
        for n in range(DB):
            a, b2 = O[n][2 * r], O[n][2 * r + 1]
            k(f"mul.f32 {a}, {a}, %inv;")
            k(f"mul.f32 {b2}, {b2}, %inv;")
            k(f"selp.f32 {a}, {a}, 0f00000000, %plz;")
            k(f"selp.f32 {b2}, {b2}, 0f00000000, %plz;")
            k(f"{pack} %ov, {b2}, {a};")
            k(f"@%prow st.global.b32 [%oaddr+{n * 16}], %ov;")
        # lse = (m + lg2 l) * ln 2, -inf for an empty row; one lane of the quad writes it.
        k(f"lg2.approx.f32 %lse, %l_{r};")
        k(f"add.f32 %lse, %lse, %m_{r};")
        k(f"mul.f32 %lse, %lse, {f32imm(LN2)};")
        k(f"selp.f32 %lse, %lse, {NEG_INF}, %plz;")
        k("setp.eq.u32 %pl, %t4, 0;")
        k("and.pred %pl, %pl, %prow;")
        k("and.pred %pl, %pl, %has_lse;")
        k("mad.lo.u32 %li, %b, %nh, %h;")
        k("cvt.u64.u32 %laddr, %li;")
        k("cvt.u64.u32 %tmp64, %p_nq;")
        k("mul.lo.u64 %laddr, %laddr, %tmp64;")
        k(f"cvt.u64.s32 %tmp64, %i_{r};")
        k("add.u64 %laddr, %laddr, %tmp64;")
        k("mad.lo.u64 %laddr, %laddr, 4, %p_lse;")
        k("@%pl st.global.f32 [%laddr], %lse;")


# --------------------------------------------------------------------------------------------
# The tensor-core kernel.
# --------------------------------------------------------------------------------------------
def tc_kernel(name, ty, D, warps):
    k = Kernel()
    T = 32 * warps
    BM = 16 * warps
    C = D // 8  # 16-byte chunks per row
    ROWB = D * 2  # bytes per shared row
    R = T // C  # rows per copy pass
    KREG = 0  # K buffer offset
    VREG = BN * ROWB  # V buffer offset
    SMEM = 2 * BN * ROWB
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32"
    pack = f"cvt.rn.{ty}x2.f32"

    def swz(row_reg, out):
        """out = f(row) for the XOR swizzle."""
        if C >= 8:
            k(f"and.b32 {out}, {row_reg}, 7;")
        else:
            k(f"shr.u32 {out}, {row_reg}, 1;")
            k(f"and.b32 {out}, {out}, 3;")

    common_prologue(k, BM, BN)
    k.r("u32", "%g"); k.r("u32", "%t4")
    k("shr.u32 %g, %lane, 2;")
    k("and.b32 %t4, %lane, 3;")
    k.r("u32", "%sm")
    k("mov.u32 %sm, smem;")
    # Copy assignment: chunk cc of rows cr + i*R.
    k.r("u32", "%cc"); k.r("u32", "%cr"); k.r("u32", "%cdst"); k.r("u32", "%u")
    k(f"and.b32 %cc, %tx, {C - 1};")
    k(f"shr.u32 %cr, %tx, {C.bit_length() - 1};")
    swz("%cr", "%u")
    k("xor.b32 %u, %u, %cc;")
    k("shl.b32 %u, %u, 4;")
    k(f"mad.lo.u32 %cdst, %cr, {ROWB}, %u;")
    k("add.u32 %cdst, %cdst, %sm;")
    k.r("u64", "%ccol"); k.r("u64", "%rstep_q"); k.r("u64", "%rstep_kv")
    k("cvt.u64.u32 %ccol, %cc;")
    k("shl.b64 %ccol, %ccol, 4;")
    k(f"mul.lo.u64 %rstep_q, %p_q_sn, {R};")
    k(f"mul.lo.u64 %rstep_kv, %p_kv_sn, {R};")

    def copy_tile(base, first_row, n, rows, rstep, sn, dst_off, tag):
        """cp.async rows [first_row, first_row + rows) of a [n, D] matrix into the buffer at
        dst_off, zero-filling rows >= n (their source address is clamped to row 0)."""
        k.r("s32", "%crow"); k.r("u64", "%csrc"); k.r("u64", "%crow64"); k.r("u32", "%csz"); k.r("pred", "%cok")
        k.r("u64", "%csrc0")
        k(f"add.s32 %crow, {first_row}, %cr;")
        k("cvt.u64.s32 %crow64, %crow;")
        k(f"mad.lo.u64 %csrc, %crow64, {sn}, {base};")
        k("add.u64 %csrc, %csrc, %ccol;")
        k(f"add.u64 %csrc0, {base}, %ccol;")
        for i in range(rows // R):
            k(f"setp.lt.s32 %cok, %crow, {n};")
            k("selp.u32 %csz, 16, 0, %cok;")
            k.r("u64", "%cs")
            k("selp.u64 %cs, %csrc, %csrc0, %cok;")
            k(f"cp.async.cg.shared.global [%cdst+{dst_off + i * R * ROWB}], [%cs], 16, %csz;")
            if i + 1 < rows // R:
                k(f"add.s32 %crow, %crow, {R};")
                k(f"add.u64 %csrc, %csrc, {rstep};")
        k("cp.async.commit_group;")

    # Per-lane ldmatrix addressing: row within a 16-row block and chunk XOR.
    # Q and V (trans): row = lane & 15, hi = lane >> 4; K: row = (lane & 7) + ((lane >> 4) << 3), hi = (lane >> 3) & 1.
    k.r("u32", "%lrA"); k.r("u32", "%xA"); k.r("u32", "%lrK"); k.r("u32", "%xK"); k.r("u32", "%hiA"); k.r("u32", "%hiK")
    k("and.b32 %lrA, %lane, 15;")
    k("shr.u32 %hiA, %lane, 4;")
    swz("%lrA", "%xA")
    k("xor.b32 %xA, %xA, %hiA;")
    k("shl.b32 %xA, %xA, 4;")
    k("and.b32 %lrK, %lane, 7;")
    k("shl.b32 %hiK, %hiA, 3;")
    k("or.b32 %lrK, %lrK, %hiK;")
    k("shr.u32 %hiK, %lane, 3;")
    k("and.b32 %hiK, %hiK, 1;")
    swz("%lrK", "%xK")
    k("xor.b32 %xK, %xK, %hiK;")
    k("shl.b32 %xK, %xK, 4;")
    k.r("u32", "%rowA"); k.r("u32", "%rowK"); k.r("u32", "%lq")
    k(f"mad.lo.u32 %rowA, %lrA, {ROWB}, %sm;")
    k(f"mad.lo.u32 %rowK, %lrK, {ROWB}, %sm;")

    # Q tile -> shared -> registers.
    copy_tile("%qbase", "%i0", "%nqs", BM, "%rstep_q", "%p_q_sn", 0, "q")
    k("cp.async.wait_group 0;")
    k("bar.sync 0;")
    k(f"mad.lo.u32 %lq, %warp, {16 * ROWB}, %rowA;")
    KK = D // 16
    for kk in range(KK):
        qa = [k.r("b32", f"%qa{kk}_{e}") for e in range(4)]
        k.r("u32", "%la")
        k(f"xor.b32 %la, %xA, {2 * kk * 16};")
        k("add.u32 %la, %la, %lq;")
        k(f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(qa)}}}, [%la];")
    k("bar.sync 0;")

    NB = BN // 8  # n-blocks of S
    DB = D // 8  # n-blocks of O
    O = warp_rows_setup(k, DB)

    seg_skip(k)
    k.r("pred", "%pdone")
    k("setp.ge.s32 %pdone, %t, %tend;")
    k("@%pdone bra.uni EPILOGUE;")
    k.r("s32", "%j0")
    k(f"mul.lo.s32 %j0, %t, {BN};")
    copy_tile("%kbase", "%j0", "%nks", BN, "%rstep_kv", "%p_kv_sn", KREG, "k")

    k.label("LOOP")
    k(f"mul.lo.s32 %j0, %t, {BN};")
    k("cp.async.wait_group 0;")
    k("bar.sync 0;")
    copy_tile("%vbase", "%j0", "%nks", BN, "%rstep_kv", "%p_kv_sn", VREG, "v")
    # S = Q K^T.
    S = [[k.r("f32", f"%s{n}_{e}") for e in range(4)] for n in range(NB)]
    for n in range(NB):
        for e in range(4):
            k(f"mov.f32 {S[n][e]}, 0f00000000;")
    for kk in range(KK):
        qa = [f"%qa{kk}_{e}" for e in range(4)]
        for npair in range(NB // 2):
            kb = [k.r("b32", f"%kb{e}") for e in range(4)]
            k.r("u32", "%la")
            k(f"xor.b32 %la, %xK, {2 * kk * 16};")
            k(f"add.u32 %la, %la, %rowK;")
            k(f"ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(kb)}}}, [%la+{KREG + npair * 16 * ROWB}];")
            for half in range(2):
                s = S[2 * npair + half]
                k(f"{mma} {{{', '.join(s)}}}, {{{', '.join(qa)}}}, {{{kb[2 * half]}, {kb[2 * half + 1]}}}, {{{', '.join(s)}}};")
    tile_logits(k, S, BN)
    online_softmax(k, S, O)
    P = pack_p(k, S, pack)
    k("cp.async.wait_group 0;")
    k("bar.sync 0;")
    # Next tile's K, overlapping P*V.
    nok = next_tile(k, BN)
    copy_tile("%kbase", "%jn", "%nks", BN, "%rstep_kv", "%p_kv_sn", KREG, "k")
    k.label(nok)
    # O += P V.
    for kk in range(BN // 16):
        pa = [P[2 * kk][0], P[2 * kk][1], P[2 * kk + 1][0], P[2 * kk + 1][1]]
        for dpair in range(D // 16):
            vb = [k.r("b32", f"%vb{e}") for e in range(4)]
            k.r("u32", "%la")
            k(f"xor.b32 %la, %xA, {2 * dpair * 16};")
            k("add.u32 %la, %la, %rowA;")
            k(f"ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{', '.join(vb)}}}, [%la+{VREG + kk * 16 * ROWB}];")
            for half in range(2):
                o = O[2 * dpair + half]
                k(f"{mma} {{{', '.join(o)}}}, {{{', '.join(pa)}}}, {{{vb[2 * half]}, {vb[2 * half + 1]}}}, {{{', '.join(o)}}};")
    k("@%pmore bra.uni LOOP;")

    k.label("EPILOGUE")
    epilogue(k, O, pack)
    k("ret;")
    return k.render(name, T, [f"    .shared .align 128 .b8 smem[{SMEM}];"])


# --------------------------------------------------------------------------------------------
# The f32 kernel (CUDA cores, runtime D <= 256).
# --------------------------------------------------------------------------------------------
def f32_kernel(name):
    k = Kernel()
    W, RW, BK = F32_WARPS, F32_ROWS, F32_BN
    T = 32 * W
    KS = F32_KSTRIDE
    NC = F32_DMAX // 32
    common_prologue(k, F32_BM, BK)
    k.r("u32", "%qs"); k.r("u32", "%kvs"); k.r("u32", "%pss")
    k("mov.u32 %qs, qsm;")
    k("mov.u32 %kvs, kvsm;")
    k("mov.u32 %pss, psm;")
    # Loader role: row tid >> 3, columns (tid & 7) + 8 c.
    k.r("u32", "%lr"); k.r("u32", "%lc"); k.r("pred", "%pc"); k.r("u32", "%cidx"); k.r("f32", "%val")
    k.r("u64", "%src"); k.r("s32", "%grow"); k.r("pred", "%pr"); k.r("u32", "%saddr")
    k("shr.u32 %lr, %tx, 3;")
    k("and.b32 %lc, %tx, 7;")

    def load_rows(base, first, n, sn, smem, stride):
        """smem[lr*stride + c] = row (first + lr) of a [n, D] f32 matrix (0 past n), c < D."""
        top, done = k.new_label("LD"), k.new_label("LDDONE")
        k(f"add.s32 %grow, {first}, %lr;")
        k(f"setp.lt.s32 %pr, %grow, {n};")
        k("cvt.u64.s32 %tmp64, %grow;")
        k(f"mad.lo.u64 %src, %tmp64, {sn}, {base};")
        k("mov.u32 %cidx, %lc;")
        k.label(top)
        k("setp.lt.u32 %pc, %cidx, %p_d;")
        k(f"@!%pc bra {done};")
        k("mov.f32 %val, 0f00000000;")
        k("mul.wide.u32 %tmp64, %cidx, 4;")
        k("add.u64 %tmp64, %tmp64, %src;")
        k("@%pr ld.global.f32 %val, [%tmp64];")
        k(f"mad.lo.u32 %saddr, %lr, {stride}, %cidx;")
        k(f"shl.b32 %saddr, %saddr, 2;")
        k(f"add.u32 %saddr, %saddr, {smem};")
        k("st.shared.f32 [%saddr], %val;")
        k("add.u32 %cidx, %cidx, 8;")
        k(f"bra {top};")
        k.label(done)

    load_rows("%qbase", "%i0", "%nqs", "%p_q_sn", "%qs", F32_DMAX)
    # QK role: key jj = lane & 15, rows 2*rp and 2*rp + 1 of the warp's four, rp = lane >> 4.
    k.r("u32", "%jj"); k.r("u32", "%rp")
    k("and.b32 %jj, %lane, 15;")
    k("shr.u32 %rp, %lane, 4;")

    def row_index(i, r):
        k(f"mad.lo.s32 {i}, %warp, {RW}, %i0;")
        k(f"mad.lo.s32 {i}, %rp, 2, {i};")
        if r:
            k(f"add.s32 {i}, {i}, 1;")

    row_state(k, 2, row_index)
    for r in range(RW):
        k.r("f32", f"%m_{r}"); k.r("f32", f"%l_{r}")
        k(f"mov.f32 %m_{r}, {NEG_INF};")
        k(f"mov.f32 %l_{r}, 0f00000000;")
    O = [[k.r("f32", f"%o{r}_{c}") for c in range(NC)] for r in range(RW)]
    for r in range(RW):
        for c in range(NC):
            k(f"mov.f32 {O[r][c]}, 0f00000000;")
    seg_skip(k)
    k.r("pred", "%pdone")
    k("setp.ge.s32 %pdone, %t, %tend;")
    k("@%pdone bra.uni EPILOGUE;")
    # Addresses of this lane's Q rows and K row in shared memory.
    k.r("u32", "%qa0"); k.r("u32", "%ka")
    k(f"mul.lo.u32 %qa0, %warp, {RW};")
    k("mad.lo.u32 %qa0, %rp, 2, %qa0;")
    k(f"mul.lo.u32 %qa0, %qa0, {F32_DMAX * 4};")
    k("add.u32 %qa0, %qa0, %qs;")
    k(f"mad.lo.u32 %ka, %jj, {KS * 4}, %kvs;")
    k.r("s32", "%dl")
    k("sub.s32 %dl, %p_d, %lane;")  # D - lane: V·P column clamp below
    k.r("s32", "%j0"); k.r("s32", "%j")
    k.label("LOOP")
    k(f"mul.lo.s32 %j0, %t, {BK};")
    k("bar.sync 0;")
    load_rows("%kbase", "%j0", "%nks", "%p_kv_sn", "%kvs", KS)
    k("bar.sync 0;")
    # s_r = q_r . k_jj over d (runtime loop).
    k.r("f32", "%s_0"); k.r("f32", "%s_1"); k.r("f32", "%kv"); k.r("f32", "%q0"); k.r("f32", "%q1")
    k.r("u32", "%dd4"); k.r("u32", "%dend"); k.r("pred", "%pd")
    k("mov.f32 %s_0, 0f00000000;")
    k("mov.f32 %s_1, 0f00000000;")
    k("mov.u32 %dd4, 0;")
    k("shl.b32 %dend, %p_d, 2;")
    k.label("QK")
    k.r("u32", "%a1")
    k("add.u32 %a1, %ka, %dd4;")
    k("ld.shared.f32 %kv, [%a1];")
    k("add.u32 %a1, %qa0, %dd4;")
    k("ld.shared.f32 %q0, [%a1];")
    k(f"ld.shared.f32 %q1, [%a1+{F32_DMAX * 4}];")
    k("fma.rn.f32 %s_0, %q0, %kv, %s_0;")
    k("fma.rn.f32 %s_1, %q1, %kv, %s_1;")
    k("add.u32 %dd4, %dd4, 4;")
    k("setp.lt.u32 %pd, %dd4, %dend;")
    k("@%pd bra.uni QK;")
    k("add.s32 %j, %j0, %jj;")
    key_segment(k, "%j")
    for r in range(2):
        masked_logit(k, f"%s_{r}", f"%s_{r}", "%j", r, natural=True)
    # Softmax: row maxima over the 16 lanes of a half warp, exchanged between halves.
    k.r("f32", "%mx"); k.r("f32", "%sh"); k.r("f32", "%muse"); k.r("pred", "%pinf"); k.r("pred", "%plow")
    k("setp.lt.u32 %plow, %lane, 16;")
    tm = [k.r("f32", f"%tm_{r}") for r in range(2)]
    for r in range(2):
        k(f"mov.f32 {tm[r]}, %s_{r};")
        for sh in (1, 2, 4, 8):
            k(f"shfl.sync.bfly.b32 %sh, {tm[r]}, {sh}, 31, -1;")
            k(f"max.f32 {tm[r]}, {tm[r]}, %sh;")
    # Rows 0, 1 from the low half, 2, 3 from the high half: every lane gets all four.
    rowmax = [k.r("f32", f"%rm_{r}") for r in range(RW)]
    for r in range(2):
        k(f"shfl.sync.bfly.b32 %sh, {tm[r]}, 16, 31, -1;")
        k(f"selp.f32 {rowmax[r]}, {tm[r]}, %sh, %plow;")
        k(f"selp.f32 {rowmax[r + 2]}, %sh, {tm[r]}, %plow;")
    alpha = [k.r("f32", f"%al_{r}") for r in range(RW)]
    muse = [k.r("f32", f"%mu_{r}") for r in range(RW)]
    for r in range(RW):
        k(f"max.f32 {rowmax[r]}, {rowmax[r]}, %m_{r};")
        k(f"setp.eq.f32 %pinf, {rowmax[r]}, {NEG_INF};")
        k(f"selp.f32 {muse[r]}, 0f00000000, {rowmax[r]}, %pinf;")
        k(f"sub.f32 {alpha[r]}, %m_{r}, {muse[r]};")
        k(f"mul.f32 {alpha[r]}, {alpha[r]}, {f32imm(LOG2E)};")
        k(f"ex2.approx.f32 {alpha[r]}, {alpha[r]};")
        k(f"mov.f32 %m_{r}, {rowmax[r]};")
    # p for the lane's two rows (row 2rp + r uses muse of that row).
    k.r("f32", "%mown")
    for r in range(2):
        k(f"selp.f32 %mown, {muse[r]}, {muse[r + 2]}, %plow;")
        k(f"sub.f32 %s_{r}, %s_{r}, %mown;")
        k(f"mul.f32 %s_{r}, %s_{r}, {f32imm(LOG2E)};")
        k(f"ex2.approx.f32 %s_{r}, %s_{r};")
    # Row sums, then l = l * alpha + sum for all four rows.
    for r in range(2):
        k(f"mov.f32 {tm[r]}, %s_{r};")
        for sh in (1, 2, 4, 8):
            k(f"shfl.sync.bfly.b32 %sh, {tm[r]}, {sh}, 31, -1;")
            k(f"add.f32 {tm[r]}, {tm[r]}, %sh;")
    for r in range(2):
        k(f"shfl.sync.bfly.b32 %sh, {tm[r]}, 16, 31, -1;")
        k(f"selp.f32 {rowmax[r]}, {tm[r]}, %sh, %plow;")
        k(f"selp.f32 {rowmax[r + 2]}, %sh, {tm[r]}, %plow;")
    for r in range(RW):
        k(f"fma.rn.f32 %l_{r}, %l_{r}, {alpha[r]}, {rowmax[r]};")
    # P to shared: psm[warp][row][key].
    k.r("u32", "%pa")
    k(f"mad.lo.u32 %pa, %warp, {RW * BK}, %jj;")
    k(f"mad.lo.u32 %pa, %rp, {2 * BK}, %pa;")
    k("shl.b32 %pa, %pa, 2;")
    k("add.u32 %pa, %pa, %pss;")
    k("st.shared.f32 [%pa], %s_0;")
    k(f"st.shared.f32 [%pa+{BK * 4}], %s_1;")
    k("bar.sync 0;")
    load_rows("%vbase", "%j0", "%nks", "%p_kv_sn", "%kvs", KS)
    k("bar.sync 0;")
    # O[r][c] = alpha_r O[r][c] + sum_j p[r][j] V[j][lane + 32 c].
    for r in range(RW):
        for c in range(NC):
            k(f"mul.f32 {O[r][c]}, {O[r][c]}, {alpha[r]};")
    k.r("u32", "%pw"); k.r("u32", "%va"); k.r("f32", "%vv")
    k(f"mad.lo.u32 %pw, %warp, {RW * BK * 4}, %pss;")
    k("shl.b32 %va, %lane, 2;")
    k("add.u32 %va, %va, %kvs;")
    pr = [[k.r("f32", f"%p{r}_{j}") for j in range(BK)] for r in range(RW)]
    for r in range(RW):
        for j in range(BK):
            k(f"ld.shared.f32 {pr[r][j]}, [%pw+{(r * BK + j) * 4}];")
    k.r("u32", "%c32"); k.r("s32", "%vo"); k.r("u32", "%vac")
    for c in range(NC):
        skip = k.new_label("PV")
        k(f"setp.le.u32 %pd, %p_d, {c * 32};")
        k(f"@%pd bra.uni {skip};")
        # The fill stores columns < D only: a lane past D reads column D - 1 instead (a
        # broadcast; its accumulators are never stored). Clamping the address, not predicating
        # the loads, keeps the 16 loads independent so they issue ahead of the fmas.
        k(f"add.s32 %vo, %dl, {-(c * 32 + 1)};")  # (D - 1) - (lane + 32 c)
        k("min.s32 %vo, %vo, 0;")
        k("mad.lo.s32 %vac, %vo, 4, %va;")
        for j in range(BK):
            k(f"ld.shared.f32 %vv, [%vac+{(j * KS + c * 32) * 4}];")
            for r in range(RW):
                k(f"fma.rn.f32 {O[r][c]}, {pr[r][j]}, %vv, {O[r][c]};")
        k.label(skip)
    k("add.s32 %t, %t, 1;")
    seg_skip(k)
    k.r("pred", "%pmore")
    k("setp.lt.s32 %pmore, %t, %tend;")
    k("@%pmore bra.uni LOOP;")

    k.label("EPILOGUE")
    # Every lane holds m, l of the warp's four rows: lane writes columns lane + 32 c.
    k.r("f32", "%inv"); k.r("pred", "%plz"); k.r("pred", "%prow"); k.r("u64", "%oaddr"); k.r("s32", "%ir")
    k.r("f32", "%lse"); k.r("u64", "%laddr"); k.r("pred", "%pl"); k.r("u32", "%li"); k.r("u32", "%col")
    for r in range(RW):
        k(f"mad.lo.s32 %ir, %warp, {RW}, %i0;")
        k(f"add.s32 %ir, %ir, {r};")
        k(f"setp.gt.f32 %plz, %l_{r}, 0f00000000;")
        k(f"rcp.rn.f32 %inv, %l_{r};")
        k("selp.f32 %inv, %inv, 0f00000000, %plz;")
        k("setp.lt.s32 %prow, %ir, %nqs;")
        k("cvt.u64.s32 %tmp64, %ir;")
        k("mad.lo.u64 %oaddr, %tmp64, %p_q_sn, %obase;")
        k("mul.wide.u32 %tmp64, %lane, 4;")
        k("add.u64 %oaddr, %oaddr, %tmp64;")
        for c in range(NC):
            k(f"mul.f32 {O[r][c]}, {O[r][c]}, %inv;")
            k(f"selp.f32 {O[r][c]}, {O[r][c]}, 0f00000000, %plz;")
            k(f"add.u32 %col, %lane, {c * 32};")
            k("setp.lt.u32 %pc, %col, %p_d;")
            k("and.pred %pc, %pc, %prow;")
            k(f"@%pc st.global.f32 [%oaddr+{c * 128}], {O[r][c]};")
        k(f"lg2.approx.f32 %lse, %l_{r};")
        k(f"fma.rn.f32 %lse, %lse, {f32imm(LN2)}, %m_{r};")
        k(f"selp.f32 %lse, %lse, {NEG_INF}, %plz;")
        k("setp.eq.u32 %pl, %lane, 0;")
        k("and.pred %pl, %pl, %prow;")
        k("and.pred %pl, %pl, %has_lse;")
        k("mad.lo.u32 %li, %b, %nh, %h;")
        k("cvt.u64.u32 %laddr, %li;")
        k("cvt.u64.u32 %tmp64, %p_nq;")
        k("mul.lo.u64 %laddr, %laddr, %tmp64;")
        k("cvt.u64.s32 %tmp64, %ir;")
        k("add.u64 %laddr, %laddr, %tmp64;")
        k("mad.lo.u64 %laddr, %laddr, 4, %p_lse;")
        k("@%pl st.global.f32 [%laddr], %lse;")
    k("ret;")
    shared = [
        f"    .shared .align 16 .b8 qsm[{F32_BM * F32_DMAX * 4}];",
        f"    .shared .align 16 .b8 kvsm[{BK * KS * 4}];",
        f"    .shared .align 16 .b8 psm[{W * RW * BK * 4}];",
    ]
    return k.render(name, T, shared)


# --------------------------------------------------------------------------------------------
# Module.
# --------------------------------------------------------------------------------------------
def abi_lines():
    lines = ptxgen.abi_params("attention", OFF, SIZE)
    lines.append(f"// abi flag lse {FLAG_LSE}")
    lines.append(f"// abi flag bias {FLAG_BIAS}")
    lines.append(f"// abi flag seg {FLAG_SEG}")
    lines.append(f"// abi bn {BN}")
    lines.append(f"// abi f32 bm {F32_BM}")
    lines.append(f"// abi f32 bn {F32_BN}")
    lines.append(f"// abi f32 dmax {F32_DMAX}")
    return lines


def generate():
    head = [
        "// and commit the result. Design: the generator's docstring.",
        "//",
        "// attention_{bf16,f16}_d{32,64,128}: mma.sync m16n8k16 FlashAttention-2 forward",
        "// attention_f32: CUDA-core forward, D <= 256",
        "// vistok: max-regs 255",
        "//",
    ] + abi_lines()
    parts = [ptxgen.module_header("gen_attention.py", head)]
    for name, ty, d, w in entries():
        parts.append(f32_kernel(name) if ty == "f32" else tc_kernel(name, ty, d, w))
    return "\n".join(parts)

# --------------------------------------------------------------------------------------------
# The Hopper kernel (sm_90a module attention_sm90.ptx): wgmma, FlashAttention-3's data layout.
# --------------------------------------------------------------------------------------------
WG_BM = 128  # query rows per CTA: two warpgroups of 64
WG_BN = 128  # keys per tile
WG_THREADS = 256
WG_HEAD_DIMS = (64, 128)
WG_BLOCK = 128 * 128  # bytes of one [128 rows][64 dims] 128-byte-swizzled block
WG_SLACK = 1024  # the dynamic base is aligned up to the 1024-byte swizzle atom
WG_MAX_REGS = 255


def wg_entries():
    """(name, dtype, D) of the sm_90a module, in file order."""
    return [(f"attention_wgmma_{t}_d{d}", t, d) for t in ("bf16", "f16") for d in WG_HEAD_DIMS]


def wg_shared_bytes(D):
    """Dynamic shared memory of an entry: the slack, Q, and two stages of K and V."""
    return WG_SLACK + (D // 64) * WG_BLOCK * 5


def wg_kernel(name, ty, D):
    """attention_wgmma_{ty}_d{D} (sm_90a): one CTA of 256 threads = two warpgroups per (query
    tile of WG_BM = 128 rows, head, batch); warpgroup w owns rows 64 w .. +64 (its warp q rows
    16 q .. +16, so each thread still owns rows g and g + 8 of its warp's 16 as in the mma.sync
    kernel, and the logits, softmax and epilogue code is shared with it).

    Shared memory (dynamic, base aligned up to 1024): Q, then two stages of K and V, each a
    [128 rows][D] tile stored as D / 64 blocks of [128 rows][64 dims] in CUTLASS's K-major
    128-byte-swizzle atom (row r at (r >> 3) * 1024 + (r & 7) * 128, its 16-byte chunk c at
    chunk c ^ (r & 7)); rows past Nq / Nk zero-filled by cp.async (src-size 0). The same bytes
    are, per 64-dim block, FlashAttention-3's MN-major SW128 layout of V for P*V.

    Per key tile (in the band, not skipped by segments): wait for its copy, fence.proxy.async,
    barrier; issue the next tile's copy into the other stage; S = Q K^T as D / 16 wgmma
    m64n128k16 (A = Q, B = K, both K-major descriptors, k16 step + 32 bytes, + 16 KB per
    64-dim block), commit, wait; logits and online softmax as the mma.sync kernel (S's m64n128
    layout is its m16n8 layout repeated per warp); P rounded to the input type in registers;
    O += P V as 8 wgmma m64nDk16 with A = P from registers (each k16 step's four registers are
    exactly S's accumulators 8 kk .. +8 packed in pairs) and B = V through an MN-major
    descriptor (imm-trans-b = 1, LBO 16 KB between 64-dim blocks, SBO 1024, k16 step + 2048
    bytes), commit, wait. The next tile's copy overlaps both products; the two warpgroups run
    independently between barriers."""
    k = Kernel()
    KB = D // 64
    KREG = KB * WG_BLOCK  # stage 0 K (Q is at 0)
    STAGE = 2 * KB * WG_BLOCK  # K then V
    VOFF = KB * WG_BLOCK  # V after K in a stage
    smma = f"wgmma.mma_async.sync.aligned.m64n128k16.f32.{ty}.{ty}"
    pvmma = f"wgmma.mma_async.sync.aligned.m64n{D}k16.f32.{ty}.{ty}"
    pack = f"cvt.rn.{ty}x2.f32"

    common_prologue(k, WG_BM, WG_BN)
    k.r("u32", "%g"); k.r("u32", "%t4"); k.r("u32", "%wg")
    k("shr.u32 %g, %lane, 2;")
    k("and.b32 %t4, %lane, 3;")
    k("shr.u32 %wg, %warp, 2;")
    k.r("u32", "%sm")
    k("mov.u32 %sm, dsmem;")
    k(f"add.u32 %sm, %sm, {WG_SLACK - 1};")
    k(f"and.b32 %sm, %sm, {-WG_SLACK & 0xFFFFFFFF};  // the 1024-aligned base: Q")
    # Copy slot: chunk cc = tid & 7 of rows r0 + 32 j (r0 = tid >> 3), stored in a block at
    # (r >> 3) * 1024 + (r & 7) * 128 + (cc ^ (r & 7)) * 16 = slot + 4096 j.
    k.r("u32", "%cc"); k.r("u32", "%r0"); k.r("u32", "%slot"); k.r("u32", "%u")
    k("and.b32 %cc, %tx, 7;")
    k("shr.u32 %r0, %tx, 3;")
    k("and.b32 %u, %r0, 7;")
    k("xor.b32 %slot, %u, %cc;")
    k("shl.b32 %slot, %slot, 4;")
    k("shl.b32 %u, %u, 7;")
    k("add.u32 %slot, %slot, %u;")
    k("shr.u32 %u, %r0, 3;")
    k("shl.b32 %u, %u, 10;")
    k("add.u32 %slot, %slot, %u;")
    k("add.u32 %slot, %slot, %sm;")
    k.r("u64", "%ccol")
    k("cvt.u64.u32 %ccol, %cc;")
    k("shl.b64 %ccol, %ccol, 4;")

    def copy_tile(first_row, n, sn, dst_off, mats):
        """cp.async rows [first_row, first_row + 128) of the [n, D] matrices at registers
        `mats` (same row stride sn) into consecutive tiles from dst_off (register or
        immediate added to %slot), zero-filling rows >= n; no commit."""
        k.r("s32", "%crow"); k.r("u64", "%crow64"); k.r("u32", "%csz"); k.r("pred", "%cok"); k.r("u64", "%cs")
        k.r("u64", "%coff"); k.r("u32", "%cdst")
        k(f"add.u32 %cdst, %slot, {dst_off};")
        for j in range(4):
            k(f"add.s32 %crow, {first_row}, %r0;")
            k(f"add.s32 %crow, %crow, {32 * j};")
            k(f"setp.lt.s32 %cok, %crow, {n};")
            k("selp.u32 %csz, 16, 0, %cok;")
            k("cvt.u64.s32 %crow64, %crow;")
            k(f"mul.lo.u64 %coff, %crow64, {sn};")
            k("add.u64 %coff, %coff, %ccol;")
            k("selp.u64 %coff, %coff, %ccol, %cok;")
            for m, mat in enumerate(mats):
                for h in range(KB):
                    k(f"add.u64 %cs, {mat}, %coff;")
                    dst = m * KB * WG_BLOCK + h * WG_BLOCK + 4096 * j
                    k(f"cp.async.cg.shared.global [%cdst+{dst}], [%cs+{128 * h}], 16, %csz;")

    # Q tile: one cp.async group.
    copy_tile("%i0", "%nqs", "%p_q_sn", 0, ["%qbase"])
    k("cp.async.commit_group;")

    NB, DB = WG_BN // 8, D // 8
    O = warp_rows_setup(k, DB)
    S = [[k.r("f32", f"%s{n}_{e}") for e in range(4)] for n in range(NB)]
    s_list = ", ".join(S[n][e] for n in range(NB) for e in range(4))
    o_list = ", ".join(O[n][e] for n in range(DB) for e in range(4))
    # Descriptors (PTX ISA matrix descriptor; bits 0-13 start >> 4, 16-29 LBO >> 4, 32-45 SBO
    # >> 4, 62-63 swizzle mode 1 = 128 bytes): Q rows 64 wg of block 0 (K-major), and the
    # stage-0 K (K-major) and V (MN-major: LBO = 16 KB between the 64-dim blocks).
    k.r("u32", "%da"); k.r("u64", "%descq"); k.r("u64", "%desck0"); k.r("u64", "%descv0")
    k("shl.b32 %da, %wg, 13;")
    k("add.u32 %da, %da, %sm;")
    for line in ptxgen.wg_descriptor("%descq", "%da", "%da"):
        k(line.strip())
    k(f"add.u32 %da, %sm, {KREG};")
    for line in ptxgen.wg_descriptor("%desck0", "%da", "%da"):
        k(line.strip())
    k(f"add.u32 %da, %sm, {KREG + VOFF};")
    for line in ptxgen.wg_descriptor("%descv0", "%da", "%da", lbo=WG_BLOCK):
        k(line.strip())
    k.r("u32", "%stg"); k.r("u64", "%desck"); k.r("u64", "%descv"); k.r("u64", "%dsa"); k.r("u64", "%dsb")
    k.r("u32", "%dst")
    k("mov.u32 %stg, 0;")

    seg_skip(k)
    k.r("pred", "%pdone")
    k("setp.ge.s32 %pdone, %t, %tend;")
    k("@%pdone bra.uni WG_EPILOGUE;")
    k.r("s32", "%j0"); k.r("u64", "%kt"); k.r("u64", "%vt"); k.r("u64", "%jw")
    k(f"mul.lo.s32 %j0, %t, {WG_BN};")

    def copy_kv(j0, stage_off):
        k("cvt.u64.s32 %jw, " + j0 + ";")
        k("mad.lo.u64 %kt, %jw, %p_kv_sn, %kbase;")
        k("mad.lo.u64 %vt, %jw, %p_kv_sn, %vbase;")
        k.r("s32", "%jz")
        k("mov.s32 %jz, 0;")
        k("sub.s32 %nrem, %nks, " + j0 + ";")
        copy_tile("%jz", "%nrem", "%p_kv_sn", stage_off, ["%kt", "%vt"])
        k("cp.async.commit_group;")

    k.r("s32", "%nrem")
    copy_kv("%j0", KREG)

    k.label("WG_LOOP")
    k(f"mul.lo.s32 %j0, %t, {WG_BN};")
    k("cp.async.wait_group 0;")
    k("fence.proxy.async.shared::cta;  // the cp.async writes become visible to wgmma")
    k("bar.sync 0;  // every warpgroup's wgmma of the previous tile has completed")
    # The current stage's descriptors, then the next tile's copy into the other stage.
    k(f"mul.lo.u32 %dst, %stg, {STAGE >> 4};")
    k("cvt.u64.u32 %dsa, %dst;")
    k("add.u64 %desck, %desck0, %dsa;")
    k("add.u64 %descv, %descv0, %dsa;")
    nok = next_tile(k, WG_BN)
    k.r("u32", "%ns")
    k("xor.b32 %ns, %stg, 1;")
    k(f"mad.lo.u32 %ns, %ns, {STAGE}, {KREG};")
    copy_kv("%jn", "%ns")
    k.label(nok)
    # S = Q K^T (straight-line: ptxas serializes wgmma chains broken by branches).
    k("wgmma.fence.sync.aligned;")
    for kk in range(D // 16):
        off = ((kk // 4) * WG_BLOCK + (kk % 4) * 32) >> 4
        k(f"add.u64 %dsa, %descq, {off};")
        k(f"add.u64 %dsb, %desck, {off};")
        k(f"{smma} {{{s_list}}}, %dsa, %dsb, {0 if kk == 0 else 1}, 1, 1, 0, 0;")
    k("wgmma.commit_group.sync.aligned;")
    k("wgmma.wait_group.sync.aligned 0;")
    tile_logits(k, S, WG_BN)
    online_softmax(k, S, O)
    P = pack_p(k, S, pack)
    # O += P V: A = P (registers), B = V (MN-major, trans-b = 1).
    k("wgmma.fence.sync.aligned;")
    for kk in range(WG_BN // 16):
        pa = [P[2 * kk][0], P[2 * kk][1], P[2 * kk + 1][0], P[2 * kk + 1][1]]
        k(f"add.u64 %dsb, %descv, {(2048 * kk) >> 4};")
        k(f"{pvmma} {{{o_list}}}, {{{', '.join(pa)}}}, %dsb, 1, 1, 1, 1;")
    k("wgmma.commit_group.sync.aligned;")
    k("wgmma.wait_group.sync.aligned 0;")
    k("xor.b32 %stg, %stg, 1;")
    k("@%pmore bra.uni WG_LOOP;")

    k.label("WG_EPILOGUE")
    k("cp.async.wait_group 0;  // a block with no key tile never waited for its Q copy")
    epilogue(k, O, pack)
    k("ret;")
    return k.render(name, WG_THREADS, [])


def generate_sm90():
    head = [
        "// and commit the result. Design: wg_kernel in kernels/gen_attention.py.",
        f"// vistok: max-regs {WG_MAX_REGS}",
        "//",
        "// attention_wgmma_{bf16,f16}_d{64,128}: FlashAttention forward with wgmma (sm_90a only;",
        "// the mma.sync and f32 entries are in attention.ptx)",
        "//",
        f"// abi wgmma bm {WG_BM}",
        f"// abi wgmma bn {WG_BN}",
        f"// abi wgmma threads {WG_THREADS}",
        f"// abi wgmma slack {WG_SLACK}",
    ] + abi_lines()
    parts = [ptxgen.sm90_module_header("gen_attention.py", head)]
    for name, ty, d in wg_entries():
        parts.append(wg_kernel(name, ty, d))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# --emulate: the committed PTX on kernels/ptx_sim.py (no GPU) against an f64 model of
# softmax(Q K^T scale + bias) V and its log-sum-exp. The host side (parameter block, grid, band)
# is modelled as src/cuda/attention.rs (`plan`, `band`) does it. Strict shared reads: a block that
# reads shared memory it has not written fails the run, even when the value would be discarded.
# --------------------------------------------------------------------------------------------
WG_MUTANT_CASE = ("attention_wgmma_bf16_d64", 64, 1, 1, 1, 37, 150, "none", None, "bhnd", "issue")
# causal, Nq > Nk: the first block's 128 rows see no key (its loop never runs)
WG_NO_TILE_CASE = ("attention_wgmma_bf16_d64", 64, 1, 1, 1, 200, 10, "causal", None, "bhnd", "wait")
EMU_CASES = [  # (entry, D, B, H, Hkv, Nq, Nk, mask, bias, layout, cp.async mode)
    ("attention_wgmma_bf16_d64", 64, 1, 1, 1, 37, 83, "none", None, "bhnd", "issue"),
    ("attention_wgmma_f16_d128", 128, 1, 2, 1, 40, 300, "causal", None, "bnhd", "issue"),
    ("attention_wgmma_bf16_d128", 128, 1, 1, 1, 150, 260, "seg", None, "bhnd", "wait"),
    ("attention_wgmma_f16_d64", 64, 1, 1, 1, 20, 140, "none", "masked_row", "bhnd", "issue"),
    ("attention_wgmma_bf16_d64", 64, 2, 1, 1, 130, 129, "causal", "full", "bhnd", "wait"),
    WG_NO_TILE_CASE,
    ("attention_bf16_d64", 64, 1, 1, 1, 37, 83, "none", None, "bhnd", "wait"),
    ("attention_f16_d32", 32, 1, 2, 1, 21, 70, "causal", None, "bnhd", "issue"),
    ("attention_bf16_d32", 32, 2, 1, 1, 19, 13, "causal", None, "bhnd", "wait"),
    ("attention_f16_d64", 64, 1, 1, 1, 18, 66, "none", "masked_row", "bhnd", "wait"),
    ("attention_bf16_d128", 128, 1, 1, 1, 20, 100, "none", "full", "bhnd", "wait"),
    ("attention_bf16_d64", 64, 1, 1, 1, 70, 150, "seg", None, "bnhd", "wait"),
    ("attention_f16_d32", 32, 1, 1, 1, 70, 100, "causal", None, "bhnd", "wait"),
    ("attention_f32", 24, 1, 2, 1, 21, 35, "causal", "full", "bnhd", "wait"),
    ("attention_f32", 40, 1, 1, 1, 9, 20, "none", None, "bhnd", "wait"),  # D past 32, not a multiple
]


def emulate(quick):
    import math
    import random
    import struct
    import time
    import ptx_sim as S

    mods = {}
    for module in ("attention", "attention_sm90"):
        with open(os.path.join(ptxgen.HERE, f"{module}.ptx"), encoding="utf-8") as f:
            mods.update(S.parse_module(f.read()))
    rng = random.Random(20261128)
    t_start = time.time()

    def one(entry, D, B, H, Hkv, Nq, Nk, mask, bias_kind, layout, mode, mods=mods):
        """Runs one case; True when O and the log-sum-exp are within tolerance."""
        t0 = time.time()
        wg = entry.startswith("attention_wgmma")
        ty = entry.split("_")[2 if wg else 1]
        fmt = {"bf16": S.BF16, "f16": S.F16, "f32": S.F32}[ty]
        es = 4 if ty == "f32" else 2

        def rnd(x, fmt=fmt):  # value and bits in the input type
            b = struct.unpack("<I", struct.pack("<f", x))[0]
            if fmt is S.F32:
                return S.f32_value(b), b
            h = S.f32_to_format(b, fmt)
            return S.f32_value(S.format_to_f32(h, fmt)), h

        def tensor(heads, n):  # values [b][h][i][d] and the packed bytes in `layout`
            vals = [[[[rnd(rng.gauss(0, 1)) for _ in range(D)] for _ in range(n)] for _ in range(heads)]
                    for _ in range(B)]
            raw = bytearray(B * heads * n * D * es)
            for b in range(B):
                for h in range(heads):
                    for i in range(n):
                        row = (b * heads + h) * n + i if layout == "bhnd" else (b * n + i) * heads + h
                        for d in range(D):
                            raw[(row * D + d) * es:(row * D + d + 1) * es] = vals[b][h][i][d][1].to_bytes(es, "little")
            strides = ((heads * n * D * es, n * D * es, D * es) if layout == "bhnd"
                       else (n * heads * D * es, D * es, heads * D * es))
            return [[[[x[0] for x in r] for r in hh] for hh in bb] for bb in vals], bytes(raw), strides

        qseg = [i * 3 // Nq for i in range(Nq)] if mask == "seg" else None
        kseg = [j * 4 // Nk for j in range(Nk)] if mask == "seg" else None
        Qv, Qraw, qs = tensor(H, Nq)
        Kv, Kraw, ks = tensor(Hkv, Nk)
        Vv, Vraw, _ = tensor(Hkv, Nk)
        off = Nk - Nq  # band() of src/cuda/attention.rs
        lo, hi = (-Nq - 1, min(off, Nk + 1)) if mask == "causal" else (-Nq - 1, Nk + 1)
        lo, hi = max(lo, -Nq - 1), max(hi, -Nq - 1)
        bias = None
        if bias_kind:  # f32 [B, H, Nq, Nk]
            bias = [[[[S.f32_value(S.f32_bits_of(struct.unpack("<f", struct.pack("<f", rng.uniform(-2, 2)))[0]))
                       for _ in range(Nk)] for _ in range(Nq)] for _ in range(H)] for _ in range(B)]
            if bias_kind == "masked_row":  # row 5: every key -inf; some -inf elsewhere
                for b in range(B):
                    for h in range(H):
                        bias[b][h][5] = [-math.inf] * Nk
                        for j in range(0, Nk, 7):
                            bias[b][h][1][j] = -math.inf
        scale = struct.unpack("<f", struct.pack("<f", 1 / math.sqrt(D)))[0]
        scale_log2 = struct.unpack("<f", struct.pack("<f", scale * math.log2(math.e)))[0]
        if wg:
            bm, bn, threads, dyn = WG_BM, WG_BN, WG_THREADS, wg_shared_bytes(D)
        else:
            bm = F32_BM if ty == "f32" else 16 * dict(((d, w) for t, d, w in TC_CONFIGS))[D]
            bn = F32_BN if ty == "f32" else BN
            threads = 32 * (F32_WARPS if ty == "f32" else dict(((d, w) for t, d, w in TC_CONFIGS))[D])
            dyn = 0
        addrs = {"q": 0x10000000, "k": 0x20000000, "v": 0x30000000, "o": 0x40000000, "lse": 0x50000000,
                 "bias": 0x60000000}
        mem = S.Memory()
        mem.add("q", addrs["q"], Qraw, False)
        mem.add("k", addrs["k"], Kraw, False)
        mem.add("v", addrs["v"], Vraw, False)
        mem.add("o", addrs["o"], bytes(len(Qraw)), True)
        mem.add("lse", addrs["lse"], bytes(B * H * Nq * 4), True)
        fields = dict(q=addrs["q"], k=addrs["k"], v=addrs["v"], o=addrs["o"], lse=addrs["lse"],
                      q_sb=qs[0], q_sh=qs[1], q_sn=qs[2], kv_sb=ks[0], kv_sh=ks[1], kv_sn=ks[2],
                      nq=Nq, nk=Nk, d=D, group=H // Hkv, lo=lo, hi=hi, scale=scale,
                      scale_log2=scale_log2, flags=FLAG_LSE)
        if qseg:  # plus tile_extremes() of src/cuda/attention.rs
            qmax = [max(qseg[t:t + bm]) for t in range(0, Nq, bm)]
            kmin = [min(kseg[t:t + bn]) for t in range(0, Nk, bn)]
            for n, a, vals in (("qseg", 0x70000000, qseg), ("kseg", 0x71000000, kseg),
                               ("qmax", 0x72000000, qmax), ("kmin", 0x73000000, kmin)):
                mem.add(n, a, struct.pack(f"<{len(vals)}I", *vals), False)
                fields[n] = a
            fields["flags"] |= FLAG_SEG
        if bias:
            braw = b"".join(struct.pack("<f", x) for bb in bias for hh in bb for r in hh for x in r)
            mem.add("bias", addrs["bias"], braw, False)
            fields.update(bias=addrs["bias"], bias_sb=H * Nq * Nk * 4, bias_sh=Nq * Nk * 4, bias_si=Nk * 4)
            fields["flags"] |= FLAG_BIAS
        pb = bytearray(SIZE)
        for name, t in ATTN_FIELDS:
            v = fields.get(name, 0)
            code = {"u64": "<Q", "u32": "<I", "s32": "<i", "f32": "<f"}[t]
            struct.pack_into(code, pb, OFF[name], v)
        S.CP_ASYNC_MODE[0] = mode
        stats = {"threads": 0, "instructions": 0}
        grid = [max(1, -(-Nq // bm)), H, B]
        S.run_kernel(mods[entry], grid, [threads, 1, 1], bytes(pb), mem, stats, strict_shared=True,
                     dynamic_shared=dyn)
        out = {n: (data, cnt) for _, data, _, cnt, n in mem.buffers}
        for n in ("o", "lse"):
            if not all(out[n][1]):
                raise S.SimError(f"{entry}: {n} not fully written")
        # f64 reference on the rounded inputs, and the naive same-dtype computation.
        err = naive_err = lse_err = 0.0

        def rd(x):
            return rnd(x)[0] if x == x and abs(x) != math.inf else x
        for b in range(B):
            for h in range(H):
                hk = h // (H // Hkv)
                for i in range(Nq):
                    s = []
                    for j in range(Nk):
                        vis = lo <= j - i <= hi and (not qseg or kseg[j] <= qseg[i])
                        x = sum(a * c for a, c in zip(Qv[b][h][i], Kv[b][hk][j])) * scale
                        x += bias[b][h][i][j] if bias else 0.0
                        s.append(x if vis else -math.inf)
                    m = max(s)
                    if m == -math.inf:
                        ref, rlse = [0.0] * D, -math.inf
                        naive = ref
                    else:
                        p = [math.exp(x - m) for x in s]
                        l_ = sum(p)
                        ref = [sum(p[j] * Vv[b][hk][j][d] for j in range(Nk)) / l_ for d in range(D)]
                        rlse = m + math.log(l_)
                        # naive in the input type: S, P and O rounded to it (FlashAttention's
                        # same-dtype baseline); f32: every step rounded to f32
                        sn = [rd(x) for x in s]
                        mn = max(sn)
                        pn = [math.exp(x - mn) for x in sn]
                        ln_ = sum(pn)
                        pn = [rd(x / ln_) for x in pn]
                        naive = [rd(sum(pn[j] * Vv[b][hk][j][d] for j in range(Nk))) for d in range(D)]
                    row = (b * H + h) * Nq + i if layout == "bhnd" else (b * Nq + i) * H + h
                    for d in range(D):
                        raw = int.from_bytes(out["o"][0][(row * D + d) * es:(row * D + d + 1) * es], "little")
                        got = S.f32_value(raw if es == 4 else S.format_to_f32(raw, fmt))
                        err = max(err, abs(got - ref[d]))
                        naive_err = max(naive_err, abs(naive[d] - ref[d]))
                        if m == -math.inf and raw != 0:
                            raise S.SimError(f"{entry}: fully masked row {i} has O != +0")
                    lraw = int.from_bytes(out["lse"][0][((b * H + h) * Nq + i) * 4:][:4], "little")
                    gl = S.f32_value(lraw)
                    if rlse == -math.inf:
                        if gl != -math.inf:
                            raise S.SimError(f"{entry}: fully masked row {i} has lse {gl}")
                    else:
                        lse_err = max(lse_err, abs(gl - rlse))
        # O: at most twice the naive same-dtype error, plus a small absolute term (f32 kernel:
        # ex2 of an f32-rounded argument, |x - m| * 2^-24 relative); LSE in f32 arithmetic.
        tol = 2 * naive_err + (1e-5 if ty == "f32" else 1e-4)
        ok = err <= tol and lse_err <= 1e-4
        print(f"{entry} D={D} B={B} H={H}/{Hkv} Nq={Nq} Nk={Nk} {mask} bias={bias_kind} {layout} "
              f"cp.async@{mode}: max|O-ref| {err:.3g} (naive {naive_err:.3g}, tol {tol:.3g}), "
              f"max|lse-ref| {lse_err:.3g}; {stats['instructions']} instr, {time.time() - t0:.1f}s "
              f"{'ok' if ok else 'FAIL'}")
        return ok

    for case in EMU_CASES:
        if not one(*case):
            return 1
    # The interpreter's wgmma checks can fail: each broken variant of the sm_90a module must be
    # refused, by the interpreter or by the comparison (cp.async landing at issue).
    with open(os.path.join(ptxgen.HERE, "attention_sm90.ptx"), encoding="utf-8") as f:
        text = f.read()
    pv = "    wgmma.fence.sync.aligned;\n    add.u64 %dsb, %descv, 0;"
    for what, edits in [
        ("no fence.proxy.async", [("    fence.proxy.async.shared::cta;", "")]),
        ("no wgmma.fence before P*V", [(pv, "    add.u64 %dsb, %descv, 0;")]),
        ("P written after the wgmma.fence", [(pv, "    add.u64 %dsb, %descv, 0;"),
                                             ("    cvt.rn.bf16x2.f32 %pk0_0,", "    wgmma.fence.sync.aligned;\n    cvt.rn.bf16x2.f32 %pk0_0,")]),
        ("V read K-major", [("1, 1, 1, 1;", "1, 1, 1, 0;")]),
        ("P*V left in flight", [("    wgmma.wait_group.sync.aligned 0;\n    xor.b32 %stg", "    xor.b32 %stg")]),
        ("a block without key tiles exits before its Q copy lands",
         [("    cp.async.wait_group 0;  // a block with no key tile never waited for its Q copy\n", "")]),
    ]:
        broken = text
        for old, new in edits:
            assert old in broken, what
            broken = broken.replace(old, new)
        # copies held until their wait_group ("wait" mode) for the exit check; else at issue
        case = WG_NO_TILE_CASE if what.startswith("a block without") else WG_MUTANT_CASE
        S.CP_ASYNC_MODE[0] = case[-1]
        try:
            ok = one(*case, mods=S.parse_module(broken))
        except S.SimError as e:
            print(f"broken wgmma module ({what}) refused: {str(e)[-90:]}")
            continue
        if ok:
            raise AssertionError(f"the interpreter ran a broken wgmma module ({what})")
        print(f"broken wgmma module ({what}) refused by the comparison")
    print(f"attention emulation passed ({time.time() - t_start:.1f}s)")
    return 0


def main():
    ap = ptxgen.parser(__doc__, check_help="fail if the committed PTX files are stale",
                       stdout_help="print one module's PTX instead of writing",
                       stdout_choices=["attention", "attention_sm90"])
    ap.add_argument("--emulate", choices=["quick"], help="run the PTX on kernels/ptx_sim.py against an f64 model")
    args = ap.parse_args()
    if args.emulate:
        return emulate(True)
    if args.list:
        for name, _, _, _ in entries():
            print(name, SIZE)
        return 0
    return ptxgen.emit("gen_attention.py", {"attention": generate, "attention_sm90": generate_sm90}, args)


if __name__ == "__main__":
    sys.exit(main())
