//! Codebook argmin and lookup through the C ABI: a prepared [`Codebook`] (f32, f16 or bf16)
//! behind an opaque handle.

use std::ffi::c_void;

use super::{
    choice, free_handle, guard, handle, input, new_handle, output, span, AnyCodebook, AnyResidual, CError,
    VistokBackend, VistokCodebook, VistokDType, VistokResidual, VistokStatus,
};
use crate::{Codebook, DType, Element, Metric, ResidualCodebooks};

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

/// Runs `$body` with `$rq` bound to the typed stages of `$any` and `$t` to their element type.
macro_rules! with_residual {
    ($any:expr, |$rq:ident: $t:ident| $body:expr) => {
        match $any {
            AnyResidual::F32($rq) => {
                type $t = f32;
                $body
            }
            AnyResidual::F16($rq) => {
                type $t = crate::f16;
                $body
            }
            AnyResidual::BF16($rq) => {
                type $t = crate::bf16;
                $body
            }
        }
    };
}

/// The mismatch error of an input whose dtype is not the codebook's.
fn dtype_mismatch(what: &str, got: DType, want: DType) -> CError {
    CError::Other(
        VistokStatus::Unsupported,
        format!("{what}: dtype {} differs from the codebook's {}", got.name(), want.name()),
    )
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
            return Err(dtype_mismatch("x", dt, cb.dtype()));
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

/// Residual quantization (RQ-VAE, `ResidualVQ`): `n_stages` ≥ 1 prepared codebooks of the same
/// dtype and dimension D, applied in turn to what the previous stages left over. The codebooks
/// are copied: the stage handles may be freed afterwards. Free with `vistok_residual_free`.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER` (`stages` with `n_stages` > 0, a stage, or `out`),
/// `VISTOK_STATUS_SHAPE` (no stage, or stages of different D), `VISTOK_STATUS_UNSUPPORTED`
/// (stages of different dtypes).
///
/// # Safety
/// `stages` null or valid for `n_stages` reads of handles, each null (an error) or live; `out`
/// null or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn vistok_residual_new(
    stages: *const *const VistokCodebook,
    n_stages: usize,
    out: *mut *mut VistokResidual,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract on `stages`.
        let handles = unsafe { super::slice(stages, n_stages, "stages")? };
        let mut cbs = Vec::with_capacity(handles.len());
        for (s, &h) in handles.iter().enumerate() {
            // SAFETY: the caller's contract; null is checked.
            cbs.push(unsafe { &handle(h, &format!("stages[{s}]"))?.0 });
        }
        let Some(first) = cbs.first() else {
            return Err(CError::Other(
                VistokStatus::Shape,
                "stages: residual quantization needs at least one stage".into(),
            ));
        };
        if let Some((s, cb)) = cbs.iter().enumerate().find(|(_, cb)| cb.dtype() != first.dtype()) {
            return Err(dtype_mismatch(&format!("stages[{s}]"), cb.dtype(), first.dtype()));
        }
        // Every stage has the first one's dtype (checked): copy them out as that variant.
        macro_rules! stages_as {
            ($v:ident) => {
                AnyResidual::$v(ResidualCodebooks::new(
                    cbs.iter()
                        .filter_map(|c| match c {
                            AnyCodebook::$v(c) => Some(c.clone()),
                            _ => None,
                        })
                        .collect(),
                )?)
            };
        }
        let any = match first {
            AnyCodebook::F32(_) => stages_as!(F32),
            AnyCodebook::F16(_) => stages_as!(F16),
            AnyCodebook::BF16(_) => stages_as!(BF16),
        };
        // SAFETY: the caller's contract on `out`.
        unsafe { new_handle(out, VistokResidual(any), "out") }
    })
}

/// Frees residual stages from `vistok_residual_new` (null is a no-op).
///
/// # Safety
/// `residual` must be null or live, not used by any other call meanwhile or afterwards.
#[no_mangle]
pub unsafe extern "C" fn vistok_residual_free(residual: *mut VistokResidual) {
    // SAFETY: the caller's contract.
    unsafe { free_handle(residual) }
}

/// Quantizes `x [..., D]` (`x_rank` ≥ 2; `x_dtype` must be the stages' dtype) through every
/// stage: `indices` receives `indices_len` u32 indices `[..., S]` (stage-minor); `recon`, if not
/// null, receives the reconstruction `[..., D]` (`recon_len` elements of `recon_dtype`: the
/// chosen entries summed in f32 in stage order, rounded once). Deterministic for any thread
/// count; `vistok_residual_decode` of the indices gives the same reconstruction bit for bit.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (x rank < 2 or last dim ≠ D),
/// `VISTOK_STATUS_LENGTH` (`indices_len` ≠ rows·S, `recon_len` ≠ rows·D),
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_NON_FINITE` (NaN / ±∞ in x, naming the first,
/// before anything is written), `VISTOK_STATUS_INVALID` (unknown backend / dtype value, an
/// output overlapping another buffer), `VISTOK_STATUS_UNSUPPORTED` (`x_dtype` not the stages'
/// dtype, a u8 `recon_dtype`).
///
/// # Safety
/// `residual` null or live; `x_dims` valid for `x_rank` reads; `x` valid for the reads its dims
/// imply; `indices` valid for `indices_len` writes and a non-null `recon` for `recon_len`
/// elements.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_residual_quantize(
    residual: *const VistokResidual,
    backend: VistokBackend,
    x_dtype: VistokDType,
    x: *const c_void,
    x_dims: *const usize,
    x_rank: usize,
    indices: *mut u32,
    indices_len: usize,
    recon_dtype: VistokDType,
    recon: *mut c_void,
    recon_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let rq = unsafe { &handle(residual, "residual")?.0 };
        let backend = super::backend(backend)?;
        let dt = super::dtype(x_dtype, "x")?;
        with_residual!(rq, |rq: T| {
            if dt != T::DTYPE {
                return Err(dtype_mismatch("x", dt, T::DTYPE));
            }
            // SAFETY: the caller's contract on `x`.
            let x = unsafe { input::<T>(x, x_dims, x_rank, "x")? };
            let lead = match x.dims() {
                [lead @ .., _] if !lead.is_empty() => lead,
                // Rank < 2: the Rust API names the shape error.
                _ => return Ok(rq.quantize::<f32>(backend, x, crate::ViewMut::new(&mut [], &[0])?, None)?),
            };
            let mut want = lead.to_vec();
            want.push(rq.stages().len());
            let xs = span("x", x.data());
            // SAFETY: the caller's contract on the outputs; a null `recon` is "not wanted".
            let idx =
                unsafe { output::<u32>(indices.cast(), indices_len, &want, "indices", std::slice::from_ref(&xs))? };
            let avoid = [xs, span("indices", idx.data())];
            if recon.is_null() {
                return Ok(rq.quantize::<f32>(backend, x, idx, None)?);
            }
            let dims = x.dims().to_vec();
            with_float!(recon_dtype, "recon", |O| {
                // SAFETY: as above.
                let out = unsafe { output::<O>(recon, recon_len, &dims, "recon", &avoid)? };
                Ok(rq.quantize(backend, x, idx, Some(out))?)
            })
        })
    })
}

/// The reconstruction from `indices [..., S]` (`indices_rank` ≥ 2, the last dim the number of
/// stages): `out` receives `out_len` elements `[..., D]` of `out_dtype` (f32, f16 or bf16), the
/// chosen entries summed in f32 in stage order and rounded once, as `vistok_residual_quantize`
/// computes it.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (rank < 2, last dim ≠ S),
/// `VISTOK_STATUS_LENGTH`, `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_INVALID` (an index out of
/// range for its stage, naming the first, before anything is written; an unknown backend /
/// dtype value; `out` overlapping `indices`), `VISTOK_STATUS_UNSUPPORTED` (u8).
///
/// # Safety
/// `residual` null or live; `indices_dims` valid for `indices_rank` reads; `indices` valid for
/// the reads its dims imply and `out` for `out_len` writes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_residual_decode(
    residual: *const VistokResidual,
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
        let rq = unsafe { &handle(residual, "residual")?.0 };
        let backend = super::backend(backend)?;
        // SAFETY: the caller's contract on `indices`.
        let idx = unsafe { input::<u32>(indices.cast(), indices_dims, indices_rank, "indices")? };
        with_residual!(rq, |rq: _T| {
            let mut want = match idx.dims() {
                [lead @ .., _] if !lead.is_empty() => lead.to_vec(),
                // Rank < 2: decode names the shape error.
                _ => return Ok(rq.decode::<f32>(backend, idx, crate::ViewMut::new(&mut [], &[0])?)?),
            };
            want.push(rq.dim());
            with_float!(out_dtype, "out", |O| {
                // SAFETY: the caller's contract on `out`.
                let out = unsafe { output::<O>(out, out_len, &want, "out", &[span("indices", idx.data())])? };
                Ok(rq.decode(backend, idx, out)?)
            })
        })
    })
}
