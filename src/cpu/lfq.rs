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
//! target features. Statistics are integer counts per chunk, summed in chunk order.

use crate::cpu::par::{for_each_chunk, units_per_chunk};
use crate::cpu::Isa;
use crate::dtype::{DType, Float};
use crate::error::Result;
use crate::lfq::{BitOrder, Lfq, LfqStats, HISTOGRAM_MAX_BITS};
use pulp::x86::{V3, V4};
use pulp::{Simd, WithSimd};
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

struct WithKernel<Op, K>(Op, K);

impl<Op: LfqOp, K: SignKernel> WithSimd for WithKernel<Op, K> {
    type Output = Op::Output;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> Self::Output {
        self.0.run(self.1)
    }
}

/// Runs `op` with the kernel of `isa`, inside a function compiled for that ISA's target
/// features (the portable kernel if the ISA is unavailable; callers check beforehand).
#[inline(always)]
fn dispatch<Op: LfqOp>(isa: Isa, op: Op) -> Op::Output {
    match isa {
        Isa::V4 => match V4::try_new() {
            Some(simd) => Simd::vectorize(simd, WithKernel(op, Avx512(simd))),
            None => op.run(Portable),
        },
        Isa::V3 => match V3::try_new() {
            Some(simd) => Simd::vectorize(simd, WithKernel(op, Portable)),
            None => op.run(Portable),
        },
        Isa::Scalar => op.run(Portable),
    }
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
