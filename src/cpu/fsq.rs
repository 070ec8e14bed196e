//! CPU FSQ: threads take chunks of whole tokens (~64 KiB of `z`); each chunk runs with the
//! kernel of the ISA.
//!
//! - portable: token by token through [`FsqDim::level`] (under `Isa::V3` compiled with
//!   AVX2 + FMA enabled).
//! - AVX-512 (pulp `V4`): blocks of 16 tokens. A block's `16·D` inputs are widened to f32 in one
//!   pass (which also spots NaN), then 16 elements at a time take the same operations as
//!   [`FsqDim::level`] with per-element constants (the `D` constants repeated 16 times, so
//!   every vector lines up with them) and produce `level·basis`; each token's id is then the
//!   sum of its `D` terms. A tail block is zero-padded.
//!
//! Every path performs the same correctly rounded f32 operations in the same order, so ids are
//! bit-identical across ISAs and thread counts.

use crate::cpu::par::{for_each_chunk, units_per_chunk};
use crate::cpu::Isa;
use crate::dtype::Float;
use crate::error::Result;
use crate::fsq::{id_error, nan_error, tanh_coef, Fsq, FsqDim};
use core::arch::x86_64::{__m512, __m512i, _MM_FROUND_NO_EXC, _MM_FROUND_TO_NEAREST_INT};
use pulp::x86::{V3, V4};
use pulp::{Simd, WithSimd};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Tokens per SIMD block: one 16-lane vector per dimension.
const BLOCK: usize = 16;

/// `z` `[N, D]` → ids `[N]`.
pub(crate) fn encode<T: Float>(plan: &Fsq, isa: Isa, z: &[T], ids: &mut [u32]) -> Result<()> {
    let d = plan.dim();
    let rep = Repeated::new(plan.dims());
    // Whole blocks per chunk, so chunk boundaries never split a SIMD block.
    let per_chunk = units_per_chunk(d * size_of::<T>()).div_ceil(BLOCK) * BLOCK;
    let first_nan = AtomicUsize::new(usize::MAX);
    for_each_chunk(ids, per_chunk, |c, out| {
        let start = c * per_chunk;
        let zc = &z[start * d..(start + out.len()) * d];
        let op = EncodeChunk { dims: plan.dims(), rep: &rep, z: zc, out };
        if let Some(i) = run(isa, op) {
            first_nan.fetch_min(start * d + i, Ordering::Relaxed);
        }
    });
    match first_nan.into_inner() {
        usize::MAX => Ok(()),
        i => Err(nan_error(i, d)),
    }
}

/// ids `[N]` → codes `[N, D]`. Integer work plus one division per element: plain code, the
/// same at every ISA.
pub(crate) fn decode<O: Float>(plan: &Fsq, _isa: Isa, ids: &[u32], codes: &mut [O]) -> Result<()> {
    let d = plan.dim();
    let size = plan.codebook_size();
    if let Some(i) = ids.iter().position(|&id| id as u64 >= size) {
        return Err(id_error(i, ids[i], size));
    }
    let per_chunk = units_per_chunk(d * size_of::<O>());
    for_each_chunk(codes, per_chunk * d, |c, out| {
        for (row, &id) in out.chunks_exact_mut(d).zip(&ids[c * per_chunk..]) {
            for (o, k) in row.iter_mut().zip(plan.dims()) {
                let level = ((id / k.basis) % k.levels) as f32;
                *o = O::from_f32((level - k.half_width) / k.half_width);
            }
        }
    });
    Ok(())
}

/// The per-dimension constants repeated [`BLOCK`] times, one array per constant.
struct Repeated {
    shift: Vec<f32>,
    half_l: Vec<f32>,
    neg_offset: Vec<f32>,
    half_width: Vec<f32>,
    max_level: Vec<f32>,
    basis: Vec<u32>,
}

impl Repeated {
    fn new(dims: &[FsqDim]) -> Self {
        let n = BLOCK * dims.len();
        let rep = |f: fn(&FsqDim) -> f32| -> Vec<f32> { dims.iter().map(f).cycle().take(n).collect() };
        Repeated {
            shift: rep(|k| k.shift),
            half_l: rep(|k| k.half_l),
            neg_offset: rep(|k| -k.offset),
            half_width: rep(|k| k.half_width),
            max_level: rep(|k| k.max_level),
            basis: dims.iter().map(|k| k.basis).cycle().take(n).collect(),
        }
    }
}

/// One chunk of tokens.
struct EncodeChunk<'a, T> {
    dims: &'a [FsqDim],
    rep: &'a Repeated,
    z: &'a [T],
    out: &'a mut [u32],
}

/// Runs `op` with the kernel of `isa`, inside a function compiled for its target features;
/// returns the flat index (within the chunk) of the chunk's first NaN, if any.
#[inline(always)]
fn run<T: Float>(isa: Isa, op: EncodeChunk<'_, T>) -> Option<usize> {
    match isa {
        Isa::V4 => match V4::try_new() {
            Some(simd) => Simd::vectorize(simd, WithV4(op, simd)),
            None => op.portable(),
        },
        Isa::V3 => match V3::try_new() {
            Some(simd) => Simd::vectorize(simd, WithPortable(op)),
            None => op.portable(),
        },
        Isa::Scalar => op.portable(),
    }
}

struct WithPortable<'a, T>(EncodeChunk<'a, T>);

impl<T: Float> WithSimd for WithPortable<'_, T> {
    type Output = Option<usize>;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> Self::Output {
        self.0.portable()
    }
}

struct WithV4<'a, T>(EncodeChunk<'a, T>, V4);

impl<T: Float> WithSimd for WithV4<'_, T> {
    type Output = Option<usize>;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> Self::Output {
        self.0.avx512(self.1)
    }
}

impl<T: Float> EncodeChunk<'_, T> {
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

    /// Blocks of 16 tokens, 16 elements per vector.
    #[inline(always)]
    fn avx512(self, simd: V4) -> Option<usize> {
        let d = self.dims.len();
        let mut x = vec![0.0f32; BLOCK * d];
        let mut terms = vec![0u32; BLOCK * d];
        for (b, out) in self.out.chunks_mut(BLOCK).enumerate() {
            let src = &self.z[b * BLOCK * d..][..out.len() * d];
            let mut nan = false;
            for (xi, s) in x.iter_mut().zip(src) {
                *xi = s.to_f32();
                nan |= xi.is_nan();
            }
            if nan {
                return Some(b * BLOCK * d + x.iter().position(|v| v.is_nan()).unwrap_or(0));
            }
            // A short tail block: zeros past the end (their terms are ignored).
            x[src.len()..].fill(0.0);
            for i in (0..BLOCK * d).step_by(BLOCK) {
                let t = levels16(simd, self.rep, &x, i);
                terms[i..i + BLOCK].copy_from_slice(&pulp::cast::<__m512i, [u32; BLOCK]>(t));
            }
            for (id, t) in out.iter_mut().zip(terms.chunks_exact(d)) {
                *id = t.iter().fold(0u32, |acc, &v| acc.wrapping_add(v));
            }
        }
        None
    }
}

#[inline(always)]
fn vf(s: &[f32], i: usize) -> __m512 {
    let a: [f32; BLOCK] = s[i..i + BLOCK].try_into().expect("16 lanes");
    pulp::cast(a)
}

/// `level·basis` for the 16 elements `x[i..i + 16]`: [`FsqDim::level`]'s operations, lane-wise.
#[inline(always)]
fn levels16(simd: V4, r: &Repeated, x: &[f32], i: usize) -> __m512i {
    use tanh_coef::*;
    let f = simd.avx512f;
    let s1 = |v: f32| f._mm512_set1_ps(v);
    let t = f._mm512_add_ps(vf(x, i), vf(&r.shift, i));
    let c = f._mm512_min_ps(f._mm512_max_ps(t, s1(-CLAMP)), s1(CLAMP));
    let s = f._mm512_mul_ps(c, c);
    let mut p = f._mm512_fmadd_ps(s, s1(A13), s1(A11));
    for a in [A9, A7, A5, A3, A1] {
        p = f._mm512_fmadd_ps(s, p, s1(a));
    }
    p = f._mm512_mul_ps(p, c);
    let mut q = f._mm512_fmadd_ps(s, s1(B6), s1(B4));
    q = f._mm512_fmadd_ps(s, q, s1(B2));
    q = f._mm512_fmadd_ps(s, q, s1(B0));
    let y = f._mm512_div_ps(p, q);
    let v = f._mm512_fmadd_ps(y, vf(&r.half_l, i), vf(&r.neg_offset, i));
    let rounded = f._mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
    let level = f._mm512_add_ps(rounded, vf(&r.half_width, i));
    let level = f._mm512_min_ps(f._mm512_max_ps(level, f._mm512_setzero_ps()), vf(&r.max_level, i));
    let basis: [u32; BLOCK] = r.basis[i..i + BLOCK].try_into().expect("16 lanes");
    f._mm512_mullo_epi32(f._mm512_cvttps_epi32(level), pulp::cast(basis))
}
