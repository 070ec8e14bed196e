//! Token merging (ToMe) through the C ABI: a [`MergePlan`] behind an opaque handle, applied to
//! any number of tensors.

use std::ffi::c_void;

use super::{
    choice, free_handle, guard, handle, input, input_len, new_handle, output, slice_mut, span, write_out, CError,
    VistokBackend, VistokDType, VistokMergePlan, VistokStatus,
};
use crate::{MatchConfig, MergeMode, MergePlan};

/// `flags` bit: token 0 is a class token (never merged).
pub const VISTOK_MERGE_CLASS_TOKEN: u32 = 1;
/// `flags` bit: token 1 is a distillation token (never a merge target).
pub const VISTOK_MERGE_DISTILL_TOKEN: u32 = 2;
/// `flags` bit: output tokens in ascending order of their original index (instead of ToMe's
/// `[kept A…, B…]`).
pub const VISTOK_MERGE_KEEP_ORIGINAL_ORDER: u32 = 4;
/// `flags` bit of `vistok_cuda_merge_plan` only: f16 / bf16 metrics take the tensor-core
/// similarity (the plan then equals the reference's up to near-ties, instead of the cpu
/// backend's bit for bit); f32 metrics are unaffected. `vistok_merge_plan_new` refuses it.
pub const VISTOK_MERGE_TENSOR_CORES: u32 = 8;
/// `mode` value: each output slot is the sum of its tokens.
pub const VISTOK_MERGE_MODE_SUM: u32 = 0;
/// `mode` value: each output slot is the mean of its tokens (ToMe's default).
pub const VISTOK_MERGE_MODE_MEAN: u32 = 1;

/// `[B, n, C]` dims from a plan's batch, a token count and the channels of `src` (rank 3);
/// `[len]` when `src` has another rank (the Rust API then names `src`).
fn tokens_dims(plan: &MergePlan, n: usize, src: &[usize], len: usize) -> Vec<usize> {
    match src {
        [_, _, c] => vec![plan.batch(), n, *c],
        _ => vec![len],
    }
}

/// Bipartite soft matching (ToMe's `bipartite_soft_matching`) on `metric [B, N, Cm]`
/// (`metric_rank` 3, `metric_dtype` f32, f16 or bf16, N ≥ 2, finite): merges
/// `r' = min(r, ⌊(N − protected)/2⌋)` tokens per batch. `flags` is an OR of
/// `VISTOK_MERGE_CLASS_TOKEN`, `VISTOK_MERGE_DISTILL_TOKEN`, `VISTOK_MERGE_KEEP_ORIGINAL_ORDER`.
/// Deterministic: ties go to the lower index, on every thread count.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (metric not `[B, N, Cm]`, N < 2,
/// Cm = 0), `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_NON_FINITE` (naming the first),
/// `VISTOK_STATUS_OVERFLOW` (N beyond u32), `VISTOK_STATUS_INVALID` (unknown backend / dtype
/// value or flag bits), `VISTOK_STATUS_UNSUPPORTED` (u8). Free with `vistok_merge_plan_free`.
///
/// # Safety
/// `metric_dims` valid for `metric_rank` reads; `metric` valid for the reads its dims imply;
/// `out` null or valid for one write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_merge_plan_new(
    backend: VistokBackend,
    metric_dtype: VistokDType,
    metric: *const c_void,
    metric_dims: *const usize,
    metric_rank: usize,
    r: usize,
    flags: u32,
    out: *mut *mut VistokMergePlan,
) -> VistokStatus {
    guard(|| {
        let backend = super::backend(backend)?;
        let known = VISTOK_MERGE_CLASS_TOKEN | VISTOK_MERGE_DISTILL_TOKEN | VISTOK_MERGE_KEEP_ORIGINAL_ORDER;
        if flags & !known != 0 {
            return Err(CError::invalid(format!("flags: unknown bits {:#x}", flags & !known)));
        }
        let config = MatchConfig::new(r)
            .class_token(flags & VISTOK_MERGE_CLASS_TOKEN != 0)
            .distill_token(flags & VISTOK_MERGE_DISTILL_TOKEN != 0)
            .keep_original_order(flags & VISTOK_MERGE_KEEP_ORIGINAL_ORDER != 0);
        let plan = with_float!(metric_dtype, "metric", |M| {
            // SAFETY: the caller's contract on `metric`.
            let m = unsafe { input::<M>(metric, metric_dims, metric_rank, "metric")? };
            Ok::<_, CError>(MergePlan::bipartite(backend, m, &config)?)
        })?;
        // SAFETY: the caller's contract on `out`.
        unsafe { new_handle(out, VistokMergePlan(plan), "out") }
    })
}

/// Frees a plan from `vistok_merge_plan_new` (null is a no-op).
///
/// # Safety
/// `plan` must be null or live, not used by any other call meanwhile or afterwards.
#[no_mangle]
pub unsafe extern "C" fn vistok_merge_plan_free(plan: *mut VistokMergePlan) {
    // SAFETY: the caller's contract.
    unsafe { free_handle(plan) }
}

/// Writes the plan's sizes: batch `B`, input tokens `N` and output tokens `N − r'` (each
/// pointer may be null to skip it).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER` (`plan`).
///
/// # Safety
/// `plan` null or live; each non-null out-pointer valid for one write.
#[no_mangle]
pub unsafe extern "C" fn vistok_merge_plan_dims(
    plan: *const VistokMergePlan,
    batch: *mut usize,
    tokens: *mut usize,
    out_tokens: *mut usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let plan = unsafe { &handle(plan, "plan")?.0 };
        let outs = [
            (batch, plan.batch(), "batch"),
            (tokens, plan.tokens(), "tokens"),
            (out_tokens, plan.out_tokens(), "out_tokens"),
        ];
        // Every pointer is checked before any is written: a failing call writes nothing.
        for (ptr, _, what) in outs {
            if !ptr.is_null() && !(ptr as usize).is_multiple_of(align_of::<usize>()) {
                return Err(CError::Other(
                    VistokStatus::Alignment,
                    format!("{what} must be aligned to {} bytes", align_of::<usize>()),
                ));
            }
        }
        for (ptr, value, what) in outs {
            if !ptr.is_null() {
                // SAFETY: the caller's contract on a non-null out-pointer.
                unsafe { write_out(ptr, value, what)? };
            }
        }
        Ok(())
    })
}

/// The assignment map `[B, N]`: the output slot (`< N − r'`) every input token goes to,
/// written to `slots` (`slots_len = B·N` u32).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_LENGTH`, `VISTOK_STATUS_ALIGNMENT`.
///
/// # Safety
/// `plan` null or live; `slots` valid for `slots_len` writes.
#[no_mangle]
pub unsafe extern "C" fn vistok_merge_plan_slots(
    plan: *const VistokMergePlan,
    slots: *mut u32,
    slots_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let plan = unsafe { &handle(plan, "plan")?.0 };
        let src = plan.slots();
        // SAFETY: the caller's contract on `slots`.
        let dst = unsafe { slice_mut(slots, slots_len, "slots")? };
        if dst.len() != src.len() {
            return Err(CError::Other(
                VistokStatus::Length,
                format!("slots has {slots_len} elements, expected {} (B·N)", src.len()),
            ));
        }
        dst.copy_from_slice(src);
        Ok(())
    })
}

/// Applies a plan: `x [B, N, C]` (`x_rank` 3, `dtype` f32, f16 or bf16) → `out [B, N − r', C]`
/// (`out_len` elements of `dtype`), each output slot the sum (`VISTOK_MERGE_MODE_SUM`) or mean
/// (`VISTOK_MERGE_MODE_MEAN`) of its tokens.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (x not `[B, N, C]` of the plan),
/// `VISTOK_STATUS_LENGTH`, `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_INVALID` (unknown backend /
/// dtype / mode value), `VISTOK_STATUS_UNSUPPORTED` (u8).
///
/// # Safety
/// `plan` null or live; `x_dims` valid for `x_rank` reads; `x` valid for the reads its dims
/// imply and `out` for `out_len` writes; no overlap.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_merge_apply(
    plan: *const VistokMergePlan,
    backend: VistokBackend,
    mode: u32,
    dtype: VistokDType,
    x: *const c_void,
    x_dims: *const usize,
    x_rank: usize,
    out: *mut c_void,
    out_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let plan = unsafe { &handle(plan, "plan")?.0 };
        let backend = super::backend(backend)?;
        let mode = choice(mode, &[MergeMode::Sum, MergeMode::Mean], "mode")?;
        with_float!(dtype, "x", |T| {
            // SAFETY: the caller's contract on `x`.
            let x = unsafe { input::<T>(x, x_dims, x_rank, "x")? };
            let od = tokens_dims(plan, plan.out_tokens(), x.dims(), out_len);
            // SAFETY: the caller's contract on `out`.
            let out = unsafe { output::<T>(out, out_len, &od, "out", &[span("x", x.data())])? };
            Ok(plan.merge(backend, x, mode, out)?)
        })
    })
}

/// Size-weighted merge (ToMe's `merge_wavg`): `out = Σ sᵢxᵢ / Σ sᵢ` and `out_sizes = Σ sᵢ`
/// over each slot's tokens. `x [B, N, C]` as in `vistok_merge_apply`; `sizes` `[B, N]` f32
/// (`sizes_len = B·N`, finite and positive; null means all 1); `out` `[B, N − r', C]`
/// (`out_len` elements of `dtype`); `out_sizes` `[B, N − r']` f32.
///
/// Errors: those of `vistok_merge_apply`, and `VISTOK_STATUS_INVALID` /
/// `VISTOK_STATUS_NON_FINITE` for a size that is not finite and positive.
///
/// # Safety
/// As `vistok_merge_apply`; a non-null `sizes` valid for `sizes_len` reads; `out_sizes` valid
/// for `out_sizes_len` writes; no output overlaps anything.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_merge_apply_weighted(
    plan: *const VistokMergePlan,
    backend: VistokBackend,
    dtype: VistokDType,
    x: *const c_void,
    x_dims: *const usize,
    x_rank: usize,
    sizes: *const f32,
    sizes_len: usize,
    out: *mut c_void,
    out_len: usize,
    out_sizes: *mut f32,
    out_sizes_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let plan = unsafe { &handle(plan, "plan")?.0 };
        let backend = super::backend(backend)?;
        let (b, n, o) = (plan.batch(), plan.tokens(), plan.out_tokens());
        // SAFETY: the caller's contract on `sizes` (null: all ones).
        let sizes = unsafe {
            if sizes.is_null() {
                None
            } else {
                Some(input_len::<f32>(sizes.cast(), sizes_len, &[b, n], "sizes")?)
            }
        };
        with_float!(dtype, "x", |T| {
            // SAFETY: the caller's contract on `x`.
            let x = unsafe { input::<T>(x, x_dims, x_rank, "x")? };
            let mut avoid = vec![span("x", x.data())];
            avoid.extend(sizes.map(|s| span("sizes", s.data())));
            // SAFETY: the caller's contract on `out_sizes`.
            let out_sizes = unsafe { output::<f32>(out_sizes.cast(), out_sizes_len, &[b, o], "out_sizes", &avoid)? };
            avoid.push(span("out_sizes", out_sizes.data()));
            let od = tokens_dims(plan, o, x.dims(), out_len);
            // SAFETY: the caller's contract on `out`.
            let out = unsafe { output::<T>(out, out_len, &od, "out", &avoid)? };
            Ok(plan.merge_weighted(backend, x, sizes, out, out_sizes)?)
        })
    })
}

/// Undoes a merge: `y [B, N − r', C]` (`y_rank` 3, `dtype` f32, f16 or bf16) → `out [B, N, C]`
/// (`out_len` elements of `dtype`), every token getting the value of the slot it went to
/// (exact copies).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE`, `VISTOK_STATUS_LENGTH`,
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_INVALID` (unknown backend / dtype value),
/// `VISTOK_STATUS_UNSUPPORTED` (u8).
///
/// # Safety
/// `plan` null or live; `y_dims` valid for `y_rank` reads; `y` valid for the reads its dims
/// imply and `out` for `out_len` writes; no overlap.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_merge_unmerge(
    plan: *const VistokMergePlan,
    backend: VistokBackend,
    dtype: VistokDType,
    y: *const c_void,
    y_dims: *const usize,
    y_rank: usize,
    out: *mut c_void,
    out_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let plan = unsafe { &handle(plan, "plan")?.0 };
        let backend = super::backend(backend)?;
        with_float!(dtype, "y", |T| {
            // SAFETY: the caller's contract on `y`.
            let y = unsafe { input::<T>(y, y_dims, y_rank, "y")? };
            let od = tokens_dims(plan, plan.tokens(), y.dims(), out_len);
            // SAFETY: the caller's contract on `out`.
            let out = unsafe { output::<T>(out, out_len, &od, "out", &[span("y", y.data())])? };
            Ok(plan.unmerge(backend, y, out)?)
        })
    })
}
