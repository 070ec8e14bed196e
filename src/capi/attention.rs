//! Fused attention through the C ABI: the options struct (shared by the host and CUDA entry
//! points) and its conversion to [`crate::Attention`].

use super::{dims, slice, CError, CResult};
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
