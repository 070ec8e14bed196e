//! The element types vistok kernels read and write.
//!
//! One sealed trait, [`Element`], covers `u8` (images), `f32`, [`f16`](struct@f16) and [`bf16`](struct@bf16). The marker
//! [`Float`] narrows it to the float types (tokens are always float).
//!
//! Conversions are pinned so that every backend produces the same bits:
//! - to f32: exact (u8, f16 and bf16 all widen exactly);
//! - f32 → f16 / bf16: round to nearest, ties to even; NaN stays NaN (the `half` crate's rule);
//! - f32 → u8: round to nearest, ties to even, then clamp to [0, 255]; NaN → 0 (what PTX
//!   `cvt.rni.u8.f32` does).

pub use half::{bf16, f16};

/// Runtime tag of an [`Element`] type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `u8`
    U8,
    /// `f32`
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Short lowercase name used in kernel names and bench ids (`u8`, `f32`, `f16`, `bf16`).
    ///
    /// ```
    /// assert_eq!(vistok::DType::BF16.name(), "bf16");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            DType::U8 => "u8",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Size in bytes of one element.
    ///
    /// ```
    /// assert_eq!(vistok::DType::F16.size(), 2);
    /// ```
    pub const fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An element type vistok kernels accept: `u8`, `f32`, `f16`, `bf16`. Sealed.
///
/// ```
/// use vistok::{Element, bf16};
/// assert_eq!(<u8 as Element>::from_f32(254.5), 254); // ties to even
/// assert_eq!(<u8 as Element>::from_f32(-3.0), 0);     // clamped
/// assert_eq!(bf16::from_f32(1.0).to_f32(), 1.0);
/// ```
pub trait Element: sealed::Sealed + Copy + Send + Sync + PartialEq + std::fmt::Debug + bytemuck::Pod + 'static {
    /// Runtime tag.
    const DTYPE: DType;
    /// Exact widening to f32.
    fn to_f32(self) -> f32;
    /// Narrowing from f32 with the rounding rules of this module.
    fn from_f32(x: f32) -> Self;
}

/// Float element types (`f32`, `f16`, `bf16`): what tokens are made of. Sealed.
pub trait Float: Element {}

impl Element for u8 {
    const DTYPE: DType = DType::U8;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        // `as` saturates and maps NaN to 0, which is the rule we document.
        x.round_ties_even() as u8
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Float for f32 {}
impl Float for f16 {}
impl Float for bf16 {}
