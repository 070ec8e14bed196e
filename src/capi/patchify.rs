//! Patchify / unpatchify through the C ABI: a [`Patchify`] plan behind an opaque handle.

use std::ffi::c_void;

use super::{
    choice, dims, flag, free_handle, guard, handle, input_len, new_handle, output, slice, span, VistokBackend,
    VistokDType, VistokPatchify, VistokStatus,
};
use crate::{Layout, Normalize, PatchConfig, PatchOrder, Patchify};

/// `layout` value: images `[B, C, H, W]`, videos `[B, C, T, H, W]`.
pub const VISTOK_LAYOUT_CHANNELS_FIRST: u32 = 0;
/// `layout` value: images `[B, H, W, C]`, videos `[B, T, H, W, C]`.
pub const VISTOK_LAYOUT_CHANNELS_LAST: u32 = 1;
/// `order` value: pixels within a token ordered `(c, pt, ph, pw)` (timm's patch embedding).
pub const VISTOK_PATCH_ORDER_CPQ: u32 = 0;
/// `order` value: pixels within a token ordered `(pt, ph, pw, c)` (MAE's `patchify`).
pub const VISTOK_PATCH_ORDER_PQC: u32 = 1;

/// What to patchify. All fields are read during `vistok_patchify_new` only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VistokPatchConfig {
    /// `VISTOK_LAYOUT_CHANNELS_FIRST` or `VISTOK_LAYOUT_CHANNELS_LAST`.
    pub layout: u32,
    /// `VISTOK_PATCH_ORDER_CPQ` or `VISTOK_PATCH_ORDER_PQC`.
    pub order: u32,
    /// `[pt, ph, pw]`; `pt` must be 1 for rank-4 images.
    pub patch: [usize; 3],
    /// 1: zero-pad sizes the patch does not divide (bottom / right / last frames); 0: such
    /// sizes are an error.
    pub pad: u32,
    /// 0: no normalisation (`mean`, `std` and `scale` are ignored). Otherwise the number of
    /// entries of `mean` and `std`, which must equal the channel count C: tokens are
    /// `(x·scale − mean[c]) / std[c]`, fused.
    pub norm_channels: usize,
    /// Multiplies the raw pixel first (e.g. `1/255` for u8 images).
    pub scale: f32,
    /// Per-channel mean, `norm_channels` floats.
    pub mean: *const f32,
    /// Per-channel standard deviation, `norm_channels` floats.
    pub std: *const f32,
}

/// Prepares a patchify plan for images / videos of `image_dims` (`rank` 4 or 5, laid out as
/// `config->layout` says); tokens are `[B, L, P]` with `L = (T/pt)·(H/ph)·(W/pw)` in raster
/// order and `P = C·pt·ph·pw`.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER` (`config`, `image_dims`, `out`, or `mean` / `std` when
/// `norm_channels > 0`), `VISTOK_STATUS_INVALID` (an unknown `layout` / `order` value, `pad`
/// not 0 or 1, a zero or non-finite `std`, a non-finite `scale` or `mean`),
/// `VISTOK_STATUS_SHAPE` (rank not 4 or 5, a zero dim, `pt ≠ 1` for an image, a patch larger
/// than the image or not dividing it without `pad`, `norm_channels ≠ C`),
/// `VISTOK_STATUS_OVERFLOW`. On success `*out` is a new handle to free with
/// `vistok_patchify_free`.
///
/// # Safety
/// `config` must be null or valid; `image_dims` null or valid for `rank` reads; `mean` and `std`
/// valid for `norm_channels` reads; `out` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn vistok_patchify_new(
    config: *const VistokPatchConfig,
    image_dims: *const usize,
    rank: usize,
    out: *mut *mut VistokPatchify,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract on `config`; null is checked.
        let c = unsafe { handle(config, "config")? };
        // SAFETY: the caller's contract on `image_dims`.
        let image_dims = unsafe { dims(image_dims, rank, "image_dims")? };
        let layout = choice(c.layout, &[Layout::ChannelsFirst, Layout::ChannelsLast], "config.layout")?;
        let order = choice(c.order, &[PatchOrder::Cpq, PatchOrder::Pqc], "config.order")?;
        let [pt, ph, pw] = c.patch;
        let mut cfg = PatchConfig::video(layout, pt, ph, pw).order(order).pad(flag(c.pad, "config.pad")?);
        if c.norm_channels > 0 {
            // SAFETY: the caller's contract: `norm_channels` floats each.
            let (mean, std) = unsafe {
                (slice(c.mean, c.norm_channels, "config.mean")?, slice(c.std, c.norm_channels, "config.std")?)
            };
            cfg = cfg.normalize(Normalize::new(c.scale, mean.to_vec(), std.to_vec()));
        }
        let plan = Patchify::new(&cfg, image_dims)?;
        // SAFETY: the caller's contract on `out`.
        unsafe { new_handle(out, VistokPatchify(plan), "out") }
    })
}

/// Frees a plan from `vistok_patchify_new` (null is a no-op).
///
/// # Safety
/// `plan` must be null or a live plan, not used by any other call meanwhile or afterwards.
#[no_mangle]
pub unsafe extern "C" fn vistok_patchify_free(plan: *mut VistokPatchify) {
    // SAFETY: the caller's contract.
    unsafe { free_handle(plan) }
}

/// Writes the token dims `[B, L, P]` of `plan` to `tokens_dims[0..3]`.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`.
///
/// # Safety
/// `plan` must be null or live; `tokens_dims` null or valid for 3 writes.
#[no_mangle]
pub unsafe extern "C" fn vistok_patchify_tokens_dims(
    plan: *const VistokPatchify,
    tokens_dims: *mut usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let plan = unsafe { handle(plan, "plan")? };
        // SAFETY: the caller's contract: 3 elements.
        let out = unsafe { super::slice_mut(tokens_dims, 3, "tokens_dims")? };
        out.copy_from_slice(&plan.0.tokens_dims());
        Ok(())
    })
}

/// Image → tokens. `image` holds `image_len` elements of `image_dtype` (u8, f32, f16 or bf16)
/// with the plan's image dims; `tokens` receives `tokens_len` elements of `tokens_dtype` (f32,
/// f16 or bf16), the plan's `[B, L, P]`. Every token element is written.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_LENGTH` (a length other than the plan's
/// dims imply), `VISTOK_STATUS_ALIGNMENT` (a pointer not aligned to its element size),
/// `VISTOK_STATUS_INVALID` (an unknown backend or dtype value), `VISTOK_STATUS_UNSUPPORTED`
/// (u8 tokens).
///
/// # Safety
/// `plan` must be null or live; `image` valid for `image_len` reads and `tokens` for
/// `tokens_len` writes (of their dtypes); the two must not overlap.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_patchify_forward(
    plan: *const VistokPatchify,
    backend: VistokBackend,
    image_dtype: VistokDType,
    image: *const c_void,
    image_len: usize,
    tokens_dtype: VistokDType,
    tokens: *mut c_void,
    tokens_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let plan = unsafe { &handle(plan, "plan")?.0 };
        let backend = super::backend(backend)?;
        let (idims, tdims) = (plan.image_dims(), plan.tokens_dims());
        with_element!(image_dtype, "image", |I| with_float!(tokens_dtype, "tokens", |O| {
            // SAFETY: the caller's contract on both buffers.
            let (x, y) = unsafe {
                let x = input_len::<I>(image, image_len, idims, "image")?;
                (x, output::<O>(tokens, tokens_len, &tdims, "tokens", &[span("image", x.data())])?)
            };
            Ok(plan.forward(backend, x, y)?)
        }))
    })
}

/// Tokens → image, the exact inverse of `vistok_patchify_forward` (padded positions are
/// dropped, normalisation undone). `tokens` holds `tokens_len` elements of `tokens_dtype` (f32,
/// f16 or bf16) `[B, L, P]`; `image` receives `image_len` elements of `image_dtype` (u8, f32,
/// f16 or bf16); a u8 image rounds to nearest-even and clamps to [0, 255] (NaN → 0).
///
/// Errors: as `vistok_patchify_forward` (`VISTOK_STATUS_UNSUPPORTED` for u8 tokens).
///
/// # Safety
/// `plan` must be null or live; `tokens` valid for `tokens_len` reads and `image` for
/// `image_len` writes (of their dtypes); the two must not overlap.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_patchify_inverse(
    plan: *const VistokPatchify,
    backend: VistokBackend,
    tokens_dtype: VistokDType,
    tokens: *const c_void,
    tokens_len: usize,
    image_dtype: VistokDType,
    image: *mut c_void,
    image_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let plan = unsafe { &handle(plan, "plan")?.0 };
        let backend = super::backend(backend)?;
        let (idims, tdims) = (plan.image_dims(), plan.tokens_dims());
        with_float!(tokens_dtype, "tokens", |I| with_element!(image_dtype, "image", |O| {
            // SAFETY: the caller's contract on both buffers.
            let (y, x) = unsafe {
                let y = input_len::<I>(tokens, tokens_len, &tdims, "tokens")?;
                (y, output::<O>(image, image_len, idims, "image", &[span("tokens", y.data())])?)
            };
            Ok(plan.inverse(backend, y, x)?)
        }))
    })
}
