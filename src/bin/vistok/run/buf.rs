//! Typed host buffers in the element types the kernels take (`u8`, `f32`, `f16`, `bf16`), and
//! how they map to and from .npy files.
//!
//! numpy has no bf16, so a bf16 buffer is written as `<f4` holding the bf16 values exactly
//! (widening is exact, NaN payloads included); reading such a file back as bf16 tokens
//! rounds each value to bf16, which changes nothing.

use std::io::{self, Write};

use vistok::{bf16, f16, Element};

use super::args::{FloatType, IdsType};
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

    /// The float type of a token buffer (f32 for u8, which is never a token buffer).
    pub fn float_type(&self) -> FloatType {
        match self {
            Buf::F16(_) => FloatType::F16,
            Buf::BF16(_) => FloatType::BF16,
            Buf::F32(_) | Buf::U8(_) => FloatType::F32,
        }
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

/// Codebook ids from a .npy file (`<u4`, `<i4` or `<i8`) as the library's `u32`. A negative
/// id or one above `u32::MAX` is an error naming its flat index (the kernels check the upper
/// bound, the codebook size, themselves).
pub fn ids(data: NpyData) -> Result<Vec<u32>, String> {
    fn narrow<T: Copy + std::fmt::Display>(v: Vec<T>, f: impl Fn(T) -> Option<u32>) -> Result<Vec<u32>, String> {
        v.iter().enumerate().map(|(i, &x)| f(x).ok_or_else(|| format!("ids[{i}] = {x} is not a valid id"))).collect()
    }
    match data {
        NpyData::U32(v) => Ok(v),
        NpyData::I32(v) => narrow(v, |x| u32::try_from(x).ok()),
        NpyData::I64(v) => narrow(v, |x| u32::try_from(x).ok()),
        d => Err(format!("input dtype {} is not an index dtype (expected <u4, <i4 or <i8)", d.descr())),
    }
}

/// Writes ids as a .npy file of `ty`. The caller checked that every id fits `ty`
/// ([`IdsType::max_codebook`]).
pub fn write_ids(w: &mut impl Write, shape: &[usize], ids: &[u32], ty: IdsType) -> io::Result<()> {
    match ty {
        IdsType::U4 => npy::write(w, shape, ids),
        IdsType::I4 => {
            npy::write_header(w, "<i4", shape)?;
            write_chunked(w, ids, |x| (x as i32).to_le_bytes())
        }
        IdsType::I8 => {
            npy::write_header(w, "<i8", shape)?;
            write_chunked(w, ids, |x| i64::from(x).to_le_bytes())
        }
    }
}

/// Writes the little-endian bytes of each converted element, a few thousand at a time.
fn write_chunked<const B: usize>(w: &mut impl Write, ids: &[u32], f: impl Fn(u32) -> [u8; B]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(B * 4096);
    for chunk in ids.chunks(4096) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|&x| f(x)));
        w.write_all(&buf)?;
    }
    Ok(())
}

/// A zero-filled vector of `n` elements, or an error instead of an abort when memory is short.
pub fn zeroed<T: Element>(n: usize) -> Result<Vec<T>, String> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| format!("out of memory allocating {n} elements of {}", T::DTYPE.name()))?;
    v.resize(n, T::from_f32(0.0));
    Ok(v)
}
