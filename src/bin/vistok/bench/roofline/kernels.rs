//! The roofline's probe kernels: streaming copy / triad and FMA / bf16-dot loops, per
//! instruction-set level. The `unsafe` of the whole harness lives here: AVX2 `#[target_feature]`
//! functions and pulp `V4` (AVX-512) bodies, entered only after the level was detected, doing
//! aligned vector loads / stores on [`Line`]s, whose type guarantees the alignment; and one
//! `asm!` loop for `vdpbf16ps`.
//!
//! Why pulp and `asm!` rather than `std::arch`'s AVX-512 intrinsics: those (and the
//! `avx512bf16` target feature) are stable only since Rust 1.89, and the crate supports 1.85.

use vistok::Isa;

/// 64 bytes, 64-byte aligned: one AVX-512 register, two AVX2 ones, one cache line. Buffers of
/// `Line`s make every vector access aligned by construction.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [f32; 16]);

/// How stores reach memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stores {
    /// Through the cache (a write first reads the line: write-allocate).
    Regular,
    /// Non-temporal (`vmovntps`): bypass the cache, no write-allocate read.
    NonTemporal,
}

impl Stores {
    pub fn name(self) -> &'static str {
        match self {
            Stores::Regular => "regular",
            Stores::NonTemporal => "non-temporal",
        }
    }

    /// Non-temporal stores need a SIMD level (the scalar level writes through the cache).
    pub fn available(self, isa: Isa) -> bool {
        self == Stores::Regular || (cfg!(target_arch = "x86_64") && isa != Isa::Scalar)
    }
}

/// Independent accumulators of the FMA / dot loops: latency 4 × 2 pipes needs ≥ 8 in flight;
/// 12 leaves margin and still fits the 16 (AVX2) / 32 (AVX-512) registers.
pub const ACCUMULATORS: usize = 12;

/// `dst = src`. `isa` must be available (the callers pass [`Isa::detect`]'s answer).
pub fn copy(isa: Isa, stores: Stores, dst: &mut [Line], src: &[Line]) {
    #[cfg(target_arch = "x86_64")]
    match (isa, stores) {
        (Isa::V4, s) => {
            if let Some(simd) = pulp::x86::V4::try_new() {
                return x86::copy_v4(simd, s == Stores::NonTemporal, dst, src);
            }
        }
        // SAFETY: as above.
        (Isa::V3, s) => return unsafe { x86::copy_v3(s == Stores::NonTemporal, dst, src) },
        (Isa::Scalar, _) => {}
    }
    debug_assert!(isa.is_available());
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s;
    }
}

/// `a = b + s·c` (STREAM's triad).
pub fn triad(isa: Isa, stores: Stores, a: &mut [Line], b: &[Line], c: &[Line], s: f32) {
    debug_assert!(isa.is_available());
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::V4 => {
            if let Some(simd) = pulp::x86::V4::try_new() {
                return x86::triad_v4(simd, stores == Stores::NonTemporal, a, b, c, s);
            }
        }
        // SAFETY: as above.
        Isa::V3 => return unsafe { x86::triad_v3(stores == Stores::NonTemporal, a, b, c, s) },
        Isa::Scalar => {}
    }
    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
        for i in 0..16 {
            a.0[i] = b.0[i] + s * c.0[i];
        }
    }
}

/// f32 lanes per FMA instruction at `isa` (1 for the scalar multiply + add).
pub fn fma_lanes(isa: Isa) -> u64 {
    match isa {
        Isa::V4 => 16,
        Isa::V3 => 8,
        Isa::Scalar => 1,
    }
}

/// `iters` rounds of [`ACCUMULATORS`] independent FMAs: `2 · ACCUMULATORS · fma_lanes · iters`
/// flops. Returns a sum of the accumulators so that the work is not dead code.
pub fn fma(isa: Isa, iters: u64) -> f32 {
    debug_assert!(isa.is_available());
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::V4 => {
            if let Some(simd) = pulp::x86::V4::try_new() {
                return x86::fma_v4(simd, iters);
            }
        }
        // SAFETY: as above.
        Isa::V3 => return unsafe { x86::fma_v3(iters) },
        Isa::Scalar => {}
    }
    let mut acc = [1.0f32; ACCUMULATORS];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = std::hint::black_box(*x) * 0.999_999 + 1e-7;
        }
    }
    acc.iter().sum()
}

/// Why the bf16 dot-product probe cannot run here, or `None` if it can.
pub fn bf16_unavailable(isa: Isa) -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx512bf16") {
            return Some("this CPU lacks AVX512-BF16 (vdpbf16ps)".into());
        }
        if isa != Isa::V4 {
            return Some(format!("VISTOK_ISA pins level {} (AVX-512 off)", isa.name()));
        }
        None
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        Some("not an x86-64 CPU".into())
    }
}

/// bf16 pairs per `vdpbf16ps` (each pair: one multiply, one add).
pub const BF16_PAIRS: u64 = 32;

/// `iters` rounds of [`ACCUMULATORS`] independent `vdpbf16ps`: `2 · 32 · ACCUMULATORS · iters`
/// flops; `None` where [`bf16_unavailable`]. (The work stays in registers inside one `asm!`
/// block, which the compiler cannot drop, so there is nothing to return.)
pub fn dot_bf16(isa: Isa, iters: u64) -> Option<f32> {
    if bf16_unavailable(isa).is_some() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: avx512bf16 (and with it avx512f, level V4) was detected just above.
    unsafe {
        x86::dot_bf16(iters)
    };
    #[cfg(target_arch = "x86_64")]
    return Some(0.0);
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Line, ACCUMULATORS};
    use pulp::x86::V4;
    use pulp::{Simd, WithSimd};
    use std::arch::x86_64::*;

    /// `dst = src` with AVX-512 (entered through pulp so the body is compiled for V4).
    struct CopyV4<'a> {
        simd: V4,
        nt: bool,
        dst: &'a mut [Line],
        src: &'a [Line],
    }

    impl WithSimd for CopyV4<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            let f = self.simd.avx512f;
            for (d, s) in self.dst.iter_mut().zip(self.src) {
                // SAFETY: a Line is 64 bytes at a 64-byte aligned address, so one aligned
                // 512-bit load / store covers exactly one Line; AVX-512F is enabled (V4 token).
                unsafe {
                    let v = f._mm512_load_ps(s.0.as_ptr());
                    if self.nt {
                        f._mm512_stream_ps(d.0.as_mut_ptr(), v);
                    } else {
                        // Volatile: otherwise LLVM may turn the loop into a memcpy call, and
                        // glibc's memcpy switches to non-temporal stores on large copies.
                        std::ptr::write_volatile(d.0.as_mut_ptr() as *mut __m512, v);
                    }
                }
            }
            // Non-temporal stores are weakly ordered: fence before anyone reads the result.
            // SAFETY: sfence has no preconditions; SSE is enabled (V4 token).
            unsafe { _mm_sfence() };
        }
    }

    pub fn copy_v4(simd: V4, nt: bool, dst: &mut [Line], src: &[Line]) {
        Simd::vectorize(simd, CopyV4 { simd, nt, dst, src })
    }

    /// `a = b + s·c` with AVX-512.
    struct TriadV4<'a> {
        simd: V4,
        nt: bool,
        a: &'a mut [Line],
        b: &'a [Line],
        c: &'a [Line],
        s: f32,
    }

    impl WithSimd for TriadV4<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) {
            let f = self.simd.avx512f;
            let s = f._mm512_set1_ps(self.s);
            for ((a, b), c) in self.a.iter_mut().zip(self.b).zip(self.c) {
                // SAFETY: aligned full-Line accesses, as in CopyV4.
                unsafe {
                    let v = f._mm512_fmadd_ps(s, f._mm512_load_ps(c.0.as_ptr()), f._mm512_load_ps(b.0.as_ptr()));
                    if self.nt {
                        f._mm512_stream_ps(a.0.as_mut_ptr(), v);
                    } else {
                        f._mm512_store_ps(a.0.as_mut_ptr(), v);
                    }
                }
            }
            // SAFETY: as in CopyV4.
            unsafe { _mm_sfence() };
        }
    }

    pub fn triad_v4(simd: V4, nt: bool, a: &mut [Line], b: &[Line], c: &[Line], s: f32) {
        Simd::vectorize(simd, TriadV4 { simd, nt, a, b, c, s })
    }

    /// Independent 512-bit FMA chains.
    struct FmaV4 {
        simd: V4,
        iters: u64,
    }

    impl WithSimd for FmaV4 {
        type Output = f32;
        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) -> f32 {
            let f = self.simd.avx512f;
            let (a, b) = (f._mm512_set1_ps(0.999_999), f._mm512_set1_ps(1e-7));
            let mut acc = [f._mm512_set1_ps(1.0); ACCUMULATORS];
            for _ in 0..self.iters {
                for x in acc.iter_mut() {
                    *x = f._mm512_fmadd_ps(*x, a, b);
                }
            }
            let sum = acc.iter().fold(f._mm512_setzero_ps(), |s, &x| f._mm512_add_ps(s, x));
            f._mm512_reduce_add_ps(sum)
        }
    }

    pub fn fma_v4(simd: V4, iters: u64) -> f32 {
        Simd::vectorize(simd, FmaV4 { simd, iters })
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn copy_v3(nt: bool, dst: &mut [Line], src: &[Line]) {
        for (d, s) in dst.iter_mut().zip(src) {
            // SAFETY: two aligned 256-bit halves of one 64-byte aligned Line.
            unsafe {
                let (lo, hi) = (_mm256_load_ps(s.0.as_ptr()), _mm256_load_ps(s.0.as_ptr().add(8)));
                let p = d.0.as_mut_ptr();
                if nt {
                    _mm256_stream_ps(p, lo);
                    _mm256_stream_ps(p.add(8), hi);
                } else {
                    std::ptr::write_volatile(p as *mut __m256, lo);
                    std::ptr::write_volatile(p.add(8) as *mut __m256, hi);
                }
            }
        }
        _mm_sfence();
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn triad_v3(nt: bool, a: &mut [Line], b: &[Line], c: &[Line], s: f32) {
        let s = _mm256_set1_ps(s);
        for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
            for h in [0, 8] {
                // SAFETY: aligned 256-bit halves of 64-byte aligned Lines.
                unsafe {
                    let v =
                        _mm256_fmadd_ps(s, _mm256_load_ps(c.0.as_ptr().add(h)), _mm256_load_ps(b.0.as_ptr().add(h)));
                    if nt {
                        _mm256_stream_ps(a.0.as_mut_ptr().add(h), v);
                    } else {
                        _mm256_store_ps(a.0.as_mut_ptr().add(h), v);
                    }
                }
            }
        }
        _mm_sfence();
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_v3(iters: u64) -> f32 {
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); ACCUMULATORS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let sum = acc.iter().fold(_mm256_setzero_ps(), |s, &x| _mm256_add_ps(s, x));
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds 8 f32; storeu has no alignment requirement.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        out.iter().sum()
    }

    /// `iters` rounds of 12 independent `vdpbf16ps zmm` (zmm0–zmm11 accumulate, zmm12 holds
    /// the bf16 pairs), all in registers.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX512-BF16.
    pub unsafe fn dot_bf16(iters: u64) {
        const _: () = assert!(ACCUMULATORS == 12, "the asm below spells out 12 accumulators");
        // SAFETY: the instructions exist on this CPU (caller's contract); the block touches no
        // memory and no stack, and every vector register it writes is declared clobbered
        // (clobber_abi("C") covers all of xmm0–15 with their ymm/zmm upper parts);
        // vzeroupper leaves the upper halves clean for SSE code after it.
        unsafe {
            std::arch::asm!(
                "vpbroadcastd zmm12, eax",
                "vpxord zmm0, zmm0, zmm0",
                "vmovaps zmm1, zmm0", "vmovaps zmm2, zmm0", "vmovaps zmm3, zmm0", "vmovaps zmm4, zmm0",
                "vmovaps zmm5, zmm0", "vmovaps zmm6, zmm0", "vmovaps zmm7, zmm0", "vmovaps zmm8, zmm0",
                "vmovaps zmm9, zmm0", "vmovaps zmm10, zmm0", "vmovaps zmm11, zmm0",
                "2:",
                "vdpbf16ps zmm0, zmm12, zmm12", "vdpbf16ps zmm1, zmm12, zmm12", "vdpbf16ps zmm2, zmm12, zmm12",
                "vdpbf16ps zmm3, zmm12, zmm12", "vdpbf16ps zmm4, zmm12, zmm12", "vdpbf16ps zmm5, zmm12, zmm12",
                "vdpbf16ps zmm6, zmm12, zmm12", "vdpbf16ps zmm7, zmm12, zmm12", "vdpbf16ps zmm8, zmm12, zmm12",
                "vdpbf16ps zmm9, zmm12, zmm12", "vdpbf16ps zmm10, zmm12, zmm12", "vdpbf16ps zmm11, zmm12, zmm12",
                "dec rcx",
                "jnz 2b",
                "vzeroupper",
                // Two bf16 0.001s (0x3A83).
                in("eax") 0x3A83_3A83u32,
                inout("rcx") iters.max(1) => _,
                clobber_abi("C"),
                options(nomem, nostack),
            );
        }
    }
}
