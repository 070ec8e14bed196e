#!/usr/bin/env python3
"""Generates kernels/merge.ptx: token merging (ToMe bipartite soft matching) on the GPU.

Python 3 standard library only. Usage:

    python3 kernels/gen_merge.py             # (re)write kernels/merge.ptx, kernels/merge_sm90.ptx
    python3 kernels/gen_merge.py --check     # exit 1 if a committed file is stale
    python3 kernels/gen_merge.py --list      # print "<entry> <param bytes>" per entry
    python3 kernels/gen_merge.py --stdout merge|merge_sm90   # print one module
    python3 kernels/gen_merge.py --simulate [CASES] [--seed S]   # run merge.ptx on kernels/ptx_sim.py

Semantics are those of the cpu backend (src/cpu/merge.rs), bit for bit, following the f32
score contract of src/merge.rs operation for operation: `mul.rn`, `add.rn`, `fma.rn`,
`sqrt.rn`, `div.rn` (never contracted, never approximate; no `.ftz` anywhere).

Entries (one parameter block for all, MERGE_FIELDS below = `MergeParams` in src/cuda/merge.rs):

- merge_normalize_{f32,f16,bf16}: metric [B*N*C] -> u f32 [B*N*C]. Half a warp per token row:
  lane l sums fma(y_k, y_k, .) for k = l mod 16 (the contract's 16 lane sums), then the lane
  tree l += l+8, +4, +2, +1 by shfl.down; max|v| by a butterfly (exact). Non-finite elements:
  status = max(status, !flat_index) (0: none; the lowest index wins).
- merge_similarity: u -> per (batch, split, A row) the best (score, B index) over the split's
  B tiles. A 64x64 tile of (A rows, B rows) per block, 16x16 threads with 4x4 register tiles,
  16 channels per step staged in shared memory; every score is ONE fma chain over k = 0..C-1
  from +0 (zero padding past C can only turn a final -0 into +0, which compares equal). The
  score matrix is never written. Ties: strict > in ascending B order inside a thread, then
  (greater, or equal with a lower index) across the 16 threads of a row.
- merge_reduce: the splits of each A row, in ascending order with strict > (lowest index).
- merge_rank: rank(a) = #{a' : s(a') > s(a) or (s(a') == s(a) and a' < a)} (a stable sort,
  descending, ties to the lower A index, -0 == +0); writes order[b, rank] = (a, best B).
- merge_{sum,mean,wavg}_{f32,f16,bf16}: one block per output slot, threads over channels; the
  slot's sources (CSR members / offsets of the plan, ascending) summed in f32 in order exactly
  as the cpu backend: one source is copied bit for bit; sum/mean: acc = x0, acc += xi, mean
  divides by the count; wavg: acc = fma(xi, si, acc) from +0, w += si from +0, acc / w, and
  thread 0 writes w to out_sizes and reports sizes that are not finite and > 0 in status.
- merge_unmerge_{f32,f16,bf16}: out[b, t] = y[b, slots[b, t]] (bit copies).
"""

import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ptxgen  # noqa: E402

BLOCK = 256
TILE = 64  # A rows and B rows per similarity block
KSTEP = 16  # channels per shared-memory stage
TC_TILE = 128  # tensor-core similarity: A rows and B rows per block (and the packed row padding)
TC_K = ptxgen.TC_K  # tensor-core similarity: channels per cp.async stage (and the packed channel padding)
FULL = "0xffffffff"

FLOATS = ["f32", "f16", "bf16"]
MMA_TYPES = ["f16", "bf16"]
SIZE = {"f32": 4, "f16": 2, "bf16": 2}

MERGE_FIELDS = [
    ("src", "u64"),  # metric / u / partial bests / x / y
    ("dst", "u64"),  # u / reduced bests / order / merged out / unmerged out
    ("status", "u64"),  # one u64, zeroed by the host: !index of the first bad element
    ("aux", "u64"),  # merge: plan members [B*N]; unmerge: slots [B*N]; pack / mma: 1/norm f32 [B*N]
    ("offsets", "u64"),  # merge: plan offsets [B*(O+1)]
    ("sizes", "u64"),  # wavg: sizes f32 [B*N]
    ("out_sizes", "u64"),  # wavg: out sizes f32 [B*O]
    ("batch", "u32"),  # B
    ("n", "u32"),  # N tokens
    ("c", "u32"),  # channels
    ("na", "u32"),  # ceil(N/2)
    ("nb", "u32"),  # floor(N/2)
    ("out", "u32"),  # O = N - r
    ("splits", "u32"),  # similarity: B-tile splits (grid y)
    ("tiles", "u32"),  # similarity: B tiles per split
    ("flags", "u32"),  # bit 0: class token, bit 1: distillation token
    ("pad", "u32"),
]
SIZES = {"u64": 8, "u32": 4}


OFF, PARAM_BYTES = ptxgen.layout(MERGE_FIELDS, SIZES)


def entries():
    """(name, kind, dtype) in file order."""
    out = [(f"merge_normalize_{t}", "normalize", t) for t in FLOATS]
    out += [("merge_similarity", "similarity", "f32"), ("merge_reduce", "reduce", "f32"),
            ("merge_rank", "rank", "f32")]
    for mode in ["sum", "mean", "wavg"]:
        out += [(f"merge_{mode}_{t}", mode, t) for t in FLOATS]
    out += [(f"merge_unmerge_{t}", "unmerge", t) for t in FLOATS]
    out += [(f"merge_pack_{t}", "pack", t) for t in MMA_TYPES]
    out += [(f"merge_similarity_mma_{t}", "similarity_mma", t) for t in MMA_TYPES]
    return out


def head(name, regs):
    return ptxgen.signature(name, PARAM_BYTES, BLOCK) + ["{"] + [f"    {r}" for r in regs]


def param(reg, field, ty=None):
    ty = ty or dict(MERGE_FIELDS)[field]
    return f"    ld.param.{ty} {reg}, [p+{OFF[field]}];"


def load_f32(t, dst, addr, pred=None, h="%h1", r="%rt"):
    """Loads one element of dtype t at byte address `addr` into f32 register `dst`."""
    g = f"@{pred} " if pred else ""
    if t == "f32":
        return [f"    {g}ld.global.nc.f32 {dst}, [{addr}];"]
    if t == "f16":
        return [f"    {g}ld.global.nc.b16 {h}, [{addr}];", f"    {g}cvt.f32.f16 {dst}, {h};"]
    return [f"    {g}ld.global.nc.b16 {h}, [{addr}];", f"    {g}cvt.u32.u16 {r}, {h};",
            f"    {g}shl.b32 {r}, {r}, 16;", f"    {g}mov.b32 {dst}, {r};"]


def store_from_f32(t, addr, src, h="%h2"):
    if t == "f32":
        return [f"    st.global.f32 [{addr}], {src};"]
    return [f"    cvt.rn.{t}.f32 {h}, {src};", f"    st.global.b16 [{addr}], {h};"]


def elem_addr(dst, base, index64, t, tmp="%rdt"):
    """dst = base + index64 * size(t)."""
    shift = {4: 2, 2: 1}[SIZE[t]]
    return [f"    shl.b64 {tmp}, {index64}, {shift};", f"    add.u64 {dst}, {base}, {tmp};"]


REGS = [".reg .pred %p<16>;", ".reg .b16 %h<4>;", ".reg .b32 %r<48>;", ".reg .b32 %rt;",
        ".reg .f32 %f<24>;", ".reg .b64 %rd<24>;", ".reg .b64 %rdt;"]


def normalize(name, t, pack=False):
    """merge_normalize_{t} (pack=False) or merge_pack_{t} (pack=True, t in f16 / bf16): the
    contract's steps 1-3 (m, p, y = v*p, ss) and then either u = y * (1/sqrt ss) -> dst, or the
    tensor-core operands: y rounded to t (exact for a 16-bit input: p is a power of two) into the
    packed matrices at dst (TC_FIELDS in the docstring) and 1/sqrt(ss) (0 for an all-zero row)
    per token into aux."""
    s = head(name, REGS)
    s += [
        param("%rd1", "src"), param("%rd2", "dst"), param("%rd3", "status"),
        param("%r1", "batch"), param("%r2", "n"), param("%r3", "c"),
        "    mul.lo.u32 %r4, %r1, %r2;  // rows B*N (< 2^31, checked by the host)",
        "    mov.u32 %r5, %tid.x;",
        "    mov.u32 %r6, %ctaid.x;",
        "    shr.u32 %r7, %r5, 4;",
        "    and.b32 %r8, %r5, 15;  // lane l of the row's half warp",
        "    shl.b32 %r9, %r6, 4;",
        "    add.u32 %r10, %r9, %r7;  // row",
        "    setp.lt.u32 %p1, %r10, %r4;",
        "    mul.wide.u32 %rd4, %r10, %r3;  // flat index of the row's first element",
        "    mov.f32 %f1, 0f00000000;  // m = max |v|",
        "    mov.u32 %r11, %r8;",
        "    @!%p1 bra P1_END;",
        "P1_LOOP:",
        "    setp.ge.u32 %p2, %r11, %r3;",
        "    @%p2 bra P1_END;",
        "    cvt.u64.u32 %rd5, %r11;",
        "    add.u64 %rd6, %rd4, %rd5;",
    ] + elem_addr("%rd7", "%rd1", "%rd6", t) + load_f32(t, "%f2", "%rd7") + [
        "    abs.f32 %f3, %f2;",
        "    testp.finite.f32 %p3, %f2;",
        "    @%p3 bra P1_OK;",
        "    not.b64 %rd8, %rd6;",
        "    atom.global.max.u64 %rd9, [%rd3], %rd8;",
        "P1_OK:",
        "    max.f32 %f1, %f1, %f3;",
        "    add.u32 %r11, %r11, 16;",
        "    bra P1_LOOP;",
        "P1_END:",
    ]
    for w in [8, 4, 2, 1]:
        s += [f"    shfl.sync.bfly.b32 %f4, %f1, {w}, 0x1f, {FULL};", "    max.f32 %f1, %f1, %f4;"]
    s += [
        "    setp.eq.f32 %p4, %f1, 0f00000000;  // an all-zero row",
        "    // p = 2^-e, e = floor(log2 m) clamped to [-126, 126]",
        "    mov.b32 %r12, %f1;",
        "    shr.u32 %r13, %r12, 23;",
        "    and.b32 %r13, %r13, 255;",
        "    sub.s32 %r14, %r13, 127;",
        "    max.s32 %r14, %r14, -126;",
        "    min.s32 %r14, %r14, 126;",
        "    sub.s32 %r15, 127, %r14;",
        "    shl.b32 %r15, %r15, 23;",
        "    mov.b32 %f5, %r15;",
        "    mov.f32 %f6, 0f00000000;  // this lane's sum of squares",
        "    mov.u32 %r11, %r8;",
        "    @!%p1 bra P2_END;",
        "P2_LOOP:",
        "    setp.ge.u32 %p2, %r11, %r3;",
        "    @%p2 bra P2_END;",
        "    cvt.u64.u32 %rd5, %r11;",
        "    add.u64 %rd6, %rd4, %rd5;",
    ] + elem_addr("%rd7", "%rd1", "%rd6", t) + load_f32(t, "%f2", "%rd7") + [
        "    mul.rn.f32 %f7, %f2, %f5;",
        "    fma.rn.f32 %f6, %f7, %f7, %f6;",
        "    add.u32 %r11, %r11, 16;",
        "    bra P2_LOOP;",
        "P2_END:",
    ]
    for w in [8, 4, 2, 1]:
        s += [f"    shfl.sync.down.b32 %f8, %f6, {w}, 0x1f, {FULL};", "    add.rn.f32 %f6, %f6, %f8;"]
    s += [
        "    and.b32 %r16, %r5, 16;  // lane 0 of this half warp",
        f"    shfl.sync.idx.b32 %f9, %f6, %r16, 0x1f, {FULL};",
        "    sqrt.rn.f32 %f10, %f9;",
        "    div.rn.f32 %f11, 0f3F800000, %f10;  // 1 / sqrt(ss)",
    ]
    if pack:
        s += [param("%rd16", "aux")]
        s += [
            "    @!%p1 bra P3_END;",
            "    div.u32 %r17, %r10, %r2;  // b",
            "    mul.lo.u32 %r18, %r17, %r2;",
            "    sub.u32 %r18, %r10, %r18;  // token",
            "    add.u32 %r19, %r2, 1;",
            "    shr.u32 %r19, %r19, 1;",
            f"    add.u32 %r19, %r19, {TC_TILE - 1};",
            f"    and.b32 %r19, %r19, {-TC_TILE};  // NP: A rows per batch and set, padded",
            f"    add.u32 %r20, %r3, {TC_K - 1};",
            f"    and.b32 %r20, %r20, {-TC_K};  // CP: channels per packed row, padded",
            "    and.b32 %r21, %r18, 1;  // set (0: A, 1: B)",
            "    shr.u32 %r22, %r18, 1;  // index within the set",
            "    shl.b32 %r23, %r17, 1;",
            "    add.u32 %r23, %r23, %r21;",
            "    mul.wide.u32 %rd12, %r23, %r19;",
            "    cvt.u64.u32 %rd13, %r22;",
            "    add.u64 %rd12, %rd12, %rd13;  // packed row (2b + set)*NP + index",
            "    cvt.u64.u32 %rd13, %r20;",
            "    mul.lo.u64 %rd12, %rd12, %rd13;",
            "    shl.b64 %rd12, %rd12, 1;",
            "    add.u64 %rd12, %rd12, %rd2;  // &packed[row][0]",
            "    selp.f32 %f13, 0f00000000, %f11, %p4;  // 1/sqrt(ss), 0 for an all-zero row",
            "    setp.eq.u32 %p5, %r8, 0;",
            "    mul.wide.u32 %rd14, %r10, 4;",
            "    add.u64 %rd14, %rd14, %rd16;",
            "    @%p5 st.global.f32 [%rd14], %f13;",
            "    mov.u32 %r11, %r8;",
            "P3_LOOP:",
            "    setp.ge.u32 %p2, %r11, %r3;",
            "    @%p2 bra P3_END;",
            "    cvt.u64.u32 %rd5, %r11;",
            "    add.u64 %rd6, %rd4, %rd5;",
        ] + elem_addr("%rd7", "%rd1", "%rd6", t) + load_f32(t, "%f2", "%rd7") + [
            "    mul.rn.f32 %f7, %f2, %f5;  // y: exact in t (p is a power of two)",
            f"    cvt.rn.{t}.f32 %h2, %f7;",
            "    shl.b64 %rd15, %rd5, 1;",
            "    add.u64 %rd15, %rd15, %rd12;",
            "    st.global.b16 [%rd15], %h2;",
            "    add.u32 %r11, %r11, 16;",
            "    bra P3_LOOP;",
        ]
    else:
        s += [
            "    mov.u32 %r11, %r8;",
            "    @!%p1 bra P3_END;",
            "P3_LOOP:",
            "    setp.ge.u32 %p2, %r11, %r3;",
            "    @%p2 bra P3_END;",
            "    cvt.u64.u32 %rd5, %r11;",
            "    add.u64 %rd6, %rd4, %rd5;",
        ] + elem_addr("%rd7", "%rd1", "%rd6", t) + load_f32(t, "%f2", "%rd7") + [
            "    mul.rn.f32 %f7, %f2, %f5;",
            "    mul.rn.f32 %f12, %f7, %f11;",
            "    selp.f32 %f12, 0f00000000, %f12, %p4;",
            "    shl.b64 %rd10, %rd6, 2;",
            "    add.u64 %rd11, %rd2, %rd10;",
            "    st.global.f32 [%rd11], %f12;",
            "    add.u32 %r11, %r11, 16;",
            "    bra P3_LOOP;",
        ]
    s += [
        "P3_END:",
        "    ret;",
        "}",
        "",
    ]
    return "\n".join(s)


def similarity(name):
    regs = [".reg .pred %p<16>;", ".reg .b32 %r<48>;", ".reg .f32 %f<24>;", ".reg .f32 %acc<16>;",
            ".reg .f32 %bs<4>;", ".reg .b32 %bj<4>;", ".reg .b64 %rd<24>;",
            f".shared .align 16 .f32 sa[{KSTEP * TILE}];", f".shared .align 16 .f32 sb[{KSTEP * TILE}];"]
    s = head(name, regs)
    s += [
        param("%rd1", "src"), param("%rd2", "dst"),
        param("%r1", "n"), param("%r2", "c"), param("%r3", "na"), param("%r4", "nb"),
        param("%r5", "splits"), param("%r6", "tiles"), param("%r7", "flags"),
        "    mov.u32 %r8, %tid.x;",
        "    and.b32 %r9, %r8, 15;  // tx: B columns 4tx..4tx+3 of the tile",
        "    shr.u32 %r10, %r8, 4;  // ty: A rows 4ty..4ty+3 of the tile",
        "    mov.u32 %r11, %ctaid.x;",
        f"    shl.b32 %r11, %r11, {TILE.bit_length() - 1};  // a0",
        "    mov.u32 %r12, %ctaid.y;  // split",
        "    mov.u32 %r13, %ctaid.z;  // batch",
        "    mul.lo.u32 %r14, %r13, %r1;  // b*N",
        "    mul.wide.u32 %rd3, %r14, %r2;  // b*N*C",
        "    and.b32 %r15, %r8, 63;  // staging row",
        "    shr.u32 %r16, %r8, 6;  // staging channel (+4q)",
        "    // A staging row: token 2(a0 + row)",
        "    add.u32 %r17, %r11, %r15;",
        "    setp.lt.u32 %p1, %r17, %r3;",
        "    shl.b32 %r18, %r17, 1;",
        "    mul.wide.u32 %rd4, %r18, %r2;",
        "    add.u64 %rd4, %rd4, %rd3;",
        "    shl.b64 %rd4, %rd4, 2;",
        "    add.u64 %rd4, %rd4, %rd1;  // &u[b, 2(a0+row), 0]",
        "    // shared addresses: stage (kk, row) at 4(64 kk + row)",
        "    mov.u32 %r19, sa;",
        "    mov.u32 %r20, sb;",
        "    shl.b32 %r21, %r16, 8;",
        "    shl.b32 %r22, %r15, 2;",
        "    add.u32 %r21, %r21, %r22;",
        "    add.u32 %r23, %r19, %r21;  // &sa[kk0][row]",
        "    add.u32 %r24, %r20, %r21;  // &sb[kk0][row]",
        "    shl.b32 %r25, %r10, 4;",
        "    add.u32 %r25, %r25, %r19;  // &sa[0][4ty]",
        "    shl.b32 %r26, %r9, 4;",
        "    add.u32 %r26, %r26, %r20;  // &sb[0][4tx]",
        "    // B tiles [t, t_end) of this split",
        f"    add.u32 %r27, %r4, {TILE - 1};",
        f"    shr.u32 %r27, %r27, {TILE.bit_length() - 1};  // B tiles",
        "    mul.lo.u32 %r28, %r12, %r6;  // t",
        "    add.u32 %r29, %r28, %r6;",
        "    min.u32 %r29, %r29, %r27;  // t_end",
        "    and.b32 %r30, %r7, 2;",
        "    setp.ne.u32 %p2, %r30, 0;  // distillation token: B 0 is never a target",
    ]
    for i in range(4):
        s += [f"    mov.f32 %bs{i}, 0fFF800000;", f"    mov.u32 %bj{i}, 0;"]
    s += [
        "TILE_LOOP:",
        "    setp.ge.u32 %p3, %r28, %r29;",
        "    @%p3 bra TILE_END;",
        f"    shl.b32 %r31, %r28, {TILE.bit_length() - 1};  // j0",
        "    add.u32 %r32, %r31, %r15;",
        "    setp.lt.u32 %p4, %r32, %r4;",
        "    shl.b32 %r33, %r32, 1;",
        "    add.u32 %r33, %r33, 1;",
        "    mul.wide.u32 %rd5, %r33, %r2;",
        "    add.u64 %rd5, %rd5, %rd3;",
        "    shl.b64 %rd5, %rd5, 2;",
        "    add.u64 %rd5, %rd5, %rd1;  // &u[b, 2(j0+row)+1, 0]",
    ]
    for k in range(16):
        s.append(f"    mov.f32 %acc{k}, 0f00000000;")
    s += [
        "    mov.u32 %r34, 0;  // k0",
        "K_LOOP:",
        "    setp.ge.u32 %p5, %r34, %r2;",
        "    @%p5 bra K_END;",
    ]
    for q in range(4):
        s += [
            f"    add.u32 %r35, %r34, %r16;",
            f"    add.u32 %r35, %r35, {4 * q};  // k",
            "    setp.lt.u32 %p6, %r35, %r2;",
            "    and.pred %p7, %p6, %p1;",
            "    and.pred %p8, %p6, %p4;",
            "    mul.wide.u32 %rd6, %r35, 4;",
            "    add.u64 %rd7, %rd4, %rd6;",
            "    add.u64 %rd8, %rd5, %rd6;",
            "    mov.f32 %f1, 0f00000000;",
            "    mov.f32 %f2, 0f00000000;",
            "    @%p7 ld.global.nc.f32 %f1, [%rd7];",
            "    @%p8 ld.global.nc.f32 %f2, [%rd8];",
            f"    st.shared.f32 [%r23+{q * 4 * 256}], %f1;",
            f"    st.shared.f32 [%r24+{q * 4 * 256}], %f2;",
        ]
    s.append("    bar.sync 0;")
    for kk in range(KSTEP):
        s += [
            f"    ld.shared.v4.f32 {{%f1, %f2, %f3, %f4}}, [%r25+{kk * 4 * TILE}];",
            f"    ld.shared.v4.f32 {{%f5, %f6, %f7, %f8}}, [%r26+{kk * 4 * TILE}];",
        ]
        for i in range(4):
            for j in range(4):
                s.append(f"    fma.rn.f32 %acc{4 * i + j}, %f{1 + i}, %f{5 + j}, %acc{4 * i + j};")
    s += [
        "    bar.sync 0;",
        f"    add.u32 %r34, %r34, {KSTEP};",
        "    bra K_LOOP;",
        "K_END:",
        "    // fold: ascending B index, strict > keeps the lowest",
        "    shl.b32 %r36, %r9, 2;",
        "    add.u32 %r36, %r36, %r31;  // j of column 0",
    ]
    for j in range(4):
        s += [
            f"    add.u32 %r37, %r36, {j};",
            "    setp.lt.u32 %p9, %r37, %r4;",
            "    setp.eq.and.u32 %p10, %r37, 0, %p2;",
            "    not.pred %p10, %p10;",
            "    and.pred %p9, %p9, %p10;  // a valid target",
        ]
        for i in range(4):
            s += [
                f"    setp.gt.and.f32 %p11, %acc{4 * i + j}, %bs{i}, %p9;",
                f"    selp.f32 %bs{i}, %acc{4 * i + j}, %bs{i}, %p11;",
                f"    selp.b32 %bj{i}, %r37, %bj{i}, %p11;",
            ]
    s += [
        "    add.u32 %r28, %r28, 1;",
        "    bra TILE_LOOP;",
        "TILE_END:",
        "    // the 16 threads of a row: greater, or equal with a lower index",
    ]
    for w in [8, 4, 2, 1]:
        for i in range(4):
            s += [
                f"    shfl.sync.bfly.b32 %f9, %bs{i}, {w}, 0x1f, {FULL};",
                f"    shfl.sync.bfly.b32 %r38, %bj{i}, {w}, 0x1f, {FULL};",
                f"    setp.eq.f32 %p12, %f9, %bs{i};",
                f"    setp.lt.and.u32 %p12, %r38, %bj{i}, %p12;",
                f"    setp.gt.or.f32 %p12, %f9, %bs{i}, %p12;",
                f"    selp.f32 %bs{i}, %f9, %bs{i}, %p12;",
                f"    selp.b32 %bj{i}, %r38, %bj{i}, %p12;",
            ]
    s += [
        "    setp.ne.u32 %p13, %r9, 0;",
        "    @%p13 bra DONE;",
        "    and.b32 %r39, %r7, 1;",
        "    setp.ne.u32 %p14, %r39, 0;  // class token: A 0 scores -inf everywhere",
        "    mul.lo.u32 %r40, %r13, %r5;",
        "    add.u32 %r40, %r40, %r12;",
        "    mul.lo.u32 %r40, %r40, %r3;  // (b*splits + split)*na",
        "    shl.b32 %r41, %r10, 2;",
        "    add.u32 %r41, %r41, %r11;  // a of row 0",
    ]
    for i in range(4):
        s += [
            f"    add.u32 %r42, %r41, {i};",
            "    setp.lt.u32 %p15, %r42, %r3;",
            "    setp.eq.and.u32 %p11, %r42, 0, %p14;",
            f"    selp.f32 %bs{i}, 0fFF800000, %bs{i}, %p11;",
            f"    selp.b32 %bj{i}, 0, %bj{i}, %p11;",
            "    add.u32 %r43, %r40, %r42;",
            "    mul.wide.u32 %rd9, %r43, 8;",
            "    add.u64 %rd9, %rd9, %rd2;",
            f"    @%p15 st.global.v2.b32 [%rd9], {{%bs{i}, %bj{i}}};",
        ]
    s += ["DONE:", "    ret;", "}", ""]
    return "\n".join(s)


def quad_merge(rows):
    """The four lanes of a quad (one accumulator row group) merge their (%bs r, %bj r) for r <
    rows by two butterfly shuffles: greater, or equal with a lower index (%f3, %r56, %p12
    scratch)."""
    out = []
    for w in [1, 2]:
        for r in range(rows):
            out += [
                f"    shfl.sync.bfly.b32 %f3, %bs{r}, {w}, 0x1f, {FULL};",
                f"    shfl.sync.bfly.b32 %r56, %bj{r}, {w}, 0x1f, {FULL};",
                f"    setp.eq.f32 %p12, %f3, %bs{r};",
                f"    setp.lt.and.u32 %p12, %r56, %bj{r}, %p12;",
                f"    setp.gt.or.f32 %p12, %f3, %bs{r}, %p12;",
                f"    selp.f32 %bs{r}, %f3, %bs{r}, %p12;",
                f"    selp.b32 %bj{r}, %r56, %bj{r}, %p12;",
            ]
    return out


def similarity_mma(name, t):
    """merge_similarity_mma_{t}: the packed y rows of merge_pack_{t} -> per (batch, split, A row)
    the best (score, B index) over the split's B tiles, as merge_similarity writes them.

    score(a, j) = (sum_k y_a[k] y_j[k]) * inv_a * inv_j: the products of 16-bit values are exact
    in f32 and mma.sync accumulates them in f32 (in an order the hardware chooses), then two
    mul.rn. Block: 8 warps on a 128 (A) x 128 (B) tile, warp (wm, wn) = (warp & 3, warp >> 2)
    owns A rows 32 wm .. +32 and B rows 64 wn .. +64 (2 x 8 m16n8 accumulators). Channels in
    stages of TC_K = 32 through shared memory (cp.async.cg, two stages: the next stage loads
    while this one computes), 64-byte rows of four 16-byte chunks XOR-swizzled by (row >> 1) & 3
    so that ldmatrix phases hit distinct banks. Per B tile the thread folds its 16 columns into
    the running best of its 4 rows (ascending B index, strict >: per row the tile's greatest
    score by max.f32, and only when it beats the best a second pass for the lowest column with
    that score), then the quad (shfl) and the two warps of a row (shared memory) merge by
    (greater, or equal with a lower index)."""
    STAGE = ptxgen.TC_STAGE  # the tile, its stages and registers: ptxgen.tc_*
    assert TC_TILE == 128 and TC_K == ptxgen.TC_K
    regs = [".reg .pred %p<16>;", ".reg .b32 %r<64>;", ".reg .f32 %f<8>;", ".reg .b64 %rd<24>;",
            ".reg .f32 %acc<64>;", ".reg .b32 %fa<8>;", ".reg .b32 %fb<4>;", ".reg .f32 %ia<4>;",
            ".reg .f32 %bs<4>;", ".reg .b32 %bj<4>;", f".shared .align 128 .b8 smem[{2 * STAGE}];"]
    s = head(name, regs)
    s += [
        param("%rd1", "src"), param("%rd2", "dst"), param("%rd3", "aux"),
        param("%r1", "n"), param("%r2", "c"), param("%r3", "na"), param("%r4", "nb"),
        param("%r5", "splits"), param("%r6", "tiles"), param("%r7", "flags"),
    ] + ptxgen.tc_warp_layout() + [
        "    mov.u32 %r15, %ctaid.x;",
        f"    shl.b32 %r15, %r15, {TC_TILE.bit_length() - 1};  // a0",
        "    mov.u32 %r16, %ctaid.y;  // split",
        "    mov.u32 %r17, %ctaid.z;  // batch",
        f"    add.u32 %r18, %r3, {TC_TILE - 1};",
        f"    and.b32 %r18, %r18, {-TC_TILE};  // NP",
        f"    add.u32 %r19, %r2, {TC_K - 1};",
        f"    and.b32 %r19, %r19, {-TC_K};  // CP",
        "    cvt.u64.u32 %rd4, %r19;",
        "    shl.b64 %rd4, %rd4, 1;  // packed row bytes",
        "    mul.lo.u32 %r51, %r17, %r1;  // b*N",
        "    and.b32 %r53, %r7, 2;",
        "    setp.ne.u32 %p2, %r53, 0;  // distillation token: B 0 is never a target",
    ] + ptxgen.tc_copy_slot() + [
        "    cvt.u64.u32 %rd5, %r21;",
        "    mul.lo.u64 %rd5, %rd5, %rd4;",
        "    cvt.u64.u32 %rd6, %r20;",
        "    shl.b64 %rd6, %rd6, 4;",
        "    add.u64 %rd5, %rd5, %rd6;  // byte offset of (cr, cc) in a packed matrix",
        "    shl.b64 %rd7, %rd4, 6;  // 64 packed rows",
        "    shl.b32 %r24, %r17, 1;",
        "    mul.wide.u32 %rd8, %r24, %r18;",
        "    cvt.u64.u32 %rd6, %r15;",
        "    add.u64 %rd8, %rd8, %rd6;",
        "    mul.lo.u64 %rd8, %rd8, %rd4;",
        "    add.u64 %rd8, %rd8, %rd1;",
        "    add.u64 %rd8, %rd8, %rd5;  // A source of this thread (channel 0)",
        "    add.u32 %r24, %r24, 1;",
        "    mul.wide.u32 %rd9, %r24, %r18;",
        "    mul.lo.u64 %rd9, %rd9, %rd4;",
        "    add.u64 %rd9, %rd9, %rd1;",
        "    add.u64 %rd9, %rd9, %rd5;  // B source of this thread in tile 0 (channel 0)",
        f"    shl.b64 %rd10, %rd4, {TC_TILE.bit_length() - 1};  // bytes per B tile",
    ] + ptxgen.tc_ldmatrix_addresses() + [
        "    // inverse norms of the thread's 4 A rows a0 + 32 wm + 16 mt + g + 8 h (0 past na)",
    ]
    for mt in range(2):
        for h in range(2):
            r = 2 * mt + h
            s += [
                f"    mov.f32 %ia{r}, 0f00000000;",
                f"    mad.lo.u32 %r46, %r13, 32, %r15;",
                f"    add.u32 %r46, %r46, %r11;",
                f"    add.u32 %r46, %r46, {16 * mt + 8 * h};",
                "    setp.lt.u32 %p7, %r46, %r3;",
                "    shl.b32 %r47, %r46, 1;",
                "    add.u32 %r47, %r47, %r51;",
                "    mul.wide.u32 %rd11, %r47, 4;",
                "    add.u64 %rd11, %rd11, %rd3;",
                f"    @%p7 ld.global.nc.f32 %ia{r}, [%rd11];",
                f"    mov.f32 %bs{r}, 0fFF800000;",
                f"    mov.u32 %bj{r}, 0;",
            ]
    s += ptxgen.tc_zero_accumulators()
    s += [
        "    // B tiles [t, t_end) of this split",
        f"    add.u32 %r25, %r4, {TC_TILE - 1};",
        f"    shr.u32 %r25, %r25, {TC_TILE.bit_length() - 1};  // B tiles",
        "    mul.lo.u32 %r26, %r16, %r6;  // t",
        "    add.u32 %r27, %r26, %r6;",
        "    min.u32 %r27, %r27, %r25;  // t_end",
    ]

    def copy(stage_reg):
        return [
            "    cvt.u64.u32 %rd11, %r29;",
            "    shl.b64 %rd11, %rd11, 1;",
            "    add.u64 %rd12, %rd8, %rd11;",
            "    cvt.u64.u32 %rd14, %r28;",
            "    mul.lo.u64 %rd14, %rd14, %rd10;",
            "    add.u64 %rd14, %rd14, %rd9;",
            "    add.u64 %rd14, %rd14, %rd11;",
            "    add.u64 %rd13, %rd12, %rd7;",
            "    add.u64 %rd15, %rd14, %rd7;",
            f"    add.u32 %r33, %r23, {stage_reg};",
        ] + ptxgen.tc_copy_issue(("16", "16"), "%r19")

    s += ptxgen.tc_main_loop(copy, t, "%r2", "%r19")
    # Epilogue: the thread's columns j = %r50 + 8 n + c; a column is a target when j < nb and
    # not (j = 0 with a distillation token); its inverse norm is aux[b*N + 2j + 1], NaN for a
    # non-target so that its scores never win (max.f32 returns the other operand, == fails).
    # Per row the tile's greatest score m_r (max.f32) in %f4..7, and only when m_r > best a
    # second pass for the lowest column scoring m_r: the strict > fold over ascending B.
    s += [
        "    sub.u32 %r54, %r4, %r50;  // columns left below nb (as s32: <= 0 when none)",
        "    setp.eq.u32 %p10, %r50, 0;",
        "    and.pred %p10, %p10, %p2;  // column 0 of this tile is the distillation token",
        "    shl.b32 %r55, %r50, 1;",
        "    add.u32 %r55, %r55, %r51;",
        "    add.u32 %r55, %r55, 1;  // token b*N + 2 j0 + 1",
        "    mul.wide.u32 %rd16, %r55, 4;",
        "    add.u64 %rd16, %rd16, %rd3;  // &aux[token of column 0]; column k at + 8 k",
    ]

    def inv_b(n, c):
        k = 8 * n + c
        out = [
            f"    setp.gt.s32 %p9, %r54, {k};",
            "    mov.f32 %f1, 0f7FFFFFFF;",
        ]
        if k == 0:
            out.append("    and.pred %p9, %p9, !%p10;")
        return out + [f"    @%p9 ld.global.nc.f32 %f1, [%rd16+{8 * k}];"]

    def score(n, c, r):
        mt, h = divmod(r, 2)
        a = (mt * 8 + n) * 4 + 2 * h + c
        return [f"    mul.rn.f32 %f2, %acc{a}, %ia{r};", "    mul.rn.f32 %f2, %f2, %f1;"], "%f2"
    groups = [(inv_b(n, c), [(8 * n + c, lambda r, n=n, c=c: score(n, c, r))]) for n in range(8) for c in range(2)]
    s += ptxgen.tile_fold("max", groups, [(f"%f{4 + r}", f"%bs{r}", f"%bj{r}") for r in range(4)],
                          "%r50", "%p11", "%r56", "M")
    s += ptxgen.tc_next_tile("%r27") + [
        "FINAL:",
        "    // the quad: greater, or equal with a lower index",
    ]
    s += quad_merge(4)
    s += [
        "    // the two warps of a row: wn = 1 through shared memory (row slot 8 bytes)",
        "    bar.sync 0;",
        "    setp.eq.u32 %p13, %r12, 0;",
        "    setp.eq.and.u32 %p14, %r14, 1, %p13;",
        "    setp.eq.and.u32 %p15, %r14, 0, %p13;",
        "    mov.u32 %r57, smem;",
        "    shl.b32 %r58, %r13, 5;",
        "    add.u32 %r58, %r58, %r11;  // A row of slot 0 within the tile",
        "    mad.lo.u32 %r57, %r58, 8, %r57;",
    ]
    for mt in range(2):
        for h in range(2):
            r = 2 * mt + h
            s.append(f"    @%p14 st.shared.v2.b32 [%r57+{8 * (16 * mt + 8 * h)}], {{%bs{r}, %bj{r}}};")
    s += [
        "    bar.sync 0;",
        "    @!%p15 bra.uni DONE;",
        "    and.b32 %r59, %r7, 1;",
        "    setp.ne.u32 %p8, %r59, 0;  // class token: A 0 scores -inf everywhere",
        "    mul.lo.u32 %r60, %r17, %r5;",
        "    add.u32 %r60, %r60, %r16;",
        "    mul.lo.u32 %r60, %r60, %r3;  // (b*splits + split)*na",
        "    mad.lo.u32 %r61, %r13, 32, %r15;",
        "    add.u32 %r61, %r61, %r11;  // a of row 0",
    ]
    for mt in range(2):
        for h in range(2):
            r = 2 * mt + h
            s += [
                f"    ld.shared.v2.b32 {{%f3, %r56}}, [%r57+{8 * (16 * mt + 8 * h)}];",
                f"    setp.eq.f32 %p12, %f3, %bs{r};",
                f"    setp.lt.and.u32 %p12, %r56, %bj{r}, %p12;",
                f"    setp.gt.or.f32 %p12, %f3, %bs{r}, %p12;",
                f"    selp.f32 %bs{r}, %f3, %bs{r}, %p12;",
                f"    selp.b32 %bj{r}, %r56, %bj{r}, %p12;",
                f"    add.u32 %r62, %r61, {16 * mt + 8 * h};",
                "    setp.lt.u32 %p7, %r62, %r3;",
                "    setp.eq.and.u32 %p11, %r62, 0, %p8;",
                f"    selp.f32 %bs{r}, 0fFF800000, %bs{r}, %p11;",
                f"    selp.b32 %bj{r}, 0, %bj{r}, %p11;",
                "    add.u32 %r63, %r60, %r62;",
                "    mul.wide.u32 %rd17, %r63, 8;",
                "    add.u64 %rd17, %rd17, %rd2;",
                f"    @%p7 st.global.v2.b32 [%rd17], {{%bs{r}, %bj{r}}};",
            ]
    s += ["DONE:", "    ret;", "}", ""]
    return "\n".join(s)


def reduce_(name):
    s = head(name, REGS)
    s += [
        param("%rd1", "src"), param("%rd2", "dst"),
        param("%r1", "batch"), param("%r2", "na"), param("%r3", "splits"),
        "    mov.u32 %r4, %ctaid.x;",
        "    mov.u32 %r5, %tid.x;",
        f"    mad.lo.u32 %r6, %r4, {BLOCK}, %r5;  // g = b*na + a",
        "    mul.lo.u32 %r7, %r1, %r2;",
        "    setp.ge.u32 %p1, %r6, %r7;",
        "    @%p1 bra DONE;",
        "    div.u32 %r8, %r6, %r2;  // b",
        "    mul.lo.u32 %r9, %r8, %r2;",
        "    sub.u32 %r10, %r6, %r9;  // a",
        "    mul.lo.u32 %r11, %r8, %r3;  // b*splits",
        "    mov.f32 %f1, 0fFF800000;",
        "    mov.u32 %r12, 0;",
        "    mov.u32 %r13, 0;  // split",
        "LOOP:",
        "    setp.ge.u32 %p2, %r13, %r3;",
        "    @%p2 bra END;",
        "    add.u32 %r14, %r11, %r13;",
        "    mad.lo.u32 %r14, %r14, %r2, %r10;",
        "    mul.wide.u32 %rd3, %r14, 8;",
        "    add.u64 %rd3, %rd3, %rd1;",
        "    ld.global.v2.b32 {%f2, %r15}, [%rd3];",
        "    setp.gt.f32 %p3, %f2, %f1;",
        "    selp.f32 %f1, %f2, %f1, %p3;",
        "    selp.b32 %r12, %r15, %r12, %p3;",
        "    add.u32 %r13, %r13, 1;",
        "    bra LOOP;",
        "END:",
        "    mul.wide.u32 %rd4, %r6, 8;",
        "    add.u64 %rd4, %rd4, %rd2;",
        "    st.global.v2.b32 [%rd4], {%f1, %r12};",
        "DONE:",
        "    ret;",
        "}",
        "",
    ]
    return "\n".join(s)


def rank(name):
    regs = REGS + [f".shared .align 4 .f32 sc[{BLOCK}];"]
    s = head(name, regs)
    s += [
        param("%rd1", "src"), param("%rd2", "dst"), param("%r1", "na"),
        "    mov.u32 %r2, %tid.x;",
        "    mov.u32 %r3, %ctaid.x;",
        f"    mad.lo.u32 %r4, %r3, {BLOCK}, %r2;  // a",
        "    mov.u32 %r5, %ctaid.y;",
        "    mul.lo.u32 %r6, %r5, %r1;  // b*na",
        "    setp.lt.u32 %p1, %r4, %r1;",
        "    add.u32 %r7, %r6, %r4;",
        "    mul.wide.u32 %rd3, %r7, 8;",
        "    add.u64 %rd3, %rd3, %rd1;",
        "    mov.f32 %f1, 0fFF800000;  // my score",
        "    mov.u32 %r8, 0;  // my best B",
        "    @%p1 ld.global.v2.b32 {%f1, %r8}, [%rd3];",
        "    mov.u32 %r9, 0;  // rank",
        "    mov.u32 %r10, sc;",
        "    shl.b32 %r11, %r2, 2;",
        "    add.u32 %r11, %r11, %r10;",
        "    mov.u32 %r12, 0;  // t0",
        "T_LOOP:",
        "    setp.ge.u32 %p2, %r12, %r1;",
        "    @%p2 bra T_END;",
        "    add.u32 %r13, %r12, %r2;",
        "    setp.lt.u32 %p3, %r13, %r1;",
        "    add.u32 %r14, %r6, %r13;",
        "    mul.wide.u32 %rd4, %r14, 8;",
        "    add.u64 %rd4, %rd4, %rd1;",
        "    mov.f32 %f2, 0fFF800000;",
        "    @%p3 ld.global.f32 %f2, [%rd4];",
        "    st.shared.f32 [%r11], %f2;",
        "    bar.sync 0;",
        "    sub.u32 %r15, %r1, %r12;",
        f"    min.u32 %r15, %r15, {BLOCK};  // scores in this tile",
        "    mov.u32 %r16, 0;",
        "    mov.u32 %r17, %r10;",
        "Q_LOOP:",
        "    setp.ge.u32 %p4, %r16, %r15;",
        "    @%p4 bra Q_END;",
        "    ld.shared.f32 %f3, [%r17];",
        "    add.u32 %r18, %r12, %r16;  // a'",
        "    setp.eq.f32 %p5, %f3, %f1;",
        "    setp.lt.and.u32 %p5, %r18, %r4, %p5;",
        "    setp.gt.or.f32 %p5, %f3, %f1, %p5;",
        "    selp.u32 %r19, 1, 0, %p5;",
        "    add.u32 %r9, %r9, %r19;",
        "    add.u32 %r16, %r16, 1;",
        "    add.u32 %r17, %r17, 4;",
        "    bra Q_LOOP;",
        "Q_END:",
        "    bar.sync 0;",
        f"    add.u32 %r12, %r12, {BLOCK};",
        "    bra T_LOOP;",
        "T_END:",
        "    @!%p1 bra DONE;",
        "    add.u32 %r20, %r6, %r9;",
        "    mul.wide.u32 %rd5, %r20, 8;",
        "    add.u64 %rd5, %rd5, %rd2;",
        "    st.global.v2.b32 [%rd5], {%r4, %r8};",
        "DONE:",
        "    ret;",
        "}",
        "",
    ]
    return "\n".join(s)


def apply_(name, mode, t):
    sz = SIZE[t]
    bits = 8 * sz
    s = head(name, REGS)
    s += [
        param("%rd1", "src"), param("%rd2", "dst"), param("%rd3", "status"), param("%rd4", "aux"),
        param("%rd5", "offsets"), param("%rd6", "sizes"), param("%rd7", "out_sizes"),
        param("%r1", "n"), param("%r2", "c"), param("%r3", "out"),
        "    mov.u32 %r4, %ctaid.x;  // g = b*O + slot",
        "    mov.u32 %r5, %tid.x;",
        "    div.u32 %r6, %r4, %r3;  // b",
        "    add.u32 %r8, %r4, %r6;  // b*(O+1) + slot = g + b",
        "    mul.wide.u32 %rd8, %r8, 4;",
        "    add.u64 %rd8, %rd8, %rd5;",
        "    ld.global.nc.u32 %r9, [%rd8];  // off0",
        "    ld.global.nc.u32 %r10, [%rd8+4];  // off1",
        "    sub.u32 %r11, %r10, %r9;  // sources",
        "    mul.lo.u32 %r12, %r6, %r1;  // b*N",
        "    add.u32 %r13, %r12, %r9;",
        "    mul.wide.u32 %rd9, %r13, 4;",
        "    add.u64 %rd9, %rd9, %rd4;  // &members[b*N + off0]",
        "    mul.wide.u32 %rd10, %r4, %r2;  // g*C",
        "    setp.eq.u32 %p1, %r11, 1;",
        "    cvt.rn.f32.u32 %f20, %r11;  // count (exact below 2^24 sources)",
    ]
    if mode == "wavg":
        s += [
            "    setp.ne.u32 %p2, %r5, 0;",
            "    @%p2 bra SIZES_END;",
            "    mov.f32 %f10, 0f00000000;",
            "    mov.u32 %r14, 0;",
            "    mov.u64 %rd11, %rd9;",
            "SIZES_LOOP:",
            "    setp.ge.u32 %p3, %r14, %r11;",
            "    @%p3 bra SIZES_DONE;",
            "    ld.global.nc.u32 %r15, [%rd11];",
            "    add.u32 %r16, %r12, %r15;",
            "    mul.wide.u32 %rd12, %r16, 4;",
            "    add.u64 %rd12, %rd12, %rd6;",
            "    ld.global.nc.f32 %f11, [%rd12];",
            "    testp.finite.f32 %p4, %f11;",
            "    setp.gt.and.f32 %p4, %f11, 0f00000000, %p4;",
            "    @%p4 bra SIZE_OK;",
            "    cvt.u64.u32 %rd13, %r16;",
            "    not.b64 %rd13, %rd13;",
            "    atom.global.max.u64 %rd14, [%rd3], %rd13;",
            "SIZE_OK:",
            "    add.rn.f32 %f10, %f10, %f11;",
            "    add.u32 %r14, %r14, 1;",
            "    add.u64 %rd11, %rd11, 4;",
            "    bra SIZES_LOOP;",
            "SIZES_DONE:",
            "    mul.wide.u32 %rd12, %r4, 4;",
            "    add.u64 %rd12, %rd12, %rd7;",
            "    st.global.f32 [%rd12], %f10;",
            "SIZES_END:",
        ]
    s += [
        "    mov.u32 %r17, %r5;  // k",
        "K_LOOP:",
        "    setp.ge.u32 %p5, %r17, %r2;",
        "    @%p5 bra DONE;",
        "    cvt.u64.u32 %rd15, %r17;",
        "    add.u64 %rd16, %rd10, %rd15;",
    ] + elem_addr("%rd17", "%rd2", "%rd16", t) + [
        "    @!%p1 bra MANY;",
        "    // one source: a bit copy",
        "    ld.global.nc.u32 %r15, [%rd9];",
        "    add.u32 %r16, %r12, %r15;",
        "    mul.wide.u32 %rd18, %r16, %r2;",
        "    add.u64 %rd18, %rd18, %rd15;",
    ] + elem_addr("%rd19", "%rd1", "%rd18", t) + [
        f"    ld.global.nc.b{bits} {'%r18' if sz == 4 else '%h3'}, [%rd19];",
        f"    st.global.b{bits} [%rd17], {'%r18' if sz == 4 else '%h3'};",
        "    bra NEXT;",
        "MANY:",
    ]
    if mode == "wavg":
        s += ["    mov.f32 %f1, 0f00000000;", "    mov.f32 %f10, 0f00000000;", "    mov.u32 %r14, 0;"]
    else:
        s += ["    mov.u32 %r14, 1;"]
        s += [
            "    ld.global.nc.u32 %r15, [%rd9];",
            "    add.u32 %r16, %r12, %r15;",
            "    mul.wide.u32 %rd18, %r16, %r2;",
            "    add.u64 %rd18, %rd18, %rd15;",
        ] + elem_addr("%rd19", "%rd1", "%rd18", t) + load_f32(t, "%f1", "%rd19")
    s += [
        "SRC_LOOP:",
        "    setp.ge.u32 %p6, %r14, %r11;",
        "    @%p6 bra SRC_END;",
        "    mul.wide.u32 %rd20, %r14, 4;",
        "    add.u64 %rd20, %rd20, %rd9;",
        "    ld.global.nc.u32 %r15, [%rd20];",
        "    add.u32 %r16, %r12, %r15;",
        "    mul.wide.u32 %rd18, %r16, %r2;",
        "    add.u64 %rd18, %rd18, %rd15;",
    ] + elem_addr("%rd19", "%rd1", "%rd18", t) + load_f32(t, "%f2", "%rd19")
    if mode == "wavg":
        s += [
            "    mul.wide.u32 %rd21, %r16, 4;",
            "    add.u64 %rd21, %rd21, %rd6;",
            "    ld.global.nc.f32 %f3, [%rd21];",
            "    fma.rn.f32 %f1, %f2, %f3, %f1;",
            "    add.rn.f32 %f10, %f10, %f3;",
        ]
    else:
        s += ["    add.rn.f32 %f1, %f1, %f2;"]
    s += [
        "    add.u32 %r14, %r14, 1;",
        "    bra SRC_LOOP;",
        "SRC_END:",
    ]
    if mode == "wavg":
        s += ["    div.rn.f32 %f1, %f1, %f10;"]
    elif mode == "mean":
        s += ["    div.rn.f32 %f1, %f1, %f20;"]
    s += store_from_f32(t, "%rd17", "%f1") + [
        "NEXT:",
        f"    add.u32 %r17, %r17, {BLOCK};",
        "    bra K_LOOP;",
        "DONE:",
        "    ret;",
        "}",
        "",
    ]
    return "\n".join(s)


def unmerge(name, t):
    sz = SIZE[t]
    bits = 8 * sz
    reg = "%r18" if sz == 4 else "%h3"
    s = head(name, REGS)
    s += [
        param("%rd1", "src"), param("%rd2", "dst"), param("%rd4", "aux"),
        param("%r1", "n"), param("%r2", "c"), param("%r3", "out"),
        "    mov.u32 %r4, %ctaid.x;  // g = b*N + t",
        "    mov.u32 %r5, %tid.x;",
        "    div.u32 %r6, %r4, %r1;  // b",
        "    mul.wide.u32 %rd5, %r4, 4;",
        "    add.u64 %rd5, %rd5, %rd4;",
        "    ld.global.nc.u32 %r7, [%rd5];  // slot",
        "    mad.lo.u32 %r8, %r6, %r3, %r7;  // b*O + slot",
        "    mul.wide.u32 %rd6, %r8, %r2;",
        "    mul.wide.u32 %rd7, %r4, %r2;",
        "    mov.u32 %r9, %r5;",
        "K_LOOP:",
        "    setp.ge.u32 %p1, %r9, %r2;",
        "    @%p1 bra DONE;",
        "    cvt.u64.u32 %rd8, %r9;",
        "    add.u64 %rd9, %rd6, %rd8;",
        "    add.u64 %rd10, %rd7, %rd8;",
    ] + elem_addr("%rd11", "%rd1", "%rd9", t) + elem_addr("%rd12", "%rd2", "%rd10", t) + [
        f"    ld.global.nc.b{bits} {reg}, [%rd11];",
        f"    st.global.b{bits} [%rd12], {reg};",
        f"    add.u32 %r9, %r9, {BLOCK};",
        "    bra K_LOOP;",
        "DONE:",
        "    ret;",
        "}",
        "",
    ]
    return "\n".join(s)


# --------------------------------------------------------------------------------------------
# merge_sm90.ptx: the Hopper (sm_90a) tensor-core similarity with wgmma.
# --------------------------------------------------------------------------------------------
WG_KB = 64  # channels per k-block (one 128-byte swizzled row)
WG_HALF = 128 * WG_KB * 2  # one operand's 128 rows of a k-block: 16 KB
WG_STAGE = 2 * WG_HALF  # A then B
WG_STAGES = 4  # ring buffers
WG_AHEAD = WG_STAGES - 2
WG_SLACK = 1024  # the dynamic window is aligned up to 1024 bytes inside the launch's bytes
WG_SHARED = WG_SLACK + WG_STAGES * WG_STAGE  # dynamic shared memory of a launch
WG_MAX_REGS = 248  # two sets of 64 accumulators: one 256-thread block per SM (by design)


def similarity_wgmma(name, t):
    """merge_similarity_wgmma_{t} (sm_90a): what merge_similarity_mma_{t} computes, on wgmma.

    A block of 256 threads = two warpgroups owns A rows a0 .. a0 + 128 (warpgroup w: 64 w ..
    +64) and sweeps its split's B tiles of 128 with wgmma.mma_async m64n128k16 (f32
    accumulators, two sets alternating between tiles: ptxgen.wg_tile_loops). Channels stream in
    k-blocks of 64 through a ring of WG_STAGES buffers, each the A rows' and the B tile's
    [128][64] (16 KB each, K-major, 128-byte swizzle: chunk c of row r at c ^ (r & 7)),
    cp.async WG_AHEAD stages ahead, chunks past CP zero-filled. Epilogue of a tile, the thread's
    rows g, g + 8 of its warp's 16 and columns j = 128 t + 8 jj + 2 t4 + c: score = dot * ia *
    ib (two mul.rn; ib = aux[b*N + 2j + 1], NaN for a non-target so that it never wins), per
    row the tile's greatest score (max.f32) and, only when it beats the best, the lowest
    column with that score: the strict > fold over ascending B. At the end the quad merges by
    (greater, or equal with a lower index); the class token's A row 0 gets -inf, B 0; lane 0
    of a quad writes (best, index) to dst[(b*splits + split)*na + a] as merge_similarity."""
    mma = f"wgmma.mma_async.sync.aligned.m64n128k16.f32.{t}.{t}"
    regs = [".reg .pred %p<20>;", ".reg .b32 %r<80>;", ".reg .f32 %f<12>;", ".reg .b64 %rd<32>;",
            ".reg .f32 %acc<64>;", ".reg .f32 %accy<64>;", ".reg .f32 %bs<2>;", ".reg .b32 %bj<2>;",
            ".reg .f32 %ia<2>;", ".reg .f32 %m<2>;"]
    s = [f"// {name}: packed y rows -> partial bests (sm_90a wgmma; see the generator)."]
    s += head(name, regs)
    s += [
        param("%rd1", "src"), param("%rd2", "dst"), param("%rd3", "aux"),
        param("%r1", "n"), param("%r2", "c"), param("%r3", "na"), param("%r4", "nb"),
        param("%r5", "splits"), param("%r6", "tiles"), param("%r7", "flags"),
        "    mov.u32 %r8, %tid.x;",
        "    shr.u32 %r9, %r8, 5;  // warp",
        "    and.b32 %r10, %r8, 31;  // lane",
        "    shr.u32 %r11, %r10, 2;  // g: accumulator rows g, g + 8",
        "    and.b32 %r12, %r10, 3;  // t4: accumulator columns 8 jj + 2 t4 + {0, 1}",
        "    shr.u32 %r13, %r9, 2;  // warpgroup",
        "    and.b32 %r14, %r9, 3;  // warp in the warpgroup",
        "    mov.u32 %r15, %ctaid.x;",
        "    shl.b32 %r15, %r15, 7;  // a0",
        "    mov.u32 %r16, %ctaid.y;  // split",
        "    mov.u32 %r18, %ctaid.z;  // batch",
        "    mov.u32 %r19, dsmem;",
        f"    add.u32 %r19, %r19, {WG_SLACK - 1};",
        f"    and.b32 %r19, %r19, {-WG_SLACK & 0xFFFFFFFF};  // the 1024-aligned ring",
        f"    add.u32 %r22, %r3, {TC_TILE - 1};",
        f"    and.b32 %r22, %r22, {-TC_TILE & 0xFFFFFFFF};  // NP",
        f"    add.u32 %r24, %r2, {TC_K - 1};",
        f"    and.b32 %r24, %r24, {-TC_K & 0xFFFFFFFF};  // CP",
        "    add.u32 %r17, %r24, 63;",
        "    shr.u32 %r17, %r17, 6;  // k-blocks per tile",
        "    mul.lo.u32 %r51, %r18, %r1;  // b*N",
        "    and.b32 %r53, %r7, 2;",
        "    setp.ne.u32 %p2, %r53, 0;  // distillation token: B 0 is never a target",
        "    // copies: chunk cc = tid & 7 of rows r0 + 32 j (r0 = tid >> 3) of each operand, at",
        "    // (r >> 3) * 1024 + (r & 7) * 128 + (cc ^ (r & 7)) * 16 (r & 7 = r0 & 7)",
        "    and.b32 %r20, %r8, 7;  // cc",
        "    shr.u32 %r21, %r8, 3;  // r0",
        "    and.b32 %r25, %r21, 7;",
        "    xor.b32 %r23, %r25, %r20;",
        "    shl.b32 %r23, %r23, 4;",
        "    shl.b32 %r25, %r25, 7;",
        "    add.u32 %r23, %r23, %r25;",
        "    shr.u32 %r25, %r21, 3;",
        "    shl.b32 %r25, %r25, 10;",
        "    add.u32 %r23, %r23, %r25;  // the thread's slot in a [128][64] half",
        "    add.u32 %r23, %r23, %r19;",
        "    cvt.u64.u32 %rd4, %r24;",
        "    shl.b64 %rd4, %rd4, 1;  // packed row bytes",
        "    shl.b32 %r25, %r20, 4;",
        "    cvt.u64.u32 %rd5, %r25;",
        "    cvt.u64.u32 %rd6, %r21;",
        "    mul.lo.u64 %rd6, %rd6, %rd4;",
        "    add.u64 %rd5, %rd5, %rd6;  // (row r0, chunk cc) in a packed matrix",
        "    shl.b64 %rd7, %rd4, 5;  // 32 packed rows",
        "    shl.b32 %r25, %r18, 1;",
        "    mul.wide.u32 %rd8, %r25, %r22;",
        "    cvt.u64.u32 %rd6, %r15;",
        "    add.u64 %rd8, %rd8, %rd6;",
        "    mul.lo.u64 %rd8, %rd8, %rd4;",
        "    add.u64 %rd8, %rd8, %rd1;",
        "    add.u64 %rd8, %rd8, %rd5;  // A source of this thread (k-block 0)",
        "    add.u32 %r25, %r25, 1;",
        "    mul.wide.u32 %rd9, %r25, %r22;",
        "    mul.lo.u64 %rd9, %rd9, %rd4;",
        "    add.u64 %rd9, %rd9, %rd1;",
        "    add.u64 %rd9, %rd9, %rd5;  // B source of this thread in tile 0 (k-block 0)",
        f"    shl.b64 %rd10, %rd4, 7;  // bytes per B tile",
        "    // inverse norms of the thread's 2 A rows a0 + 64 w + 16 q + g + 8 h (0 past na)",
    ]
    for h in range(2):
        s += [
            f"    mov.f32 %ia{h}, 0f00000000;",
            "    shl.b32 %r46, %r13, 6;",
            "    add.u32 %r46, %r46, %r15;",
            "    shl.b32 %r47, %r14, 4;",
            "    add.u32 %r46, %r46, %r47;",
            "    add.u32 %r46, %r46, %r11;",
            f"    add.u32 %r46, %r46, {8 * h};",
            "    setp.lt.u32 %p7, %r46, %r3;",
            "    shl.b32 %r47, %r46, 1;",
            "    add.u32 %r47, %r47, %r51;",
            "    mul.wide.u32 %rd11, %r47, 4;",
            "    add.u64 %rd11, %rd11, %rd3;",
            f"    @%p7 ld.global.nc.f32 %ia{h}, [%rd11];",
            f"    mov.f32 %bs{h}, 0fFF800000;",
            f"    mov.u32 %bj{h}, 0;",
        ]
    s += [
        "    // B tiles [t, t_end) of this split",
        f"    add.u32 %r26, %r4, {TC_TILE - 1};",
        "    shr.u32 %r26, %r26, 7;  // B tiles",
        "    mul.lo.u32 %r27, %r16, %r6;  // t",
        "    add.u32 %r28, %r27, %r6;",
        "    min.u32 %r28, %r28, %r26;  // t_end",
        "    setp.ge.u32 %p1, %r27, %r28;",
        "    @%p1 bra.uni FINAL;",
        "    sub.u32 %r33, %r28, %r27;",
        "    mul.lo.u32 %r33, %r33, %r17;  // stages",
        "    mov.u32 %r30, %r27;  // the next copy: tile, k-block, stage",
        "    mov.u32 %r31, 0;",
        "    mov.u32 %r32, 0;",
    ]

    def copy_stage(tag):
        out = [
            "    setp.ge.u32 %p8, %r32, %r33;",
            f"    @%p8 bra.uni NOCOPY_{tag};",
            f"    and.b32 %r34, %r32, {WG_STAGES - 1};",
            f"    mad.lo.u32 %r34, %r34, {WG_STAGE}, %r23;  // destination (A half)",
            "    shl.b32 %r35, %r31, 6;",
            "    shl.b32 %r36, %r20, 3;",
            "    add.u32 %r35, %r35, %r36;  // the chunk's first channel",
            "    setp.lt.u32 %p9, %r35, %r24;  // the chunk's channels are inside CP",
            "    selp.u32 %r36, 16, 0, %p9;",
            "    cvt.u64.u32 %rd12, %r31;",
            "    shl.b64 %rd12, %rd12, 7;  // k-block bytes in a row",
            "    add.u64 %rd13, %rd8, %rd12;",
            "    selp.u64 %rd13, %rd13, %rd1, %p9;",
            "    cvt.u64.u32 %rd14, %r30;",
            "    mul.lo.u64 %rd14, %rd14, %rd10;",
            "    add.u64 %rd14, %rd14, %rd9;",
            "    add.u64 %rd14, %rd14, %rd12;",
            "    selp.u64 %rd14, %rd14, %rd1, %p9;",
        ]
        for j in range(4):
            out += [
                f"    cp.async.cg.shared.global [%r34+{4096 * j}], [%rd13], 16, %r36;",
                f"    cp.async.cg.shared.global [%r34+{WG_HALF + 4096 * j}], [%rd14], 16, %r36;",
            ]
            if j < 3:
                out += ["    add.u64 %rd13, %rd13, %rd7;", "    add.u64 %rd14, %rd14, %rd7;"]
        return out + ptxgen.wg_copy_advance(tag)

    for a in range(WG_AHEAD):
        s += copy_stage(f"P{a}")
    s += [
        "    // descriptors: start >> 4 | LBO 16 >> 4 << 16, SBO 1024 >> 4 << 32, 128-byte swizzle",
        "    // (1 << 62); A: this warpgroup's 64 rows, B: the tile's 128 rows, of ring buffer 0",
        f"    mad.lo.u32 %r37, %r13, {WG_HALF // 2}, %r19;",
    ] + ptxgen.wg_descriptor("%rd17", "%r37", "%r37") + [
        f"    add.u32 %r38, %r19, {WG_HALF};",
    ] + ptxgen.wg_descriptor("%rd18", "%r38", "%r38") + [
        "    mov.u32 %r40, %r27;  // tile being issued",
        "    mov.u32 %r41, 0;  // its k-block",
        "    mov.u32 %r42, 0;  // stages issued",
        "    shl.b32 %r53, %r12, 1;  // 2 t4",
        "    setp.ne.u32 %p19, %r40, %r40;  // false: no tile awaits its epilogue yet",
    ]
    descriptors = [
        "    // this stage's descriptors: + 32 KB (>> 4) per ring buffer",
        f"    and.b32 %r43, %r42, {WG_STAGES - 1};",
        f"    shl.b32 %r43, %r43, {(WG_STAGE >> 4).bit_length() - 1};",
        "    cvt.u64.u32 %rd19, %r43;",
        "    add.u64 %rd20, %rd19, %rd18;",
        "    add.u64 %rd19, %rd19, %rd17;",
    ]

    def epilogue(acc, tag):
        out = [
            f"    // epilogue of B tile %r46 (accumulators %{acc}): columns 128 t + 8 jj + 2 t4 + c",
            "    shl.b32 %r50, %r46, 7;",
            "    add.u32 %r50, %r50, %r53;",
            "    sub.u32 %r54, %r4, %r50;  // columns left below nb (as s32: <= 0 when none)",
            "    setp.eq.u32 %p10, %r50, 0;",
            "    and.pred %p10, %p10, %p2;  // column 0 is the distillation token",
            "    shl.b32 %r55, %r50, 1;",
            "    add.u32 %r55, %r55, %r51;",
            "    add.u32 %r55, %r55, 1;",
            "    mul.wide.u32 %rd16, %r55, 4;",
            "    add.u64 %rd16, %rd16, %rd3;  // &aux[token of column 0]; column k at + 8 k",
        ]

        def inv_b(jj, c):
            k = 8 * jj + c
            o = [f"    setp.gt.s32 %p9, %r54, {k};", "    mov.f32 %f1, 0f7FFFFFFF;"]
            if k == 0:
                o.append("    and.pred %p9, %p9, !%p10;")
            return o + [f"    @%p9 ld.global.nc.f32 %f1, [%rd16+{8 * k}];"]

        def score(jj, c, h):
            return [f"    mul.rn.f32 %f2, %{acc}{4 * jj + 2 * h + c}, %ia{h};", "    mul.rn.f32 %f2, %f2, %f1;"], "%f2"
        groups = [(inv_b(jj, c), [(8 * jj + c, lambda h, jj=jj, c=c: score(jj, c, h))])
                  for jj in range(16) for c in range(2)]
        return out + ptxgen.tile_fold("max", groups, [(f"%m{h}", f"%bs{h}", f"%bj{h}") for h in range(2)],
                                      "%r50", "%p11", "%r56", tag)

    s += ptxgen.wg_tile_loops(mma, WG_AHEAD, copy_stage, descriptors, epilogue)
    s += [
        "DONE:",
        "    cp.async.wait_group 0;  // the empty trailing groups",
        "FINAL:",
        "    // the quad: greater, or equal with a lower index",
    ]
    s += quad_merge(2)
    s += [
        "    setp.eq.u32 %p13, %r12, 0;",
        "    and.b32 %r59, %r7, 1;",
        "    setp.ne.u32 %p8, %r59, 0;  // class token: A 0 scores -inf everywhere",
        "    mul.lo.u32 %r60, %r18, %r5;",
        "    add.u32 %r60, %r60, %r16;",
        "    mul.lo.u32 %r60, %r60, %r3;  // (b*splits + split)*na",
        "    shl.b32 %r61, %r13, 6;",
        "    add.u32 %r61, %r61, %r15;",
        "    shl.b32 %r62, %r14, 4;",
        "    add.u32 %r61, %r61, %r62;",
        "    add.u32 %r61, %r61, %r11;  // a of row 0",
    ]
    for h in range(2):
        s += [
            f"    add.u32 %r62, %r61, {8 * h};",
            "    setp.lt.and.u32 %p7, %r62, %r3, %p13;",
            "    setp.eq.and.u32 %p11, %r62, 0, %p8;",
            f"    selp.f32 %bs{h}, 0fFF800000, %bs{h}, %p11;",
            f"    selp.b32 %bj{h}, 0, %bj{h}, %p11;",
            "    add.u32 %r63, %r60, %r62;",
            "    mul.wide.u32 %rd21, %r63, 8;",
            "    add.u64 %rd21, %rd21, %rd2;",
            f"    @%p7 st.global.v2.b32 [%rd21], {{%bs{h}, %bj{h}}};",
        ]
    s += ["    ret;", "}", ""]
    return "\n".join(s)


def wg_entries():
    return [f"merge_similarity_wgmma_{t}" for t in ("f16", "bf16")]


def generate_sm90():
    head_lines = [
        "// and commit the result. Design: similarity_wgmma in kernels/gen_merge.py.",
        f"// vistok: max-regs {WG_MAX_REGS}",
        "//",
        "// merge_similarity_wgmma_{f16,bf16}: packed y rows -> partial bests (sm_90a only: wgmma;",
        "// every other entry is in merge.ptx)",
        "//",
        f"// abi block {BLOCK}",
        f"// abi tc_tile {TC_TILE}",
        f"// abi wgmma_shared {WG_SHARED}",
    ] + ptxgen.abi_params("merge", OFF, PARAM_BYTES)
    parts = [ptxgen.sm90_module_header("gen_merge.py", head_lines)]
    for name, t in zip(wg_entries(), ("f16", "bf16")):
        parts.append(similarity_wgmma(name, t))
    return "\n".join(parts)


def generate():
    lines = [
        "// and commit the result. Design: the docstring of kernels/gen_merge.py.",
        "//",
        "// merge_normalize_{f32,f16,bf16}, merge_similarity, merge_reduce, merge_rank:",
        "//     the plan (ToMe bipartite soft matching, the f32 contract of src/merge.rs)",
        "// merge_{sum,mean,wavg}_{f32,f16,bf16}, merge_unmerge_{f32,f16,bf16}: applying it",
        "// merge_pack_{f16,bf16}, merge_similarity_mma_{f16,bf16}: the tensor-core similarity",
        "//     (replaces merge_normalize / merge_similarity when asked for; plan = reference up to",
        "//     near-ties)",
        "//",
        "// vistok: max-regs 128",
        f"// abi block {BLOCK}",
        f"// abi tile {TILE}",
        f"// abi kstep {KSTEP}",
        f"// abi tc_tile {TC_TILE}",
        f"// abi tc_k {TC_K}",
    ] + ptxgen.abi_params("merge", OFF, PARAM_BYTES)
    parts = [ptxgen.module_header("gen_merge.py", lines)]
    for name, kind, t in entries():
        if kind == "normalize":
            parts.append(normalize(name, t))
        elif kind == "similarity":
            parts.append(similarity(name))
        elif kind == "reduce":
            parts.append(reduce_(name))
        elif kind == "rank":
            parts.append(rank(name))
        elif kind == "unmerge":
            parts.append(unmerge(name, t))
        elif kind == "pack":
            parts.append(normalize(name, t, pack=True))
        elif kind == "similarity_mma":
            parts.append(similarity_mma(name, t))
        else:
            parts.append(apply_(name, kind, t))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# --simulate: runs the committed kernels/merge.ptx on kernels/ptx_sim.py (no GPU, nothing
# patched) and compares with a Python model of the contract of src/merge.rs, bit for bit: the
# normalised rows, the ranking (A token, best B) of every batch, the merge / weighted merge /
# unmerge kernels and the status words. A few seconds per case.
# --------------------------------------------------------------------------------------------
def simulate(seed=0, count=4):
    import math
    import random
    import struct
    import time
    import ptx_sim as S

    started = time.time()
    path = os.path.join(ptxgen.HERE, "merge.ptx")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text != generate():
        print(f"{path} is stale: run python3 kernels/gen_merge.py", file=sys.stderr)
        return 1
    mod = S.parse_module(text)
    path90 = os.path.join(ptxgen.HERE, "merge_sm90.ptx")
    with open(path90, encoding="utf-8") as f:
        text90 = f.read()
    if text90 != generate_sm90():
        print(f"{path90} is stale: run python3 kernels/gen_merge.py", file=sys.stderr)
        return 1
    mod.update(S.parse_module(text90))

    def params(**kw):
        b = bytearray(PARAM_BYTES)
        for k, v in kw.items():
            struct.pack_into("<Q" if dict(MERGE_FIELDS)[k] == "u64" else "<I", b, OFF[k], v)
        return bytes(b)

    def launch(name, grid, bufs, p, must_write=(), dynamic_shared=0):
        """bufs: (name, address, bytes, writable). Returns {name: bytes}; every byte of the
        buffers named in must_write must have been written by a plain store."""
        mem = S.Memory()
        for nm, addr, data, w in bufs:
            mem.add(nm, addr, data, w)
        S.run_kernel(mod[name], list(grid), [BLOCK, 1, 1], p, mem, {"threads": 0, "instructions": 0},
                     strict_shared=True, dynamic_shared=dynamic_shared)
        out = {}
        for _, data, _, cnt, n in mem.buffers:
            if n in must_write and not all(cnt):
                raise S.SimError(f"{name}: {cnt.count(0)} bytes of {n} never written")
            out[n] = bytes(data)
        return out

    # ---- the contract in Python (f32 bits) ----
    def fb(x):
        return struct.unpack("<I", struct.pack("<f", x))[0]

    def bf(b):
        return struct.unpack("<f", struct.pack("<I", b))[0]

    def mul(a, b):
        return S.f32_arith("mul", a, b)

    def add(a, b):
        return S.f32_arith("add", a, b)

    def div(a, b):
        return S.f32_arith("div", a, b)

    def fma(a, b, c):  # a * b + c, rounded once
        return S.fma_f32(a, b, c)

    def scaled(row):
        """(y, 1/sqrt(ss)) of the contract's steps 1-4 (inv = 0 for an all-zero row)."""
        m = max(abs(bf(x)) for x in row)
        if m == 0:
            return [0] * len(row), 0
        e = min(max(((fb(m) >> 23) & 0xFF) - 127, -126), 126)
        p = (127 - e) << 23
        y = [mul(x, p) for x in row]
        lanes = [0] * 16
        for k, v in enumerate(y):
            lanes[k % 16] = fma(v, v, lanes[k % 16])
        w = 8
        while w:
            for i in range(w):
                lanes[i] = add(lanes[i], lanes[i + w])
            w //= 2
        return y, div(fb(1.0), fb(math.sqrt(bf(lanes[0]))))

    def normalise(row):
        y, inv = scaled(row)
        return [mul(v, inv) for v in y]

    def gt(a, b):
        return bf(a) > bf(b)

    def model(x, B, N, C, cls, dist):
        na, nb = (N + 1) // 2, N // 2
        res = []
        for b in range(B):
            u = [normalise(x[(b * N + t) * C:(b * N + t + 1) * C]) for t in range(N)]
            best = []
            for a in range(na):
                if cls and a == 0:
                    best.append((fb(float("-inf")), 0))
                    continue
                bs, bj = fb(float("-inf")), 0
                for j in range(nb):
                    if dist and j == 0:
                        continue
                    s = 0
                    for k in range(C):
                        s = fma(u[2 * a][k], u[2 * j + 1][k], s)
                    if gt(s, bs):
                        bs, bj = s, j
                best.append((bs, bj))
            order = sorted(range(na), key=lambda a: (-bf(best[a][0]), a))
            res.append([(a, best[a][1]) for a in order])
        return res

    def pipeline(x, B, N, C, cls, dist, target):
        na, nb = (N + 1) // 2, N // 2
        X, U, ST, PA, RE, OR = 0x1000000, 0x2000000, 0x3000, 0x4000000, 0x5000000, 0x6000000
        xb = struct.pack(f"<{len(x)}I", *x)
        flags = cls | (dist << 1)
        o = launch("merge_normalize_f32", ((B * N + 15) // 16, 1, 1),
                   [("x", X, xb, False), ("u", U, bytes(4 * B * N * C), True), ("st", ST, bytes(8), True)],
                   params(src=X, dst=U, status=ST, batch=B, n=N, c=C, na=na, nb=nb, flags=flags),
                   must_write=("u",))
        ub, st = o["u"], int.from_bytes(o["st"], "little")
        ax, nbt = (na + 63) // 64, (nb + 63) // 64
        want = -(-target // (ax * B))
        splits = min(max(want, 1), nbt)
        tiles = -(-nbt // splits)
        splits = -(-nbt // tiles)
        o = launch("merge_similarity", (ax, splits, B),
                   [("u", U, ub, False), ("pa", PA, bytes(8 * B * splits * na), True)],
                   params(src=U, dst=PA, batch=B, n=N, c=C, na=na, nb=nb, splits=splits, tiles=tiles, flags=flags),
                   must_write=("pa",))
        o = launch("merge_reduce", ((B * na + 255) // 256, 1, 1),
                   [("pa", PA, o["pa"], False), ("re", RE, bytes(8 * B * na), True)],
                   params(src=PA, dst=RE, batch=B, n=N, c=C, na=na, nb=nb, splits=splits, tiles=tiles, flags=flags),
                   must_write=("re",))
        o = launch("merge_rank", ((na + 255) // 256, B, 1),
                   [("re", RE, o["re"], False), ("or", OR, bytes(8 * B * na), True)],
                   params(src=RE, dst=OR, batch=B, n=N, c=C, na=na, nb=nb, splits=splits, tiles=tiles, flags=flags),
                   must_write=("or",))
        pairs = [struct.unpack_from("<II", o["or"], 8 * i) for i in range(B * na)]
        u = struct.unpack(f"<{B * N * C}I", ub)
        return [pairs[b * na:(b + 1) * na] for b in range(B)], u, st, splits

    fails = []

    def check(ok, line):
        fails.append(not ok)
        print(line, flush=True)

    # ---- the plan: normalise, similarity, reduce, rank ----
    random.seed(seed)
    for _ in range(count):
        B = random.choice([1, 2])
        N = random.choice([2, 3, 5, 9, 64, 66, 131, 140])
        C = random.choice([1, 3, 16, 17, 35])
        cls, dist = random.randint(0, 1), random.randint(0, 1)
        style = random.randint(0, 2)
        if style == 0:  # small integers: exact ties
            vals = [float(random.randint(-2, 2)) for _ in range(B * N * C)]
        else:
            vals = [random.uniform(-2, 2) for _ in range(B * N * C)]
        if style == 2:  # duplicate and all-zero rows
            for r in range(2, B * N):
                if random.random() < 0.2:
                    vals[r * C:(r + 1) * C] = vals[(r - 2) * C:(r - 1) * C]
                elif random.random() < 0.1:
                    vals[r * C:(r + 1) * C] = [0.0] * C
        x = [fb(v) for v in vals]
        target = random.choice([1, 1000])
        got, u, st, splits = pipeline(x, B, N, C, cls, dist, target)
        want = model(x, B, N, C, cls, dist)
        uw = [v for r in range(B * N) for v in normalise(x[r * C:(r + 1) * C])]
        ok_u = list(u) == uw
        check(got == want and ok_u and st == 0,
              f"plan B={B} N={N} C={C} cls={cls} dist={dist} style={style} splits={splits}: "
              f"u {'ok' if ok_u else 'DIFF'}, ranking {'ok' if got == want else 'DIFF'}, status {st}")
        if got != want:
            print("  got ", got[0][:10])
            print("  want", want[0][:10])
    # non-finite metric: the lowest flat index of a NaN / infinity, as !index
    x = [fb(1.0)] * (2 * 5 * 3)
    x[17], x[23] = fb(float("nan")), fb(float("inf"))
    _, _, st, _ = pipeline(x, 2, 5, 3, 0, 0, 1)
    check((~st) & (2**64 - 1) == 17, f"non-finite metric: status {st:#x} -> index {(~st) & (2**64 - 1)}")

    # ---- the tensor-core plan: pack, similarity_mma, reduce, rank ----
    fmt = {"f16": S.F16, "bf16": S.BF16}
    random.seed(seed + 1)
    near = 0
    for case in range(max(count, 2)):
        t = MMA_TYPES[case % 2]
        B = random.choice([1, 2])
        N = random.choice([2, 5, 9, 66, 131, 260, 300])
        C = random.choice([1, 7, 16, 33, 40])
        cls, dist = random.randint(0, 1), random.randint(0, 1)
        style = random.randint(0, 2)
        if case == 0:  # two B tiles and two channel stages, small integers: exact ties
            B, N, C, style = 1, 300, 40, 0
        if case == 1:  # two 64-channel k-blocks of the wgmma similarity
            B, N, C = 1, 131, 72
        if style == 0:
            vals = [float(random.randint(-2, 2)) for _ in range(B * N * C)]
        else:
            vals = [random.uniform(-2, 2) for _ in range(B * N * C)]
        if style == 2:
            for r in range(2, B * N):
                if random.random() < 0.2:
                    vals[r * C:(r + 1) * C] = vals[(r - 2) * C:(r - 1) * C]
                elif random.random() < 0.1:
                    vals[r * C:(r + 1) * C] = [0.0] * C
        xs = [S.f32_to_format(fb(v), fmt[t]) for v in vals]
        x32 = [S.format_to_f32(h, fmt[t]) for h in xs]
        na, nb = (N + 1) // 2, N // 2
        NP, CP = -(-na // TC_TILE) * TC_TILE, -(-C // TC_K) * TC_K
        X, PK, IV, ST, PA, RE, OR = 0x1000000, 0x2000000, 0x3000000, 0x3000, 0x4000000, 0x5000000, 0x6000000
        flags = cls | (dist << 1)
        common = dict(batch=B, n=N, c=C, na=na, nb=nb, flags=flags)
        o = launch(f"merge_pack_{t}", ((B * N + 15) // 16, 1, 1),
                   [("x", X, struct.pack(f"<{len(xs)}H", *xs), False), ("pk", PK, bytes(2 * B * 2 * NP * CP), True),
                    ("iv", IV, bytes(4 * B * N), True), ("st", ST, bytes(8), True)],
                   params(src=X, dst=PK, aux=IV, status=ST, **common), must_write=("iv",))
        pk, iv, iv_bytes = o["pk"], list(struct.unpack(f"<{B * N}I", o["iv"])), o["iv"]
        st = int.from_bytes(o["st"], "little")
        want_pk = bytearray(len(pk))
        ys, ivw = [], []
        for row in range(B * N):
            y, inv = scaled(x32[row * C:(row + 1) * C])
            ys.append(y)
            ivw.append(inv)
            b, tok = divmod(row, N)
            base = ((2 * b + (tok & 1)) * NP + tok // 2) * CP
            for k, v in enumerate(y):
                struct.pack_into("<H", want_pk, 2 * (base + k), S.f32_to_format(v, fmt[t]))
        ok_pack = pk == bytes(want_pk) and iv == ivw and st == 0
        ax, nbt = NP // TC_TILE, -(-nb // TC_TILE)
        target = random.choice([1, 1000])
        want_splits = -(-target // (ax * B))
        splits = min(max(want_splits, 1), nbt)
        tiles = -(-nbt // splits)
        splits = -(-nbt // tiles)
        o = launch(f"merge_similarity_mma_{t}", (ax, splits, B),
                   [("pk", PK, pk, False), ("iv", IV, o["iv"], False), ("pa", PA, bytes(8 * B * splits * na), True)],
                   params(src=PK, dst=PA, aux=IV, splits=splits, tiles=tiles, **common), must_write=("pa",))
        # The sm_90a wgmma similarity on the same operands: its k16 steps are mma.sync's, so in
        # the interpreter's tensor-core model the partial bests are the same bit for bit.
        o90 = launch(f"merge_similarity_wgmma_{t}", (ax, splits, B),
                     [("pk", PK, pk, False), ("iv", IV, iv_bytes, False), ("pa", PA, bytes(8 * B * splits * na), True)],
                     params(src=PK, dst=PA, aux=IV, splits=splits, tiles=tiles, **common), must_write=("pa",),
                     dynamic_shared=WG_SHARED)
        check(o90["pa"] == o["pa"], f"wgmma similarity {t} B={B} N={N} C={C}: partial bests as mma.sync's")
        o = launch("merge_reduce", ((B * na + 255) // 256, 1, 1),
                   [("pa", PA, o["pa"], False), ("re", RE, bytes(8 * B * na), True)],
                   params(src=PA, dst=RE, splits=splits, tiles=tiles, **common), must_write=("re",))
        red = [struct.unpack_from("<II", o["re"], 8 * i) for i in range(B * na)]
        o = launch("merge_rank", ((na + 255) // 256, B, 1),
                   [("re", RE, o["re"], False), ("or", OR, bytes(8 * B * na), True)],
                   params(src=RE, dst=OR, splits=splits, tiles=tiles, **common), must_write=("or",))
        order = [struct.unpack_from("<II", o["or"], 8 * i) for i in range(B * na)]
        near0 = near
        # Scores: the exact dot of the y rows (products of 16-bit values are exact; f64 sums of
        # <= 40 of them are exact for small integers and within 2^-50 otherwise) times inv_a
        # times inv_b. Small integers: the mma sums are exact too, so the kernel must equal the
        # model bit for bit (ties included); otherwise within the f32 accumulation bound.
        bad = 0
        for b in range(B):
            for a in range(na):
                bs_, bj_ = red[b * na + a]
                if cls and a == 0:
                    bad += (bs_, bj_) != (fb(float("-inf")), 0)
                    continue
                ya, ia = ys[b * N + 2 * a], bf(ivw[b * N + 2 * a])
                exact, bound = [], []
                for j in range(nb):
                    yj, ij = ys[b * N + 2 * j + 1], bf(ivw[b * N + 2 * j + 1])
                    dot = sum(bf(p) * bf(q) for p, q in zip(ya, yj))
                    if style == 0:
                        exact.append(bf(mul(mul(fb(dot), fb(ia)), fb(ij))))
                        bound.append(0.0)
                    else:
                        exact.append(dot * ia * ij)
                        mag = sum(abs(bf(p) * bf(q)) for p, q in zip(ya, yj)) * ia * ij
                        bound.append((C // 16 + 4) * 2.0 ** -23 * mag + 4 * 2.0 ** -24 * abs(dot * ia * ij))
                cand = [j for j in range(nb) if not (dist and j == 0)]
                if not cand:
                    bad += bs_ != fb(float("-inf"))
                    continue
                best = max(exact[j] for j in cand)
                first = min(j for j in cand if exact[j] == best)
                if style == 0:
                    bad += (bs_, bj_) != (fb(best), first)
                elif bj_ != first:
                    near += 1
                    tol = bound[bj_] + bound[first]
                    bad += not (bj_ in cand and exact[bj_] >= best - tol and abs(bf(bs_) - exact[bj_]) <= bound[bj_])
                else:
                    bad += abs(bf(bs_) - exact[bj_]) > bound[bj_]
            ranked = sorted(range(na), key=lambda a: (-bf(red[b * na + a][0]), a))
            bad += order[b * na:(b + 1) * na] != [(a, red[b * na + a][1]) for a in ranked]
        check(ok_pack and bad == 0,
              f"mma plan {t} B={B} N={N} C={C} cls={cls} dist={dist} style={style} splits={splits}: "
              f"pack {'ok' if ok_pack else 'DIFF'}, {bad} bad rows, {near - near0} near-ties")
    print(f"  mma plans: {near} near-tie choices (a different B within the bound)")

    # ---- applying a plan: sum, mean, wavg, normalise in 16 bits, unmerge ----

    def to32(bits, t):
        return bits if t == "f32" else S.format_to_f32(bits, fmt[t])

    def from32(bits, t):
        return bits if t == "f32" else S.f32_to_format(bits, fmt[t])

    def pack(vals, t):
        return struct.pack(f"<{len(vals)}{'I' if SIZE[t] == 4 else 'H'}", *vals)

    def unpack(raw, t):
        return struct.unpack(f"<{len(raw) // SIZE[t]}{'I' if SIZE[t] == 4 else 'H'}", raw)

    random.seed(seed + 3)
    B, N, O = 2, 5, 3
    members = [0, 1, 2, 4, 3, 0, 3, 1, 2, 4]  # per batch: slot s holds members[offsets[s]..offsets[s+1]]
    offsets = [0, 1, 4, 5, 0, 2, 3, 5]
    X, M, OF, Y, SZ, OS, ST = 0x1000000, 0x2000000, 0x3000000, 0x4000000, 0x5000000, 0x6000000, 0x7000
    for t in FLOATS:
        C = 19
        xs = [from32(fb(random.uniform(-3, 3)), t) for _ in range(B * N * C)]
        sizes = [fb(random.choice([1.0, 2.0, 0.5, 3.25])) for _ in range(B * N)]
        for mode in ["sum", "mean", "wavg"]:
            o = launch(f"merge_{mode}_{t}", (B * O, 1, 1),
                       [("x", X, pack(xs, t), False), ("m", M, struct.pack("<10I", *members), False),
                        ("of", OF, struct.pack("<8I", *offsets), False), ("y", Y, bytes(SIZE[t] * B * O * C), True),
                        ("sz", SZ, struct.pack("<10I", *sizes), False), ("os", OS, bytes(4 * B * O), True),
                        ("st", ST, bytes(8), True)],
                       params(src=X, dst=Y, status=ST, aux=M, offsets=OF, sizes=SZ, out_sizes=OS,
                              batch=B, n=N, c=C, out=O),
                       must_write=("y", "os") if mode == "wavg" else ("y",))
            y = unpack(o["y"], t)
            bad, wsz = 0, []
            for b in range(B):
                for s in range(O):
                    src = members[b * N + offsets[b * (O + 1) + s]:b * N + offsets[b * (O + 1) + s + 1]]
                    w = 0
                    for tt in src:
                        w = add(w, sizes[b * N + tt])
                    wsz.append(w)
                    for k in range(C):
                        def xv(tt):
                            return to32(xs[(b * N + tt) * C + k], t)
                        if len(src) == 1:  # one source is copied bit for bit
                            want = xs[(b * N + src[0]) * C + k]
                        elif mode == "wavg":
                            acc = 0
                            for tt in src:
                                acc = fma(xv(tt), sizes[b * N + tt], acc)
                            want = from32(div(acc, w), t)
                        else:
                            acc = xv(src[0])
                            for tt in src[1:]:
                                acc = add(acc, xv(tt))
                            if mode == "mean":
                                acc = div(acc, fb(float(len(src))))
                            want = from32(acc, t)
                        bad += y[(b * O + s) * C + k] != want
            st = int.from_bytes(o["st"], "little")
            extra, ok = "", bad == 0 and st == 0
            if mode == "wavg":
                ok_s = list(struct.unpack(f"<{B * O}I", o["os"])) == wsz
                ok = ok and ok_s
                extra = f", sizes {'ok' if ok_s else 'DIFF'}"
            check(ok, f"{mode} {t}: {bad} mismatches{extra}, status {st}")
        # normalise in this dtype
        xs2 = [from32(fb(random.uniform(-3, 3)), t) for _ in range(2 * 7 * 21)]
        o = launch(f"merge_normalize_{t}", ((14 + 15) // 16, 1, 1),
                   [("x", X, pack(xs2, t), False), ("u", Y, bytes(4 * 14 * 21), True), ("st", ST, bytes(8), True)],
                   params(src=X, dst=Y, status=ST, batch=2, n=7, c=21), must_write=("u",))
        u = list(struct.unpack(f"<{14 * 21}I", o["u"]))
        uw = [v for r in range(14) for v in normalise([to32(b, t) for b in xs2[r * 21:(r + 1) * 21]])]
        check(u == uw, f"normalize {t}: {'ok' if u == uw else 'DIFF'}")
        # unmerge: out[b, t] = y[b, slots[b, t]], bit copies (NaN payloads and -0 included);
        # C past the block size so threads loop over channels
        for (ub, un, uo, uc) in [(2, 5, 3, 19), (1, 7, 7, 1), (3, 4, 1, 2 * BLOCK + 3)]:
            slots = [random.randrange(uo) for _ in range(ub * un)]
            width = 8 * SIZE[t]
            ys = [random.getrandbits(width) for _ in range(ub * uo * uc)]
            ys[0] = (1 << (width - 1))  # -0
            ys[-1] = (1 << width) - 1  # a NaN with every payload bit set
            o = launch(f"merge_unmerge_{t}", (ub * un, 1, 1),
                       [("y", X, pack(ys, t), False), ("slots", M, struct.pack(f"<{ub * un}I", *slots), False),
                        ("out", Y, bytes(SIZE[t] * ub * un * uc), True)],
                       params(src=X, dst=Y, aux=M, batch=ub, n=un, c=uc, out=uo), must_write=("out",))
            got = unpack(o["out"], t)
            want = [ys[((g // un) * uo + slots[g]) * uc + k] for g in range(ub * un) for k in range(uc)]
            bad = sum(a != b for a, b in zip(got, want))
            check(bad == 0, f"unmerge {t} B={ub} N={un} O={uo} C={uc}: {bad} mismatches")
    # a size that is not finite and > 0: the lowest index, as !index
    sizes = [fb(1.0)] * (B * N)
    sizes[7], sizes[3] = fb(-1.0), fb(float("nan"))
    o = launch("merge_wavg_f32", (B * O, 1, 1),
               [("x", X, bytes(4 * B * N * 4), False), ("m", M, struct.pack("<10I", *members), False),
                ("of", OF, struct.pack("<8I", *offsets), False), ("y", Y, bytes(4 * B * O * 4), True),
                ("sz", SZ, struct.pack("<10I", *sizes), False), ("os", OS, bytes(4 * B * O), True),
                ("st", ST, bytes(8), True)],
               params(src=X, dst=Y, status=ST, aux=M, offsets=OF, sizes=SZ, out_sizes=OS, batch=B, n=N, c=4, out=O))
    bad_index = (~int.from_bytes(o["st"], "little")) & (2**64 - 1)
    check(bad_index == 3, f"bad size: status -> index {bad_index}")

    took = time.time() - started
    if any(fails):
        print(f"merge simulation FAILED: {sum(fails)} of {len(fails)} checks ({took:.1f} s)")
        return 1
    print(f"merge simulation passed: {len(fails)} checks ({took:.1f} s)")
    return 0


def main():
    ap = ptxgen.parser(__doc__, stdout_help="print one module's PTX instead of writing",
                       stdout_choices=["merge", "merge_sm90"])
    ap.add_argument("--simulate", type=int, nargs="?", const=4, metavar="CASES",
                    help="run CASES (default 4) random plan cases and the "
                    "apply kernels on kernels/ptx_sim.py against a model of the f32 contract")
    ap.add_argument("--seed", type=int, default=0, help="seed of --simulate")
    args = ap.parse_args()
    if args.simulate is not None:
        import ptx_sim
        try:
            return simulate(args.seed, args.simulate)
        except ptx_sim.SimError as e:
            print(f"merge simulation FAILED: ptx_sim: {e}")
            return 2
    if args.list:
        for name, _, _ in entries():
            print(name, PARAM_BYTES)
        for name in wg_entries():
            print(name, PARAM_BYTES)
        return 0
    return ptxgen.emit("gen_merge.py", {"merge": generate, "merge_sm90": generate_sm90}, args)


if __name__ == "__main__":
    sys.exit(main())
