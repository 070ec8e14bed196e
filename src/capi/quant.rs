//! LFQ (group-wise LFQ, BSQ) and FSQ through the C ABI: [`Lfq`] and [`Fsq`] behind opaque
//! handles.

use std::ffi::c_void;

use super::{
    choice, flag, free_handle, guard, handle, input, new_handle, output, slice, span, write_out, VistokBackend,
    VistokDType, VistokFsq, VistokLfq, VistokStatus,
};
use crate::{BitOrder, Fsq, Lfq, LfqConfig};

/// `order` value: channel 0 of a group is the most significant bit (vector-quantize-pytorch).
pub const VISTOK_BIT_ORDER_MSB_FIRST: u32 = 0;
/// `order` value: channel 0 of a group is the least significant bit (Open-MAGVIT2, WeTok).
pub const VISTOK_BIT_ORDER_LSB_FIRST: u32 = 1;

/// An LFQ configuration (read during `vistok_lfq_new` only).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VistokLfqConfig {
    /// Groups per token, G ≥ 1.
    pub groups: usize,
    /// Bits per group, `1 ≤ d ≤ 32`.
    pub bits: u32,
    /// `VISTOK_BIT_ORDER_MSB_FIRST` or `VISTOK_BIT_ORDER_LSB_FIRST`.
    pub order: u32,
    /// Codebook scale `s` (finite, > 0); `0` means 1.
    pub scale: f32,
    /// 1: BSQ, codes are `±s/√d`; 0: codes are `±s`.
    pub spherical: u32,
}

/// The leading dim of `dims` when it has rank 2 (else `None`: the Rust API reports the shape).
fn rows(dims: &[usize]) -> Option<usize> {
    match dims {
        [n, _] => Some(*n),
        _ => None,
    }
}

/// Output dims derived from an input's, or `[len]` when the input's dims are already wrong
/// (the Rust API then names the input).
fn derived(d: Option<Vec<usize>>, len: usize) -> Vec<usize> {
    d.unwrap_or_else(|| vec![len])
}

/// Creates an LFQ quantizer: tokens `z [N, G·d]` ↔ ids `[N, G]` (u32).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (G = 0), `VISTOK_STATUS_INVALID`
/// (d not in 1..=32, an unknown `order`, `spherical` not 0 or 1, a negative or non-finite
/// scale), `VISTOK_STATUS_OVERFLOW` (G·d). Free the handle with `vistok_lfq_free`.
///
/// # Safety
/// `config` must be null or valid; `out` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn vistok_lfq_new(config: *const VistokLfqConfig, out: *mut *mut VistokLfq) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let c = unsafe { handle(config, "config")? };
        let order = choice(c.order, &[BitOrder::MsbFirst, BitOrder::LsbFirst], "config.order")?;
        let scale = if c.scale == 0.0 { 1.0 } else { c.scale };
        let cfg =
            LfqConfig::new(c.groups, c.bits, order).scale(scale).spherical(flag(c.spherical, "config.spherical")?);
        let lfq = Lfq::new(&cfg)?;
        // SAFETY: the caller's contract on `out`.
        unsafe { new_handle(out, VistokLfq(lfq), "out") }
    })
}

/// Frees a quantizer from `vistok_lfq_new` (null is a no-op).
///
/// # Safety
/// `lfq` must be null or live, not used by any other call meanwhile or afterwards.
#[no_mangle]
pub unsafe extern "C" fn vistok_lfq_free(lfq: *mut VistokLfq) {
    // SAFETY: the caller's contract.
    unsafe { free_handle(lfq) }
}

/// z → ids: `z` (`z_dtype` f32, f16 or bf16) has dims `[N, G·d]` (`z_rank` 2); `ids`
/// receives `ids_len = N·G` u32 ids `[N, G]`. N = 0 is allowed.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (z dims not `[N, G·d]`),
/// `VISTOK_STATUS_LENGTH` (`ids_len ≠ N·G`), `VISTOK_STATUS_ALIGNMENT`,
/// `VISTOK_STATUS_NON_FINITE` (a NaN in z; the message names the first),
/// `VISTOK_STATUS_INVALID` (unknown backend / dtype value), `VISTOK_STATUS_UNSUPPORTED` (u8 z).
///
/// # Safety
/// `lfq` null or live; `z_dims` valid for `z_rank` reads; `z` valid for the reads its dims
/// imply and `ids` for `ids_len` writes; no overlap.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_lfq_encode(
    lfq: *const VistokLfq,
    backend: VistokBackend,
    z_dtype: VistokDType,
    z: *const c_void,
    z_dims: *const usize,
    z_rank: usize,
    ids: *mut u32,
    ids_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let lfq = unsafe { &handle(lfq, "lfq")?.0 };
        let backend = super::backend(backend)?;
        with_float!(z_dtype, "z", |T| {
            // SAFETY: the caller's contract on `z`.
            let z = unsafe { input::<T>(z, z_dims, z_rank, "z")? };
            let d = derived(rows(z.dims()).map(|n| lfq.ids_dims(n).to_vec()), ids_len);
            // SAFETY: the caller's contract on `ids`.
            let ids = unsafe { output::<u32>(ids.cast(), ids_len, &d, "ids", &[span("z", z.data())])? };
            Ok(lfq.encode(backend, z, ids)?)
        })
    })
}

/// z → ids and the per-group L2-normalised input `u` (BSQ): as `vistok_lfq_encode`, plus
/// `normalized` receiving `normalized_len = N·G·d` elements of `normalized_dtype` (f32, f16,
/// bf16) `[N, G·d]`; a zero group stays zero.
///
/// Errors: as `vistok_lfq_encode`, for both outputs.
///
/// # Safety
/// As `vistok_lfq_encode`; `normalized` valid for `normalized_len` writes, overlapping nothing.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_lfq_encode_normalized(
    lfq: *const VistokLfq,
    backend: VistokBackend,
    z_dtype: VistokDType,
    z: *const c_void,
    z_dims: *const usize,
    z_rank: usize,
    ids: *mut u32,
    ids_len: usize,
    normalized_dtype: VistokDType,
    normalized: *mut c_void,
    normalized_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let lfq = unsafe { &handle(lfq, "lfq")?.0 };
        let backend = super::backend(backend)?;
        with_float!(z_dtype, "z", |T| with_float!(normalized_dtype, "normalized", |O| {
            // SAFETY: the caller's contract on `z`.
            let z = unsafe { input::<T>(z, z_dims, z_rank, "z")? };
            let n = rows(z.dims());
            let id = derived(n.map(|n| lfq.ids_dims(n).to_vec()), ids_len);
            let ud = derived(n.map(|n| lfq.codes_dims(n).to_vec()), normalized_len);
            // SAFETY: the caller's contract on both outputs.
            let (ids, u) = unsafe {
                let zs = span("z", z.data());
                let ids = output::<u32>(ids.cast(), ids_len, &id, "ids", std::slice::from_ref(&zs))?;
                let avoid = [zs, span("ids", ids.data())];
                (ids, output::<O>(normalized, normalized_len, &ud, "normalized", &avoid)?)
            };
            Ok(lfq.encode_normalized(backend, z, ids, u)?)
        }))
    })
}

/// ids → codes `±v` (`v = s`, or `s/√d` for BSQ): `ids` has dims `[N, G]` (`ids_rank` 2);
/// `codes` receives `codes_len = N·G·d` elements of `codes_dtype` (f32, f16, bf16)
/// `[N, G·d]`.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE`, `VISTOK_STATUS_LENGTH`,
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_INVALID` (an id `≥ 2^d`, naming the first; an
/// unknown backend / dtype value), `VISTOK_STATUS_UNSUPPORTED` (u8 codes).
///
/// # Safety
/// `lfq` null or live; `ids_dims` valid for `ids_rank` reads; `ids` valid for the reads its
/// dims imply and `codes` for `codes_len` writes; no overlap.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_lfq_decode(
    lfq: *const VistokLfq,
    backend: VistokBackend,
    ids: *const u32,
    ids_dims: *const usize,
    ids_rank: usize,
    codes_dtype: VistokDType,
    codes: *mut c_void,
    codes_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let lfq = unsafe { &handle(lfq, "lfq")?.0 };
        let backend = super::backend(backend)?;
        // SAFETY: the caller's contract on `ids`.
        let ids = unsafe { input::<u32>(ids.cast(), ids_dims, ids_rank, "ids")? };
        let d = derived(rows(ids.dims()).map(|n| lfq.codes_dims(n).to_vec()), codes_len);
        with_float!(codes_dtype, "codes", |O| {
            // SAFETY: the caller's contract on `codes`.
            let codes = unsafe { output::<O>(codes, codes_len, &d, "codes", &[span("ids", ids.data())])? };
            Ok(lfq.decode(backend, ids, codes)?)
        })
    })
}

/// Creates an FSQ quantizer with `num_levels` levels `L_i` (each in `2..=2^24`, product ≤
/// 2^32): tokens `z [N, D]` (D = `num_levels`) ↔ ids `[N]` (u32).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_INVALID` (no levels, a level out of
/// range), `VISTOK_STATUS_OVERFLOW` (product of levels above 2^32). Free the handle with
/// `vistok_fsq_free`.
///
/// # Safety
/// `levels` null or valid for `num_levels` reads; `out` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn vistok_fsq_new(
    levels: *const u32,
    num_levels: usize,
    out: *mut *mut VistokFsq,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract on `levels`.
        let levels = unsafe { slice(levels, num_levels, "levels")? };
        let fsq = Fsq::new(levels)?;
        // SAFETY: the caller's contract on `out`.
        unsafe { new_handle(out, VistokFsq(fsq), "out") }
    })
}

/// Frees a quantizer from `vistok_fsq_new` (null is a no-op).
///
/// # Safety
/// `fsq` must be null or live, not used by any other call meanwhile or afterwards.
#[no_mangle]
pub unsafe extern "C" fn vistok_fsq_free(fsq: *mut VistokFsq) {
    // SAFETY: the caller's contract.
    unsafe { free_handle(fsq) }
}

/// Writes the codebook size `Π L_i` (ids are below it) to `*size`.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`.
///
/// # Safety
/// `fsq` null or live; `size` null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn vistok_fsq_codebook_size(fsq: *const VistokFsq, size: *mut u64) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let fsq = unsafe { &handle(fsq, "fsq")?.0 };
        // SAFETY: the caller's contract on `size`.
        unsafe { write_out(size, fsq.codebook_size(), "size") }
    })
}

/// z → ids: `z` (`z_dtype` f32, f16 or bf16) has dims `[N, D]` (`z_rank` 2); `ids` receives
/// `ids_len = N` u32 ids. N = 0 is allowed.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE`, `VISTOK_STATUS_LENGTH`,
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_NON_FINITE` (a NaN in z, naming the first),
/// `VISTOK_STATUS_INVALID` (unknown backend / dtype value), `VISTOK_STATUS_UNSUPPORTED` (u8 z).
///
/// # Safety
/// `fsq` null or live; `z_dims` valid for `z_rank` reads; `z` valid for the reads its dims
/// imply and `ids` for `ids_len` writes; no overlap.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_fsq_encode(
    fsq: *const VistokFsq,
    backend: VistokBackend,
    z_dtype: VistokDType,
    z: *const c_void,
    z_dims: *const usize,
    z_rank: usize,
    ids: *mut u32,
    ids_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let fsq = unsafe { &handle(fsq, "fsq")?.0 };
        let backend = super::backend(backend)?;
        with_float!(z_dtype, "z", |T| {
            // SAFETY: the caller's contract on `z`.
            let z = unsafe { input::<T>(z, z_dims, z_rank, "z")? };
            let d = derived(rows(z.dims()).map(|n| vec![n]), ids_len);
            // SAFETY: the caller's contract on `ids`.
            let ids = unsafe { output::<u32>(ids.cast(), ids_len, &d, "ids", &[span("z", z.data())])? };
            Ok(fsq.encode(backend, z, ids)?)
        })
    })
}

/// ids → codes: `ids` has dims `[N]` (`ids_rank` 1); `codes` receives `codes_len = N·D`
/// elements of `codes_dtype` (f32, f16, bf16) `[N, D]`, each `(level − ⌊L/2⌋) / ⌊L/2⌋`.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE`, `VISTOK_STATUS_LENGTH`,
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_INVALID` (an id `≥ Π L_i`, naming the first; an
/// unknown backend / dtype value), `VISTOK_STATUS_UNSUPPORTED` (u8 codes).
///
/// # Safety
/// `fsq` null or live; `ids_dims` valid for `ids_rank` reads; `ids` valid for the reads its
/// dims imply and `codes` for `codes_len` writes; no overlap.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_fsq_decode(
    fsq: *const VistokFsq,
    backend: VistokBackend,
    ids: *const u32,
    ids_dims: *const usize,
    ids_rank: usize,
    codes_dtype: VistokDType,
    codes: *mut c_void,
    codes_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let fsq = unsafe { &handle(fsq, "fsq")?.0 };
        let backend = super::backend(backend)?;
        // SAFETY: the caller's contract on `ids`.
        let ids = unsafe { input::<u32>(ids.cast(), ids_dims, ids_rank, "ids")? };
        let d = derived(
            match ids.dims() {
                [n] => Some(vec![*n, fsq.dim()]),
                _ => None,
            },
            codes_len,
        );
        with_float!(codes_dtype, "codes", |O| {
            // SAFETY: the caller's contract on `codes`.
            let codes = unsafe { output::<O>(codes, codes_len, &d, "codes", &[span("ids", ids.data())])? };
            Ok(fsq.decode(backend, ids, codes)?)
        })
    })
}

/// A nullable `u64` count output of `want` elements (`null` with `len` 0: not wanted → `None`);
/// `computed`: whether the statistics have this table (else `VISTOK_STATUS_UNSUPPORTED`,
/// `why` saying why).
///
/// # Safety
/// `ptr` null or valid for `len` writes of u64, not accessed otherwise meanwhile.
unsafe fn counts_out<'a>(
    ptr: *mut u64,
    len: usize,
    want: usize,
    what: &str,
    computed: bool,
    why: &str,
    avoid: &[super::Span<'_>],
) -> super::CResult<Option<crate::ViewMut<'a, u64>>> {
    if ptr.is_null() && len == 0 {
        return Ok(None);
    }
    if !computed {
        return Err(super::CError::Other(VistokStatus::Unsupported, format!("{what}: {why}")));
    }
    // SAFETY: the caller's contract.
    Ok(Some(unsafe { output::<u64>(ptr.cast(), len, &[want], what, avoid)? }))
}

/// Usage statistics of LFQ ids `[N, G]` (`ids_rank` 2), as `Lfq::statistics` computes them
/// (integer counts: the same on every backend and thread count): `ones` receives `ones_len =
/// G·d` counts, per channel in channel order, of tokens whose bit is set (code `+v`);
/// `histogram`, unless null with `histogram_len` 0, receives `histogram_len = 2^d` counts of
/// each id value over all `N·G` ids (only for `d ≤ 20`).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (ids not `[N, G]`),
/// `VISTOK_STATUS_LENGTH`, `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_INVALID` (an id `≥ 2^d`,
/// naming the first; an output overlapping the ids or the other output; an unknown backend),
/// `VISTOK_STATUS_UNSUPPORTED` (a histogram asked for with `d > 20`).
///
/// # Safety
/// `lfq` null or live; `ids_dims` valid for `ids_rank` reads; `ids` valid for the reads its
/// dims imply; `ones` and `histogram` null or valid for their lengths' writes.
///
/// ```
/// use vistok::capi::quant::*;
/// use vistok::capi::*;
/// let cfg = VistokLfqConfig { groups: 2, bits: 2, order: VISTOK_BIT_ORDER_MSB_FIRST, scale: 1.0, spherical: 0 };
/// let mut lfq = std::ptr::null_mut();
/// let (ids, dims) = ([0b10u32, 0b11, 0b10, 0b00], [2usize, 2]);
/// let (mut ones, mut hist) = ([0u64; 4], [0u64; 4]);
/// // SAFETY: valid pointers and lengths; the handle is freed once.
/// unsafe {
///     assert_eq!(vistok_lfq_new(&cfg, &mut lfq), VistokStatus::Ok);
///     let st = vistok_lfq_statistics(lfq, VISTOK_BACKEND_CPU, ids.as_ptr(), dims.as_ptr(), 2,
///                                    ones.as_mut_ptr(), 4, hist.as_mut_ptr(), 4);
///     assert_eq!(st, VistokStatus::Ok);
///     vistok_lfq_free(lfq);
/// }
/// assert_eq!((ones, hist), ([2, 0, 1, 1], [1, 0, 2, 1]));
/// ```
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_lfq_statistics(
    lfq: *const VistokLfq,
    backend: VistokBackend,
    ids: *const u32,
    ids_dims: *const usize,
    ids_rank: usize,
    ones: *mut u64,
    ones_len: usize,
    histogram: *mut u64,
    histogram_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let lfq = unsafe { &handle(lfq, "lfq")?.0 };
        let backend = super::backend(backend)?;
        // SAFETY: the caller's contract on `ids`.
        let ids = unsafe { input::<u32>(ids.cast(), ids_dims, ids_rank, "ids")? };
        let bits = lfq.bits();
        let small = bits <= crate::lfq::HISTOGRAM_MAX_BITS;
        let bins = if small { 1usize << bits } else { 0 };
        let why = format!("no id histogram for d = {bits} bits (at most {})", crate::lfq::HISTOGRAM_MAX_BITS);
        let ids_span = span("ids", ids.data());
        // SAFETY: the caller's contract on both outputs.
        let (mut ones_out, hist_out) = unsafe {
            let o = output::<u64>(ones.cast(), ones_len, &[lfq.channels()], "ones", std::slice::from_ref(&ids_span))?;
            let avoid = [ids_span.clone(), span("ones", o.data())];
            (o, counts_out(histogram, histogram_len, bins, "histogram", small, &why, &avoid)?)
        };
        let stats = lfq.statistics(backend, ids)?;
        ones_out.data_mut().copy_from_slice(&stats.ones);
        if let (Some(mut h), Some(src)) = (hist_out, stats.histogram) {
            h.data_mut().copy_from_slice(&src);
        }
        Ok(())
    })
}

/// Usage statistics of FSQ ids `[N]` (`ids_rank` 1), as `Fsq::statistics` computes them
/// (integer counts): `levels`, unless null with `levels_len` 0, receives `levels_len = Σ L_i`
/// counts — dimension 0's `L_0` level counts, then dimension 1's, … (how many ids have level
/// `l` in dimension `i`), only when `Σ L_i ≤ 2^20`; `histogram`, unless null with
/// `histogram_len` 0, receives `histogram_len = Π L_i` counts of each id value, only when
/// `Π L_i ≤ 2^20`.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE`, `VISTOK_STATUS_LENGTH`,
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_INVALID` (an id `≥ Π L_i`, naming the first;
/// overlapping buffers; an unknown backend), `VISTOK_STATUS_UNSUPPORTED` (a table asked for
/// beyond `2^20` bins).
///
/// # Safety
/// `fsq` null or live; `ids_dims` valid for `ids_rank` reads; `ids` valid for the reads its
/// dims imply; `levels` and `histogram` null or valid for their lengths' writes.
///
/// ```
/// use vistok::capi::quant::*;
/// use vistok::capi::*;
/// let mut fsq = std::ptr::null_mut();
/// let (ids, dims) = ([0u32, 4, 5, 5], [4usize]);
/// let (mut levels, mut hist) = ([0u64; 5], [0u64; 6]);
/// // SAFETY: valid pointers and lengths; the handle is freed once.
/// unsafe {
///     assert_eq!(vistok_fsq_new([3u32, 2].as_ptr(), 2, &mut fsq), VistokStatus::Ok);
///     let st = vistok_fsq_statistics(fsq, VISTOK_BACKEND_CPU, ids.as_ptr(), dims.as_ptr(), 1,
///                                    levels.as_mut_ptr(), 5, hist.as_mut_ptr(), 6);
///     assert_eq!(st, VistokStatus::Ok);
///     vistok_fsq_free(fsq);
/// }
/// assert_eq!((levels, hist), ([1, 1, 2, 1, 3], [1, 0, 0, 0, 1, 2]));
/// ```
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_fsq_statistics(
    fsq: *const VistokFsq,
    backend: VistokBackend,
    ids: *const u32,
    ids_dims: *const usize,
    ids_rank: usize,
    levels: *mut u64,
    levels_len: usize,
    histogram: *mut u64,
    histogram_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let fsq = unsafe { &handle(fsq, "fsq")?.0 };
        let backend = super::backend(backend)?;
        // SAFETY: the caller's contract on `ids`.
        let ids = unsafe { input::<u32>(ids.cast(), ids_dims, ids_rank, "ids")? };
        let max = crate::fsq::STATS_MAX_BINS;
        let sum: u64 = fsq.levels().iter().map(|&l| l as u64).sum();
        let prod = fsq.codebook_size();
        let ids_span = span("ids", ids.data());
        // SAFETY: the caller's contract on both outputs.
        let (lv, hist) = unsafe {
            let why = format!("no level table for Σ L_i = {sum} bins (at most {max})");
            let lv = counts_out(
                levels,
                levels_len,
                sum as usize,
                "levels",
                sum <= max,
                &why,
                std::slice::from_ref(&ids_span),
            )?;
            let mut avoid = vec![ids_span.clone()];
            if let Some(l) = &lv {
                avoid.push(span("levels", l.data()));
            }
            let why = format!("no id histogram for Π L_i = {prod} ids (at most {max})");
            (lv, counts_out(histogram, histogram_len, prod.min(max) as usize, "histogram", prod <= max, &why, &avoid)?)
        };
        let stats = fsq.statistics(backend, ids)?;
        if let (Some(mut out), Some(src)) = (lv, stats.levels) {
            for (dst, s) in out.data_mut().iter_mut().zip(src.iter().flatten()) {
                *dst = *s;
            }
        }
        if let (Some(mut h), Some(src)) = (hist, stats.histogram) {
            h.data_mut().copy_from_slice(&src);
        }
        Ok(())
    })
}
