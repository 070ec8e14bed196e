//! Typed host buffers in the element types the kernels take (`u8`, `f32`, `f16`, `bf16`), and
//! how they map to and from .npy files.
//!
//! numpy has no bf16, so a bf16 buffer is written as `<f4` holding the bf16 values exactly
//! (widening is exact, NaN payloads included); reading such a file back as bf16 tokens
//! rounds each value to bf16, which changes nothing.

use std::io::{self, Write};

use vistok::{bf16, f16, Element};

use super::args::FloatType;
use super::npy::{self, NpyData};

/// One buffer of kernel input or output.
#[derive(Debug, Clone, PartialEq)]
pub enum Buf {
    U8(Vec<u8>),
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Buf {
    /// Pixels from a .npy file: `|u1`, `<f2` or `<f4`, taken as they are.
    pub fn pixels(data: NpyData) -> Result<Buf, String> {
        match data {
            NpyData::U8(v) => Ok(Buf::U8(v)),
            NpyData::F16(v) => Ok(Buf::F16(v)),
            NpyData::F32(v) => Ok(Buf::F32(v)),
            d => Err(format!("input dtype {} is not an image dtype (expected |u1, <f2 or <f4)", d.descr())),
        }
    }

    /// Tokens from a .npy file (`<f2` or `<f4`), converted to `dtype` if given (rounding to
    /// nearest, ties to even), else kept in the file's own type.
    pub fn tokens(data: NpyData, dtype: Option<FloatType>) -> Result<Buf, String> {
        let own = match data {
            NpyData::F16(v) => Buf::F16(v),
            NpyData::F32(v) => Buf::F32(v),
            d => return Err(format!("input dtype {} is not a token dtype (expected <f2 or <f4)", d.descr())),
        };
        Ok(match (dtype, own) {
            (None, own) | (Some(FloatType::F32), own @ Buf::F32(_)) | (Some(FloatType::F16), own @ Buf::F16(_)) => own,
            (Some(FloatType::F32), own) => Buf::F32(own.convert()),
            (Some(FloatType::F16), own) => Buf::F16(own.convert()),
            (Some(FloatType::BF16), own) => Buf::BF16(own.convert()),
        })
    }

    /// Every element converted to `T`, through f32: widening to f32 is exact, so there is a
    /// single rounding.
    fn convert<T: Element>(self) -> Vec<T> {
        fn conv<S: Element, T: Element>(v: Vec<S>) -> Vec<T> {
            v.into_iter().map(|x| T::from_f32(x.to_f32())).collect()
        }
        match self {
            Buf::U8(v) => conv(v),
            Buf::F32(v) => conv(v),
            Buf::F16(v) => conv(v),
            Buf::BF16(v) => conv(v),
        }
    }

    /// Writes the buffer as a .npy file with `shape` (bf16 as exact `<f4`, see the module docs).
    pub fn write_npy(&self, w: &mut impl Write, shape: &[usize]) -> io::Result<()> {
        match self {
            Buf::U8(v) => npy::write(w, shape, v),
            Buf::F32(v) => npy::write(w, shape, v),
            Buf::F16(v) => npy::write(w, shape, v),
            Buf::BF16(v) => npy::write_bf16_as_f32(w, shape, v),
        }
    }
}

/// A zero-filled vector of `n` elements, or an error instead of an abort when memory is short.
pub fn zeroed<T: Element>(n: usize) -> Result<Vec<T>, String> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| format!("out of memory allocating {n} elements of {}", T::DTYPE.name()))?;
    v.resize(n, T::from_f32(0.0));
    Ok(v)
}
