//! AVX-512 argmin micro-kernels (pulp `V4`): f32 FMA, and `vdpbf16ps` for bf16.
//!
//! Lanes hold 16 codes; each step broadcasts one panel value of a row (`x_d`, or the bf16 pair
//! `(x_2j, x_2j+1)`) and multiply-adds it into that row's accumulators, so each lane runs the
//! contract's FMA chain over `d` ascending. `vdpbf16ps` computes, per lane,
//! `acc ← fma(a_hi, b_hi, acc)` then `acc ← fma(a_lo, b_lo, acc)` (bf16 products are exact in
//! f32), reading subnormal inputs as zero and flushing subnormal results to zero — the panel and
//! the packed codebook put `x_2j` / `e_2j` in the high half, so the chain runs in `d` order.
//!
//! Two loop shapes (the tuning constants are the `const` arguments in [`F32::search`] /
//! [`Bf16::search`]):
//! - [`small`]: for `D ∈ {4, 16}` (f32) / `D = 16` (bf16) the whole tile `D × NRV·16`
//!   lives in registers while every row block of the chunk streams past it;
//! - [`small_rows`]: `D = 8` (f32 and bf16); a row block's running bests stay in registers
//!   while the tiles of an L2-sized codebook block stream past (loaded at each step);
//! - [`general`]: any `D`; the codebook is swept in blocks of about [`BLOCK_BYTES`] (kept in
//!   L2) and, for each row block, tile by tile with the tile loaded from L1/L2 at each step.

use super::{valid_mask, Kernel, Lanes, Score};
use crate::argmin::{Prepared, GROUP};
use crate::dtype::Float;
use core::arch::asm;
use core::arch::x86_64::{__m512, __m512i, _CMP_LT_OQ};
use pulp::x86::V4;

/// Codebook bytes per block of the general loop: about a quarter of this machine's L2.
const BLOCK_BYTES: usize = 256 * 1024;

// Tile shapes, `(MR rows, NRV groups of 16 codes)`: the accumulators are `MR·NRV` registers,
// the small-D tiles `D·NRV` (or `D/2·NRV`) more, all within the 32 zmm registers. Chosen by
// measuring on Zen 4 (one thread): at D = 8, (8, 1) beat (4, 2), (3, 2), (6, 2), (12, 1); at
// D = 256, (12, 1) beat (6, 2), (8, 2), (4, 4) for f32, and (4, 4) was best for bf16. On Zen 5
// (2 × 512-bit FMA pipes), D = 8 runs [`small_rows`] with (6, 2), f32 and bf16: against `small`
// ((8, 1) f32, (4, 2) bf16) 7–15 % faster at 65536 × 16384 and 12–15 % at 4096 × 262144;
// (8, 1), (4, 2), (4, 4) and (6, 1) were slower than (6, 2) in `small_rows`.
const F32_D4: (usize, usize) = (2, 4);
const F32_D8: (usize, usize) = (6, 2);
const F32_D16: (usize, usize) = (6, 1);
const F32_ANY: (usize, usize) = (12, 1);
const BF16_D8: (usize, usize) = (6, 2);
const BF16_D16: (usize, usize) = (8, 1);
const BF16_ANY: (usize, usize) = (4, 4);
const _: () = {
    let small = [(4, F32_D4), (16, F32_D16), (8, BF16_D16)];
    let mut i = 0;
    while i < small.len() {
        let (w, (mr, nrv)) = small[i];
        assert!(mr * nrv + w * nrv <= 28, "small-D tile and accumulators must fit the registers");
        assert!(nrv == 1 || nrv == 2 || nrv == 4, "NRV must divide the 4-group padding");
        i += 1;
    }
    assert!(F32_ANY.0 * F32_ANY.1 <= 24 && BF16_ANY.0 * BF16_ANY.1 <= 24);
    // `small_rows`: accumulators, each row's best scores and indices, one tile row.
    let rows = [F32_D8, BF16_D8];
    let mut i = 0;
    while i < rows.len() {
        let (mr, nrv) = rows[i];
        assert!(mr * nrv + 2 * mr + nrv <= 28 && (nrv == 1 || nrv == 2 || nrv == 4));
        i += 1;
    }
    assert!(crate::argmin::PAD.is_multiple_of(4 * GROUP));
};

/// One multiply-add step on 16 lanes: how a panel value is broadcast, a tile row loaded, and
/// the two folded into an f32 accumulator.
trait Dot: Copy {
    /// Panel and tile element.
    type X: Copy;
    /// A broadcast panel value or a loaded tile row.
    type V: Copy;
    fn zero(s: V4) -> Self::V;
    fn bcast(s: V4, x: Self::X) -> Self::V;
    /// # Safety
    /// `p` must be valid for reading 16 `X`.
    unsafe fn load(s: V4, p: *const Self::X) -> Self::V;
    fn madd(s: V4, acc: __m512, x: Self::V, e: Self::V) -> __m512;
}

#[derive(Clone, Copy)]
struct FmaF32;

impl Dot for FmaF32 {
    type X = f32;
    type V = __m512;
    #[inline(always)]
    fn zero(s: V4) -> __m512 {
        s.avx512f._mm512_setzero_ps()
    }
    #[inline(always)]
    fn bcast(s: V4, x: f32) -> __m512 {
        s.avx512f._mm512_set1_ps(x)
    }
    #[inline(always)]
    unsafe fn load(s: V4, p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f32 at `p`; loadu has no alignment needs.
        unsafe { s.avx512f._mm512_loadu_ps(p) }
    }
    #[inline(always)]
    fn madd(s: V4, acc: __m512, x: __m512, e: __m512) -> __m512 {
        s.avx512f._mm512_fmadd_ps(x, e, acc)
    }
}

#[derive(Clone, Copy)]
struct DotBf16;

/// `acc + a_hi·b_hi + a_lo·b_lo` per lane, as `vdpbf16ps` (see the module docs).
///
/// A `#[target_feature]` function so that the `zmm` registers are allowed; it is inlined into
/// the kernels, which have the same features.
#[target_feature(enable = "avx512f")]
#[inline]
fn vdpbf16ps(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
    let mut acc = acc;
    // SAFETY: the instruction reads and writes these registers only. It needs AVX512_BF16:
    // `DotBf16` runs only inside `Bf16` kernels, and a `Bf16` exists only when the CPU has it.
    unsafe {
        asm!("vdpbf16ps {acc}, {a}, {b}", acc = inout(zmm_reg) acc, a = in(zmm_reg) a, b = in(zmm_reg) b,
             options(pure, nomem, nostack, preserves_flags));
    }
    acc
}

impl Dot for DotBf16 {
    type X = u32;
    type V = __m512i;
    #[inline(always)]
    fn zero(s: V4) -> __m512i {
        s.avx512f._mm512_setzero_si512()
    }
    #[inline(always)]
    fn bcast(s: V4, x: u32) -> __m512i {
        s.avx512f._mm512_set1_epi32(x as i32)
    }
    #[inline(always)]
    unsafe fn load(s: V4, p: *const u32) -> __m512i {
        // SAFETY: the caller guarantees 16 readable u32 at `p`; loadu has no alignment needs.
        unsafe { s.avx512f._mm512_loadu_si512(p.cast()) }
    }
    #[inline(always)]
    fn madd(_s: V4, acc: __m512, x: __m512i, e: __m512i) -> __m512 {
        // SAFETY: the `V4` token proves AVX-512F, the only feature the function enables.
        unsafe { vdpbf16ps(acc, x, e) }
    }
}

/// Code indices `base + lane`.
#[inline(always)]
fn codes(f: pulp::core_arch::x86::Avx512f, base: u32) -> __m512i {
    let iota: __m512i = pulp::cast([0u32, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
    f._mm512_add_epi32(iota, f._mm512_set1_epi32(base as i32))
}

/// Per lane, the first strictly smaller score among the `valid` lanes of `sc` replaces
/// (`best`, `idx`) with (score, its code).
#[inline(always)]
fn fold(
    f: pulp::core_arch::x86::Avx512f,
    sc: __m512,
    valid: u16,
    codes: __m512i,
    best: &mut __m512,
    idx: &mut __m512i,
) {
    let m = f._mm512_mask_cmp_ps_mask::<_CMP_LT_OQ>(valid, sc, *best);
    *best = f._mm512_mask_mov_ps(*best, m, sc);
    *idx = f._mm512_mask_mov_epi32(*idx, m, codes);
}

/// Folds one row's `NRV` accumulator vectors (codes `base + 16·v + lane`) into its lanes.
#[inline(always)]
fn update<const NRV: usize, S: Score>(
    s: V4,
    acc: &[__m512; NRV],
    bias: &[__m512; NRV],
    valid: &[u16; NRV],
    base: u32,
    l: &mut Lanes,
) {
    let f = s.avx512f;
    let mut sc = [f._mm512_setzero_ps(); NRV];
    for v in 0..NRV {
        sc[v] = S::v4(f, acc[v], bias[v]);
    }
    // SAFETY: `Lanes` is 64-byte aligned and starts with 16 f32.
    let best = unsafe { f._mm512_load_ps(l.s.as_ptr()) };
    // Branch-free: a test "did any lane improve?" mispredicts too often to pay off.
    let mut best = best;
    // SAFETY: `Lanes` is 64-byte aligned; its 16 u32 start 64 bytes in.
    let mut idx = unsafe { f._mm512_load_si512(l.i.as_ptr().cast()) };
    for v in 0..NRV {
        fold(f, sc[v], valid[v], codes(f, base + (v * GROUP) as u32), &mut best, &mut idx);
    }
    // SAFETY: as for the loads.
    unsafe {
        f._mm512_store_ps(l.s.as_mut_ptr(), best);
        f._mm512_store_si512(l.i.as_mut_ptr().cast(), idx);
    }
}

/// Tiles of `NRV` groups, each `[W][16]` — all of them in registers while the chunk's row
/// blocks (`[W][MR]` each) stream past.
#[target_feature(enable = "avx512f")]
fn small<const W: usize, const MR: usize, const NRV: usize, S: Score, D: Dot>(
    s: V4,
    tiles: &[D::X],
    bias: &[f32],
    k: usize,
    panel: &[D::X],
    lanes: &mut [Lanes],
) {
    let f = s.avx512f;
    let tile_len = NRV * W * GROUP;
    assert!(panel.len() == lanes.len() * W && lanes.len().is_multiple_of(MR));
    assert!(tiles.len().is_multiple_of(tile_len) && bias.len() * W == tiles.len());
    for (t, (tile, tb)) in tiles.chunks_exact(tile_len).zip(bias.chunks_exact(NRV * GROUP)).enumerate() {
        let g0 = t * NRV;
        if g0 * GROUP >= k {
            break;
        }
        let mut e = [[D::zero(s); NRV]; W];
        let mut bv = [f._mm512_setzero_ps(); NRV];
        let mut valid = [0u16; NRV];
        for v in 0..NRV {
            for (j, ej) in e.iter_mut().enumerate() {
                // SAFETY: group v, step j starts at (v·W + j)·16 < tile_len (asserted above).
                ej[v] = unsafe { D::load(s, tile.as_ptr().add((v * W + j) * GROUP)) };
            }
            // SAFETY: `tb` holds NRV·16 f32.
            bv[v] = unsafe { f._mm512_loadu_ps(tb.as_ptr().add(v * GROUP)) };
            valid[v] = valid_mask(k, g0 + v);
        }
        let base = (g0 * GROUP) as u32;
        for (xp, ln) in panel.chunks_exact(W * MR).zip(lanes.chunks_exact_mut(MR)) {
            let mut acc = [[f._mm512_setzero_ps(); NRV]; MR];
            for (j, ej) in e.iter().enumerate() {
                for (r, ar) in acc.iter_mut().enumerate() {
                    let xb = D::bcast(s, xp[j * MR + r]);
                    for v in 0..NRV {
                        ar[v] = D::madd(s, ar[v], xb, ej[v]);
                    }
                }
            }
            for (ar, l) in acc.iter().zip(ln.iter_mut()) {
                update::<NRV, S>(s, ar, &bv, &valid, base, l);
            }
        }
    }
}

/// Small `W` with the rows held: the codebook in blocks of about [`BLOCK_BYTES`]; per block, for
/// each row block (`[W][MR]`), its running best scores and indices stay in registers while the
/// block's tiles of `NRV` groups stream past (tile values loaded at each step, from L1/L2), so
/// the per-tile update touches no memory ([`small`]'s update loads and stores each row's lanes
/// at every tile; measurements at the tile-shape constants).
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // acc[r][v], best[r], idx[r]: indices read clearer
fn small_rows<const W: usize, const MR: usize, const NRV: usize, S: Score, D: Dot>(
    s: V4,
    tiles: &[D::X],
    bias: &[f32],
    k: usize,
    panel: &[D::X],
    lanes: &mut [Lanes],
) {
    let f = s.avx512f;
    let tile_len = NRV * W * GROUP;
    assert!(panel.len() == lanes.len() * W && lanes.len().is_multiple_of(MR));
    assert!(tiles.len().is_multiple_of(tile_len) && bias.len() * W == tiles.len());
    let n_tiles = (tiles.len() / tile_len).min(k.div_ceil(NRV * GROUP));
    // Codebook blocks of about BLOCK_BYTES, so that a block stays in L2 for all row blocks.
    let block_tiles = block_tiles::<D::X>(W, NRV);
    for blk in (0..n_tiles).step_by(block_tiles) {
        let blk_end = (blk + block_tiles).min(n_tiles);
        for (xp, ln) in panel.chunks_exact(W * MR).zip(lanes.chunks_exact_mut(MR)) {
            let mut best = [f._mm512_setzero_ps(); MR];
            let mut idx = [f._mm512_setzero_si512(); MR];
            for (r, l) in ln.iter().enumerate() {
                // SAFETY: `Lanes` is 64-byte aligned: 16 f32, then 16 u32.
                unsafe {
                    best[r] = f._mm512_load_ps(l.s.as_ptr());
                    idx[r] = f._mm512_load_si512(l.i.as_ptr().cast());
                }
            }
            for t in blk..blk_end {
                let eptr = tiles[t * tile_len..][..tile_len].as_ptr();
                let mut acc = [[f._mm512_setzero_ps(); NRV]; MR];
                for j in 0..W {
                    let mut e = [D::zero(s); NRV];
                    for (v, ev) in e.iter_mut().enumerate() {
                        // SAFETY: (v·W + j)·16 + 16 ≤ NRV·W·16 = tile_len for j < W.
                        *ev = unsafe { D::load(s, eptr.add((v * W + j) * GROUP)) };
                    }
                    for (r, ar) in acc.iter_mut().enumerate() {
                        let xb = D::bcast(s, xp[j * MR + r]);
                        for v in 0..NRV {
                            ar[v] = D::madd(s, ar[v], xb, e[v]);
                        }
                    }
                }
                for v in 0..NRV {
                    let g = t * NRV + v;
                    // SAFETY: `bias` holds 16 f32 per group, and group g < n_tiles·NRV exists.
                    let bv = unsafe { f._mm512_loadu_ps(bias.as_ptr().add(g * GROUP)) };
                    let valid = valid_mask(k, g);
                    let codes = codes(f, (g * GROUP) as u32);
                    for r in 0..MR {
                        fold(f, S::v4(f, acc[r][v], bv), valid, codes, &mut best[r], &mut idx[r]);
                    }
                }
            }
            for (r, l) in ln.iter_mut().enumerate() {
                // SAFETY: as for the loads.
                unsafe {
                    f._mm512_store_ps(l.s.as_mut_ptr(), best[r]);
                    f._mm512_store_si512(l.i.as_mut_ptr().cast(), idx[r]);
                }
            }
        }
    }
}

/// Any width `w`: the codebook in blocks of `block_tiles` tiles; per block, every row block
/// (`[w][MR]`) against every tile (`NRV` groups of `[w][16]`), loading the tile at each step.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
fn general<const MR: usize, const NRV: usize, S: Score, D: Dot>(
    s: V4,
    w: usize,
    block_tiles: usize,
    tiles: &[D::X],
    bias: &[f32],
    k: usize,
    panel: &[D::X],
    lanes: &mut [Lanes],
) {
    let f = s.avx512f;
    let tile_len = NRV * w * GROUP;
    assert!(panel.len() == lanes.len() * w && lanes.len().is_multiple_of(MR));
    assert!(tiles.len().is_multiple_of(tile_len) && bias.len() * w == tiles.len());
    let n_tiles = (tiles.len() / tile_len).min(k.div_ceil(NRV * GROUP));
    let block_tiles = block_tiles.max(1);
    for blk in (0..n_tiles).step_by(block_tiles) {
        let end = (blk + block_tiles).min(n_tiles);
        for (xp, ln) in panel.chunks_exact(w * MR).zip(lanes.chunks_exact_mut(MR)) {
            for t in blk..end {
                let tile = &tiles[t * tile_len..][..tile_len];
                let tb = &bias[t * NRV * GROUP..][..NRV * GROUP];
                let mut bv = [f._mm512_setzero_ps(); NRV];
                let mut valid = [0u16; NRV];
                for v in 0..NRV {
                    // SAFETY: `tb` holds NRV·16 f32.
                    bv[v] = unsafe { f._mm512_loadu_ps(tb.as_ptr().add(v * GROUP)) };
                    valid[v] = valid_mask(k, t * NRV + v);
                }
                let mut acc = [[f._mm512_setzero_ps(); NRV]; MR];
                let (xptr, eptr) = (xp.as_ptr(), tile.as_ptr());
                for j in 0..w {
                    let mut e = [D::zero(s); NRV];
                    for (v, ev) in e.iter_mut().enumerate() {
                        // SAFETY: (v·w + j)·16 + 16 ≤ NRV·w·16 = tile.len() for j < w.
                        *ev = unsafe { D::load(s, eptr.add((v * w + j) * GROUP)) };
                    }
                    for (r, ar) in acc.iter_mut().enumerate() {
                        // SAFETY: j·MR + r < w·MR = xp.len().
                        let xb = D::bcast(s, unsafe { *xptr.add(j * MR + r) });
                        for v in 0..NRV {
                            ar[v] = D::madd(s, ar[v], xb, e[v]);
                        }
                    }
                }
                let base = (t * NRV * GROUP) as u32;
                for (ar, l) in acc.iter().zip(ln.iter_mut()) {
                    update::<NRV, S>(s, ar, &bv, &valid, base, l);
                }
            }
        }
    }
}

/// Tiles per general-loop block for `w` panel values per code and `NRV` groups per tile.
fn block_tiles<X>(w: usize, nrv: usize) -> usize {
    (BLOCK_BYTES / (w * size_of::<X>() * nrv * GROUP)).max(1)
}

/// f32 FMA kernels (f32 and f16 inputs).
#[derive(Clone, Copy)]
pub(crate) struct F32(pub V4);

impl Kernel for F32 {
    type X = f32;

    fn mr(self, d: usize) -> usize {
        match d {
            4 => F32_D4.0,
            8 => F32_D8.0,
            16 => F32_D16.0,
            _ => F32_ANY.0,
        }
    }

    fn width(self, d: usize) -> usize {
        d
    }

    #[inline(always)]
    fn value<T: Float>(self, row: &[T], j: usize) -> f32 {
        row[j].to_f32()
    }

    #[inline(always)]
    fn search<S: Score>(self, p: &Prepared, panel: &[f32], lanes: &mut [Lanes]) {
        let (s, t, b, k) = (self.0, &p.tiles[..], &p.bias[..], p.k);
        // SAFETY (each call): the V4 token proves AVX-512F, the only feature these enable.
        unsafe {
            match p.d {
                4 => small::<4, { F32_D4.0 }, { F32_D4.1 }, S, FmaF32>(s, t, b, k, panel, lanes),
                8 => small_rows::<8, { F32_D8.0 }, { F32_D8.1 }, S, FmaF32>(s, t, b, k, panel, lanes),
                16 => small::<16, { F32_D16.0 }, { F32_D16.1 }, S, FmaF32>(s, t, b, k, panel, lanes),
                d => {
                    let bt = block_tiles::<f32>(d, F32_ANY.1);
                    general::<{ F32_ANY.0 }, { F32_ANY.1 }, S, FmaF32>(s, d, bt, t, b, k, panel, lanes)
                }
            }
        }
    }
}

/// `vdpbf16ps` kernels (bf16 input). Only exists on CPUs with AVX512_BF16.
#[derive(Clone, Copy)]
pub(crate) struct Bf16(V4);

impl Bf16 {
    /// The kernel, if this CPU has AVX512_BF16.
    pub(crate) fn new(s: V4) -> Option<Self> {
        pulp::core_arch::x86::Avx512bf16::is_available().then_some(Bf16(s))
    }
}

impl Kernel for Bf16 {
    type X = u32;

    fn mr(self, d: usize) -> usize {
        match d {
            8 => BF16_D8.0,
            16 => BF16_D16.0,
            _ => BF16_ANY.0,
        }
    }

    fn width(self, d: usize) -> usize {
        d.div_ceil(2)
    }

    #[inline(always)]
    fn value<T: Float>(self, row: &[T], j: usize) -> u32 {
        // The top half of the f32 is the bf16 value itself.
        let bits = |i: usize| row.get(i).map_or(0, |v| v.to_f32().to_bits() >> 16);
        bits(2 * j) << 16 | bits(2 * j + 1)
    }

    #[inline(always)]
    fn search<S: Score>(self, p: &Prepared, panel: &[u32], lanes: &mut [Lanes]) {
        let (s, t, b, k) = (self.0, &p.tiles_bf16[..], &p.bias[..], p.k);
        // SAFETY (each call): the V4 token proves AVX-512F, the only feature these enable.
        unsafe {
            match p.d {
                8 => small_rows::<4, { BF16_D8.0 }, { BF16_D8.1 }, S, DotBf16>(s, t, b, k, panel, lanes),
                16 => small::<8, { BF16_D16.0 }, { BF16_D16.1 }, S, DotBf16>(s, t, b, k, panel, lanes),
                d => {
                    let w = d.div_ceil(2);
                    let bt = block_tiles::<u32>(w, BF16_ANY.1);
                    general::<{ BF16_ANY.0 }, { BF16_ANY.1 }, S, DotBf16>(s, w, bt, t, b, k, panel, lanes)
                }
            }
        }
    }
}
