//! Token merging (ToMe) through the C ABI: a [`MergePlan`] behind an opaque handle, applied to
//! any number of tensors; source maps across layers, ToMe's size bias, and pruning (EViT
//! top-k, DivPrune) with its gathers.

use std::ffi::c_void;

use super::{
    choice, free_handle, guard, handle, input, input_len, new_handle, output, slice_mut, span, write_out, CError,
    CResult, VistokBackend, VistokDType, VistokMergePlan, VistokSelection, VistokSourceMap, VistokStatus,
};
use crate::merge::{size_bias, Selection, SourceMap};
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
        // SAFETY: the caller's contract on the out-pointers.
        unsafe {
            write_dims(&[
                (batch, plan.batch(), "batch"),
                (tokens, plan.tokens(), "tokens"),
                (out_tokens, plan.out_tokens(), "out_tokens"),
            ])
        }
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
        // SAFETY: the caller's contract on `slots`.
        unsafe { copy_out(plan.slots(), slots, slots_len, "slots", "B·N") }
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

// ---- Source maps (ToMe's source tracking in O(B·N) memory) --------------------------------

/// Starts a source map: every one of `tokens` original tokens of `batch` batches in its own
/// slot. Apply each layer's plan with `vistok_source_map_apply`; then the map gives, for every
/// original token, its slot after all of them (`vistok_source_map_slots`), the slots' sizes
/// (`vistok_source_map_sizes`) and a one-step unmerge (`vistok_source_map_unmerge`).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER` (`out`), `VISTOK_STATUS_OVERFLOW` (`B·N`, or N beyond
/// u32). Free with `vistok_source_map_free`.
///
/// # Safety
/// `out` null or valid for one write.
///
/// ```
/// use vistok::capi::merge::*;
/// use vistok::capi::*;
/// let metric = [0.0f32, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]; // [1, 4, 2]
/// let dims = [1usize, 4, 2];
/// let (mut plan, mut map) = (std::ptr::null_mut(), std::ptr::null_mut());
/// let mut slots = [9u32; 4];
/// let mut sizes = [0f32; 3];
/// // SAFETY: valid pointers and lengths; each handle freed once.
/// unsafe {
///     let st = vistok_merge_plan_new(VISTOK_BACKEND_CPU, VISTOK_DTYPE_F32, metric.as_ptr().cast(),
///                                    dims.as_ptr(), 3, 1, 0, &mut plan);
///     assert_eq!(st, VistokStatus::Ok);
///     assert_eq!(vistok_source_map_new(1, 4, &mut map), VistokStatus::Ok);
///     assert_eq!(vistok_source_map_apply(map, plan), VistokStatus::Ok);
///     assert_eq!(vistok_source_map_slots(map, slots.as_mut_ptr(), 4), VistokStatus::Ok);
///     assert_eq!(vistok_source_map_sizes(map, sizes.as_mut_ptr(), 3), VistokStatus::Ok);
///     vistok_source_map_free(map);
///     vistok_merge_plan_free(plan);
/// }
/// assert!(slots.iter().all(|&s| s < 3));
/// assert_eq!(sizes.iter().sum::<f32>(), 4.0);
/// ```
#[no_mangle]
pub unsafe extern "C" fn vistok_source_map_new(
    batch: usize,
    tokens: usize,
    out: *mut *mut VistokSourceMap,
) -> VistokStatus {
    guard(|| {
        let map = SourceMap::identity(batch, tokens)?;
        // SAFETY: the caller's contract on `out`.
        unsafe { new_handle(out, VistokSourceMap(map), "out") }
    })
}

/// Frees a source map (null is a no-op).
///
/// # Safety
/// `map` must be null or live, not used by any other call meanwhile or afterwards.
#[no_mangle]
pub unsafe extern "C" fn vistok_source_map_free(map: *mut VistokSourceMap) {
    // SAFETY: the caller's contract.
    unsafe { free_handle(map) }
}

/// Composes `plan` (made for the map's current tokens: same batch, `N` = the map's current
/// token count) into the map.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (the plan's batch or token count
/// does not match); the map is unchanged on error.
///
/// # Safety
/// `map` null or live and not used by another call meanwhile; `plan` null or live.
#[no_mangle]
pub unsafe extern "C" fn vistok_source_map_apply(
    map: *mut VistokSourceMap,
    plan: *const VistokMergePlan,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let plan = unsafe { &handle(plan, "plan")?.0 };
        if map.is_null() {
            return Err(CError::null("map"));
        }
        // SAFETY: a live handle not used elsewhere meanwhile (the caller's contract).
        let map = unsafe { &mut (*map).0 };
        Ok(map.apply(plan)?)
    })
}

/// Writes the map's sizes: batch `B`, original tokens `N₀` and current tokens (each pointer
/// may be null to skip it).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER` (`map`), `VISTOK_STATUS_ALIGNMENT`.
///
/// # Safety
/// `map` null or live; each non-null out-pointer valid for one write.
#[no_mangle]
pub unsafe extern "C" fn vistok_source_map_dims(
    map: *const VistokSourceMap,
    batch: *mut usize,
    tokens: *mut usize,
    out_tokens: *mut usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let map = unsafe { &handle(map, "map")?.0 };
        // SAFETY: the caller's contract on the out-pointers.
        unsafe {
            write_dims(&[
                (batch, map.batch(), "batch"),
                (tokens, map.tokens(), "tokens"),
                (out_tokens, map.out_tokens(), "out_tokens"),
            ])
        }
    })
}

/// `[B, N₀]`: the current slot of every original token, written to `slots` (`slots_len =
/// B·N₀` u32).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_LENGTH`, `VISTOK_STATUS_ALIGNMENT`.
///
/// # Safety
/// `map` null or live; `slots` valid for `slots_len` writes.
#[no_mangle]
pub unsafe extern "C" fn vistok_source_map_slots(
    map: *const VistokSourceMap,
    slots: *mut u32,
    slots_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let map = unsafe { &handle(map, "map")?.0 };
        // SAFETY: the caller's contract on `slots`.
        unsafe { copy_out(map.slots(), slots, slots_len, "slots", "B·N₀") }
    })
}

/// `[B, current tokens]` f32: how many original tokens each current slot holds (the sizes
/// ToMe's `merge_wavg` tracks), written to `sizes` (`sizes_len` elements).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_LENGTH`, `VISTOK_STATUS_ALIGNMENT`.
///
/// # Safety
/// `map` null or live; `sizes` valid for `sizes_len` writes.
#[no_mangle]
pub unsafe extern "C" fn vistok_source_map_sizes(
    map: *const VistokSourceMap,
    sizes: *mut f32,
    sizes_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let map = unsafe { &handle(map, "map")?.0 };
        // SAFETY: the caller's contract on `sizes`.
        unsafe { copy_out(&map.sizes(), sizes, sizes_len, "sizes", "B·current tokens") }
    })
}

/// Unmerges through every composed plan at once: `y [B, current tokens, C]` (`y_rank` 3,
/// `dtype` f32, f16 or bf16) → `out [B, N₀, C]` (`out_len` elements), every original token
/// getting its slot's value (exact copies).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE`, `VISTOK_STATUS_LENGTH`,
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_INVALID` (unknown backend / dtype, overlap),
/// `VISTOK_STATUS_UNSUPPORTED` (u8).
///
/// # Safety
/// `map` null or live; `y_dims` valid for `y_rank` reads; `y` valid for the reads its dims
/// imply and `out` for `out_len` writes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_source_map_unmerge(
    map: *const VistokSourceMap,
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
        let map = unsafe { &handle(map, "map")?.0 };
        let backend = super::backend(backend)?;
        with_float!(dtype, "y", |T| {
            // SAFETY: the caller's contract on `y`.
            let y = unsafe { input::<T>(y, y_dims, y_rank, "y")? };
            let od = match y.dims() {
                [_, _, c] => vec![map.batch(), map.tokens(), *c],
                _ => vec![out_len],
            };
            // SAFETY: the caller's contract on `out`.
            let out = unsafe { output::<T>(out, out_len, &od, "out", &[span("y", y.data())])? };
            Ok(map.unmerge(backend, y, out)?)
        })
    })
}

/// ToMe's proportional-attention key bias: `bias = log(sizes)` for `sizes [B, N]` f32
/// (`sizes_rank` 2, finite and positive), `bias` `bias_len = B·N` f32, the `[B, Nk]` layout
/// of `vistok_attention_forward`'s key bias.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE`, `VISTOK_STATUS_LENGTH`,
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_INVALID` / `VISTOK_STATUS_NON_FINITE` (a size not
/// finite and positive), overlap.
///
/// # Safety
/// `sizes_dims` valid for `sizes_rank` reads; `sizes` valid for the reads its dims imply;
/// `bias` valid for `bias_len` writes.
#[no_mangle]
pub unsafe extern "C" fn vistok_merge_size_bias(
    sizes: *const f32,
    sizes_dims: *const usize,
    sizes_rank: usize,
    bias: *mut f32,
    bias_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract on `sizes`.
        let sizes = unsafe { input::<f32>(sizes.cast(), sizes_dims, sizes_rank, "sizes")? };
        let dims = if sizes.dims().len() == 2 { sizes.dims().to_vec() } else { vec![bias_len] };
        // SAFETY: the caller's contract on `bias`.
        let bias = unsafe { output::<f32>(bias.cast(), bias_len, &dims, "bias", &[span("sizes", sizes.data())])? };
        Ok(size_bias(sizes, bias)?)
    })
}

// ---- Pruning (EViT top-k, DivPrune) -------------------------------------------------------

/// `flags` bit of `vistok_selection_*`: token 0 is a class token, always kept (not counted in
/// `k`).
pub const VISTOK_SELECTION_CLASS_TOKEN: u32 = 1;

fn selection_flags(flags: u32) -> CResult<bool> {
    if flags & !VISTOK_SELECTION_CLASS_TOKEN != 0 {
        return Err(CError::invalid(format!("flags: unknown bits {:#x}", flags & !VISTOK_SELECTION_CLASS_TOKEN)));
    }
    Ok(flags & VISTOK_SELECTION_CLASS_TOKEN != 0)
}

/// EViT's top-k: per batch the `k` tokens with the highest `score [B, N]` f32 (`score_rank`
/// 2, finite), in descending score order, ties → lower index; with
/// `VISTOK_SELECTION_CLASS_TOKEN` in `flags`, token 0 is always kept besides them.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (score not rank 2),
/// `VISTOK_STATUS_NON_FINITE`, `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_INVALID` (`k` above
/// the tokens available, unknown backend or flag bits). Free with `vistok_selection_free`.
///
/// # Safety
/// `score_dims` valid for `score_rank` reads; `score` valid for the reads its dims imply;
/// `out` null or valid for one write.
///
/// ```
/// use vistok::capi::merge::*;
/// use vistok::capi::*;
/// let score = [0.0f32, 0.1, 0.4, 0.1, 0.3];
/// let dims = [1usize, 5];
/// let mut sel = std::ptr::null_mut();
/// let mut kept = [0u32; 2];
/// // SAFETY: valid pointers and lengths; the handle is freed once.
/// unsafe {
///     let st = vistok_selection_top_k(VISTOK_BACKEND_CPU, score.as_ptr(), dims.as_ptr(), 2, 2,
///                                     VISTOK_SELECTION_CLASS_TOKEN, &mut sel);
///     assert_eq!(st, VistokStatus::Ok);
///     assert_eq!(vistok_selection_kept(sel, kept.as_mut_ptr(), 2), VistokStatus::Ok);
///     vistok_selection_free(sel);
/// }
/// assert_eq!(kept, [2, 4]);
/// ```
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_selection_top_k(
    backend: VistokBackend,
    score: *const f32,
    score_dims: *const usize,
    score_rank: usize,
    k: usize,
    flags: u32,
    out: *mut *mut VistokSelection,
) -> VistokStatus {
    guard(|| {
        let backend = super::backend(backend)?;
        let class_token = selection_flags(flags)?;
        // SAFETY: the caller's contract on `score`.
        let score = unsafe { input::<f32>(score.cast(), score_dims, score_rank, "score")? };
        let sel = Selection::top_k(backend, score, k, class_token)?;
        // SAFETY: the caller's contract on `out`.
        unsafe { new_handle(out, VistokSelection(sel), "out") }
    })
}

/// DivPrune: per batch a greedy max-min diverse set of `k` tokens under the cosine distance
/// of `metric [B, N, C]` (`metric_rank` 3, f32 / f16 / bf16, finite); ties → lower index;
/// `VISTOK_SELECTION_CLASS_TOKEN` as in `vistok_selection_top_k`.
///
/// Errors: as `vistok_selection_top_k`, plus `VISTOK_STATUS_UNSUPPORTED` (u8).
///
/// # Safety
/// `metric_dims` valid for `metric_rank` reads; `metric` valid for the reads its dims imply;
/// `out` null or valid for one write.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_selection_div_prune(
    backend: VistokBackend,
    metric_dtype: VistokDType,
    metric: *const c_void,
    metric_dims: *const usize,
    metric_rank: usize,
    k: usize,
    flags: u32,
    out: *mut *mut VistokSelection,
) -> VistokStatus {
    guard(|| {
        let backend = super::backend(backend)?;
        let class_token = selection_flags(flags)?;
        let sel = with_float!(metric_dtype, "metric", |M| {
            // SAFETY: the caller's contract on `metric`.
            let m = unsafe { input::<M>(metric, metric_dims, metric_rank, "metric")? };
            Ok::<_, CError>(Selection::div_prune(backend, m, k, class_token)?)
        })?;
        // SAFETY: the caller's contract on `out`.
        unsafe { new_handle(out, VistokSelection(sel), "out") }
    })
}

/// Frees a selection (null is a no-op).
///
/// # Safety
/// `sel` must be null or live, not used by any other call meanwhile or afterwards.
#[no_mangle]
pub unsafe extern "C" fn vistok_selection_free(sel: *mut VistokSelection) {
    // SAFETY: the caller's contract.
    unsafe { free_handle(sel) }
}

/// Writes the selection's sizes: batch `B`, input tokens `N`, `k`, and the output tokens of
/// `vistok_selection_gather` (`k` + 1 with a class token) and of
/// `vistok_selection_gather_fused` (one more); each pointer may be null.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER` (`sel`), `VISTOK_STATUS_ALIGNMENT`.
///
/// # Safety
/// `sel` null or live; each non-null out-pointer valid for one write.
#[no_mangle]
pub unsafe extern "C" fn vistok_selection_dims(
    sel: *const VistokSelection,
    batch: *mut usize,
    tokens: *mut usize,
    k: *mut usize,
    out_tokens: *mut usize,
    out_tokens_fused: *mut usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let sel = unsafe { &handle(sel, "sel")?.0 };
        // SAFETY: the caller's contract on the out-pointers.
        unsafe {
            write_dims(&[
                (batch, sel.batch(), "batch"),
                (tokens, sel.tokens(), "tokens"),
                (k, sel.k(), "k"),
                (out_tokens, sel.out_tokens(false), "out_tokens"),
                (out_tokens_fused, sel.out_tokens(true), "out_tokens_fused"),
            ])
        }
    })
}

/// `[B, k]`: the kept tokens of every batch (without the class token), in the method's order
/// (top-k: descending score; DivPrune: selection order), written to `kept` (`kept_len = B·k`).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_LENGTH`, `VISTOK_STATUS_ALIGNMENT`.
///
/// # Safety
/// `sel` null or live; `kept` valid for `kept_len` writes.
#[no_mangle]
pub unsafe extern "C" fn vistok_selection_kept(
    sel: *const VistokSelection,
    kept: *mut u32,
    kept_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let sel = unsafe { &handle(sel, "sel")?.0 };
        let all: Vec<u32> = (0..sel.batch()).flat_map(|b| sel.kept(b).iter().copied()).collect();
        // SAFETY: the caller's contract on `kept`.
        unsafe { copy_out(&all, kept, kept_len, "kept", "B·k") }
    })
}

/// Gathers the kept tokens: `x [B, N, C]` (`x_rank` 3, f32 / f16 / bf16) → `out [B, out, C]`
/// (`[class token,] kept…`, `out_len` elements; bit copies). With `fused` non-zero, also the
/// EViT fused token `Σ score·x` over the tokens not kept, as the last row; `score [B, N]` f32
/// (`score_len = B·N`, finite) is then required (null otherwise).
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE`, `VISTOK_STATUS_LENGTH`,
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_NON_FINITE` (a score),
/// `VISTOK_STATUS_INVALID` (unknown backend / dtype, overlap), `VISTOK_STATUS_UNSUPPORTED`.
///
/// # Safety
/// `sel` null or live; `x_dims` valid for `x_rank` reads; `x` valid for the reads its dims
/// imply; a non-null `score` valid for `score_len` reads; `out` valid for `out_len` writes.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_selection_gather(
    sel: *const VistokSelection,
    backend: VistokBackend,
    dtype: VistokDType,
    x: *const c_void,
    x_dims: *const usize,
    x_rank: usize,
    fused: u32,
    score: *const f32,
    score_len: usize,
    out: *mut c_void,
    out_len: usize,
) -> VistokStatus {
    guard(|| {
        // SAFETY: the caller's contract; null is checked.
        let sel = unsafe { &handle(sel, "sel")?.0 };
        let backend = super::backend(backend)?;
        let fused = fused != 0;
        // SAFETY: the caller's contract on `score` (required with `fused`).
        let score = unsafe {
            match (fused, score.is_null()) {
                (true, _) => Some(input_len::<f32>(score.cast(), score_len, &[sel.batch(), sel.tokens()], "score")?),
                (false, true) => None,
                (false, false) => return Err(CError::invalid("score is only taken with fused")),
            }
        };
        with_float!(dtype, "x", |T| {
            // SAFETY: the caller's contract on `x`.
            let x = unsafe { input::<T>(x, x_dims, x_rank, "x")? };
            let od = match x.dims() {
                [_, _, c] => vec![sel.batch(), sel.out_tokens(fused), *c],
                _ => vec![out_len],
            };
            let mut avoid = vec![span("x", x.data())];
            avoid.extend(score.map(|s| span("score", s.data())));
            // SAFETY: the caller's contract on `out`.
            let out = unsafe { output::<T>(out, out_len, &od, "out", &avoid)? };
            match score {
                Some(s) => Ok(sel.gather_fused(backend, x, s, out)?),
                None => Ok(sel.gather(backend, x, out)?),
            }
        })
    })
}

/// Writes each `(pointer, value, name)` whose pointer is non-null, after checking every
/// pointer's alignment (a failing call writes nothing).
///
/// # Safety
/// Each non-null pointer valid for one write.
unsafe fn write_dims(outs: &[(*mut usize, usize, &str)]) -> CResult {
    for &(ptr, _, what) in outs {
        if !ptr.is_null() && !(ptr as usize).is_multiple_of(align_of::<usize>()) {
            return Err(CError::Other(
                VistokStatus::Alignment,
                format!("{what} must be aligned to {} bytes", align_of::<usize>()),
            ));
        }
    }
    for &(ptr, value, what) in outs {
        if !ptr.is_null() {
            // SAFETY: the caller's contract on a non-null out-pointer.
            unsafe { write_out(ptr, value, what)? };
        }
    }
    Ok(())
}

/// Copies `src` to the `len` elements at `dst` (`len` must equal `src.len()`, named `count`).
///
/// # Safety
/// `dst` null or valid for `len` writes.
unsafe fn copy_out<T: Copy>(src: &[T], dst: *mut T, len: usize, what: &str, count: &str) -> CResult {
    // SAFETY: the caller's contract.
    let d = unsafe { slice_mut(dst, len, what)? };
    if d.len() != src.len() {
        return Err(CError::Other(
            VistokStatus::Length,
            format!("{what} has {len} elements, expected {} ({count})", src.len()),
        ));
    }
    d.copy_from_slice(src);
    Ok(())
}
