//! What the CUDA backend needs of an element type, as one bound both commands can name: the
//! cudarc traits with the `cuda` feature, nothing without it (so bench and run keep one
//! generic path for every backend).

/// Element types the device backend can hold (every type, without the `cuda` feature).
#[cfg(feature = "cuda")]
pub trait Dev: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
#[cfg(feature = "cuda")]
impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> Dev for T {}
/// Element types the device backend can hold (every type, without the `cuda` feature).
#[cfg(not(feature = "cuda"))]
pub trait Dev {}
#[cfg(not(feature = "cuda"))]
impl<T> Dev for T {}
