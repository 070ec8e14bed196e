//! CPU LFQ / BSQ.
//!
//! Encode: ids `[N, G]` flattened are consecutive `d`-bit fields of one sign bitstream over the
//! flattened `z` (id `k` is bits `[k·d, (k+1)·d)`), whatever N and G are. So threads take chunks
//! of ids; a chunk is encoded in blocks of [`BLOCK`] ids: a [`SignKernel`] turns the block's
//! `BLOCK·d` values into `d` 64-bit words of signs (AVX-512: compare → 16-bit mask, four masks
//! per word; elsewhere plain loops the compiler vectorises), then each id is cut out of the
//! words with a shift and a mask (and a bit reversal for `MsbFirst`). NaNs are flagged per block
//! by the same kernel; the first one is located by a scalar rescan of that block only, and the
//! lowest index over all chunks wins, so the error does not depend on the thread count.
//!
//! Decode, the BSQ normalisation and the statistics are plain loops, compiled under each ISA's
//! target features (through [`run_isa`], the one ISA dispatcher). Statistics are integer counts
//! per chunk, summed in chunk order.
//!
//! The entropy terms ([`entropy`]) are described at their section below: a vectorised f32
//! per-element kernel with fixed-order reductions (phase 1) and, for the exact codebook
//! entropy, an f64 `Aᵀ·B` over tokens in register tiles (phase 2).

use crate::cpu::fsq::widen;
use crate::cpu::par::{for_each_chunk, units_per_chunk};
use crate::cpu::simd::{run_isa, IsaOp};
use crate::cpu::Isa;
use crate::dtype::{DType, Float};
use crate::error::Result;
use crate::lfq::{BitOrder, Lfq, LfqEntropy, LfqStats, EXACT_ENTROPY_MAX_BITS, HISTOGRAM_MAX_BITS};
use pulp::x86::{V3, V4};
use pulp::Simd;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Ids per block: `BLOCK·d` sign bits fill exactly `d` words.
const BLOCK: usize = 64;
const LANES: usize = 16;
// The sign words are 64 bits: one word per bit of d, and four 16-lane masks per word.
const _: () = assert!(BLOCK == 64 && LANES * 4 == 64);

/// Turns values into sign words.
trait SignKernel: Copy {
    /// Writes `words[w]` bit `i` = `z[64·w + i] > 0` for every `w < z.len().div_ceil(64)` (bits
    /// past the end of `z` are 0). `words.len() ≥ z.len().div_ceil(64)`. Returns whether any
    /// value is NaN.
    fn signs<T: Float>(self, z: &[T], words: &mut [u64]) -> bool;
}

/// Plain loops.
#[derive(Clone, Copy)]
struct Portable;

impl SignKernel for Portable {
    #[inline(always)]
    fn signs<T: Float>(self, z: &[T], words: &mut [u64]) -> bool {
        let mut nan = false;
        for (c, w) in z.chunks(64).zip(words.iter_mut()) {
            let mut m = 0u64;
            for (i, x) in c.iter().enumerate() {
                let x = x.to_f32();
                m |= ((x > 0.0) as u64) << i;
                nan |= x.is_nan();
            }
            *w = m;
        }
        nan
    }
}

/// AVX-512 through pulp's `V4` token.
#[derive(Clone, Copy)]
struct Avx512(V4);

/// Reads a `T` from the first `size_of::<T>()` bytes of `bytes`.
#[inline(always)]
fn read<T: bytemuck::Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: the assert above keeps the read inside `bytes`; `T: Pod` accepts any bit
    // pattern; `read_unaligned` has no alignment requirement.
    unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

impl Avx512 {
    /// `(z > 0, isnan(z))` masks of 16 values (`z.len() == 16`), widened to f32 exactly.
    #[inline(always)]
    fn masks<T: Float>(self, z: &[T]) -> (u16, u16) {
        use core::arch::x86_64::{__m512, _CMP_GT_OQ, _CMP_UNORD_Q};
        let s = self.0;
        let f = s.avx512f;
        let bytes: &[u8] = bytemuck::cast_slice(z);
        let x: __m512 = match T::DTYPE {
            DType::F32 => pulp::cast(read::<pulp::f32x16>(bytes)),
            DType::F16 => f._mm512_cvtph_ps(pulp::cast(read::<pulp::u16x16>(bytes))),
            // bf16 is the top half of an f32.
            DType::BF16 => {
                pulp::cast(s.shl_const_u32x16::<16>(s.convert_u16x16_to_u32x16(read::<pulp::u16x16>(bytes))))
            }
            DType::U8 => unreachable!("Float excludes u8"),
        };
        // Ordered compare: NaN > 0 is false, like the scalar `>`.
        let gt = f._mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, f._mm512_setzero_ps());
        let nan = f._mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        (gt, nan)
    }
}

impl SignKernel for Avx512 {
    #[inline(always)]
    fn signs<T: Float>(self, z: &[T], words: &mut [u64]) -> bool {
        let mut nan = 0u16;
        for (c, w) in z.chunks(64).zip(words.iter_mut()) {
            let mut m = 0u64;
            let full = c.len() / LANES * LANES;
            for (j, q) in c[..full].chunks_exact(LANES).enumerate() {
                let (gt, n) = self.masks(q);
                m |= (gt as u64) << (LANES * j);
                nan |= n;
            }
            if full < c.len() {
                // Zero padding gives bit 0 and no NaN.
                let mut pad = [T::from_f32(0.0); LANES];
                pad[..c.len() - full].copy_from_slice(&c[full..]);
                let (gt, n) = self.masks(&pad);
                m |= (gt as u64) << full;
                nan |= n;
            }
            *w = m;
        }
        nan != 0
    }
}

/// Work to run with the sign kernel of an ISA.
trait LfqOp {
    type Output;
    fn run<K: SignKernel>(self, k: K) -> Self::Output;
}

/// An [`LfqOp`] as an [`IsaOp`]: the [`Avx512`] sign kernel under V4, [`Portable`] otherwise.
struct WithSigns<Op>(Op);

impl<Op: LfqOp> IsaOp for WithSigns<Op> {
    type Output = Op::Output;
    #[inline(always)]
    fn portable(self) -> Self::Output {
        self.0.run(Portable)
    }
    #[inline(always)]
    fn v4(self, simd: V4) -> Self::Output {
        self.0.run(Avx512(simd))
    }
}

/// Runs `op` with the sign kernel of `isa`, inside a function compiled for that ISA's target
/// features (the portable kernel if the ISA is unavailable; callers check beforehand).
#[inline(always)]
fn dispatch<Op: LfqOp>(isa: Isa, op: Op) -> Op::Output {
    run_isa(isa, WithSigns(op))
}

/// Ids per thread chunk: about 64 KiB of input, a whole number of blocks.
fn ids_per_chunk<T>(d: usize) -> usize {
    units_per_chunk(d * size_of::<T>()).div_ceil(BLOCK) * BLOCK
}

/// Records `Some(i)` as a candidate for the lowest failing index.
fn record(first: &AtomicUsize, i: Option<usize>) {
    if let Some(i) = i {
        first.fetch_min(i, Ordering::Relaxed);
    }
}

/// The lowest recorded index, if any.
fn lowest(first: AtomicUsize) -> Option<usize> {
    Some(first.into_inner()).filter(|&i| i != usize::MAX)
}

struct EncodeChunk<'a, T> {
    z: &'a [T],
    ids: &'a mut [u32],
    d: usize,
    order: BitOrder,
}

impl<T: Float> LfqOp for EncodeChunk<'_, T> {
    /// The chunk-relative index of the first NaN in `z`.
    type Output = Option<usize>;

    #[inline(always)]
    fn run<K: SignKernel>(self, k: K) -> Option<usize> {
        let d = self.d;
        let mask = u64::MAX >> (64 - d);
        // One spare word: the 8-byte read of a field ending in the last word runs past it.
        let mut words = [0u64; 33];
        let mut first_nan = None;
        for (b, out) in self.ids.chunks_mut(BLOCK).enumerate() {
            let zb = &self.z[b * BLOCK * d..][..out.len() * d];
            if k.signs(zb, &mut words) && first_nan.is_none() {
                first_nan = zb.iter().position(|x| x.to_f32().is_nan()).map(|i| b * BLOCK * d + i);
            }
            // Field j starts at bit j·d: read the 8 bytes from its first byte (little endian)
            // and shift; a field spans at most 7 + 32 bits, so 8 bytes always hold it. (The
            // words are stored little endian first: a no-op on little-endian targets.)
            for w in &mut words[..d] {
                *w = w.to_le();
            }
            let bytes: &[u8] = bytemuck::cast_slice(&words);
            for (j, id) in out.iter_mut().enumerate() {
                let p = j * d;
                let v = (u64::from_le_bytes(*bytes[p / 8..].first_chunk().unwrap()) >> (p % 8) & mask) as u32;
                *id = match self.order {
                    BitOrder::LsbFirst => v,
                    BitOrder::MsbFirst => v.reverse_bits() >> (32 - d),
                };
            }
        }
        first_nan
    }
}

/// z `[N, G·d]` → ids `[N, G]`.
pub(crate) fn encode<T: Float>(p: &Lfq, isa: Isa, z: &[T], ids: &mut [u32]) -> Result<()> {
    let d = p.bits() as usize;
    let order = p.order();
    let per_chunk = ids_per_chunk::<T>(d);
    let first = AtomicUsize::new(usize::MAX);
    for_each_chunk(ids, per_chunk, |c, ids| {
        let z = &z[c * per_chunk * d..][..ids.len() * d];
        let nan = dispatch(isa, EncodeChunk { z, ids, d, order });
        record(&first, nan.map(|i| c * per_chunk * d + i));
    });
    match lowest(first) {
        Some(i) => Err(p.nan_error(i)),
        None => Ok(()),
    }
}

struct NormalizeChunk<'a, T, O> {
    z: &'a [T],
    u: &'a mut [O],
    d: usize,
}

impl<T: Float, O: Float> LfqOp for NormalizeChunk<'_, T, O> {
    type Output = ();

    #[inline(always)]
    fn run<K: SignKernel>(self, _k: K) {
        // The contract fixes f64 accumulation in channel order: kept scalar and sequential.
        for (zg, ug) in self.z.chunks_exact(self.d).zip(self.u.chunks_exact_mut(self.d)) {
            let sum = zg.iter().fold(0.0f64, |s, x| {
                let x = x.to_f32() as f64;
                s + x * x
            });
            let norm = sum.sqrt();
            for (x, o) in zg.iter().zip(ug.iter_mut()) {
                let x = x.to_f32();
                *o = O::from_f32(if norm == 0.0 { x } else { (x as f64 / norm) as f32 });
            }
        }
    }
}

/// z → ids and the per-group L2-normalised z.
pub(crate) fn encode_normalized<T: Float, O: Float>(
    p: &Lfq,
    isa: Isa,
    z: &[T],
    ids: &mut [u32],
    u: &mut [O],
) -> Result<()> {
    encode(p, isa, z, ids)?;
    let d = p.bits() as usize;
    let per_chunk = ids_per_chunk::<T>(d) * d;
    for_each_chunk(u, per_chunk, |c, u| {
        let z = &z[c * per_chunk..][..u.len()];
        dispatch(isa, NormalizeChunk { z, u, d });
    });
    Ok(())
}

struct DecodeChunk<'a, O> {
    ids: &'a [u32],
    codes: &'a mut [O],
    d: usize,
    order: BitOrder,
    max_id: u32,
    pos: O,
    neg: O,
}

impl<O: Float> LfqOp for DecodeChunk<'_, O> {
    /// The chunk-relative index of the first id out of range.
    type Output = Option<usize>;

    #[inline(always)]
    fn run<K: SignKernel>(self, _k: K) -> Option<usize> {
        let d = self.d;
        let mut bad = None;
        for (t, (&id, c)) in self.ids.iter().zip(self.codes.chunks_exact_mut(d)).enumerate() {
            if id > self.max_id && bad.is_none() {
                bad = Some(t);
            }
            // Put channel 0's bit at position 0 whatever the order.
            let bits = match self.order {
                BitOrder::LsbFirst => id,
                BitOrder::MsbFirst => id.reverse_bits() >> (32 - d),
            };
            for (k, o) in c.iter_mut().enumerate() {
                *o = if (bits >> k) & 1 != 0 { self.pos } else { self.neg };
            }
        }
        bad
    }
}

/// ids `[N, G]` → codes `[N, G·d]`.
pub(crate) fn decode<O: Float>(p: &Lfq, isa: Isa, ids: &[u32], codes: &mut [O]) -> Result<()> {
    let d = p.bits() as usize;
    let v = p.code_value();
    let (pos, neg) = (O::from_f32(v), O::from_f32(-v));
    let (order, max_id) = (p.order(), p.max_id());
    let per_chunk = ids_per_chunk::<O>(d);
    let first = AtomicUsize::new(usize::MAX);
    for_each_chunk(codes, per_chunk * d, |c, codes| {
        let ids = &ids[c * per_chunk..][..codes.len() / d];
        let bad = dispatch(isa, DecodeChunk { ids, codes, d, order, max_id, pos, neg });
        record(&first, bad.map(|t| c * per_chunk + t));
    });
    match lowest(first) {
        Some(k) => Err(p.bad_id_error(k, ids[k])),
        None => Ok(()),
    }
}

/// Ids per statistics chunk: large, since every chunk carries its own histogram.
const STATS_CHUNK_IDS: usize = 1 << 18;

struct StatsChunk<'a> {
    ids: &'a [u32],
    /// Group of `ids[0]`.
    first_group: usize,
    groups: usize,
    d: usize,
    order: BitOrder,
    max_id: u32,
    histogram: bool,
}

/// One chunk's counts and the chunk-relative index of its first id out of range.
#[derive(Default)]
struct Partial {
    ones: Vec<u64>,
    histogram: Vec<u64>,
    bad: Option<usize>,
}

impl LfqOp for StatsChunk<'_> {
    type Output = Partial;

    #[inline(always)]
    fn run<K: SignKernel>(self, _k: K) -> Partial {
        let d = self.d;
        let mut p = Partial {
            ones: vec![0; self.groups * d],
            histogram: if self.histogram { vec![0; self.max_id as usize + 1] } else { Vec::new() },
            bad: None,
        };
        let mut g = self.first_group;
        for (t, &id) in self.ids.iter().enumerate() {
            if id > self.max_id {
                p.bad.get_or_insert(t);
            } else {
                let bits = match self.order {
                    BitOrder::LsbFirst => id,
                    BitOrder::MsbFirst => id.reverse_bits() >> (32 - d),
                };
                for (k, o) in p.ones[g * d..][..d].iter_mut().enumerate() {
                    *o += ((bits >> k) & 1) as u64;
                }
                if self.histogram {
                    p.histogram[id as usize] += 1;
                }
            }
            g = if g + 1 == self.groups { 0 } else { g + 1 };
        }
        p
    }
}

/// Ones per channel and the pooled id histogram: per-chunk counts, summed in chunk order.
pub(crate) fn statistics(p: &Lfq, isa: Isa, ids: &[u32]) -> Result<LfqStats> {
    let (groups, d) = (p.groups(), p.bits() as usize);
    let (order, max_id) = (p.order(), p.max_id());
    let histogram = p.bits() <= HISTOGRAM_MAX_BITS;
    let mut partials: Vec<Partial> = (0..ids.len().div_ceil(STATS_CHUNK_IDS)).map(|_| Partial::default()).collect();
    for_each_chunk(&mut partials, 1, |c, slot| {
        let start = c * STATS_CHUNK_IDS;
        let ids = &ids[start..][..STATS_CHUNK_IDS.min(ids.len() - start)];
        let first_group = start % groups;
        slot[0] = dispatch(isa, StatsChunk { ids, first_group, groups, d, order, max_id, histogram });
    });
    let mut stats = LfqStats {
        tokens: ids.len() / groups,
        ones: vec![0; groups * d],
        histogram: histogram.then(|| vec![0; p.codebook_size() as usize]),
    };
    for (c, part) in partials.iter().enumerate() {
        if let Some(t) = part.bad {
            let k = c * STATS_CHUNK_IDS + t;
            return Err(p.bad_id_error(k, ids[k]));
        }
        for (s, o) in stats.ones.iter_mut().zip(&part.ones) {
            *s += o;
        }
        if let Some(h) = stats.histogram.as_mut() {
            for (s, o) in h.iter_mut().zip(&part.histogram) {
                *s += o;
            }
        }
    }
    Ok(stats)
}

// ---------------------------------------------------------------------------------------------
// Entropy terms.
//
// Per element, `bit_terms` gives the bit's binary entropy `h(a)` and its probabilities
// `σ(±a)` in f32, with operations that are correctly rounded everywhere (mul_add, division,
// bit manipulation, compares and selects), so every ISA and every thread count give the same
// bits; the loops are plain code the compiler vectorises under each ISA's target features.
//
// Phase 1 (per-token entropy, averaged bit probabilities): rows in fixed chunks; a chunk is
// processed in row blocks whose element count is a multiple of `lcm(C, 16)`, so that element
// `j` of every `lcm`-sized piece belongs to channel `j mod C`: the three per-element terms are
// summed position by position into f32 accumulators of `lcm` lanes (vectorisable), flushed into
// f64 every block (at most 64 rows), and folded into per-channel sums at the chunk's end. Chunks
// are combined in chunk order.
//
// Phase 2 (exact codebook entropy, d ≤ 16): per group, `p̄(c)` over the `2^d` codes is the
// average of `A_n(i)·B_n(j)` with `c = (i, j)` split into its low `⌊d/2⌋` and high bits, `A_n`
// / `B_n` the products of the token's bit probabilities (f64, normalised so that each bit's two
// probabilities sum to 1). So the sums are `Aᵀ·B`, a matrix product over tokens, accumulated in
// register tiles (every element summed over tokens in order). Tokens are split in fixed chunks,
// each with its own partial sums, computed in parallel in waves of a fixed number of chunks and
// added in chunk order.
// ---------------------------------------------------------------------------------------------

/// Logits `|a| ≥ A_MAX` are treated as `A_MAX` (e^−87 is still a normal f32).
const A_MAX: f32 = 87.0;

/// The logit scale `4τv` as an unevaluated sum `hi + lo` of two f32s.
#[derive(Clone, Copy)]
struct LogitScale {
    hi: f32,
    lo: f32,
}

impl LogitScale {
    fn new(scale: f64) -> Self {
        let hi = scale as f32;
        LogitScale { hi, lo: (scale - hi as f64) as f32 }
    }
}

/// `log1p(u)/u` on `[0, 1]`: Chebyshev fit of degree 9 (absolute error 5.3e−9), highest
/// degree first.
#[allow(clippy::excessive_precision)]
const LOG1P_OVER_U: [f32; 10] = [
    -0.003_176_057_018_431_959_7,
    0.019_542_527_261_014_101,
    -0.056_373_612_830_107_328,
    0.105_436_237_954_195_26,
    -0.152_696_670_743_632_88,
    0.196_632_742_572_048_05,
    -0.249_516_162_628_720_74,
    0.333_297_104_989_177_49,
    -0.499_998_926_480_632_79,
    0.999_999_994_656_291_98,
];

/// `e^y − 1 − y` over `y²` on `[−ln2/2, ln2/2]` (Cephes' `expf`), highest degree first.
#[allow(clippy::excessive_precision)]
const EXP_POLY: [f32; 6] = [
    1.987_569_150_0e-4,
    1.398_199_950_7e-3,
    8.333_451_907_3e-3,
    4.166_579_589_4e-2,
    1.666_666_545_9e-1,
    5.000_000_120_1e-1,
];

/// `ln 2` in two parts (`LN2_HI` has 9 significant bits, so `n·LN2_HI` is exact for `n < 2^15`).
const LN2_HI: f32 = 355.0 / 512.0;
#[allow(clippy::excessive_precision)]
const LN2_LO: f32 = -2.121_944_400_5e-4;

/// One bit of one token: `[h(a), σ(a), σ(−a)]` for `a = 4τv·x` (`x` not NaN).
#[inline(always)]
fn bit_terms(x: f32, k: LogitScale) -> [f32; 3] {
    let ax = x.abs();
    // |a| = hi + lo: the product's rounding error (exact by fma) and the scale's low part.
    let hi = k.hi * ax;
    let lo = k.hi.mul_add(ax, -hi) + k.lo * ax;
    let big = hi >= A_MAX; // also +∞ (x is not NaN)
    let a = if big { A_MAX } else { hi };
    let lo = if big { 0.0 } else { lo };
    // u = e^−a = 2^−n · e^y with n = round(a / ln 2) ∈ [0, 126], y = n·ln 2 − a ∈ ±0.35.
    const SHIFTER: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    let t = a.mul_add(std::f32::consts::LOG2_E, SHIFTER);
    let n = t - SHIFTER;
    let n_int = t.to_bits().wrapping_sub(SHIFTER.to_bits());
    let y = n.mul_add(LN2_HI, -a);
    let y = n.mul_add(LN2_LO, y) - lo;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p.mul_add(y, *c);
    }
    let e = p.mul_add(y * y, y) + 1.0;
    let u = e * f32::from_bits((127u32.wrapping_sub(n_int)) << 23);
    let r = 1.0 / (1.0 + u); // σ(|a|)
    let q = u * r; // σ(−|a|)
    let mut g = LOG1P_OVER_U[0];
    for c in &LOG1P_OVER_U[1..] {
        g = g.mul_add(u, *c);
    }
    let h = a.mul_add(q, u * g);
    let positive = x > 0.0;
    [h, if positive { r } else { q }, if positive { q } else { r }]
}

/// Phase 1 sums of one chunk of rows: per channel `Σ h`, `Σ σ(a)`, `Σ σ(−a)`, or the
/// chunk-relative flat index of its first NaN.
#[derive(Default)]
struct EntropyPartial {
    sums: [Vec<f64>; 3],
    nan: Option<usize>,
}

/// The row blocking of phase 1.
#[derive(Clone, Copy)]
struct EntropyLayout {
    channels: usize,
    /// `lcm(C, 16)` (or `C` for `C ≥ 256`): element `j` of every piece of this size is channel
    /// `j mod C`.
    lcm: usize,
    /// Rows per block (a multiple of `lcm / C`, at most 64 unless one `lcm` piece is more).
    block_rows: usize,
    /// Rows per chunk (a multiple of `block_rows`).
    chunk_rows: usize,
}

impl EntropyLayout {
    fn new(channels: usize) -> Self {
        const MAX_BLOCK_ROWS: usize = 64;
        const MAX_BLOCK_ELEMENTS: usize = 4096;
        const CHUNK_ELEMENTS: usize = 1 << 16;
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        // Wide rows vectorise by themselves: pieces of one row keep the buffers at O(C).
        let lcm = if channels >= 256 { channels } else { channels / gcd(channels, 16) * 16 };
        let rows_per_lcm = lcm / channels;
        let pieces = (MAX_BLOCK_ROWS / rows_per_lcm).min(MAX_BLOCK_ELEMENTS / lcm).max(1);
        let block_rows = pieces * rows_per_lcm;
        let chunk_rows = block_rows * (CHUNK_ELEMENTS / (block_rows * channels)).max(1);
        EntropyLayout { channels, lcm, block_rows, chunk_rows }
    }
}

struct EntropyChunk<'a, T> {
    z: &'a [T],
    layout: EntropyLayout,
    scale: LogitScale,
}

impl<T: Float> IsaOp for EntropyChunk<'_, T> {
    type Output = EntropyPartial;

    #[inline(always)]
    fn portable(self) -> EntropyPartial {
        let EntropyLayout { channels, lcm, block_rows, .. } = self.layout;
        let mut acc32 = [vec![0.0f32; lcm], vec![0.0f32; lcm], vec![0.0f32; lcm]];
        let mut acc64 = [vec![0.0f64; lcm], vec![0.0f64; lcm], vec![0.0f64; lcm]];
        let mut buf = vec![0.0f32; if T::DTYPE == DType::F32 { 0 } else { block_rows * channels }];
        for (b, block) in self.z.chunks(block_rows * channels).enumerate() {
            let x: &[f32] = match T::DTYPE {
                DType::F32 => bytemuck::cast_slice(block),
                _ => {
                    widen(block, &mut buf[..block.len()]);
                    &buf[..block.len()]
                }
            };
            if x.iter().fold(false, |nan, v| nan | v.is_nan()) {
                let i = x.iter().position(|v| v.is_nan()).expect("a NaN");
                return EntropyPartial { nan: Some(b * block_rows * channels + i), ..Default::default() };
            }
            let [ah, a1, a0] = &mut acc32;
            for piece in x.chunks(lcm) {
                for (((&v, h), p1), p0) in piece.iter().zip(ah.iter_mut()).zip(a1.iter_mut()).zip(a0.iter_mut()) {
                    let [th, t1, t0] = bit_terms(v, self.scale);
                    *h += th;
                    *p1 += t1;
                    *p0 += t0;
                }
            }
            for (a32, a64) in acc32.iter_mut().zip(acc64.iter_mut()) {
                for (s, d) in a32.iter_mut().zip(a64.iter_mut()) {
                    *d += *s as f64;
                    *s = 0.0;
                }
            }
        }
        let fold = |a: &[f64]| {
            let mut sums = vec![0.0f64; channels];
            for piece in a.chunks(channels) {
                for (s, v) in sums.iter_mut().zip(piece) {
                    *s += v;
                }
            }
            sums
        };
        EntropyPartial { sums: [fold(&acc64[0]), fold(&acc64[1]), fold(&acc64[2])], nan: None }
    }

    #[inline(always)]
    fn v4(self, _simd: V4) -> EntropyPartial {
        self.portable()
    }
}

/// `−p ln p` with `0 ln 0 = 0`.
fn plogp(p: f64) -> f64 {
    if p > 0.0 {
        -p * p.ln()
    } else {
        0.0
    }
}

/// The entropy terms of `z` `[N, G·d]` (`N ≥ 1`), logit scale `4τv` (checked by the caller).
pub(crate) fn entropy<T: Float>(p: &Lfq, isa: Isa, z: &[T], scale: f64, exact: bool) -> Result<LfqEntropy> {
    let (groups, d, c) = (p.groups(), p.bits() as usize, p.channels());
    let n = z.len() / c;
    let k = LogitScale::new(scale);
    let layout = EntropyLayout::new(c);
    let chunk = layout.chunk_rows * c;
    let mut partials: Vec<EntropyPartial> = (0..z.len().div_ceil(chunk)).map(|_| EntropyPartial::default()).collect();
    for_each_chunk(&mut partials, 1, |i, slot| {
        let z = &z[i * chunk..][..chunk.min(z.len() - i * chunk)];
        slot[0] = run_isa(isa, EntropyChunk { z, layout, scale: k });
    });
    let mut sums = [vec![0.0f64; c], vec![0.0f64; c], vec![0.0f64; c]];
    for (i, part) in partials.iter().enumerate() {
        if let Some(j) = part.nan {
            return Err(p.nan_error(i * chunk + j));
        }
        for (s, ps) in sums.iter_mut().zip(&part.sums) {
            for (a, b) in s.iter_mut().zip(ps) {
                *a += b;
            }
        }
    }
    let nf = n as f64;
    let [h, ones, zeros] = sums;
    let per_token = h.chunks(d).map(|g| g.iter().sum::<f64>() / nf).collect();
    let codebook_factorized = ones
        .chunks(d)
        .zip(zeros.chunks(d))
        .map(|(o, z)| o.iter().zip(z).map(|(&o, &z)| plogp(o / nf) + plogp(z / nf)).sum())
        .collect();
    let codebook = (exact && p.bits() <= EXACT_ENTROPY_MAX_BITS)
        .then(|| (0..groups).map(|g| exact_codebook_entropy(isa, z, c, g, d, k)).collect());
    Ok(LfqEntropy {
        tokens: n,
        per_token,
        codebook,
        codebook_factorized,
        bit_probability: ones.iter().map(|o| o / nf).collect(),
    })
}

/// Tokens per register-tile pass of phase 2.
const EXACT_ROWS: usize = 64;
/// Chunks per parallel wave of phase 2 (fixed: the partial sums do not depend on the threads).
const EXACT_WAVE: usize = 8;

/// The exact codebook entropy of group `g` (`d ≤ 16` bits) of `z` `[N, C]`.
fn exact_codebook_entropy<T: Float>(isa: Isa, z: &[T], c: usize, g: usize, d: usize, k: LogitScale) -> f64 {
    let n = z.len() / c;
    // About 2^24 multiply-adds per chunk.
    let chunk_tokens = EXACT_ROWS * ((1usize << 24) >> (d + 6)).max(1);
    let mut total = vec![0.0f64; 1 << d];
    let mut partials: Vec<Vec<f64>> =
        (0..EXACT_WAVE.min(n.div_ceil(chunk_tokens))).map(|_| vec![0.0; 1 << d]).collect();
    for wave in (0..n).step_by(chunk_tokens * EXACT_WAVE) {
        let chunks = (n - wave).div_ceil(chunk_tokens).min(EXACT_WAVE);
        for_each_chunk(&mut partials[..chunks], 1, |i, slot| {
            let first = wave + i * chunk_tokens;
            let tokens = chunk_tokens.min(n - first);
            let z = &z[first * c..(first + tokens) * c];
            run_isa(isa, ExactChunk { z, c, g, d, k, sums: &mut slot[0] });
        });
        for part in &partials[..chunks] {
            for (t, p) in total.iter_mut().zip(part) {
                *t += p;
            }
        }
    }
    total.iter().map(|&s| plogp(s / n as f64)).sum()
}

/// Phase 2 for one chunk of tokens: `sums[j·2^da + i] = Σ_n A_n(i)·B_n(j)`.
struct ExactChunk<'a, T> {
    z: &'a [T],
    c: usize,
    g: usize,
    d: usize,
    k: LogitScale,
    sums: &'a mut [f64],
}

impl<T: Float> ExactChunk<'_, T> {
    #[inline(always)]
    fn run<S: Simd>(self, simd: S) {
        let (c, d) = (self.c, self.d);
        let (da, db) = (d / 2, d - d / 2);
        let (m, nb) = (1usize << da, 1usize << db);
        let mut a = vec![0.0f64; EXACT_ROWS * m];
        let mut b = vec![0.0f64; EXACT_ROWS * nb];
        let mut x = [0.0f32; 16];
        let mut prob = [[0.0f64; 2]; 16];
        self.sums.fill(0.0);
        for rows in self.z.chunks(EXACT_ROWS * c) {
            let tokens = rows.len() / c;
            for (t, row) in rows.chunks_exact(c).enumerate() {
                widen(&row[self.g * d..][..d], &mut x[..d]);
                for (pk, &xk) in prob.iter_mut().zip(&x[..d]) {
                    let [_, p1, p0] = bit_terms(xk, self.k);
                    let (p1, p0) = (p1 as f64, p0 as f64);
                    *pk = [p0 / (p0 + p1), p1 / (p0 + p1)];
                }
                outer_products(&prob[..da], &mut a[t * m..][..m]);
                outer_products(&prob[da..d], &mut b[t * nb..][..nb]);
            }
            rank_update(simd, self.sums, &a[..tokens * m], m, &b[..tokens * nb], nb, tokens);
        }
    }
}

impl<T: Float> IsaOp for ExactChunk<'_, T> {
    type Output = ();

    #[inline(always)]
    fn portable(self) {
        self.run(pulp::Scalar)
    }

    #[inline(always)]
    fn v3(self, simd: V3) {
        self.run(simd)
    }

    #[inline(always)]
    fn v4(self, simd: V4) {
        self.run(simd)
    }
}

/// `out[i] = Π_k prob[k][bit k of i]` (`out.len() == 2^prob.len()`), by doubling.
#[inline(always)]
fn outer_products(prob: &[[f64; 2]], out: &mut [f64]) {
    out[0] = 1.0;
    for (k, pk) in prob.iter().enumerate() {
        let half = 1 << k;
        let (lo, hi) = out[..2 * half].split_at_mut(half);
        for (l, h) in lo.iter_mut().zip(hi.iter_mut()) {
            *h = *l * pk[1];
            *l *= pk[0];
        }
    }
}

/// `acc[i·nb + j] += Σ_s a[s·m + i]·b[s·nb + j]` over `s < rows`, every element summed in `s`
/// order (plain multiply then add, so the result does not depend on the vector width or the
/// tiling): tiles of 4 rows × 4 vectors stay in registers.
#[inline(always)]
fn rank_update<S: Simd>(simd: S, acc: &mut [f64], a: &[f64], m: usize, b: &[f64], nb: usize, rows: usize) {
    const R: usize = 4;
    const V: usize = 4;
    let width = V * S::F64_LANES;
    if m.is_multiple_of(R) && nb.is_multiple_of(width) {
        for i0 in (0..m).step_by(R) {
            for j0 in (0..nb).step_by(width) {
                let mut tile = [[simd.splat_f64s(0.0); V]; R];
                for (r, t) in tile.iter_mut().enumerate() {
                    t.copy_from_slice(S::as_simd_f64s(&acc[(i0 + r) * nb + j0..][..width]).0);
                }
                for s in 0..rows {
                    let bv = S::as_simd_f64s(&b[s * nb + j0..][..width]).0;
                    for (t, &ar) in tile.iter_mut().zip(&a[s * m + i0..][..R]) {
                        let ar = simd.splat_f64s(ar);
                        for (o, &bc) in t.iter_mut().zip(bv) {
                            *o = simd.add_f64s(*o, simd.mul_f64s(ar, bc));
                        }
                    }
                }
                for (r, t) in tile.iter().enumerate() {
                    S::as_mut_simd_f64s(&mut acc[(i0 + r) * nb + j0..][..width]).0.copy_from_slice(t);
                }
            }
        }
    } else {
        for s in 0..rows {
            for i in 0..m {
                let ar = a[s * m + i];
                for (o, &bc) in acc[i * nb..][..nb].iter_mut().zip(&b[s * nb..][..nb]) {
                    *o += ar * bc;
                }
            }
        }
    }
}
