//! Codebook argmin and lookup through the C ABI: a prepared [`Codebook`] (f32, f16 or bf16)
//! behind an opaque handle.

use std::ffi::c_void;

use super::{
    choice, free_handle, guard, handle, input, new_handle, output, span, AnyCodebook, CError, VistokBackend,
    VistokCodebook, VistokDType, VistokStatus,
};
use crate::{Codebook, DType, Element, Metric};

/// `metric` value: least squared Euclidean distance.
pub const VISTOK_METRIC_L2: u32 = 0;
/// `metric` value: greatest cosine similarity (distances reported as `1 − cos`).
pub const VISTOK_METRIC_COSINE: u32 = 1;

/// Runs `$body` with `$cb` bound to the typed codebook of `$any` and `$t` to its element type.
macro_rules! with_codebook {
    ($any:expr, |$cb:ident: $t:ident| $body:expr) => {
        match $any {
            AnyCodebook::F32($cb) => {
                type $t = f32;
                $body
            }
            AnyCodebook::F16($cb) => {
                type $t = crate::f16;
                $body
            }
            AnyCodebook::BF16($cb) => {
                type $t = crate::bf16;
                $body
            }
        }
    };
}

impl AnyCodebook {
    fn dtype(&self) -> DType {
        with_codebook!(self, |_cb: T| T::DTYPE)
    }
}

/// Prepares a codebook `entries [K, D]` (`rank` 2, `dtype` f32, f16 or bf16) for nearest-entry
/// search under `metric` (`VISTOK_METRIC_L2` or `VISTOK_METRIC_COSINE`). The entries are copied:
/// the buffer may be freed afterwards.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (rank not 2, K or D = 0),
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_NON_FINITE` (a NaN / ±∞ entry, or a squared norm
/// overflowing f32), `VISTOK_STATUS_OVERFLOW` (K > 2^32), `VISTOK_STATUS_INVALID` (unknown
/// dtype / metric value), `VISTOK_STATUS_UNSUPPORTED` (u8). Free with `vistok_codebook_free`.
///
/// # Safety
/// `dims` null or valid for `rank` reads; `entries` valid for the reads its dims imply; `out`
/// null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn vistok_codebook_new(
    dtype: VistokDType,
    entries: *const c_void,
    dims: *const usize,
    rank: usize,
    metric: u32,
    out: *mut *mut VistokCodebook,
) -> VistokStatus {
    guard(|| {
        let metric = choice(metric, &[Metric::L2, Metric::Cosine], "metric")?;
        let cb = with_float!(dtype, "entries", |T| {
            // SAFETY: the caller's contract on `entries`.
            let e = unsafe { input::<T>(entries, dims, rank, "entries")? };
            Ok::<_, CError>(AnyCodebook::from(Codebook::<T>::new(e, metric)?))
        })?;
        // SAFETY: the caller's contract on `out`.
        unsafe { new_handle(out, VistokCodebook(cb), "out") }
    })
}

impl From<Codebook<f32>> for AnyCodebook {
    fn from(c: Codebook<f32>) -> Self {
        AnyCodebook::F32(c)
    }
}

impl From<Codebook<crate::f16>> for AnyCodebook {
    fn from(c: Codebook<crate::f16>) -> Self {
        AnyCodebook::F16(c)
    }
}

impl From<Codebook<crate::bf16>> for AnyCodebook {
    fn from(c: Codebook<crate::bf16>) -> Self {
        AnyCodebook::BF16(c)
    }
}

/// Frees a codebook from `vistok_codebook_new` (null is a no-op).
///
/// # Safety
/// `codebook` must be null or live, not used by any other call meanwhile or afterwards.
#[no_mangle]
pub unsafe extern "C" fn vistok_codebook_free(codebook: *mut VistokCodebook) {
    // SAFETY: the caller's contract.
    unsafe { free_handle(codebook) }
}

/// Nearest entry of every row of `x [..., D]` (`x_rank` ≥ 2; `x_dtype` must be the codebook's
/// dtype): `indices` receives `indices_len` u32 indices (the product of the leading dims);
/// `dist`, if not null, receives as many f32 distances (`‖x − e‖²`, or `1 − cos`). Ties go to
/// the lowest index. Deterministic for any thread count.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (x rank < 2 or last dim ≠ D),
/// `VISTOK_STATUS_LENGTH` (`indices_len` / `dist_len` ≠ rows), `VISTOK_STATUS_ALIGNMENT`,
/// `VISTOK_STATUS_NON_FINITE` (NaN / ±∞ in x, naming the first, before anything is written),
/// `VISTOK_STATUS_INVALID` (unknown backend / dtype value), `VISTOK_STATUS_UNSUPPORTED`
/// (`x_dtype` differs from the codebook's).
///
/// # Safety
/// `codebook` null or live; `x_dims` valid for `x_rank` reads; `x` valid for the reads its dims
/// imply; `indices` valid for `indices_len` writes and a non-null `dist` for `dist_len`; no
/// overlap.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_codebook_argmin(
    codebook: *const VistokCodebook,
    backend: VistokBackend,
    x_dtype: VistokDType,
    x: *const c_void,
    x_dims: *const usize,
    x_rank: usize,
    indices: *mut u32,
    indices_len: usize,
    dist: *mut f32,
    dist_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let cb = unsafe { &handle(codebook, "codebook")?.0 };
        let backend = super::backend(backend)?;
        let dt = super::dtype(x_dtype, "x")?;
        if dt != cb.dtype() {
            return Err(CError::Other(
                VistokStatus::Unsupported,
                format!("x: dtype {} differs from the codebook's {}", dt.name(), cb.dtype().name()),
            ));
        }
        with_codebook!(cb, |cb: T| {
            // SAFETY: the caller's contract on `x`.
            let x = unsafe { input::<T>(x, x_dims, x_rank, "x")? };
            let lead = match x.dims() {
                [lead @ .., _] if !lead.is_empty() => lead.to_vec(),
                _ => vec![indices_len],
            };
            // SAFETY: the caller's contract on the outputs; a null `dist` is "not wanted".
            let xs = span("x", x.data());
            let (idx, dist) = unsafe {
                let idx = output::<u32>(indices.cast(), indices_len, &lead, "indices", std::slice::from_ref(&xs))?;
                let avoid = [xs, span("indices", idx.data())];
                let dist = if dist.is_null() {
                    None
                } else {
                    Some(output::<f32>(dist.cast(), dist_len, &lead, "dist", &avoid)?)
                };
                (idx, dist)
            };
            Ok(cb.argmin(backend, x, idx, dist)?)
        })
    })
}

/// Entries by index: `out[i, :] = entries[indices[i], :]`. `indices` has dims `[...]`
/// (`indices_rank` ≥ 1); `out` receives `out_len` elements of `out_dtype` (f32, f16 or bf16,
/// any: rounded to nearest-even, exact when it is the codebook's dtype or f32) `[..., D]`.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE`, `VISTOK_STATUS_LENGTH`,
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_INVALID` (an index ≥ K, naming the first, before
/// anything is written; an unknown backend / dtype value), `VISTOK_STATUS_UNSUPPORTED` (u8).
///
/// # Safety
/// `codebook` null or live; `indices_dims` valid for `indices_rank` reads; `indices` valid for
/// the reads its dims imply and `out` for `out_len` writes; no overlap.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_codebook_lookup(
    codebook: *const VistokCodebook,
    backend: VistokBackend,
    indices: *const u32,
    indices_dims: *const usize,
    indices_rank: usize,
    out_dtype: VistokDType,
    out: *mut c_void,
    out_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let cb = unsafe { &handle(codebook, "codebook")?.0 };
        let backend = super::backend(backend)?;
        // SAFETY: the caller's contract on `indices`.
        let idx = unsafe { input::<u32>(indices.cast(), indices_dims, indices_rank, "indices")? };
        with_codebook!(cb, |cb: _T| {
            let mut want = idx.dims().to_vec();
            want.push(cb.dim());
            with_float!(out_dtype, "out", |O| {
                // SAFETY: the caller's contract on `out`.
                let out = unsafe { output::<O>(out, out_len, &want, "out", &[span("indices", idx.data())])? };
                Ok(cb.lookup(backend, idx, out)?)
            })
        })
    })
}
