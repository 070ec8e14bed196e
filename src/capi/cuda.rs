//! CUDA through the C ABI: device pointers and a caller's stream (feature `cuda`); without the
//! feature every function reports [`VistokStatus::NoCuda`] with a message.
//!
//! A thin layer over `vistok::cuda` (feature `cuda`), with the same kernels and the same results (LFQ, FSQ,
//! patchify, the exact f32 argmin path and the merge plans are bit-identical to the cpu
//! backend; attention within the tolerance documented in `vistok::cuda::attention`).
//!
//! Conventions, in addition to those of [`crate::capi`]:
//! - **Devices.** [`vistok_cuda_device_new`] opens one device through its *primary* context,
//!   the context the CUDA runtime uses: memory from `cudaMalloc` / `cudaMallocAsync` (or from
//!   PyTorch, CuPy, …) on that device and streams from `cudaStreamCreate` work as they are.
//!   Several devices can be open at once and used from different threads (one context per
//!   device); a device handle may be used from many threads at once.
//! - **Buffers** are device addresses (`void *`, a `CUdeviceptr`) with explicit dims; a
//!   buffer's size in bytes must be at least `product(dims) · sizeof(element)`. vistok checks
//!   the dims against each other and against the prepared object, the element types, that no
//!   pointer is null (unless its buffer is empty) and that each is aligned to its element size
//!   — all before touching the device — but it cannot check that a buffer really has that
//!   size, nor that it belongs to the device: that is the caller's contract.
//! - **Streams.** `stream` is a `CUstream` / `cudaStream_t` of the device's primary context
//!   (checked with `cuStreamGetCtx`): `NULL` is the legacy default stream,
//!   `CU_STREAM_PER_THREAD` (`(void *)2`) the per-thread default stream. Kernels, and the
//!   small uploads and temporary allocations some calls make (stream-ordered, on that
//!   stream), are enqueued there, after the work already on it. Each function says whether
//!   it waits: the *asynchronous* ones return once the work is enqueued (the inputs must stay
//!   valid, and the outputs are not ready, until the stream reaches that point); the
//!   *synchronous* ones read back a status word the kernels write (a NaN, a bad id, a bad
//!   size) and so wait for the stream — a returned error names the first bad element, as the
//!   cpu backend does, and the outputs are then unspecified. LFQ and FSQ also come in `_async`
//!   forms that do not wait, and so do not report those device-side errors.
//! - Errors found on the host are returned before any kernel is launched, and almost all
//!   before anything is enqueued. The exceptions enqueue only harmless work: f16 / bf16
//!   attention checks its 16-byte alignment after uploading the bias and segment ids, and LFQ /
//!   FSQ check the id-count limit after allocating their status word. A driver error is
//!   [`VistokStatus::Driver`].
//! - Stream capture (CUDA graphs) is not supported: the synchronous functions wait for the
//!   stream, and the others may copy from pageable host memory.
//!
//! ```
//! # #[cfg(feature = "capi")] {
//! use vistok::capi::cuda::*;
//! use vistok::capi::VistokStatus;
//! let mut dev = std::ptr::null_mut();
//! match unsafe { vistok_cuda_device_new(0, &mut dev) } {
//!     VistokStatus::Ok => unsafe { vistok_cuda_device_free(dev) },
//!     // Built without `cuda`, or no driver / no device here: an error value with a message.
//!     s => assert!(matches!(s, VistokStatus::NoCuda | VistokStatus::NoDevice | VistokStatus::Driver)),
//! }
//! # }
//! ```

use std::ffi::c_void;

use super::attention::VistokAttentionOptions;
use super::{
    guard, CError, VistokCodebook, VistokDType, VistokFsq, VistokLfq, VistokMergePlan, VistokPatchify, VistokStatus,
};

/// Opaque handle: one CUDA device (its primary context), from [`vistok_cuda_device_new`].
#[derive(Debug)]
pub struct VistokCudaDevice {
    #[cfg(feature = "cuda")]
    pub(crate) gpu: crate::cuda::Gpu,
}

/// Opaque handle: a codebook copied to one device, from [`vistok_cuda_codebook_new`].
#[derive(Debug)]
pub struct VistokCudaCodebook {
    #[cfg(feature = "cuda")]
    pub(crate) cb: imp::AnyCodebookGpu,
}

/// `flags` bit of [`vistok_cuda_codebook_new`]: f16 / bf16 searches on tensor cores (indices
/// then equal the reference's up to near-ties, instead of the cpu backend's bit for bit).
pub const VISTOK_CUDA_TENSOR_CORES: u32 = 1;

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> CError {
    CError::Other(VistokStatus::NoCuda, "vistok was built without the `cuda` feature".into())
}

/// Runs `$body` (a `CResult` expression) when built with `cuda`, else reports `NoCuda`.
macro_rules! cuda_only {
    ($body:expr) => {{
        #[cfg(feature = "cuda")]
        let r: super::CResult = $body;
        #[cfg(not(feature = "cuda"))]
        let r: super::CResult = Err(no_cuda());
        r
    }};
}

/// Number of CUDA devices.
///
/// Statuses: `NULL_POINTER` for a null `out`; `NO_CUDA` when vistok was built without CUDA or
/// the driver library cannot be loaded; `DRIVER` for another driver failure. A driver without
/// devices gives `OK` and 0.
///
/// # Safety
/// `out` must be null (an error) or valid for one `size_t` write.
#[no_mangle]
pub unsafe extern "C" fn vistok_cuda_device_count(out: *mut usize) -> VistokStatus {
    guard(|| {
        if out.is_null() {
            return Err(CError::null("out"));
        }
        cuda_only!({
            let n = crate::cuda::device_count()?;
            // SAFETY: the caller's contract on `out` (null checked above).
            unsafe { super::write_out(out, n, "out") }
        })
    })
}

/// Opens device `ordinal` (its primary context, shared with the CUDA runtime) and writes a
/// new handle to `*out`. Free it with [`vistok_cuda_device_free`].
///
/// Note: this and every `vistok_cuda_*` call that uses a device make that device's primary
/// context current on the calling thread and leave it so (as `cudaSetDevice` would). An
/// application that drives several devices from one thread with the runtime API should set
/// its device again after the call.
///
/// Statuses: `NULL_POINTER` for a null `out`; `NO_CUDA` (built without CUDA, or no driver);
/// `NO_DEVICE` (no device with this ordinal); `DRIVER`.
///
/// # Safety
/// `out` must be null (an error) or valid for one pointer write.
#[no_mangle]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_device_new(ordinal: usize, out: *mut *mut VistokCudaDevice) -> VistokStatus {
    guard(|| {
        if out.is_null() {
            return Err(CError::null("out"));
        }
        cuda_only!({
            let gpu = crate::cuda::Gpu::new(ordinal)?;
            // SAFETY: the caller's contract on `out` (null checked above).
            unsafe { super::new_handle(out, VistokCudaDevice { gpu }, "out") }
        })
    })
}

/// Frees a device handle (null is a no-op), after waiting for the work queued in its context
/// (`cuCtxSynchronize`). Objects made from it (codebooks) keep the context alive until they are
/// freed.
///
/// # Safety
/// `device` must be null or a handle from [`vistok_cuda_device_new`] not yet freed, with no
/// call using it in flight.
#[no_mangle]
pub unsafe extern "C" fn vistok_cuda_device_free(device: *mut VistokCudaDevice) {
    if device.is_null() {
        return;
    }
    #[cfg(feature = "cuda")]
    {
        // Work still queued through this handle (the asynchronous entry points) finishes
        // before its modules can be unloaded. A sticky driver error leaves nothing better to
        // do than to free.
        // SAFETY: a live handle (the caller's contract).
        let ctx = unsafe { &*device }.gpu.context().clone();
        let _ = ctx.bind_to_thread().and_then(|()| ctx.synchronize());
    }
    // SAFETY: the caller's contract.
    unsafe { super::free_handle(device) }
}

/// Patchify on the GPU: image → tokens, as the host patchify of the same plan (bit for bit).
/// Asynchronous (the plan's per-channel coefficients are uploaded on `stream` for this call).
///
/// - `image`: the plan's image dims (`[B, C, H, W]`, `[B, H, W, C]`, or with a time axis, as
///   the plan was made), type `image_dtype` (u8, f32, f16 or bf16);
/// - `tokens`: `[B, L, P]` (the plan's token dims), type `tokens_dtype` (f32, f16 or bf16);
///   every element is written (padding as `+0.0`).
///
/// Statuses (all before anything is enqueued): `NULL_POINTER`; `INVALID` (unknown dtype, a
/// stream of another context); `UNSUPPORTED` (u8 tokens, samples of 2³¹ elements or more);
/// `SHAPE` (dims other than the plan's); `ALIGNMENT`; `OVERFLOW`; then `DRIVER`. `NO_CUDA`
/// without CUDA.
///
/// # Safety
/// Handles must be live; `image_dims` / `tokens_dims` valid for `*_rank` reads; `image` and
/// `tokens` device buffers of that many elements on `device`, `tokens` not overlapping
/// `image`; `stream` a live stream of the device's primary context (or null).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_patchify_forward(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    plan: *const VistokPatchify,
    image: *const c_void,
    image_dtype: VistokDType,
    image_dims: *const usize,
    image_rank: usize,
    tokens: *mut c_void,
    tokens_dtype: VistokDType,
    tokens_dims: *const usize,
    tokens_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let image = imp::Arg { ptr: image, dims: image_dims, rank: image_rank };
            let tokens = imp::Arg { ptr: tokens, dims: tokens_dims, rank: tokens_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::patchify(device, stream, plan, image, image_dtype, tokens, tokens_dtype, true) }
        })
    })
}

/// Unpatchify on the GPU: tokens → image, the exact inverse of
/// [`vistok_cuda_patchify_forward`] (padded token positions are ignored; u8 images are
/// rounded and clamped as on the host). Asynchronous.
///
/// - `tokens`: `[B, L, P]`, f32 / f16 / bf16; `image`: the plan's image dims, u8 / f32 / f16 /
///   bf16; every image element is written.
///
/// Statuses as for [`vistok_cuda_patchify_forward`].
///
/// # Safety
/// As for [`vistok_cuda_patchify_forward`], with the roles of the buffers swapped.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_patchify_inverse(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    plan: *const VistokPatchify,
    tokens: *const c_void,
    tokens_dtype: VistokDType,
    tokens_dims: *const usize,
    tokens_rank: usize,
    image: *mut c_void,
    image_dtype: VistokDType,
    image_dims: *const usize,
    image_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let tokens = imp::Arg { ptr: tokens, dims: tokens_dims, rank: tokens_rank };
            let image = imp::Arg { ptr: image, dims: image_dims, rank: image_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::patchify(device, stream, plan, tokens, tokens_dtype, image, image_dtype, false) }
        })
    })
}

/// LFQ / BSQ encode on the GPU: `z` `[N, G·d]` (f32, f16 or bf16) → `ids` `[N, G]`
/// (`uint32_t`), bit-identical to the cpu backend. Synchronous: waits for the stream to read
/// the NaN check.
///
/// Statuses: before any kernel runs `NULL_POINTER`, `INVALID` (unknown dtype, a stream
/// of another context), `UNSUPPORTED` (u8, more than 2³² − 1 ids), `SHAPE`, `ALIGNMENT`,
/// `OVERFLOW`; after the kernel `NON_FINITE` naming the first NaN of `z` (ids then
/// unspecified); `DRIVER`. `NO_CUDA` without CUDA.
///
/// # Safety
/// Handles must be live; dims arrays valid for `*_rank` reads; `z` and `ids` device buffers
/// of that many elements on `device`, not overlapping; `stream` a live stream of the device's
/// primary context (or null).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_lfq_encode(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    lfq: *const VistokLfq,
    z: *const c_void,
    z_dtype: VistokDType,
    z_dims: *const usize,
    z_rank: usize,
    ids: *mut c_void,
    ids_dims: *const usize,
    ids_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let z = imp::Arg { ptr: z, dims: z_dims, rank: z_rank };
            let ids = imp::Arg { ptr: ids, dims: ids_dims, rank: ids_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::lfq(device, stream, lfq, z, ids, z_dtype, true, true) }
        })
    })
}

/// [`vistok_cuda_lfq_encode`] without waiting: asynchronous, returns once enqueued. The same
/// arguments and the same host-side statuses; a NaN in `z` is NOT reported (the outputs are then
/// unspecified, but nothing is written outside them).
///
/// # Safety
/// As for [`vistok_cuda_lfq_encode`]; the buffers must stay valid until the stream has run the
/// work.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_lfq_encode_async(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    lfq: *const VistokLfq,
    z: *const c_void,
    z_dtype: VistokDType,
    z_dims: *const usize,
    z_rank: usize,
    ids: *mut c_void,
    ids_dims: *const usize,
    ids_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let z = imp::Arg { ptr: z, dims: z_dims, rank: z_rank };
            let ids = imp::Arg { ptr: ids, dims: ids_dims, rank: ids_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::lfq(device, stream, lfq, z, ids, z_dtype, true, false) }
        })
    })
}

/// LFQ decode on the GPU: `ids` `[N, G]` (`uint32_t`) → `codes` `[N, G·d]` (`±v`; f32, f16
/// or bf16), bit-identical to the cpu backend. Synchronous: waits to read the id check.
///
/// Statuses as for [`vistok_cuda_lfq_encode`], with `INVALID` naming the first id with bits
/// at or above `d` (codes then unspecified) instead of `NON_FINITE`.
///
/// # Safety
/// As for [`vistok_cuda_lfq_encode`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_lfq_decode(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    lfq: *const VistokLfq,
    ids: *const c_void,
    ids_dims: *const usize,
    ids_rank: usize,
    codes: *mut c_void,
    codes_dtype: VistokDType,
    codes_dims: *const usize,
    codes_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let ids = imp::Arg { ptr: ids, dims: ids_dims, rank: ids_rank };
            let codes = imp::Arg { ptr: codes, dims: codes_dims, rank: codes_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::lfq(device, stream, lfq, ids, codes, codes_dtype, false, true) }
        })
    })
}

/// [`vistok_cuda_lfq_decode`] without waiting: asynchronous, returns once enqueued. The same
/// arguments and the same host-side statuses; an id with bits at or above `d` is NOT reported (the outputs are then
/// unspecified, but nothing is written outside them).
///
/// # Safety
/// As for [`vistok_cuda_lfq_decode`]; the buffers must stay valid until the stream has run the
/// work.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_lfq_decode_async(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    lfq: *const VistokLfq,
    ids: *const c_void,
    ids_dims: *const usize,
    ids_rank: usize,
    codes: *mut c_void,
    codes_dtype: VistokDType,
    codes_dims: *const usize,
    codes_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let ids = imp::Arg { ptr: ids, dims: ids_dims, rank: ids_rank };
            let codes = imp::Arg { ptr: codes, dims: codes_dims, rank: codes_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::lfq(device, stream, lfq, ids, codes, codes_dtype, false, false) }
        })
    })
}

/// FSQ encode on the GPU: `z` `[N, D]` (f32, f16 or bf16) → `ids` `[N]` (`uint32_t`),
/// bit-identical to the cpu backend. Synchronous: waits to read the NaN check.
///
/// Statuses: before anything is enqueued `NULL_POINTER`, `INVALID`, `UNSUPPORTED` (u8, more
/// than 2³¹ − 1 tokens), `SHAPE`, `ALIGNMENT`, `OVERFLOW`; after the kernel `NON_FINITE`
/// naming the first NaN (ids then unspecified); `DRIVER`. `NO_CUDA` without CUDA.
///
/// # Safety
/// As for [`vistok_cuda_lfq_encode`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_fsq_encode(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    fsq: *const VistokFsq,
    z: *const c_void,
    z_dtype: VistokDType,
    z_dims: *const usize,
    z_rank: usize,
    ids: *mut c_void,
    ids_dims: *const usize,
    ids_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let z = imp::Arg { ptr: z, dims: z_dims, rank: z_rank };
            let ids = imp::Arg { ptr: ids, dims: ids_dims, rank: ids_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::fsq(device, stream, fsq, z, ids, z_dtype, true, true) }
        })
    })
}

/// [`vistok_cuda_fsq_encode`] without waiting: asynchronous, returns once enqueued. The same
/// arguments and the same host-side statuses; a NaN in `z` is NOT reported (the outputs are then
/// unspecified, but nothing is written outside them).
///
/// # Safety
/// As for [`vistok_cuda_fsq_encode`]; the buffers must stay valid until the stream has run the
/// work.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_fsq_encode_async(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    fsq: *const VistokFsq,
    z: *const c_void,
    z_dtype: VistokDType,
    z_dims: *const usize,
    z_rank: usize,
    ids: *mut c_void,
    ids_dims: *const usize,
    ids_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let z = imp::Arg { ptr: z, dims: z_dims, rank: z_rank };
            let ids = imp::Arg { ptr: ids, dims: ids_dims, rank: ids_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::fsq(device, stream, fsq, z, ids, z_dtype, true, false) }
        })
    })
}

/// FSQ decode on the GPU: `ids` `[N]` (`uint32_t`) → `codes` `[N, D]` (f32, f16 or bf16),
/// bit-identical to the cpu backend. Synchronous: waits to read the id check.
///
/// Statuses as for [`vistok_cuda_fsq_encode`], with `INVALID` naming the first id at or above
/// the codebook size (codes then unspecified) instead of `NON_FINITE`.
///
/// # Safety
/// As for [`vistok_cuda_lfq_encode`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_fsq_decode(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    fsq: *const VistokFsq,
    ids: *const c_void,
    ids_dims: *const usize,
    ids_rank: usize,
    codes: *mut c_void,
    codes_dtype: VistokDType,
    codes_dims: *const usize,
    codes_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let ids = imp::Arg { ptr: ids, dims: ids_dims, rank: ids_rank };
            let codes = imp::Arg { ptr: codes, dims: codes_dims, rank: codes_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::fsq(device, stream, fsq, ids, codes, codes_dtype, false, true) }
        })
    })
}

/// [`vistok_cuda_fsq_decode`] without waiting: asynchronous, returns once enqueued. The same
/// arguments and the same host-side statuses; an id at or above the codebook size is NOT reported (the outputs are then
/// unspecified, but nothing is written outside them).
///
/// # Safety
/// As for [`vistok_cuda_fsq_decode`]; the buffers must stay valid until the stream has run the
/// work.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_fsq_decode_async(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    fsq: *const VistokFsq,
    ids: *const c_void,
    ids_dims: *const usize,
    ids_rank: usize,
    codes: *mut c_void,
    codes_dtype: VistokDType,
    codes_dims: *const usize,
    codes_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let ids = imp::Arg { ptr: ids, dims: ids_dims, rank: ids_rank };
            let codes = imp::Arg { ptr: codes, dims: codes_dims, rank: codes_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::fsq(device, stream, fsq, ids, codes, codes_dtype, false, false) }
        })
    })
}

/// Copies a prepared codebook to `device` and writes a new handle to `*out` (free it with
/// [`vistok_cuda_codebook_free`]). `flags`: 0, or [`VISTOK_CUDA_TENSOR_CORES`] (f16 / bf16
/// codebooks only). Synchronous: the copies run on the legacy default stream, which this
/// call waits for, so the handle is ready for any stream.
///
/// Statuses: `NULL_POINTER`; `INVALID` (unknown flag bits); `UNSUPPORTED` (tensor cores for
/// f32, K above 2³¹); `DRIVER`; `NO_CUDA` without CUDA.
///
/// # Safety
/// `device` and `codebook` must be null (an error) or live handles; `out` null (an error) or
/// valid for one pointer write.
#[no_mangle]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_codebook_new(
    device: *const VistokCudaDevice,
    codebook: *const VistokCodebook,
    flags: u32,
    out: *mut *mut VistokCudaCodebook,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            // SAFETY: forwarded contract.
            unsafe { imp::codebook_new(device, codebook, flags, out) }
        })
    })
}

/// Frees a device codebook (null is a no-op). Waits for all work on the device's primary
/// context first (`cuCtxSynchronize`), so that no kernel still reads it.
///
/// # Safety
/// `codebook` must be null or a handle from [`vistok_cuda_codebook_new`] not yet freed, with
/// no call using it in flight.
#[no_mangle]
pub unsafe extern "C" fn vistok_cuda_codebook_free(codebook: *mut VistokCudaCodebook) {
    if codebook.is_null() {
        return;
    }
    #[cfg(feature = "cuda")]
    {
        // SAFETY: a live handle (the caller's contract).
        let ctx = unsafe { &*codebook }.cb.gpu().context().clone();
        // A failure here (a sticky driver error) leaves nothing better to do than to free.
        let _ = ctx.bind_to_thread().and_then(|()| ctx.synchronize());
    }
    // SAFETY: the caller's contract.
    unsafe { super::free_handle(codebook) }
}

/// Nearest codebook entry on the GPU: `x` `[..., D]` (the codebook's dtype) → `indices`
/// `[...]` (`uint32_t`) and, unless `dist` is null, the distances `[...]` (`float`, the same
/// dims as `indices`). With the exact path (the default) indices and distances equal the cpu
/// backend's bit for bit. Synchronous: waits to read the NaN / ±∞ check.
///
/// Statuses: before anything is enqueued `NULL_POINTER`, `INVALID` (unknown dtype, a stream
/// of another context), `SHAPE` (including x of rank < 2), `ALIGNMENT`, `OVERFLOW`,
/// `UNSUPPORTED` (a dtype other than the codebook's, as on the host; more than 2³¹ elements); after the kernels `NON_FINITE` naming
/// the first NaN / ±∞ of `x` (outputs then unspecified); `DRIVER`. `NO_CUDA` without CUDA.
///
/// # Safety
/// `codebook` null (an error) or live; dims arrays valid for `*_rank` reads; `x`, `indices`
/// and a non-null `dist` device buffers of that many elements on the codebook's device, the
/// outputs not overlapping anything; `stream` a live stream of that device's primary context
/// (or null).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_argmin(
    codebook: *const VistokCudaCodebook,
    stream: *mut c_void,
    x: *const c_void,
    x_dtype: VistokDType,
    x_dims: *const usize,
    x_rank: usize,
    indices: *mut c_void,
    indices_dims: *const usize,
    indices_rank: usize,
    dist: *mut c_void,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let x = imp::Arg { ptr: x, dims: x_dims, rank: x_rank };
            let idx = imp::Arg { ptr: indices, dims: indices_dims, rank: indices_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::argmin(codebook, stream, x, x_dtype, idx, dist) }
        })
    })
}

/// Codebook entries by index on the GPU: `indices` `[...]` (`uint32_t`) → `out` `[..., D]`
/// (f32, f16 or bf16; exact for the codebook's dtype and f32). Synchronous: waits to read the
/// index check.
///
/// Statuses: before anything is enqueued `NULL_POINTER`, `INVALID`, `SHAPE`, `ALIGNMENT`,
/// `OVERFLOW`, `UNSUPPORTED`; after the kernel `INVALID` naming the first index `≥ K` (its row
/// is not written); `DRIVER`. `NO_CUDA` without CUDA.
///
/// # Safety
/// As for [`vistok_cuda_argmin`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_lookup(
    codebook: *const VistokCudaCodebook,
    stream: *mut c_void,
    indices: *const c_void,
    indices_dims: *const usize,
    indices_rank: usize,
    out: *mut c_void,
    out_dtype: VistokDType,
    out_dims: *const usize,
    out_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let idx = imp::Arg { ptr: indices, dims: indices_dims, rank: indices_rank };
            let out = imp::Arg { ptr: out, dims: out_dims, rank: out_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::lookup(codebook, stream, idx, out, out_dtype) }
        })
    })
}

/// Fused attention forward on the GPU: `out = softmax(Q·Kᵀ·scale + bias)·V`, with the
/// options of `options` (null: the defaults; its host arrays are read during the call only).
/// Asynchronous.
///
/// - `q`, `out`: `q_dims` (`[B, H, Nq, D]`, or `[B, Nq, H, D]` with `VISTOK_QKV_BNHD`);
///   `k`, `v`: `kv_dims` (`[B, Hkv, Nk, D]` / `[B, Nk, Hkv, D]`, `H` a multiple of `Hkv`);
///   all of type `dtype`: f16 / bf16 (D ∈ {32, 64, 128}, 16-byte aligned) or f32 (D ≤ 256);
/// - `lse`: null, or `[B, H, Nq]` `float`, the natural-log log-sum-exp (`−∞` for fully
///   masked rows).
///
/// Q, K and V are not scanned for NaN / ±∞ (their output is then unspecified); the bias is.
/// The bias and segment ids are uploaded on `stream` for this call.
///
/// Statuses (before any kernel runs; see the module notes): `NULL_POINTER`, `INVALID` (unknown
/// enum value, a stream of another context), `SHAPE`, `ALIGNMENT`, `OVERFLOW`, `NON_FINITE`
/// (scale, bias),
/// `UNSUPPORTED` (dtype / D, more than 2²⁹ tokens or 65535 batches / heads); `DRIVER`.
/// `NO_CUDA` without CUDA.
///
/// # Safety
/// `device` null (an error) or live; `options` null or valid (see `VistokAttentionOptions`);
/// dims arrays valid for `*_rank` reads; `q`, `k`, `v`, `out` and a non-null `lse` device
/// buffers of the sizes above on `device`, the outputs not overlapping anything; `stream` a
/// live stream of the device's primary context (or null).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_attention_forward(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    options: *const VistokAttentionOptions,
    dtype: VistokDType,
    q: *const c_void,
    q_dims: *const usize,
    q_rank: usize,
    k: *const c_void,
    v: *const c_void,
    kv_dims: *const usize,
    kv_rank: usize,
    out: *mut c_void,
    lse: *mut c_void,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let a = imp::AttentionArgs { dtype, q, q_dims, q_rank, k, v, kv_dims, kv_rank, out, lse };
            // SAFETY: forwarded contract.
            unsafe { imp::attention(device, stream, options, a) }
        })
    })
}

/// ToMe bipartite matching on the GPU: `metric` `[B, N, C]` (f32, f16 or bf16) → a new
/// merge-plan handle in `*out`, the same plan as the cpu backend's bit for bit (free it with
/// `vistok_merge_plan_free`; it works with the host merge functions too). `r`: tokens to
/// remove (clamped as on the host); `flags`: `VISTOK_MERGE_*` bits (as for
/// `vistok_merge_plan_new`), plus `VISTOK_MERGE_TENSOR_CORES` (f16 / bf16 metrics on tensor
/// cores: the plan then equals the reference's up to near-ties). Synchronous (the plan is
/// copied back).
///
/// Statuses: before anything is enqueued `NULL_POINTER`, `INVALID` (unknown dtype or flag
/// bits, a stream of another context), `SHAPE` (rank, `N < 2`, `C = 0`), `ALIGNMENT`,
/// `OVERFLOW`, `UNSUPPORTED` (B > 65535, B·N or C ≥ 2³¹); after the kernels `NON_FINITE`
/// naming the first non-finite element; `DRIVER`. `NO_CUDA` without CUDA.
///
/// # Safety
/// `device` null (an error) or live; `metric_dims` valid for `metric_rank` reads; `metric` a
/// device buffer of that many elements on `device`; `stream` a live stream of the device's
/// primary context (or null); `out` null (an error) or valid for one pointer write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_merge_plan(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    metric: *const c_void,
    metric_dtype: VistokDType,
    metric_dims: *const usize,
    metric_rank: usize,
    r: usize,
    flags: u32,
    out: *mut *mut VistokMergePlan,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let m = imp::Arg { ptr: metric, dims: metric_dims, rank: metric_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::merge_plan(device, stream, m, metric_dtype, r, flags, out) }
        })
    })
}

/// Merges with a plan on the GPU: `x` `[B, N, C]` → `out` `[B, N − r, C]`, summed
/// (`VISTOK_MERGE_MODE_SUM`) or averaged (`VISTOK_MERGE_MODE_MEAN`), as the cpu backend
/// (bit for bit); `dtype` f32, f16 or bf16 for both. The plan is uploaded on `stream` for
/// this call. Asynchronous.
///
/// Statuses (before anything is enqueued): `NULL_POINTER`, `INVALID` (unknown mode or dtype,
/// a stream of another context), `SHAPE` (dims other than the plan's), `ALIGNMENT`,
/// `OVERFLOW`, `UNSUPPORTED` (beyond the kernels' limits); `DRIVER`. `NO_CUDA` without CUDA.
///
/// # Safety
/// `device` and `plan` null (an error) or live; dims arrays valid for `*_rank` reads; `x`
/// and `out` device buffers of that many elements on `device`, not overlapping; `stream` a
/// live stream of the device's primary context (or null).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_merge(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    plan: *const VistokMergePlan,
    mode: u32,
    dtype: VistokDType,
    x: *const c_void,
    x_dims: *const usize,
    x_rank: usize,
    out: *mut c_void,
    out_dims: *const usize,
    out_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let x = imp::Arg { ptr: x, dims: x_dims, rank: x_rank };
            let out = imp::Arg { ptr: out, dims: out_dims, rank: out_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::merge(device, stream, plan, imp::MergeOp::Merge(mode), x, out, dtype) }
        })
    })
}

/// Size-weighted merge (ToMe's `merge_wavg`) on the GPU: `out = Σ sᵢxᵢ / Σ sᵢ` `[B, N − r, C]`
/// and `out_sizes = Σ sᵢ` `[B, N − r]` (`float`) from `x` `[B, N, C]` and `sizes` `[B, N]`
/// (`float`), as the cpu backend (bit for bit). Synchronous: waits to read the size check.
///
/// Statuses as for [`vistok_cuda_merge`], plus, after the kernel, `INVALID` / `NON_FINITE`
/// naming the first size that is not finite and positive (outputs then unspecified).
///
/// # Safety
/// As for [`vistok_cuda_merge`]; `sizes` and `out_sizes` device buffers of `B·N` and
/// `B·(N − r)` floats on `device`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_merge_weighted(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    plan: *const VistokMergePlan,
    dtype: VistokDType,
    x: *const c_void,
    x_dims: *const usize,
    x_rank: usize,
    sizes: *const c_void,
    out: *mut c_void,
    out_dims: *const usize,
    out_rank: usize,
    out_sizes: *mut c_void,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let x = imp::Arg { ptr: x, dims: x_dims, rank: x_rank };
            let out = imp::Arg { ptr: out, dims: out_dims, rank: out_rank };
            let op = imp::MergeOp::Weighted { sizes, out_sizes };
            // SAFETY: forwarded contract.
            unsafe { imp::merge(device, stream, plan, op, x, out, dtype) }
        })
    })
}

/// Unmerges with a plan on the GPU: `y` `[B, N − r, C]` → `out` `[B, N, C]`, every token its
/// slot's row (bit copies), as the cpu backend; `dtype` f32, f16 or bf16. The plan is uploaded
/// on `stream` for this call. Asynchronous.
///
/// Statuses as for [`vistok_cuda_merge`].
///
/// # Safety
/// As for [`vistok_cuda_merge`].
#[no_mangle]
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub unsafe extern "C" fn vistok_cuda_unmerge(
    device: *const VistokCudaDevice,
    stream: *mut c_void,
    plan: *const VistokMergePlan,
    dtype: VistokDType,
    y: *const c_void,
    y_dims: *const usize,
    y_rank: usize,
    out: *mut c_void,
    out_dims: *const usize,
    out_rank: usize,
) -> VistokStatus {
    guard(|| {
        cuda_only!({
            let y = imp::Arg { ptr: y, dims: y_dims, rank: y_rank };
            let out = imp::Arg { ptr: out, dims: out_dims, rank: out_rank };
            // SAFETY: forwarded contract.
            unsafe { imp::merge(device, stream, plan, imp::MergeOp::Unmerge, y, out, dtype) }
        })
    })
}

#[cfg(feature = "cuda")]
mod imp;

#[cfg(all(test, feature = "cuda"))]
mod tests;
