//! CPU FSQ: threads take chunks of whole tokens (~64 KiB of `z`); each chunk runs with the
//! kernel of the ISA.
//!
//! - portable (`Isa::Scalar`): token by token through [`FsqDim::level`].
//! - AVX2 (pulp `V3`, 8 lanes, blocks of 8 tokens) and AVX-512 (pulp `V4`, 16 lanes, blocks of
//!   32 tokens as two independent halves of 16, so the core has two dependency chains to
//!   overlap). A block's `W·D` values are contiguous: they are loaded as `D` vectors (widened to
//!   f32 exactly; the NaN check is one compare per vector), then **de-interleaved** so that
//!   vector `j` holds dimension `j` of the `W` tokens — lane `t` of output `j` is element
//!   `D·t + j` of the block, picked by lane permutes from the few source vectors that hold those
//!   elements ([`Deinterleave`], tables built once per call; AVX-512 permutes across register
//!   pairs with `vpermt2ps`, AVX2 within one register with `vpermps`, merged by masked blends).
//!   This handles any `D` (6 is not a multiple of 16) without per-token horizontal sums: every
//!   dimension becomes one vector with its constants broadcast, the tanh and rounding are
//!   [`FsqDim::level`]'s operations lane by lane ([`term_lanes`]), and the ids are accumulated
//!   lane-wise (`id += level·basis`) and stored `W` at a time. The level is formed in integers
//!   (`round(v)` converted with round-half-even, then `+ ⌊L/2⌋`, clamped only where the clamp
//!   can act, see [`LaneDim`]) — the same values as the f32 definition. A short tail block is
//!   zero-padded. The tanh's IEEE division is kept: it is part of the definition, and at
//!   about 10% of the kernel's time on Zen 4 not worth an approximation that could change a bit.
//!
//! Every path performs the same correctly rounded f32 operations in the same order (the
//! division of [`crate::fsq::tanh`] included: it is an IEEE division in every lane), so ids
//! are bit-identical across ISAs and thread counts.
//!
//! Statistics ([`statistics`]) are integer counts per chunk of ids, summed in chunk order.

use crate::cpu::par::{for_each_chunk, units_per_chunk};
use crate::cpu::simd::{run_isa, Avx512, IsaOp};
use crate::cpu::Isa;
use crate::dtype::{DType, Float};
use crate::error::Result;
use crate::fsq::{id_error, nan_error, tanh_coef, Fsq, FsqDim, FsqStats, STATS_MAX_BINS};
use core::arch::x86_64::{
    __m256, __m256i, __m512, __m512i, _CMP_UNORD_Q, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT,
};
use pulp::x86::{V3, V4};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Dimensions at most: `Π L_i ≤ 2^32` with every `L_i ≥ 2`.
const MAX_DIMS: usize = 32;
/// AVX-512 lanes.
const L4: usize = 16;
/// Tokens per AVX-512 block: two halves of 16 (one 16-lane vector per dimension each).
const W4: usize = 2 * L4;
/// Tokens per AVX2 block.
const W3: usize = 8;
// Chunks are whole AVX-512 blocks, hence whole AVX2 blocks too.
const _: () = assert!(W4.is_multiple_of(W3));

/// `z` `[N, D]` → ids `[N]`.
pub(crate) fn encode<T: Float>(plan: &Fsq, isa: Isa, z: &[T], ids: &mut [u32]) -> Result<()> {
    let d = plan.dim();
    debug_assert!(d <= MAX_DIMS);
    let tables = Deinterleave::new(isa, d);
    let lane = Lane::new(plan.dims());
    // Whole blocks per chunk, so chunk boundaries never split a SIMD block.
    let per_chunk = units_per_chunk(d * size_of::<T>()).div_ceil(W4) * W4;
    let first_nan = AtomicUsize::new(usize::MAX);
    for_each_chunk(ids, per_chunk, |c, out| {
        let start = c * per_chunk;
        let zc = &z[start * d..(start + out.len()) * d];
        if let Some(i) = run_isa(isa, EncodeChunk { dims: plan.dims(), lane: &lane, tables: &tables, z: zc, out }) {
            first_nan.fetch_min(start * d + i, Ordering::Relaxed);
        }
    });
    match first_nan.into_inner() {
        usize::MAX => Ok(()),
        i => Err(nan_error(i, d)),
    }
}

/// ids `[N]` → codes `[N, D]`. Consecutive dimensions are grouped while the product of their
/// levels stays ≤ [`GROUP_MAX`]; a group's codes depend only on `r = q mod P` (its levels'
/// product), so each group has a table of `P` rows of its codes (each the same f32
/// `(level − half_width) / half_width`, rounded to `O`, as the reference), and a token is one
/// division per group, `r = q mod P, q ← ⌊q / P⌋`, and a copy of row `r` (for the usual
/// `[8, 8, 8, 5, 5, 5]`: two groups, tables of 512 × 3 and 125 × 3 codes). This equals
/// `level_i = ⌊id / basis_i⌋ mod L_i`, dimension 0 least significant. The division is a multiply
/// by a precomputed 64-bit reciprocal ([`FastDiv`]), exact for every `u32`; the last group needs
/// none (`q < P` there, the ids are checked first). A dimension with more levels than
/// `GROUP_MAX` is its own group, with a table up to [`TABLE_MAX`] levels and its codes computed
/// in place above (up to 2^24 levels are allowed). Below `16·TABLE_MAX` ids, building the
/// tables would cost more than it saves: each dimension then has a table of its `L` codes and
/// each code costs a division. Plain code, the same at every ISA.
pub(crate) fn decode<O: Float>(plan: &Fsq, _isa: Isa, ids: &[u32], codes: &mut [O]) -> Result<()> {
    let d = plan.dim();
    let size = plan.codebook_size();
    if let Some(i) = ids.iter().position(|&id| id as u64 >= size) {
        return Err(id_error(i, ids[i], size));
    }
    let per_chunk = units_per_chunk(d * size_of::<O>());
    if ids.len() >= 16 * TABLE_MAX as usize {
        let groups = DecodeGroup::<O>::split(plan.dims());
        for_each_chunk(codes, per_chunk * d, |c, out| decode_rows(&groups, &ids[c * per_chunk..], out));
        return Ok(());
    }
    // Few ids: a table of `L` codes per dimension, a division per code.
    let dims: Vec<(FastDiv, Option<Vec<O>>, &FsqDim)> = plan
        .dims()
        .iter()
        .map(|k| {
            let table = (k.levels <= TABLE_MAX).then(|| (0..k.levels).map(|level| fsq_code(k, level)).collect());
            (FastDiv::new(k.levels), table, k)
        })
        .collect();
    for_each_chunk(codes, per_chunk * d, |c, out| {
        for (row, &id) in out.chunks_exact_mut(d).zip(&ids[c * per_chunk..]) {
            let mut q = id;
            for (o, (div, table, k)) in row.iter_mut().zip(&dims) {
                let next = div.div(q);
                let level = q - next * div.d; // < L, the table's length
                *o = match table {
                    Some(t) => t[level as usize],
                    None => fsq_code(k, level),
                };
                q = next;
            }
        }
    });
    Ok(())
}

/// Codes of `ids` into `out` (`ids.len()` rows of the groups' total width).
///
/// A group of 3 has table rows padded to 4, and copies all 4: one 4-wide move instead of 3
/// narrow ones. The extra value lands on the next group's (or the next row's) first slot,
/// which is written after it; the last row of `out`, with no next row, copies exactly.
#[inline(always)]
fn decode_rows<O: Float>(groups: &[DecodeGroup<'_, O>], ids: &[u32], out: &mut [O]) {
    let d: usize = groups.iter().map(|g| g.width).sum();
    let rows = (out.len() / d).min(ids.len());
    for (i, &id) in ids[..rows].iter().enumerate() {
        // A 4-wide copy may spill one value into the next row, so not on the last.
        let spill = i + 1 < rows;
        let mut at = i * d;
        let mut q = id;
        for g in groups {
            let r = g.next(&mut q) as usize;
            match &g.table {
                Some(t) if g.stride == 4 && spill => {
                    let src: &[O; 4] = t[r * 4..][..4].try_into().expect("4 codes");
                    let dst: &mut [O; 4] = (&mut out[at..at + 4]).try_into().expect("4 slots");
                    *dst = *src;
                }
                Some(t) => copy_row(&mut out[at..at + g.width], &t[r * g.stride..][..g.width]),
                None => out[at] = fsq_code(g.dim, r as u32),
            }
            at += g.width;
        }
    }
}

/// `dst.copy_from_slice(src)` with the usual widths as fixed-size moves (not a `memcpy` call).
#[inline(always)]
fn copy_row<O: Copy>(dst: &mut [O], src: &[O]) {
    match (dst, src) {
        ([a], [x]) => *a = *x,
        ([a, b], [x, y]) => (*a, *b) = (*x, *y),
        ([a, b, c], [x, y, z]) => (*a, *b, *c) = (*x, *y, *z),
        ([a, b, c, e], [x, y, z, w]) => (*a, *b, *c, *e) = (*x, *y, *z, *w),
        (dst, src) => dst.copy_from_slice(src),
    }
}

/// The largest product of levels of a decode group of several dimensions (`P` rows of its codes:
/// with 512, the usual tables stay in L1; 4096 measured 7% slower at `[8, 8, 8, 5, 5, 5]`).
const GROUP_MAX: u32 = 512;
/// The most levels a lone dimension's decode table holds; above it, codes are computed in place.
const TABLE_MAX: u32 = 4096;

/// The code of `level` in dimension `k`: the f32 `(level − half_width) / half_width`, rounded to
/// `O` (the reference's arithmetic).
fn fsq_code<O: Float>(k: &FsqDim, level: u32) -> O {
    O::from_f32((level as f32 - k.half_width) / k.half_width)
}

/// Consecutive dimensions decoded together: `width` of them, the product of whose levels `P` is
/// `div.d` (`None` for the last group, which needs no division).
struct DecodeGroup<'a, O> {
    width: usize,
    /// Codes per table row: `width`, or 4 for a group of 3 (the 4th a copy, never read).
    stride: usize,
    div: Option<FastDiv>,
    /// `P × width` codes, row `r` the codes of the levels `r` splits into; `None` for a lone
    /// dimension above `TABLE_MAX` levels (`dim` computes it in place).
    table: Option<Vec<O>>,
    dim: &'a FsqDim,
}

impl<'a, O: Float> DecodeGroup<'a, O> {
    /// Groups of consecutive dimensions whose levels multiply to at most `GROUP_MAX` (a
    /// dimension above it alone, tabulated up to `TABLE_MAX` levels).
    fn split(dims: &'a [FsqDim]) -> Vec<DecodeGroup<'a, O>> {
        let mut groups = vec![];
        let mut i = 0;
        while i < dims.len() {
            let (mut j, mut p) = (i + 1, dims[i].levels);
            while j < dims.len() && p.checked_mul(dims[j].levels).is_some_and(|x| x <= GROUP_MAX) {
                p *= dims[j].levels;
                j += 1;
            }
            let stride = if j - i == 3 { 4 } else { j - i };
            let table = (p <= TABLE_MAX).then(|| {
                // Row r: the codes of r's levels, dimension i least significant, enumerated
                // like an odometer (no division per entry).
                let codes: Vec<Vec<O>> =
                    dims[i..j].iter().map(|k| (0..k.levels).map(|level| fsq_code(k, level)).collect()).collect();
                let mut levels = vec![0usize; j - i];
                let mut t = Vec::with_capacity(p as usize * stride);
                for _ in 0..p {
                    t.extend(levels.iter().zip(&codes).map(|(&l, c)| c[l]));
                    if j - i == 3 {
                        t.push(codes[0][levels[0]]);
                    }
                    for (l, c) in levels.iter_mut().zip(&codes) {
                        *l += 1;
                        if *l < c.len() {
                            break;
                        }
                        *l = 0;
                    }
                }
                t
            });
            let div = (j < dims.len()).then(|| FastDiv::new(p));
            groups.push(DecodeGroup { width: j - i, stride, div, table, dim: &dims[i] });
            i = j;
        }
        groups
    }
}

impl<O> DecodeGroup<'_, O> {
    /// This group's table row (or level) for the id remainder `q`, and `q` for the next group.
    #[inline(always)]
    fn next(&self, q: &mut u32) -> u32 {
        match self.div {
            Some(div) => {
                let next = div.div(*q);
                let r = *q - next * div.d; // < P
                *q = next;
                r
            }
            None => *q,
        }
    }
}

/// Division of any `u32` by a fixed divisor `d ≥ 2` as a multiply by `M = ⌊(2⁶⁴ − 1)/d⌋ + 1`:
/// `⌊n/d⌋ = ⌊M·n / 2⁶⁴⌋` for every 32-bit `n` (Lemire, Kaser and Kurz, "Faster remainder by
/// direct computation", 2019).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FastDiv {
    m: u64,
    d: u32,
}

impl FastDiv {
    pub(crate) fn new(d: u32) -> FastDiv {
        debug_assert!(d >= 2, "FSQ levels are at least 2");
        FastDiv { m: u64::MAX / u64::from(d) + 1, d }
    }

    #[inline(always)]
    pub(crate) fn div(self, n: u32) -> u32 {
        ((u128::from(self.m) * u128::from(n)) >> 64) as u32
    }
}

#[cfg(test)]
mod fast_div_tests {
    use super::FastDiv;

    /// Exact against `/` for every divisor up to 300 and a spread of numerators including the
    /// extremes and multiples ± 1 (where a reciprocal that is off by one shows).
    #[test]
    fn fast_division_is_exact() {
        for d in (2u32..300).chain([65_535, 65_536, 1 << 20, (1 << 31) - 1, 1 << 31, u32::MAX]) {
            let f = FastDiv::new(d);
            let check = |n: u32| assert_eq!(f.div(n), n / d, "{n} / {d}");
            for n in [0, 1, u32::MAX, u32::MAX - 1, 1 << 31, (1 << 31) - 1] {
                check(n);
            }
            for k in [1u64, 2, 3, 7, 1000, 123_457, u64::from(u32::MAX / d)] {
                let m = k * u64::from(d);
                for n in [m.saturating_sub(1), m, m + 1] {
                    if let Ok(n) = u32::try_from(n) {
                        check(n);
                    }
                }
            }
            let mut x = 0x9E37_79B9u32.wrapping_mul(d);
            for _ in 0..2000 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                check(x);
            }
        }
    }
}

/// Ids per statistics chunk: large, since every chunk carries its own counts (`u32` suffices).
const STATS_CHUNK_IDS: usize = 1 << 18;

/// One chunk's counts and the chunk-relative index of its first id out of range.
#[derive(Default)]
struct StatsPartial {
    levels: Vec<u32>,
    histogram: Vec<u32>,
    bad: Option<usize>,
}

/// Per-dimension level counts and the id histogram in one pass: per-chunk counts, summed in
/// chunk order (integer sums, so the result is independent of the split anyway).
pub(crate) fn statistics(plan: &Fsq, _isa: Isa, ids: &[u32]) -> Result<FsqStats> {
    let size = plan.codebook_size();
    let level_bins: u64 = plan.levels().iter().map(|&l| l as u64).sum();
    let with_levels = level_bins <= STATS_MAX_BINS;
    let with_histogram = size <= STATS_MAX_BINS;
    let mut partials: Vec<StatsPartial> =
        (0..ids.len().div_ceil(STATS_CHUNK_IDS)).map(|_| StatsPartial::default()).collect();
    for_each_chunk(&mut partials, 1, |c, slot| {
        let ids = &ids[c * STATS_CHUNK_IDS..][..STATS_CHUNK_IDS.min(ids.len() - c * STATS_CHUNK_IDS)];
        let mut p = StatsPartial {
            levels: vec![0; if with_levels { level_bins as usize } else { 0 }],
            histogram: vec![0; if with_histogram { size as usize } else { 0 }],
            bad: None,
        };
        for (t, &id) in ids.iter().enumerate() {
            if id as u64 >= size {
                p.bad = Some(t);
                break;
            }
            if with_histogram {
                p.histogram[id as usize] += 1;
            }
            if with_levels {
                let (mut rest, mut base) = (id, 0);
                for &l in plan.levels() {
                    p.levels[base + (rest % l) as usize] += 1;
                    rest /= l;
                    base += l as usize;
                }
            }
        }
        slot[0] = p;
    });
    let mut levels: Option<Vec<Vec<u64>>> =
        with_levels.then(|| plan.levels().iter().map(|&l| vec![0; l as usize]).collect());
    let mut histogram = with_histogram.then(|| vec![0u64; size as usize]);
    for (c, part) in partials.iter().enumerate() {
        if let Some(t) = part.bad {
            let k = c * STATS_CHUNK_IDS + t;
            return Err(id_error(k, ids[k], size));
        }
        if let Some(h) = histogram.as_mut() {
            for (s, &o) in h.iter_mut().zip(&part.histogram) {
                *s += o as u64;
            }
        }
        if let Some(lv) = levels.as_mut() {
            let mut flat = part.levels.iter();
            for s in lv.iter_mut().flatten() {
                *s += *flat.next().expect("one bin per level") as u64;
            }
        }
    }
    Ok(FsqStats { tokens: ids.len(), levels, histogram })
}

/// The lane permutes that de-interleave a block of `W` tokens × `D` dimensions (`W·D` values
/// in `D` vectors) into one vector per dimension. For output `j`, lane `t` wants block element
/// `D·t + j`; each [`Pick`] takes the lanes that live in one source vector (AVX2) or one pair
/// of source vectors (AVX-512). The picks of one output partition its lanes, so the first one
/// needs no blend.
enum Deinterleave {
    None,
    V3(Vec<Vec<Pick<W3>>>),
    V4(Vec<Vec<Pick<L4>>>),
}

/// One permute + blend: `out = blend(mask, out, permute(source, index))`.
#[derive(Clone, Copy)]
struct Pick<const W: usize> {
    /// First source vector (AVX-512: the pair `source, source + 1`).
    source: usize,
    /// Lane index into the source (AVX-512: into the 32 lanes of the pair).
    index: [u32; W],
    /// Lanes of the output this pick writes: bit `t` = lane `t`, and (for AVX2's `blendv`)
    /// `lanes[t] = −1` for those lanes, 0 elsewhere.
    mask: u32,
    lanes: [i32; W],
}

impl Deinterleave {
    fn new(isa: Isa, d: usize) -> Self {
        match isa {
            Isa::V4 => Deinterleave::V4(Self::picks::<L4>(d, 2 * L4)),
            Isa::V3 => Deinterleave::V3(Self::picks::<W3>(d, W3)),
            Isa::Scalar => Deinterleave::None,
        }
    }

    /// For every dimension `j`, the picks covering its `W` lanes from sources of `span` lanes.
    fn picks<const W: usize>(d: usize, span: usize) -> Vec<Vec<Pick<W>>> {
        (0..d)
            .map(|j| {
                let mut picks: Vec<Pick<W>> = Vec::new();
                for t in 0..W {
                    let e = d * t + j;
                    // Source vectors are W lanes; a pick spans `span / W` of them.
                    let source = e / span * (span / W);
                    let p = match picks.iter().position(|p| p.source == source) {
                        Some(i) => &mut picks[i],
                        None => {
                            picks.push(Pick { source, index: [0; W], mask: 0, lanes: [0; W] });
                            picks.last_mut().expect("just pushed")
                        }
                    };
                    p.index[t] = (e % span) as u32;
                    p.mask |= 1 << t;
                    p.lanes[t] = -1;
                }
                picks
            })
            .collect()
    }
}

/// The per-dimension constants of the SIMD kernels: [`FsqDim`]'s, with the level written
/// `round(v) + ⌊L/2⌋` in integers. `round(v)` is an integer of magnitude below `2^24`, so
/// rounding to an integer and adding `⌊L/2⌋` in `i32` gives exactly the f32 sum of the
/// definition wherever the definition's result is below `2^24` — and above, both clamp to
/// `L − 1`. When the clamp cannot act (decided once from `|tanh| ≤ 1`), the `⌊L/2⌋·basis` terms
/// of all such dimensions are added once per id instead ([`Lane::offset`]).
#[derive(Clone, Copy)]
struct LaneDim {
    shift: f32,
    half_l: f32,
    neg_offset: f32,
    basis: u32,
    /// Whether `[0, L−1]` must be enforced: then the level is clamped in integers.
    clamp: bool,
    half_width: i32,
    max_level: i32,
}

/// [`LaneDim`]s of a plan and the constant part of every id.
struct Lane {
    dims: Vec<LaneDim>,
    /// `Σ ⌊L_j/2⌋·basis_j` (wrapping) over the dimensions without clamp.
    offset: u32,
}

impl Lane {
    fn new(dims: &[FsqDim]) -> Self {
        let lane: Vec<LaneDim> = dims
            .iter()
            .map(|k| {
                // `v = fma(y, half_l, −offset)` is monotonic in y and |y| ≤ 1 for every f32
                // input (see `fsq::tanh`), so the levels at y = ±1 bound all others.
                let level = |y: f32| y.mul_add(k.half_l, -k.offset).round_ties_even() + k.half_width;
                LaneDim {
                    shift: k.shift,
                    half_l: k.half_l,
                    neg_offset: -k.offset,
                    basis: k.basis,
                    clamp: !(level(-1.0) >= 0.0 && level(1.0) <= k.max_level),
                    half_width: k.half_width as i32,
                    max_level: k.max_level as i32,
                }
            })
            .collect();
        let offset = lane
            .iter()
            .filter(|k| !k.clamp)
            .fold(0u32, |o, k| o.wrapping_add((k.half_width as u32).wrapping_mul(k.basis)));
        Lane { dims: lane, offset }
    }
}

/// One chunk of tokens.
struct EncodeChunk<'a, T> {
    dims: &'a [FsqDim],
    lane: &'a Lane,
    tables: &'a Deinterleave,
    z: &'a [T],
    out: &'a mut [u32],
}

impl<T: Float> IsaOp for EncodeChunk<'_, T> {
    /// The chunk-relative flat index of the chunk's first NaN.
    type Output = Option<usize>;

    /// Token by token through the definition.
    #[inline(always)]
    fn portable(self) -> Option<usize> {
        let d = self.dims.len();
        if let Some(i) = self.z.iter().position(|x| x.to_f32().is_nan()) {
            return Some(i);
        }
        for (id, row) in self.out.iter_mut().zip(self.z.chunks_exact(d)) {
            *id = row.iter().zip(self.dims).fold(0u32, |acc, (x, k)| acc.wrapping_add(k.level(x.to_f32()) * k.basis));
        }
        None
    }

    #[inline(always)]
    fn v3(self, simd: V3) -> Option<usize> {
        match self.tables {
            Deinterleave::V3(picks) => {
                let x = [simd.avx._mm256_setzero_ps(); MAX_DIMS];
                let block = BlockV3 { simd, lane: self.lane, picks, buf: [0.0; W3 * MAX_DIMS], x };
                blocks(self.z, self.out, self.dims.len(), block)
            }
            _ => self.portable(),
        }
    }

    #[inline(always)]
    fn v4(self, simd: V4) -> Option<usize> {
        match self.tables {
            Deinterleave::V4(picks) => {
                let x = [[simd.avx512f._mm512_setzero_ps(); MAX_DIMS + 1]; 2];
                blocks(self.z, self.out, self.dims.len(), BlockV4 { simd, lane: self.lane, picks, x })
            }
            _ => self.portable(),
        }
    }
}

/// A SIMD block kernel: `W` tokens at a time. (A trait with an inlined method rather than a
/// closure, so that it is compiled with the target features of the caller.)
trait Block<T, const W: usize> {
    /// `src` is `W·d` values, `ids` the block's `W` ids. Returns whether the block holds a NaN
    /// (then `ids` are unspecified).
    fn block(&mut self, src: &[T], ids: &mut [u32; W]) -> bool;
}

/// Runs `block` over blocks of `W` tokens; the tail block is zero-padded. Returns the flat
/// index of the first NaN (blocks stop there).
#[inline(always)]
fn blocks<T: Float, const W: usize>(z: &[T], out: &mut [u32], d: usize, mut block: impl Block<T, W>) -> Option<usize> {
    let first_nan = |b: usize, src: &[T]| src.iter().position(|x| x.to_f32().is_nan()).map(|i| b * W * d + i);
    let full = out.len() / W;
    let (head, tail) = out.split_at_mut(full * W);
    for (b, ids) in head.chunks_exact_mut(W).enumerate() {
        let src = &z[b * W * d..][..W * d];
        if block.block(src, ids.try_into().expect("W ids")) {
            return first_nan(b, src);
        }
    }
    if !tail.is_empty() {
        let src = &z[full * W * d..];
        let mut pad = [T::from_f32(0.0); W4 * MAX_DIMS];
        pad[..src.len()].copy_from_slice(src);
        let mut ids = [0u32; W];
        if block.block(&pad[..W * d], &mut ids) {
            return first_nan(full, src);
        }
        tail.copy_from_slice(&ids[..tail.len()]);
    }
    None
}

/// The lane-wise operations [`term_lanes`] needs, for one vector width.
trait Lanes: Copy {
    type F: Copy;
    type I: Copy;
    fn splat(self, v: f32) -> Self::F;
    fn add(self, a: Self::F, b: Self::F) -> Self::F;
    fn mul(self, a: Self::F, b: Self::F) -> Self::F;
    /// `a·b + c` with one rounding.
    fn fma(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    /// IEEE division.
    fn div(self, a: Self::F, b: Self::F) -> Self::F;
    /// `max` / `min` of non-NaN values.
    fn max(self, a: Self::F, b: Self::F) -> Self::F;
    fn min(self, a: Self::F, b: Self::F) -> Self::F;
    /// Round to the nearest integer, ties to even, as `i32` (`|a| < 2^31`).
    fn round_to_int(self, a: Self::F) -> Self::I;
    /// Wrapping `a + b`.
    fn add_i(self, a: Self::I, b: Self::I) -> Self::I;
    /// Wrapping `a·b` (low 32 bits).
    fn mul_i(self, a: Self::I, b: u32) -> Self::I;
    /// `min(max(a, lo), hi)` as signed integers.
    fn clamp_i(self, a: Self::I, lo: i32, hi: i32) -> Self::I;
    fn splat_i(self, v: u32) -> Self::I;
}

/// [`crate::fsq::tanh_clamped`], lane-wise: the same operations in the same order.
#[inline(always)]
fn tanh_lanes<S: Lanes>(s: S, c: S::F) -> S::F {
    use tanh_coef::*;
    let sq = s.mul(c, c);
    let mut p = s.fma(sq, s.splat(A13), s.splat(A11));
    for a in [A9, A7, A5, A3, A1] {
        p = s.fma(sq, p, s.splat(a));
    }
    p = s.mul(p, c);
    let mut q = s.fma(sq, s.splat(B6), s.splat(B4));
    q = s.fma(sq, q, s.splat(B2));
    q = s.fma(sq, q, s.splat(B0));
    s.div(p, q)
}

/// `acc + level(z)·basis` for one dimension — [`FsqDim::level`], lane-wise — less
/// `⌊L/2⌋·basis` when the dimension needs no clamp (see [`LaneDim`]).
#[inline(always)]
fn term_lanes<S: Lanes>(s: S, k: &LaneDim, z: S::F, acc: S::I) -> S::I {
    let t = s.add(z, s.splat(k.shift));
    // `f32::clamp` on non-NaN values.
    let c = s.min(s.max(t, s.splat(-tanh_coef::CLAMP)), s.splat(tanh_coef::CLAMP));
    let v = s.fma(tanh_lanes(s, c), s.splat(k.half_l), s.splat(k.neg_offset));
    let mut level = s.round_to_int(v);
    if k.clamp {
        level = s.clamp_i(s.add_i(level, s.splat_i(k.half_width as u32)), 0, k.max_level);
    }
    s.add_i(acc, if k.basis == 1 { level } else { s.mul_i(level, k.basis) })
}

impl Lanes for V4 {
    type F = __m512;
    type I = __m512i;
    #[inline(always)]
    fn splat(self, v: f32) -> __m512 {
        self.avx512f._mm512_set1_ps(v)
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        self.avx512f._mm512_add_ps(a, b)
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        self.avx512f._mm512_mul_ps(a, b)
    }
    #[inline(always)]
    fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        self.avx512f._mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    fn div(self, a: __m512, b: __m512) -> __m512 {
        self.avx512f._mm512_div_ps(a, b)
    }
    #[inline(always)]
    fn max(self, a: __m512, b: __m512) -> __m512 {
        self.avx512f._mm512_max_ps(a, b)
    }
    #[inline(always)]
    fn min(self, a: __m512, b: __m512) -> __m512 {
        self.avx512f._mm512_min_ps(a, b)
    }
    #[inline(always)]
    fn round_to_int(self, a: __m512) -> __m512i {
        self.avx512f._mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a)
    }
    #[inline(always)]
    fn add_i(self, a: __m512i, b: __m512i) -> __m512i {
        self.avx512f._mm512_add_epi32(a, b)
    }
    #[inline(always)]
    fn mul_i(self, a: __m512i, b: u32) -> __m512i {
        self.avx512f._mm512_mullo_epi32(a, self.splat_i(b))
    }
    #[inline(always)]
    fn clamp_i(self, a: __m512i, lo: i32, hi: i32) -> __m512i {
        let f = self.avx512f;
        f._mm512_min_epi32(f._mm512_max_epi32(a, f._mm512_set1_epi32(lo)), f._mm512_set1_epi32(hi))
    }
    #[inline(always)]
    fn splat_i(self, v: u32) -> __m512i {
        self.avx512f._mm512_set1_epi32(v as i32)
    }
}

impl Lanes for V3 {
    type F = __m256;
    type I = __m256i;
    #[inline(always)]
    fn splat(self, v: f32) -> __m256 {
        self.avx._mm256_set1_ps(v)
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        self.avx._mm256_add_ps(a, b)
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        self.avx._mm256_mul_ps(a, b)
    }
    #[inline(always)]
    fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        self.fma._mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    fn div(self, a: __m256, b: __m256) -> __m256 {
        self.avx._mm256_div_ps(a, b)
    }
    #[inline(always)]
    fn max(self, a: __m256, b: __m256) -> __m256 {
        self.avx._mm256_max_ps(a, b)
    }
    #[inline(always)]
    fn min(self, a: __m256, b: __m256) -> __m256 {
        self.avx._mm256_min_ps(a, b)
    }
    #[inline(always)]
    fn round_to_int(self, a: __m256) -> __m256i {
        // Round, then convert the (integral) result: exact, independent of MXCSR.
        self.avx._mm256_cvttps_epi32(self.avx._mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a))
    }
    #[inline(always)]
    fn add_i(self, a: __m256i, b: __m256i) -> __m256i {
        self.avx2._mm256_add_epi32(a, b)
    }
    #[inline(always)]
    fn mul_i(self, a: __m256i, b: u32) -> __m256i {
        self.avx2._mm256_mullo_epi32(a, self.splat_i(b))
    }
    #[inline(always)]
    fn clamp_i(self, a: __m256i, lo: i32, hi: i32) -> __m256i {
        let (avx, avx2) = (self.avx, self.avx2);
        avx2._mm256_min_epi32(avx2._mm256_max_epi32(a, avx._mm256_set1_epi32(lo)), avx._mm256_set1_epi32(hi))
    }
    #[inline(always)]
    fn splat_i(self, v: u32) -> __m256i {
        self.avx._mm256_set1_epi32(v as i32)
    }
}

/// The AVX-512 block kernel: 32 tokens, as two independent halves of 16 side by side (two
/// dependency chains for the core to overlap).
struct BlockV4<'a> {
    simd: V4,
    lane: &'a Lane,
    picks: &'a [Vec<Pick<L4>>],
    /// The two halves' vectors, each plus one spare: a pair starting at the last source reads
    /// it (for lanes the mask drops).
    x: [[__m512; MAX_DIMS + 1]; 2],
}

impl BlockV4<'_> {
    /// The lanes `p` takes from `x`.
    #[inline(always)]
    fn pick(simd: V4, x: &[__m512; MAX_DIMS + 1], p: &Pick<L4>) -> __m512 {
        simd.avx512f._mm512_permutex2var_ps(x[p.source], pulp::cast(p.index), x[p.source + 1])
    }

    /// One dimension of the 16 tokens of `x` (`picks` are that dimension's).
    #[inline(always)]
    fn column(simd: V4, x: &[__m512; MAX_DIMS + 1], picks: &[Pick<L4>]) -> __m512 {
        let mut col = Self::pick(simd, x, &picks[0]);
        for p in &picks[1..] {
            col = simd.avx512f._mm512_mask_blend_ps(p.mask as u16, col, Self::pick(simd, x, p));
        }
        col
    }
}

impl<T: Float> Block<T, W4> for BlockV4<'_> {
    #[inline(always)]
    fn block(&mut self, src: &[T], ids: &mut [u32; W4]) -> bool {
        let (simd, lane, picks) = (self.simd, self.lane, self.picks);
        let f = simd.avx512f;
        let d = lane.dims.len();
        let mut nan = 0u16;
        for (h, x) in self.x.iter_mut().enumerate() {
            for (v, s) in x[..d].iter_mut().zip(src[h * L4 * d..].chunks_exact(L4)) {
                *v = pulp::cast(Avx512(simd).load(s));
                nan |= f._mm512_cmp_ps_mask::<_CMP_UNORD_Q>(*v, *v);
            }
        }
        if nan != 0 {
            return true;
        }
        let [x, y] = &self.x;
        let (mut acc_x, mut acc_y) = (f._mm512_set1_epi32(lane.offset as i32), f._mm512_set1_epi32(lane.offset as i32));
        for (k, picks) in lane.dims.iter().zip(picks) {
            let (col_x, col_y) = (Self::column(simd, x, picks), Self::column(simd, y, picks));
            acc_x = term_lanes(simd, k, col_x, acc_x);
            acc_y = term_lanes(simd, k, col_y, acc_y);
        }
        let (ix, iy) = ids.split_at_mut(L4);
        ix.copy_from_slice(&pulp::cast::<_, [u32; L4]>(acc_x));
        iy.copy_from_slice(&pulp::cast::<_, [u32; L4]>(acc_y));
        false
    }
}

/// The AVX2 block kernel: 8 tokens.
struct BlockV3<'a> {
    simd: V3,
    lane: &'a Lane,
    picks: &'a [Vec<Pick<W3>>],
    /// f16 / bf16 blocks widened to f32.
    buf: [f32; W3 * MAX_DIMS],
    x: [__m256; MAX_DIMS],
}

impl<T: Float> Block<T, W3> for BlockV3<'_> {
    #[inline(always)]
    fn block(&mut self, src: &[T], ids: &mut [u32; W3]) -> bool {
        let (simd, lane, picks) = (self.simd, self.lane, self.picks);
        let (avx, avx2) = (simd.avx, simd.avx2);
        let d = lane.dims.len();
        let values: &[f32] = match T::DTYPE {
            DType::F32 => bytemuck::cast_slice(src),
            _ => {
                widen(src, &mut self.buf[..W3 * d]);
                &self.buf[..W3 * d]
            }
        };
        let mut nan = avx._mm256_setzero_ps();
        for (v, s) in self.x.iter_mut().zip(values.chunks_exact(W3)) {
            let a: [f32; W3] = s.try_into().expect("8 lanes");
            *v = pulp::cast(a);
            nan = avx._mm256_or_ps(nan, avx._mm256_cmp_ps::<_CMP_UNORD_Q>(*v, *v));
        }
        if avx._mm256_movemask_ps(nan) != 0 {
            return true;
        }
        let x = &self.x;
        let mut acc = simd.splat_i(lane.offset);
        for (k, picks) in lane.dims.iter().zip(picks) {
            let mut col = avx2._mm256_permutevar8x32_ps(x[picks[0].source], pulp::cast(picks[0].index));
            for p in &picks[1..] {
                let from = avx2._mm256_permutevar8x32_ps(x[p.source], pulp::cast(p.index));
                col = avx._mm256_blendv_ps(col, from, pulp::cast(p.lanes));
            }
            acc = term_lanes(simd, k, col, acc);
        }
        *ids = pulp::cast(acc);
        false
    }
}

/// Widens `src` to f32 exactly, with plain integer / float operations the compiler vectorises
/// (`half`'s `f16::to_f32` checks the CPU per element).
#[inline(always)]
pub(crate) fn widen<T: Float>(src: &[T], dst: &mut [f32]) {
    match T::DTYPE {
        DType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        DType::BF16 => {
            for (o, &b) in dst.iter_mut().zip(bytemuck::cast_slice::<T, u16>(src)) {
                *o = f32::from_bits((b as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, &h) in dst.iter_mut().zip(bytemuck::cast_slice::<T, u16>(src)) {
                *o = f16_to_f32(h);
            }
        }
        DType::U8 => unreachable!("Float excludes u8"),
    }
}

/// IEEE half → f32, exactly (NaN payloads kept and quieted, as `half` does). Exponent and mantissa moved
/// into f32 position give `2^-112` times the value, for normals and subnormals alike (an f16
/// subnormal becomes an f32 subnormal, and the product with `2^112` is exact); infinities and
/// NaNs get the f32 all-ones exponent instead.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let magnitude = (h & 0x7fff) << 13;
    let finite = (f32::from_bits(magnitude) * f32::from_bits(0x7780_0000)).to_bits(); // × 2^112
                                                                                      // NaNs come out quiet, as from `vcvtph2ps` (which `half` uses).
    let quiet = if h & 0x3ff != 0 { 0x0040_0000 } else { 0 };
    let bits = if h & 0x7c00 == 0x7c00 { magnitude | 0x7f80_0000 | quiet } else { finite };
    f32::from_bits(bits | sign)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widening_is_exact() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            assert_eq!(f16_to_f32(h).to_bits(), want.to_bits(), "{h:#06x}");
        }
    }

    #[test]
    fn picks_cover_every_lane_once() {
        for d in 1..=MAX_DIMS {
            for (w, picks) in
                [(W3, Deinterleave::picks::<W3>(d, W3).len()), (L4, Deinterleave::picks::<L4>(d, 2 * L4).len())]
            {
                assert_eq!(picks, d, "w={w} d={d}");
            }
            for p in Deinterleave::picks::<L4>(d, 2 * L4) {
                assert_eq!(p.iter().fold(0u32, |m, q| m | q.mask), 0xffff);
                assert_eq!(p.iter().map(|q| q.mask.count_ones()).sum::<u32>(), 16);
                assert!(p.iter().all(|q| q.source < d));
            }
            for p in Deinterleave::picks::<W3>(d, W3) {
                assert_eq!(p.iter().map(|q| q.mask.count_ones()).sum::<u32>(), 8);
                assert!(p.iter().all(|q| q.source < d));
            }
        }
    }
}
