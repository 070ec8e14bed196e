//! Element-run micro-kernels shared by the CPU kernel families, and the ISA dispatch.
//!
//! A run kernel converts a run of elements to f32, applies one fma, and rounds to the output
//! type, with exactly the arithmetic of the reference (`fma` with one rounding, then the
//! conversions of [`crate::dtype`]), so results are bit-identical at every ISA level.
//!
//! - [`Portable`]: plain loops. Under [`dispatch`] with `Isa::V3` they are compiled with AVX2 +
//!   FMA enabled, and the compiler vectorises them.
//! - [`Avx512`]: pulp `V4` intrinsics, 16 lanes at a time; a tail shorter than 16 goes through a
//!   zero-padded stack block so it too runs vectorised.
//!
//! [`run_isa`] is the one place that turns an [`Isa`] into code compiled for its target
//! features: every family's kernels go through it (patchify through [`dispatch`], which picks a
//! [`RunKernel`]; LFQ and FSQ with their own per-ISA kernels).

use crate::cpu::Isa;
use crate::dtype::{DType, Element};
use pulp::x86::{V3, V4};
use pulp::{f32x16, Simd, WithSimd};

/// A run micro-kernel: `dst[i] = O::from_f32(fma(src[i].to_f32(), a, b))`.
pub(crate) trait RunKernel: Copy {
    /// Whether [`copy_streaming`](Self::copy_streaming) really bypasses the cache (otherwise
    /// callers should write their output directly).
    const STREAMS: bool;
    /// One `(a, b)` pair for the whole run. `src.len() == dst.len()`.
    fn affine<I: Element, O: Element>(self, src: &[I], a: f32, b: f32, dst: &mut [O]);
    /// Per-element `(a[i], b[i])`. All four slices have the same length.
    fn affine_vec<I: Element, O: Element>(self, src: &[I], a: &[f32], b: &[f32], dst: &mut [O]);
    /// `n` runs of `run` elements: run `r` reads `src[r·run..][..run]` and writes
    /// `dst[r·stride..][..run]` — one image row segment scattered to `n` consecutive tokens.
    #[inline(always)]
    fn affine_runs<I: Element, O: Element>(self, src: &[I], run: usize, a: f32, b: f32, dst: &mut [O], stride: usize) {
        for (r, s) in src.chunks_exact(run).enumerate() {
            self.affine(s, a, b, &mut dst[r * stride..][..run]);
        }
    }
    /// [`affine_runs`](Self::affine_runs) with per-element coefficients `a[..run]`, `b[..run]`.
    #[inline(always)]
    fn affine_vec_runs<I: Element, O: Element>(self, src: &[I], a: &[f32], b: &[f32], dst: &mut [O], stride: usize) {
        let run = a.len();
        for (r, s) in src.chunks_exact(run).enumerate() {
            self.affine_vec(s, a, b, &mut dst[r * stride..][..run]);
        }
    }
    /// `dst.copy_from_slice(src)`, with non-temporal (cache-bypassing) stores where the kernel
    /// has them: for outputs much larger than the caches, this saves the read-for-ownership of
    /// every destination line. Call [`fence`](Self::fence) before the chunk ends.
    fn copy_streaming<T: bytemuck::Pod>(self, src: &[T], dst: &mut [T]);
    /// Orders earlier streaming stores before anything that follows.
    fn fence(self);
}

/// Work to run with whichever [`RunKernel`] the ISA selects.
pub(crate) trait KernelOp {
    type Output;
    fn run<K: RunKernel>(self, k: K) -> Self::Output;
}

/// Work with one implementation per instruction-set level. [`run_isa`] calls the method of the
/// level asked for inside a function compiled with that level's target features.
pub(crate) trait IsaOp: Sized {
    type Output;
    /// Portable code: compiled with AVX2 + FMA enabled under `Isa::V3` (unless [`v3`](Self::v3)
    /// is overridden) and with no SIMD target features under `Isa::Scalar`.
    fn portable(self) -> Self::Output;
    /// AVX2 + FMA (pulp `V3`). Defaults to the portable code.
    #[inline(always)]
    fn v3(self, _simd: V3) -> Self::Output {
        self.portable()
    }
    /// AVX-512 (pulp `V4`).
    fn v4(self, simd: V4) -> Self::Output;
}

struct WithV3<Op>(Op, V3);

impl<Op: IsaOp> WithSimd for WithV3<Op> {
    type Output = Op::Output;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> Self::Output {
        self.0.v3(self.1)
    }
}

struct WithV4<Op>(Op, V4);

impl<Op: IsaOp> WithSimd for WithV4<Op> {
    type Output = Op::Output;
    #[inline(always)]
    fn with_simd<S: Simd>(self, _simd: S) -> Self::Output {
        self.0.v4(self.1)
    }
}

/// Runs `op`'s implementation for `isa` inside a function compiled for that ISA's target
/// features. `isa` must be available (callers check with [`Isa::check`] / [`Isa::detect`]); if
/// it is not, the portable code runs without target features.
#[inline(always)]
pub(crate) fn run_isa<Op: IsaOp>(isa: Isa, op: Op) -> Op::Output {
    match isa {
        Isa::V4 => match V4::try_new() {
            Some(simd) => Simd::vectorize(simd, WithV4(op, simd)),
            None => op.portable(),
        },
        Isa::V3 => match V3::try_new() {
            Some(simd) => Simd::vectorize(simd, WithV3(op, simd)),
            None => op.portable(),
        },
        Isa::Scalar => op.portable(),
    }
}

/// A [`KernelOp`] as an [`IsaOp`]: [`Avx512`] under V4, [`Portable`] otherwise.
struct WithKernel<Op>(Op);

impl<Op: KernelOp> IsaOp for WithKernel<Op> {
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

/// Runs `op` with the kernel of `isa`, inside a function compiled for that ISA's target
/// features. `isa` must be available (callers check with [`Isa::check`] / [`Isa::detect`]);
/// if it is not, the portable scalar kernel runs.
#[inline(always)]
pub(crate) fn dispatch<Op: KernelOp>(isa: Isa, op: Op) -> Op::Output {
    run_isa(isa, WithKernel(op))
}

/// Plain loops.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl RunKernel for Portable {
    const STREAMS: bool = false;
    #[inline(always)]
    fn copy_streaming<T: bytemuck::Pod>(self, src: &[T], dst: &mut [T]) {
        dst.copy_from_slice(src);
    }

    #[inline(always)]
    fn fence(self) {}

    #[inline(always)]
    fn affine<I: Element, O: Element>(self, src: &[I], a: f32, b: f32, dst: &mut [O]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = O::from_f32(s.to_f32().mul_add(a, b));
        }
    }

    #[inline(always)]
    fn affine_vec<I: Element, O: Element>(self, src: &[I], a: &[f32], b: &[f32], dst: &mut [O]) {
        for (((d, s), a), b) in dst.iter_mut().zip(src).zip(a).zip(b) {
            *d = O::from_f32(s.to_f32().mul_add(*a, *b));
        }
    }
}

/// AVX-512 through pulp's `V4` token.
#[derive(Clone, Copy)]
pub(crate) struct Avx512(pub(crate) V4);

const LANES: usize = 16;

/// Reads a `T` from the first `size_of::<T>()` bytes of `bytes`.
///
/// (bytemuck's `pod_read_unaligned` compiles to a byte-by-byte copy here.)
#[inline(always)]
fn read<T: bytemuck::Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: the assert above keeps the read inside `bytes`; `T: Pod` accepts any bit
    // pattern; `read_unaligned` has no alignment requirement.
    unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

impl Avx512 {
    /// Loads 16 elements (`src.len() == 16`) widened to f32 (exactly).
    #[inline(always)]
    pub(crate) fn load<I: Element>(self, src: &[I]) -> f32x16 {
        let s = self.0;
        let bytes: &[u8] = bytemuck::cast_slice(src);
        match I::DTYPE {
            DType::U8 => {
                let v: pulp::u8x16 = read(bytes);
                s.convert_i32x16_to_f32x16(s.convert_u8x16_to_i32x16(v))
            }
            DType::F32 => read(bytes),
            DType::F16 => {
                let v: pulp::u16x16 = read(bytes);
                pulp::cast(s.avx512f._mm512_cvtph_ps(pulp::cast(v)))
            }
            DType::BF16 => {
                let v: pulp::u16x16 = read(bytes);
                pulp::cast(s.shl_const_u32x16::<16>(s.convert_u16x16_to_u32x16(v)))
            }
        }
    }

    /// Rounds 16 f32 lanes to `O` and stores them (`dst.len() == 16`).
    #[inline(always)]
    fn store<O: Element>(self, v: f32x16, dst: &mut [O]) {
        let s = self.0;
        let f = s.avx512f;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(dst);
        match O::DTYPE {
            DType::U8 => {
                // Clamp first (max_ps returns the second operand for NaN, so NaN → 0), then
                // round to nearest even; the result is in [0, 255] and narrows exactly.
                let c = f._mm512_min_ps(f._mm512_max_ps(pulp::cast(v), f._mm512_setzero_ps()), f._mm512_set1_ps(255.0));
                let i = f._mm512_cvt_roundps_epi32::<{ core::arch::x86_64::_MM_FROUND_TO_NEAREST_INT | core::arch::x86_64::_MM_FROUND_NO_EXC }>(c);
                let out: [u8; LANES] = pulp::cast(f._mm512_cvtepi32_epi8(i));
                bytes.copy_from_slice(&out);
            }
            DType::F32 => bytes.copy_from_slice(bytemuck::bytes_of(&v)),
            DType::F16 => {
                let h = f._mm512_cvtps_ph::<{ core::arch::x86_64::_MM_FROUND_TO_NEAREST_INT | core::arch::x86_64::_MM_FROUND_NO_EXC }>(pulp::cast(v));
                let out: [u16; LANES] = pulp::cast(h);
                bytes.copy_from_slice(bytemuck::bytes_of(&out));
            }
            DType::BF16 => {
                // Round to nearest even on the bits; NaN keeps its sign and top payload and
                // gets the quiet bit, as `half::bf16::from_f32` does.
                let x: core::arch::x86_64::__m512i = pulp::cast(v);
                let lsb = f._mm512_and_si512(f._mm512_srli_epi32::<16>(x), f._mm512_set1_epi32(1));
                let rounded = f._mm512_add_epi32(f._mm512_add_epi32(x, f._mm512_set1_epi32(0x7fff)), lsb);
                let quiet = f._mm512_or_si512(x, f._mm512_set1_epi32(0x0040_0000));
                let nan = f._mm512_cmp_ps_mask::<{ core::arch::x86_64::_CMP_UNORD_Q }>(pulp::cast(v), pulp::cast(v));
                let bits = f._mm512_srli_epi32::<16>(f._mm512_mask_blend_epi32(nan, rounded, quiet));
                let out: [u16; LANES] = pulp::cast(f._mm512_cvtepi32_epi16(bits));
                bytes.copy_from_slice(bytemuck::bytes_of(&out));
            }
        }
    }

    #[inline(always)]
    fn fma(self, x: f32x16, a: f32x16, b: f32x16) -> f32x16 {
        self.0.mul_add_f32x16(x, a, b)
    }
}

impl RunKernel for Avx512 {
    const STREAMS: bool = true;
    #[inline(always)]
    fn copy_streaming<T: bytemuck::Pod>(self, src: &[T], dst: &mut [T]) {
        const LINE: usize = 64;
        let src: &[u8] = bytemuck::cast_slice(src);
        let dst: &mut [u8] = bytemuck::cast_slice_mut(dst);
        let n = src.len().min(dst.len());
        // Unaligned head and tail go through the cache; whole aligned lines bypass it.
        let head = dst.as_ptr().align_offset(LINE).min(n);
        let body = (n - head) / LINE * LINE;
        dst[..head].copy_from_slice(&src[..head]);
        for (d, s) in dst[head..head + body].chunks_exact_mut(LINE).zip(src[head..head + body].chunks_exact(LINE)) {
            let v: core::arch::x86_64::__m512i = pulp::cast(read::<pulp::u8x64>(s));
            // SAFETY: `d` is a 64-byte chunk of `dst` starting at a 64-byte aligned address
            // (`head` aligned the first one and every chunk is 64 bytes long), so the aligned
            // 64-byte store stays inside `dst`; AVX-512F is enabled (we hold a V4 token).
            unsafe { self.0.avx512f._mm512_stream_si512(d.as_mut_ptr().cast(), v) };
        }
        dst[head + body..n].copy_from_slice(&src[head + body..n]);
    }

    #[inline(always)]
    fn fence(self) {
        // SAFETY: sfence has no preconditions; SSE is enabled (we hold a V4 token).
        unsafe { core::arch::x86_64::_mm_sfence() };
    }

    #[inline(always)]
    fn affine_runs<I: Element, O: Element>(self, src: &[I], run: usize, a: f32, b: f32, dst: &mut [O], stride: usize) {
        if run == LANES {
            // The common 16-wide patch: one vector per run, no loop setup per run.
            let (va, vb) = (self.0.splat_f32x16(a), self.0.splat_f32x16(b));
            for (r, s) in src.chunks_exact(LANES).enumerate() {
                self.store(self.fma(self.load(s), va, vb), &mut dst[r * stride..][..LANES]);
            }
        } else {
            for (r, s) in src.chunks_exact(run).enumerate() {
                self.affine(s, a, b, &mut dst[r * stride..][..run]);
            }
        }
    }

    #[inline(always)]
    fn affine<I: Element, O: Element>(self, src: &[I], a: f32, b: f32, dst: &mut [O]) {
        let (va, vb) = (self.0.splat_f32x16(a), self.0.splat_f32x16(b));
        let n = src.len().min(dst.len());
        let full = n / LANES * LANES;
        for (s, d) in src[..full].chunks_exact(LANES).zip(dst[..full].chunks_exact_mut(LANES)) {
            self.store(self.fma(self.load(s), va, vb), d);
        }
        if full < n {
            let (mut s, mut d) = ([I::from_f32(0.0); LANES], [O::from_f32(0.0); LANES]);
            let tail = n - full;
            s[..tail].copy_from_slice(&src[full..n]);
            self.store(self.fma(self.load(&s), va, vb), &mut d);
            dst[full..n].copy_from_slice(&d[..tail]);
        }
    }

    #[inline(always)]
    fn affine_vec<I: Element, O: Element>(self, src: &[I], a: &[f32], b: &[f32], dst: &mut [O]) {
        let n = src.len().min(dst.len()).min(a.len()).min(b.len());
        let full = n / LANES * LANES;
        let coef = |c: &[f32]| -> f32x16 { read(bytemuck::cast_slice(c)) };
        for i in (0..full).step_by(LANES) {
            let r = i..i + LANES;
            let y = self.fma(self.load(&src[r.clone()]), coef(&a[r.clone()]), coef(&b[r.clone()]));
            self.store(y, &mut dst[r]);
        }
        if full < n {
            let tail = n - full;
            let (mut s, mut d) = ([I::from_f32(0.0); LANES], [O::from_f32(0.0); LANES]);
            let (mut ta, mut tb) = ([0.0f32; LANES], [0.0f32; LANES]);
            s[..tail].copy_from_slice(&src[full..n]);
            ta[..tail].copy_from_slice(&a[full..n]);
            tb[..tail].copy_from_slice(&b[full..n]);
            self.store(self.fma(self.load(&s), coef(&ta), coef(&tb)), &mut d);
            dst[full..n].copy_from_slice(&d[..tail]);
        }
    }
}
