//! The CPU backend: SIMD through `pulp` (instruction set detected once by [`Isa::detect`],
//! overridable with `VISTOK_ISA` or per call with `Backend::CpuIsa`), threads through `rayon`
//! (when the `rayon` feature is on). One module per kernel family, each documenting its loop
//! nest, micro-kernel and measured efficiency:
//!
//! | module | family | SIMD | threads over |
//! |---|---|---|---|
//! | `patchify` | patchify / unpatchify | element-run kernels of `simd` (AVX-512, AVX2, scalar); NT stores for large outputs | token rows / image rows |
//! | `lfq` | LFQ / BSQ encode, decode, statistics, entropy | compare → bitmask → shift/or | chunks of ids |
//! | `fsq` | FSQ encode, decode, statistics | 16 / 8 lanes of tokens, de-interleaved by permutes | chunks of tokens |
//! | `argmin` | codebook argmin (L2, cosine), lookup | register-blocked broadcast-FMA micro-kernel over a packed codebook; `vdpbf16ps` for bf16 | row chunks |
//! | `attention` | flash-style attention | queries in lanes, online softmax with a vectorised `exp2`; `vdpbf16ps` for bf16 | (batch, head, query tile) |
//! | `merge` | ToMe matching, merge / unmerge, EViT and DivPrune pruning | register-blocked A·Bᵀ with fused row argmax; bf16 screening | batches / row blocks |
//!
//! Every family turns an [`Isa`] into code compiled for its target features through one
//! dispatcher, `simd::run_isa`; discrete results (ids, indices, plans) are bit-identical at
//! every level and for every thread count (`par` splits work into fixed chunks).

pub(crate) mod argmin;
pub(crate) mod attention;
pub(crate) mod fsq;
pub(crate) mod lfq;
pub(crate) mod merge;
pub(crate) mod par;
pub(crate) mod patchify;
pub(crate) mod simd;

use crate::error::{Error, Family, Result};
use std::sync::OnceLock;

/// An x86-64 instruction-set level the CPU kernels can be pinned to.
///
/// [`Isa::detect`] picks the best one this CPU has, unless the `VISTOK_ISA` environment
/// variable (`scalar`, `v3`, `v4`) asks for a lower one; tests pin each level in turn.
///
/// ```
/// use vistok::Isa;
/// assert!(Isa::Scalar.is_available());
/// let best = Isa::detect();
/// assert!(best.is_available());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// No SIMD target features: plain scalar code.
    Scalar,
    /// x86-64-v3: AVX2 + FMA (code written portably, vectorised by the compiler).
    V3,
    /// x86-64-v4: AVX-512 (hand-written pulp SIMD micro-kernels).
    V4,
}

impl Isa {
    /// All levels, lowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::V3, Isa::V4];

    /// Whether this CPU supports the level.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::V3 => pulp::x86::V3::try_new().is_some(),
            Isa::V4 => pulp::x86::V4::try_new().is_some(),
        }
    }

    /// The best available level, or the one `VISTOK_ISA` names (if available). Computed once.
    pub fn detect() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let best = Isa::ALL.into_iter().rev().find(|i| i.is_available()).unwrap_or(Isa::Scalar);
            match std::env::var("VISTOK_ISA").ok().as_deref().map(str::to_ascii_lowercase).as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("v3") if Isa::V3.is_available() => Isa::V3,
                Some("v4") if Isa::V4.is_available() => Isa::V4,
                _ => best,
            }
        })
    }

    /// `Ok(self)` if available, else a typed error.
    pub fn check(self) -> Result<Isa> {
        if self.is_available() {
            Ok(self)
        } else {
            Err(Error::Unsupported { family: Family::Cpu, msg: format!("this CPU lacks instruction set {self:?}") })
        }
    }

    /// Lowercase name (`scalar`, `v3`, `v4`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::V3 => "v3",
            Isa::V4 => "v4",
        }
    }
}

/// Asks for every cache line of `x` (a hint: no effect on results).
#[inline(always)]
pub(crate) fn prefetch<T>(x: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes: usize = size_of_val(x);
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults and the address is inside `x`; SSE is part of
            // x86-64.
            #[allow(unused_unsafe)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().cast::<i8>().add(off));
            }
        }
    }
}
