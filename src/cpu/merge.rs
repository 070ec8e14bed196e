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
use crate::cpu::Isa;
use crate::dtype::{DType, Float};
use crate::error::Result;
use crate::merge::{non_finite, MatchConfig, MergeMode, MergePlan, Parts, Selection};
use core::arch::x86_64::__m512;
use pulp::x86::{V3, V4};
use pulp::{f32x16, Simd, WithSimd};
use std::sync::atomic::{AtomicUsize, Ordering};

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
                bytes.copy_from_slice(bytemuck::bytes_of(&pulp::cast::<_, [u16; LANES]>(f._mm512_cvtepi32_epi16(bits))));
            }
            DType::U8 => unreachable!("Float excludes u8"),
        }
    }

    /// `dst[i] = T(op(acc[i], src[i]))` over whole vectors and a padded tail, for the row ops.
    #[inline(always)]
    fn rows(self, n: usize, mut op: impl FnMut(usize, usize)) {
        let full = n / LANES * LANES;
        let mut i = 0;
        while i < full {
            op(i, LANES);
            i += LANES;
        }
        if full < n {
            op(full, n - full);
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
        acc[i..i + len].copy_from_slice(&a[..len]);
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
    fn normalize<M: Float>(self, x: &[M], u: &mut [f32]) -> bool {
        use core::arch::x86_64::_CMP_NLE_UQ;
        let f = self.0.avx512f;
        let c = x.len();
        let big = f._mm512_set1_ps(f32::MAX);
        let mut mx = f._mm512_setzero_ps();
        let mut bad = 0u16;
        self.rows(c, |i, len| {
            let a = pulp::cast(self.0.abs_f32x16(pulp::cast(self.src_load(x, i, len))));
            bad |= f._mm512_cmp_ps_mask::<_CMP_NLE_UQ>(a, big);
            mx = f._mm512_max_ps(mx, a);
        });
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
        self.rows(c, |i, len| {
            let y = f._mm512_mul_ps(self.src_load(x, i, len), p);
            lanes = f._mm512_fmadd_ps(y, y, lanes);
            self.acc_store(y, u, i, len);
        });
        let inv = f._mm512_set1_ps(1.0 / reduce_lanes(pulp::cast(lanes)).sqrt());
        self.rows(c, |i, len| {
            let y = f._mm512_mul_ps(self.acc_load(u, i, len), inv);
            self.acc_store(y, u, i, len);
        });
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
        self.rows(acc.len(), |i, len| self.acc_store(self.src_load(src, i, len), acc, i, len));
    }

    #[inline(always)]
    fn add<T: Float>(self, src: &[T], acc: &mut [f32]) {
        let f = self.0.avx512f;
        self.rows(acc.len(), |i, len| {
            let v = f._mm512_add_ps(self.acc_load(acc, i, len), self.src_load(src, i, len));
            self.acc_store(v, acc, i, len);
        });
    }

    #[inline(always)]
    fn fma<T: Float>(self, src: &[T], w: f32, acc: &mut [f32]) {
        let f = self.0.avx512f;
        let wv = f._mm512_set1_ps(w);
        self.rows(acc.len(), |i, len| {
            let v = f._mm512_fmadd_ps(self.src_load(src, i, len), wv, self.acc_load(acc, i, len));
            self.acc_store(v, acc, i, len);
        });
    }

    #[inline(always)]
    fn narrow<T: Float>(self, acc: &[f32], d: Option<f32>, dst: &mut [T]) {
        let f = self.0.avx512f;
        let dv = f._mm512_set1_ps(d.unwrap_or(1.0));
        self.rows(acc.len(), |i, len| {
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
        });
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

/// Packed, normalised rows of one batch: panels of `rows_per_panel` rows, k-major.
struct PackRows<'a, M> {
    /// The batch's metric `[n, c]`.
    x: &'a [M],
    c: usize,
    /// Tokens `first, first + step, …` (`< n`) go to consecutive packed rows.
    first: usize,
    step: usize,
    /// Packed output, `ceil(rows / per_panel) · per_panel · c`.
    out: &'a mut [f32],
    per_panel: usize,
}

impl<M: Float> Op for PackRows<'_, M> {
    /// The first token (batch-relative) holding a non-finite value.
    type Output = Option<usize>;

    #[inline(always)]
    fn run<K: Kernel>(self, k: K) -> Option<usize> {
        let (c, pp) = (self.c, self.per_panel);
        let mut u = vec![0.0f32; c];
        let n = self.x.len() / c.max(1);
        for (row, t) in (self.first..n).step_by(self.step).enumerate() {
            if !k.normalize(&self.x[t * c..][..c], &mut u) {
                return Some(t);
            }
            let panel = &mut self.out[row / pp * pp * c..][..pp * c];
            let lane = row % pp;
            for (kk, &v) in u.iter().enumerate() {
                panel[kk * pp + lane] = v;
            }
        }
        None
    }
}

/// Rows (and the zero padding) of the packed A and B sides of one batch.
#[derive(Clone, Copy)]
struct Packing {
    c: usize,
    mr: usize,
    nr: usize,
    /// Packed A / B rows, padded to whole panels.
    na_pad: usize,
    nb_pad: usize,
}

impl Packing {
    fn new(isa: Isa, na: usize, nb: usize, c: usize) -> Packing {
        let (mr, nr) = tile_dims(isa);
        Packing { c, mr, nr, na_pad: na.div_ceil(mr) * mr, nb_pad: nb.div_ceil(nr) * nr }
    }

    fn a_len(&self) -> usize {
        self.na_pad * self.c
    }

    fn batch_len(&self) -> usize {
        (self.na_pad + self.nb_pad) * self.c
    }
}

/// Normalises and packs every batch (A: tokens `a_first, a_first + a_step, …`; B likewise) into
/// `packed` (`[B, batch_len]`); returns the flat index of the first non-finite element.
#[allow(clippy::too_many_arguments)]
fn pack<M: Float>(
    isa: Isa,
    metric: &[M],
    n: usize,
    p: Packing,
    a_side: (usize, usize),
    b_side: (usize, usize),
    packed: &mut [f32],
) -> Option<usize> {
    let c = p.c;
    let first = AtomicUsize::new(usize::MAX);
    for_each_chunk(packed, p.batch_len(), |bi, buf| {
        let x = &metric[bi * n * c..][..n * c];
        let (a, b) = buf.split_at_mut(p.a_len());
        let bad_a = dispatch(isa, PackRows { x, c, first: a_side.0, step: a_side.1, out: a, per_panel: p.mr });
        let bad_b = dispatch(isa, PackRows { x, c, first: b_side.0, step: b_side.1, out: b, per_panel: p.nr });
        // The lowest bad token of the batch, then its first bad element.
        if let Some(t) = [bad_a, bad_b].into_iter().flatten().min() {
            let row = &x[t * c..][..c];
            let k = row.iter().position(|v| !v.to_f32().is_finite()).unwrap_or(0);
            record(&first, Some((bi * n + t) * c + k));
        }
    });
    // A bad token that neither side packed cannot exist: every token is on one side.
    lowest(first)
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

/// The best B (score, index) of `best.len()` consecutive A rows starting at A panel `panel0`.
struct ScoreBlock<'a> {
    a: &'a [f32],
    b: &'a [f32],
    p: Packing,
    nb: usize,
    panel0: usize,
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
        let (c, mr, nr) = (self.p.c, K::MR, K::NR);
        let mut tile = [0.0f32; MAX_TILE];
        let tile = &mut tile[..mr * nr];
        for (q, bp) in self.b.chunks_exact(nr * c).enumerate() {
            let j0 = q * nr;
            let j_lo = if self.skip_col0 && q == 0 { 1 } else { 0 };
            let j_hi = (self.nb - j0).min(nr);
            if j_lo >= j_hi {
                continue;
            }
            for (pi, best) in self.best.chunks_mut(mr).enumerate() {
                let ap = &self.a[(self.panel0 + pi) * mr * c..][..mr * c];
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

/// ToMe's bipartite soft matching; `r` is already clamped.
pub(crate) fn bipartite<M: Float>(
    isa: Isa,
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
    let p = Packing::new(isa, na, nb, c);
    let mut packed = vec![0.0f32; batch * p.batch_len()];
    if let Some(i) = pack(isa, metric, n, p, (0, 2), (1, 2), &mut packed) {
        return Err(non_finite("metric", i, n, c));
    }

    // Scoring tasks: blocks of ROW_BLOCK A micro-panels.
    let block = ROW_BLOCK * p.mr;
    let blocks = na.div_ceil(block);
    let mut best = vec![(f32::NEG_INFINITY, 0u32); batch * blocks * block];
    let packed = &packed;
    for_each_chunk(&mut best, block, |ci, best| {
        let (bi, blk) = (ci / blocks, ci % blocks);
        let rows = (na - blk * block).min(block);
        let buf = &packed[bi * p.batch_len()..][..p.batch_len()];
        let (a, b) = buf.split_at(p.a_len());
        // A's token 0 (a class token) scores −∞ everywhere: its row keeps (−∞, 0).
        let skip_row0 = cfg.class_token && blk == 0;
        let best = &mut best[..rows];
        dispatch(isa, ScoreBlock { a, b, p, nb, panel0: blk * ROW_BLOCK, skip_col0: cfg.distill_token, skip_row0, best });
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
            *w = members[b * n..][off[0] as usize..off[1] as usize].iter().fold(0.0f32, |w, &t| w + sz[b * n + t as usize]);
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
    p: Packing,
    m: usize,
    out: &'a mut [f32],
}

impl Op for SimMatrix<'_> {
    type Output = ();

    #[inline(always)]
    fn run<K: Kernel>(self, k: K) {
        let (c, mr, nr, m) = (self.p.c, K::MR, K::NR, self.m);
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
    let p = Packing::new(isa, m, m, c);
    let mut packed = vec![0.0f32; batch * p.batch_len()];
    if let Some(i) = pack(isa, metric, n, p, (first, 1), (first, 1), &mut packed) {
        return Err(non_finite("metric", i, n, c));
    }
    let mut kept = vec![0u32; batch * k];
    if k == 0 {
        return Ok(kept);
    }
    let packed = &packed;
    for_each_chunk(&mut kept, k, |bi, kept| {
        let buf = &packed[bi * p.batch_len()..][..p.batch_len()];
        let (a, b) = buf.split_at(p.a_len());
        let mut sim = vec![0.0f32; m * m];
        dispatch(isa, SimMatrix { a, b, p, m, out: &mut sim });
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
