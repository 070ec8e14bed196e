//! CPU codebook argmin.
//!
//! The loop nest (rows are split into chunks of [`chunk_rows`] for the threads; everything
//! below is per chunk and single-threaded):
//! 1. pack the chunk's rows into a panel `[row block][d][MR]` (MR rows interleaved, so one
//!    step of the micro-kernel reads MR consecutive values to broadcast), widened to f32 — or,
//!    for the bf16 dot product, as u32 pairs `(x_2j, x_2j+1)` with `x_2j` in the high half;
//! 2. sweep the packed codebook (`[group of 16 codes][d][16]`, see
//!    [`Prepared`](crate::argmin::Prepared)) in tiles of `NRV` groups: a micro-kernel keeps
//!    `MR × NRV` vectors of 16 dot products in registers, accumulating over `d` with one
//!    broadcast of `x[r][d]` and one FMA per (row, vector) — so every lane runs the contract's
//!    FMA chain over `d` ascending, whatever the tile shape;
//! 3. turn the accumulators into scores and fold them into a running (best, index) per row and
//!    lane ([`Lanes`]): lane `l` sees codes `≡ l (mod 16)` in ascending order and keeps the first
//!    strictly smaller score, so reducing the 16 lanes (least score, then least index) gives the
//!    contract's "lowest index of the least score". The update is branch-free: a test "did any
//!    lane improve?" mispredicts often enough to cost several times the update itself.
//!
//! Micro-kernels: [`avx512`] (pulp `V4`; f32 FMA, and `vdpbf16ps` for bf16 where the CPU has
//! AVX-512 BF16) and [`portable`] (plain loops, vectorised by the compiler under V3, also the
//! bf16 chain with explicit flushes on CPUs without `vdpbf16ps`). Results do not depend on the
//! chunking, the thread count or the ISA.

mod avx512;
mod portable;

use crate::argmin::{distance, Metric, Prepared, GROUP};
use crate::cpu::par::for_each_chunk;
use crate::cpu::Isa;
use crate::dtype::{DType, Float};
use pulp::x86::{V3, V4};
use pulp::{Simd, WithSimd};

/// Rows per thread chunk: a multiple of every kernel's MR. Large for small `D` (the panel stays
/// small and each pass over the codebook serves more rows), smaller for large `D`.
fn chunk_rows(d: usize) -> usize {
    if d <= 32 {
        480
    } else {
        96
    }
}

/// The running best of one row: per lane, the least score seen and its code index.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(crate) struct Lanes {
    pub s: [f32; GROUP],
    pub i: [u32; GROUP],
}

impl Lanes {
    const INIT: Lanes = Lanes { s: [f32::INFINITY; GROUP], i: [0; GROUP] };

    /// The lowest index among the lanes holding the least score (index 0 if no lane has a
    /// score below +∞).
    fn reduce(&self) -> u32 {
        let (mut best, mut idx) = (f32::INFINITY, u32::MAX);
        for (&s, &i) in self.s.iter().zip(&self.i) {
            if s < best || (s == best && i < idx) {
                (best, idx) = (s, i);
            }
        }
        idx
    }
}

/// How a metric turns the dot product `p` and the per-code constant into a score.
pub(crate) trait Score {
    fn scalar(p: f32, bias: f32) -> f32;
    fn v4(
        f: pulp::core_arch::x86::Avx512f,
        p: core::arch::x86_64::__m512,
        bias: core::arch::x86_64::__m512,
    ) -> core::arch::x86_64::__m512;
}

/// `s = h − p`.
pub(crate) struct L2;
/// `s = p · c`.
pub(crate) struct Cos;

impl Score for L2 {
    #[inline(always)]
    fn scalar(p: f32, bias: f32) -> f32 {
        bias - p
    }
    #[inline(always)]
    fn v4(
        f: pulp::core_arch::x86::Avx512f,
        p: core::arch::x86_64::__m512,
        bias: core::arch::x86_64::__m512,
    ) -> core::arch::x86_64::__m512 {
        f._mm512_sub_ps(bias, p)
    }
}

impl Score for Cos {
    #[inline(always)]
    fn scalar(p: f32, bias: f32) -> f32 {
        p * bias
    }
    #[inline(always)]
    fn v4(
        f: pulp::core_arch::x86::Avx512f,
        p: core::arch::x86_64::__m512,
        bias: core::arch::x86_64::__m512,
    ) -> core::arch::x86_64::__m512 {
        f._mm512_mul_ps(p, bias)
    }
}

/// The lanes of group `g` that hold real codes (the last group may be partly padding).
#[inline(always)]
pub(crate) fn valid_mask(k: usize, g: usize) -> u16 {
    let n = k.saturating_sub(g * GROUP);
    if n >= GROUP {
        u16::MAX
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// A search micro-kernel family: packs a chunk's rows and sweeps the codebook over them.
pub(crate) trait Kernel: Copy {
    /// Panel element: an f32 value, or a u32 pair of bf16 values.
    type X: Copy + Default + Send + Sync;
    /// Rows per micro-block for dimension `d`.
    fn mr(self, d: usize) -> usize;
    /// Panel values per row: `d`, or `⌈d/2⌉` pairs.
    fn width(self, d: usize) -> usize;
    /// The panel value of `x` at dims `j` (and `j+1` for pairs) of a row.
    fn value<T: Float>(self, row: &[T], j: usize) -> Self::X;
    /// Folds every code of `p` into `lanes` (one per panel row).
    fn search<S: Score>(self, p: &Prepared, panel: &[Self::X], lanes: &mut [Lanes]);
}

/// Packs `rows` (`n·d` values) into `[row block][width][mr]`, zero-padded to whole blocks.
fn pack<T: Float, K: Kernel>(k: K, rows: &[T], d: usize) -> (Vec<K::X>, usize) {
    let (mr, w) = (k.mr(d), k.width(d));
    let n = rows.len() / d;
    let blocks = n.div_ceil(mr);
    let mut panel = vec![K::X::default(); blocks * mr * w];
    for (r, row) in rows.chunks_exact(d).enumerate() {
        let (b, rr) = (r / mr, r % mr);
        let dst = &mut panel[b * mr * w..][..mr * w];
        for j in 0..w {
            dst[j * mr + rr] = k.value(row, j);
        }
    }
    (panel, blocks * mr)
}

/// Work to run with the kernel an ISA selects.
trait KernelOp {
    fn run<K: Kernel>(self, k: K);
}

struct WithKernel<Op, K>(Op, K);

impl<Op: KernelOp, K: Kernel> WithSimd for WithKernel<Op, K> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) {
        self.0.run(self.1)
    }
}

/// Runs `op` with the kernel for input type `T` at `isa`, inside a function compiled for that
/// ISA's target features. bf16 input takes `vdpbf16ps` only where the CPU has it and the
/// codebook was packed for it; elsewhere the portable kernel with flushes computes the same
/// chain.
#[inline(always)]
fn dispatch<T: Float, Op: KernelOp>(isa: Isa, bf16_tiles: bool, op: Op) {
    let bf16 = T::DTYPE == DType::BF16;
    match isa {
        Isa::V4 => match V4::try_new() {
            Some(simd) if !bf16 => Simd::vectorize(simd, WithKernel(op, avx512::F32(simd))),
            Some(simd) => match avx512::Bf16::new(simd).filter(|_| bf16_tiles) {
                Some(k) => Simd::vectorize(simd, WithKernel(op, k)),
                None => Simd::vectorize(simd, WithKernel(op, portable::Portable::<true>)),
            },
            None => run_portable(bf16, op),
        },
        Isa::V3 => match V3::try_new() {
            Some(simd) if bf16 => Simd::vectorize(simd, WithKernel(op, portable::Portable::<true>)),
            Some(simd) => Simd::vectorize(simd, WithKernel(op, portable::Portable::<false>)),
            None => run_portable(bf16, op),
        },
        Isa::Scalar => run_portable(bf16, op),
    }
}

fn run_portable<Op: KernelOp>(bf16: bool, op: Op) {
    if bf16 {
        op.run(portable::Portable::<true>)
    } else {
        op.run(portable::Portable::<false>)
    }
}

struct SearchChunk<'a, T> {
    p: &'a Prepared,
    x: &'a [T],
    indices: &'a mut [u32],
}

impl<T: Float> KernelOp for SearchChunk<'_, T> {
    #[inline(always)]
    fn run<K: Kernel>(self, k: K) {
        let (panel, rows) = pack(k, self.x, self.p.d);
        let mut lanes = vec![Lanes::INIT; rows];
        match self.p.metric {
            Metric::L2 => k.search::<L2>(self.p, &panel, &mut lanes),
            Metric::Cosine => k.search::<Cos>(self.p, &panel, &mut lanes),
        }
        for (o, l) in self.indices.iter_mut().zip(&lanes) {
            *o = l.reduce();
        }
    }
}

/// The nearest entry of every row of `x` `[N, D]` (N ≥ 1, all finite) and its distance.
pub(crate) fn argmin<T: Float>(p: &Prepared, isa: Isa, x: &[T], indices: &mut [u32], dist: Option<&mut [f32]>) {
    let d = p.d;
    let ch = chunk_rows(d);
    let bf16_tiles = !p.tiles_bf16.is_empty();
    for_each_chunk(indices, ch, |c, indices| {
        let x = &x[c * ch * d..][..indices.len() * d];
        dispatch::<T, _>(isa, bf16_tiles, SearchChunk { p, x, indices });
    });
    if let Some(dist) = dist {
        let indices = &*indices;
        for_each_chunk(dist, ch, |c, dist| {
            let mut row = vec![0.0f32; d];
            for (r, o) in dist.iter_mut().enumerate() {
                let n = c * ch + r;
                for (v, s) in row.iter_mut().zip(&x[n * d..][..d]) {
                    *v = s.to_f32();
                }
                let k = indices[n] as usize;
                *o = distance(p.metric, &row, &p.rows[k * d..][..d], p.norms[k]);
            }
        });
    }
}

/// The lowest flat index of a NaN or ±∞ in `v`, if any (same answer for any thread count).
pub(crate) fn first_non_finite<T: Float>(v: &[T]) -> Option<usize> {
    const CHUNK: usize = 1 << 16;
    let mut firsts = vec![usize::MAX; v.len().div_ceil(CHUNK)];
    for_each_chunk(&mut firsts, 1, |c, slot| {
        let part = &v[c * CHUNK..][..CHUNK.min(v.len() - c * CHUNK)];
        // The fast test vectorises; only a chunk that fails it is searched.
        if !part.iter().fold(true, |ok, x| ok & x.to_f32().is_finite()) {
            slot[0] = c * CHUNK + part.iter().position(|x| !x.to_f32().is_finite()).unwrap_or(0);
        }
    });
    firsts.into_iter().find(|&i| i != usize::MAX)
}

/// `out[i, :] = entries[indices[i], :]` (indices checked by the caller).
pub(crate) fn lookup<O: Float>(p: &Prepared, indices: &[u32], out: &mut [O]) {
    let d = p.d;
    let per_chunk = crate::cpu::par::units_per_chunk(d * size_of::<O>());
    for_each_chunk(out, per_chunk * d, |c, out| {
        for (o, &i) in out.chunks_exact_mut(d).zip(&indices[c * per_chunk..]) {
            for (o, &v) in o.iter_mut().zip(&p.rows[i as usize * d..][..d]) {
                *o = O::from_f32(v);
            }
        }
    });
}

/// Residual quantization: stage 0 searches `x` (its own dtype rule), later stages the f32
/// residual; the residual and the reconstruction are updated in f32, in parallel chunks.
pub(crate) fn residual<T: Float, O: Float>(
    stages: &[&Prepared],
    isa: Isa,
    x: &[T],
    indices: &mut [u32],
    recon: Option<&mut [O]>,
) {
    let (s_count, d) = (stages.len(), stages[0].d);
    let n = x.len() / d;
    let mut r: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let mut q = vec![0.0f32; n * d];
    let mut ids = vec![0u32; n];
    let per_chunk = crate::cpu::par::units_per_chunk(d * size_of::<f32>());
    for (s, p) in stages.iter().enumerate() {
        if s == 0 {
            argmin(p, isa, x, &mut ids, None);
        } else {
            argmin(p, isa, &r, &mut ids, None);
        }
        let ids = &ids;
        for_each_chunk(&mut r, per_chunk * d, |c, r| {
            for (t, rr) in r.chunks_exact_mut(d).enumerate() {
                let k = ids[c * per_chunk + t] as usize;
                for (v, &e) in rr.iter_mut().zip(&p.rows[k * d..][..d]) {
                    *v -= e;
                }
            }
        });
        for_each_chunk(&mut q, per_chunk * d, |c, q| {
            for (t, qq) in q.chunks_exact_mut(d).enumerate() {
                let k = ids[c * per_chunk + t] as usize;
                for (v, &e) in qq.iter_mut().zip(&p.rows[k * d..][..d]) {
                    *v = if s == 0 { e } else { *v + e };
                }
            }
        });
        for (row, &k) in ids.iter().enumerate() {
            indices[row * s_count + s] = k;
        }
    }
    if let Some(recon) = recon {
        for_each_chunk(recon, per_chunk * d, |c, out| {
            for (o, &v) in out.iter_mut().zip(&q[c * per_chunk * d..]) {
                *o = O::from_f32(v);
            }
        });
    }
}

/// The residual reconstruction from indices `[N, S]` (checked by the caller).
pub(crate) fn residual_decode<O: Float>(stages: &[&Prepared], indices: &[u32], out: &mut [O]) {
    let (s_count, d) = (stages.len(), stages[0].d);
    let per_chunk = crate::cpu::par::units_per_chunk(d * size_of::<O>());
    for_each_chunk(out, per_chunk * d, |c, out| {
        let mut q = vec![0.0f32; d];
        for (t, o) in out.chunks_exact_mut(d).enumerate() {
            let ids = &indices[(c * per_chunk + t) * s_count..][..s_count];
            for (s, p) in stages.iter().enumerate() {
                let e = &p.rows[ids[s] as usize * d..][..d];
                for (v, &e) in q.iter_mut().zip(e) {
                    *v = if s == 0 { e } else { *v + e };
                }
            }
            for (o, &v) in o.iter_mut().zip(&q) {
                *o = O::from_f32(v);
            }
        }
    });
}
