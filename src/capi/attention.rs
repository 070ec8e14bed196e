//! Fused attention through the C ABI: the options struct (shared by the host and CUDA entry
//! points) and its conversion to [`crate::Attention`].

use std::ffi::c_void;

use super::{dims, guard, input, output, slice, span, CError, CResult, VistokBackend, VistokDType, VistokStatus};
use crate::attention::{Bias, Mask, QkvLayout};
use crate::{Attention, View};

/// `layout` value: Q, K, V, O are `[B, H, N, D]`.
pub const VISTOK_QKV_BHND: u32 = 0;
/// `layout` value: Q, K, V, O are `[B, N, H, D]`.
pub const VISTOK_QKV_BNHD: u32 = 1;
/// `mask` value: every key is visible.
pub const VISTOK_MASK_NONE: u32 = 0;
/// `mask` value: query `i` sees key `j` iff `j ≤ i + Nk − Nq`.
pub const VISTOK_MASK_CAUSAL: u32 = 1;
/// `mask` value: a band `[i + Nk − Nq − window_left, i + Nk − Nq + window_right]`
/// (`SIZE_MAX` = unbounded on that side).
pub const VISTOK_MASK_WINDOW: u32 = 2;
/// `mask` value: block-causal by segment ids, query `i` sees key `j` iff
/// `segments_k[j] ≤ segments_q[i]` (`Nq` and `Nk` ids).
pub const VISTOK_MASK_SEGMENTS: u32 = 3;
/// `bias` value: no bias.
pub const VISTOK_BIAS_NONE: u32 = 0;
/// `bias` value: per key, dims `[B or 1, Nk]`.
pub const VISTOK_BIAS_KEY: u32 = 1;
/// `bias` value: per score, dims `[B or 1, H or 1, Nq, Nk]`.
pub const VISTOK_BIAS_FULL: u32 = 2;

/// Attention options. Zero-initialise it (`VistokAttentionOptions o = {0};`) for the defaults:
/// layout `[B, H, N, D]`, scale `1/√D`, no mask, no bias. Host pointers in it (segment ids,
/// bias) are read only during the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct VistokAttentionOptions {
    /// `VISTOK_QKV_BHND` or `VISTOK_QKV_BNHD`.
    pub layout: u32,
    /// Score scale; `0` means `1/√D`. Must be finite.
    pub scale: f32,
    /// One of the `VISTOK_MASK_*` values.
    pub mask: u32,
    /// Keys before the diagonal (window mask; `SIZE_MAX` = unbounded).
    pub window_left: usize,
    /// Keys after the diagonal (window mask; `SIZE_MAX` = unbounded).
    pub window_right: usize,
    /// `Nq` segment ids of the queries (segments mask).
    pub segments_q: *const u32,
    /// `Nk` segment ids of the keys (segments mask).
    pub segments_k: *const u32,
    /// One of the `VISTOK_BIAS_*` values.
    pub bias: u32,
    /// The f32 bias (host memory); `−∞` masks, NaN and `+∞` are errors.
    pub bias_data: *const f32,
    /// Bias dims (the first `bias_rank` entries are used).
    pub bias_dims: [usize; 4],
    /// 2 for a key bias, 4 for a full bias.
    pub bias_rank: usize,
}

/// Converts C options to [`Attention`]; `nq` / `nk` size the segment-id arrays.
///
/// # Safety
/// A non-null `opts` must point to a valid `VistokAttentionOptions` whose pointers are valid
/// for the reads their counts imply, for `'a`.
pub(crate) unsafe fn attention_from_options<'a>(
    opts: *const VistokAttentionOptions,
    nq: usize,
    nk: usize,
) -> CResult<Attention<'a>> {
    if opts.is_null() {
        return Ok(Attention::new());
    }
    // SAFETY: non-null; validity is the caller's contract.
    let o = unsafe { &*opts };
    let layout = match o.layout {
        VISTOK_QKV_BHND => QkvLayout::Bhnd,
        VISTOK_QKV_BNHD => QkvLayout::Bnhd,
        v => return Err(CError::invalid(format!("attention options: unknown layout {v}"))),
    };
    let mask = match o.mask {
        VISTOK_MASK_NONE => Mask::None,
        VISTOK_MASK_CAUSAL => Mask::Causal,
        VISTOK_MASK_WINDOW => Mask::Window { left: o.window_left, right: o.window_right },
        VISTOK_MASK_SEGMENTS => {
            // SAFETY: the caller's contract: Nq / Nk ids.
            let (q, k) = unsafe { (slice(o.segments_q, nq, "segments_q")?, slice(o.segments_k, nk, "segments_k")?) };
            Mask::Segments { q, k }
        }
        v => return Err(CError::invalid(format!("attention options: unknown mask {v}"))),
    };
    let bias = match o.bias {
        VISTOK_BIAS_NONE => Bias::None,
        VISTOK_BIAS_KEY | VISTOK_BIAS_FULL => {
            let want = if o.bias == VISTOK_BIAS_KEY { 2 } else { 4 };
            if o.bias_rank != want {
                return Err(CError::invalid(format!("attention options: bias_rank {} (expected {want})", o.bias_rank)));
            }
            // SAFETY: `bias_dims` is an inline array of 4; rank checked above.
            let d = unsafe { dims(o.bias_dims.as_ptr(), o.bias_rank, "bias_dims")? };
            let n = super::numel(d, "bias")?;
            // SAFETY: the caller's contract: `n` floats at bias_data.
            let data = unsafe { slice(o.bias_data, n, "bias_data")? };
            let view = View::new(data, d)?;
            if want == 2 {
                Bias::Key(view)
            } else {
                Bias::Full(view)
            }
        }
        v => return Err(CError::invalid(format!("attention options: unknown bias {v}"))),
    };
    let mut a = Attention::new().layout(layout).mask(mask).bias(bias);
    if o.scale != 0.0 {
        a = a.scale(o.scale);
    }
    Ok(a)
}

/// `(Nq, Nk)` from the dims of q and k under the layout `opts` names, which size the segment-id
/// arrays. `(0, 0)` unless both are rank 4: then no segment id is read, and the validation
/// reports the rank (a rank-3 q must not make D ids be read from an Nq-long array).
///
/// # Safety
/// A non-null `opts` must point to a valid `VistokAttentionOptions`.
pub(crate) unsafe fn seq_lens(opts: *const VistokAttentionOptions, qd: &[usize], kd: &[usize]) -> (usize, usize) {
    if qd.len() != 4 || kd.len() != 4 {
        return (0, 0);
    }
    // SAFETY: the caller's contract; null means the default layout.
    let layout = if opts.is_null() { VISTOK_QKV_BHND } else { unsafe { (*opts).layout } };
    let axis = if layout == VISTOK_QKV_BNHD { 1 } else { 2 };
    (qd[axis], kd[axis])
}

/// Fused attention on the host, `O = softmax(Q·Kᵀ·scale + bias)·V`: `q` `[B, H, Nq, D]`, `k`
/// and `v` `[B, Hkv, Nk, D]` (or `[B, N, H, D]` with `opts->layout = VISTOK_QKV_BNHD`), all of
/// `dtype` (f32, f16 or bf16), `H` a multiple of `Hkv`; `out` receives `out_len` elements of
/// `dtype` with q's dims; `lse`, if not null, receives `lse_len = B·H·Nq` f32 log-sum-exps
/// `[B, H, Nq]` (`−∞` for a fully masked row, whose output is zeros). `opts` may be null (the
/// defaults: `[B, H, N, D]`, scale `1/√D`, no mask, no bias). The CPU backend takes `D ≤ 256`.
///
/// Errors: `VISTOK_STATUS_NULL_POINTER`, `VISTOK_STATUS_SHAPE` (dims that do not match, a bias
/// or segment ids of the wrong shape), `VISTOK_STATUS_LENGTH` (`out_len` / `lse_len`),
/// `VISTOK_STATUS_ALIGNMENT`, `VISTOK_STATUS_NON_FINITE` (a non-finite q / k / v element, a NaN
/// or `+∞` bias), `VISTOK_STATUS_INVALID` (an unknown backend / dtype / layout / mask / bias
/// value, a non-finite scale, `bias_rank` not 2 or 4), `VISTOK_STATUS_UNSUPPORTED` (u8, or
/// `D > 256`).
///
/// # Safety
/// Each `*_dims` valid for its rank's reads; `q`, `k`, `v` valid for the reads their dims imply;
/// `out` valid for `out_len` writes and a non-null `lse` for `lse_len`; `opts` null or valid,
/// with the pointers in it valid as its fields describe; no output overlaps anything.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn vistok_attention_forward(
    backend: VistokBackend,
    dtype: VistokDType,
    q: *const c_void,
    q_dims: *const usize,
    q_rank: usize,
    k: *const c_void,
    k_dims: *const usize,
    k_rank: usize,
    v: *const c_void,
    v_dims: *const usize,
    v_rank: usize,
    out: *mut c_void,
    out_len: usize,
    lse: *mut f32,
    lse_len: usize,
    opts: *const VistokAttentionOptions,
) -> VistokStatus {
    guard(|| {
        let backend = super::backend(backend)?;
        with_float!(dtype, "q", |T| {
            // SAFETY: the caller's contract on q, k, v.
            let (q, k, v) = unsafe {
                (
                    input::<T>(q, q_dims, q_rank, "q")?,
                    input::<T>(k, k_dims, k_rank, "k")?,
                    input::<T>(v, v_dims, v_rank, "v")?,
                )
            };
            // SAFETY: the caller's contract on `opts`.
            let (nq, nk) = unsafe { seq_lens(opts, q.dims(), k.dims()) };
            // SAFETY: the caller's contract on `opts` and the buffers it points to.
            let attn = unsafe { attention_from_options(opts, nq, nk)? };
            let qd = q.dims();
            // SAFETY: the caller's contract on `out`.
            let mut avoid = vec![span("q", q.data()), span("k", k.data()), span("v", v.data())];
            let o = unsafe { output::<T>(out, out_len, qd, "out", &avoid)? };
            if lse.is_null() {
                return Ok(attn.forward(backend, q, k, v, o)?);
            }
            let ld = match (attn.layout, qd) {
                (QkvLayout::Bhnd, [b, h, n, _]) | (QkvLayout::Bnhd, [b, n, h, _]) => vec![*b, *h, *n],
                _ => vec![lse_len],
            };
            // SAFETY: the caller's contract on `lse`.
            avoid.push(span("out", o.data()));
            let l = unsafe { output::<f32>(lse.cast(), lse_len, &ld, "lse", &avoid)? };
            Ok(attn.forward_lse(backend, q, k, v, o, l)?)
        })
    })
}
