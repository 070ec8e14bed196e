//! The scalar oracle — **the specification** every other backend is tested against.
//!
//! One file per kernel family, naive on purpose, sharing no code with the fast paths: loops a
//! reader can check against the contract in the family's module docs ([`crate::patchify`],
//! [`crate::lfq`], [`crate::fsq`], [`crate::argmin`], [`crate::attention`], [`crate::merge`]).
//! It is public so that a downstream engine can use it as its own oracle: the functions at the
//! root of this module take the same checked views as the main API and run the reference
//! backend (they are [`Backend::Reference`] under a name of their own), and
//! [`crate::testing`] (feature `testing`) wraps them in a differential harness.
//!
//! # The contract, in one place
//! - **Ties → the lowest index.** Argmin scans `k = 0, 1, …` and takes `k` only when its exact
//!   distance is strictly less than the best so far; token merging ranks with a stable sort.
//! - **LFQ / BSQ** ([`lfq_encode`]): `bit = (z > 0)`, so `+0.0`, `−0.0` give 0, subnormals and
//!   `±∞` follow their sign. Bit order is explicit ([`BitOrder`](crate::BitOrder)). Exact on
//!   every backend: any difference from the reference is a bug.
//! - **FSQ** ([`fsq_encode`], [`fsq::bound`], [`fsq::level`]): vector-quantize-pytorch's formula
//!   `tanh(z + shift)·half_l − offset`, evaluated in **f64** with `f64::tanh`, rounded half to
//!   even, clamped to `[0, L−1]`. The fast backends evaluate a documented f32 version, so they
//!   may differ from this oracle by one level where the f64 pre-rounding value is within a few
//!   f32 ulps of a `k + 0.5` boundary (and nowhere else, for `L` up to `2^16` as tested; at
//!   `2^24` levels f32 steps are ulp-sized).
//! - **Argmin** ([`argmin()`], [`argmin::distance`]): exact distances in f64 (`‖x − e‖²`, or
//!   `1 − cos` with cosine 0 for a zero vector); fast backends work in f32 and may pick another
//!   entry only at a near-tie within the bound in [`crate::argmin`]'s docs.
//! - **Attention** ([`attention_forward`]): scores, softmax and the weighted sum in f64; a
//!   fully masked row gives zeros and a log-sum-exp of `−∞`.
//! - **NaN**: LFQ and FSQ reject a NaN in `z` ([`Error::NonFinite`](crate::Error::NonFinite)
//!   naming the first, in row-major order); argmin and attention reject NaN and `±∞` in
//!   their inputs, and token merging in its metric and scores, the same way.
//! - **Rounding**: inputs widen exactly to f32. Where the contract computes in higher
//!   precision (FSQ's bound, distances, softmax and weighted sums, merge averages) the oracle
//!   uses f64 and rounds each result once to f32, then to the output type (nearest, ties to
//!   even); patchify's affine map is the one f32 `fma` its contract defines.
//!
//! ```
//! use vistok::{reference, BitOrder, Lfq, LfqConfig, View, ViewMut};
//! let plan = Lfq::new(&LfqConfig::new(1, 3, BitOrder::MsbFirst))?;
//! let z = [0.5f32, -0.0, 1e-40];
//! let mut ids = [0u32];
//! reference::lfq_encode(&plan, View::new(&z, &[1, 3])?, ViewMut::new(&mut ids, &[1, 1])?)?;
//! assert_eq!(ids, [0b101]); // −0.0 is bit 0; a positive subnormal is bit 1
//! # Ok::<(), vistok::Error>(())
//! ```

pub mod argmin;
pub mod attention;
pub mod fsq;
pub mod lfq;
pub mod merge;
pub mod patchify;

use crate::argmin::Codebook;
use crate::attention::Attention;
use crate::dtype::{Element, Float};
use crate::error::Result;
use crate::merge::{MatchConfig, MergePlan};
use crate::{Backend, Fsq, Lfq, Patchify, View, ViewMut};

/// Reference LFQ / BSQ encode: z `[N, G·d]` → ids `[N, G]` (see [`crate::lfq`] and
/// [`lfq`]). Errors as [`Lfq::encode`]: dims, or a NaN (the first).
///
/// ```
/// use vistok::{reference, BitOrder, Lfq, LfqConfig, View, ViewMut};
/// let plan = Lfq::new(&LfqConfig::new(2, 2, BitOrder::LsbFirst))?;
/// let mut ids = [0u32; 2];
/// reference::lfq_encode(&plan, View::new(&[1.0f32, -1.0, 0.0, 3.0], &[1, 4])?, ViewMut::new(&mut ids, &[1, 2])?)?;
/// assert_eq!(ids, [0b01, 0b10]);
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn lfq_encode<T: Float>(plan: &Lfq, z: View<'_, T>, ids: ViewMut<'_, u32>) -> Result<()> {
    plan.encode(Backend::Reference, z, ids)
}

/// Reference LFQ / BSQ decode: ids `[N, G]` → codes `±v` `[N, G·d]`. Errors as
/// [`Lfq::decode`]: dims, or an id with bits at or above `d` set (the first).
///
/// ```
/// use vistok::{reference, BitOrder, Lfq, LfqConfig, View, ViewMut};
/// let plan = Lfq::new(&LfqConfig::new(1, 2, BitOrder::MsbFirst).scale(0.5))?;
/// let mut codes = [0.0f32; 2];
/// reference::lfq_decode(&plan, View::new(&[0b10u32], &[1, 1])?, ViewMut::new(&mut codes, &[1, 2])?)?;
/// assert_eq!(codes, [0.5, -0.5]);
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn lfq_decode<O: Float>(plan: &Lfq, ids: View<'_, u32>, codes: ViewMut<'_, O>) -> Result<()> {
    plan.decode(Backend::Reference, ids, codes)
}

/// Reference FSQ encode, in f64: z `[N, D]` → ids `[N]` (see [`crate::fsq`] and
/// [`fsq`]). Errors as [`Fsq::encode`]: dims, or a NaN (the first).
///
/// ```
/// use vistok::{reference, Fsq, View, ViewMut};
/// let fsq = Fsq::new(&[5, 4])?;
/// let mut ids = [0u32; 2];
/// reference::fsq_encode(&fsq, View::new(&[0.0f32, 0.0, 9.0, -9.0], &[2, 2])?, ViewMut::new(&mut ids, &[2])?)?;
/// assert_eq!(ids, [2 + 2 * 5, 4]); // z = 0: the middle levels; ±9 saturate
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn fsq_encode<T: Float>(plan: &Fsq, z: View<'_, T>, ids: ViewMut<'_, u32>) -> Result<()> {
    plan.encode(Backend::Reference, z, ids)
}

/// Reference FSQ decode: ids `[N]` → codes `[N, D]`, `(level − ⌊L/2⌋)/⌊L/2⌋`. Errors as
/// [`Fsq::decode`]: dims, or an id `≥ Π L` (the first).
///
/// ```
/// use vistok::{reference, Fsq, View, ViewMut};
/// let fsq = Fsq::new(&[5, 4])?;
/// let mut codes = [0.0f32; 2];
/// reference::fsq_decode(&fsq, View::new(&[4u32], &[1])?, ViewMut::new(&mut codes, &[1, 2])?)?;
/// assert_eq!(codes, [1.0, -1.0]);
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn fsq_decode<O: Float>(plan: &Fsq, ids: View<'_, u32>, codes: ViewMut<'_, O>) -> Result<()> {
    plan.decode(Backend::Reference, ids, codes)
}

/// Reference codebook argmin in f64: the nearest entry of every row of `x` `[..., D]` (the
/// lowest index among exact ties) and, if asked, its exact distance rounded once to f32
/// (`‖x − e‖²`, or `1 − cos`). Errors as [`Codebook::argmin`].
///
/// ```
/// use vistok::argmin::{Codebook, Metric};
/// use vistok::{reference, View, ViewMut};
/// // Entries 1 and 2 are equal: the tie goes to 1.
/// let cb = Codebook::new(View::new(&[0.0f32, 0.0, 3.0, 4.0, 3.0, 4.0], &[3, 2])?, Metric::L2)?;
/// let (mut idx, mut dist) = ([9u32; 2], [0.0f32; 2]);
/// reference::argmin(&cb, View::new(&[3.0f32, 3.0, 0.5, 0.0], &[2, 2])?, ViewMut::new(&mut idx, &[2])?,
///                   Some(ViewMut::new(&mut dist, &[2])?))?;
/// assert_eq!((idx, dist), ([1, 0], [1.0, 0.25]));
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn argmin<T: Float>(
    codebook: &Codebook<T>,
    x: View<'_, T>,
    indices: ViewMut<'_, u32>,
    distances: Option<ViewMut<'_, f32>>,
) -> Result<()> {
    codebook.argmin(Backend::Reference, x, indices, distances)
}

/// Reference attention forward in f64: `O` and the log-sum-exp `[B, H, Nq]` (see
/// [`crate::attention`]; a fully masked row gives zeros and `−∞`). Errors as
/// [`Attention::forward_lse`].
///
/// ```
/// use vistok::attention::{Attention, Bias};
/// use vistok::{reference, View, ViewMut};
/// // One query, two keys; the key bias masks both: the row is fully masked.
/// let (q, k, v) = ([1.0f32, 0.0], [1.0f32, 0.0, 0.0, 1.0], [1.0f32, 2.0, 3.0, 4.0]);
/// let bias = [f32::NEG_INFINITY; 2];
/// let a = Attention::new().bias(Bias::Key(View::new(&bias, &[1, 2])?));
/// let (mut o, mut lse) = ([9.0f32; 2], [0.0f32]);
/// reference::attention_forward(&a, View::new(&q, &[1, 1, 1, 2])?, View::new(&k, &[1, 1, 2, 2])?,
///     View::new(&v, &[1, 1, 2, 2])?, ViewMut::new(&mut o, &[1, 1, 1, 2])?, ViewMut::new(&mut lse, &[1, 1, 1])?)?;
/// assert_eq!((o, lse), ([0.0, 0.0], [f32::NEG_INFINITY]));
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn attention_forward<T: Float>(
    attention: &Attention<'_>,
    q: View<'_, T>,
    k: View<'_, T>,
    v: View<'_, T>,
    out: ViewMut<'_, T>,
    lse: ViewMut<'_, f32>,
) -> Result<()> {
    attention.forward_lse(Backend::Reference, q, k, v, out, lse)
}

/// Reference patchify: image → tokens `[B, L, P]`, one element at a time (see
/// [`crate::patchify`]). Errors as [`Patchify::forward`].
///
/// ```
/// use vistok::{reference, Layout, PatchConfig, Patchify, View, ViewMut};
/// let plan = Patchify::new(&PatchConfig::image(Layout::ChannelsFirst, 1, 2), &[1, 1, 1, 2])?;
/// let mut tokens = [0.0f32; 2];
/// reference::patchify(&plan, View::new(&[3u8, 4], &[1, 1, 1, 2])?, ViewMut::new(&mut tokens, &[1, 1, 2])?)?;
/// assert_eq!(tokens, [3.0, 4.0]);
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn patchify<I: Element, O: Float>(plan: &Patchify, image: View<'_, I>, tokens: ViewMut<'_, O>) -> Result<()> {
    plan.forward(Backend::Reference, image, tokens)
}

/// Reference unpatchify: tokens `[B, L, P]` → image (padding dropped). Errors as
/// [`Patchify::inverse`].
///
/// ```
/// use vistok::{reference, Layout, PatchConfig, Patchify, View, ViewMut};
/// let plan = Patchify::new(&PatchConfig::image(Layout::ChannelsFirst, 1, 2), &[1, 1, 1, 2])?;
/// let mut image = [0u8; 2];
/// reference::unpatchify(&plan, View::new(&[3.0f32, 4.4], &[1, 1, 2])?, ViewMut::new(&mut image, &[1, 1, 1, 2])?)?;
/// assert_eq!(image, [3, 4]);
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn unpatchify<I: Float, O: Element>(plan: &Patchify, tokens: View<'_, I>, image: ViewMut<'_, O>) -> Result<()> {
    plan.inverse(Backend::Reference, tokens, image)
}

/// Reference ToMe bipartite matching: the merge plan of `metric` `[B, N, Cm]` (scores in f64;
/// ties keep the lower index). Errors as [`MergePlan::bipartite`].
///
/// ```
/// use vistok::merge::MatchConfig;
/// use vistok::{reference, View};
/// let m = [1.0f32, 1.0, -1.0, -1.0];
/// let plan = reference::merge_plan(View::new(&m, &[1, 4, 1])?, &MatchConfig::new(1))?;
/// assert_eq!((plan.merged(0), plan.destinations(0)), (&[0u32][..], &[1u32][..]));
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn merge_plan<M: Float>(metric: View<'_, M>, config: &MatchConfig) -> Result<MergePlan> {
    MergePlan::bipartite(Backend::Reference, metric, config)
}
