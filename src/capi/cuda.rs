//! CUDA through the C ABI: device pointers and a caller's stream (feature `cuda`); without the
//! feature every function reports [`super::VistokStatus::NoCuda`].
