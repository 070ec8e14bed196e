//! Reference FSQ: vector-quantize-pytorch's formula evaluated in f64 with `f64::tanh`, one
//! element at a time. Naive on purpose; it uses only the plan's levels (never the f32
//! constants of the fast paths).
//!
//! Public entry points: [`fsq_encode`](super::fsq_encode), [`fsq_decode`](super::fsq_decode), and the
//! per-element [`bound`] and [`level`].

use crate::dtype::Float;
use crate::error::{Error, Family, Result};
use crate::fsq::{Fsq, FsqStats, EPS, STATS_MAX_BINS};

/// The pre-rounding value `tanh(z + atanh(offset/half_l))·half_l − offset` of one element in f64,
/// for a dimension with `levels` levels, with `half_l = (L−1)(1 + EPS)/2` and `offset = 0.5`
/// for even `L`, `0` for odd. Its rounding (half to even) plus `⌊L/2⌋` is the level, so the
/// rounding boundaries are where this is `k + 0.5`.
///
/// ```
/// use vistok::reference::fsq::bound;
/// assert_eq!(bound(5, 0.0), 0.0);
/// assert!(bound(4, 0.0).abs() < 1e-15); // even L: the shift centres z = 0 on a level
/// assert!((bound(5, 1e9) - 2.002).abs() < 1e-12); // saturates at half_l
/// ```
pub fn bound(levels: u32, z: f64) -> f64 {
    let half_l = (levels as f64 - 1.0) * (1.0 + EPS) / 2.0;
    let offset = if levels.is_multiple_of(2) { 0.5 } else { 0.0 };
    let shift = (offset / half_l).atanh();
    (z + shift).tanh() * half_l - offset
}

/// The level of `z` (not NaN) in a dimension with `levels` levels:
/// `clamp(round_ties_even(bound(L, z)) + ⌊L/2⌋, 0, L−1)`.
///
/// ```
/// use vistok::reference::fsq::level;
/// assert_eq!([level(5, -9.0), level(5, 0.0), level(5, 0.3), level(5, 9.0)], [0, 2, 3, 4]);
/// assert_eq!([level(2, -5.0), level(2, -1.0)], [0, 1]);
/// ```
pub fn level(levels: u32, z: f64) -> u64 {
    let half_width = (levels / 2) as f64;
    let q = bound(levels, z).round_ties_even() + half_width;
    q.clamp(0.0, (levels - 1) as f64) as u64
}

/// `z` `[N, D]` → ids `[N]` on raw slices (`z.len() == ids.len()·D`, checked by the caller).
/// Errors on the first NaN (row-major order). The public form is
/// [`fsq_encode`](crate::reference::fsq_encode), on checked views.
pub(crate) fn encode<T: Float>(plan: &Fsq, z: &[T], ids: &mut [u32]) -> Result<()> {
    let levels = plan.levels();
    let d = levels.len();
    for (n, id) in ids.iter_mut().enumerate() {
        let mut sum = 0u64;
        let mut basis = 1u64;
        for (i, &l) in levels.iter().enumerate() {
            let x = z[n * d + i].to_f32();
            if x.is_nan() {
                return Err(Error::NonFinite { family: Family::Fsq, what: format!("z[{n}, {i}]") });
            }
            sum += level(l, x as f64) * basis;
            basis *= l as u64;
        }
        *id = sum as u32;
    }
    Ok(())
}

/// ids `[N]` → codes `[N, D]` on raw slices (`codes.len() == ids.len()·D`, checked by the
/// caller): `(level − ⌊L/2⌋)/⌊L/2⌋` rounded to f32, then to `O`. Errors on the first id `≥ Π L`.
/// The public form is [`fsq_decode`](crate::reference::fsq_decode), on checked views.
pub(crate) fn decode<O: Float>(plan: &Fsq, ids: &[u32], codes: &mut [O]) -> Result<()> {
    let levels = plan.levels();
    let d = levels.len();
    let size: u64 = levels.iter().map(|&l| l as u64).product();
    for (n, &id) in ids.iter().enumerate() {
        if id as u64 >= size {
            return Err(Error::Invalid {
                family: Family::Fsq,
                msg: format!("ids[{n}] = {id} is not below the codebook size {size}"),
            });
        }
        let mut basis = 1u64;
        for (i, &l) in levels.iter().enumerate() {
            let lv = (id as u64 / basis) % l as u64;
            let hw = (l / 2) as f64;
            codes[n * d + i] = O::from_f32(((lv as f64 - hw) / hw) as f32);
            basis *= l as u64;
        }
    }
    Ok(())
}

/// Per-dimension level counts and the id histogram, one id at a time (levels by division).
/// Errors on the first id `≥ Π L`.
///
/// ```
/// let fsq = vistok::Fsq::new(&[3])?;
/// let s = vistok::reference::fsq::statistics(&fsq, &[0, 2, 2])?;
/// assert_eq!(s.histogram, Some(vec![1, 0, 2]));
/// # Ok::<(), vistok::Error>(())
/// ```
pub fn statistics(plan: &Fsq, ids: &[u32]) -> Result<FsqStats> {
    let levels = plan.levels();
    let size: u64 = levels.iter().map(|&l| l as u64).product();
    let bins: u64 = levels.iter().map(|&l| l as u64).sum();
    let mut counts: Option<Vec<Vec<u64>>> =
        (bins <= STATS_MAX_BINS).then(|| levels.iter().map(|&l| vec![0; l as usize]).collect());
    let mut histogram = (size <= STATS_MAX_BINS).then(|| vec![0u64; size as usize]);
    for (n, &id) in ids.iter().enumerate() {
        if id as u64 >= size {
            return Err(Error::Invalid {
                family: Family::Fsq,
                msg: format!("ids[{n}] = {id} is not below the codebook size {size}"),
            });
        }
        if let Some(c) = counts.as_mut() {
            let mut basis = 1u64;
            for (i, &l) in levels.iter().enumerate() {
                c[i][((id as u64 / basis) % l as u64) as usize] += 1;
                basis *= l as u64;
            }
        }
        if let Some(h) = histogram.as_mut() {
            h[id as usize] += 1;
        }
    }
    Ok(FsqStats { tokens: ids.len(), levels: counts, histogram })
}
