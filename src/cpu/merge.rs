//! CPU token merging and pruning.
//!
//! Bipartite matching runs in three phases, each a parallel loop over independent outputs (so
//! results never depend on the thread count):
//! 1. **Pack** (one task per batch): every metric row is normalised with the f32 arithmetic of
//!    the contract ([`Kernel::normalize`]) and scattered into k-major panels: A rows (even
//!    tokens) in panels of [`Kernel::MR`] rows, B rows (odd tokens) in panels of
//!    [`Kernel::NR`] columns, zero-padded. A non-finite element is flagged here.
//! 2. **Score** (one task per block of [`ROW_BLOCK`] micro-panels of A rows of one batch, so a
//!    small batch still fills the threads): for each B panel, for each A micro-panel of the
//!    block, the micro-kernel ([`Kernel::tile`]) computes an `MR × NR` tile of `A·Bᵀ` with one
//!    sequential fma chain per score, and the tile is folded at once into each row's running
//!    (max, argmax). Columns arrive in increasing order and only a strictly larger score
//!    replaces the running max, so ties keep the lowest B index. The `N/2 × N/2` score matrix
//!    is never written; the B panel stays in L2 while the block's A panels pass over it.
//! 3. **Rank** (per batch): a stable sort of the `⌈N/2⌉` best scores, descending.
//!
//! Every score is the same fma chain on every ISA, so plans are bit-identical across
//! [`Isa`] levels. Merging, unmerging and gathering run over output rows in parallel chunks;
//! sums are f32 in ascending source order, with the AVX-512 kernel converting 16 lanes at a
//! time.

use crate::cpu::par::{for_each_chunk, units_per_chunk};
use crate::cpu::{prefetch, Isa};
use crate::dtype::{DType, Float};
use crate::error::Result;
use crate::merge::{non_finite, MatchConfig, MergeMode, MergePlan, Parts, Selection};
use core::arch::x86_64::__m512;
use pulp::x86::{V3, V4};
use pulp::{f32x16, Simd, WithSimd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

mod screen;

/// A rows per scoring task, in micro-panels: big enough to reuse each B panel from L2 many
/// times, small enough that a batch of a few hundred tokens still splits into several tasks.
const ROW_BLOCK: usize = 8;

/// Lanes of the normalisation's sum of squares (part of the contract, whatever the ISA).
const SUM_LANES: usize = 16;

/// The largest tile of any kernel (for stack buffers).
const MAX_TILE: usize = 8 * 48;

/// One ISA's kernels. `tile` and `normalize` must follow the contract's arithmetic exactly.
trait Kernel: Copy + Send + Sync {
    /// A rows per micro-tile.
    const MR: usize;
    /// B columns per micro-tile.
    const NR: usize;
    /// Normalises `x` into `u` (same length); `false` if `x` holds a non-finite value (then
    /// `u` is unspecified).
    fn normalize<M: Float>(self, x: &[M], u: &mut [f32]) -> bool;
    /// `out[i·NR + j] = Σ_k fma-chain a[k·MR + i]·b[k·NR + j]` for an A panel `a` (`c·MR`) and a
    /// B panel `b` (`c·NR`).
    fn tile(self, c: usize, a: &[f32], b: &[f32], out: &mut [f32]);
    /// `acc = src` (widened).
    fn widen<T: Float>(self, src: &[T], acc: &mut [f32]);
    /// `acc += src`.
    fn add<T: Float>(self, src: &[T], acc: &mut [f32]);
    /// `acc = fma(src, w, acc)`.
    fn fma<T: Float>(self, src: &[T], w: f32, acc: &mut [f32]);
    /// `dst = T(acc / d)` (`d = None`: `T(acc)`).
    fn narrow<T: Float>(self, acc: &[f32], d: Option<f32>, dst: &mut [T]);
    /// The transpose of a block: `out[k][r] = m[r][k]`.
    fn transpose(self, m: Block) -> Block;
    /// `out[k] = bf16(u[k])` (nearest even; `u` finite), and 16 lane sums (`k mod 16`, f32
    /// fma) of the squared rounding errors `(bf16(u[k]) − u[k])²`, each of which is exact.
    fn round_bf16(self, u: &[f32], out: &mut [u16]) -> [f32; 16];
}

/// bf16 bits of a finite `x`, rounded to nearest even.
#[inline(always)]
fn bf16_bits(x: f32) -> u32 {
    let b = x.to_bits();
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
}

const _: () = assert!(Portable::MR * Portable::NR <= MAX_TILE && Avx512::MR * Avx512::NR <= MAX_TILE);
const _: () = assert!(Avx512::NR.is_multiple_of(16));

/// `p = 2^−e`, `e = ⌊log₂ m⌋` clamped to [−126, 126], for `m > 0` finite.
#[inline(always)]
fn scale_of(m: f32) -> f32 {
    let e = (((m.to_bits() >> 23) & 0xff) as i32 - 127).clamp(-126, 126);
    f32::from_bits(((127 - e) as u32) << 23)
}

/// The contract's lane reduction: `l += l+8`, `l += l+4`, `l += l+2`, `l += l+1`.
#[inline(always)]
fn reduce_lanes(mut s: [f32; SUM_LANES]) -> f32 {
    let mut w = SUM_LANES / 2;
    while w > 0 {
        for l in 0..w {
            s[l] += s[l + w];
        }
        w /= 2;
    }
    s[0]
}

/// Plain loops (vectorised by the compiler under `Isa::V3`).
#[derive(Clone, Copy)]
struct Portable;

impl Kernel for Portable {
    const MR: usize = 4;
    const NR: usize = 16;

    #[inline(always)]
    fn round_bf16(self, u: &[f32], out: &mut [u16]) -> [f32; 16] {
        let mut lanes = [0.0f32; 16];
        for (us, os) in u.chunks(16).zip(out.chunks_mut(16)) {
            for ((l, &x), o) in lanes.iter_mut().zip(us).zip(os) {
                let h = bf16_bits(x);
                *o = h as u16;
                // Exact: the rounding stays within a factor 2 of `x` (Sterbenz).
                let d = f32::from_bits(h << 16) - x;
                *l = d.mul_add(d, *l);
            }
        }
        lanes
    }

    #[inline(always)]
    fn transpose(self, m: Block) -> Block {
        let mut t = [[0u32; GROUP]; GROUP];
        for (r, row) in m.iter().enumerate() {
            for (k, &v) in row.iter().enumerate() {
                t[k][r] = v;
            }
        }
        t
    }

    #[inline(always)]
    fn normalize<M: Float>(self, x: &[M], u: &mut [f32]) -> bool {
        let mut m = 0.0f32;
        let mut finite = true;
        for v in x {
            let a = v.to_f32().abs();
            finite &= a <= f32::MAX;
            m = m.max(a);
        }
        if !finite {
            return false;
        }
        if m == 0.0 {
            u.fill(0.0);
            return true;
        }
        let p = scale_of(m);
        let mut lanes = [0.0f32; SUM_LANES];
        for (xs, us) in x.chunks(SUM_LANES).zip(u.chunks_mut(SUM_LANES)) {
            for ((v, y), l) in xs.iter().zip(us.iter_mut()).zip(lanes.iter_mut()) {
                *y = v.to_f32() * p;
                *l = y.mul_add(*y, *l);
            }
        }
        let inv = 1.0 / reduce_lanes(lanes).sqrt();
        u.iter_mut().for_each(|y| *y *= inv);
        true
    }

    #[inline(always)]
    fn tile(self, _c: usize, a: &[f32], b: &[f32], out: &mut [f32]) {
        const MR: usize = Portable::MR;
        const NR: usize = Portable::NR;
        let mut acc = [[0.0f32; NR]; MR];
        for (ak, bk) in a.as_chunks::<MR>().0.iter().zip(b.as_chunks::<NR>().0) {
            for (acc, &ai) in acc.iter_mut().zip(ak) {
                for (s, &bj) in acc.iter_mut().zip(bk) {
                    *s = ai.mul_add(bj, *s);
                }
            }
        }
        for (o, acc) in out.as_chunks_mut::<NR>().0.iter_mut().zip(&acc) {
            *o = *acc;
        }
    }

    #[inline(always)]
    fn widen<T: Float>(self, src: &[T], acc: &mut [f32]) {
        acc.iter_mut().zip(src).for_each(|(a, s)| *a = s.to_f32());
    }

    #[inline(always)]
    fn add<T: Float>(self, src: &[T], acc: &mut [f32]) {
        acc.iter_mut().zip(src).for_each(|(a, s)| *a += s.to_f32());
    }

    #[inline(always)]
    fn fma<T: Float>(self, src: &[T], w: f32, acc: &mut [f32]) {
        acc.iter_mut().zip(src).for_each(|(a, s)| *a = s.to_f32().mul_add(w, *a));
    }

    #[inline(always)]
    fn narrow<T: Float>(self, acc: &[f32], d: Option<f32>, dst: &mut [T]) {
        match d {
            Some(d) => dst.iter_mut().zip(acc).for_each(|(o, a)| *o = T::from_f32(a / d)),
            None => dst.iter_mut().zip(acc).for_each(|(o, a)| *o = T::from_f32(*a)),
        }
    }
}

/// AVX-512 through pulp's `V4` token.
#[derive(Clone, Copy)]
struct Avx512(V4);

const LANES: usize = 16;

/// Reads a `T` from the first `size_of::<T>()` bytes of `bytes`.
#[inline(always)]
fn read<T: bytemuck::Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: the assert above keeps the read inside `bytes`; `T: Pod` accepts any bit
    // pattern; `read_unaligned` has no alignment requirement.
    unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

impl Avx512 {
    /// 16 elements (`src.len() ≥ 16`) widened to f32, exactly.
    #[inline(always)]
    fn load<T: Float>(self, src: &[T]) -> __m512 {
        let s = self.0;
        let bytes: &[u8] = bytemuck::cast_slice(src);
        match T::DTYPE {
            DType::F32 => read(bytes),
            DType::F16 => s.avx512f._mm512_cvtph_ps(pulp::cast(read::<pulp::u16x16>(bytes))),
            DType::BF16 => pulp::cast(s.shl_const_u32x16::<16>(s.convert_u16x16_to_u32x16(read(bytes)))),
            DType::U8 => unreachable!("Float excludes u8"),
        }
    }

    /// The first `n ≤ 16` elements of `src` widened to f32, zeros after.
    #[inline(always)]
    fn load_tail<T: Float>(self, src: &[T]) -> __m512 {
        let mut pad = [T::from_f32(0.0); LANES];
        pad[..src.len()].copy_from_slice(src);
        self.load(&pad)
    }

    /// Rounds 16 lanes to `T` and stores them into `dst` (`dst.len() == 16`), with the
    /// rounding of [`crate::dtype`] (nearest even; NaN stays NaN).
    #[inline(always)]
    fn store<T: Float>(self, v: __m512, dst: &mut [T]) {
        use core::arch::x86_64::{__m512i, _CMP_UNORD_Q, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT};
        let f = self.0.avx512f;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(dst);
        match T::DTYPE {
            DType::F32 => bytes.copy_from_slice(bytemuck::bytes_of(&pulp::cast::<__m512, [f32; LANES]>(v))),
            DType::F16 => {
                let h = f._mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                bytes.copy_from_slice(bytemuck::bytes_of(&pulp::cast::<_, [u16; LANES]>(h)));
            }
            DType::BF16 => {
                let x: __m512i = pulp::cast(v);
                let lsb = f._mm512_and_si512(f._mm512_srli_epi32::<16>(x), f._mm512_set1_epi32(1));
                let rounded = f._mm512_add_epi32(f._mm512_add_epi32(x, f._mm512_set1_epi32(0x7fff)), lsb);
                let quiet = f._mm512_or_si512(x, f._mm512_set1_epi32(0x0040_0000));
                let nan = f._mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                let bits = f._mm512_srli_epi32::<16>(f._mm512_mask_blend_epi32(nan, rounded, quiet));
                bytes
                    .copy_from_slice(bytemuck::bytes_of(&pulp::cast::<_, [u16; LANES]>(f._mm512_cvtepi32_epi16(bits))));
            }
            DType::U8 => unreachable!("Float excludes u8"),
        }
    }

    /// The f32 lanes of `acc[i..i+len]` (len ≤ 16, zeros past it).
    #[inline(always)]
    fn acc_load(self, acc: &[f32], i: usize, len: usize) -> __m512 {
        if len == LANES {
            read(bytemuck::cast_slice(&acc[i..i + LANES]))
        } else {
            self.load_tail(&acc[i..i + len])
        }
    }

    #[inline(always)]
    fn acc_store(self, v: __m512, acc: &mut [f32], i: usize, len: usize) {
        let a: [f32; LANES] = pulp::cast(v);
        if len == LANES {
            // A fixed-size copy: one vector store (a slice copy of runtime length is a call).
            let dst: &mut [f32; LANES] = (&mut acc[i..i + LANES]).try_into().expect("16 lanes");
            *dst = a;
        } else {
            acc[i..i + len].copy_from_slice(&a[..len]);
        }
    }

    #[inline(always)]
    fn src_load<T: Float>(self, src: &[T], i: usize, len: usize) -> __m512 {
        if len == LANES {
            self.load(&src[i..i + LANES])
        } else {
            self.load_tail(&src[i..i + len])
        }
    }
}

impl Kernel for Avx512 {
    const MR: usize = 8;
    const NR: usize = 48;

    #[inline(always)]
    fn round_bf16(self, u: &[f32], out: &mut [u16]) -> [f32; 16] {
        use core::arch::x86_64::__m512i;
        let f = self.0.avx512f;
        let (one, bias, top) = (f._mm512_set1_epi32(1), f._mm512_set1_epi32(0x7fff), f._mm512_set1_epi32(-65536));
        let mut acc = f._mm512_setzero_ps();
        let n = u.len();
        let mut i = 0;
        while i < n {
            let len = (n - i).min(LANES);
            let x = self.acc_load(u, i, len);
            let b: __m512i = pulp::cast(x);
            let lsb = f._mm512_and_si512(f._mm512_srli_epi32::<16>(b), one);
            let r = f._mm512_add_epi32(f._mm512_add_epi32(b, bias), lsb);
            let d = f._mm512_sub_ps(pulp::cast(f._mm512_and_si512(r, top)), x);
            acc = f._mm512_fmadd_ps(d, d, acc);
            let h: [u16; LANES] = pulp::cast(f._mm512_cvtepi32_epi16(f._mm512_srli_epi32::<16>(r)));
            if len == LANES {
                *out[i..].first_chunk_mut::<LANES>().expect("16 lanes") = h;
            } else {
                out[i..i + len].copy_from_slice(&h[..len]);
            }
            i += LANES;
        }
        pulp::cast(acc)
    }

    /// Four rounds of two-source permutes: round `b = 8, 4, 2, 1` swaps the off-diagonal
    /// `b × b` sub-blocks of every `2b × 2b` block (rows `i`, `i + b` exchange lane chunks).
    #[inline(always)]
    fn transpose(self, m: Block) -> Block {
        use core::arch::x86_64::__m512i;
        let f = self.0.avx512f;
        let mut v: [__m512i; GROUP] = pulp::cast(m);
        for (round, idx) in TRANSPOSE_INDEX.iter().enumerate() {
            let b = GROUP >> (round + 1);
            let (lo, hi): (__m512i, __m512i) = (pulp::cast(idx[0]), pulp::cast(idx[1]));
            for i in (0..GROUP).filter(|i| (i / b).is_multiple_of(2)) {
                let (x, y) = (v[i], v[i + b]);
                v[i] = f._mm512_permutex2var_epi32(x, lo, y);
                v[i + b] = f._mm512_permutex2var_epi32(x, hi, y);
            }
        }
        pulp::cast(v)
    }

    // (Loops, not closures: a closure is not compiled with the caller's target features, so
    // the intrinsics inside it would not inline.)
    #[inline(always)]
    fn normalize<M: Float>(self, x: &[M], u: &mut [f32]) -> bool {
        use core::arch::x86_64::_CMP_NLE_UQ;
        let f = self.0.avx512f;
        let c = x.len();
        let big = f._mm512_set1_ps(f32::MAX);
        let mut mx = f._mm512_setzero_ps();
        let mut bad = 0u16;
        let mut i = 0;
        while i < c {
            let len = (c - i).min(LANES);
            let a = pulp::cast(self.0.abs_f32x16(pulp::cast(self.src_load(x, i, len))));
            bad |= f._mm512_cmp_ps_mask::<_CMP_NLE_UQ>(a, big);
            mx = f._mm512_max_ps(mx, a);
            i += LANES;
        }
        if bad != 0 {
            return false;
        }
        let m = pulp::cast::<__m512, [f32; LANES]>(mx).into_iter().fold(0.0f32, f32::max);
        if m == 0.0 {
            u.fill(0.0);
            return true;
        }
        let p = f._mm512_set1_ps(scale_of(m));
        let mut lanes = f._mm512_setzero_ps();
        let mut i = 0;
        while i < c {
            let len = (c - i).min(LANES);
            let y = f._mm512_mul_ps(self.src_load(x, i, len), p);
            lanes = f._mm512_fmadd_ps(y, y, lanes);
            self.acc_store(y, u, i, len);
            i += LANES;
        }
        let inv = f._mm512_set1_ps(1.0 / reduce_lanes(pulp::cast(lanes)).sqrt());
        let mut i = 0;
        while i < c {
            let len = (c - i).min(LANES);
            let y = f._mm512_mul_ps(self.acc_load(u, i, len), inv);
            self.acc_store(y, u, i, len);
            i += LANES;
        }
        true
    }

    #[inline(always)]
    fn tile(self, _c: usize, a: &[f32], b: &[f32], out: &mut [f32]) {
        const MR: usize = Avx512::MR;
        const NR: usize = Avx512::NR;
        const NV: usize = NR / LANES;
        let s = self.0;
        let mut acc = [[s.splat_f32x16(0.0); NV]; MR];
        for (ak, bk) in a.as_chunks::<MR>().0.iter().zip(b.as_chunks::<NR>().0) {
            let bv: [f32x16; NV] = pulp::cast(*bk);
            for (acc, &ai) in acc.iter_mut().zip(ak) {
                let av = s.splat_f32x16(ai);
                for (s_, b_) in acc.iter_mut().zip(&bv) {
                    *s_ = s.mul_add_f32x16(av, *b_, *s_);
                }
            }
        }
        for (o, acc) in out.as_chunks_mut::<NR>().0.iter_mut().zip(&acc) {
            *o = pulp::cast(*acc);
        }
    }

    #[inline(always)]
    fn widen<T: Float>(self, src: &[T], acc: &mut [f32]) {
        let n = acc.len();
        let mut i = 0;
        while i < n {
            let len = (n - i).min(LANES);
            self.acc_store(self.src_load(src, i, len), acc, i, len);
            i += LANES;
        }
    }

    #[inline(always)]
    fn add<T: Float>(self, src: &[T], acc: &mut [f32]) {
        let f = self.0.avx512f;
        let n = acc.len();
        let mut i = 0;
        while i < n {
            let len = (n - i).min(LANES);
            let v = f._mm512_add_ps(self.acc_load(acc, i, len), self.src_load(src, i, len));
            self.acc_store(v, acc, i, len);
            i += LANES;
        }
    }

    #[inline(always)]
    fn fma<T: Float>(self, src: &[T], w: f32, acc: &mut [f32]) {
        let f = self.0.avx512f;
        let wv = f._mm512_set1_ps(w);
        let n = acc.len();
        let mut i = 0;
        while i < n {
            let len = (n - i).min(LANES);
            let v = f._mm512_fmadd_ps(self.src_load(src, i, len), wv, self.acc_load(acc, i, len));
            self.acc_store(v, acc, i, len);
            i += LANES;
        }
    }

    #[inline(always)]
    fn narrow<T: Float>(self, acc: &[f32], d: Option<f32>, dst: &mut [T]) {
        let f = self.0.avx512f;
        let dv = f._mm512_set1_ps(d.unwrap_or(1.0));
        let n = acc.len();
        let mut i = 0;
        while i < n {
            let len = (n - i).min(LANES);
            let mut v = self.acc_load(acc, i, len);
            if d.is_some() {
                v = f._mm512_div_ps(v, dv);
            }
            if len == LANES {
                self.store(v, &mut dst[i..i + LANES]);
            } else {
                let mut pad = [T::from_f32(0.0); LANES];
                self.store(v, &mut pad);
                dst[i..i + len].copy_from_slice(&pad[..len]);
            }
            i += LANES;
        }
    }
}

/// Work to run with the kernels of an ISA.
trait Op {
    type Output;
    fn run<K: Kernel>(self, k: K) -> Self::Output;
}

struct WithKernel<O, K>(O, K);

impl<O: Op, K: Kernel> WithSimd for WithKernel<O, K> {
    type Output = O::Output;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> Self::Output {
        self.0.run(self.1)
    }
}

/// Whether `isa` runs the AVX-512 kernels (else the portable ones).
fn uses_avx512(isa: Isa) -> bool {
    isa == Isa::V4 && V4::try_new().is_some()
}

/// `(MR, NR)` of the kernel [`dispatch`] picks for `isa`.
fn tile_dims(isa: Isa) -> (usize, usize) {
    if uses_avx512(isa) {
        (Avx512::MR, Avx512::NR)
    } else {
        (Portable::MR, Portable::NR)
    }
}

/// Runs `op` with the kernels of `isa`, inside a function compiled for that ISA's target
/// features (the portable kernels if the ISA is unavailable; callers check beforehand).
#[inline(always)]
fn dispatch<O: Op>(isa: Isa, op: O) -> O::Output {
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

/// Rows normalised together before packing.
const GROUP: usize = 16;
const _: () = assert!(
    (Portable::MR.is_multiple_of(GROUP) || GROUP.is_multiple_of(Portable::MR))
        && (Portable::NR.is_multiple_of(GROUP) || GROUP.is_multiple_of(Portable::NR))
        && (Avx512::MR.is_multiple_of(GROUP) || GROUP.is_multiple_of(Avx512::MR))
        && (Avx512::NR.is_multiple_of(GROUP) || GROUP.is_multiple_of(Avx512::NR))
);

/// Writes a `GROUP × GROUP` block (`blk[k][r]`: depth `k0 + k`, packed row `g·GROUP + r`) into
/// k-major panels of `pp` rows and `depth` (channels or channel pairs), as contiguous runs.
#[inline(always)]
fn scatter_block<E: Copy>(
    blk: &[[E; GROUP]; GROUP],
    kn: usize,
    k0: usize,
    depth: usize,
    g: usize,
    pp: usize,
    out: &mut [E],
) {
    let out_rows = out.len() / depth;
    for (kk, col) in blk.iter().enumerate().take(kn) {
        let kc = k0 + kk;
        if pp.is_multiple_of(GROUP) {
            let row = g * GROUP;
            out[row / pp * pp * depth + kc * pp + row % pp..][..GROUP].copy_from_slice(col);
        } else {
            for (piece, vals) in col.chunks_exact(pp).enumerate() {
                let row = g * GROUP + piece * pp;
                if row >= out_rows {
                    break;
                }
                let dst = &mut out[row / pp * pp * depth + kc * pp..][..pp];
                // Fixed-size copies for the panel heights in use (a runtime-length copy is a
                // call per piece).
                match pp {
                    8 => *dst.first_chunk_mut::<8>().expect("8") = *vals.first_chunk::<8>().expect("8"),
                    4 => *dst.first_chunk_mut::<4>().expect("4") = *vals.first_chunk::<4>().expect("4"),
                    _ => dst.copy_from_slice(vals),
                }
            }
        }
    }
}

/// The permute indices of [`Avx512`]'s transpose, round `b = 8, 4, 2, 1`: lane `l` of chunk
/// `q` (of `2b` lanes) takes, for the low output, `x[2bq + o]` (`o < b`) then
/// `y[2bq + o − b]`; for the high output the next `b` lanes of each (`y` is indices 16..32).
const TRANSPOSE_INDEX: [[[i32; GROUP]; 2]; 4] = {
    let mut t = [[[0i32; GROUP]; 2]; 4];
    let mut round = 0;
    while round < 4 {
        let b = GROUP >> (round + 1);
        let mut l = 0;
        while l < GROUP {
            let (q, o) = (l / (2 * b), l % (2 * b));
            let (src, off) = if o < b { (0, o) } else { (GROUP, o - b) };
            t[round][0][l] = (src + 2 * b * q + off) as i32;
            t[round][1][l] = (src + 2 * b * q + b + off) as i32;
            l += 1;
        }
        round += 1;
    }
    t
};

/// A `GROUP × GROUP` block of 32-bit words: `m[r][k]`.
type Block = [[u32; GROUP]; GROUP];

/// Loads word rows `r < n` of `words` (`stride` apart, `kn ≤ GROUP` from `k0`) into a block,
/// zeros elsewhere.
#[inline(always)]
fn load_block(words: &[u32], stride: usize, n: usize, k0: usize, kn: usize) -> Block {
    let mut m = [[0u32; GROUP]; GROUP];
    for (r, row) in m.iter_mut().enumerate().take(n) {
        let src = &words[r * stride + k0..];
        if kn == GROUP {
            // A fixed-size copy: one vector load and store.
            *row = *src.first_chunk::<GROUP>().expect("a whole block row");
        } else {
            row[..kn].copy_from_slice(&src[..kn]);
        }
    }
    m
}

/// Writes up to `GROUP` row-major rows of `c` (the packed rows `g·GROUP + r`; missing rows are
/// zero) into k-major f32 panels of `pp` rows. Through a block transposed in registers, every
/// store to the panels is a contiguous run (a direct scatter, one element per cache line,
/// costs several times more).
#[inline(always)]
fn write_panels<K: Kernel>(k: K, rows: &[f32], c: usize, g: usize, pp: usize, out: &mut [f32]) {
    let nrows = rows.len() / c;
    let words: &[u32] = bytemuck::cast_slice(rows);
    let out: &mut [u32] = bytemuck::cast_slice_mut(out);
    for k0 in (0..c).step_by(GROUP) {
        let kn = (c - k0).min(GROUP);
        let t = k.transpose(load_block(words, c, nrows, k0, kn));
        scatter_block(&t, kn, k0, c, g, pp, out);
    }
}

/// Like [`write_panels`], in bf16 pairs: depth `kp` holds `(bf16(u[2kp]), bf16(u[2kp+1]))` in
/// one u32, low half first (an odd `c` is padded with a zero), rounded to nearest even (the
/// values are finite: no NaN case). `scratch` holds `GROUP · ⌈c/2⌉` words. `errs[r]` receives
/// an upper bound of `‖bf16(u_r) − u_r‖₂` (summed in f64, then enlarged by 10⁻⁴ to cover the
/// f32 rounding), for the screening margin.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn write_pair_panels<K: Kernel>(
    k: K,
    rows: &[f32],
    c: usize,
    g: usize,
    pp: usize,
    scratch: &mut [u32],
    errs: &mut [f32],
    out: &mut [u32],
) {
    let nrows = rows.len() / c;
    let np = c.div_ceil(2);
    // Round every row first, into the halves of the words, and bound the rounding error: 16
    // lane sums of squares in f32, enlarged by their worst relative rounding `c·2⁻²²` and an
    // absolute `c·2⁻¹⁴⁰` for underflow.
    let halves: &mut [u16] = bytemuck::cast_slice_mut(scratch);
    for ((src, dst), e) in rows.chunks_exact(c).zip(halves.chunks_exact_mut(2 * np)).zip(errs.iter_mut()) {
        let lanes = k.round_bf16(src, &mut dst[..c]);
        dst[c..].fill(0);
        let sq = lanes.iter().map(|&l| l as f64).sum::<f64>() * (1.0 + c as f64 * 2f64.powi(-22))
            + c as f64 * 2f64.powi(-140);
        *e = (sq.sqrt() * 1.0001) as f32;
    }
    for k0 in (0..np).step_by(GROUP) {
        let kn = (np - k0).min(GROUP);
        let t = k.transpose(load_block(scratch, np, nrows, k0, kn));
        scatter_block(&t, kn, k0, np, g, pp, out);
    }
}

/// Panels of `pp` rows from row-major rows (`rows.len() / c` of them; `out` padded).
fn panels_from_rows<K: Kernel>(k: K, rows: &[f32], c: usize, pp: usize, out: &mut [f32]) {
    for (g, group) in rows.chunks(GROUP * c).enumerate() {
        write_panels(k, group, c, g, pp, out);
    }
}

/// One side (A or B) of one batch: normalise tokens `first, first + step, …` and write them
/// in the layouts asked for.
struct PackSide<'a, M> {
    /// The batch's metric `[n, c]`.
    x: &'a [M],
    c: usize,
    first: usize,
    step: usize,
    /// Rows per panel.
    pp: usize,
    /// k-major f32 panels.
    panels: Option<&'a mut [f32]>,
    /// Row-major f32 rows.
    rows: Option<&'a mut [f32]>,
    /// k-major bf16-pair panels.
    pairs: Option<&'a mut [u32]>,
    /// With `pairs`: each row's bf16 rounding error bound (see [`write_pair_panels`]).
    errs: Option<&'a mut [f32]>,
}

impl<M: Float> Op for PackSide<'_, M> {
    /// The first token (batch-relative) holding a non-finite value.
    type Output = Option<usize>;

    #[inline(always)]
    fn run<K: Kernel>(mut self, k: K) -> Option<usize> {
        let (c, pp) = (self.c, self.pp);
        let n = self.x.len() / c;
        let tokens: Vec<usize> = (self.first..n).step_by(self.step).collect();
        // Rows are normalised straight into the row-major output when there is one.
        let mut tmp = vec![0.0f32; if self.rows.is_some() { 0 } else { GROUP * c }];
        let mut scratch = vec![0u32; if self.pairs.is_some() { GROUP * c.div_ceil(2) } else { 0 }];
        for (g, group) in tokens.chunks(GROUP).enumerate() {
            let dst = match self.rows.as_deref_mut() {
                Some(rows) => &mut rows[g * GROUP * c..][..group.len() * c],
                None => &mut tmp[..group.len() * c],
            };
            for (&t, u) in group.iter().zip(dst.chunks_exact_mut(c)) {
                // The rows of a side are `step` apart: fetch the next one while this one is
                // normalised (the hardware prefetchers miss the stride at row starts).
                if let Some(next) = self.x.get((t + self.step) * c..(t + self.step + 1) * c) {
                    prefetch(next);
                }
                if !k.normalize(&self.x[t * c..][..c], u) {
                    return Some(t);
                }
            }
            let valid = &*dst;
            if let Some(panels) = self.panels.as_deref_mut() {
                write_panels(k, valid, c, g, pp, panels);
            }
            if let (Some(pairs), Some(errs)) = (self.pairs.as_deref_mut(), self.errs.as_deref_mut()) {
                let errs = &mut errs[g * GROUP..][..group.len()];
                write_pair_panels(k, valid, c, g, pp, &mut scratch, errs, pairs);
            }
        }
        None
    }
}

/// The sizes of one batch's packed sides.
#[derive(Clone, Copy)]
struct Geometry {
    c: usize,
    mr: usize,
    nr: usize,
    na: usize,
    nb: usize,
    /// A / B rows padded to whole panels.
    na_pad: usize,
    nb_pad: usize,
    /// bf16 pairs per row, `⌈c/2⌉`.
    pairs: usize,
}

impl Geometry {
    fn new(isa: Isa, na: usize, nb: usize, c: usize) -> Geometry {
        let (mr, nr) = tile_dims(isa);
        let (na_pad, nb_pad) = (na.div_ceil(mr) * mr, nb.div_ceil(nr) * nr);
        Geometry { c, mr, nr, na, nb, na_pad, nb_pad, pairs: c.div_ceil(2) }
    }
}

/// The normalised metric of one batch. f32 mode: `a_panels` and `b_panels`. Screening mode:
/// rows and bf16-pair panels of both sides, and `b_panels` built only if a block falls back
/// to the f32 tiles.
#[derive(Default)]
struct Packed {
    a_panels: Vec<f32>,
    b_panels: OnceLock<Vec<f32>>,
    a_rows: Vec<f32>,
    b_rows: Vec<f32>,
    a_pairs: Vec<u32>,
    b_pairs: Vec<u32>,
    /// Rounding error bounds of the bf16 rows (see [`write_pair_panels`]).
    a_errs: Vec<f32>,
    b_errs: Vec<f32>,
}

impl Packed {
    /// The f32 B panels (built from the rows on first use in screening mode).
    fn b_panels(&self, geo: &Geometry) -> &[f32] {
        self.b_panels.get_or_init(|| {
            let mut out = vec![0.0f32; geo.nb_pad * geo.c];
            panels_from_rows(Portable, &self.b_rows, geo.c, geo.nr, &mut out);
            out
        })
    }
}

/// Normalises and packs every batch (A: tokens `a.0, a.0 + a.1, …`; B likewise); `Err` holds
/// the flat index of the first non-finite element.
#[allow(clippy::too_many_arguments)]
fn pack<M: Float>(
    isa: Isa,
    screen: bool,
    metric: &[M],
    batch: usize,
    n: usize,
    geo: Geometry,
    a: (usize, usize),
    b: (usize, usize),
) -> std::result::Result<Vec<Packed>, usize> {
    let c = geo.c;
    let first = AtomicUsize::new(usize::MAX);
    let mut out = take_pool(batch);
    for_each_chunk(&mut out, 1, |bi, slot| {
        let x = &metric[bi * n * c..][..n * c];
        let p = &mut slot[0];
        let side = |(first, step): (usize, usize), pp| PackSide {
            x,
            c,
            first,
            step,
            pp,
            panels: None,
            rows: None,
            pairs: None,
            errs: None,
        };
        let (bad_a, bad_b);
        let mut b_panels = p.b_panels.take().unwrap_or_default();
        if screen {
            // Rows are written whole; panels only up to the last group of GROUP rows.
            prepare(&mut p.a_rows, geo.na * c, geo.na * c);
            prepare(&mut p.b_rows, geo.nb * c, geo.nb * c);
            prepare(&mut p.a_pairs, geo.na_pad * geo.pairs, geo.na / geo.mr * geo.mr * geo.pairs);
            prepare(&mut p.b_pairs, geo.nb_pad * geo.pairs, geo.nb / geo.nr * geo.nr * geo.pairs);
            prepare(&mut p.a_errs, geo.na, geo.na);
            prepare(&mut p.b_errs, geo.nb, geo.nb);
            let (rows, pairs, errs) = (Some(&mut p.a_rows[..]), Some(&mut p.a_pairs[..]), Some(&mut p.a_errs[..]));
            bad_a = dispatch(isa, PackSide { rows, pairs, errs, ..side(a, geo.mr) });
            let (rows, pairs, errs) = (Some(&mut p.b_rows[..]), Some(&mut p.b_pairs[..]), Some(&mut p.b_errs[..]));
            bad_b = dispatch(isa, PackSide { rows, pairs, errs, ..side(b, geo.nr) });
            // (`b_panels` is built from the rows only if a block falls back to the f32 tiles.)
        } else {
            prepare(&mut p.a_panels, geo.na_pad * c, geo.na / geo.mr * geo.mr * c);
            prepare(&mut b_panels, geo.nb_pad * c, geo.nb / geo.nr * geo.nr * c);
            bad_a = dispatch(isa, PackSide { panels: Some(&mut p.a_panels), ..side(a, geo.mr) });
            bad_b = dispatch(isa, PackSide { panels: Some(&mut b_panels), ..side(b, geo.nr) });
            p.b_panels = OnceLock::from(b_panels);
        }
        // The lowest bad token of the batch, then its first bad element.
        if let Some(t) = [bad_a, bad_b].into_iter().flatten().min() {
            let k = x[t * c..][..c].iter().position(|v| !v.to_f32().is_finite()).unwrap_or(0);
            record(&first, Some((bi * n + t) * c + k));
        }
    });
    match lowest(first) {
        Some(i) => {
            give_pool(out);
            Err(i)
        }
        None => Ok(out),
    }
}

/// Sizes `v` to `len` for packing, zero from `dirty_from` on (the panels that hold padding);
/// the prefix is overwritten by the packing. Reusing the allocation spares fresh pages (page
/// faults and the kernel's zeroing cost a fifth of a ToMe layer otherwise).
fn prepare<T: Copy + Default>(v: &mut Vec<T>, len: usize, dirty_from: usize) {
    v.resize(len, T::default());
    v[dirty_from.min(len)..].fill(T::default());
}

/// The packed buffers of the last call, kept for the next one (at most one set).
static POOL: Mutex<Vec<Packed>> = Mutex::new(Vec::new());

/// `batch` packed sets, reusing the pool's allocations.
fn take_pool(batch: usize) -> Vec<Packed> {
    let mut v = POOL.lock().map(|mut g| std::mem::take(&mut *g)).unwrap_or_default();
    v.resize_with(batch, Packed::default);
    v
}

/// Returns packed sets to the pool.
fn give_pool(v: Vec<Packed>) {
    if let Ok(mut g) = POOL.lock() {
        *g = v;
    }
}

/// Folds a tile into the running (max, argmax) of its rows: columns `[j_lo, j_hi)` of the
/// tile are valid, column `j` of the tile is B index `j0 + j`.
#[inline(always)]
fn fold_tile(tile: &[f32], nr: usize, best: &mut [(f32, u32)], j0: usize, j_lo: usize, j_hi: usize) {
    for (row, b) in tile.chunks_exact(nr).zip(best.iter_mut()) {
        let mut m = f32::NEG_INFINITY;
        let mut at = 0;
        for (j, &s) in row[j_lo..j_hi].iter().enumerate() {
            if s > m {
                m = s;
                at = j;
            }
        }
        if m > b.0 {
            *b = (m, (j0 + j_lo + at) as u32);
        }
    }
}

/// The best B (score, index) of `best.len()` consecutive A rows, the first in A panel `a[0]`.
struct ScoreBlock<'a> {
    /// The block's A panels.
    a: &'a [f32],
    /// All B panels.
    b: &'a [f32],
    geo: Geometry,
    /// Skip column 0 (distillation token).
    skip_col0: bool,
    /// Skip row 0 of the block (class token).
    skip_row0: bool,
    best: &'a mut [(f32, u32)],
}

impl Op for ScoreBlock<'_> {
    type Output = ();

    #[inline(always)]
    fn run<K: Kernel>(self, k: K) {
        let (c, mr, nr, nb) = (self.geo.c, K::MR, K::NR, self.geo.nb);
        let mut tile = [0.0f32; MAX_TILE];
        let tile = &mut tile[..mr * nr];
        for (q, bp) in self.b.chunks_exact(nr * c).enumerate() {
            let j0 = q * nr;
            let j_lo = if self.skip_col0 && q == 0 { 1 } else { 0 };
            let j_hi = (nb - j0).min(nr);
            if j_lo >= j_hi {
                continue;
            }
            for (pi, best) in self.best.chunks_mut(mr).enumerate() {
                let ap = &self.a[pi * mr * c..][..mr * c];
                k.tile(c, ap, bp, tile);
                if self.skip_row0 && pi == 0 {
                    fold_tile(&tile[nr..], nr, &mut best[1..], j0, j_lo, j_hi);
                } else {
                    fold_tile(tile, nr, best, j0, j_lo, j_hi);
                }
            }
        }
    }
}

/// The first non-finite element of `x`, scanning in parallel chunks.
fn first_non_finite<M: Float>(x: &[M]) -> Option<usize> {
    let per = units_per_chunk(size_of::<M>());
    let first = AtomicUsize::new(usize::MAX);
    let mut flags = vec![0u8; x.len().div_ceil(per)];
    for_each_chunk(&mut flags, 1, |ci, _| {
        let chunk = &x[ci * per..][..per.min(x.len() - ci * per)];
        if !chunk.iter().fold(true, |ok, v| ok & v.to_f32().is_finite()) {
            record(&first, chunk.iter().position(|v| !v.to_f32().is_finite()).map(|i| ci * per + i));
        }
    });
    lowest(first)
}

/// ToMe's bipartite soft matching; `r` is already clamped. Screens with bf16 dot products
/// where the CPU has them ([`screen`]).
pub(crate) fn bipartite<M: Float>(
    isa: Isa,
    metric: &[M],
    batch: usize,
    n: usize,
    c: usize,
    cfg: &MatchConfig,
    r: usize,
) -> Result<Parts> {
    bipartite_with(isa, screen::available(isa, c) && std::env::var("NOSCREEN").is_err(), metric, batch, n, c, cfg, r)
}

/// [`bipartite`] with the screening chosen by the caller (`screen` needs
/// [`screen::available`]).
#[allow(clippy::too_many_arguments)]
fn bipartite_with<M: Float>(
    isa: Isa,
    screen: bool,
    metric: &[M],
    batch: usize,
    n: usize,
    c: usize,
    cfg: &MatchConfig,
    r: usize,
) -> Result<Parts> {
    let mut parts = Parts { kept: vec![], merged: vec![], dest: vec![] };
    if r == 0 {
        return match first_non_finite(metric) {
            Some(i) => Err(non_finite("metric", i, n, c)),
            None => Ok(parts),
        };
    }
    let (na, nb) = (n.div_ceil(2), n / 2);
    let geo = Geometry::new(isa, na, nb, c);
    let packed = pack(isa, screen, metric, batch, n, geo, (0, 2), (1, 2)).map_err(|i| non_finite("metric", i, n, c))?;

    // Scoring tasks: blocks of ROW_BLOCK A micro-panels.
    let block = ROW_BLOCK * geo.mr;
    let blocks = na.div_ceil(block);
    let mut best = vec![(f32::NEG_INFINITY, 0u32); batch * blocks * block];
    let pk_all = &packed;
    for_each_chunk(&mut best, block, |ci, best| {
        let (bi, blk) = (ci / blocks, ci % blocks);
        let rows = (na - blk * block).min(block);
        let pk = &pk_all[bi];
        // A's token 0 (a class token) scores −∞ everywhere: its row keeps (−∞, 0).
        let skip_row0 = cfg.class_token && blk == 0;
        let best = &mut best[..rows];
        if screen {
            screen::score_block(pk, geo, blk * block, cfg.distill_token, skip_row0, best);
        } else {
            let a = &pk.a_panels[blk * block * c..][..rows.div_ceil(geo.mr) * geo.mr * c];
            let b = pk.b_panels(&geo);
            dispatch(isa, ScoreBlock { a, b, geo, skip_col0: cfg.distill_token, skip_row0, best });
        }
    });

    for bi in 0..batch {
        let best = &best[bi * blocks * block..][..na];
        let mut order: Vec<u32> = (0..na as u32).collect();
        // Stable: ties keep the lower A index.
        order.sort_by(|&p, &q| best[q as usize].0.partial_cmp(&best[p as usize].0).expect("scores are not NaN"));
        let mut unm = order[r..].to_vec();
        if cfg.class_token || cfg.keep_original_order {
            unm.sort_unstable();
        }
        parts.kept.extend(unm.iter().map(|&i| 2 * i));
        parts.merged.extend(order[..r].iter().map(|&i| 2 * i));
        parts.dest.extend(order[..r].iter().map(|&i| 2 * best[i as usize].1 + 1));
    }
    give_pool(packed);
    Ok(parts)
}

/// A chunk of merged output rows.
struct MergeRows<'a, T> {
    plan: &'a MergePlan,
    x: &'a [T],
    c: usize,
    mode: MergeMode,
    sizes: Option<&'a [f32]>,
    /// Global output row of `out[0]`.
    row0: usize,
    out: &'a mut [T],
}

impl<T: Float> Op for MergeRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<K: Kernel>(self, k: K) {
        let (c, n, o) = (self.c, self.plan.tokens(), self.plan.out_tokens());
        let (members, offsets) = self.plan.csr();
        let mut acc = vec![0.0f32; c];
        for (i, y) in self.out.chunks_exact_mut(c).enumerate() {
            let (b, s) = ((self.row0 + i) / o, (self.row0 + i) % o);
            let off = &offsets[b * (o + 1) + s..][..2];
            let src = &members[b * n..][off[0] as usize..off[1] as usize];
            let row = |t: u32| &self.x[(b * n + t as usize) * c..][..c];
            if src.len() == 1 {
                y.copy_from_slice(row(src[0]));
                continue;
            }
            match self.sizes {
                None => {
                    k.widen(row(src[0]), &mut acc);
                    for &t in &src[1..] {
                        k.add(row(t), &mut acc);
                    }
                    let d = (self.mode == MergeMode::Mean).then_some(src.len() as f32);
                    k.narrow(&acc, d, y);
                }
                Some(sz) => {
                    acc.fill(0.0);
                    let mut w = 0.0f32;
                    for &t in src {
                        let s = sz[b * n + t as usize];
                        k.fma(row(t), s, &mut acc);
                        w += s;
                    }
                    k.narrow(&acc, Some(w), y);
                }
            }
        }
    }
}

/// Sum / mean (`sizes = None`) or size-weighted average (`sizes = Some`, with `out_sizes`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge<T: Float>(
    plan: &MergePlan,
    isa: Isa,
    x: &[T],
    c: usize,
    mode: MergeMode,
    sizes: Option<&[f32]>,
    out: &mut [T],
    out_sizes: Option<&mut [f32]>,
) {
    if c > 0 {
        let rows = units_per_chunk(c * size_of::<T>());
        for_each_chunk(out, rows * c, |ci, out| {
            dispatch(isa, MergeRows { plan, x, c, mode, sizes, row0: ci * rows, out });
        });
    }
    if let (Some(os), Some(sz)) = (out_sizes, sizes) {
        let (n, o) = (plan.tokens(), plan.out_tokens());
        let (members, offsets) = plan.csr();
        for (g, w) in os.iter_mut().enumerate() {
            let (b, s) = (g / o, g % o);
            let off = &offsets[b * (o + 1) + s..][..2];
            // The same f32 sum, in the same order, as the values' weights.
            // (From +0, so a single source's size is copied exactly.)
            *w = members[b * n..][off[0] as usize..off[1] as usize]
                .iter()
                .fold(0.0f32, |w, &t| w + sz[b * n + t as usize]);
        }
    }
}

/// `out[b, t] = y[b, slots[b, t]]`: row copies in parallel chunks (exact on every ISA).
pub(crate) fn unmerge<T: Float>(_isa: Isa, slots: &[u32], n: usize, ny: usize, y: &[T], c: usize, out: &mut [T]) {
    if c == 0 {
        return;
    }
    let rows = units_per_chunk(c * size_of::<T>());
    for_each_chunk(out, rows * c, |ci, out| {
        for (i, o) in out.chunks_exact_mut(c).enumerate() {
            let g = ci * rows + i;
            let b = g / n;
            o.copy_from_slice(&y[(b * ny + slots[g] as usize) * c..][..c]);
        }
    });
}

/// Per batch: the `k` highest scores, descending, ties → lower index (a partial selection by
/// the total order (score desc, index asc), then a sort of the `k` selected).
pub(crate) fn top_k(score: &[f32], batch: usize, n: usize, k: usize, class_token: bool) -> Vec<u32> {
    let mut kept = vec![0u32; batch * k];
    if k == 0 {
        return kept;
    }
    for_each_chunk(&mut kept, k, |b, kept| {
        let s = &score[b * n..][..n];
        let by = |p: &u32, q: &u32| s[*q as usize].partial_cmp(&s[*p as usize]).expect("finite").then(p.cmp(q));
        let mut order: Vec<u32> = (class_token as u32..n as u32).collect();
        if k < order.len() {
            order.select_nth_unstable_by(k, by);
        }
        order[..k].sort_unstable_by(by);
        kept.copy_from_slice(&order[..k]);
    });
    kept
}

/// The full similarity matrix `[m, m]` of one batch's packed rows (A and B sides hold the same
/// rows), tile by tile.
struct SimMatrix<'a> {
    a: &'a [f32],
    b: &'a [f32],
    geo: Geometry,
    m: usize,
    out: &'a mut [f32],
}

impl Op for SimMatrix<'_> {
    type Output = ();

    #[inline(always)]
    fn run<K: Kernel>(self, k: K) {
        let (c, mr, nr, m) = (self.geo.c, K::MR, K::NR, self.m);
        let mut tile = [0.0f32; MAX_TILE];
        let tile = &mut tile[..mr * nr];
        for (q, bp) in self.b.chunks_exact(nr * c).enumerate() {
            let j0 = q * nr;
            let cols = (m - j0).min(nr);
            for (pi, ap) in self.a.chunks_exact(mr * c).enumerate() {
                k.tile(c, ap, bp, tile);
                let i0 = pi * mr;
                for (ii, row) in tile.chunks_exact(nr).take(m.saturating_sub(i0).min(mr)).enumerate() {
                    self.out[(i0 + ii) * m + j0..][..cols].copy_from_slice(&row[..cols]);
                }
            }
        }
    }
}

/// Per batch: DivPrune's greedy max-min selection on the f32 similarity matrix.
pub(crate) fn div_prune<M: Float>(
    isa: Isa,
    metric: &[M],
    batch: usize,
    n: usize,
    c: usize,
    k: usize,
    class_token: bool,
) -> Result<Vec<u32>> {
    let first = class_token as usize;
    let m = n - first;
    let geo = Geometry::new(isa, m, m, c);
    let packed =
        pack(isa, false, metric, batch, n, geo, (first, 1), (first, 1)).map_err(|i| non_finite("metric", i, n, c))?;
    let mut kept = vec![0u32; batch * k];
    let pk_all = &packed;
    for_each_chunk(&mut kept, k, |bi, kept| {
        let pk = &pk_all[bi];
        let (a, b) = (&pk.a_panels[..], pk.b_panels(&geo));
        let mut sim = vec![0.0f32; m * m];
        dispatch(isa, SimMatrix { a, b, geo, m, out: &mut sim });
        // First pick: the lowest highest similarity to any other token.
        let mut closest: Vec<f32> = (0..m)
            .map(|i| {
                let row = &sim[i * m..][..m];
                row.iter().enumerate().filter(|&(j, _)| j != i).fold(f32::NEG_INFINITY, |a, (_, &s)| a.max(s))
            })
            .collect();
        let mut selected = vec![false; m];
        for (step, out) in kept.iter_mut().enumerate() {
            let mut pick = usize::MAX;
            for i in (0..m).filter(|&i| !selected[i]) {
                if pick == usize::MAX || closest[i] < closest[pick] {
                    pick = i;
                }
            }
            selected[pick] = true;
            *out = (pick + first) as u32;
            if step == 0 {
                closest.fill(f32::NEG_INFINITY);
            }
            for (cl, &s) in closest.iter_mut().zip(&sim[pick * m..][..m]) {
                *cl = cl.max(s);
            }
        }
    });
    give_pool(packed);
    Ok(kept)
}

/// A batch's `[cls,] kept…, fused` rows.
struct FusedRows<'a, T> {
    sel: &'a Selection,
    b: usize,
    x: &'a [T],
    score: &'a [f32],
    c: usize,
    out: &'a mut [T],
}

impl<T: Float> Op for FusedRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn run<K: Kernel>(self, k: K) {
        let (c, n, b) = (self.c, self.sel.tokens(), self.b);
        let first = self.sel.class_token() as usize;
        let mut pruned = vec![true; n];
        pruned[..first].iter_mut().for_each(|p| *p = false);
        let mut rows = self.out.chunks_exact_mut(c);
        if first == 1 {
            rows.next().expect("class row").copy_from_slice(&self.x[b * n * c..][..c]);
        }
        for (&t, y) in self.sel.kept(b).iter().zip(rows.by_ref()) {
            y.copy_from_slice(&self.x[(b * n + t as usize) * c..][..c]);
            pruned[t as usize] = false;
        }
        let mut acc = vec![0.0f32; c];
        for t in (0..n).filter(|&t| pruned[t]) {
            k.fma(&self.x[(b * n + t) * c..][..c], self.score[b * n + t], &mut acc);
        }
        k.narrow(&acc, None, rows.next().expect("fused row"));
    }
}

/// `[cls,] kept…, Σ sᵢxᵢ` per batch, in parallel over batches.
pub(crate) fn gather_fused<T: Float>(sel: &Selection, isa: Isa, x: &[T], score: &[f32], c: usize, out: &mut [T]) {
    if c == 0 {
        return;
    }
    let o = sel.out_tokens(true);
    for_each_chunk(out, o * c, |b, out| {
        dispatch(isa, FusedRows { sel, b, x, score, c, out });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64 → uniform in [−1, 1).
    fn uniform(i: u64) -> f32 {
        let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// bf16 rounding: the AVX-512 kernel's bits equal the portable ones and the per-row error
    /// bound of the packing covers the true error (f64), on rows with ties to even, tiny and
    /// subnormal values, and lengths that are not multiples of 16.
    #[test]
    fn bf16_rounding_and_its_error_bound() {
        let Some(simd) = V4::try_new() else {
            println!("skipped: no AVX-512 on this CPU");
            return;
        };
        for (n, seed) in [(1usize, 1u64), (15, 2), (16, 3), (17, 4), (100, 5), (768, 6)] {
            let u: Vec<f32> = (0..n)
                .map(|i| match i % 5 {
                    0 => f32::from_bits((uniform(i as u64 ^ seed).to_bits() & 0xffff_0000) | 0x8000), // a tie
                    1 => uniform(i as u64 ^ seed) * 1e-40,                                            // subnormal
                    2 => uniform(i as u64 ^ seed) * 1e-30,
                    _ => uniform(i as u64 ^ seed),
                })
                .collect();
            let (mut hp, mut ha) = (vec![0u16; n], vec![0u16; n]);
            let lp = Portable.round_bf16(&u, &mut hp);
            let la = Avx512(simd).round_bf16(&u, &mut ha);
            assert_eq!(hp, ha, "n={n}");
            assert_eq!(lp, la, "n={n}: lane sums");
            // The packing's bound, as write_pair_panels computes it.
            let mut words = vec![0u32; GROUP * n.div_ceil(2)];
            let mut errs = [0.0f32; 1];
            let mut out = vec![0u32; 8 * n.div_ceil(2)];
            write_pair_panels(Portable, &u, n, 0, 8, &mut words, &mut errs, &mut out);
            let truth = u
                .iter()
                .zip(&hp)
                .map(|(&x, &h)| (f32::from_bits((h as u32) << 16) as f64 - x as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(errs[0] as f64 >= truth, "n={n}: bound {} < error {truth}", errs[0]);
            assert!(errs[0] as f64 <= truth * 1.01 + 1e-30, "n={n}: bound {} far above {truth}", errs[0]);
        }
    }

    /// The screened plan equals the f32 tiles' plan, bit for bit: on random tokens (the
    /// candidate path), on near-duplicate tokens (the fallback path: most estimates tie) and
    /// on data with both, for every flag combination and awkward sizes.
    #[test]
    fn screening_is_exact() {
        if !screen::available(Isa::V4, 1) {
            println!("skipped: this CPU has no AVX512-BF16, there is no screening to test");
            return;
        }
        let mut seed = 0u64;
        for &(b, n, c) in &[(1, 3, 1), (2, 9, 3), (1, 97, 33), (3, 130, 64), (1, 200, 7), (2, 301, 100), (1, 520, 16)] {
            for kind in 0..6 {
                seed += 1;
                let x: Vec<f32> = (0..b * n * c)
                    .map(|i| {
                        let (t, k) = (i / c, i % c);
                        let base = uniform((k as u64) << 20 ^ seed);
                        let noise = uniform(i as u64 ^ seed << 32);
                        match kind {
                            0 => noise,
                            // Near-duplicates: one direction plus tiny noise.
                            1 => base + 1e-4 * noise,
                            // Half duplicates, half random.
                            2 if t % 2 == 0 => base,
                            2 => noise,
                            // Midway between bf16 values: the largest rounding errors.
                            3 => f32::from_bits((noise.to_bits() & 0xffff_0000) | 0x8000),
                            // Differences at the scale of the bf16 rounding.
                            4 => base + 3e-3 * noise,
                            // Exactly bf16: no rounding error at all.
                            _ => f32::from_bits(noise.to_bits() & 0xffff_0000),
                        }
                    })
                    .collect();
                for flags in 0..8u8 {
                    let cfg = MatchConfig::new(n / 3)
                        .class_token(flags & 1 != 0)
                        .distill_token(flags & 2 != 0)
                        .keep_original_order(flags & 4 != 0);
                    let r = cfg.effective_r(n);
                    let want = bipartite_with(Isa::V4, false, &x, b, n, c, &cfg, r).unwrap();
                    let got = bipartite_with(Isa::V4, true, &x, b, n, c, &cfg, r).unwrap();
                    let ctx = format!("b={b} n={n} c={c} kind={kind} {cfg:?}");
                    assert_eq!(got.kept, want.kept, "{ctx}");
                    assert_eq!(got.merged, want.merged, "{ctx}");
                    assert_eq!(got.dest, want.dest, "{ctx}");
                }
            }
        }
    }
}
