//! The `--backend cuda` path: the library's host helpers (copy in, launch, copy out), or a
//! clear error when this binary was built without the `cuda` feature. The only place in the
//! runner that knows about the feature.

use vistok::{Element, Float, Patchify};

pub use crate::dev::Dev;

#[cfg(feature = "cuda")]
fn kernel(plan: &Patchify) -> Result<vistok::cuda::PatchifyKernel, String> {
    // Device 0: the runner is for checking and scripting, not for multi-GPU placement.
    let gpu = vistok::cuda::Gpu::new(0).map_err(|e| format!("--backend cuda: no usable GPU ({e})"))?;
    vistok::cuda::PatchifyKernel::new(&gpu, plan).map_err(super::exec::lib_err)
}

/// Image → tokens on GPU 0.
#[cfg(feature = "cuda")]
pub fn forward<I: Element + Dev, O: Float + Dev>(plan: &Patchify, image: &[I]) -> Result<Vec<O>, String> {
    kernel(plan)?.forward_host(image).map_err(super::exec::lib_err)
}

/// Tokens → image on GPU 0.
#[cfg(feature = "cuda")]
pub fn inverse<I: Float + Dev, O: Element + Dev>(plan: &Patchify, tokens: &[I]) -> Result<Vec<O>, String> {
    kernel(plan)?.inverse_host(tokens).map_err(super::exec::lib_err)
}

#[cfg(not(feature = "cuda"))]
const NO_CUDA: &str = "--backend cuda: this vistok was built without CUDA (rebuild with --features cuda)";

#[cfg(not(feature = "cuda"))]
pub fn forward<I: Element + Dev, O: Float + Dev>(_plan: &Patchify, _image: &[I]) -> Result<Vec<O>, String> {
    Err(NO_CUDA.into())
}

#[cfg(not(feature = "cuda"))]
pub fn inverse<I: Float + Dev, O: Element + Dev>(_plan: &Patchify, _tokens: &[I]) -> Result<Vec<O>, String> {
    Err(NO_CUDA.into())
}
