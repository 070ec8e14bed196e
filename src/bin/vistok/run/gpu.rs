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

/// GPU 0, or a one-line reason.
#[cfg(feature = "cuda")]
fn gpu0() -> Result<vistok::cuda::Gpu, String> {
    vistok::cuda::Gpu::new(0).map_err(|e| format!("--backend cuda: no usable GPU ({e})"))
}

/// LFQ z → ids on GPU 0.
#[cfg(feature = "cuda")]
pub fn lfq_encode<T: Float + Dev>(plan: &vistok::Lfq, z: &[T]) -> Result<Vec<u32>, String> {
    let k = vistok::cuda::LfqKernel::new(&gpu0()?, plan).map_err(super::exec::lib_err)?;
    k.encode_host(z).map_err(super::exec::lib_err)
}

/// LFQ ids → codes on GPU 0.
#[cfg(feature = "cuda")]
pub fn lfq_decode<O: Float + Dev>(plan: &vistok::Lfq, ids: &[u32]) -> Result<Vec<O>, String> {
    let k = vistok::cuda::LfqKernel::new(&gpu0()?, plan).map_err(super::exec::lib_err)?;
    k.decode_host(ids).map_err(super::exec::lib_err)
}

/// FSQ z → ids on GPU 0.
#[cfg(feature = "cuda")]
pub fn fsq_encode<T: Float + Dev>(plan: &vistok::Fsq, z: &[T]) -> Result<Vec<u32>, String> {
    let k = vistok::cuda::FsqKernel::new(&gpu0()?, plan).map_err(super::exec::lib_err)?;
    k.encode_host(z).map_err(super::exec::lib_err)
}

/// FSQ ids → codes on GPU 0.
#[cfg(feature = "cuda")]
pub fn fsq_decode<O: Float + Dev>(plan: &vistok::Fsq, ids: &[u32]) -> Result<Vec<O>, String> {
    let k = vistok::cuda::FsqKernel::new(&gpu0()?, plan).map_err(super::exec::lib_err)?;
    k.decode_host(ids).map_err(super::exec::lib_err)
}

#[cfg(not(feature = "cuda"))]
pub fn lfq_encode<T: Float + Dev>(_plan: &vistok::Lfq, _z: &[T]) -> Result<Vec<u32>, String> {
    Err(NO_CUDA.into())
}

#[cfg(not(feature = "cuda"))]
pub fn lfq_decode<O: Float + Dev>(_plan: &vistok::Lfq, _ids: &[u32]) -> Result<Vec<O>, String> {
    Err(NO_CUDA.into())
}

#[cfg(not(feature = "cuda"))]
pub fn fsq_encode<T: Float + Dev>(_plan: &vistok::Fsq, _z: &[T]) -> Result<Vec<u32>, String> {
    Err(NO_CUDA.into())
}

#[cfg(not(feature = "cuda"))]
pub fn fsq_decode<O: Float + Dev>(_plan: &vistok::Fsq, _ids: &[u32]) -> Result<Vec<O>, String> {
    Err(NO_CUDA.into())
}

/// ToMe matching on GPU 0 (the plan equals the cpu backend's; `tc`: the f16 / bf16
/// tensor-core similarity, equal to the reference's plan up to near-ties).
#[cfg(feature = "cuda")]
pub fn merge_plan<M: Float + Dev>(
    metric: vistok::View<'_, M>,
    config: &vistok::MatchConfig,
    tc: bool,
) -> Result<vistok::MergePlan, String> {
    let k =
        vistok::cuda::MergeKernel::new(&gpu0()?).and_then(|k| k.with_tensor_cores(tc)).map_err(super::exec::lib_err)?;
    k.plan_host(metric, config).map_err(super::exec::lib_err)
}

/// Applies a plan on GPU 0: `mode` Some → sum / mean, None → size-weighted (returns the sizes).
#[cfg(feature = "cuda")]
pub fn merge_apply<T: Float + Dev>(
    plan: &vistok::MergePlan,
    x: vistok::View<'_, T>,
    mode: Option<vistok::MergeMode>,
    sizes: Option<vistok::View<'_, f32>>,
) -> Result<(Vec<T>, Option<Vec<f32>>), String> {
    let k = vistok::cuda::MergeKernel::new(&gpu0()?).map_err(super::exec::lib_err)?;
    match mode {
        Some(m) => Ok((k.merge_host(plan, x, m).map_err(super::exec::lib_err)?, None)),
        None => {
            let (y, s) = k.merge_weighted_host(plan, x, sizes).map_err(super::exec::lib_err)?;
            Ok((y, Some(s)))
        }
    }
}

#[cfg(not(feature = "cuda"))]
pub fn merge_plan<M: Float + Dev>(
    _metric: vistok::View<'_, M>,
    _config: &vistok::MatchConfig,
    _tc: bool,
) -> Result<vistok::MergePlan, String> {
    Err(NO_CUDA.into())
}

#[cfg(not(feature = "cuda"))]
pub fn merge_apply<T: Float + Dev>(
    _plan: &vistok::MergePlan,
    _x: vistok::View<'_, T>,
    _mode: Option<vistok::MergeMode>,
    _sizes: Option<vistok::View<'_, f32>>,
) -> Result<(Vec<T>, Option<Vec<f32>>), String> {
    Err(NO_CUDA.into())
}

/// Attention on GPU 0: `(O, lse if asked)`.
#[cfg(feature = "cuda")]
pub fn attention<T: Float + Dev>(
    attn: &vistok::Attention<'_>,
    [q, k, v]: [&[T]; 3],
    [qs, ks]: [&[usize]; 2],
    want_lse: bool,
) -> Result<(Vec<T>, Option<Vec<f32>>), String> {
    let kern = vistok::cuda::AttentionKernel::new(&gpu0()?, attn, T::DTYPE, qs, ks).map_err(super::exec::lib_err)?;
    if want_lse {
        let (o, l) = kern.forward_lse_host(q, k, v).map_err(super::exec::lib_err)?;
        Ok((o, Some(l)))
    } else {
        Ok((kern.forward_host(q, k, v).map_err(super::exec::lib_err)?, None))
    }
}

#[cfg(not(feature = "cuda"))]
pub fn attention<T: Float + Dev>(
    _attn: &vistok::Attention<'_>,
    _qkv: [&[T]; 3],
    _dims: [&[usize]; 2],
    _want_lse: bool,
) -> Result<(Vec<T>, Option<Vec<f32>>), String> {
    Err(NO_CUDA.into())
}

/// Nearest codebook entries on GPU 0 (the exact f32 FFMA path: indices and distances equal the
/// cpu backend's; `tc`: the f16 / bf16 tensor-core search): `(ids, distances if asked)`.
#[cfg(feature = "cuda")]
pub fn argmin<T: Float + Dev>(
    cb: &vistok::Codebook<T>,
    x: &[T],
    want_dist: bool,
    tc: bool,
) -> Result<(Vec<u32>, Option<Vec<f32>>), String> {
    let k = vistok::cuda::CodebookGpu::new(&gpu0()?, cb)
        .and_then(|k| k.with_tensor_cores(tc))
        .map_err(super::exec::lib_err)?;
    if want_dist {
        let (i, d) = k.argmin_dist_host(x).map_err(super::exec::lib_err)?;
        Ok((i, Some(d)))
    } else {
        Ok((k.argmin_host(x).map_err(super::exec::lib_err)?, None))
    }
}

/// Codebook entries by index on GPU 0.
#[cfg(feature = "cuda")]
pub fn lookup<T: Float + Dev>(cb: &vistok::Codebook<T>, ids: &[u32]) -> Result<Vec<T>, String> {
    let k = vistok::cuda::CodebookGpu::new(&gpu0()?, cb).map_err(super::exec::lib_err)?;
    k.lookup_host(ids).map_err(super::exec::lib_err)
}

#[cfg(not(feature = "cuda"))]
pub fn argmin<T: Float + Dev>(
    _cb: &vistok::Codebook<T>,
    _x: &[T],
    _want_dist: bool,
    _tc: bool,
) -> Result<(Vec<u32>, Option<Vec<f32>>), String> {
    Err(NO_CUDA.into())
}

#[cfg(not(feature = "cuda"))]
pub fn lookup<T: Float + Dev>(_cb: &vistok::Codebook<T>, _ids: &[u32]) -> Result<Vec<T>, String> {
    Err(NO_CUDA.into())
}
